//! The exported workload guest boots unchanged in QEMU and prints the same
//! checksum as under consnap. Ignored where the build found no
//! qemu-system-x86_64 (the `no_qemu` cfg), required everywhere else.
//!
//! The disk workloads (`disk=on`, dblog) run on QEMU's `microvm` machine
//! with a virtio-blk device (virtio-mmio version 2) on a raw image, and
//! must give the host reference's checksum and leave the reference's disk
//! image.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// QEMU, for a test that needs it (and is ignored under the `no_qemu`
/// cfg): always true, or the test fails.
pub fn qemu_ready() -> bool {
    match try_spawn(Command::new("qemu-system-x86_64").arg("--version")).map(|c| c.wait().status) {
        Ok(s) if s.success() => true,
        Ok(s) => vmm::testing::missing("QEMU", format!("qemu-system-x86_64 --version: {s}")),
        Err(e) => vmm::testing::missing("QEMU", e),
    }
}

fn qemu_checksum(elf: &std::path::Path, append: &str, smp: u32) -> String {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-enable-kvm",
        "-m",
        "256M",
        "-nographic",
        "-no-reboot",
        "-smp",
        &smp.to_string(),
    ])
    .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1", "-kernel"])
    .arg(elf)
    .args(["-append", append]);
    if std::path::Path::new("/usr/share/qemu/qboot.rom").exists() {
        cmd.args(["-bios", "/usr/share/qemu/qboot.rom"]);
    }
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // isa-debug-exit: QEMU exits with 2 * code + 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "QEMU run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("consnap-guest: done"))
        .unwrap_or_else(|| panic!("{stdout}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("checksum="))
        .unwrap()
        .to_string()
}

#[test]
#[cfg_attr(any(no_kvm, no_qemu), ignore = "needs /dev/kvm and QEMU")]
fn exported_guest_gives_the_same_checksum_in_qemu() {
    if !kvm_ready() || !qemu_ready() {
        return;
    }
    let dir = tempdir("qemu");
    let elf = dir.join("guest.elf");
    run_ok(consnap().args(["guest", "export"]).arg(&elf));
    for (spec, smp) in [("memstress,wss=64M,ops=200000,seed=1", 1), ("build,wss=32M,ops=100", 2)] {
        let append = guest_words(spec);
        let report = dir.join("r.json");
        run_ok(
            consnap()
                .args(["run", "--workload", spec, "--vcpus", &smp.to_string(), "--report"])
                .arg(&report),
        );
        let ours = read_report(&report)["checksum"].as_str().unwrap().to_string();
        assert_eq!(qemu_checksum(&elf, &append, smp), ours, "{spec} on {smp} vCPUs");
        assert_eq!(ours, reference(spec, smp).1);
    }
}

/// Run the guest `elf` on QEMU's microvm with a virtio-blk device on the raw
/// `image`, `smp` vCPUs, command line `append` (see `bench::microvm`).
fn qemu_disk(elf: &Path, image: &Path, append: &str, smp: u32) -> Output {
    let mut cmd = bench::microvm::command(elf, append, "256M", smp);
    cmd.args(["-serial", "stdio"]);
    bench::microvm::disk(&mut cmd, image, None);
    output(&mut cmd)
}

/// `qemu_disk` on a fresh zero image of `bytes`, expecting the guest to
/// finish; returns its checksum and the image it left.
fn run_disk_guest(dir: &Path, elf: &Path, spec: &str, smp: u32, bytes: u64) -> (String, Vec<u8>) {
    let image = dir.join("disk.img");
    // As `truncate -s`: a sparse file of zeros.
    std::fs::File::create(&image).unwrap().set_len(bytes).unwrap();
    let out = qemu_disk(elf, &image, &guest_words(spec), smp);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let what = format!("{spec} on {smp} vCPU(s)");
    // isa-debug-exit: QEMU exits with 2 * code + 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: QEMU run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let irq = spec.contains("irq=on");
    assert!(
        stdout.contains(if irq { ", interrupts" } else { ", polling" }),
        "{what}: {stdout}"
    );
    let done = stdout.lines().find(|l| l.contains("consnap-guest: done")).unwrap();
    assert!(done.contains(" errors=0"), "{what}: {done}");
    let checksum = done
        .split_whitespace()
        .find_map(|w| w.strip_prefix("checksum="))
        .unwrap();
    if irq {
        // The driver waited for the device's interrupt, not only polled.
        let stats = stdout.lines().find(|l| l.contains("waits for an interrupt")).unwrap();
        let waits: u64 = stats.split_whitespace().rev().nth(4).unwrap().parse().unwrap();
        assert!(waits > 0, "{what}: {stats}");
    }
    let data = std::fs::read(&image).unwrap();
    std::fs::remove_file(&image).unwrap();
    (checksum.to_string(), data)
}

/// `spec` on consnap with a fresh zero image of `bytes` (the same guest
/// ELF, embedded): its checksum and the image it left.
fn run_disk_guest_on_consnap(dir: &Path, spec: &str, smp: u32, bytes: u64) -> (String, Vec<u8>) {
    let image = dir.join("consnap-disk.img");
    std::fs::File::create(&image).unwrap().set_len(bytes).unwrap();
    let report = dir.join("consnap.json");
    run_ok(
        consnap()
            .args([
                "run",
                "--workload",
                spec,
                "--vcpus",
                &smp.to_string(),
                "--pause-probe",
                "0",
            ])
            .arg("--disk")
            .arg(&image)
            .arg("--report")
            .arg(&report),
    );
    let checksum = read_report(&report)["checksum"].as_str().unwrap().to_string();
    let data = std::fs::read(&image).unwrap();
    std::fs::remove_file(&image).unwrap();
    (checksum, data)
}

/// Run `spec` (a disk workload) polling on 1 and 2 vCPUs and with
/// interrupts on 1: each must give the reference checksum and leave the
/// reference's disk image (its area; the rest of the image stays zero),
/// and the same ELF on consnap's virtio-blk must give the same checksum
/// and a byte-identical image (the cross-check of consnap's device against
/// QEMU's).
fn disk_workload_matches_reference(name: &str, spec: &str) {
    if !kvm_ready() || !qemu_ready() {
        return;
    }
    let dir = tempdir(name);
    let elf = dir.join("guest.elf");
    run_ok(consnap().args(["guest", "export"]).arg(&elf));
    let parsed = parse_spec(spec);
    let image_bytes = parsed.dsize + (1 << 20);
    for (smp, extra) in [(1, ""), (1, ",irq=on"), (2, "")] {
        let spec = format!("{spec}{extra}");
        let (checksum, image) = run_disk_guest(&dir, &elf, &spec, smp, image_bytes);
        let (want, disk) = workload::reference_with_disk(&parsed, smp);
        assert_eq!(checksum, format!("{:#018x}", want.checksum), "{spec} on {smp} vCPU(s)");
        let (area, rest) = image.split_at(parsed.dsize as usize);
        assert!(
            area == disk.to_bytes(),
            "{spec} on {smp} vCPU(s): the disk differs from the reference's"
        );
        assert!(rest.iter().all(|b| *b == 0), "{spec}: written beyond dsize");
        let (on_consnap, consnap_image) = run_disk_guest_on_consnap(&dir, &spec, smp, image_bytes);
        assert_eq!(
            on_consnap, checksum,
            "{spec} on {smp} vCPU(s): consnap and QEMU disagree"
        );
        assert!(
            consnap_image == image,
            "{spec} on {smp} vCPU(s): consnap leaves another disk image than QEMU"
        );
    }
}

#[test]
#[cfg_attr(any(no_kvm, no_qemu), ignore = "needs /dev/kvm and QEMU")]
fn ftp_on_disk_in_qemu_gives_the_reference_checksum_and_disk() {
    disk_workload_matches_reference("qemu-ftp-disk", "ftp,wss=4M,ops=300,chunk=16K,dsize=2M,disk=on");
}

#[test]
#[cfg_attr(any(no_kvm, no_qemu), ignore = "needs /dev/kvm and QEMU")]
fn build_on_disk_in_qemu_gives_the_reference_checksum_and_disk() {
    disk_workload_matches_reference("qemu-build-disk", "build,wss=8M,ops=30,filesize=8K,dsize=4M,disk=on");
}

#[test]
#[cfg_attr(any(no_kvm, no_qemu), ignore = "needs /dev/kvm and QEMU")]
fn dblog_in_qemu_gives_the_reference_checksum_and_disk() {
    disk_workload_matches_reference("qemu-dblog", "dblog,wss=1M,ops=2000,dsize=2M,flush=8");
}

#[test]
#[cfg_attr(any(no_kvm, no_qemu), ignore = "needs /dev/kvm and QEMU")]
fn the_same_disk_workload_leaves_the_same_disk_image_twice() {
    if !kvm_ready() || !qemu_ready() {
        return;
    }
    let dir = tempdir("qemu-disk-twice");
    let elf = dir.join("guest.elf");
    run_ok(consnap().args(["guest", "export"]).arg(&elf));
    let spec = "dblog,wss=1M,ops=3000,dsize=4M,seed=7";
    let first = run_disk_guest(&dir, &elf, spec, 1, 8 << 20);
    let second = run_disk_guest(&dir, &elf, spec, 1, 8 << 20);
    assert_eq!(first.0, second.0);
    assert!(first.1 == second.1, "two runs of {spec} left different disk images");
    assert!(first.1.iter().any(|b| *b != 0));
}

#[test]
#[cfg_attr(any(no_kvm, no_qemu), ignore = "needs /dev/kvm and QEMU")]
fn disk_problems_in_qemu_fail_clearly_with_exit_code_3() {
    if !kvm_ready() || !qemu_ready() {
        return;
    }
    let dir = tempdir("qemu-disk-errors");
    let elf = dir.join("guest.elf");
    run_ok(consnap().args(["guest", "export"]).arg(&elf));
    let image = dir.join("small.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    for (append, smp, says) in [
        (
            "workload=dblog dsize=2M",
            1,
            "the workload uses 2097152 bytes of disk (dsize) but the disk has 1048576",
        ),
        (
            "workload=dblog dsize=1M irq=on",
            2,
            "irq=on waits for the disk's interrupt on one vCPU only",
        ),
    ] {
        let out = qemu_disk(&elf, &image, append, smp);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(7), "{append}: {stdout}");
        assert!(stdout.contains(says), "{append}: {stdout}");
    }
    // No disk at all.
    let mut cmd = bench::microvm::command(&elf, "workload=ftp wss=4M disk=on", "256M", 1);
    cmd.args(["-serial", "stdio"]);
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{stdout}");
    assert!(stdout.contains("it needs a virtio-blk device"), "{stdout}");
}
