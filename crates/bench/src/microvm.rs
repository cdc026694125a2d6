//! QEMU's `microvm` machine running the exported workload guest with
//! virtio-mmio devices: the cross-check of consnap's devices and the
//! guest's drivers, and the QEMU side of `consnap bench --disk-io` and
//! `--net`.
//!
//! On one vCPU the machine runs without ACPI, and QEMU appends a
//! `virtio_mmio.device=` word for each transport to the command line (as
//! consnap does). With more, the guest needs ACPI to find the other vCPUs
//! (microvm has no MP table), and with ACPI QEMU describes its transports
//! in the DSDT instead: the command line then names all 24 (at 0xfeb00000 +
//! i × 512, on GSI 24 + i) and the guest probes each. The default firmware
//! of microvm is qboot.

use std::path::Path;
use std::process::Command;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// `microvm` booting `elf` with command line `append`, `mem` of RAM and
/// `smp` vCPUs, no default devices, the debug-exit port, modern
/// (version 2) virtio-mmio. Add devices and the serial port.
pub fn command(elf: &Path, append: &str, mem: &str, smp: u32) -> Command {
    let mut cmd = Command::new(QEMU);
    let mut append = append.to_string();
    if smp == 1 {
        cmd.args(["-M", "microvm,acpi=off"]);
    } else {
        cmd.args(["-M", "microvm"]);
        for i in 0..24u64 {
            append += &format!(" virtio_mmio.device=512@{:#x}:{}", 0xfeb0_0000 + i * 512, 24 + i);
        }
    }
    cmd.args(["-enable-kvm", "-m", mem, "-smp", &smp.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
        .args(["-global", "virtio-mmio.force-legacy=false", "-kernel"])
        .arg(elf)
        .args(["-append", &append]);
    cmd
}

/// A virtio-blk device on the raw `image` (`cache`: QEMU's cache mode, if
/// not its default).
pub fn disk(cmd: &mut Command, image: &Path, cache: Option<&str>) {
    let cache = cache.map(|c| format!(",cache={c}")).unwrap_or_default();
    cmd.arg("-drive")
        .arg(format!("id=d0,file={},format=raw,if=none{cache}", image.display()))
        .args(["-device", "virtio-blk-device,drive=d0"]);
}

/// A virtio-net device on the existing TAP `tap` with address `mac`.
pub fn net(cmd: &mut Command, tap: &str, mac: &str) {
    cmd.arg("-netdev")
        .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        .arg(format!("virtio-net-device,netdev=n0,mac={mac}"));
}
