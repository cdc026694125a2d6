//! Helpers shared by the integration tests.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use vmm::testing::{Child, Rng, TestDir, kvm_ready, output, run_ok, seed, spawn, tail, try_spawn};

pub fn consnap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_consnap"))
}

/// A fresh private directory for one test under Cargo's scratch directory
/// (target/tmp), removed when the test passes, kept (and named) when it fails.
pub fn tempdir(name: &str) -> TestDir {
    TestDir::new(env!("CARGO_TARGET_TMPDIR"), name)
}

pub fn read_report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Guest command-line words for a `NAME,k=v,...` spec, as consnap makes them.
pub use bench::matrix::guest_words;

/// A `NAME,k=v,...` spec, parsed as the guest parses it.
pub fn parse_spec(spec: &str) -> workload::Spec {
    workload::Spec::parse(&guest_words(spec)).unwrap()
}

/// The checksum the host computes for a workload spec (`NAME,k=v,...`).
pub fn reference(spec: &str, vcpus: u32) -> (u64, String) {
    let out = workload::reference(&parse_spec(spec), vcpus);
    (out.ops, format!("{:#018x}", out.checksum))
}

/// Committed epoch files in a snapshot directory.
pub fn epoch_count(snaps: &Path) -> usize {
    std::fs::read_dir(snaps.join("epochs"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".epoch"))
                .count()
        })
        .unwrap_or(0)
}

/// `consnap ls --json`.
#[track_caller]
pub fn ls(snaps: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(consnap().args(["ls", "--json"]).arg(snaps));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Start `consnap` with `args` and wait until `snaps` holds at least
/// `epochs` committed epochs. The run must last longer than that (a
/// rate-limited workload with room to spare): if it ends first, the test
/// fails at once with its output. Unless `args` set `--max-lag`, a
/// snapshot 100 ms late makes the saver run at the vCPUs' priority: beside
/// the suite's other tests (their busy vCPUs) a saver below them took
/// seconds per epoch, and runs ended before their epochs.
#[track_caller]
pub fn start_until_epochs(args: &[&str], snaps: &Path, epochs: usize) -> Child {
    let mut cmd = consnap();
    cmd.args(args);
    if !args.contains(&"--max-lag") {
        cmd.args(["--max-lag", "100ms"]);
    }
    let mut child = spawn(&mut cmd);
    child.wait_for(&format!("{epochs} committed epochs in {}", snaps.display()), |_| {
        epoch_count(snaps) >= epochs
    });
    child
}

/// [`start_until_epochs`], then kill the VMM with SIGKILL, as a crash would.
#[track_caller]
pub fn run_and_kill(args: &[&str], snaps: &Path, epochs: usize) {
    let out = start_until_epochs(args, snaps, epochs).stop(libc::SIGKILL);
    assert_killed(&out, libc::SIGKILL, args);
}

/// [`start_until_epochs`], then stop the VMM with SIGTERM (it stops the VM
/// cleanly and writes its report); returns its output.
#[track_caller]
pub fn run_and_term(args: &[&str], snaps: &Path, epochs: usize) -> Output {
    stop_term(start_until_epochs(args, snaps, epochs), args)
}

/// Stop a running VMM `what` with SIGTERM and check that it stopped the
/// VM cleanly (exit 128 + SIGTERM, report written); returns its output.
#[track_caller]
pub fn stop_term(child: Child, what: &[&str]) -> Output {
    let out = child.stop(libc::SIGTERM);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "{what:?} did not stop on SIGTERM as expected:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The run ended by `sig`, not by itself before the signal came.
#[track_caller]
pub fn assert_killed(out: &Output, sig: i32, what: &[&str]) {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(sig),
        "{what:?} ended ({}) before it could be killed; make the workload longer:\n{}",
        out.status,
        vmm::testing::tail(&out.stderr, 40)
    );
}

/// `consnap restore DIR --at AT` to the end; returns its report.
#[track_caller]
pub fn restore(snaps: &Path, at: &str, extra: &[&str], report: &Path) -> serde_json::Value {
    run_ok(
        consnap()
            .args(["restore"])
            .arg(snaps)
            .args(["--at", at, "--pause-probe", "0", "--report"])
            .arg(report)
            .args(extra),
    );
    read_report(report)
}

/// One restore for [`restore_many`]: the store, the epoch (`--at`), extra
/// flags, and where its report goes.
pub struct RestoreRun<'a> {
    pub store: &'a Path,
    pub at: String,
    pub extra: &'a [&'a str],
    pub report: PathBuf,
}

/// [`restore`] each of `runs` and run it to its end, `at_once` at a time
/// (one thread each); returns the reports in the order of `runs`.
pub fn restore_many(runs: &[RestoreRun], at_once: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(runs.len());
    for group in runs.chunks(at_once.max(1)) {
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|r| s.spawn(move || restore(r.store, &r.at, r.extra, &r.report)))
                .collect();
            out.extend(handles.into_iter().map(|h| h.join().unwrap()));
        });
    }
    out
}

/// [`restore`] each of `ids` and run it to its end, `at_once` at a time,
/// reports in `dir/restore-ID.json`; returns (id, report) in the order of
/// `ids`.
pub fn restore_each(snaps: &Path, ids: &[u64], dir: &Path, at_once: usize) -> Vec<(u64, serde_json::Value)> {
    let runs: Vec<RestoreRun> = ids
        .iter()
        .map(|id| RestoreRun {
            store: snaps,
            at: id.to_string(),
            extra: &[],
            report: dir.join(format!("restore-{id}.json")),
        })
        .collect();
    ids.iter().copied().zip(restore_many(&runs, at_once)).collect()
}

/// Every file under `snaps/epochs` with its contents, sorted: to show that
/// an operation changed nothing in a store.
pub fn store_files(snaps: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(snaps.join("epochs"))
        .unwrap()
        .flatten()
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

/// The guest op counter of the run serving the control API at `sock`, if
/// it answers yet.
pub fn guest_ops(sock: &std::path::Path) -> Option<u64> {
    let out = consnap()
        .args(["ctl", "--json", "--sock"])
        .arg(sock)
        .arg("status")
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["ops"].as_u64()
}
