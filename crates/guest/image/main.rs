//! consnap workload guest: the ring-3 part.
//!
//! `boot.s` brings every CPU to ring 3 and calls [`user_entry`]. CPU 0 reads
//! the PVH start_info (command line, memory map), finds the CPU count in the
//! ACPI MADT or the MP table, starts the other CPUs, and runs its share of the workload; the
//! others run theirs. CPU 0 then combines the results, publishes them in the
//! status page, prints them on COM1 and writes the exit code to the
//! debug-exit port. Nothing here runs in ring 0. With `disk=on` (and for
//! dblog) CPU 0 first brings up the virtio-blk disk (`virtio.rs`), which
//! every CPU then uses.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};
use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};

use workload::abi::{self, MAX_CPUS, exit, state};
use workload::{Env, Outcome, Share, Spec};

global_asm!(include_str!("boot.s"), options(att_syntax));
global_asm!(include_str!("mem.s"), options(att_syntax));

/// Referenced by the prebuilt `core` even though the guest never unwinds.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// The status page, shared with the VMM (layout: `workload::abi`).
#[repr(C, align(4096))]
struct StatusPage {
    magic: AtomicU64,
    version: AtomicU32,
    state: AtomicU32,
    ncpus: AtomicU32,
    exit_code: AtomicU32,
    ops: AtomicU64,
    checksum: AtomicU64,
    errors: AtomicU64,
    arena: AtomicU64,
    _reserved: u64,
    ops_done: [AtomicU64; MAX_CPUS],
}

const _: () = {
    assert!(offset_of!(StatusPage, magic) == abi::off::MAGIC as usize);
    assert!(offset_of!(StatusPage, version) == abi::off::VERSION as usize);
    assert!(offset_of!(StatusPage, state) == abi::off::STATE as usize);
    assert!(offset_of!(StatusPage, ncpus) == abi::off::NCPUS as usize);
    assert!(offset_of!(StatusPage, exit_code) == abi::off::EXIT_CODE as usize);
    assert!(offset_of!(StatusPage, ops) == abi::off::OPS as usize);
    assert!(offset_of!(StatusPage, checksum) == abi::off::CHECKSUM as usize);
    assert!(offset_of!(StatusPage, errors) == abi::off::ERRORS as usize);
    assert!(offset_of!(StatusPage, arena) == abi::off::ARENA as usize);
    assert!(offset_of!(StatusPage, ops_done) == abi::off::OPS_DONE as usize);
};

// Exported so the compiler keeps every store: only the VMM reads most fields.
#[unsafe(link_section = ".status")]
#[unsafe(no_mangle)]
static STATUS: StatusPage = StatusPage {
    magic: AtomicU64::new(0),
    version: AtomicU32::new(0),
    state: AtomicU32::new(0),
    ncpus: AtomicU32::new(0),
    exit_code: AtomicU32::new(0),
    ops: AtomicU64::new(0),
    checksum: AtomicU64::new(0),
    errors: AtomicU64::new(0),
    arena: AtomicU64::new(0),
    _reserved: 0,
    ops_done: [const { AtomicU64::new(0) }; MAX_CPUS],
};

// Rendezvous between CPUs (all in guest RAM, so snapshots capture them).
static NCPUS: AtomicU32 = AtomicU32::new(1);
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);
static GO: AtomicU32 = AtomicU32::new(0);
static FINISHED: AtomicU32 = AtomicU32::new(0);
static ARENA: AtomicU64 = AtomicU64::new(0);
/// The guest clock, chosen by CPU 0 before the others start: kvmclock
/// (nanoseconds) when the host runs it, else the TSC. See [`ticks`].
static KVMCLOCK: AtomicBool = AtomicBool::new(false);
/// Ticks per second of the guest clock (0: TSC not calibrated).
static TICK_HZ: AtomicU64 = AtomicU64::new(0);
static RES_OPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static RES_SUM: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static RES_ERR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

unsafe extern "C" {
    static __image_end: u8;
    /// boot.s: one 32-byte `pvclock_vcpu_time_info` per CPU, written by KVM.
    static pvclock_slots: u8;
}

