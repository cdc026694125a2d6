//! The MMIO transport driven as a driver drives it, its saved state, and
//! the worker's pause protocol.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::block::Block;
use super::disk::DiskImage;
use super::mmio::MmioTransport;
use super::{INT_USED, worker};
use crate::devices::{BusDevice, Quiesce};
use crate::memory::GuestRam;
use crate::testing::TestDir;

const QUEUE: u64 = 0x1000;
const DATA: u64 = 0x10_0000;

struct Rig {
    _dir: TestDir,
    ram: Arc<GuestRam>,
    t: Arc<MmioTransport>,
    irq: EventFd,
}

impl Rig {
    fn new() -> Rig {
        let dir = TestDir::new(std::env::temp_dir(), "virtio-mmio");
        let path = dir.path().join("d.img");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let disk = Arc::new(DiskImage::open(&path, false).unwrap());
        let ram = Arc::new(GuestRam::with_huge_pages(16 << 20, false).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            0,
            Arc::new(Block::new(disk, "d")),
            ram.clone(),
            irq.try_clone().unwrap(),
        )
        .unwrap();
        Rig {
            _dir: dir,
            ram,
            t: Arc::new(t),
            irq,
        }
    }

    fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// What a driver does up to DRIVER_OK, accepting `features`.
    fn set_up(&self, features: u64) -> u32 {
        self.w(0x70, 0);
        self.w(0x70, 1);
        self.w(0x70, 3);
        self.w(0x24, 0);
        self.w(0x20, features as u32);
        self.w(0x24, 1);
        self.w(0x20, (features >> 32) as u32);
        self.w(0x70, 11);
        if self.r(0x70) & 8 == 0 {
            return self.r(0x70);
        }
        let mq = MockSplitQueue::create(self.ram.memory(), GuestAddress(QUEUE), 16);
        self.w(0x30, 0);
        assert_eq!(self.r(0x34), 256);
        self.w(0x38, 16);
        for (lo, a) in [
            (0x80, mq.desc_table_addr()),
            (0x90, mq.avail_addr()),
            (0xa0, mq.used_addr()),
        ] {
            self.w(lo, a.0 as u32);
            self.w(lo + 4, (a.0 >> 32) as u32);
        }
        self.w(0x44, 1);
        self.w(0x70, 15);
        self.r(0x70)
    }

