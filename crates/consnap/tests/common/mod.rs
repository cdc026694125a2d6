//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use vmm::testing::kvm_ready;

pub fn consnap() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_consnap"));
    c.stdin(Stdio::null());
    c
}

/// A fresh private directory for one test.
pub fn tempdir(name: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn read_report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The checksum the host computes for a workload spec (`NAME,k=v,...`).
pub fn reference(spec: &str, vcpus: u32) -> (u64, String) {
    let words: Vec<String> = spec
        .split(',')
        .enumerate()
        .map(|(i, w)| if i == 0 { format!("workload={w}") } else { w.to_string() })
        .collect();
    let s = workload::Spec::parse(&words.join(" ")).unwrap();
    let out = workload::reference(&s, vcpus);
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
pub fn ls(snaps: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(consnap().args(["ls", "--json"]).arg(snaps));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Start `consnap` with `args`, wait until `snaps` holds at least `epochs`
/// committed epochs, then kill it with SIGKILL. Panics if it ends first.
pub fn run_and_kill(args: &[&str], snaps: &Path, epochs: usize) {
    let mut child = consnap()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if epoch_count(snaps) >= epochs {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!(
                "{args:?} ended ({status}) with only {} epochs before it could be killed:\n{err}",
                epoch_count(snaps)
            );
        }
        assert!(start.elapsed().as_secs() < 120, "timed out waiting for {epochs} epochs");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// `consnap restore DIR --at AT` to the end; returns its report.
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
