//! virtio-blk over virtio-mmio (virtio 1.x, "Version 2"), driven from ring 3.
//!
//! The registers of a transport and the IOAPIC and local APIC are MMIO below
//! 4 GiB, which boot.s identity-maps with user-accessible pages, so ring 3
//! reaches them with plain loads and stores (each one a VM exit). The driver
//! keeps one request in flight on queue 0: a 16-byte header, at most one
//! data descriptor (pointing straight at the caller's buffer: guest
//! physical = virtual) and a status byte. A ticket lock serializes vCPUs;
//! waits spin, then sleep in the VMM in short steps (`Backoff`).
//!
//! Completion is found by polling the used ring's index or, with `irq=on`,
//! by waiting in ring 0 (request 2 of boot.s: `sti; hlt; cli`) for the
//! device's interrupt, which the IOAPIC routes to [`IRQ_VECTOR`] on CPU 0.

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering::*, fence};

use workload::abi::exit;
use workload::disk::{Disk, DiskError, SECTOR, SECTOR_WORDS, check_request};
use workload::mmio::{self, MmioDevice};

use crate::{Backoff, Ticket, WAIT_TICKS, fail, kernel_request, ticks};

// virtio-mmio registers (32-bit).
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
pub(crate) const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
pub(crate) const CONFIG: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"
const DEVICE_BLK: u32 = 2;

// Device status bits.
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

// Feature bits.
const F_BLK_RO: u64 = 1 << 5;
const F_BLK_FLUSH: u64 = 1 << 9;
pub(crate) const F_VERSION_1: u64 = 1 << 32;

// Request types and status values.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const ST_OK: u8 = 0;

// Descriptor flags.
const D_NEXT: u16 = 1;
pub(crate) const D_WRITE: u16 = 2;

/// Most entries a queue gets (min(QueueNumMax, this)).
pub(crate) const QUEUE_MAX: usize = 128;

/// Largest data descriptor: requests are split at 128 KiB.
const MAX_REQUEST_WORDS: usize = (128 << 10) / 8;

/// The vector the device's IRQ is routed to; boot.s's handler for it sends
/// the local APIC an EOI.
const IRQ_VECTOR: u32 = 0x20;
/// The local APIC's spurious-interrupt vector (boot.s: a bare IRETQ).
const SPURIOUS_VECTOR: u32 = 0x2f;

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_LINT0: u64 = 0x350;
const IOAPIC: u64 = 0xfec0_0000;

/// The end of boot.s's identity map.
const MAPPED_END: u64 = 4 << 30;

#[repr(C, align(16))]
pub(crate) struct Desc {
    pub(crate) addr: AtomicU64,
    pub(crate) len: AtomicU32,
    pub(crate) flags: AtomicU16,
    pub(crate) next: AtomicU16,
}

#[repr(C, align(4))]
pub(crate) struct UsedElem {
    pub(crate) id: AtomicU32,
    pub(crate) len: AtomicU32,
}

/// The split virtqueue: descriptor table, available ring, and used ring
/// on a page of its own. Shared with the device; only the lock holder
/// touches it.
#[repr(C, align(4096))]
pub(crate) struct Rings {
    pub(crate) desc: [Desc; QUEUE_MAX],
    avail_flags: AtomicU16,
    pub(crate) avail_idx: AtomicU16,
    pub(crate) avail_ring: [AtomicU16; QUEUE_MAX],
    used_event: AtomicU16,
    pub(crate) used: UsedRing,
}

#[repr(C, align(4096))]
pub(crate) struct UsedRing {
    pub(crate) flags: AtomicU16,
    pub(crate) idx: AtomicU16,
    pub(crate) ring: [UsedElem; QUEUE_MAX],
    avail_event: AtomicU16,
}

/// A request's header and status byte, in guest memory for the device.
#[repr(C, align(16))]
struct Header {
    kind: AtomicU32,
    reserved: AtomicU32,
    sector: AtomicU64,
    status: AtomicU8,
}

static RINGS: Rings = Rings::new();

