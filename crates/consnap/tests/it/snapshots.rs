//! The heart of exact snapshots: run a deterministic workload with
//! snapshots, kill -9 the VMM part-way, restore from the latest snapshot and
//! from an earlier one, let the guest finish, and get exactly the checksum
//! of an uninterrupted run (computed on the host by the same workload code).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;

/// Snapshots every 25ms: a dozen epochs take a fraction of a second on an
/// idle machine, and about 5 s on one kept busy by `stress-ng --cpu 2`
/// (the saver runs below everything else in priority).
const INTERVAL: &str = "25ms";

/// Workloads that run for about six seconds (memstress and ftp are
/// rate-limited and idle between their ops, so they last that long on any
/// machine and cost little CPU; build is sized to take about 2.5 s here),
/// longer than the epochs the tests wait for before they kill the VMM take
/// even on a loaded machine: the kill lands mid-run.
fn spec(workload: &str, vcpus: u32) -> String {
    let n = u64::from(vcpus);
    match workload {
        "memstress" => format!("memstress,wss=32M,ops={},rate=10000,pattern=hotcold", 60_000 * n),
        "build" => format!("build,wss=32M,ops={}", 3_500 * n),
        "ftp" => format!("ftp,wss=32M,ops={},rate=20M", 2_000 * n),
        _ => unreachable!(),
    }
}

fn kill_restore(workload: &str, mode: &str, vcpus: u32) {
    if !kvm_ready() {
        return;
    }
    let spec = spec(workload, vcpus);
    let (ops, sum) = reference(&spec, vcpus);
    let dir = tempdir(&format!("kill-{workload}-{mode}-{vcpus}"));
    let snaps = dir.join("snaps");
    let want = 12;
    run_and_kill(
        &[
            "run",
            "--workload",
            &spec,
            "--vcpus",
            &vcpus.to_string(),
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--mode",
            mode,
            "--interval",
            INTERVAL,
            "--pause-probe",
            "0",
        ],
        &snaps,
        want,
    );
    let epochs = ls(&snaps);
    assert!(epochs.len() >= want, "{epochs:?}");
    let ids: Vec<u64> = epochs.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    if mode == "stop-copy" || mode == "cow" {
        // One full epoch, then a chain of incremental ones, each on the previous.
        assert_eq!(epochs[0]["full"], true);
        assert!(epochs[0]["parent"].is_null());
        for w in epochs.windows(2) {
            assert_eq!(w[1]["full"], false, "{w:?}");
            assert_eq!(w[1]["parent"], w[0]["id"], "{w:?}");
        }
        assert!(epochs.len() > 10, "need a chain of at least 10 incremental epochs");
    } else {
        assert!(epochs.iter().all(|e| e["full"] == true && e["parent"].is_null()));
    }
    let latest = *ids.last().unwrap();
    let middle = ids[ids.len() / 2];
    // Restoring the middle epoch must not read any later one: in a copy
    // of the store, damage them all, so that a restore from the wrong
    // epoch fails.
    let copy = dir.join("snaps-middle");
    copy_store(&snaps, &copy);
    for later in ids.iter().filter(|i| **i > middle) {
        let path = copy.join(format!("epochs/{later:020}.epoch"));
        std::fs::write(&path, b"damaged").unwrap();
    }
    // Each eager and lazy: the four at once where the guest is paced (most
    // of the time goes to it finishing its work, idling); two at a time
    // for build, which is CPU-bound (more would only take cores from the
    // tests beside this one: their savers, below the vCPUs in priority,
    // then stalled for seconds).
    let mut runs = Vec::new();
    let mut what = Vec::new();
    for (store, at, epoch) in [
        (&snaps, "latest".to_string(), latest),
        (&copy, middle.to_string(), middle),
    ] {
        for lazy in [false, true] {
            runs.push(RestoreRun {
                store,
                at: at.clone(),
                extra: if lazy { &["--lazy"] } else { &[] },
                report: dir.join(format!("restore-{epoch}-{lazy}.json")),
            });
            what.push((epoch, lazy));
        }
    }
    let at_once = if workload == "build" { 2 } else { 4 };
    let reports = what.into_iter().zip(restore_many(&runs, at_once));
    for ((epoch, lazy), r) in reports {
        check_restored(&r, epoch, (ops, &sum), &ids, (workload, mode, vcpus));
        assert_eq!(r["restored_from"]["lazy"].is_object(), lazy, "{r}");
    }
}

/// A copy of the store at `from` (its epochs and top-level files) at `to`.
fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to.join("epochs")).unwrap();
    for sub in ["", "epochs"] {
        for e in std::fs::read_dir(from.join(sub)).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
}