const COM1: u16 = 0x3f8;
const START_INFO_MAGIC: u32 = 0x336e_c578;

fn outb(port: u16, val: u8) {
    // SAFETY: port I/O to ports the TSS I/O bitmap grants to ring 3; no memory effects.
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags)) }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

fn outw(port: u16, val: u16) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags)) }
}

fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as in `outb`.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Whether the VMM offers the idle port (consnap does; QEMU does not).
static CAN_IDLE: AtomicBool = AtomicBool::new(false);

fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed in ring 3 (CR4.TSD is clear) and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// RDTSC after every earlier load has completed (LFENCE). Not `nomem`, so
/// the compiler keeps the memory accesses around it in program order.
fn rdtsc_ordered() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: LFENCE and RDTSC are allowed in ring 3 and only read the TSC.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Size of one CPU's pvclock slot (`PVCLOCK_SLOT` in boot.s).
const PVCLOCK_SLOT: usize = 32;

/// CPU `cpu`'s pvclock slot. boot.s registered it with KVM
/// (MSR_KVM_SYSTEM_TIME_NEW) if CPUID offers kvmclock; it stays zero otherwise.
fn pvclock_slot(cpu: usize) -> *const u8 {
    // SAFETY: only the address of the boot.s symbol is taken.
    let base = unsafe { core::ptr::addr_of!(pvclock_slots) };
    base.wrapping_add(cpu * PVCLOCK_SLOT)
}

/// The slot's version: odd while KVM updates it, 0 if KVM never wrote it.
fn pvclock_version(slot: *const u8) -> u32 {
    // SAFETY: the slot lies in boot.s's .bss (MAX_CPUS slots), identity-mapped
    // and user-accessible; KVM may rewrite it at any VM exit, hence volatile.
    unsafe { core::ptr::read_volatile(slot.cast::<u32>()) }
}

/// kvmclock in nanoseconds, read from the running CPU's own slot
/// (struct pvclock_vcpu_time_info: u32 version, u32 pad, u64 tsc_timestamp,
/// u64 system_time, u32 tsc_to_system_mul, i8 tsc_shift, u8 flags, u8 pad[2]).
/// KVM makes `version` odd while it rewrites the slot; a read is retried
/// until it sees the same even version before and after.
fn kvmclock_ns(cpu: usize) -> u64 {
    let slot = pvclock_slot(cpu);
    loop {
        let version = pvclock_version(slot);
        if version & 1 != 0 {
            core::hint::spin_loop();
            continue;
        }
        // SAFETY: as in `pvclock_version`; offsets 8..29 are within the slot.
        let (tsc_timestamp, system_time, mul, shift) = unsafe {
            (
                core::ptr::read_volatile(slot.add(8).cast::<u64>()),
                core::ptr::read_volatile(slot.add(16).cast::<u64>()),
                core::ptr::read_volatile(slot.add(24).cast::<u32>()),
                core::ptr::read_volatile(slot.add(28).cast::<i8>()),
            )
        };
        let tsc = rdtsc_ordered();
        if pvclock_version(slot) != version {
            continue;
        }
        let delta = tsc.saturating_sub(tsc_timestamp);
        let shifted = if shift < 0 {
            delta.checked_shr(u32::from(shift.unsigned_abs())).unwrap_or(0)
        } else {
            delta.checked_shl(shift as u32).unwrap_or(0)
        };
        let ns = (u128::from(shifted) * u128::from(mul)) >> 32;
        return system_time.wrapping_add(ns as u64);
    }
}

/// The guest clock as seen by CPU `cpu` (the caller's own index): kvmclock
/// nanoseconds or TSC cycles. kvmclock is saved and restored with the VM, so
/// it continues from the capture instant after a restore; the TSC need not
/// (on kvm_pvm it is always the host's).
fn ticks(cpu: usize) -> u64 {
    if KVMCLOCK.load(Relaxed) { kvmclock_ns(cpu) } else { rdtsc() }
}

