//! Lazy restore: the VM runs as soon as its state is restored, and guest
//! pages arrive on demand.
//!
//! Guest RAM starts empty and registered with userfaultfd for missing
//! pages. A fault (from a vCPU, or from KVM itself, since the userfaultfd
//! handles kernel-mode faults) is served by the handler thread: it reads
//! the pages around the fault from the newest epoch of the chain that has
//! them (the restore plan, built from the indexes alone), verifies their
//! checksums and installs them (`UFFDIO_COPY`; zero pages with
//! `UFFDIO_ZEROPAGE`). A fill thread installs every other page meanwhile,
//! the restored epoch's own pages first (the ones the guest wrote last, so
//! likely to be touched first), then the rest in file order, at a lower
//! priority than the handler. No page reaches the guest unverified: a page
//! that fails its checksum is never installed, and the run stops with an
//! error naming the epoch and the page. Both threads belong to consnap (a
//! handler process that died would leave the guest hanging); a panic in
//! either is recorded as a failure and stops the run.

mod pager;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use store::{EpochReader, Source, Store, format::Header};
use uffd::Uffd;
use vmm::machine::{Attach, Machine, MachineError};
use vmm::memory::GuestRam;
use vmm::state::MachineConfig;
use vmm_sys_util::eventfd::EventFd;

pub use self::pager::PagerError;
pub(crate) use self::pager::WpSink;
use self::pager::{CLUSTER, FILL_PAGES, HUGE_FRAMES, Pager, Span};
use crate::pages::PAGE;
use crate::panic_message;
use crate::restore::{RestoreError, Restored};

/// Niceness of the fill thread: it yields to the vCPUs and to the handler.
const FILL_NICE: i32 = 5;

/// What a lazy restore did so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LazyStats {
    /// Faults served.
    pub faults: u64,
    /// Pages installed on faults, by the fill, and as zero pages.
    pub fault_pages: u64,
    pub fill_pages: u64,
    pub zero_pages: u64,
    /// 2 MiB regions without data that a fault handed back to the kernel
    /// (they then fault in as huge pages of zeros).
    pub zero_regions: u64,
    /// Page data read from the store, bytes.
    pub bytes_read: u64,
    /// Fault service time, µs: p50, p99, max.
    pub fault_us: [u32; 3],
    /// Seconds from the start of the restore until every page was
    /// installed, if that happened.
    pub resident_s: Option<f64>,
    /// Seconds from the start of the restore until the installed pages
    /// were collapsed into huge pages, if that happened (not with cow
    /// snapshots, whose write protection keeps small pages).
    pub huge_s: Option<f64>,
}

/// The running pager of a lazily restored VM. Keep it until the VM is
/// gone; [`LazyPager::failure`] says when the VM must stop.
pub struct LazyPager {
    pager: Arc<Pager>,
    stop: EventFd,
    threads: Vec<JoinHandle<()>>,
    /// Keeps guest RAM mapped for as long as the threads may name it.
    _ram: Option<Arc<GuestRam>>,
}

impl std::fmt::Debug for LazyPager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyPager").field("stats", &self.stats()).finish()
    }
}

