//! A stock Debian kernel starts in consnap: through its PVH note (vmlinux)
//! and through the Linux boot protocol (bzImage). Kernel files come from
//! scripts/fetch-linux.sh (CONSNAP_LINUX_DIR, default target/linux); the
//! tests are ignored where the build found none (the `no_linux` cfg).
//!
//! On a host with hardware virtualization the kernel reaches the initramfs,
//! whose init prints a marker and resets the VM: that is required. Only on
//! kvm_pvm, whose KVM emulates guest kernel code, may it stop at an
//! instruction the emulator lacks; consnap must then fail with an error
//! naming the RIP and the bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

const BANNER: &str = "Linux version";
const INIT_MARKER: &str = "consnap-linux: init running";
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1";

/// Emulated guest kernel code is slow (a minute or more per boot on
/// kvm_pvm): these runs get three times the usual deadline.
fn deadline() -> Duration {
    vmm::testing::timeout() * 3
}

fn linux_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("CONSNAP_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/linux"));
    if dir.join("vmlinux").exists() && dir.join("bzImage").exists() {
        return Some(dir);
    }
    vmm::testing::missing(
        "a kernel (scripts/fetch-linux.sh)",
        format!("no vmlinux and bzImage in {}", dir.display()),
    )
}

/// What a run printed, and its exit code if it ended by itself.
struct Run {
    stdout: String,
    stderr: String,
    exited: Option<i32>,
}

/// When to stop looking at a run.
enum Until {
    /// Its end.
    Exit,
    /// This text on the serial console: then the run is killed. Ending
    /// before it fails the test.
    Output(&'static str),
}

fn run_kernel_on(vcpus: u8, kernel: &str, until: Until) -> Run {
    let dir = linux_dir().unwrap();
    let mut child = spawn(
        consnap()
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
            .args(["--cmdline", CMDLINE]),
    )
    .deadline(deadline());
    let (out, exited) = match until {
        Until::Exit => {
            let out = child.wait();
            let code = out.status.code();
            (out, code)
        }
        Until::Output(text) => {
            child.wait_for(&format!("'{text}' on the serial console"), |c| c.stdout_contains(text));
            (child.stop(libc::SIGKILL), None)
        }
    };
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        exited,
    }
}

/// With 3 vCPUs, so that the same boot shows Linux finding every vCPU in
/// the ACPI MADT (Debian's cloud kernel has no MP-table parser: only ACPI
/// can show it more than one CPU).
#[test]
#[cfg_attr(any(no_kvm, no_linux), ignore = "needs /dev/kvm and a kernel (fetch-linux.sh)")]
fn vmlinux_boots_through_pvh_and_finds_every_vcpu() {
    if !kvm_ready() || linux_dir().is_none() {
        return;
    }
    let r = run_kernel_on(3, "vmlinux", Until::Exit);
    assert!(
        r.stdout.contains(BANNER),
        "no banner.\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
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
    if r.stdout.contains(INIT_MARKER) {
        assert_eq!(
            r.exited,
            Some(0),
            "init ran but the reset did not end the run: {}",
            r.stderr
        );
    } else if vmm::cpuid::kvm_pvm() {
        // A host that emulates kernel code: a clear error, not a hang or a panic.
        assert_eq!(r.exited, Some(1), "stderr:\n{}", r.stderr);
        assert!(
            r.stderr.contains("could not emulate the instruction at RIP 0x"),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("(bytes: "), "{}", r.stderr);
        assert!(r.stderr.contains("hardware virtualization"), "{}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    } else {
        panic!(
            "init never ran (exit {:?}); this host's KVM is not kvm_pvm, so Linux must boot to its init.\nstdout:\n{}\nstderr:\n{}",
            r.exited,
            tail(r.stdout.as_bytes(), 40),
            r.stderr
        );
    }
}

#[test]
#[cfg_attr(any(no_kvm, no_linux), ignore = "needs /dev/kvm and a kernel (fetch-linux.sh)")]
fn bzimage_boots_through_the_linux_boot_protocol() {
    if !kvm_ready() || linux_dir().is_none() {
        return;
    }
    // The decompressor runs first; stop once the kernel proper has printed
    // its banner, the command line and the memory map we passed in boot_params.
    let r = run_kernel_on(1, "bzImage", Until::Output("0x000000001fffffff] usable"));
    assert!(
        r.stdout.contains(BANNER),
        "no banner.\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.contains(&format!("Command line: {CMDLINE}")), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        "{}",
        r.stdout
    );
}
