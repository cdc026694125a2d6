//! State shared by the copy-on-write saver and fault handler, and the fault
//! handler itself.
//!
//! Every page of the epoch being saved is *pending* until exactly one of
//! them claims it, under one lock:
//! - the **saver** claims a span of pages, copies them from guest memory
//!   (still write-protected, so unchanged since the pause), writes them,
//!   then lifts protection on the span;
//! - the **fault handler**, when the guest (or KVM, or a VMM thread) writes
//!   a protected page, claims the pending pages of that protection block,
//!   copies them aside, then lifts protection on the block, which wakes the
//!   writer. The saver later writes the copies in page order.
//!
//! A fault in a block the saver holds is left alone: the saver's own lift
//! wakes the writer. Protection is armed and lifted in whole blocks
//! (1 page, or 512 pages so that huge pages stay whole) and in merged runs,
//! because every call costs an MMU-notifier round trip in KVM.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use uffd::{Event, Uffd, UffdError};
use vmm::dirty::PageBits;
use vmm::memory::{GuestRam, PAGE_SIZE, RamRange};
use vmm_sys_util::eventfd::EventFd;

use super::slab::Slab;
pub use crate::capture::adapt::Tracker;

/// Tuning of the copy-on-write engine.
#[derive(Debug, Clone)]
pub struct CowOptions {
    /// How changed pages are found.
    pub tracker: Tracker,
    /// Pages per protection block: 1 (4 KiB) or 512 (2 MiB, keeps huge pages whole).
    pub block_pages: u64,
    /// Bytes of memory for pages copied aside; when full, a faulting writer
    /// waits for the saver (counted in the report).
    pub aside_bytes: usize,
    /// Pages the saver claims at a time (rounded up to whole blocks).
    pub chunk_pages: u64,
    /// Runs of protected blocks closer than this many pages are armed and
    /// lifted with one call.
    pub merge_gap_pages: u64,
    /// Switch between the trackers as the guest's writing changes, by the
    /// cost model (`--cow-tracker auto`); `tracker` is the first one.
    pub adapt: Option<crate::capture::adapt::AdaptPolicy>,
    /// Leave pages of regions written in most epochs unprotected in KVM's
    /// dirty log (`None`: re-protect every page each epoch).
    pub hot: Option<crate::capture::hot::HotPolicy>,
    /// Between faults, the fault handler copies pending pages aside ahead
    /// of the saver and lifts their protection.
    pub capture_ahead: bool,
    /// Under `Tracker::Uffd`, hot blocks (changed in the last epoch) about
    /// to be protected are copied during the pause instead, within this
    /// much time, and left writable: a protected block the guest writes at
    /// once would cost a fault and, on this host, KVM re-faulting every
    /// page of the block after its protection is lifted.
    pub pause_copy_budget: std::time::Duration,
    /// The VM was restored lazily: share its pager's userfaultfd.
    pub lazy: Option<crate::restore::lazy::LazyLink>,
    /// Test hooks (feature `testing` only).
    #[cfg(feature = "testing")]
    pub test: CowTestHooks,
}

/// Ways for tests to widen the engine's races or break it on purpose
/// (feature `testing`; the product has none of them).
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Default)]
pub struct CowTestHooks {
    /// The saver waits this long before it starts, so that writes meet
    /// protected pages.
    pub saver_delay: std::time::Duration,
    /// For mutation checks: the fault handler lifts protection without
    /// copying the page first (the saved epoch is then wrong).
    pub skip_copy: bool,
    /// The fault handler waits this long between marking a block unarmed
    /// (on a fault, or capturing ahead) and lifting its protection,
    /// widening the window in which a pause could re-arm it.
    pub lift_delay: std::time::Duration,
    /// With `adapt`: switch trackers every this many incremental epochs,
    /// whatever the cost model says (0: never forced).
    pub flip_tracker_every: u32,
}

