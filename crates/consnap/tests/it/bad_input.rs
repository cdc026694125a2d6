//! Bad input gets one clear line naming the problem and a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;

fn fails_with(args: &[&str], needle: &str) {
    let out = output(consnap().args(args));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        err.contains(needle),
        "{args:?}: stderr does not mention '{needle}':\n{err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    assert!(
        !err.contains("RUST_BACKTRACE"),
        "{args:?} printed a backtrace hint:\n{err}"
    );
}

#[test]
fn unknown_workload_and_key() {
    fails_with(&["run", "--workload", "nosuch"], "unknown workload 'nosuch'");
    fails_with(&["run", "--workload", "memstress,colour=red"], "unknown key 'colour'");
    fails_with(&["run", "--workload", "ftp,chunk=12Q"], "bad value '12Q' for 'chunk'");
    fails_with(
        &["run", "--workload", "memstress,pattern"],
        "'pattern' is not key=value",
    );
}

#[test]
fn bad_flags() {
    fails_with(&["run", "--mem", "lots"], "not a size");
    fails_with(&["run", "--pause-probe", "fast"], "not a duration");
    fails_with(&["run", "--kernel", "/x", "--workload", "build"], "cannot be used with");
    fails_with(
        &["run", "--workload", "memstress,wss=512M", "--mem", "256M"],
        "does not fit in --mem",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kernel_files() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("bad-kernels");
    fails_with(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel /nonexistent/vmlinux",
    );
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    fails_with(
        &["run", "--kernel", junk.to_str().unwrap()],
        "neither an ELF kernel with a PVH entry note nor a Linux bzImage",
    );
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    fails_with(&["run", "--kernel", empty.to_str().unwrap()], "neither an ELF");
    // An ELF without a PVH note: the test binary itself.
    let me = std::env::current_exe().unwrap();
    fails_with(&["run", "--kernel", me.to_str().unwrap()], "without a PVH entry note");
    // A good kernel (it powers off at once) with a bad initrd: the initrd
    // is what fails.
    let kernel = dir.join("exit.elf");
    let exit_0 = [0x66, 0xba, 0x01, 0x05, 0xb0, 0, 0xee, 0xf4]; // out 0 to port 0x501; hlt
    std::fs::write(&kernel, vmm::testing::pvh_elf(&exit_0)).unwrap();
    fails_with(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "cannot read initrd /nonexistent/initrd",
    );
    let big = dir.join("big-initrd");
    std::fs::File::create(&big).unwrap().set_len(64 << 20).unwrap();
    fails_with(
        &[
            "run",
            "--mem",
            "32M",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            big.to_str().unwrap(),
        ],
        "does not fit in guest RAM above the kernel; raise --mem",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memory_and_vcpus() {
    if !kvm_ready() {
        return;
    }
    fails_with(
        &["run", "--mem", "2000G"],
        "it must be a multiple of 4 KiB between 16 MiB and 1 TiB",
    );
    fails_with(
        &["run", "--mem", "8M", "--kernel", "/nonexistent/vmlinux"],
        "between 16 MiB and 1 TiB",
    );
    fails_with(
        &["run", "--mem", "900G", "--workload", "memstress,wss=1M"],
        "more than this host can give",
    );
    fails_with(&["run", "--vcpus", "9"], "--vcpus 9 is not supported");
    fails_with(&["run", "--vcpus", "0"], "--vcpus 0 is not supported");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_guest_itself_rejects_what_does_not_fit() {
    if !kvm_ready() {
        return;
    }
    // Boot the exported guest as a plain kernel so that only the guest checks its command line.
    let dir = tempdir("guest-checks");
    let elf = dir.join("guest.elf");
    run_ok(consnap().args(["guest", "export"]).arg(&elf));
    let run = |cmdline: &str| {
        let report = dir.join("r.json");
        let out = output(
            consnap()
                .args(["run", "--mem", "256M", "--kernel"])
                .arg(&elf)
                .args(["--cmdline", cmdline, "--report"])
                .arg(&report),
        );
        (out, read_report(&report))
    };
    let (out, r) = run("workload=memstress wss=1G");
    assert_eq!(out.status.code(), Some(3), "RESOURCES exit code expected");
    assert_eq!(r["guest_exit_code"], 3);
    assert!(String::from_utf8_lossy(&out.stdout).contains("wss needs 1024 MiB"));
    let (out, r) = run("workload=memstress wss=lots");
    assert_eq!(out.status.code(), Some(2), "BAD_CMDLINE exit code expected");
    assert_eq!(r["guest_exit_code"], 2);
    assert!(String::from_utf8_lossy(&out.stdout).contains("bad value 'lots' for 'wss'"));
}

/// Run consnap in a changed environment: as an unprivileged user, or with
/// an empty /dev. Needs root (to drop privileges or mount): the tests are
/// ignored under the `no_root` cfg, and fail without it. Always `Some`.
fn privileged(wrapper: &[&str]) -> Option<std::process::Output> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vmm::testing::missing("root", "not running as root");
    }
    if let Err(e) = try_spawn(std::process::Command::new(wrapper[0]).arg("--help")) {
        vmm::testing::missing(wrapper[0], e);
    }
    let bin = env!("CARGO_BIN_EXE_consnap");
    let mut cmd = std::process::Command::new(wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(format!("{bin} run --workload memstress,ops=10"));
    Some(output(&mut cmd))
}

#[test]
#[cfg_attr(no_root, ignore = "needs root")]
fn missing_or_forbidden_dev_kvm() {
    let Some(out) = privileged(&[
        "unshare",
        "--mount",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
        "sh",
        "-c",
    ]) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/kvm does not exist"), "{err}");
    let Some(out) = privileged(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
    ]) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied opening /dev/kvm"), "{err}");
}