/// Ask ring 0 for `request` (see boot.s): HLT at CPL 3 raises #GP.
fn kernel_request(request: u64) {
    // SAFETY: the #GP handler in boot.s services the request and resumes after the HLT.
    unsafe { asm!("hlt", in("rax") request, options(nostack)) }
}

fn park() -> ! {
    loop {
        kernel_request(0);
    }
}

struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(COM1, b);
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::Serial, "consnap-guest: {}", format_args!($($arg)*));
    }};
}

// After `say!`, which they use.
mod nic;
mod virtio;

fn finish(code: u32) -> ! {
    STATUS.exit_code.store(code, Release);
    if code != exit::OK && code != exit::INTEGRITY {
        STATUS.state.store(state::FAILED, Release);
    }
    outb(abi::DEBUG_EXIT_PORT, code as u8);
    park()
}

fn fail(code: u32, args: fmt::Arguments<'_>) -> ! {
    say!("error: {args}");
    finish(code)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    say!("panic: {info}");
    finish(exit::FAULT)
}

/// Entered in ring 3 by every CPU, with its index and the PVH start_info address.
#[unsafe(no_mangle)]
extern "C" fn user_entry(cpu: u64, start_info: u64) -> ! {
    if cpu == 0 { bsp_main(start_info) } else { ap_main(cpu as u32, start_info) }
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: all guest-physical memory below 4 GiB is identity-mapped and
    // user-accessible; callers pass addresses from start_info or the MP table.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn cmdline(start_info: u64) -> &'static str {
    if start_info == 0 || read::<u32>(start_info) != START_INFO_MAGIC {
        fail(exit::BAD_CMDLINE, format_args!("no PVH start_info (boot through the PVH entry)"));
    }
    let p = read::<u64>(start_info + 24);
    if p == 0 {
        return "";
    }
    let len = (0..4096).find(|&i| read::<u8>(p + i) == 0).unwrap_or(4096);
    // SAFETY: `len` bytes from `p` lie in identity-mapped guest memory that nothing writes.
    let bytes = unsafe { core::slice::from_raw_parts(p as *const u8, len as usize) };
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(_) => fail(exit::BAD_CMDLINE, format_args!("command line is not UTF-8")),
    }
}

fn parse_spec(start_info: u64) -> Spec {
    match Spec::parse(cmdline(start_info)) {
        Ok(s) => s,
        Err(e) => fail(exit::BAD_CMDLINE, format_args!("bad command line: {e}")),
    }
}

/// Enabled processors listed in the Intel MP table, if there is one.
fn mp_table_cpus() -> Option<u32> {
    let ebda = u64::from(read::<u16>(0x40e)) << 4;
    let ranges = [(ebda, ebda + 1024), (0x9fc00, 0xa0000), (0xf0000, 0x100000)];
    for (start, end) in ranges {
        if start == 0 {
            continue;
        }
        let mut p = start;
        while p + 16 <= end {
            if read::<[u8; 4]>(p) == *b"_MP_" && (0..16).fold(0u8, |s, i| s.wrapping_add(read(p + i))) == 0 {
                let table = u64::from(read::<u32>(p + 4));
                if table == 0 || read::<[u8; 4]>(table) != *b"PCMP" {
                    return None;
                }
                let count = read::<u16>(table + 34);
                let mut e = table + 44;
                let mut cpus = 0;
                for _ in 0..count {
                    match read::<u8>(e) {
                        0 => {
                            if read::<u8>(e + 3) & 1 != 0 {
                                cpus += 1;
                            }
                            e += 20;
                        }
                        _ => e += 8,
                    }
                }
                return Some(cpus);
            }
            p += 16;
        }
    }
    None
}