impl CowOptions {
    /// The saver's delay before it starts (a test hook; none in the product).
    pub(crate) fn saver_delay(&self) -> std::time::Duration {
        #[cfg(feature = "testing")]
        return self.test.saver_delay;
        #[cfg(not(feature = "testing"))]
        std::time::Duration::ZERO
    }

    /// The fault handler's delay before it lifts protection (a test hook).
    pub(crate) fn lift_delay(&self) -> std::time::Duration {
        #[cfg(feature = "testing")]
        return self.test.lift_delay;
        #[cfg(not(feature = "testing"))]
        std::time::Duration::ZERO
    }

    /// Switch trackers every this many epochs (a test hook; 0: never).
    pub(crate) fn flip_tracker_every(&self) -> u32 {
        #[cfg(feature = "testing")]
        return self.test.flip_tracker_every;
        #[cfg(not(feature = "testing"))]
        0
    }

    /// The fault handler skips its copy (a test hook for mutation checks).
    pub(crate) fn skip_copy(&self) -> bool {
        #[cfg(feature = "testing")]
        return self.test.skip_copy;
        #[cfg(not(feature = "testing"))]
        false
    }
}

impl Default for CowOptions {
    fn default() -> Self {
        CowOptions {
            tracker: Tracker::Uffd,
            adapt: Some(crate::capture::adapt::AdaptPolicy::default()),
            block_pages: 512,
            aside_bytes: 256 << 20,
            chunk_pages: 512,
            merge_gap_pages: 16,
            hot: Some(crate::capture::hot::HotPolicy::default()),
            capture_ahead: true,
            pause_copy_budget: std::time::Duration::ZERO,
            lazy: None,
            #[cfg(feature = "testing")]
            test: CowTestHooks::default(),
        }
    }
}

/// Counters for one epoch.
#[derive(Debug, Default)]
pub(crate) struct EpochCounters {
    pub faults: AtomicU64,
    pub copied: AtomicU64,
    pub waits: AtomicU64,
    pub spurious: AtomicU64,
    /// Pages copied aside, by faults or ahead of the saver.
    pub captured: AtomicU64,
    /// Pages whose hash the saver compared (`Tracker::Uffd`).
    pub examined: AtomicU64,
    /// Pages copied during the pause.
    pub in_pause: AtomicU64,
    /// Pages the saver found changed and wrote (not full epochs).
    pub kept: AtomicU64,
    /// Time spent serving faults (the writers waited at least this long), ns.
    pub fault_ns: AtomicU64,
    /// The longest fault service, ns.
    pub fault_max_ns: AtomicU64,
}

