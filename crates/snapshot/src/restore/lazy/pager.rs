//! The pager's shared state: where every guest page comes from, which
//! pages are claimed for installation, and installing them with
//! userfaultfd. Nothing here reads or writes guest memory itself: pages
//! are read from the store into the pager's own buffers, verified, and
//! handed to the kernel (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use store::{EpochReader, Run, Source, StoreError};
use uffd::Uffd;

use crate::pages::PAGE;

/// Pages served around a fault, aligned (64 KiB): neighbours are likely
/// next, and one read and one install cost about what one page does.
pub(crate) const CLUSTER: u64 = 16;
/// Pages the fill installs per read (1 MiB).
pub(crate) const FILL_PAGES: u64 = 256;
/// Guest frames per huge page (2 MiB).
pub(crate) const HUGE_FRAMES: u64 = 512;

/// One guest RAM range: guest-physical start, host address, length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub gpa: u64,
    pub host: u64,
    pub len: u64,
}

/// Why a lazy restore stops the VM; each names the page, frame or thread.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// An address outside guest RAM.
    #[error("guest frame {0:#x} is not guest RAM")]
    NotRam(u64),
    /// A fault outside guest RAM.
    #[error("a fault at {0:#x}, outside guest RAM")]
    FaultOutside(u64),
    /// Installing pages failed.
    #[error("installing {what} at guest frame {gfn:#x}: {source}")]
    Install {
        /// Data or zero pages.
        what: &'static str,
        /// Where.
        gfn: u64,
        /// Cause.
        source: uffd::UffdError,
    },
    /// Handing an empty region back to the kernel failed.
    #[error("handing the empty region at guest frame {gfn:#x} back to the kernel: {source}")]
    Release {
        /// Where.
        gfn: u64,
        /// Cause.
        source: uffd::UffdError,
    },
    /// A page failed its checksum or could not be read: it was refused.
    #[error("epoch {epoch}: {source}; the guest never ran on that page")]
    Refused {
        /// The epoch whose page it is.
        epoch: u64,
        /// Why.
        source: StoreError,
    },
    /// Forwarding a write-protect fault to the cow fault handler failed.
    #[error("waking the cow fault handler: {0}")]
    Wake(std::io::Error),
    /// Lifting write protection failed.
    #[error("lifting write protection at {addr:#x}: {source}")]
    Unprotect {
        /// Where.
        addr: u64,
        /// Cause.
        source: uffd::UffdError,
    },
    /// Reading the userfaultfd failed.
    #[error("{what} the userfaultfd: {source}")]
    Uffd {
        /// Polling or reading.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading the userfaultfd's events failed.
    #[error("reading events from the userfaultfd: {0}")]
    Events(uffd::UffdError),
    /// A pager thread panicked.
    #[error("the {thread} thread panicked: {message}")]
    Panicked {
        /// Which thread.
        thread: &'static str,
        /// The panic message.
        message: String,
    },
}

/// Counters of a lazy restore.
#[derive(Debug, Default)]
pub(crate) struct PagerCounters {
    pub faults: AtomicU64,
    pub fault_pages: AtomicU64,
    pub fill_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    /// 2 MiB regions without data handed back to the kernel on a fault.
    pub zero_regions: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// Where write-protect faults go when cow snapshots share the pager's
/// userfaultfd: the cow fault handler's queue, and the eventfd that wakes it.
pub(crate) struct WpSink {
    pub queue: Arc<Mutex<Vec<u64>>>,
    pub wake: vmm_sys_util::eventfd::EventFd,
}

/// What an install may do now; changed only under the write lock, while
/// no install runs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct InstallMode {
    /// Pages are installed write-protected (cow snapshots run).
    pub protect: bool,
    /// RAM has left the userfaultfd (every page holding data is in): an
    /// install does nothing, and a missing page is a zero page the kernel
    /// maps by itself.
    pub released: bool,
}