/// Enabled processors in the ACPI MADT, found through start_info's RSDP
/// pointer or the BIOS area (QEMU's firmware provides ACPI, not an MP table).
fn acpi_cpus(start_info: u64) -> Option<u32> {
    let sig_at = |p: u64, s: &[u8; 4]| read::<[u8; 4]>(p) == *s;
    let mut rsdp = read::<u64>(start_info + 32);
    if rsdp == 0 {
        rsdp = (0xe0000u64..0x100000).step_by(16).find(|&p| read::<[u8; 8]>(p) == *b"RSD PTR ")?;
    }
    if read::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return None;
    }
    let xsdt = if read::<u8>(rsdp + 15) >= 2 { read::<u64>(rsdp + 24) } else { 0 };
    let (sdt, entry) = if xsdt != 0 { (xsdt, 8) } else { (u64::from(read::<u32>(rsdp + 16)), 4) };
    if sdt == 0 || !(sig_at(sdt, b"XSDT") || sig_at(sdt, b"RSDT")) {
        return None;
    }
    let len = u64::from(read::<u32>(sdt + 4)).min(4096);
    let tables = len.saturating_sub(36) / entry;
    let madt = (0..tables)
        .map(|i| if entry == 8 { read::<u64>(sdt + 36 + i * 8) } else { u64::from(read::<u32>(sdt + 36 + i * 4)) })
        .find(|&t| t != 0 && sig_at(t, b"APIC"))?;
    let end = madt + u64::from(read::<u32>(madt + 4)).min(64 << 10);
    let (mut p, mut cpus) = (madt + 44, 0);
    while p + 2 <= end {
        let (kind, elen) = (read::<u8>(p), u64::from(read::<u8>(p + 1)));
        if elen < 2 {
            break;
        }
        match kind {
            0 if read::<u32>(p + 4) & 1 != 0 => cpus += 1, // local APIC, enabled
            9 if read::<u32>(p + 8) & 1 != 0 => cpus += 1, // local x2APIC, enabled
            _ => {}
        }
        p += elen;
    }
    (cpus > 0).then_some(cpus)
}

/// First RAM address after the image, 2 MiB aligned.
fn arena_base() -> u64 {
    // SAFETY: only the address of the linker-defined symbol is taken.
    let end = unsafe { core::ptr::addr_of!(__image_end) } as u64;
    end.next_multiple_of(2 << 20)
}

fn check_arena(start_info: u64, base: u64, bytes: u64) {
    let version = read::<u32>(start_info + 4);
    let (map, entries) = (read::<u64>(start_info + 40), read::<u32>(start_info + 48));
    if version < 1 || map == 0 {
        fail(exit::RESOURCES, format_args!("start_info has no memory map"));
    }
    let mut largest = 0;
    for i in 0..u64::from(entries.min(128)) {
        let e = map + i * 24;
        let (addr, size, kind) = (read::<u64>(e), read::<u64>(e + 8), read::<u32>(e + 16));
        if kind != 1 {
            continue;
        }
        let end = addr.saturating_add(size).min(4 << 30);
        if addr <= base && base + bytes <= end {
            return;
        }
        largest = largest.max(end.saturating_sub(base.max(addr)));
    }
    fail(
        exit::RESOURCES,
        format_args!("wss needs {} MiB of RAM from {base:#x}, but only {} MiB is usable there", bytes >> 20, largest >> 20),
    )
}

/// TSC frequency from a 10 ms countdown of PIT channel 2.
fn calibrate_tsc() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const COUNT: u16 = 11_932;
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, COUNT as u8);
    outb(0x42, (COUNT >> 8) as u8);
    let t0 = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 50_000_000 {
            fail(exit::RESOURCES, format_args!("PIT channel 2 does not count; cannot pace the workload"));
        }
    }
    let cycles = rdtsc() - t0;
    cycles * PIT_HZ / u64::from(COUNT)
}

/// Clock ticks each CPU took from its first op to its last (diskio).
static PHASE_TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

struct GuestEnv {
    cpu: usize,
    rate: u64,
    hz: u64,
    start: u64,
    /// Time the ops (diskio's throughput).
    timed: bool,
}

