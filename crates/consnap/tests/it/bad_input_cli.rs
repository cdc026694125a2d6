//! Bad command lines: report paths that are not plain files, durations
//! and sizes out of range, options that do not apply; one line, no panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::bad_input_support;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use bad_input_support::*;

/// A workload run of a fraction of a second.
const QUICK: [&str; 5] = ["run", "--workload", "memstress,ops=1000", "--pause-probe", "0"];

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
}

fn is_report(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| v["schema"] == "consnap.report/1")
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_report_into_a_fifo_leaves_the_fifo() {
    if !kvm() {
        return;
    }
    let d = TempDir::new("report-fifo");
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    // Hold a write end ourselves, so that the reader's open returns at once
    // and its read ends (EOF) when we let go, whatever consnap did with the
    // path: a reader waiting on a FIFO that was replaced would wait forever.
    let keeper = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
    let reader = {
        let mut r = std::fs::File::open(&fifo).unwrap();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut v).unwrap();
            v
        })
    };
    let out = run(consnap().args(QUICK).arg("--report").arg(&fifo), 60);
    drop(keeper);
    let got = reader.join().unwrap();
    expect_code(&out, 0, "run --report FIFO");
    assert!(
        std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(),
        "the FIFO was replaced by a regular file"
    );
    assert!(is_report(&got), "the FIFO's reader got {:?}", text(&got));
    assert_eq!(names(&d.0), ["fifo"], "temporary files left");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_report_through_a_symlink_leaves_the_symlink() {
    if !kvm() {
        return;
    }
    let d = TempDir::new("report-symlink");
    let link = d.join("link.json");
    let target = d.join("target.json");
    std::os::unix::fs::symlink("target.json", &link).unwrap();
    // A dangling link: the file it names is created; then an existing one is overwritten.
    for round in 0..2 {
        let out = run(consnap().args(QUICK).arg("--report").arg(&link), 60);
        expect_code(&out, 0, "run --report SYMLINK");
        assert!(
            std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(),
            "round {round}: the symlink was replaced"
        );
        assert!(is_report(&std::fs::read(&target).unwrap()), "round {round}");
        std::fs::write(&target, "x".repeat(100_000)).unwrap();
    }
    assert_eq!(names(&d.0), ["link.json", "target.json"], "temporary files left");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_regular_report_file_is_replaced_atomically() {
    if !kvm() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = TempDir::new("report-file");
    let report = d.join("r.json");
    std::fs::write(&report, b"old").unwrap();
    std::fs::set_permissions(&report, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(consnap().args(QUICK).arg("--report").arg(&report), 60);
    expect_code(&out, 0, "run --report FILE");
    assert!(is_report(&std::fs::read(&report).unwrap()));
    assert_eq!(mode(&report), "0640", "the replaced report keeps its mode");
    assert_eq!(names(&d.0), ["r.json"], "temporary files left");
}

#[test]
fn the_report_path_is_checked_before_the_vm_starts() {
    let d = TempDir::new("report-early");
    let file = d.join("file");
    std::fs::write(&file, b"x").unwrap();
    for (path, needle) in [
        (d.join("missing/r.json"), "cannot write here: No such file or directory"),
        (file.join("r.json"), "cannot write here: Not a directory"),
        (d.0.clone(), "is a directory"),
        (
            std::path::PathBuf::from(format!("{}/", d.join("new").display())),
            "is a directory",
        ),
    ] {
        let out = run(consnap().args(QUICK).arg("--report").arg(&path), 60);
        expect_refusal(&out, &format!("--report {}: {needle}", path.display()), "bad --report");
        assert!(out.stdout.is_empty(), "the VM ran before the report path was checked");
        assert_eq!(text(&out.stderr).lines().count(), 1, "{}", text(&out.stderr));
    }
    assert_eq!(names(&d.0), ["file"], "temporary files left");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_failed_report_write_leaves_no_temporary_file() {
    if !kvm() {
        return;
    }
    let d = TempDir::new("report-efbig");
    let report = d.join("r.json");
    // A file-size limit of 0: the probe (an empty file) passes, the report does not.
    let out = run(
        &mut shell(&format!(
            "ulimit -f 0; exec \"$CONSNAP\" run --workload memstress,ops=1000 --pause-probe 0 --report '{}'",
            report.display()
        )),
        60,
    );
    expect_refusal(
        &out,
        &format!("cannot write report {}: File too large", report.display()),
        "report beyond the file-size limit",
    );
    assert!(names(&d.0).is_empty(), "left behind: {:?}", names(&d.0));
}

#[test]
fn durations_beyond_a_year_are_refused() {
    let d = TempDir::new("durations");
    let snaps = d.join("snaps");
    for flag in ["--interval", "--pause-probe", "--sample-interval"] {
        for value in ["18446744073709551615s", "9000h", "31536000.5s"] {
            let mut c = consnap();
            c.args(["run", flag, value, "--snapshot-dir"]).arg(&snaps);
            let out = run(&mut c, 60);
            expect_refusal(
                &out,
                &format!("'{value}' is longer than 1 year (365 days), the longest duration consnap accepts"),
                &format!("{flag} {value}"),
            );
            assert!(text(&out.stderr).contains(flag), "{}", text(&out.stderr));
        }
    }
    assert!(!snaps.exists());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn fractional_durations_hours_and_tebibytes() {
    // Parsing only: each of these fails later, on purpose, for another reason.
    let out = run(
        consnap().args([
            "run",
            "--pause-probe",
            "0.5ms",
            "--sample-interval",
            "1.5s",
            "--interval",
            "1h",
            "--snapshot-dir",
            "/dev/null/x",
            "--vcpus",
            "9",
        ]),
        60,
    );
    let err = text(&out.stderr);
    assert!(!err.contains("not a duration"), "{err}");
    let out = run(consnap().args(["run", "--mem", "1T", "--vcpus", "9"]), 60);
    assert!(!text(&out.stderr).contains("not a size"), "{}", text(&out.stderr));
    if !kvm() {
        return;
    }
    let out = run(
        consnap().args([
            "run",
            "--workload",
            "memstress,ops=1000",
            "--pause-probe",
            "0.5ms",
            "--sample-interval",
            "2.5m",
        ]),
        60,
    );
    expect_code(&out, 0, "fractional durations");
}

#[test]
fn sizes_in_messages_use_a_unit_that_shows_them() {
    let out = run(consnap().args(["run", "--mem", "1"]), 60);
    expect_refusal(&out, "does not fit in --mem 1 bytes", "--mem 1");
    let out = run(consnap().args(["run", "--mem", "1536K"]), 60);
    expect_refusal(&out, "does not fit in --mem 1536 KiB", "--mem 1536K");
    let out = run(
        consnap().args(["run", "--workload", "memstress,wss=4100K", "--mem", "8M"]),
        60,
    );
    expect_refusal(&out, "--workload wss=4100 KiB does not fit in --mem 8 MiB", "wss");
}

#[test]
fn object_store_options_on_a_local_store_are_refused() {
    let d = TempDir::new("local-remote-flags");
    let snaps = d.join("snaps");
    let dir = snaps.to_str().unwrap();
    for (args, flag) in [
        (&["ls", dir, "--encrypt-key", "/nonexistent"][..], "--encrypt-key"),
        (&["verify", dir, "--encrypt-key", "/nonexistent"][..], "--encrypt-key"),
        (&["verify", dir, "--cache", "/tmp/c"][..], "--cache"),
        (&["restore", dir, "--cache", "/tmp/c"][..], "--cache"),
        (&["restore", dir, "--encrypt-key", "/nonexistent"][..], "--encrypt-key"),
    ] {
        let out = run(consnap().args(args), 60);
        let needle = format!("{flag}: {dir} is a local snapshot directory; {flag} is for a store in an object store");
        expect_refusal(&out, &needle, &format!("{args:?}"));
        assert_eq!(text(&out.stderr).lines().count(), 1, "{}", text(&out.stderr));
    }
    assert!(!snaps.exists());
}

#[test]
fn kernel_options_without_a_kernel_are_refused() {
    for (args, needle) in [
        (
            &["run", "--workload", "memstress,ops=1000", "--initrd", "/x/initrd"][..],
            "--initrd /x/initrd needs --kernel",
        ),
        (
            &["run", "--workload", "memstress,ops=1000", "--cmdline", "quiet"][..],
            "--cmdline needs --kernel",
        ),
        (
            &["run", "--initrd", "/x/initrd"][..],
            "--initrd /x/initrd needs --kernel",
        ),
        (&["run", "--cmdline", "quiet"][..], "--cmdline needs --kernel"),
    ] {
        let out = run(consnap().args(args), 60);
        expect_refusal(&out, needle, &format!("{args:?}"));
        assert_eq!(text(&out.stderr).lines().count(), 1, "{}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{args:?}: the VM ran: {}", text(&out.stdout));
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn logs_to_a_pipe_have_no_colour_codes() {
    if !kvm() {
        return;
    }
    let out = run(consnap().args(QUICK).env("CONSNAP_LOG", "debug"), 60);
    expect_code(&out, 0, "run with CONSNAP_LOG=debug");
    let err = text(&out.stderr);
    assert!(err.contains("DEBUG"), "no log line to check:\n{err}");
    assert!(
        !err.contains('\x1b'),
        "ANSI escapes in a log written to a pipe:\n{err:?}"
    );
}

#[test]
fn bad_input_never_panics() {
    let d = TempDir::new("no-panic");
    let store = d.join("store");
    small_store(&store);
    let garbage = d.join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    std::fs::write(garbage.join("STORE"), vec![0xff; 64]).unwrap();
    let file = d.join("file");
    std::fs::write(&file, b"x").unwrap();
    let (s, g, f) = (
        store.to_str().unwrap(),
        garbage.to_str().unwrap(),
        file.to_str().unwrap(),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["ls", "/nonexistent/dir"],
            "/nonexistent/dir is not a consnap snapshot directory",
        ),
        (vec!["ls", f], "Not a directory"),
        (vec!["ls", g], "does not start with \"CSNPSTOR\""),
        (vec!["restore", g], "does not start with \"CSNPSTOR\""),
        (vec!["restore", s, "--at=-1"], "--at '-1'"),
        (vec!["restore", s, "--at", "0"], "epoch 0 is not in"),
        (
            vec!["restore", s, "--at", "99999999999999999999999"],
            "is not an epoch id",
        ),
        (
            vec!["run", "--interval", "0", "--snapshot-dir", s],
            "--interval must be longer than 0",
        ),
        (
            vec![
                "run",
                "--interval",
                "20ms",
                "--cow-pause-copy",
                "20ms",
                "--snapshot-dir",
                s,
            ],
            "--cow-pause-copy 20ms must be shorter than --interval 20ms",
        ),
        (
            vec!["restore", "s3://bucket/vm", "--lazy", "--cache", s],
            "--cache: a lazy restore from an object store reads its epochs in place",
        ),
        (vec!["run", "--pause-probe", "1e9s"], "not a duration"),
        (vec!["run", "--mem", "16777216T"], "not a size"),
        (
            vec!["run", "--cow-buffer", "99999999999999999999", "--snapshot-dir", s],
            "not a size",
        ),
        (vec!["run", "--vcpus", "300"], "--vcpus"),
        // A malformed retention policy, refused with its reason before any
        // VM starts (run) or any file is touched (compact).
        (
            vec!["run", "--retain", "10x:all", "--snapshot-dir", s],
            "'10x' is not a duration",
        ),
        (
            vec!["run", "--retain", "10s:2s,1m:3s", "--snapshot-dir", s],
            "must be a multiple of the previous tier's",
        ),
        (
            vec!["compact", s, "--retain", "1m:1s,10s:all"],
            "must reach further back than the tier before it",
        ),
        (vec!["compact", s, "--retain", ""], "the policy is empty"),
        (vec!["compact", s, "--max-chain", "many"], "--max-chain"),
        (
            vec!["run", "--workload", "memstress,wss=17179869183G"],
            "does not fit in --mem",
        ),
        (
            vec!["guest", "export", "/nonexistent/dir/guest.elf"],
            "cannot write /nonexistent/dir/guest.elf",
        ),
    ];
    for (args, needle) in cases {
        let out = run(consnap().args(&args), 60);
        expect_refusal(&out, needle, &format!("{args:?}"));
    }
    // A store whose only epoch's state is not a machine: refused with the file named.
    let out = run(consnap().args(["restore", s, "--at", "1", "--pause-probe", "0"]), 60);
    let err = text(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("00000000000000000001.epoch"), "{err}");
}