/// What the handler and the fill share.
pub(crate) struct Pager {
    pub uffd: Arc<Uffd>,
    /// Held for reading across every install: see [`InstallMode`].
    pub gate: RwLock<InstallMode>,
    /// The cow fault handler, while one runs (write-protect faults go there).
    pub sink: Mutex<Option<WpSink>>,
    /// Cow snapshots may share the userfaultfd: RAM stays registered, and
    /// every page is installed, zero pages included.
    pub for_cow: bool,
    /// Zero pages to install write-protected (`UFFDIO_ZEROPAGE` cannot).
    zeros: Vec<u8>,
    pub spans: Vec<Span>,
    /// The restore plan, sorted by guest frame.
    pub runs: Vec<Run>,
    pub chain: Arc<Vec<EpochReader>>,
    /// The 2 MiB regions (guest frame / [`HUGE_FRAMES`]) that hold data.
    pub data_regions: std::collections::BTreeSet<u64>,
    /// One bit per guest frame: claimed by the thread that installs it.
    claimed: Vec<AtomicU64>,
    pub counters: PagerCounters,
    /// Fault service times, µs.
    pub latencies: Mutex<Vec<u32>>,
    /// The first failure (a page that fails its checksum, an I/O error).
    pub failure: Mutex<Option<Arc<PagerError>>>,
    /// Host ranges claimed but never installed because they failed:
    /// whoever touches them waits until [`Pager::release_refused`].
    refused: Mutex<Vec<(u64, u64)>>,
    pub failed: AtomicBool,
    /// The pager is being shut down.
    pub stopping: AtomicBool,
    pub started: Instant,
    /// Set when every page is installed: ns after `started`.
    pub resident_ns: AtomicU64,
    /// Set when the pages were collapsed into huge pages: ns after `started`.
    pub huge_ns: AtomicU64,
}

