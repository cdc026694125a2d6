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
use vmm::machine::{Attach, Machine};
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
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
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
    for mode in [Mode::StopCopy, Mode::Cow] {
        let mut m = Machine::boot(32 << 20, &boot, Attach::console(Box::new(std::io::sink()))).unwrap();
        let dir = tempdir(&format!("vmm-dirty-{mode:?}"));
        let cfg = SnapshotConfig {
            dir: dir.clone(),
            mode,
            interval: Duration::from_secs(3600),
            stop_after: Some(1),
            cow: Default::default(),
            direct_io: true,
            max_lag: None,
            max_store: None,
            max_chain: 0,
        };
        let mut engine = SnapshotEngine::new(cfg, None).unwrap();
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
        // The rest of that page's block was never written: zero in epoch 1,
        // so not in epoch 2 (under cow the whole block was copied aside).
        let h = e2.header();
        assert_eq!(
            (h.pages_data, h.pages_zero),
            (1, 0),
            "{mode:?}: epoch 2 holds unchanged pages"
        );

        let restored = snapshot::restore(
            &store,
            2,
            |_| Attach::console(Box::new(std::io::sink())),
            &mut |_, _| {},
        )
        .unwrap();
        let mut buf = [0u8; 18];
        restored
            .machine
            .ram()
            .memory()
            .read_slice(&mut buf, GuestAddress(gpa + 100))
            .unwrap();
        assert_eq!(&buf, b"written by the VMM");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Pages a device writes into guest RAM from its own thread (here the
/// virtio-blk device reading a sector into a page nothing else writes) are
/// in the next epoch whatever the mode and tracker, and the epoch restores
/// with the sector in place and the disk beside it.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn device_written_pages_reach_the_next_epoch() {
    if !kvm_ready() {
        return;
    }
    use vmm::tiny_guests::{BUF, GO, virtio_read, virtio_read_request, virtio_used};
    let boot = BootConfig {
        kernel: KernelSource::Bytes {
            name: "virtio reader".into(),
            image: vmm::testing::pvh_elf(&virtio_read(true)),
        },
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
    };
    let cases = [
        (Mode::StopCopy, snapshot::Tracker::Uffd),
        (Mode::StopCopyFull, snapshot::Tracker::Uffd),
        (Mode::Cow, snapshot::Tracker::Uffd),
        (Mode::Cow, snapshot::Tracker::DirtyLog),
    ];
    for (mode, tracker) in cases {
        let dir = tempdir(&format!("device-dirty-{mode:?}-{tracker:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        let mut sector = vec![0u8; 1 << 20];
        sector[..512].fill(0xa5);
        std::fs::write(&img, &sector).unwrap();
        let attach = Attach {
            disks: vec![vmm::machine::DiskAttach::new(img.clone())],
            ..Attach::console(Box::new(std::io::sink()))
        };
        let mut m = Machine::boot(32 << 20, &boot, attach).unwrap();
        virtio_read_request(m.ram()).unwrap();
        let snaps = dir.join("snaps");
        let cfg = SnapshotConfig {
            dir: snaps.clone(),
            mode,
            interval: Duration::from_secs(3600),
            stop_after: Some(1),
            cow: snapshot::CowOptions {
                tracker,
                ..Default::default()
            },
            direct_io: true,
            max_lag: None,
            max_store: None,
            max_chain: 0,
        };
        let mut engine = SnapshotEngine::new(cfg, None).unwrap();
        engine.prepare(&mut m).unwrap();
        m.start().unwrap();
        engine.run(&mut m);
        assert!(engine.wait(&mut m).is_none(), "{:?}", engine.errors);
        // Now the guest notifies the device, which writes BUF on its thread.
        m.ram().write_from(u64::from(GO), &1u32.to_le_bytes()).unwrap();
        let t = std::time::Instant::now();
        while virtio_used(m.ram()) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the device never completed the request"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        engine.run(&mut m);
        assert!(engine.wait(&mut m).is_none(), "{:?}", engine.errors);
        m.stop();
        drop(m);
        assert_eq!(engine.records.len(), 2, "{:?}", engine.errors);

        let store = Store::open(&snaps, Access::Read).unwrap();
        let e2 = store.open_epoch(2).unwrap();
        let buf = u64::from(BUF) / 4096;
        if mode != Mode::StopCopyFull {
            let ext = e2
                .index()
                .iter()
                .find(|x| x.gfn <= buf && buf < x.gfn + u64::from(x.count));
            assert!(
                ext.is_some_and(|x| x.kind == ExtentKind::Data),
                "{mode:?}/{tracker:?}: the page the device wrote is not in the incremental epoch"
            );
        }
        assert_eq!(e2.header().regions.len(), 1, "the disk is a region of the epoch");
        let new_img = dir.join("restored.img");
        let restored = snapshot::restore(
            &store,
            2,
            |_| Attach {
                disks: vec![vmm::machine::DiskAttach::new(new_img.clone())],
                ..Attach::console(Box::new(std::io::sink()))
            },
            &mut |_, _| {},
        )
        .unwrap();
        let mut got = [0u8; 512];
        restored.machine.ram().read_to(u64::from(BUF), &mut got).unwrap();
        assert!(
            got.iter().all(|&b| b == 0xa5),
            "{mode:?}/{tracker:?}: the sector read is not restored"
        );
        drop(restored);
        assert_eq!(
            std::fs::read(&new_img).unwrap(),
            sector,
            "the restored disk is the disk at the pause"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// KVM itself writes guest memory (here the kvmclock page, on every
/// registration): those writes reach the next epoch, and under `cow` they
/// fault from kernel mode into the fault handler instead of failing KVM_RUN.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_written_pages_reach_the_next_epoch() {
    if !kvm_ready() {
        return;
    }
    const PVCLOCK: u64 = 0x30_0000;
    // loop: mov ecx, MSR_KVM_SYSTEM_TIME_NEW; mov eax, PVCLOCK|1; xor edx, edx;
    // wrmsr; mov esi, 2000; spin: dec esi; jnz spin; jmp loop
    let mut code = vec![0xb9, 0x01, 0x4d, 0x56, 0x4b, 0xb8];
    code.extend_from_slice(&(PVCLOCK as u32 | 1).to_le_bytes());
    code.extend_from_slice(&[0x31, 0xd2, 0x0f, 0x30, 0xbe, 0xd0, 0x07, 0x00, 0x00, 0x4e, 0x75, 0xfd]);
    let back = -(code.len() as i8 + 2);
    code.extend_from_slice(&[0xeb, back as u8]);
    for mode in [Mode::StopCopy, Mode::Cow] {
        let boot = BootConfig {
            kernel: KernelSource::Bytes {
                name: "kvmclock".into(),
                image: vmm::testing::pvh_elf(&code),
            },
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
        };
        let mut m = Machine::boot(32 << 20, &boot, Attach::console(Box::new(std::io::sink()))).unwrap();
        let dir = tempdir(&format!("kvm-dirty-{mode:?}"));
        let cfg = SnapshotConfig {
            dir: dir.clone(),
            mode,
            interval: Duration::from_secs(3600),
            stop_after: Some(1),
            // The saver starts late: KVM's writes meet protected pages.
            cow: snapshot::CowOptions {
                capture_ahead: false,
                test: snapshot::CowTestHooks {
                    saver_delay: Duration::from_millis(50),
                    ..Default::default()
                },
                ..Default::default()
            },
            direct_io: true,
            max_lag: None,
            max_store: None,
            max_chain: 0,
        };
        let mut engine = SnapshotEngine::new(cfg, None).unwrap();
        engine.prepare(&mut m).unwrap();
        m.start().unwrap();
        let version = |m: &Machine| m.ram().read_u32(PVCLOCK).unwrap_or(0);
        let wait_version = |m: &Machine, above: u32| {
            let t = std::time::Instant::now();
            while version(m) <= above {
                assert!(t.elapsed() < Duration::from_secs(30), "kvmclock never updated");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_version(&m, 0);
        for _ in 0..4 {
            engine.run(&mut m);
            assert!(engine.wait(&mut m).is_none(), "{mode:?}: {:?}", engine.errors);
            let v = version(&m);
            wait_version(&m, v + 2);
        }
        engine.run(&mut m);
        assert!(engine.finish(&mut m).is_none(), "{mode:?}: {:?}", engine.errors);
        assert!(m.next_event(Duration::ZERO).is_none(), "{mode:?}: the vCPU failed");
        m.stop();
        if mode == Mode::Cow {
            let faults: u64 = engine.records.iter().map(|r| r.stats.faults).sum();
            assert!(faults > 0, "KVM never wrote a protected page: the test proves nothing");
        }
        let store = Store::open(&dir, Access::Read).unwrap();
        for id in 2..=5 {
            let e = store.open_epoch(id).unwrap();
            assert!(!e.header().is_full());
            let has = e.index().iter().any(|x| {
                x.kind == ExtentKind::Data && x.gfn <= PVCLOCK / 4096 && PVCLOCK / 4096 < x.gfn + u64::from(x.count)
            });
            assert!(has, "{mode:?}: epoch {id} lacks the page KVM wrote");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A block the guest writes while its fault is being served stays tracked:
/// the fault handler lifts protection under the same lock that re-arms
/// blocks in a pause, so a pause cannot re-arm the block between the two
/// steps and leave it writable yet marked protected (its later writes would
/// then never reach an epoch). Capturing ahead of the saver is not tied to
/// any vCPU: it can still be lifting a block after the saver committed the
/// epoch and the next pause began. The hook widens the window to 3 ms; the workload guest
/// writes random pages of a one-block (2 MiB) working set without end, so
/// every epoch must hold pages of that block.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_block_faulted_across_a_pause_stays_tracked() {
    if !kvm_ready() {
        return;
    }
    let boot = BootConfig {
        kernel: KernelSource::Bytes {
            name: guest::host::KERNEL_NAME.into(),
            image: guest::GUEST_ELF,
        },
        initrd: None,
        cmdline: "workload=memstress wss=2M ops=100000000000 pattern=random rate=200000".into(),
        vcpus: 1,
    };
    let mut m = Machine::boot(64 << 20, &boot, guest::host::attach(Box::new(std::io::sink()))).unwrap();
    let dir = tempdir("lift-race");
    let cfg = SnapshotConfig {
        dir: dir.clone(),
        mode: Mode::Cow,
        interval: Duration::from_secs(3600),
        stop_after: Some(1),
        cow: snapshot::CowOptions {
            pause_copy_budget: Duration::ZERO,
            test: snapshot::CowTestHooks {
                lift_delay: Duration::from_millis(30),
                ..Default::default()
            },
            ..Default::default()
        },
        direct_io: false,
        max_lag: None,
        max_store: None,
        max_chain: 0,
    };
    let mut engine = SnapshotEngine::new(cfg, None).unwrap();
    engine.prepare(&mut m).unwrap();
    m.start().unwrap();
    // The arena is the 2 MiB block after the image (see docs/GUEST.md); wait
    // until the guest has done ops in it.
    let t = std::time::Instant::now();
    while m.progress().unwrap_or(0) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest never started its workload"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let epochs = 60;
    for i in 0..epochs {
        engine.run(&mut m);
        assert!(engine.wait(&mut m).is_none(), "{:?}", engine.errors);
        // Some epochs start while the handler is inside the window.
        std::thread::sleep(Duration::from_micros(500 + (i % 4) * 1000));
    }
    assert!(engine.finish(&mut m).is_none(), "{:?}", engine.errors);
    assert!(m.next_event(Duration::ZERO).is_none(), "the vCPU failed");
    m.stop();
    let store = Store::open(&dir, Access::Read).unwrap();
    // Every epoch must restore exactly the memory memstress had at the op
    // count the guest published (guest::host::check): a write lost by the
    // tracker leaves a stale line in some later epoch.
    let (mut checked, mut last_ops) = (0, 0);
    for id in store.ids().unwrap() {
        let r = snapshot::restore_ram(&store, id, &mut |_, _| {}).unwrap();
        let spec = guest::host::workload_of(&r.state.config).unwrap();
        match guest::host::check::check(&r.ram, &spec) {
            Ok(c) if c.shares == 1 => {
                // The header's count was read from live RAM in the pause:
                // a lost write to the status page shows here.
                assert_eq!(
                    Some(c.ops),
                    r.progress,
                    "epoch {id}: restored op count vs the one at capture"
                );
                checked += u32::from(c.ops > last_ops);
                last_ops = c.ops;
            }
            Ok(_) => {}
            Err(e) => panic!("epoch {id} of {dir:?}: {e}"),
        }
    }
    assert!(
        checked >= 20,
        "only {checked} epochs saw guest progress: the test proves little"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The adaptive engine run on a real guest, every epoch checked against
/// what memstress wrote: `flip` forces a tracker switch every so many
/// epochs (both directions, many times); without it the cost model
/// decides. Returns the epochs' records.
fn adaptive_run(name: &str, cmdline: &str, flip: u32, epochs: u64) -> Vec<snapshot::EpochRecord> {
    let boot = BootConfig {
        kernel: KernelSource::Bytes {
            name: guest::host::KERNEL_NAME.into(),
            image: guest::GUEST_ELF,
        },
        initrd: None,
        cmdline: cmdline.into(),
        vcpus: 1,
    };
    let mut m = Machine::boot(256 << 20, &boot, guest::host::attach(Box::new(std::io::sink()))).unwrap();
    let dir = tempdir(name);
    let cfg = SnapshotConfig {
        dir: dir.clone(),
        mode: Mode::Cow,
        interval: Duration::from_secs(3600),
        stop_after: Some(1),
        cow: snapshot::CowOptions {
            test: snapshot::CowTestHooks {
                flip_tracker_every: flip,
                ..Default::default()
            },
            ..Default::default()
        },
        direct_io: false,
        max_lag: None,
        max_store: None,
        max_chain: 0,
    };
    assert!(cfg.cow.adapt.is_some(), "the engine's default is adaptive");
    let mut engine = SnapshotEngine::new(cfg, None).unwrap();
    engine.prepare(&mut m).unwrap();
    m.start().unwrap();
    let t = std::time::Instant::now();
    while m.progress().unwrap_or(0) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest never started its workload"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 0..epochs {
        engine.run(&mut m);
        assert!(engine.wait(&mut m).is_none(), "{:?}", engine.errors);
        std::thread::sleep(Duration::from_millis(2 + (i % 5) * 3));
    }
    assert!(engine.finish(&mut m).is_none(), "{:?}", engine.errors);
    assert!(m.next_event(Duration::ZERO).is_none(), "the vCPU failed");
    m.stop();
    let store = Store::open(&dir, Access::Read).unwrap();
    let mut last_ops = 0;
    let mut moved = 0;
    for id in store.ids().unwrap() {
        let r = snapshot::restore_ram(&store, id, &mut |_, _| {}).unwrap();
        let spec = guest::host::workload_of(&r.state.config).unwrap();
        match guest::host::check::check(&r.ram, &spec) {
            Ok(c) => {
                assert_eq!(Some(c.ops), r.progress, "epoch {id}: op count");
                moved += u32::from(c.ops > last_ops);
                last_ops = c.ops;
            }
            Err(e) => panic!("epoch {id} of {dir:?}: {e}"),
        }
    }
    assert!(moved as u64 >= epochs / 2, "only {moved} epochs saw guest progress");
    let _ = std::fs::remove_dir_all(&dir);
    std::mem::take(&mut engine.records)
}

fn switches(records: &[snapshot::EpochRecord]) -> (usize, usize, usize) {
    let choices: Vec<_> = records.iter().filter_map(|r| r.stats.choice).collect();
    let to = |t| choices.iter().filter(|c| c.switched && c.tracker == t).count();
    let in_pause = choices.iter().filter(|c| c.copied_in_pause).count();
    (to(snapshot::Tracker::DirtyLog), to(snapshot::Tracker::Uffd), in_pause)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn forced_tracker_switches_keep_every_epoch_exact() {
    // Dense enough that dirty-log epochs protect pages and take faults,
    // random so that both trackers see writes everywhere.
    let recs = adaptive_run(
        "adapt-flip",
        "workload=memstress wss=16M ops=100000000000 pattern=random rate=400000",
        3,
        45,
    );
    let (to_dl, to_uffd, _) = switches(&recs);
    assert!(
        to_dl >= 5 && to_uffd >= 5,
        "switches: {to_dl} to the dirty log, {to_uffd} to uffd"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_sparse_writer_moves_to_the_dirty_log_and_stays_exact() {
    // A few random pages an epoch over 64 MiB: a uffd fault per page.
    let recs = adaptive_run(
        "adapt-sparse",
        "workload=memstress wss=64M ops=100000000000 pattern=random rate=3000",
        0,
        40,
    );
    let (to_dl, to_uffd, in_pause) = switches(&recs);
    assert_eq!(
        (to_dl, to_uffd),
        (1, 0),
        "{:?}",
        recs.last().and_then(|r| r.stats.choice)
    );
    assert!(in_pause >= 10, "dirty-log epochs copied in the pause: {in_pause}");
}