impl Rings {
    /// Zeroed rings, for a static.
    pub(crate) const fn new() -> Rings {
        Rings {
            desc: [const {
                Desc {
                    addr: AtomicU64::new(0),
                    len: AtomicU32::new(0),
                    flags: AtomicU16::new(0),
                    next: AtomicU16::new(0),
                }
            }; QUEUE_MAX],
            avail_flags: AtomicU16::new(0),
            avail_idx: AtomicU16::new(0),
            avail_ring: [const { AtomicU16::new(0) }; QUEUE_MAX],
            used_event: AtomicU16::new(0),
            used: UsedRing {
                flags: AtomicU16::new(0),
                idx: AtomicU16::new(0),
                ring: [const {
                    UsedElem {
                        id: AtomicU32::new(0),
                        len: AtomicU32::new(0),
                    }
                }; QUEUE_MAX],
                avail_event: AtomicU16::new(0),
            },
        }
    }
}

static HEADER: Header = Header {
    kind: AtomicU32::new(0),
    reserved: AtomicU32::new(0),
    sector: AtomicU64::new(0),
    status: AtomicU8::new(0),
};

/// What the driver knows of its device; written once by [`init`] on CPU 0
/// before the other CPUs start.
struct Device {
    base: u64,
    queue_size: u16,
    irq: bool,
    /// Next free available-ring index and next used-ring index to consume.
    avail: u16,
    used: u16,
}

/// The device: one request at a time, from any vCPU, in the order asked.
static DEVICE: Ticket<Device> = Ticket::new(Device {
    base: 0,
    queue_size: 0,
    irq: false,
    avail: 0,
    used: 0,
});

static CAPACITY: AtomicU64 = AtomicU64::new(0);
static READ_ONLY: AtomicBool = AtomicBool::new(false);
static CAN_FLUSH: AtomicBool = AtomicBool::new(false);
/// Failed requests reported on the console so far (the first few only).
static REPORTED: AtomicU32 = AtomicU32::new(0);
/// Requests completed, and waits in ring 0 for an interrupt (`irq=on`).
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static WAITS: AtomicU64 = AtomicU64::new(0);

/// Requests the driver made and the times it waited for an interrupt.
pub fn stats() -> (u64, u64) {
    (REQUESTS.load(Relaxed), WAITS.load(Relaxed))
}

fn with_device<R>(f: impl FnOnce(&mut Device) -> R) -> R {
    DEVICE.with(f)
}

pub(crate) fn read32(addr: u64) -> u32 {
    // SAFETY: `addr` is a device register (virtio-mmio window, IOAPIC or
    // local APIC) that the caller checked lies in the identity map below
    // 4 GiB; boot.s maps it user-accessible. MMIO has no Rust-visible memory.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub(crate) fn write32(addr: u64, val: u32) {
    // SAFETY: as in `read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, val) }
}

/// Tell the compiler that the memory at `ptr` may have been read or written
/// by someone else (the device, by DMA): it keeps stores before this point
/// and reloads after it.
pub(crate) fn dma_barrier<T>(ptr: *const T) {
    // SAFETY: an empty asm statement; it only acts as a compiler barrier for
    // the memory reachable from `ptr`.
    unsafe { asm!("/* {0} */", in(reg) ptr, options(nostack, preserves_flags)) }
}

impl Device {
    fn reg(&self, off: u64) -> u32 {
        read32(self.base + off)
    }

    fn set(&self, off: u64, val: u32) {
        write32(self.base + off, val)
    }

    fn set_desc(&self, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let d = &RINGS.desc[i];
        d.addr.store(addr, Relaxed);
        d.len.store(len, Relaxed);
        d.flags.store(flags, Relaxed);
        d.next.store(next, Relaxed);
    }