impl Pager {
    pub(crate) fn new(uffd: Arc<Uffd>, spans: Vec<Span>, mut runs: Vec<Run>, chain: Arc<Vec<EpochReader>>) -> Pager {
        runs.sort_by_key(|r| r.gfn);
        let data_regions = runs
            .iter()
            .filter(|r| matches!(r.source, Source::Data { .. }) && r.count > 0)
            .flat_map(|r| r.gfn / HUGE_FRAMES..=(r.gfn + r.count - 1) / HUGE_FRAMES)
            .collect();
        let frames = spans.iter().map(|s| (s.gpa + s.len) / PAGE as u64).max().unwrap_or(0);
        Pager {
            uffd,
            gate: RwLock::new(InstallMode::default()),
            sink: Mutex::new(None),
            for_cow: false,
            zeros: Vec::new(),
            spans,
            runs,
            chain,
            data_regions,
            claimed: (0..frames.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            counters: PagerCounters::default(),
            latencies: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            refused: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            resident_ns: AtomicU64::new(0),
            huge_ns: AtomicU64::new(0),
        }
    }

    /// Record the first failure.
    pub(crate) fn fail(&self, why: PagerError) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            // Not an error line: the controller stops the VM with `why`,
            // and the run's end says it (once).
            tracing::debug!(%why, "lazy restore failed");
            *f = Some(Arc::new(why));
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// The guest frame of host address `addr`.
    pub(crate) fn gfn_of(&self, addr: u64) -> Option<u64> {
        self.spans
            .iter()
            .find(|s| addr >= s.host && addr < s.host + s.len)
            .map(|s| (s.gpa + (addr - s.host)) / PAGE as u64)
    }

    fn host_of(&self, gfn: u64) -> Option<u64> {
        let gpa = gfn * PAGE as u64;
        self.spans
            .iter()
            .find(|s| gpa >= s.gpa && gpa < s.gpa + s.len)
            .map(|s| s.host + (gpa - s.gpa))
    }

    /// The run holding `gfn`.
    pub(crate) fn run_of(&self, gfn: u64) -> Option<&Run> {
        let i = self.runs.partition_point(|r| r.gfn + r.count <= gfn);
        self.runs.get(i).filter(|r| r.gfn <= gfn)
    }

    /// Claim `gfn`; true if this caller is the first.
    fn claim(&self, gfn: u64) -> bool {
        let Some(w) = self.claimed.get((gfn / 64) as usize) else {
            return false;
        };
        let bit = 1u64 << (gfn % 64);
        w.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Claim what is unclaimed of `[gfn, gfn + count)`: the claimed runs.
    fn claim_range(&self, gfn: u64, count: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for g in gfn..gfn + count {
            if self.claim(g) {
                match out.last_mut() {
                    Some((s, n)) if *s + *n == g => *n += 1,
                    _ => out.push((g, 1)),
                }
            }
        }
        out
    }

    /// Install the pages of `[gfn, gfn + count)` that nobody claimed yet,
    /// all within `run`: read and verify them into `buf`, then copy them
    /// in (zero runs become zero pages). Returns pages installed.
    pub(crate) fn install(&self, run: &Run, gfn: u64, count: u64, buf: &mut Vec<u8>) -> Result<u64, PagerError> {
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if gate.released {
            return Ok(0);
        }
        let mut done = 0;
        for (g, n) in self.claim_range(gfn, count) {
            let host = self.host_of(g).ok_or(PagerError::NotRam(g))?;
            let len = n * PAGE as u64;
            match run.source {
                Source::Zero => {
                    self.install_zeros(host, len, gate.protect)
                        .map_err(|source| PagerError::Install {
                            what: "zero pages",
                            gfn: g,
                            source,
                        })?;
                    self.counters.zero_pages.fetch_add(n, Ordering::Relaxed);
                }
                Source::Data { epoch, page } => {
                    let r = &self.chain[epoch];
                    let first = page + (g - run.gfn);
                    buf.resize(len as usize, 0);
                    if r.read_pages(first, buf).is_ok() {
                        self.counters.bytes_read.fetch_add(len, Ordering::Relaxed);
                        // SAFETY: `buf` holds `len` readable bytes for the call.
                        unsafe { self.uffd.copy(host, buf.as_ptr(), len, gate.protect) }.map_err(|source| {
                            PagerError::Install {
                                what: "pages",
                                gfn: g,
                                source,
                            }
                        })?;
                    } else {
                        // Page by page: install the good ones, refuse the bad.
                        self.install_each(r, first, host, n, buf, gate.protect)?;
                    }
                }
            }
            done += n;
        }
        Ok(done)
    }

    /// Hand the 2 MiB region of guest frame `gfn`, which holds no data, back
    /// to the kernel: it leaves the userfaultfd (which wakes the faulting
    /// thread) and faults in as the kernel's own zero memory, a huge page
    /// where the region is aligned. Installing zero pages instead would pin
    /// it to small pages that `MADV_COLLAPSE` cannot gather later (a
    /// region of zero-page mappings has nothing writable to collapse).
    /// Not with cow snapshots sharing the userfaultfd: their write
    /// protection needs the region registered. Returns whether it did.
    pub(crate) fn release_region(&self, gfn: u64) -> Result<bool, PagerError> {
        let region = gfn / HUGE_FRAMES;
        if self.for_cow || self.data_regions.contains(&region) {
            return Ok(false);
        }
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if gate.released {
            return Ok(true);
        }
        let gpa = gfn * PAGE as u64;
        let span = self
            .spans
            .iter()
            .find(|s| gpa >= s.gpa && gpa < s.gpa + s.len)
            .ok_or(PagerError::NotRam(gfn))?;
        let from = (region * HUGE_FRAMES * PAGE as u64).max(span.gpa);
        let to = ((region + 1) * HUGE_FRAMES * PAGE as u64).min(span.gpa + span.len);
        // Nobody installs there afterwards (the fill skips such regions).
        let _ = self.claim_range(from / PAGE as u64, (to - from) / PAGE as u64);
        self.uffd
            .unregister(span.host + (from - span.gpa), to - from)
            .map_err(|source| PagerError::Release { gfn, source })?;
        self.counters.zero_regions.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Install zero pages at `[host, host + len)`: the shared zero page, or
    /// copies of it when installs must arrive write-protected.
    fn install_zeros(&self, host: u64, len: u64, protect: bool) -> Result<(), uffd::UffdError> {
        if !protect {
            return self.uffd.zeropage(host, len);
        }
        let step = (FILL_PAGES * PAGE as u64).min(self.zeros.len() as u64);
        let mut at = 0;
        while at < len {
            let n = (len - at).min(step);
            // SAFETY: `zeros` holds at least `step` >= `n` readable bytes.
            unsafe { self.uffd.copy(host + at, self.zeros.as_ptr(), n, true) }?;
            at += n;
        }
        Ok(())
    }

    /// Share the userfaultfd with cow snapshots: RAM stays registered, and
    /// zero pages can be installed write-protected.
    pub(crate) fn for_cow(mut self) -> Pager {
        self.for_cow = true;
        self.zeros = vec![0; FILL_PAGES as usize * PAGE];
        self
    }

    /// Hand a write-protect fault at `addr` to the cow fault handler, or,
    /// with none running, lift the protection (nothing needs the page saved).
    pub(crate) fn forward_wp(&self, addr: u64) -> Result<(), PagerError> {
        let sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        match &*sink {
            Some(s) => {
                s.queue.lock().unwrap_or_else(|p| p.into_inner()).push(addr);
                s.wake.write(1).map_err(PagerError::Wake)
            }
            None => self
                .uffd
                .unprotect(addr & !(PAGE as u64 - 1), PAGE as u64, true)
                .map_err(|source| PagerError::Unprotect { addr, source }),
        }
    }
}

impl Pager {
    /// Install `n` data pages from `first` of `r` at `host` one at a time;
    /// a page that fails is refused (never installed). Err names the first.
    fn install_each(
        &self,
        r: &EpochReader,
        first: u64,
        host: u64,
        n: u64,
        buf: &mut [u8],
        protect: bool,
    ) -> Result<(), PagerError> {
        let mut bad = None;
        for i in 0..n {
            let page = &mut buf[..PAGE];
            let at = host + i * PAGE as u64;
            match r.read_pages(first + i, page) {
                Ok(()) => {
                    self.counters.bytes_read.fetch_add(PAGE as u64, Ordering::Relaxed);
                    // SAFETY: `page` holds one readable page for the call.
                    unsafe { self.uffd.copy(at, page.as_ptr(), PAGE as u64, protect) }.map_err(|source| {
                        PagerError::Install {
                            what: "a page",
                            gfn: self.gfn_of(at).unwrap_or(0),
                            source,
                        }
                    })?;
                }
                Err(e) => {
                    self.refused
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((at, PAGE as u64));
                    bad.get_or_insert(PagerError::Refused {
                        epoch: r.header().id,
                        source: e,
                    });
                }
            }
        }
        bad.map_or(Ok(()), Err)
    }

    /// Take RAM out of the userfaultfd once every page that holds data is
    /// installed: a page still missing is zero, and the kernel maps it by
    /// itself (as a huge page where its whole 2 MiB is missing). Waits for
    /// installs in progress; later ones do nothing.
    pub(crate) fn release(&self) {
        let mut g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        for s in &self.spans {
            if let Err(e) = self.uffd.unregister(s.host, s.len) {
                tracing::warn!("lazy restore: leaving the userfaultfd at {:#x}: {e}", s.host);
            }
        }
        g.released = true;
    }

    /// Collapse guest RAM's small pages into huge pages (`MADV_COLLAPSE`,
    /// after [`Pager::release`]): regions the fill or faults installed go
    /// back to the huge pages an eager restore has. Regions never touched
    /// are left alone.
    ///
    /// A region busy at that moment (a page locked or pinned for I/O, no
    /// huge page free yet) fails with `EAGAIN`: the call is tried again a
    /// few times, after 5, 10 and 20 ms (regions already huge are skipped
    /// quickly).
    pub(crate) fn collapse(&self) {
        const MADV_COLLAPSE: libc::c_int = 25;
        const TRIES: u32 = 4;
        for s in &self.spans {
            for attempt in 0..TRIES {
                // SAFETY: advice over guest RAM, which stays mapped while the
                // pager runs (the LazyPager keeps it); collapsing copies pages
                // into huge pages under the kernel's locks and changes no
                // contents. Failure (an old kernel, no huge page free) only
                // leaves small pages.
                let r = unsafe { libc::madvise(s.host as *mut libc::c_void, s.len as usize, MADV_COLLAPSE) };
                if r == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EAGAIN) || attempt + 1 == TRIES {
                    tracing::debug!(
                        "lazy restore: MADV_COLLAPSE at {:#x} (try {}): {e}",
                        s.host,
                        attempt + 1
                    );
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5 << attempt));
            }
        }
    }

    /// Install zero pages where pages were refused, waking whoever waits
    /// on them. Only once no vCPU can run guest code again.
    pub(crate) fn release_refused(&self) {
        for (host, len) in std::mem::take(&mut *self.refused.lock().unwrap_or_else(|p| p.into_inner())) {
            if let Err(e) = self.uffd.zeropage(host, len) {
                tracing::warn!("releasing refused pages at {host:#x}: {e}");
            }
        }
    }
}