impl EpochCounters {
    pub(crate) fn reset(&self) {
        for c in [
            &self.faults,
            &self.copied,
            &self.waits,
            &self.spurious,
            &self.captured,
            &self.examined,
            &self.in_pause,
            &self.kept,
            &self.fault_ns,
            &self.fault_max_ns,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// Mutable state under the lock.
pub(crate) struct Inner {
    /// Per range: pages of the epoch not yet claimed.
    pub pending: Vec<PageBits>,
    /// Per range: protection blocks armed and not yet lifted by the saver.
    pub armed: Vec<PageBits>,
    /// The span the saver has claimed and not yet lifted: (range, first page, end page).
    pub held: Option<(usize, u64, u64)>,
    /// Pages copied aside: (range, page) -> (slot in [`CowState::slab`],
    /// keyed hash of the copy under `Tracker::Uffd`, taken while it is hot
    /// in the cache).
    pub aside: BTreeMap<(usize, u64), (u32, Option<u64>)>,
    /// Free slots of [`CowState::slab`].
    pub free: Vec<u32>,
    /// The epoch was given up ([`CowState::release_all`]): the saver must not commit it.
    pub aborted: bool,
    /// Where the fault handler's capture-ahead goes next; `None` when it
    /// has nothing left to capture.
    pub capture: Option<CaptureAt>,
    /// Per range: blocks that held changed pages when last examined
    /// (`Tracker::Uffd`); only those are captured ahead of the saver,
    /// since capturing lifts a block's protection until the next epoch.
    pub hot: Vec<PageBits>,
}

/// Where capture-ahead goes next. It starts at the first block and, after
/// each fault, jumps to the block after the one written (the guest tends
/// to go on writing there, as QEMU's background snapshot assumes), coming
/// back for the blocks it jumped over once it reaches the end of RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CaptureAt {
    pub ri: usize,
    pub block: u64,
    /// Blocks before the start may still be pending: wrap around at the end.
    pub wrap: bool,
}

impl CaptureAt {
    pub(crate) const START: CaptureAt = CaptureAt {
        ri: 0,
        block: 0,
        wrap: false,
    };
}

/// Shared by the strategy, the saver and the fault handler.
pub(crate) struct CowState {
    pub uffd: Arc<Uffd>,
    pub ram: Arc<GuestRam>,
    pub ranges: Vec<RamRange>,
    /// Host address of each range.
    pub hosts: Vec<u64>,
    pub opts: CowOptions,
    pub inner: Mutex<Inner>,
    /// Copy-aside memory.
    pub slab: Slab,
    /// Signalled when aside slots are freed or the saver releases a span.
    pub cv: Condvar,
    pub counters: EpochCounters,
    /// Wakes the fault handler when an epoch is armed (to capture ahead).
    pub kick: EventFd,
    /// Page hashes of the last committed epoch (`Tracker::Uffd`).
    pub hashes: Mutex<super::hashes::Hashes>,
    /// The key of those hashes, for hashing pages as they are copied aside.
    pub seed: u64,
    /// The tracker whose rules save the epoch in flight (set while paused):
    /// `Tracker::Uffd` compares hashes and keeps blocks protected,
    /// `Tracker::DirtyLog` saves every pending page and lifts its block.
    saving: std::sync::atomic::AtomicBool,
}

impl CowState {
    pub(crate) fn new(uffd: Arc<Uffd>, ram: Arc<GuestRam>, opts: CowOptions, kick: EventFd) -> CowState {
        let ranges = ram.ranges().to_vec();
        let dirty_log = opts.tracker == Tracker::DirtyLog;
        let hashes = super::hashes::Hashes::new(&ranges);
        let seed = hashes.seed();
        let hashes = Mutex::new(hashes);
        let hosts = ranges.iter().map(|r| ram.host_ptr(r) as u64).collect();
        // No more than guest RAM: more could never be used.
        let slots = (opts.aside_bytes.min(ram.size() as usize) / PAGE_SIZE as usize).max(opts.block_pages as usize);
        let inner = Inner {
            pending: ranges.iter().map(|r| PageBits::new(r.pages())).collect(),
            armed: ranges
                .iter()
                .map(|r| PageBits::new(r.pages().div_ceil(opts.block_pages)))
                .collect(),
            held: None,
            aside: BTreeMap::new(),
            free: (0..slots as u32).rev().collect(),
            aborted: false,
            capture: None,
            hot: ranges
                .iter()
                .map(|r| PageBits::new(r.pages().div_ceil(opts.block_pages)))
                .collect(),
        };
        CowState {
            uffd,
            ram,
            ranges,
            hosts,
            opts,
            inner: Mutex::new(inner),
            slab: Slab::new(slots),
            cv: Condvar::new(),
            counters: EpochCounters::default(),
            kick,
            hashes,
            seed,
            saving: std::sync::atomic::AtomicBool::new(dirty_log),
        }
    }

    /// The rules the epoch in flight is saved by.
    pub(crate) fn saving_as(&self) -> Tracker {
        if self.saving.load(Ordering::Acquire) {
            Tracker::DirtyLog
        } else {
            Tracker::Uffd
        }
    }

    /// While paused, before arming: the rules of the epoch to come.
    pub(crate) fn save_as(&self, t: Tracker) {
        self.saving.store(t == Tracker::DirtyLog, Ordering::Release);
    }

    /// Hashes are kept for every saved page: under the uffd tracker, or
    /// when the engine may switch to it.
    pub(crate) fn keeps_hashes(&self) -> bool {
        self.saving_as() == Tracker::Uffd || self.opts.adapt.is_some()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Host address and length of pages [first, end) of range `ri`.
    pub(crate) fn span(&self, ri: usize, first: u64, end: u64) -> (u64, u64) {
        (self.hosts[ri] + first * PAGE_SIZE, (end - first) * PAGE_SIZE)
    }

    /// Page range of block `b` of range `ri`.
    pub(crate) fn block_pages(&self, ri: usize, b: u64) -> (u64, u64) {
        let bp = self.opts.block_pages;
        (b * bp, ((b + 1) * bp).min(self.ranges[ri].pages()))
    }

    /// Give up on the epoch: lift every protection, forget pending and
    /// copied-aside pages, and wake every waiter. Used on failure.
    pub(crate) fn release_all(&self) {
        let mut g = self.lock();
        for ri in 0..self.ranges.len() {
            g.pending[ri].clear();
            g.armed[ri].clear();
            let (addr, len) = self.span(ri, 0, self.ranges[ri].pages());
            if let Err(e) = self.uffd.unprotect(addr, len, true) {
                tracing::error!("cannot lift write protection: {e}");
            }
        }
        let slots: Vec<u32> = std::mem::take(&mut g.aside).into_values().map(|v| v.0).collect();
        g.free.extend(slots);
        g.held = None;
        g.aborted = true;
        g.capture = None;
        drop(g);
        self.cv.notify_all();
    }

    /// Copy-aside slots that copies made ahead of need (capture-ahead, the
    /// pause's copies) leave free for faults: a quarter of them, and at
    /// least a block's worth.
    pub(crate) fn aside_reserve(&self, g: &Inner) -> usize {
        ((g.free.len() + g.aside.len()) / 4).max(self.opts.block_pages as usize)
    }

    /// Capture ahead of the saver while no fault waits: copy the pending
    /// pages of the next armed blocks into the copy-aside memory and lift
    /// their protection, so that the guest finds them writable. Keeps a
    /// quarter of the copy-aside memory free for faults.
    fn capture_ahead(&self) -> Result<Capture, UffdError> {
        let mut g = self.lock();
        let Some(CaptureAt {
            mut ri,
            mut block,
            mut wrap,
        }) = g.capture
        else {
            return Ok(Capture::Idle);
        };
        let reserve = self.aside_reserve(&g);
        let mut taken = 0u64;
        let mut lift: Vec<(usize, u64, u64)> = Vec::new();
        let bp = self.opts.block_pages;
        while taken < self.opts.chunk_pages {
            // The next block with pending pages.
            let Some(b) = g.pending.get(ri).and_then(|p| p.next_set(block * bp)).map(|p| p / bp) else {
                ri += 1;
                block = 0;
                if ri >= self.ranges.len() {
                    if !wrap {
                        g.capture = None;
                        break;
                    }
                    (ri, wrap) = (0, false);
                }
                continue;
            };
            let (b0, b1) = self.block_pages(ri, b);
            let cold = self.saving_as() == Tracker::Uffd && !g.hot[ri].get(b);
            if cold || g.held.is_some_and(|(hr, s, e)| hr == ri && s < b1 && b0 < e) {
                // Cold blocks stay protected, so that their next write is
                // seen; the saver has the ones it holds.
                block = b + 1;
                continue;
            }
            let want = g.pending[ri].take_span(b0, b1);
            if g.free.len() < want.len() + reserve {
                for q in want {
                    g.pending[ri].set(q);
                }
                g.capture = Some(CaptureAt { ri, block: b, wrap });
                break;
            }
            self.copy_aside(&mut g, ri, &want, true);
            g.armed[ri].unset(b);
            taken += want.len() as u64 + 1;
            match lift.last_mut() {
                Some(l) if l.0 == ri && l.2 == b0 => l.2 = b1,
                _ => lift.push((ri, b0, b1)),
            }
            block = b + 1;
            g.capture = Some(CaptureAt { ri, block, wrap });
        }
        let state = if g.capture.is_none() {
            Capture::Idle
        } else if lift.is_empty() {
            Capture::Blocked
        } else {
            Capture::Progress
        };
        // Lifted under the lock, like the `armed` bits cleared above: see
        // `on_fault`. (Capture-ahead can still be lifting when the saver
        // has committed the epoch and the next pause begins.)
        if !lift.is_empty() && !self.opts.lift_delay().is_zero() {
            std::thread::sleep(self.opts.lift_delay());
        }
        for (r, s, e) in lift {
            let (a, l) = self.span(r, s, e);
            self.uffd.unprotect(a, l, true)?;
        }
        drop(g);
        Ok(state)
    }

    /// Copy pages `pages` of range `ri` into free slots (the caller checked there are enough).
    /// `hash`: take each copy's keyed hash now, while it is in the cache
    /// (ahead of the saver); a fault leaves it to the saver, so that the
    /// writer waits for the copy only.
    pub(super) fn copy_aside(&self, g: &mut MutexGuard<'_, Inner>, ri: usize, pages: &[u64], hash: bool) {
        let inner = &mut **g;
        for q in pages {
            let Some(slot) = inner.free.pop() else {
                // Every caller checked under this lock that enough are free.
                panic!("no copy-aside slot left for guest page {q} of range {ri}");
            };
            let gpa = self.ranges[ri].gpa + q * PAGE_SIZE;
            let mut h = None;
            // SAFETY: `slot` was just taken from `free` under the lock, so
            // this thread owns it until it goes back there.
            unsafe {
                self.slab.with_slot(slot, |page| {
                    if let Err(e) = self.ram.read_to(gpa, page) {
                        tracing::error!("cannot copy guest page {gpa:#x} aside: {e}");
                    }
                    h = (hash && self.saving_as() == Tracker::Uffd)
                        .then(|| xxhash_rust::xxh3::xxh3_64_with_seed(page, self.seed));
                })
            };
            inner.aside.insert((ri, *q), (slot, h));
            inner.pending[ri].unset(*q);
        }
        self.counters.captured.fetch_add(pages.len() as u64, Ordering::Relaxed);
    }

    /// Serve one write-protect fault at host address `addr`.
    fn on_fault(&self, addr: u64) -> Result<(), UffdError> {
        let Some(ri) =
            (0..self.ranges.len()).find(|&i| self.hosts[i] <= addr && addr < self.hosts[i] + self.ranges[i].len)
        else {
            tracing::warn!("write-protect fault outside guest RAM at {addr:#x}");
            return Ok(());
        };
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let page = (addr - self.hosts[ri]) / PAGE_SIZE;
        let block = page / self.opts.block_pages;
        let (b0, b1) = self.block_pages(ri, block);
        let mut g = self.lock();
        loop {
            if self.opts.skip_copy() {
                break;
            }
            let mut want = Vec::new();
            let mut p = b0;
            while let Some(q) = g.pending[ri].next_set(p).filter(|q| *q < b1) {
                want.push(q);
                p = q + 1;
            }
            if g.held.is_some_and(|(hr, s, e)| hr == ri && s < b1 && b0 < e) {
                // The saver is copying this block: wait until it is done.
                g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if want.is_empty() {
                self.counters.spurious.fetch_add(1, Ordering::Relaxed);
                break;
            }
            if g.free.len() < want.len() {
                self.counters.waits.fetch_add(1, Ordering::Relaxed);
                g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            self.copy_aside(&mut g, ri, &want, false);
            self.counters.copied.fetch_add(want.len() as u64, Ordering::Relaxed);
            break;
        }
        // Clear `armed` and lift the protection under one lock. Lifted after
        // the lock is dropped, a late lift could land after the next pause
        // re-armed the block (it was unarmed, so it was written, so it is
        // protected again): the block would then be writable while marked
        // armed, and no later write to it would ever be seen. (A vCPU can
        // be parked for a pause while its fault is still being served.)
        g.armed[ri].unset(block);
        if g.capture.is_some() {
            g.capture = Some(CaptureAt {
                ri,
                block: block + 1,
                wrap: true,
            });
        }
        if !self.opts.lift_delay().is_zero() {
            std::thread::sleep(self.opts.lift_delay());
        }
        let (a, l) = self.span(ri, b0, b1);
        let lifted = self.uffd.unprotect(a, l, true);
        drop(g);
        lifted
    }
}

/// What capturing ahead did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// Nothing left to capture.
    Idle,
    /// Waiting for copy-aside memory.
    Blocked,
    /// Captured some pages; there may be more.
    Progress,
}

/// Where the fault handler finds write-protect faults.
pub(crate) enum Faults {
    /// On the userfaultfd, which this handler alone reads.
    Uffd,
    /// Forwarded by a lazy restore's pager, which reads the shared
    /// userfaultfd: their addresses, and the eventfd that signals them.
    Forwarded(Arc<Mutex<Vec<u64>>>, EventFd),
}

/// Serve one write-protect fault at `addr`, counting its time.
fn serve(shared: &CowState, addr: u64) {
    let t = std::time::Instant::now();
    if let Err(e) = shared.on_fault(addr & !(PAGE_SIZE - 1)) {
        panic!("serving a write-protect fault failed: {e}");
    }
    let ns = t.elapsed().as_nanos() as u64;
    shared.counters.fault_ns.fetch_add(ns, Ordering::Relaxed);
    shared.counters.fault_max_ns.fetch_max(ns, Ordering::Relaxed);
}

/// The fault handler thread's body: serve faults until `stop` is
/// signalled; between faults, capture ahead of the saver.
pub(crate) fn handle_faults(shared: &CowState, faults: &Faults, stop: &EventFd, ready: &dyn Fn()) {
    ready();
    let mut events = [Event::Other(0); 32];
    let mut capture = Capture::Idle;
    let source = match faults {
        Faults::Uffd => shared.uffd.as_raw_fd(),
        Faults::Forwarded(_, wake) => wake.as_raw_fd(),
    };
    loop {
        let timeout = match capture {
            Capture::Idle => -1,
            Capture::Blocked => 1,
            Capture::Progress => 0,
        };
        let [_, stopping, kicked] = match uffd::poll_fds([source, stop.as_raw_fd(), shared.kick.as_raw_fd()], timeout) {
            Ok(r) => r,
            Err(e) => panic!("polling the userfaultfd failed: {e}"),
        };
        if stopping {
            return;
        }
        if kicked {
            let _ = shared.kick.read();
            capture = Capture::Progress;
        }
        let n = match faults {
            Faults::Uffd => {
                let n = match shared.uffd.read_events(&mut events) {
                    Ok(n) => n,
                    Err(e) => panic!("reading the userfaultfd failed: {e}"),
                };
                for ev in &events[..n] {
                    match *ev {
                        Event::Fault { addr, wp: true, .. } => serve(shared, addr),
                        other => tracing::warn!("unexpected userfaultfd event {other:?}"),
                    }
                }
                n
            }
            Faults::Forwarded(queue, wake) => {
                let _ = wake.read();
                let addrs = std::mem::take(&mut *queue.lock().unwrap_or_else(|p| p.into_inner()));
                for addr in &addrs {
                    serve(shared, *addr);
                }
                addrs.len()
            }
        };
        if n == 0 && capture != Capture::Idle {
            capture = match shared.capture_ahead() {
                Ok(c) => c,
                Err(e) => panic!("capturing ahead failed: {e}"),
            };
        }
    }
}