impl LazyPager {
    /// Why the VM must stop: a page failed its checksum or could not be
    /// read or installed, or a pager thread died.
    pub fn failure(&self) -> Option<Arc<PagerError>> {
        if !self.pager.failed.load(Ordering::SeqCst) {
            return None;
        }
        self.pager.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After a failure, once every vCPU was told to stop (and kicked):
    /// put zero pages where pages were refused, so that a vCPU or VMM
    /// thread waiting in the kernel for one can finish. The guest never
    /// runs on them.
    pub fn release_refused(&self) {
        self.pager.release_refused();
    }

    /// For cow snapshots of this VM, if it was restored `for_cow`.
    pub fn cow_link(&self) -> Option<LazyLink> {
        (self.pager.uffd.features() & uffd::feature::PAGEFAULT_FLAG_WP != 0).then(|| LazyLink {
            pager: self.pager.clone(),
        })
    }

    /// Whether every page is installed.
    pub fn resident(&self) -> bool {
        self.pager.resident_ns.load(Ordering::SeqCst) > 0
    }

    /// Counters so far.
    pub fn stats(&self) -> LazyStats {
        let c = &self.pager.counters;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut lat = self.pager.latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        lat.sort_unstable();
        let at = |p: f64| {
            if lat.is_empty() {
                0
            } else {
                lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1]
            }
        };
        let res = self.pager.resident_ns.load(Ordering::SeqCst);
        let huge = self.pager.huge_ns.load(Ordering::SeqCst);
        LazyStats {
            faults: ld(&c.faults),
            fault_pages: ld(&c.fault_pages),
            fill_pages: ld(&c.fill_pages),
            zero_pages: ld(&c.zero_pages),
            zero_regions: ld(&c.zero_regions),
            bytes_read: ld(&c.bytes_read),
            fault_us: [at(0.5), at(0.99), lat.last().copied().unwrap_or(0)],
            resident_s: (res > 0).then(|| res as f64 / 1e9),
            huge_s: (huge > 0).then(|| huge as f64 / 1e9),
        }
    }

    /// Stop the threads and return the counters. Call only once no vCPU
    /// runs (a vCPU waiting on a page would wait for ever).
    pub fn finish(mut self) -> LazyStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        self.pager.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LazyPager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What cow snapshots of a lazily restored VM need from its pager: guest
/// RAM's one userfaultfd (a range takes only one), registered for missing
/// pages and for write protection, and the pager's side of sharing it:
/// write-protect faults routed to the cow fault handler, and pages
/// installed write-protected while cow keeps RAM protected.
#[derive(Clone)]
pub struct LazyLink {
    pager: Arc<Pager>,
}

impl std::fmt::Debug for LazyLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LazyLink")
    }
}

impl LazyLink {
    /// The userfaultfd, registered for missing pages and write protection.
    pub(crate) fn uffd(&self) -> Arc<Uffd> {
        self.pager.uffd.clone()
    }

    /// Route write-protect faults to `sink`; `None` stops routing (a
    /// write-protect fault then only lifts the protection).
    pub(crate) fn set_sink(&self, sink: Option<WpSink>) {
        *self.pager.sink.lock().unwrap_or_else(|p| p.into_inner()) = sink;
    }

    /// Turn write-protected installs on or off, running `f` while no page
    /// is being installed: turning them on together with protecting all of
    /// RAM leaves no page installed unprotected after that protection.
    pub(crate) fn protect_installs<R>(&self, on: bool, f: impl FnOnce() -> R) -> R {
        let mut g = self.pager.gate.write().unwrap_or_else(|p| p.into_inner());
        g.protect = on;
        f()
    }
}

/// Restore epoch `id` of `store` lazily: the machine state at once, guest
/// pages on demand and in the background. `for_cow`: cow snapshots will
/// share the pager's userfaultfd ([`LazyPager::cow_link`]).
pub fn restore_lazy(
    store: &Store,
    id: u64,
    attach: impl FnOnce(&MachineConfig) -> Attach,
    for_cow: bool,
) -> Result<(Restored, LazyPager), RestoreError> {
    let head = store.info(id)?.header;
    restore_lazy_from(&head, || Ok(store.chain(id)?), attach, for_cow)
}

