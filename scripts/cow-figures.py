#!/usr/bin/env python3
"""Figures for the copy-on-write engine: cow beside stop-copy and
stop-copy-full, measured back to back on the same workload.

Usage: scripts/cow-figures.py [--repeats N] [--only NAME,...] [--out DIR]

Each case runs `consnap run` once per mode (and once without snapshots when
it measures loss), in an interleaved order, N times, and prints the median
and the spread. Every command it runs is printed first, so that any figure
can be reproduced by hand. The machine is shared and noisy: compare the
modes of one case with each other, as ratios.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("CONSNAP_BIN", os.path.join(ROOT, "target", "release", "consnap"))

# name -> (workload spec, --mem, interval, modes, measure loss?)
CASES = {
    # 1. 20 ms, about 10 MiB dirtied per epoch (2,560 random pages of 256 MiB).
    "pause-20ms-10MiB": ("memstress,wss=256M,ops=1280000,rate=128000", "1G", "20ms", ["cow", "cow-4K", "stop-copy"], False),
    # 2. 1 GiB guest dirtying all of a 256 MiB working set every epoch, 200 ms.
    "pause-200ms-256MiB": ("memstress,wss=256M,ops=150000000", "1G", "200ms", ["cow", "stop-copy"], False),
    # 3. build all-out at short intervals.
    "build-500ms": ("build,wss=128M,ops=8000", "1G", "500ms", ["cow", "stop-copy"], True),
    "build-200ms": ("build,wss=128M,ops=8000", "1G", "200ms", ["cow", "stop-copy"], True),
    "build-100ms": ("build,wss=128M,ops=8000", "1G", "100ms", ["cow", "stop-copy"], True),
    "build-50ms": ("build,wss=128M,ops=8000", "1G", "50ms", ["cow", "stop-copy"], True),
    "build-20ms": ("build,wss=128M,ops=8000", "1G", "20ms", ["cow", "stop-copy"], True),
    "build-10ms": ("build,wss=128M,ops=8000", "1G", "10ms", ["cow", "cow-1ms", "stop-copy"], True),
    # 4. loss at 1 s and 10 s, runs of at least 30 s without snapshots
    #    (sized from the bench's calibration on this machine).
    "loss-build-1s": ("build,wss=128M,ops=40000", "1G", "1s", ["cow", "stop-copy", "stop-copy-full"], True),
    "loss-build-10s": ("build,wss=128M,ops=40000", "1G", "10s", ["cow", "stop-copy", "stop-copy-full"], True),
    "loss-ftp-1s": ("ftp,wss=256M,ops=1700000", "1G", "1s", ["cow", "stop-copy", "stop-copy-full"], True),
    "loss-ftp-10s": ("ftp,wss=256M,ops=1700000", "1G", "10s", ["cow", "stop-copy", "stop-copy-full"], True),
    "loss-ftp100M-1s": ("ftp,wss=256M,ops=48000,rate=100M", "1G", "1s", ["cow", "stop-copy", "stop-copy-full"], True),
    "loss-ftp100M-10s": ("ftp,wss=256M,ops=48000,rate=100M", "1G", "10s", ["cow", "stop-copy", "stop-copy-full"], True),
    "loss-memstress-1s": ("memstress,wss=256M,ops=420000000", "1G", "1s", ["cow", "stop-copy", "stop-copy-full"], True),
    "loss-memstress-10s": ("memstress,wss=256M,ops=420000000", "1G", "10s", ["cow", "stop-copy", "stop-copy-full"], True),
}


def run(spec, mem, interval, mode, workdir):
    snaps = os.path.join(workdir, "snaps")
    shutil.rmtree(snaps, ignore_errors=True)
    report = os.path.join(workdir, "r.json")
    cmd = [BIN, "run", "--workload", spec, "--mem", mem, "--pause-probe", "0", "--report", report]
    env = None
    if mode == "cow-4K":
        # cow with 4 KiB write-protect blocks instead of 2 MiB ones.
        cmd += ["--snapshot-dir", snaps, "--mode", "cow", "--cow-block", "4K", "--interval", interval]
    elif mode == "cow-1ms":
        # cow with the pause allowed 1 ms of hot-block copies.
        cmd += ["--snapshot-dir", snaps, "--mode", "cow", "--interval", interval, "--cow-pause-copy", "1ms"]
    elif mode != "none":
        cmd += ["--snapshot-dir", snaps, "--mode", mode, "--interval", interval]
    print("  $ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=1800, env=env)
    with open(report) as f:
        r = json.load(f)
    shutil.rmtree(snaps, ignore_errors=True)
    return r


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    names = [n for n in CASES if not a.only or n in a.only.split(",")]
    workdir = a.out or tempfile.mkdtemp(prefix="cow-figures-", dir=os.path.join(ROOT, "target"))
    os.makedirs(workdir, exist_ok=True)
    results = {}
    for name in names:
        spec, mem, interval, modes, loss = CASES[name]
        order = (["none"] if loss else []) + modes
        res = {m: [] for m in order}
        print(f"# {name}: {spec} --mem {mem} --interval {interval}", file=sys.stderr, flush=True)
        for _ in range(a.repeats):
            for m in order:
                res[m].append(run(spec, mem, interval, m, workdir))
        results[name] = res
        print_case(name, spec, interval, res, loss)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({n: {m: rs for m, rs in r.items()} for n, r in results.items()}, f)
    print(f"\nreports: {workdir}/results.json", file=sys.stderr)


def print_case(name, spec, interval, res, loss):
    print(f"\n### {name} ({spec}, interval {interval})\n")
    print("| mode | wall s (min-max) | loss | pause p50 / p99 / max (ms) | epochs | delayed | pages/epoch p50 | faults/epoch p50 | saver MB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = med([r["wall_time_s"] for r in res.get("none", [])]) if loss else None
    for m, rs in res.items():
        walls = [r["wall_time_s"] for r in rs]
        lo, hi = spread(walls)
        row = f"| {m} | {med(walls):.2f} ({lo:.2f}-{hi:.2f}) | "
        row += f"{(med(walls) - base) / base * 100:+.1f}% | " if base else "| "
        s = [r["snapshots"] for r in rs if r.get("snapshots")]
        if s:
            p50 = med([x["pause"]["p50_us"] for x in s]) / 1e3
            p99 = med([x["pause"]["p99_us"] for x in s]) / 1e3
            pmax = max(x["pause"]["max_us"] for x in s) / 1e3
            row += f"{p50:.2f} / {p99:.2f} / {pmax:.2f} | {med([x['count'] for x in s]):.0f} | "
            row += f"{med([x['delayed'] for x in s]):.0f} | {med([x['pages']['p50'] for x in s]):.0f} | "
            row += f"{med([x['faults']['p50'] for x in s]):.0f} | {med([x['save_mb_s'] for x in s]):.0f} |"
        else:
            row += "| | | | | |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
