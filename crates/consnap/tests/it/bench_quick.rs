//! `consnap bench --quick`: the smoke test of the benchmark (correctness
//! only, no timing asserts). Every run finishes, every restored newest
//! snapshot reaches the uninterrupted checksum, QEMU's cells run (the test
//! needs QEMU), the report and plots are written, and a rerun resumes
//! (skips every run already in the results).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;

#[test]
#[cfg_attr(any(no_kvm, no_qemu), ignore = "needs /dev/kvm and QEMU")]
fn quick_bench_runs_every_cell_and_resumes() {
    if !kvm_ready() {
        return;
    }
    let qemu = crate::qemu::qemu_ready();
    let dir = tempdir("bench");
    let results = dir.join("results");
    let out = spawn(consnap().args(["bench", "--quick", "--results"]).arg(&results))
        .deadline(Duration::from_secs(900))
        .wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(results.join("runs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |w: &str, mode: &str, iv: u64| {
        lines
            .iter()
            .find(|r| r["workload"] == w && r["mode"] == mode && r["interval_ms"] == iv)
            .unwrap_or_else(|| panic!("no run of {w} {mode} at {iv} ms in {lines:#?}"))
    };
    // The baseline of the same work (and repeat).
    let base = |r: &serde_json::Value, mode: &str| {
        lines
            .iter()
            .find(|b| b["spec"] == r["spec"] && b["mode"] == mode && b["rep"] == r["rep"])
            .unwrap_or_else(|| panic!("no {mode} run for {r}"))
    };
    for w in ["build", "memstress-moderate"] {
        let none = find(w, "none", 0);
        for mode in ["stop-copy-full", "stop-copy", "cow"] {
            for iv in [100, 1000] {
                let r = find(w, mode, iv);
                assert!(r["error"].is_null(), "{r}");
                // A run that lost over 200% (the CI machine is busy) is
                // stopped at the cap: it has no checksum of its own, and
                // its restore is checked against the baseline's instead.
                if r["stopped_s"].is_null() {
                    assert_eq!(r["checksum"], base(r, "none")["checksum"], "{r}");
                } else {
                    assert!(r["checksum"].is_null(), "{r}");
                }
                assert_eq!(r["restore_ok"], true, "{r}");
                // One is due each interval of the run (the bench sizes
                // runs for about three; a calibration on a busy machine
                // can make them shorter), but the tests beside this one
                // can hold a saver back (an epoch durable after 5 s was
                // seen): late snapshots are counted, not a failure. A run
                // stopped at the cap may have had one long pause (the
                // baselines write their first epoch paused: 14 s on a busy
                // CI disk was seen) and no time for more.
                let (taken, late) = (r["snapshots"].as_u64().unwrap(), r["delayed"].as_u64().unwrap());
                let due = (r["wall_s"].as_f64().unwrap() * 1000.0 / iv as f64 - 0.5)
                    .floor()
                    .max(0.0) as u64;
                let stopped = !r["stopped_s"].is_null();
                assert!(taken >= 1, "{r}");
                assert!(taken >= due.min(3) || late >= 1 || stopped, "{due} due: {r}");
                assert!(r["pause"]["p99_us"].as_f64().unwrap() > 0.0, "{r}");
            }
        }
        // The memstress guest is paced: its busy time is measured, and
        // below the wall time when the guest kept its pace (a busy CI host
        // can keep it behind the whole run, and then it never idles).
        if w == "memstress-moderate" {
            let (busy, wall) = (none["busy_s"].as_f64().unwrap(), none["wall_s"].as_f64().unwrap());
            assert!(busy > 0.0 && busy <= wall, "{none}");
            let spec = workload::Spec::parse(&guest_words(none["spec"].as_str().unwrap())).unwrap();
            let paced = spec.ops as f64 / spec.rate as f64;
            if wall < paced * 1.2 {
                assert!(busy < wall, "kept its pace ({paced:.1} s) but never idled: {none}");
            }
        }
    }
    if qemu {
        for mode in ["qemu-none", "qemu-background", "qemu-stop-copy"] {
            let r = find("build", mode, if mode == "qemu-none" { 0 } else { 1000 });
            assert!(r["error"].is_null(), "{r}");
            // The same ELF and work under QEMU: the same checksum.
            assert_eq!(r["checksum"], base(r, "none")["checksum"], "{r}");
            if mode != "qemu-none" {
                assert_eq!(r["restore_ok"], true, "{r}");
                assert!(r["bytes_p50"].as_f64().unwrap() > 1e6, "{r}");
            }
        }
    }
    let doc = std::fs::read_to_string(results.join("BENCHMARKS.md")).unwrap();
    assert!(doc.contains("| build | 1 s |"), "{doc}");
    assert!(results.join("plots/loss-build.svg").exists());
    assert!(results.join("plots/pause-memstress-moderate.svg").exists());
    // A rerun finds every run done.
    let out = run_ok(consnap().args(["bench", "--quick", "--results"]).arg(&results));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("0 runs made, {} already in the results", lines.len())),
        "{stdout}"
    );
}