/// [`restore_lazy`] of the epoch whose header is `head`, from the chain
/// `open_chain` opens (newest first; its epochs may be read by ranges, from
/// an object store). The chain is opened and planned while KVM builds the
/// VM.
pub fn restore_lazy_from(
    head: &Header,
    open_chain: impl FnOnce() -> Result<Vec<EpochReader>, RestoreError> + Send,
    attach: impl FnOnce(&MachineConfig) -> Attach,
    for_cow: bool,
) -> Result<(Restored, LazyPager), RestoreError> {
    let t0 = std::time::Instant::now();
    let id = head.id;
    let mem_size = head.mem_size;
    let vcpus = u8::try_from(head.vcpus).map_err(|_| RestoreError::Mismatch {
        id,
        why: format!("the header says {} vCPUs", head.vcpus),
    })?;
    let ram = GuestRam::new(mem_size).map_err(MachineError::from)?;
    // Full epochs of this VM must read pages not installed yet, not take them for zero.
    ram.mark_on_demand();
    let lazy_err = |why: String| RestoreError::Mismatch { id, why };
    let (features, mode) = if for_cow {
        (
            uffd::feature::PAGEFAULT_FLAG_WP | uffd::feature::WP_UNPOPULATED,
            uffd::Mode::MissingAndWriteProtect,
        )
    } else {
        (0, uffd::Mode::Missing)
    };
    let u = Uffd::new(features).map_err(|e| lazy_err(format!("lazy restore needs userfaultfd: {e}")))?;
    let spans: Vec<Span> = ram
        .ranges()
        .iter()
        .map(|r| Span {
            gpa: r.gpa,
            host: ram.host_ptr(r) as u64,
            len: r.len,
        })
        .collect();
    for s in &spans {
        u.register(s.host, s.len, mode)
            .map_err(|e| lazy_err(format!("registering guest RAM for missing pages: {e}")))?;
    }
    // The chain's indexes are read and planned while KVM builds the VM and
    // its memory slots (which touches no guest page): both grow with RAM.
    let (prep, vm) = std::thread::scope(|s| {
        let plan = std::thread::Builder::new()
            .name("lazy-plan".into())
            .spawn_scoped(s, || {
                let chain = open_chain();
                tracing::debug!(us = t0.elapsed().as_micros() as u64, "lazy restore: chain opened");
                let p = chain.and_then(|chain| crate::restore::prepare_chain(chain, id));
                tracing::debug!(us = t0.elapsed().as_micros() as u64, "lazy restore: chain planned");
                p
            });
        let vm = Machine::prepare(mem_size, vcpus, ram);
        tracing::debug!(us = t0.elapsed().as_micros() as u64, "lazy restore: VM prepared");
        let prep = match plan {
            Ok(h) => h
                .join()
                .unwrap_or_else(|e| Err(lazy_err(format!("planning panicked: {}", panic_message(&*e))))),
            Err(e) => Err(lazy_err(format!("cannot start the planning thread: {e}"))),
        };
        (prep, vm)
    });
    let (prep, vm) = (prep?, vm?);
    tracing::debug!(
        us = t0.elapsed().as_micros() as u64,
        "lazy restore: chain planned, VM prepared"
    );
    let data_pages: u64 = prep
        .runs
        .iter()
        .filter(|r| matches!(r.source, Source::Data { .. }))
        .map(|r| r.count)
        .sum();
    let chain_len = prep.chain.len();
    // Disks start empty and fill from the chain, blocks the guest touches
    // first (the device fetches them), the rest by a fill thread.
    let mut attach = attach(&prep.state.config);
    let chain = Arc::new(prep.chain);
    crate::restore::disk::lazy_disks(id, &prep.regions, &chain, prep.region_runs, &mut attach.disks)?;
    let mut pager = Pager::new(Arc::new(u), spans, prep.runs, chain);
    if for_cow {
        pager = pager.for_cow();
    }
    let pager = Arc::new(pager);
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| lazy_err(format!("eventfd: {e}")))?;
    let mut lazy = LazyPager {
        pager: pager.clone(),
        stop: stop.try_clone().map_err(|e| lazy_err(format!("eventfd: {e}")))?,
        threads: Vec::new(),
        _ram: None,
    };
    // The handler first: restoring the machine may already touch guest
    // RAM. The fill only once the machine is built, so that it does not
    // compete with that for the CPU.
    lazy.threads
        .push(spawn_worker("lazy-faults", 0, &pager, &stop).map_err(lazy_err)?);
    let machine = Machine::restore_prepared(vm, &prep.state, attach)?;
    lazy.threads
        .push(spawn_worker("lazy-fill", FILL_NICE, &pager, &stop).map_err(lazy_err)?);
    tracing::debug!(us = t0.elapsed().as_micros() as u64, "lazy restore: machine restored");
    lazy._ram = Some(machine.ram().clone());
    Ok((
        Restored {
            machine,
            epoch: id,
            chain: chain_len,
            bytes_read: data_pages * PAGE as u64,
        },
        lazy,
    ))
}

