//! `consnap demo`, the README's first command: it passes, shows every step,
//! and leaves nothing behind in the temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_demo_passes_and_cleans_up() {
    if !kvm_ready() {
        return;
    }
    let tmp = tempdir("demo");
    // From another directory, with the temporary files in a directory of our own.
    let out = run_ok(consnap().arg("demo").current_dir("/").env("TMPDIR", tmp.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    for step in [
        "[1/5]",
        "[2/5] SIGKILL",
        "[3/5]",
        "[4/5]",
        "[5/5]",
        "uninterrupted run",
        "p99",
    ] {
        assert!(text.contains(step), "no {step:?} in\n{text}");
    }
    assert!(text.contains("every checksum matches"), "{text}");
    // No command is suggested on the directory the demo removes.
    assert!(!text.contains("`consnap ls "), "{text}");
    assert!(text.contains("--keep DIR"), "{text}");
    assert_eq!(text.matches("  same").count(), 2, "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(" epochs, last pause "),
        "no live status line"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the demo left {left:?}");
}

#[test]
fn the_demo_keeps_its_files_only_in_an_empty_directory() {
    let tmp = tempdir("demo-keep");
    std::fs::write(tmp.join("mine"), b"x").unwrap();
    let out = output(consnap().arg("demo").arg("--keep").arg(tmp.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(tmp.join("mine")).unwrap(), b"x");
}

#[test]
fn a_first_run_that_fails_stops_the_demo_with_its_one_error() {
    let tmp = tempdir("demo-fail");
    // The protected run refuses its options (as it refuses a /dev/kvm it
    // cannot open): its error, and no other.
    let out = output(
        consnap()
            .arg("demo")
            .env("TMPDIR", tmp.path())
            .env("CONSNAP_COW_HOT", "bogus"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("CONSNAP_COW_HOT"), "{err}");
    assert!(!err.contains("before it could be killed"), "{err}");
}
