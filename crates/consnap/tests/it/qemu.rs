//! The exported workload guest boots unchanged in QEMU and prints the same
//! checksum as under consnap. Runs when qemu-system-x86_64 is installed;
//! under CONSNAP_REQUIRE_QEMU=1 a missing QEMU is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::process::Command;

use common::*;

fn qemu_ready() -> bool {
    let ok = try_spawn(Command::new("qemu-system-x86_64").arg("--version")).is_ok_and(|c| c.wait().status.success());
    if !ok && std::env::var("CONSNAP_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("CONSNAP_REQUIRE_QEMU=1 but qemu-system-x86_64 does not run");
    }
    ok
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
fn exported_guest_gives_the_same_checksum_in_qemu() {
    if !kvm_ready() || !qemu_ready() {
        return;
    }
    let dir = tempdir("qemu");
    let elf = dir.join("guest.elf");
    run_ok(consnap().args(["guest", "export"]).arg(&elf));
    for (spec, smp) in [("memstress,wss=64M,ops=200000,seed=1", 1), ("build,wss=32M,ops=100", 2)] {
        let append = spec
            .split(',')
            .enumerate()
            .map(|(i, w)| if i == 0 { format!("workload={w}") } else { w.to_string() })
            .collect::<Vec<_>>()
            .join(" ");
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
