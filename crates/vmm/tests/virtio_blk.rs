//! virtio-blk against virtio-queue's mock driver: requests that work,
//! requests the guest gets wrong (each completes with an error status and
//! the device goes on), the pages the device writes in the dirty set, and
//! the transport's registers and saved state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::VirtioDevice;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::disk::DiskImage;
use vmm::memory::GuestRam;
use vmm::testing::TestDir;

const QUEUE: u64 = 0x1000;
const DATA: u64 = 0x10_0000;
const DISK: u64 = 1 << 20;

struct Rig {
    _dir: TestDir,
    ram: GuestRam,
    block: Block,
    next_desc: u16,
}

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

impl Rig {
    fn new(readonly: bool) -> Rig {
        let dir = TestDir::new(env!("CARGO_TARGET_TMPDIR"), "virtio-blk");
        let path = dir.path().join("d.img");
        std::fs::File::create(&path).unwrap().set_len(DISK).unwrap();
        let disk = Arc::new(DiskImage::open(&path, readonly).unwrap());
        Rig {
            _dir: dir,
            ram: GuestRam::with_huge_pages(16 << 20, false).unwrap(),
            block: Block::new(disk, "test-disk"),
            next_desc: 0,
        }
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.ram.write_from(at, &h).unwrap();
    }

    /// Make `descs` (addr, len, flags; NEXT links to the following one
    /// unless `next` says otherwise) available and let the device serve the
    /// queue; returns the used ring's last entry (id, len).
    fn run(&mut self, descs: &[(u64, u32, u16, Option<u16>)]) -> (u32, u32) {
        let mem = self.ram.memory();
        let mq = MockSplitQueue::create(mem, GuestAddress(QUEUE), 64);
        let base = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags, next))| {
                let next = next.unwrap_or(base + i as u16 + 1);
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        mq.add_desc_chains(&raw, base).unwrap();
        self.next_desc += descs.len() as u16;
        // The mock made fresh rings (index 0): a fresh queue serves them.
        let mut q: Queue = mq.create_queue().unwrap();
        assert!(self.block.process(0, &mut q, mem, &|| false).unwrap());
        let used_now: u16 = mem.read_obj(mq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_now, 1, "one chain, one used entry");
        let e = mq.used_addr().unchecked_add(4);
        (mem.read_obj(e).unwrap(), mem.read_obj(e.unchecked_add(4)).unwrap())
    }

    fn status(&self, at: u64) -> u8 {
        self.ram.memory().read_obj(GuestAddress(at)).unwrap()
    }
}

trait Unchecked {
    fn unchecked_add(self, n: u64) -> GuestAddress;
}

impl Unchecked for GuestAddress {
    fn unchecked_add(self, n: u64) -> GuestAddress {
        GuestAddress(self.0 + n)
    }
}

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