    /// Make the `n`th FLUSH request available (as a driver does, without
    /// the mock, which would reset the rings); returns the status byte's
    /// address.
    fn flush_request(&self, n: u16) -> u64 {
        let mq = MockSplitQueue::create(self.ram.memory(), GuestAddress(0x20_0000), 16);
        let (desc, avail) = (QUEUE, QUEUE + 16 * 16);
        assert_eq!(
            mq.avail_addr().0 - mq.desc_table_addr().0,
            avail - desc,
            "the mock's layout"
        );
        let h = DATA + u64::from(n) * 0x100;
        let mut hdr = [0u8; 16];
        hdr[0] = 4;
        self.ram.write_from(h, &hdr).unwrap();
        self.ram.write_from(h + 16, &[0xff]).unwrap();
        let mem = self.ram.memory();
        for (i, (addr, len, flags, next)) in [(h, 16u32, 1u16, 2 * n + 1), (h + 16, 1, 2, 0)].into_iter().enumerate() {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            mem.write_obj(d, GuestAddress(desc + 16 * (2 * u64::from(n) + i as u64)))
                .unwrap();
        }
        mem.write_obj(2 * n, GuestAddress(avail + 4 + 2 * u64::from(n % 16)))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(avail + 2)).unwrap();
        h + 16
    }

    fn status_byte(&self, at: u64) -> u8 {
        self.ram.memory().read_obj(GuestAddress(at)).unwrap()
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn the_identity_registers_are_virtio_mmio_version_2() {
    let r = Rig::new();
    assert_eq!(r.r(0), 0x7472_6976);
    assert_eq!(r.r(4), 2);
    assert_eq!(r.r(8), 2);
    // Device features, both halves: VERSION_1 and FLUSH.
    r.w(0x14, 1);
    assert_eq!(r.r(0x10), 1);
    r.w(0x14, 0);
    assert_eq!(r.r(0x10), 1 << 9);
    // Only 32-bit aligned accesses.
    let mut two = [0u8; 2];
    r.t.read(0, &mut two);
    assert_eq!(two, [0xff, 0xff]);
    // Configuration space: the capacity in sectors.
    let mut cap = [0u8; 8];
    r.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
}

#[test]
fn features_are_ok_only_as_a_subset_with_version_1() {
    let r = Rig::new();
    assert_eq!(r.set_up(1 << 9) & 8, 0, "without VERSION_1");
    assert_eq!(
        r.set_up((1 << 32) | (1 << 9) | (1 << 12)) & 8,
        0,
        "a feature not offered"
    );
    assert_eq!(r.set_up((1 << 32) | (1 << 9)), 15);
    // Reset clears everything.
    r.w(0x70, 0);
    assert_eq!(r.r(0x70), 0);
    r.w(0x30, 0);
    assert_eq!(r.r(0x44), 0, "queue not ready after a reset");
}

#[test]
fn a_notified_request_is_served_with_an_interrupt_and_the_state_round_trips() {
    let r = Rig::new();
    assert_eq!(r.set_up(1 << 32), 15);
    let thread = worker::spawn(r.t.clone()).unwrap();
    let st = r.flush_request(0);
    r.w(0x50, 0);
    wait_until("the request to complete", || r.status_byte(st) == 0);
    wait_until("the interrupt", || r.irq.read().is_ok());
    assert_eq!(r.r(0x60) & INT_USED, INT_USED);
    r.w(0x64, INT_USED);
    assert_eq!(r.r(0x60), 0);
    // Paused, a notified request waits; resumed, it is served.
    r.t.quiesce().unwrap();
    let st2 = r.flush_request(1);
    r.w(0x50, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.status_byte(st2), 0xff, "served while paused");
    let saved = r.t.save();
    assert!(saved.activated);
    assert_eq!(saved.queues[0].next_avail, 1);
    Quiesce::resume(&*r.t);
    wait_until("the request after resume", || r.status_byte(st2) == 0);
    worker::stop(&r.t, thread);
    // The saved state restores to a transport that saves the same.
    let again = MmioTransport::restore(
        0,
        r.t.device().clone(),
        r.ram.clone(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        &saved,
    )
    .unwrap();
    assert_eq!(again.save(), saved);
    // A request made available before the snapshot is served by the
    // restored device's first pass, with no new notification.
    let restored = Arc::new(again);
    let thread = worker::spawn(restored.clone()).unwrap();
    wait_until("the restored device to serve the pending request", || {
        restored.save().queues[0].next_used == 2
    });
    worker::stop(&restored, thread);
}

#[test]
fn saved_state_that_does_not_fit_is_refused() {
    let r = Rig::new();
    let mut s = r.t.save();
    s.device_type = 1;
    assert!(MmioTransport::restore(0, r.t.device().clone(), r.ram.clone(), EventFd::new(0).unwrap(), &s).is_err());
    let mut s = r.t.save();
    s.queues[0].max_size = 128;
    assert!(MmioTransport::restore(0, r.t.device().clone(), r.ram.clone(), EventFd::new(0).unwrap(), &s).is_err());
    let mut s = r.t.save();
    s.queues[0].size = 3;
    assert!(MmioTransport::restore(0, r.t.device().clone(), r.ram.clone(), EventFd::new(0).unwrap(), &s).is_err());
    let mut s = r.t.save();
    s.queues.clear();
    assert!(MmioTransport::restore(0, r.t.device().clone(), r.ram.clone(), EventFd::new(0).unwrap(), &s).is_err());
}