/// Start the pager thread `name` ("lazy-faults" or "lazy-fill") at
/// niceness `nice`; a panic in it is recorded as the pager's failure.
fn spawn_worker(name: &'static str, nice: i32, pager: &Arc<Pager>, stop: &EventFd) -> Result<JoinHandle<()>, String> {
    let p = pager.clone();
    let s = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // SAFETY: setpriority on the calling thread; failure only
            // leaves the default priority.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
            let body = std::panic::AssertUnwindSafe(|| {
                if name == "lazy-faults" {
                    serve_faults(&p, &s);
                } else {
                    fill(&p);
                }
            });
            if let Err(e) = std::panic::catch_unwind(body) {
                p.fail(PagerError::Panicked {
                    thread: name,
                    message: panic_message(&*e),
                });
            }
        })
        .map_err(|e| format!("cannot start the {name} thread: {e}"))
}

/// The handler thread: serve faults until stopped.
fn serve_faults(p: &Pager, stop: &EventFd) {
    let mut events = [uffd::Event::Other(0); 32];
    let mut buf = Vec::with_capacity(CLUSTER as usize * PAGE);
    loop {
        match uffd::poll2(p.uffd.as_raw_fd(), stop.as_raw_fd(), 1000) {
            Ok((_, true)) => return,
            Ok((false, false)) => continue,
            Ok((true, false)) => {}
            Err(e) => {
                p.fail(PagerError::Uffd {
                    what: "polling",
                    source: e,
                });
                return;
            }
        }
        let n = match p.uffd.read_events(&mut events) {
            Ok(n) => n,
            Err(e) => {
                p.fail(PagerError::Events(e));
                return;
            }
        };
        for ev in &events[..n] {
            let uffd::Event::Fault { addr, wp, .. } = *ev else {
                continue;
            };
            if wp {
                // A protected page (cow snapshots): the cow handler's, never
                // served here, so that a missing page is never held up by it.
                if let Err(e) = p.forward_wp(addr) {
                    p.fail(e);
                }
                continue;
            }
            let t0 = std::time::Instant::now();
            match serve_one(p, addr, &mut buf) {
                Ok(pages) => {
                    p.counters.faults.fetch_add(1, Ordering::Relaxed);
                    p.counters.fault_pages.fetch_add(pages, Ordering::Relaxed);
                    let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    p.latencies.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                }
                Err(e) => p.fail(e),
            }
        }
    }
}

/// Serve a fault at host address `addr`: its page first, then the rest of
/// its cluster. Pages another thread claimed are left to it (its install
/// wakes the faulting thread).
fn serve_one(p: &Pager, addr: u64, buf: &mut Vec<u8>) -> Result<u64, PagerError> {
    let gfn = p.gfn_of(addr).ok_or(PagerError::FaultOutside(addr))?;
    if p.release_region(gfn)? {
        return Ok(0);
    }
    let mut done = 0;
    let base = gfn / CLUSTER * CLUSTER;
    let order = std::iter::once((gfn, 1)).chain([(base, gfn - base), (gfn + 1, base + CLUSTER - gfn - 1)]);
    for (from, count) in order {
        let mut g = from;
        while g < from + count {
            let Some(run) = p.run_of(g) else {
                break; // beyond RAM
            };
            let n = (run.gfn + run.count).min(from + count) - g;
            done += p.install(run, g, n, buf)?;
            g += n;
        }
    }
    Ok(done)
}

