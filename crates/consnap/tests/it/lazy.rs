//! Lazy restore (`consnap restore --lazy`): pages verified before the
//! guest sees them, and snapshots of a lazily restored VM. The lazy
//! restore of every workload, vCPU count and capture mode runs in
//! snapshots.rs, beside the eager one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
use crate::store_support;

use common::*;

/// A store of a memstress run paced to last several seconds, finished.
fn make_store(dir: &std::path::Path, spec: &str) -> std::path::PathBuf {
    let snaps = dir.join("snaps");
    run_ok(
        consnap()
            .args(["run", "--workload", spec, "--mem", "256M", "--snapshot-dir"])
            .arg(&snaps)
            .args([
                "--mode",
                "stop-copy",
                "--interval",
                "200ms",
                "--pause-probe",
                "0",
                "--retain",
                "all",
            ]),
    );
    snaps
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_damaged_page_never_reaches_the_guest() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("lazy-damage");
    // 20,000 ops at 4,000 a second over 8,192 pages: the guest is still
    // running seconds after a restore of its first epochs, long after the
    // fill went through every page.
    let spec = "memstress,wss=32M,ops=20000,rate=4000";
    let snaps = make_store(&dir, spec);
    let ids = store_support::ids(&snaps);
    let first = ids[0];
    // Flip a byte in the middle of the full epoch's page data that a
    // restore of the first epoch takes.
    let needed = store_support::needed(&snaps, first);
    let file = snaps.join(format!("epochs/{first:020}.epoch"));
    let data = needed[&file].iter().max_by_key(|(a, b)| b - a).copied().unwrap();
    let at = (data.0 + (data.1 - data.0) / 2) / 4096 * 4096 + 100;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at as usize] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    // Eager: refused before the guest runs, naming the epoch and the page.
    let out = output(consnap().arg("restore").arg(&snaps).args(["--at", &first.to_string()]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("fails its checksum") && err.contains(&format!("{first:020}.epoch")),
        "{err}"
    );
    // Lazy: the VM starts, and stops with the same error once the page is
    // reached (by the fill or by a fault), without running on it.
    let report = dir.join("lazy.json");
    let out = output(
        consnap()
            .arg("restore")
            .arg(&snaps)
            .args(["--at", &first.to_string(), "--lazy", "--pause-probe", "0", "--report"])
            .arg(&report),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let r = read_report(&report);
    assert_eq!(r["status"], "error", "{r}");
    let why = r["error"].as_str().unwrap();
    assert!(
        why.contains("lazy restore")
            && why.contains(&format!("epoch {first}"))
            && why.contains("fails its checksum")
            && why.contains("never ran on that page"),
        "{why}"
    );
    // Said once, on stderr too.
    assert_eq!(err.matches("fails its checksum").count(), 1, "{err}");
    // The guest did not finish: no checksum was reported.
    assert!(r["checksum"].is_null(), "{r}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Restore epoch `at` of `snaps` lazily with `mode` snapshots every 20 ms
/// into `into`, the fill slowed down (1 MiB every 50 ms) so that every
/// epoch is taken while pages are still arriving; kill it after 8 epochs.
/// Returns the ids of `into` taken by that run (all of them for a new
/// store, the ones after `at` for the same store).
fn lazy_with_snapshots(snaps: &std::path::Path, at: u64, into: &std::path::Path, mode: &str) -> Vec<u64> {
    let before = epoch_count(into);
    let at = at.to_string();
    let args = [
        "restore",
        snaps.to_str().unwrap(),
        "--at",
        &at,
        "--lazy",
        "--snapshot-dir",
        into.to_str().unwrap(),
        "--mode",
        mode,
        "--interval",
        "20ms",
        "--pause-probe",
        "0",
        "--retain",
        "all",
        "--max-lag",
        "100ms",
    ];
    let mut child = spawn(consnap().args(args).env("CONSNAP_TEST_LAZY_FILL_PAUSE_MS", "50"));
    child.wait_for("8 new committed epochs", |_| epoch_count(into) >= before + 8);
    let out = child.stop(libc::SIGKILL);
    assert_killed(&out, libc::SIGKILL, &args);
    let ids = store_support::ids(into);
    ids[before..].to_vec()
}

/// A restore of epoch `id` of `store`, eager or lazy, reporting into `dir`.
fn restore_run<'a>(dir: &std::path::Path, store: &'a std::path::Path, id: u64, lazy: bool) -> RestoreRun<'a> {
    RestoreRun {
        store,
        at: id.to_string(),
        extra: if lazy { &["--lazy"] } else { &[] },
        report: dir.join(format!("r-{id}-{lazy}.json")),
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_lazily_restored_vm_takes_snapshots_that_restore_exactly() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("lazy-snapshots");
    // About 6 s of paced work: each lazily restored run must take 8
    // epochs before the guest ends, also on a loaded host (4 s of work
    // left a run with 7 epochs beside a busy process).
    let spec = "memstress,wss=32M,ops=36000,rate=6000,pattern=hotcold";
    let (ops, sum) = reference(spec, 1);
    let snaps = make_store(&dir, spec);
    let first = store_support::ids(&snaps)[0];
    // The restore ran to the uninterrupted end.
    let reached_end = |r: &RestoreRun, report: &serde_json::Value| {
        assert_eq!(
            (report["ops"].as_u64(), report["checksum"].as_str()),
            (Some(ops), Some(sum.as_str())),
            "{}: epoch {}, {:?}: {report}",
            r.store.display(),
            r.at,
            r.extra
        );
    };
    let check = |store: &std::path::Path, id: u64, lazy: bool| {
        let r = restore_run(&dir, store, id, lazy);
        reached_end(&r, &restore(r.store, &r.at, r.extra, &r.report));
    };
    // Into new stores, whose first epoch is full: a page not installed yet
    // must be read (through the pager), not taken for a zero page. With
    // cow, pages arrive write-protected and share the userfaultfd.
    for mode in ["stop-copy", "cow"] {
        let again = dir.join(format!("again-{mode}"));
        let ids = lazy_with_snapshots(&snaps, first, &again, mode);
        assert!(ids.len() >= 8, "{ids:?}");
        // The first epoch after the restore, the latest, and one between,
        // each restored eagerly and lazily to the uninterrupted checksum,
        // one at a time: beside other tests, six at once (and two at once)
        // left the lazy runs with half the huge pages of the eager ones in
        // every run, failing the check below (one at a time: 1 of 2).
        let runs: Vec<RestoreRun> = [ids[0], ids[ids.len() / 2], *ids.last().unwrap()]
            .into_iter()
            .flat_map(|id| [false, true].map(|lazy| restore_run(&dir, &again, id, lazy)))
            .collect();
        let reports = restore_many(&runs, 1);
        for (r, report) in runs.iter().zip(&reports) {
            reached_end(r, report);
        }
        for pair in reports.chunks(2) {
            let (eager, lazy) = (&pair[0], &pair[1]);
            // Once resident, the lazily restored VM is back on huge pages
            // (UFFDIO_COPY installs small ones). How many depends on the
            // host's free huge pages at that moment: beside the network
            // tests' VMs a lazy run got 16 MiB where the eager one had 36,
            // so the count is reported, and only none at all fails.
            let huge = |r: &serde_json::Value| r["anon_huge_bytes"].as_u64().unwrap();
            assert!(
                lazy["restored_from"]["lazy"]["huge_s"].is_f64() && huge(lazy) > 0,
                "lazy: {lazy}\neager: {eager}"
            );
            if 2 * huge(lazy) < huge(eager) {
                eprintln!("lazy restore on {} huge bytes, eager on {}", huge(lazy), huge(eager));
            }
        }
    }
    // Into the store it came from: cow epochs continue the restored
    // epoch's chain. Restored again lazily with cow snapshots, killed, and
    // restored once more.
    let ids = lazy_with_snapshots(&snaps, first, &snaps, "cow");
    check(&snaps, ids[0], true);
    let again = lazy_with_snapshots(&snaps, ids[ids.len() / 2], &snaps, "cow");
    check(&snaps, again[0], false);
    check(&snaps, *again.last().unwrap(), true);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn empty_regions_touched_before_the_fill_ends_fault_in_as_huge_pages() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("lazy-zero-regions");
    // Written in order at 10,000 pages a second, the 128 MiB working set
    // is mostly empty in the first epoch (taken at 200 ms); the restored
    // guest then writes the rest while the fill, slowed down, is still
    // going: the regions it finds empty must come back huge, not as small
    // zero pages that nothing can collapse later.
    let spec = "memstress,wss=128M,ops=40000,rate=10000,pattern=seq";
    let (ops, sum) = reference(spec, 1);
    let snaps = make_store(&dir, spec);
    let first = store_support::ids(&snaps)[0];
    let report = dir.join("lazy.json");
    run_ok(
        consnap()
            .arg("restore")
            .arg(&snaps)
            .args(["--at", &first.to_string(), "--lazy", "--pause-probe", "0", "--report"])
            .arg(&report)
            .env("CONSNAP_TEST_LAZY_FILL_PAUSE_MS", "1000"),
    );
    let r = read_report(&report);
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "{r}"
    );
    // The guest reached empty regions before the fill did (it writes 40
    // MiB a second, the fill installs 1), and each came back huge.
    let regions = r["restored_from"]["lazy"]["zero_regions"].as_u64().unwrap();
    let huge = r["anon_huge_bytes"].as_u64().unwrap();
    assert!(regions > 0 && huge >= regions << 21, "{r}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn compaction_never_pulls_a_file_from_under_a_running_lazy_restore() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("lazy-compact");
    let spec = "memstress,wss=32M,ops=20000,rate=4000";
    let (ops, sum) = reference(spec, 1);
    let snaps = make_store(&dir, spec);
    let before = store_support::ids(&snaps);
    assert!(before.len() >= 10, "{before:?}");
    // A middle epoch, restored lazily with a slow fill: its chain is read
    // for seconds after the VM starts, on faults as the guest reaches its
    // pages.
    let at = before[before.len() / 2];
    let report = dir.join("lazy.json");
    let sock = dir.join("api.sock");
    let spawned = std::time::Instant::now();
    let mut child = spawn(
        consnap()
            .arg("restore")
            .arg(&snaps)
            .args(["--at", &at.to_string(), "--lazy", "--pause-probe", "0", "--api-sock"])
            .arg(&sock)
            .arg("--report")
            .arg(&report)
            .env("CONSNAP_TEST_LAZY_FILL_PAUSE_MS", "100"),
    );
    // Until the restored guest has done ops of its own (its counter moved
    // past where the API first saw it); the fill then still takes seconds.
    let mut first = None;
    child.wait_for("the restored guest to run", |_| match (guest_ops(&sock), first) {
        (Some(n), None) => {
            first = Some(n);
            false
        }
        (Some(n), Some(f)) => n > f,
        (None, _) => false,
    });
    assert!(child.running(), "the restore ended before the compaction");
    // Meanwhile, merge everything older than a second into one epoch a
    // second and fold chains to two files: the files of `at`'s chain are
    // rewritten or removed.
    run_ok(
        consnap()
            .args(["compact", "--retain", "1s:all,1h:1s", "--max-chain", "2"])
            .arg(&snaps),
    );
    let compacted = spawned.elapsed().as_secs_f64();
    let after = store_support::ids(&snaps);
    assert!(after.len() < before.len(), "compaction removed nothing: {after:?}");
    let out = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_report(&report);
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "{r}"
    );
    // The restore was still installing pages read from the chain when the
    // compaction had rewritten it: resident after the compaction ended (the
    // test's count starts before the restore's), or never (the run ended
    // first, after the compaction). And the guest took faults on pages not
    // installed yet.
    let lazy = &r["restored_from"]["lazy"];
    let resident = lazy["resident_s"].as_f64();
    assert!(
        resident.is_none_or(|t| t > compacted),
        "resident at {resident:?} s, before the compaction ended ({compacted:.2} s): the test proves nothing\n{r}"
    );
    assert!(lazy["faults"].as_u64().unwrap() > 0, "{r}");
}