    /// Submit one request for CPU `cpu` and wait for it. `data`: address,
    /// bytes, and whether the device writes it (IN, GET_ID).
    fn request(&mut self, cpu: usize, kind: u32, sector: u64, data: Option<(u64, u32, bool)>) -> Result<(), DiskError> {
        HEADER.kind.store(kind, Relaxed);
        HEADER.reserved.store(0, Relaxed);
        HEADER.sector.store(sector, Relaxed);
        HEADER.status.store(0xff, Relaxed);
        let header = core::ptr::addr_of!(HEADER) as u64;
        let status = core::ptr::addr_of!(HEADER.status) as u64;
        self.set_desc(0, header, 16, D_NEXT, 1);
        match data {
            Some((addr, len, device_writes)) => {
                self.set_desc(1, addr, len, D_NEXT | if device_writes { D_WRITE } else { 0 }, 2);
                self.set_desc(2, status, 1, D_WRITE, 0);
                dma_barrier(addr as *const u8);
            }
            None => self.set_desc(1, status, 1, D_WRITE, 0),
        }
        let n = self.queue_size;
        RINGS.avail_ring[usize::from(self.avail % n)].store(0, Relaxed);
        self.avail = self.avail.wrapping_add(1);
        // The ring entry (and descriptors) before the index the device reads.
        RINGS.avail_idx.store(self.avail, Release);
        // The index before the notification.
        fence(SeqCst);
        self.set(QUEUE_NOTIFY, 0);
        let start = ticks(cpu);
        let mut spins = 0u32;
        let mut backoff = Backoff::new();
        while RINGS.used.idx.load(Acquire) == self.used {
            if self.irq {
                wait_for_interrupt(self);
            } else {
                backoff.wait();
                spins = spins.wrapping_add(1);
                if spins % 4096 == 0 && ticks(cpu).saturating_sub(start) > WAIT_TICKS {
                    fail(
                        exit::RESOURCES,
                        format_args!("virtio-blk: request type {kind} at sector {sector} did not complete"),
                    );
                }
            }
        }
        // The used element and the data only after the index.
        fence(Acquire);
        if self.irq {
            // The completion may have come before any wait: acknowledge it so
            // that the (level) line drops and the next one makes an edge.
            self.acknowledge();
        }
        REQUESTS.fetch_add(1, Relaxed);
        let elem = &RINGS.used.ring[usize::from(self.used % n)];
        let id = elem.id.load(Relaxed);
        self.used = self.used.wrapping_add(1);
        if let Some((addr, _, _)) = data {
            dma_barrier(addr as *const u8);
        }
        let st = HEADER.status.load(Relaxed);
        if id != 0 {
            return Err(DiskError::Device(0xfe));
        }
        if st != ST_OK {
            Err(DiskError::Device(st))
        } else {
            Ok(())
        }
    }

    fn acknowledge(&self) {
        let isr = self.reg(INTERRUPT_STATUS);
        if isr != 0 {
            self.set(INTERRUPT_ACK, isr);
        }
    }

    /// `IN`/`OUT` of `words` at `sector`, split into requests of at most
    /// [`MAX_REQUEST_WORDS`].
    fn transfer(&mut self, cpu: usize, kind: u32, mut sector: u64, addr: u64, words: usize) -> Result<(), DiskError> {
        let mut done = 0;
        while done < words {
            let n = (words - done).min(MAX_REQUEST_WORDS);
            self.request(
                cpu,
                kind,
                sector,
                Some((addr + done as u64 * 8, (n * 8) as u32, kind == T_IN)),
            )?;
            done += n;
            sector += (n / SECTOR_WORDS) as u64;
        }
        Ok(())
    }
}

/// Wait in ring 0 for an interrupt (request 2 of boot.s), then acknowledge
/// what the device reports. Any wake (ours, spurious, or an earlier
/// completion's) just returns: the caller checks the used ring again.
fn wait_for_interrupt(dev: &Device) {
    WAITS.fetch_add(1, Relaxed);
    kernel_request(2);
    dev.acknowledge();
}

/// A disk request failed: say so on the console (the first few times).
fn report(what: &str, sector: u64, e: DiskError) {
    if REPORTED.fetch_add(1, Relaxed) < 8 {
        say!("virtio-blk: {what} at sector {sector} failed: {e}");
    }
}

/// The disk of the kv server's log (CPU 0's view; the server is used
/// under its own lock). Taken once, by `main` before the server starts.
pub fn kv_disk() -> &'static mut GuestDisk {
    static KV_DISK: Ticket<GuestDisk> = Ticket::new(GuestDisk { cpu: 0 });
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, AcqRel) {
        fail(exit::RESOURCES, format_args!("the kv log's disk was taken twice"));
    }
    // SAFETY: `TAKEN` lets this run once, so this is the only reference
    // ever made to the disk; the lock is never taken.
    unsafe { &mut *KV_DISK.value_ptr() }
}

