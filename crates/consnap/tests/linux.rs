//! A stock Debian kernel starts in consnap: through its PVH note (vmlinux)
//! and through the Linux boot protocol (bzImage). Kernel files come from
//! scripts/fetch-linux.sh (CONSNAP_LINUX_DIR, default target/linux).
//!
//! On a host with hardware virtualization the kernel reaches the initramfs,
//! whose init prints a marker and resets the VM. On hosts whose KVM emulates
//! guest kernel code (kvm_pvm) it stops at an instruction the emulator lacks;
//! consnap must then fail with an error naming the RIP and the bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const BANNER: &str = "Linux version";
const INIT_MARKER: &str = "consnap-linux: init running";

fn linux_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("CONSNAP_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/linux"));
    if dir.join("vmlinux").exists() && dir.join("bzImage").exists() {
        return Some(dir);
    }
    if std::env::var("CONSNAP_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("no kernel in {}: run scripts/fetch-linux.sh", dir.display());
    }
    eprintln!("skipping: no kernel in {} (run scripts/fetch-linux.sh)", dir.display());
    None
}

/// Output of a run, collected until `done` says so or the deadline passes.
struct Run {
    stdout: String,
    stderr: String,
    exited: Option<i32>,
}

fn run_kernel(kernel: &str, cmdline: &str, done: impl Fn(&str) -> bool, deadline: Duration) -> Run {
    run_kernel_on(1, kernel, cmdline, done, deadline)
}

fn run_kernel_on(vcpus: u8, kernel: &str, cmdline: &str, done: impl Fn(&str) -> bool, deadline: Duration) -> Run {
    let dir = linux_dir().unwrap();
    let mut child: Child = consnap()
        .args([
            "run",
            "--mem",
            "512M",
            "--pause-probe",
            "0",
            "--vcpus",
            &vcpus.to_string(),
            "--kernel",
        ])
        .arg(dir.join(kernel))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio.gz"))
        .args(["--cmdline", cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut stdout = String::new();
    let mut finished = false;
    while start.elapsed() < deadline && !done(&stdout) {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            stdout += &chunk;
        }
        if child.try_wait().unwrap().is_some() {
            finished = true;
            break;
        }
    }
    if !finished {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
        stdout += &chunk;
    }
    let exited = if finished { status.code() } else { None };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    Run { stdout, stderr, exited }
}

#[test]
fn vmlinux_boots_through_pvh() {
    if !kvm_ready() || linux_dir().is_none() {
        return;
    }
    let r = run_kernel(
        "vmlinux",
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1",
        |_| false,
        Duration::from_secs(600),
    );
    assert!(
        r.stdout.contains(BANNER),
        "no banner.\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    if r.stdout.contains(INIT_MARKER) {
        assert_eq!(
            r.exited,
            Some(0),
            "init ran but the reset did not end the run: {}",
            r.stderr
        );
    } else {
        // A host that emulates kernel code: a clear error, not a hang or a panic.
        assert_eq!(r.exited, Some(1), "stderr:\n{}", r.stderr);
        assert!(
            r.stderr.contains("could not emulate the instruction at RIP 0x"),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("(bytes: "), "{}", r.stderr);
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            assert!(r.stderr.contains("hardware virtualization"), "{}", r.stderr);
        }
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
}

#[test]
fn bzimage_boots_through_the_linux_boot_protocol() {
    if !kvm_ready() || linux_dir().is_none() {
        return;
    }
    // The decompressor runs first; stop once the kernel proper has printed
    // its banner, the command line and the memory map we passed in boot_params.
    let r = run_kernel(
        "bzImage",
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1",
        |out| out.contains("0x000000001fffffff] usable"),
        Duration::from_secs(600),
    );
    assert!(
        r.stdout.contains(BANNER),
        "no banner.\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.contains("Command line: console=ttyS0"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        "{}",
        r.stdout
    );
}

#[test]
fn linux_finds_every_vcpu_in_the_acpi_madt() {
    if !kvm_ready() || linux_dir().is_none() {
        return;
    }
    // Debian's cloud kernel has no MP-table parser: only ACPI can show it more than one CPU.
    let r = run_kernel_on(
        3,
        "vmlinux",
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1",
        |out| out.contains("hotplug CPUs"),
        Duration::from_secs(300),
    );
    for line in [
        "ACPI: FACP",
        "ACPI: DSDT",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "IOAPIC[0]: apic_id 3",
        "smpboot: Allowing 3 CPUs, 0 hotplug CPUs",
    ] {
        assert!(r.stdout.contains(line), "missing '{line}':\n{}", r.stdout);
    }
    assert!(!r.stdout.contains("ACPI BIOS Error"), "{}", r.stdout);
}
