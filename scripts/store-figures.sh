#!/usr/bin/env bash
# Store figures for docs/DESIGN.md: what compression saves on memstress,
# build and ftp, and what it costs in capture and restore time. Each run
# takes cow snapshots every 100 ms into a fresh store with --retain all
# (no reclamation), then the latest epoch is restored after dropping the
# page cache. Needs root (drop_caches) and /dev/kvm. Prints one line per
# workload and codec, and every command it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${CONSNAP:-target/release/consnap}
OUT=${OUT:-target/store-figures}
mkdir -p "$OUT"
declare -A SPEC=(
    [memstress]="memstress,wss=256M,ops=400000,rate=50000,pattern=hotcold"
    [build]="build,wss=128M,ops=1200"
    [ftp]="ftp,wss=256M,ops=4096,rate=40M"
)
for w in memstress build ftp; do
    for c in none lz4 zstd; do
        d=$OUT/$w-$c
        rm -rf "$d"
        cmd=("$B" run --workload "${SPEC[$w]}" --mem 512M --snapshot-dir "$d/s" --interval 100ms
             --retain all --max-chain 0 --compress "$c" --pause-probe 0 --report "$d/run.json")
        echo "+ ${cmd[*]}" >&2
        mkdir -p "$d"
        "${cmd[@]}" > /dev/null 2> "$d/run.err"
        sync; echo 3 > /proc/sys/vm/drop_caches
        rcmd=("$B" restore "$d/s" --at latest --pause-probe 0 --report "$d/restore.json")
        echo "+ ${rcmd[*]}" >&2
        "${rcmd[@]}" > /dev/null 2> "$d/restore.err"
        python3 - "$d" "$w" "$c" <<'PY'
import json, os, sys
d, w, c = sys.argv[1:]
run = json.load(open(f"{d}/run.json"))
rs = json.load(open(f"{d}/restore.json"))
s = run["snapshots"]
size = sum(os.path.getsize(os.path.join(f"{d}/s/epochs", f)) for f in os.listdir(f"{d}/s/epochs"))
eps = s["epochs"]
save = sorted(e["save_ms"] for e in eps)
print(f"{w:9} {c:4}  epochs {s['count']:3}  store {size/2**20:8.1f} MiB  page data saved/epoch p50 {save[len(save)//2]:6.1f} ms"
      f"  durable p50 {s['durable']['p50_us']/1e3:6.1f} ms  pause p50 {s['pause']['p50_us']:6.0f} us"
      f"  restore latest {rs['restored_from']['restore_s']:.3f} s (chain {rs['restored_from']['chain']})"
      f"  checksum ok {run['checksum'] == rs['checksum']}")
PY
    done
done