/// The virtio-blk disk as the workloads on CPU `cpu` see it.
pub struct GuestDisk {
    pub cpu: usize,
}

impl Disk for GuestDisk {
    fn sectors(&self) -> u64 {
        CAPACITY.load(Relaxed)
    }

    fn read(&mut self, sector: u64, buf: &mut [u64]) -> Result<(), DiskError> {
        check_request(self.sectors(), sector, buf.len())?;
        let addr = buf.as_mut_ptr() as u64;
        with_device(|d| d.transfer(self.cpu, T_IN, sector, addr, buf.len())).inspect_err(|e| report("read", sector, *e))
    }

    fn write(&mut self, sector: u64, buf: &[u64]) -> Result<(), DiskError> {
        check_request(self.sectors(), sector, buf.len())?;
        if READ_ONLY.load(Relaxed) {
            return Err(DiskError::ReadOnly);
        }
        let addr = buf.as_ptr() as u64;
        with_device(|d| d.transfer(self.cpu, T_OUT, sector, addr, buf.len()))
            .inspect_err(|e| report("write", sector, *e))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        // Without VIRTIO_BLK_F_FLUSH the device has no write cache to flush.
        if !CAN_FLUSH.load(Relaxed) {
            return Ok(());
        }
        with_device(|d| d.request(self.cpu, T_FLUSH, 0, None)).inspect_err(|e| report("flush", 0, *e))
    }
}

/// What [`find`] saw on the command line, for the error message.
#[derive(Default)]
pub(crate) struct Seen {
    words: u32,
    unmapped: u32,
    legacy: u32,
}

impl Seen {
    /// Why no device was found, after "needs a ... device named by a
    /// virtio_mmio.device= word below 4 GiB; ".
    pub(crate) fn why(&self) -> impl fmt::Display + '_ {
        struct Why<'a>(&'a Seen);
        impl fmt::Display for Why<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "the command line names {} device(s)", self.0.words)?;
                if self.0.unmapped > 0 {
                    write!(f, ", some outside the identity map or too small")?;
                }
                if self.0.legacy > 0 {
                    write!(
                        f,
                        ", a legacy one of that type (version 1; QEMU: -global virtio-mmio.force-legacy=false)"
                    )?;
                }
                Ok(())
            }
        }
        Why(self)
    }
}

/// The first virtio-mmio version-2 device of type `id` (2 block, 1 net)
/// among the command line's `virtio_mmio.device=` words.
pub(crate) fn find(cmdline: &str, id: u32) -> Result<MmioDevice, Seen> {
    let mut seen = Seen::default();
    for d in mmio::devices(cmdline) {
        seen.words += 1;
        if d.size < CONFIG + 8 || d.base.checked_add(d.size).is_none_or(|end| end > MAPPED_END) {
            seen.unmapped += 1;
            continue;
        }
        let (magic, version, dev) = (
            read32(d.base + MAGIC_VALUE),
            read32(d.base + VERSION),
            read32(d.base + DEVICE_ID),
        );
        if magic != MAGIC || dev != id {
            continue;
        }
        if version != 2 {
            seen.legacy += 1;
            continue;
        }
        return Ok(d);
    }
    Err(seen)
}

/// Give up on device `what` at `base`: mark it FAILED and exit with code 3.
pub(crate) fn device_failed(what: &str, base: u64, why: fmt::Arguments<'_>) -> ! {
    write32(base + STATUS, read32(base + STATUS) | S_FAILED);
    fail(exit::RESOURCES, format_args!("{what} at {base:#x}: {why}"))
}

