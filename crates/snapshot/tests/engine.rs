//! The engine against a tiny spinning guest: pages the VMM itself writes
//! into guest memory (as device emulation does) reach the next incremental
//! epoch, and a restored machine holds them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use snapshot::{Mode, SnapshotConfig, SnapshotEngine};
use store::{Access, ExtentKind, Store};
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::{BootConfig, KernelSource};
use vmm::machine::Machine;
use vmm::run::Task;
use vmm::testing::kvm_ready;

fn tempdir(name: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn vmm_written_pages_reach_the_next_epoch() {
    if !kvm_ready() {
        return;
    }
    // loop: inc %eax; jmp loop
    let boot = BootConfig {
        kernel: KernelSource::Bytes {
            name: "spin".into(),
            image: vmm::testing::pvh_elf(&[0x40, 0xeb, 0xfd]),
        },
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
    };
    let mut m = Machine::boot(32 << 20, &boot, None, Box::new(std::io::sink())).unwrap();
    let dir = tempdir("vmm-dirty");
    let cfg = SnapshotConfig {
        dir: dir.clone(),
        mode: Mode::StopCopy,
        interval: Duration::from_secs(3600),
        stop_on_error: true,
        cow: Default::default(),
        inject: Default::default(),
        direct_io: true,
    };
    let mut engine = SnapshotEngine::new(cfg, None);
    engine.prepare(&mut m).unwrap();
    m.start().unwrap();
    engine.run(&mut m);
    assert!(engine.wait(&mut m).is_none());
    // A device writes into a page the guest never touches.
    let gpa = 0x30_0000u64;
    m.ram()
        .memory()
        .write_slice(b"written by the VMM", GuestAddress(gpa + 100))
        .unwrap();
    engine.run(&mut m);
    assert!(engine.wait(&mut m).is_none());
    m.stop();
    assert_eq!(engine.records.len(), 2, "{:?}", engine.errors);

    let store = Store::open(&dir, Access::Read).unwrap();
    let e2 = store.open_epoch(2).unwrap();
    assert_eq!(e2.header().parent, 1);
    let ext = e2
        .index()
        .iter()
        .find(|x| x.gfn <= gpa / 4096 && gpa / 4096 < x.gfn + u64::from(x.count))
        .expect("the VMM-written page is missing from the incremental epoch");
    assert_eq!(ext.kind, ExtentKind::Data);

    let restored = snapshot::restore(&store, 2, Box::new(std::io::sink()), &mut |_, _| {}).unwrap();
    let mut buf = [0u8; 18];
    restored
        .machine
        .ram()
        .memory()
        .read_slice(&mut buf, GuestAddress(gpa + 100))
        .unwrap();
    assert_eq!(&buf, b"written by the VMM");
}