#[test]
fn written_sectors_read_back_and_the_read_pages_are_dirty() {
    let mut r = Rig::new(false);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    r.ram.write_from(DATA + 0x1000, &data).unwrap();
    r.header(DATA, 1, 8);
    let (_, len) = r.run(&[
        (DATA, 16, R | N, None),
        (DATA + 0x1000, 4096, R | N, None),
        (DATA + 0x2000, 4096, R | N, None),
        (DATA + 0x3000, 1, W, None),
    ]);
    assert_eq!((len, r.status(DATA + 0x3000)), (1, OK));
    // Flush, then read the same sectors into other pages, in three buffers.
    r.header(DATA + 0x4000, 4, 0);
    assert_eq!(
        r.run(&[(DATA + 0x4000, 16, R | N, None), (DATA + 0x4100, 1, W, None)])
            .1,
        1
    );
    assert_eq!(r.status(DATA + 0x4100), OK);
    let ranges: Vec<_> = r.ram.ranges().to_vec();
    drop(r.ram.take_vmm_dirty(&ranges[0]));
    r.header(DATA + 0x5000, 0, 8);
    let (_, len) = r.run(&[
        (DATA + 0x5000, 16, R | N, None),
        (DATA + 0x8000, 1000, W | N, None),
        (DATA + 0x9000, 7192, W | N, None),
        (DATA + 0xb000, 1, W, None),
    ]);
    assert_eq!((len, r.status(DATA + 0xb000)), (8193, OK));
    let mut back = vec![0u8; 8192];
    r.ram.read_to(DATA + 0x8000, &mut back[..1000]).unwrap();
    r.ram.read_to(DATA + 0x9000, &mut back[1000..]).unwrap();
    assert_eq!(back, data);
    let dirty = vmm::dirty::PageBits::from_words(r.ram.take_vmm_dirty(&ranges[0]), ranges[0].pages());
    for gpa in [DATA + 0x8000, DATA + 0x9000, DATA + 0xa000, DATA + 0xb000] {
        assert!(
            dirty.get(gpa / 4096),
            "page {gpa:#x} written by the device is not dirty"
        );
    }
    let c = r.block.counters();
    assert_eq!(c.written_bytes.load(std::sync::atomic::Ordering::Relaxed), 8192);
    assert_eq!(c.read_bytes.load(std::sync::atomic::Ordering::Relaxed), 8192);
    assert_eq!(c.flushes.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn get_id_answers_the_disk_id() {
    let mut r = Rig::new(false);
    r.header(DATA, 8, 0);
    let (_, len) = r.run(&[
        (DATA, 16, R | N, None),
        (DATA + 0x100, 20, W | N, None),
        (DATA + 0x200, 1, W, None),
    ]);
    assert_eq!((len, r.status(DATA + 0x200)), (21, OK));
    let mut id = [0u8; 20];
    r.ram.read_to(DATA + 0x100, &mut id).unwrap();
    assert_eq!(&id[..9], b"test-disk");
}

#[test]
fn requests_the_guest_gets_wrong_fail_with_a_status_and_the_device_goes_on() {
    let mut r = Rig::new(false);
    let st = DATA + 0xf000;
    // Sectors past the end of the disk.
    r.header(DATA, 0, DISK / 512 - 1);
    r.run(&[
        (DATA, 16, R | N, None),
        (DATA + 0x1000, 1024, W | N, None),
        (st, 1, W, None),
    ]);
    assert_eq!(r.status(st), IOERR);
    // A sector number that overflows when multiplied.
    r.header(DATA, 1, u64::MAX / 2);
    r.run(&[
        (DATA, 16, R | N, None),
        (DATA + 0x1000, 512, R | N, None),
        (st, 1, W, None),
    ]);
    assert_eq!(r.status(st), IOERR);
    // Data that is not a whole number of sectors.
    r.header(DATA, 1, 0);
    r.run(&[
        (DATA, 16, R | N, None),
        (DATA + 0x1000, 100, R | N, None),
        (st, 1, W, None),
    ]);
    assert_eq!(r.status(st), IOERR);
    // A header too short.
    r.run(&[(DATA, 8, R | N, None), (st, 1, W, None)]);
    assert_eq!(r.status(st), IOERR);
    // A data buffer outside guest RAM.
    r.header(DATA, 0, 0);
    r.run(&[
        (DATA, 16, R | N, None),
        (0x4000_0000, 512, W | N, None),
        (st, 1, W, None),
    ]);
    assert_eq!(r.status(st), IOERR);
    // A device-readable buffer after a writable one.
    r.header(DATA, 1, 0);
    r.run(&[
        (DATA, 16, R | N, None),
        (DATA + 0x2000, 512, W | N, None),
        (DATA + 0x1000, 512, R | N, None),
        (st, 1, W, None),
    ]);
    assert_eq!(r.status(st), IOERR);
    // An unknown request type.
    r.header(DATA, 99, 0);
    r.run(&[(DATA, 16, R | N, None), (st, 1, W, None)]);
    assert_eq!(r.status(st), UNSUPP);
    // A chain that loops on itself ends after the queue's size and has no
    // writable byte: no status can be written; the chain is still used.
    let me = r.next_desc;
    let (id, len) = r.run(&[(DATA, 16, R | N, Some(me))]);
    assert_eq!((id, len), (u32::from(me), 0));
    // A chain whose next index is past the table.
    let (_, len) = r.run(&[(DATA, 16, R | N, Some(1000))]);
    assert_eq!(len, 0);
    let c = r.block.counters();
    assert_eq!(c.errors.load(std::sync::atomic::Ordering::Relaxed), 7);
    assert_eq!(c.dropped.load(std::sync::atomic::Ordering::Relaxed), 2);
    // And a good request still works.
    r.header(DATA, 4, 0);
    r.run(&[(DATA, 16, R | N, None), (st, 1, W, None)]);
    assert_eq!(r.status(st), OK);
}

#[test]
fn a_readonly_disk_refuses_writes() {
    let mut r = Rig::new(true);
    assert_ne!(r.block.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    r.header(DATA, 1, 0);
    r.run(&[
        (DATA, 16, R | N, None),
        (DATA + 0x1000, 512, R | N, None),
        (DATA + 0x2000, 1, W, None),
    ]);
    assert_eq!(r.status(DATA + 0x2000), IOERR);
}

#[test]
fn capacity_is_in_the_config_space() {
    let r = Rig::new(false);
    let mut c = [0u8; 8];
    r.block.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), DISK / 512);
    let mut tail = [0xaau8; 4];
    r.block.read_config(6, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
}