/// Reset the device at `base`, then ACKNOWLEDGE, DRIVER, and accept
/// VERSION_1 and whatever of `want` it offers (FEATURES_OK). Returns the
/// features offered and accepted.
pub(crate) fn negotiate(what: &str, base: u64, want: u64) -> (u64, u64) {
    write32(base + STATUS, 0);
    while read32(base + STATUS) != 0 {
        core::hint::spin_loop();
    }
    write32(base + STATUS, S_ACKNOWLEDGE);
    write32(base + STATUS, S_ACKNOWLEDGE | S_DRIVER);
    write32(base + DEVICE_FEATURES_SEL, 0);
    let low = read32(base + DEVICE_FEATURES);
    write32(base + DEVICE_FEATURES_SEL, 1);
    let offered = (u64::from(read32(base + DEVICE_FEATURES)) << 32) | u64::from(low);
    if offered & F_VERSION_1 == 0 {
        device_failed(what, base, format_args!("the device does not offer VIRTIO_F_VERSION_1"));
    }
    let accepted = F_VERSION_1 | (offered & want);
    write32(base + DRIVER_FEATURES_SEL, 0);
    write32(base + DRIVER_FEATURES, accepted as u32);
    write32(base + DRIVER_FEATURES_SEL, 1);
    write32(base + DRIVER_FEATURES, (accepted >> 32) as u32);
    write32(base + STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if read32(base + STATUS) & S_FEATURES_OK == 0 {
        device_failed(what, base, format_args!("the device refused features {accepted:#x}"));
    }
    (offered, accepted)
}

/// Set up queue `q` of the device at `base` on `rings` (zeroed here);
/// `irq`: whether the driver wants interrupts. Returns the queue size.
pub(crate) fn setup_queue(what: &str, base: u64, q: u32, rings: &'static Rings, irq: bool) -> u16 {
    write32(base + QUEUE_SEL, q);
    if read32(base + QUEUE_READY) != 0 {
        device_failed(what, base, format_args!("queue {q} is already in use"));
    }
    let max = read32(base + QUEUE_NUM_MAX);
    if max == 0 {
        device_failed(what, base, format_args!("queue {q} is not available"));
    }
    // Split-ring sizes are powers of two.
    let fit = max.min(QUEUE_MAX as u32);
    let size = (1u32 << (31 - fit.leading_zeros())) as u16;
    for d in &rings.desc {
        d.addr.store(0, Relaxed);
        d.len.store(0, Relaxed);
        d.flags.store(0, Relaxed);
        d.next.store(0, Relaxed);
    }
    // Polling: VRING_AVAIL_F_NO_INTERRUPT, the device need not interrupt.
    rings.avail_flags.store(if irq { 0 } else { 1 }, Relaxed);
    rings.avail_idx.store(0, Relaxed);
    rings.used.flags.store(0, Relaxed);
    rings.used.idx.store(0, Relaxed);
    fence(SeqCst);
    write32(base + QUEUE_NUM, u32::from(size));
    let addr_pair = |low: u64, high: u64, addr: u64| {
        write32(base + low, addr as u32);
        write32(base + high, (addr >> 32) as u32);
    };
    addr_pair(QUEUE_DESC_LOW, QUEUE_DESC_HIGH, core::ptr::addr_of!(rings.desc) as u64);
    addr_pair(
        QUEUE_AVAIL_LOW,
        QUEUE_AVAIL_HIGH,
        core::ptr::addr_of!(rings.avail_flags) as u64,
    );
    addr_pair(QUEUE_USED_LOW, QUEUE_USED_HIGH, core::ptr::addr_of!(rings.used) as u64);
    write32(base + QUEUE_READY, 1);
    size
}

/// The driver is ready (DRIVER_OK).
pub(crate) fn driver_ok(base: u64) {
    write32(base + STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/// Find the disk, bring it up (virtio 1.x driver initialization) and route
/// its interrupt if `irq`. Fails the guest (exit code 3) if there is no
/// usable disk or it is smaller than `need` bytes.
pub fn init(cmdline: &str, need: u64, irq: bool) {
    let found = match find(cmdline, DEVICE_BLK) {
        Ok(d) => d,
        Err(seen) => fail(
            exit::RESOURCES,
            format_args!(
                "the workload uses a disk: it needs a virtio-blk device (virtio-mmio version 2) named by a \
                 virtio_mmio.device= word below 4 GiB; {}",
                seen.why()
            ),
        ),
    };
    let base = found.base;
    // VERSION_1 and FLUSH if offered; RO is noted, not accepted.
    let (offered, accepted) = negotiate("virtio-blk", base, F_BLK_FLUSH);
    let size = setup_queue("virtio-blk", base, 0, &RINGS, irq);
    driver_ok(base);
    // Capacity (u64 sectors at config offset 0), read consistently.
    let capacity = loop {
        let generation = read32(base + CONFIG_GENERATION);
        let low = read32(base + CONFIG);
        let high = read32(base + CONFIG + 4);
        if read32(base + CONFIG_GENERATION) == generation {
            break (u64::from(high) << 32) | u64::from(low);
        }
    };
    if irq {
        route_irq(base, found.irq);
    }
    with_device(|d| {
        *d = Device {
            base,
            queue_size: size,
            irq,
            avail: 0,
            used: 0,
        }
    });
    CAPACITY.store(capacity, Relaxed);
    READ_ONLY.store(offered & F_BLK_RO != 0, Relaxed);
    CAN_FLUSH.store(accepted & F_BLK_FLUSH != 0, Relaxed);
    let mut id = [0u64; 3];
    let id_addr = id.as_mut_ptr() as u64;
    let got_id = with_device(|d| d.request(0, T_GET_ID, 0, Some((id_addr, 20, true)))).is_ok();
    let id_bytes: [u8; 24] = core::array::from_fn(|i| (id[i / 8] >> (8 * (i % 8))) as u8);
    let id_len = id_bytes[..20].iter().position(|b| *b == 0).unwrap_or(20);
    let id_str = core::str::from_utf8(&id_bytes[..id_len]).unwrap_or("?");
    say!(
        "virtio-blk at {base:#x} irq {}: {capacity} sectors ({} MiB){}{}, queue {size}, id \"{}\", {}",
        found.irq,
        capacity.saturating_mul(SECTOR) >> 20,
        if accepted & F_BLK_FLUSH != 0 { ", flush" } else { "" },
        if offered & F_BLK_RO != 0 { ", read-only" } else { "" },
        if got_id { id_str } else { "?" },
        if irq { "interrupts" } else { "polling" },
    );
    if capacity.saturating_mul(SECTOR) < need {
        fail(
            exit::RESOURCES,
            format_args!(
                "the workload uses {need} bytes of disk (dsize) but the disk has {} ({capacity} sectors)",
                capacity.saturating_mul(SECTOR)
            ),
        );
    }
    if offered & F_BLK_RO != 0 {
        fail(
            exit::RESOURCES,
            format_args!("the disk is read-only; the workload writes to it"),
        );
    }
}

/// Route IOAPIC pin `pin` to [`IRQ_VECTOR`] on this CPU (edge-triggered,
/// active high, fixed delivery, physical destination), after enabling the
/// local APIC and masking its LINT0 (the 8259 PIC's ExtINT path, whose
/// uninitialized vectors would land on exception stubs).
fn route_irq(base: u64, pin: u32) {
    let apic_id = read32(LAPIC + LAPIC_ID) >> 24;
    write32(LAPIC + LAPIC_LVT_LINT0, read32(LAPIC + LAPIC_LVT_LINT0) | 1 << 16);
    write32(
        LAPIC + LAPIC_SVR,
        (read32(LAPIC + LAPIC_SVR) & !0xff) | 0x100 | SPURIOUS_VECTOR,
    );
    let ioapic = |reg: u32| {
        write32(IOAPIC, reg);
        read32(IOAPIC + 0x10)
    };
    let version = ioapic(1);
    let pins = ((version >> 16) & 0xff) + 1;
    if version == 0 || version == u32::MAX {
        device_failed("virtio-blk", base, format_args!("irq=on: no IOAPIC answers at {IOAPIC:#x}"));
    }
    if pin >= pins {
        device_failed(
            "virtio-blk",
            base,
            format_args!("irq=on: IRQ {pin} is beyond the IOAPIC's {pins} pins"),
        );
    }
    let set = |reg: u32, val: u32| {
        write32(IOAPIC, reg);
        write32(IOAPIC + 0x10, val);
    };
    set(0x11 + 2 * pin, apic_id << 24);
    // Vector, fixed delivery (0), physical (bit 11 = 0), active high
    // (bit 13 = 0), edge (bit 15 = 0), unmasked (bit 16 = 0).
    set(0x10 + 2 * pin, IRQ_VECTOR);
}