impl Env for GuestEnv {
    #[inline]
    fn step(&mut self, ops: u64, units: u64) {
        STATUS.ops_done[self.cpu].store(ops, Relaxed);
        if self.timed {
            PHASE_TICKS[self.cpu].store(ticks(self.cpu).saturating_sub(self.start), Relaxed);
        }
        if self.rate != 0 {
            let due = self.start + (u128::from(units) * u128::from(self.hz) / u128::from(self.rate)) as u64;
            // Ahead of the rate: sleep in the VMM (idle port), at least
            // 0.5 ms at a time (a host sleep costs about that much anyway),
            // then run the ops that fell due in one burst: the schedule is
            // absolute, so the average rate stays exact. Spin only for the
            // last few microseconds or where the port is absent.
            let idle = CAN_IDLE.load(Relaxed);
            loop {
                let now = ticks(self.cpu);
                if now >= due {
                    break;
                }
                let left_us = (u128::from(due - now) * 1_000_000 / u128::from(self.hz.max(1))) as u64;
                if idle && left_us >= 20 {
                    outw(abi::IDLE_PORT, left_us.clamp(500, u64::from(abi::IDLE_MAX_US)) as u16);
                } else {
                    core::hint::spin_loop();
                }
            }
        }
    }
}

fn run_cpu(cpu: u32, spec: &Spec) {
    if spec.kind == workload::Kind::Kv {
        // Every CPU serves requests until one says stop.
        nic::serve(cpu as usize);
        FINISHED.fetch_add(1, Release);
        return;
    }
    let ncpus = NCPUS.load(Acquire);
    let share = Share::new(spec, cpu, ncpus);
    let base = ARENA.load(Acquire) + u64::from(cpu) * share.bytes;
    // SAFETY: [base, base + share.bytes) is RAM checked by `check_arena`,
    // identity-mapped, and used by this CPU alone.
    let mem = unsafe { core::slice::from_raw_parts_mut(base as *mut u64, share.words()) };
    let mut env = GuestEnv {
        cpu: cpu as usize,
        rate: spec.rate,
        hz: TICK_HZ.load(Acquire),
        start: ticks(cpu as usize),
        timed: spec.kind == workload::Kind::Diskio,
    };
    let mut disk = virtio::GuestDisk { cpu: cpu as usize };
    let disk: Option<&mut dyn workload::Disk> = if spec.uses_disk() { Some(&mut disk) } else { None };
    let out = workload::run_share(&share, mem, &mut env, disk);
    let i = cpu as usize;
    RES_OPS[i].store(out.ops, Relaxed);
    RES_SUM[i].store(out.checksum, Relaxed);
    RES_ERR[i].store(out.errors, Relaxed);
    FINISHED.fetch_add(1, Release);
}

/// Give up waiting after this many ticks: 60 s of kvmclock, 15-30 s of TSC.
const WAIT_TICKS: u64 = 60_000_000_000;

/// A wait for another CPU or for the device: spin first (the answer
/// usually comes within microseconds), then, where the VMM offers the idle
/// port, sleep in the VMM in short steps, so that on a busy host the
/// thread being waited for (a vCPU holding the disk, the device's worker)
/// gets the CPU instead of this one spinning through its time slice.
struct Backoff {
    spins: u32,
}

impl Backoff {
    /// Spins before the first sleep: about 0.1-0.3 ms of PAUSE.
    const SPINS: u32 = 4096;
    /// One sleep in the VMM, in microseconds.
    const SLEEP_US: u16 = 50;

    const fn new() -> Self {
        Backoff { spins: 0 }
    }

    fn wait(&mut self) {
        if self.spins < Self::SPINS || !CAN_IDLE.load(Relaxed) {
            self.spins = self.spins.saturating_add(1);
            core::hint::spin_loop();
        } else {
            outw(abi::IDLE_PORT, Self::SLEEP_US);
        }
    }
}

/// A ticket lock: whoever asks first is served first (a vCPU that keeps
/// asking cannot starve the others, as it can with a plain spin lock);
/// waiters back off ([`Backoff`]).
pub(crate) struct Ticket<T> {
    next: AtomicU32,
    serving: AtomicU32,
    value: core::cell::UnsafeCell<T>,
}