/// The fill thread: install every page, the restored epoch's own first,
/// then each older epoch's in file order, a batch at a time, then the zero
/// runs. Without cow snapshots sharing the userfaultfd, zero runs are only
/// installed in 2 MiB regions that hold data too: once every data page is
/// in, RAM leaves the userfaultfd, the other regions fault in as huge zero
/// pages by themselves, and the regions that hold data are collapsed back
/// into huge pages (`UFFDIO_COPY` installs small ones).
fn fill(p: &Pager) {
    let mut buf = Vec::with_capacity(FILL_PAGES as usize * PAGE);
    // Data runs of each epoch in file order, then the zero runs.
    let mut by_epoch: Vec<Vec<&store::Run>> = vec![Vec::new(); p.chain.len()];
    let mut zeros = Vec::new();
    for r in &p.runs {
        match r.source {
            Source::Data { epoch, .. } => by_epoch[epoch].push(r),
            Source::Zero => zeros.push(r),
        }
    }
    for list in &mut by_epoch {
        list.sort_by_key(|r| match r.source {
            Source::Data { page, .. } => page,
            Source::Zero => 0,
        });
    }
    let stopped = || p.stopping.load(Ordering::SeqCst) || p.failed.load(Ordering::SeqCst);
    let pause = fill_pause();
    // Measurement knob: `CONSNAP_LAZY_FILL_ORDER=address` fills in guest
    // address order instead, to measure what the newest-first order buys.
    let mut data: Vec<&store::Run> = by_epoch.into_iter().flatten().collect();
    if std::env::var("CONSNAP_LAZY_FILL_ORDER").as_deref() == Ok("address") {
        data.sort_by_key(|r| r.gfn);
    }
    for run in data.into_iter().chain(zeros) {
        let mut g = run.gfn;
        while g < run.gfn + run.count {
            if stopped() {
                return;
            }
            let mut n = (run.gfn + run.count - g).min(FILL_PAGES);
            if matches!(run.source, Source::Zero) && !p.for_cow {
                // Up to the end of this 2 MiB region; skipped if it holds no data.
                let region = g / HUGE_FRAMES;
                n = n.min((region + 1) * HUGE_FRAMES - g);
                if !p.data_regions.contains(&region) {
                    g += n;
                    continue;
                }
            }
            if let Some(d) = pause {
                std::thread::sleep(d);
            }
            match p.install(run, g, n, &mut buf) {
                Ok(k) => {
                    if !matches!(run.source, Source::Zero) {
                        p.counters.fill_pages.fetch_add(k, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    p.fail(e);
                    return;
                }
            }
            g += n;
        }
    }
    if !p.for_cow {
        p.release();
    }
    let ns = p.started.elapsed().as_nanos().max(1) as u64;
    p.resident_ns.store(ns, Ordering::SeqCst);
    tracing::info!(seconds = ns as f64 / 1e9, "lazy restore: every page is resident");
    if !p.for_cow {
        p.collapse();
        let ns = p.started.elapsed().as_nanos().max(1) as u64;
        p.huge_ns.store(ns, Ordering::SeqCst);
        tracing::info!(seconds = ns as f64 / 1e9, "lazy restore: huge pages collapsed");
    }
}

/// Test hook (feature `testing`): `CONSNAP_TEST_LAZY_FILL_PAUSE_MS` slows
/// the fill down, so that tests see the VM (and its snapshots) run long
/// before every page has arrived. The product never reads it.
fn fill_pause() -> Option<std::time::Duration> {
    #[cfg(feature = "testing")]
    return std::env::var("CONSNAP_TEST_LAZY_FILL_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis);
    #[cfg(not(feature = "testing"))]
    None
}