/// A restore of `epoch` (one of `ids`) ran to the uninterrupted end.
fn check_restored(
    r: &serde_json::Value,
    epoch: u64,
    (ops, sum): (u64, &str),
    ids: &[u64],
    (workload, mode, vcpus): (&str, &str, u32),
) {
    assert_eq!(r["command"], "restore");
    assert_eq!(r["status"], "poweroff", "{r}");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["restored_from"]["epoch"], epoch);
    assert_eq!(r["ops"], ops);
    assert_eq!(r["workload_errors"], 0);
    assert_eq!(
        r["checksum"], sum,
        "restore of epoch {epoch} diverged ({workload}, {mode}, {vcpus} vCPUs): {r}"
    );
    if mode != "stop-copy-full" {
        let chain = r["restored_from"]["chain"].as_u64().unwrap();
        assert_eq!(chain, ids.iter().position(|i| *i == epoch).unwrap() as u64 + 1);
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_cow_1_vcpu() {
    kill_restore("memstress", "cow", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_cow_2_vcpus() {
    kill_restore("memstress", "cow", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_cow_1_vcpu() {
    kill_restore("build", "cow", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_cow_2_vcpus() {
    kill_restore("build", "cow", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_cow_1_vcpu() {
    kill_restore("ftp", "cow", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_cow_2_vcpus() {
    kill_restore("ftp", "cow", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_stop_copy_1_vcpu() {
    kill_restore("memstress", "stop-copy", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_stop_copy_2_vcpus() {
    kill_restore("memstress", "stop-copy", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_stop_copy_full_1_vcpu() {
    kill_restore("memstress", "stop-copy-full", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_stop_copy_full_2_vcpus() {
    kill_restore("memstress", "stop-copy-full", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_stop_copy_1_vcpu() {
    kill_restore("build", "stop-copy", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_stop_copy_2_vcpus() {
    kill_restore("build", "stop-copy", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_stop_copy_full_1_vcpu() {
    kill_restore("build", "stop-copy-full", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_stop_copy_full_2_vcpus() {
    kill_restore("build", "stop-copy-full", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_stop_copy_1_vcpu() {
    kill_restore("ftp", "stop-copy", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_stop_copy_2_vcpus() {
    kill_restore("ftp", "stop-copy", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_stop_copy_full_1_vcpu() {
    kill_restore("ftp", "stop-copy-full", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_stop_copy_full_2_vcpus() {
    kill_restore("ftp", "stop-copy-full", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn restoring_the_same_epoch_twice_gives_the_same_run() {
    if !kvm_ready() {
        return;
    }
    let spec = spec("memstress", 2);
    let dir = tempdir("twice");
    let snaps = dir.join("snaps");
    run_and_kill(
        &[
            "run",
            "--workload",
            &spec,
            "--vcpus",
            "2",
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--interval",
            INTERVAL,
        ],
        &snaps,
        6,
    );
    let before = store_files(&snaps);
    let a = restore(&snaps, "4", &[], &dir.join("a.json"));
    let b = restore(&snaps, "4", &[], &dir.join("b.json"));
    for key in ["status", "ops", "checksum", "workload_errors"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(a["checksum"], reference(&spec, 2).1.as_str());
    // Restoring read the store and changed nothing in it.
    let after = store_files(&snaps);
    assert_eq!(before, after);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn snapshot_a_restored_vm_and_restore_that() {
    if !kvm_ready() {
        return;
    }
    let spec = spec("build", 1);
    let (ops, sum) = reference(&spec, 1);
    let dir = tempdir("resnap");
    let snaps = dir.join("snaps");
    let s = snaps.to_str().unwrap();
    run_and_kill(
        &["run", "--workload", &spec, "--snapshot-dir", s, "--interval", INTERVAL],
        &snaps,
        5,
    );
    let first: Vec<u64> = ls(&snaps).iter().map(|e| e["id"].as_u64().unwrap()).collect();
    let from = first[2];

    // Restore epoch `from` and keep snapshotting into the same directory:
    // the new epochs branch off `from`, the first one incremental.
    run_and_kill(
        &[
            "restore",
            s,
            "--at",
            &from.to_string(),
            "--snapshot-dir",
            s,
            "--interval",
            INTERVAL,
        ],
        &snaps,
        first.len() + 4,
    );
    let all = ls(&snaps);
    let branch: Vec<&serde_json::Value> = all
        .iter()
        .filter(|e| e["id"].as_u64().unwrap() > *first.last().unwrap())
        .collect();
    assert!(branch.len() >= 4);
    assert_eq!(
        branch[0]["parent"], from,
        "first epoch after the restore must build on the restored one"
    );
    assert_eq!(branch[0]["full"], false);
    let r = restore(&snaps, "latest", &[], &dir.join("branch.json"));
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str()))
    );
    assert!(
        r["restored_from"]["chain"].as_u64().unwrap() >= 5,
        "{}",
        r["restored_from"]
    );

    // Restored into a different directory, the first epoch there is full.
    let other = dir.join("other");
    let o = other.to_str().unwrap();
    run_and_kill(
        &[
            "restore",
            s,
            "--at",
            &from.to_string(),
            "--snapshot-dir",
            o,
            "--interval",
            INTERVAL,
        ],
        &other,
        3,
    );
    let epochs = ls(&other);
    assert_eq!(epochs[0]["full"], true);
    let r = restore(&other, "latest", &[], &dir.join("other.json"));
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str()))
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn report_has_snapshot_figures() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("figures");
    let report = dir.join("r.json");
    let snaps = dir.join("snaps");
    // A long workload, stopped by SIGTERM once 5 epochs are committed: the
    // report is written on the way out.
    run_and_term(
        &[
            "run",
            "--workload",
            "memstress,wss=32M,ops=100000,rate=10000",
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--interval",
            INTERVAL,
            "--report",
            report.to_str().unwrap(),
        ],
        &snaps,
        5,
    );
    let r = read_report(&report);
    let s = &r["snapshots"];
    let count = s["count"].as_u64().unwrap();
    assert!(count >= 5, "{s}");
    assert_eq!(s["failed"], 0);
    assert_eq!(s["mode"], "cow", "cow is the default mode");
    assert_eq!(s["epochs"].as_array().unwrap().len() as u64, count);
    assert_eq!(count as usize, epoch_count(&snaps));
    for key in ["pause", "durable", "vcpu_pause"] {
        let p = &s[key];
        assert_eq!(p["count"].as_u64(), Some(count), "{key}");
        assert!(
            p["p50_us"].as_f64().unwrap() > 0.0 && p["p50_us"].as_f64() <= p["max_us"].as_f64(),
            "{key}: {p}"
        );
    }
    for e in s["epochs"].as_array().unwrap() {
        assert!(
            e["durable_ms"].as_f64().unwrap() * 1000.0 >= e["pause_us"].as_f64().unwrap(),
            "{e}"
        );
        assert!(
            e["bytes"].as_u64().unwrap() >= 4096 * (1 + e["pages"].as_u64().unwrap()),
            "{e}"
        );
    }
    assert!(s["pages"]["total"].as_u64().unwrap() > 0);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sigterm_stops_cleanly_and_the_last_snapshot_is_whole() {
    if !kvm_ready() {
        return;
    }
    let spec = spec("ftp", 1);
    let dir = tempdir("sigterm");
    let snaps = dir.join("snaps");
    let report = dir.join("r.json");
    run_and_term(
        &[
            "run",
            "--workload",
            &spec,
            "--interval",
            INTERVAL,
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &snaps,
        4,
    );
    let r = read_report(&report);
    assert_eq!(r["status"], "signal");
    assert_eq!(r["exit_code"], 128 + libc::SIGTERM);
    // Every snapshot the report counts is committed, and the latest restores exactly.
    assert_eq!(r["snapshots"]["count"].as_u64().unwrap() as usize, epoch_count(&snaps));
    let rr = restore(&snaps, "latest", &[], &dir.join("rr.json"));
    assert_eq!(rr["checksum"], reference(&spec, 1).1.as_str());
}

/// Guest pages (first, end) that an epoch's index covers.
fn gfn_span(snaps: &std::path::Path, id: u64) -> (u64, u64) {
    let store = store::Store::open(snaps, store::Access::Read).unwrap();
    let epoch = store.open_epoch(id).unwrap();
    let index = epoch.index();
    let first = index.iter().map(|x| x.gfn).min().unwrap();
    let end = index.iter().map(|x| x.gfn + u64::from(x.count)).max().unwrap();
    (first, end)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ram_above_the_mmio_hole_round_trips() {
    if !kvm_ready() {
        return;
    }
    // 4 GiB of RAM: 3 GiB below the MMIO hole, 1 GiB above 4 GiB. Never
    // touched pages are recorded as zero extents, so this stays cheap.
    let spec = "memstress,wss=32M,ops=20000,rate=10000";
    let dir = tempdir("above-hole");
    let snaps = dir.join("snaps");
    let s = snaps.to_str().unwrap();
    run_and_kill(
        &[
            "run",
            "--workload",
            spec,
            "--mem",
            "4G",
            "--snapshot-dir",
            s,
            "--interval",
            INTERVAL,
        ],
        &snaps,
        4,
    );
    let pages = (4u64 << 30) / 4096;
    let above_4g_end = (5u64 << 30) / 4096;
    let epochs = ls(&snaps);
    assert_eq!(
        epochs[0]["pages"].as_u64().unwrap() + epochs[0]["zero_pages"].as_u64().unwrap(),
        pages
    );
    // The last GiB is saved at its guest-physical address, above 4 GiB.
    assert_eq!(gfn_span(&snaps, 1), (0, above_4g_end));
    // The restored VM has all 4 GiB at the same addresses: its own first
    // (full) epoch covers them again.
    let again = dir.join("again");
    let r = restore(
        &snaps,
        "latest",
        &["--snapshot-dir", again.to_str().unwrap(), "--interval", INTERVAL],
        &dir.join("r.json"),
    );
    assert_eq!(r["mem_bytes"], 4u64 << 30);
    assert_eq!(r["checksum"], reference(spec, 1).1.as_str());
    let first = &ls(&again)[0];
    assert_eq!(first["full"], true);
    assert_eq!(
        first["pages"].as_u64().unwrap() + first["zero_pages"].as_u64().unwrap(),
        pages
    );
    assert_eq!(gfn_span(&again, 1), (0, above_4g_end));
}