// SAFETY: `value` is only reached through `with`, by the holder of the
// ticket being served, one at a time (or once, alone, through
// `value_ptr`). No `Send` bound: the guest's CPUs share one address space
// and have no thread-local state, so a value (such as a `&mut dyn Disk`)
// may be used from any of them in turn.
unsafe impl<T> Sync for Ticket<T> {}

impl<T> Ticket<T> {
    pub(crate) const fn new(value: T) -> Ticket<T> {
        Ticket {
            next: AtomicU32::new(0),
            serving: AtomicU32::new(0),
            value: core::cell::UnsafeCell::new(value),
        }
    }

    /// The value, for a caller that makes sure it is the only user.
    pub(crate) fn value_ptr(&self) -> *mut T {
        self.value.get()
    }

    /// Run `f` on the value, alone.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let ticket = self.next.fetch_add(1, Relaxed);
        let mut backoff = Backoff::new();
        while self.serving.load(Acquire) != ticket {
            backoff.wait();
        }
        // SAFETY: this ticket is served, so this is the only reference to
        // the value until `serving` moves on.
        let r = f(unsafe { &mut *self.value.get() });
        self.serving.store(ticket.wrapping_add(1), Release);
        r
    }
}

/// Wait on CPU `cpu` until `cond` holds; give up after [`WAIT_TICKS`]
/// without a change in `progress` (a slow host is not a hang).
fn wait_until(cpu: u32, what: &str, progress: impl Fn() -> u64, cond: impl Fn() -> bool) {
    let mut start = ticks(cpu as usize);
    let mut seen = progress();
    let mut backoff = Backoff::new();
    while !cond() {
        backoff.wait();
        let now = progress();
        if now != seen {
            seen = now;
            start = ticks(cpu as usize);
        } else if ticks(cpu as usize).saturating_sub(start) > WAIT_TICKS {
            fail(exit::RESOURCES, format_args!("timed out waiting for {what}"));
        }
    }
}

/// Ops done by all CPUs so far: what a wait for the others watches.
fn ops_done() -> u64 {
    STATUS.ops_done.iter().map(|o| o.load(Relaxed)).sum()
}

fn bsp_main(start_info: u64) -> ! {
    STATUS.version.store(abi::STATUS_ABI_VERSION, Relaxed);
    STATUS.state.store(state::BOOTING, Relaxed);
    STATUS.magic.store(abi::STATUS_MAGIC, Release);
    let spec = parse_spec(start_info);
    let ncpus = acpi_cpus(start_info).or_else(mp_table_cpus).unwrap_or(1).clamp(1, MAX_CPUS as u32);
    let share = Share::new(&spec, 0, ncpus);
    let base = arena_base();
    check_arena(start_info, base, share.bytes * u64::from(ncpus));
    ARENA.store(base, Relaxed);
    STATUS.arena.store(base, Relaxed);
    NCPUS.store(ncpus, Relaxed);
    let kvmclock = pvclock_version(pvclock_slot(0)) != 0;
    if kvmclock {
        TICK_HZ.store(1_000_000_000, Relaxed);
        KVMCLOCK.store(true, Release);
    } else if spec.rate != 0 || spec.kind == workload::Kind::Diskio {
        TICK_HZ.store(calibrate_tsc(), Relaxed);
    }
    // Paced workloads and every wait for a CPU or the disk sleep there.
    CAN_IDLE.store(inw(abi::IDLE_PORT) == abi::IDLE_MAGIC, Release);
    say!(
        "workload={} cpus={ncpus} wss={} ops={} seed={} rate={} clock={}",
        spec.kind.name(),
        spec.wss,
        spec.ops,
        spec.seed,
        spec.rate,
        if kvmclock { "kvmclock" } else { "tsc" }
    );
    if spec.uses_disk() {
        if spec.irq && ncpus > 1 {
            fail(
                exit::RESOURCES,
                format_args!(
                    "irq=on waits for the disk's interrupt on one vCPU only, but this guest has {ncpus} \
                     (use polling, the default, or 1 vCPU)"
                ),
            );
        }
        virtio::init(cmdline(start_info), spec.dsize, spec.irq);
    }
    if spec.kind == workload::Kind::Kv {
        let words = (share.bytes * u64::from(ncpus) / 8) as usize;
        // SAFETY: the arena is RAM checked by `check_arena`, identity-mapped,
        // and kv uses it only as this table (no CPU runs `run_share`).
        let table = unsafe { core::slice::from_raw_parts_mut(base as *mut u64, words) };
        let disk = spec.uses_disk().then(virtio::kv_disk);
        nic::init(cmdline(start_info), &spec, table, disk.map(|d| d as &'static mut dyn workload::Disk));
    }
    if ncpus > 1 {
        kernel_request(1);
        wait_until(0, "the other CPUs to start", || 0, || CHECKED_IN.load(Acquire) == ncpus - 1);
    }
    STATUS.ncpus.store(ncpus, Relaxed);
    STATUS.state.store(state::RUNNING, Release);
    GO.store(1, Release);
    run_cpu(0, &spec);
    wait_until(0, "the other CPUs to finish", ops_done, || FINISHED.load(Acquire) == ncpus);
    let outs: [Outcome; MAX_CPUS] = core::array::from_fn(|i| Outcome {
        ops: RES_OPS[i].load(Relaxed),
        checksum: RES_SUM[i].load(Relaxed),
        errors: RES_ERR[i].load(Relaxed),
    });
    let total = if spec.kind == workload::Kind::Kv {
        let (ops, checksum) = nic::outcome();
        Outcome { ops, checksum, errors: 0 }
    } else {
        workload::combine(&outs[..ncpus as usize])
    };
    STATUS.ops.store(total.ops, Relaxed);
    STATUS.checksum.store(total.checksum, Relaxed);
    STATUS.errors.store(total.errors, Relaxed);
    let code = if total.errors == 0 { exit::OK } else { exit::INTEGRITY };
    STATUS.exit_code.store(code, Relaxed);
    STATUS.state.store(state::DONE, Release);
    if spec.uses_disk() {
        let (requests, waits) = virtio::stats();
        say!("virtio-blk: {requests} requests, {waits} waits for an interrupt");
    }
    if spec.kind == workload::Kind::Diskio {
        // Throughput of the I/O phase: every CPU's ops, over the longest
        // CPU's time from its first op to its last.
        let hz = TICK_HZ.load(Relaxed).max(1);
        let slowest = (0..ncpus as usize).map(|i| PHASE_TICKS[i].load(Relaxed)).max().unwrap_or(0);
        let us = (u128::from(slowest) * 1_000_000 / u128::from(hz)) as u64;
        let bytes = total.ops.saturating_mul(spec.chunk);
        say!(
            "diskio {} {} chunk={}: {bytes} bytes in {us} us, {} MB/s",
            if spec.io_write { "write" } else { "read" },
            spec.pattern.name(),
            spec.chunk,
            if us == 0 { 0 } else { bytes / us }
        );
    }
    say!(
        "done workload={} cpus={ncpus} ops={} checksum={:#018x} errors={}",
        spec.kind.name(),
        total.ops,
        total.checksum,
        total.errors
    );
    finish(code)
}

fn ap_main(cpu: u32, start_info: u64) -> ! {
    let spec = parse_spec(start_info);
    // CPU 0 chose the clock before starting this CPU, whose boot.s ran the
    // same CPUID test; KVM fills a registered slot before the CPU runs again.
    if KVMCLOCK.load(Acquire) && pvclock_version(pvclock_slot(cpu as usize)) == 0 {
        fail(exit::RESOURCES, format_args!("kvmclock is not running on CPU {cpu}"));
    }
    CHECKED_IN.fetch_add(1, AcqRel);
    wait_until(cpu, "the start signal", || 0, || GO.load(Acquire) != 0);
    if cpu < NCPUS.load(Acquire) {
        run_cpu(cpu, &spec);
    }
    park()
}
