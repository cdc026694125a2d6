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

/// One guest RAM range: guest-physical start, host address, length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub gpa: u64,
    pub host: u64,
    pub len: u64,
}

/// Counters of a lazy restore.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub faults: AtomicU64,
    pub fault_pages: AtomicU64,
    pub fill_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// Where write-protect faults go when cow snapshots share the pager's
/// userfaultfd: the cow fault handler's queue, and the eventfd that wakes it.
pub(crate) struct WpSink {
    pub queue: Arc<Mutex<Vec<u64>>>,
    pub wake: vmm_sys_util::eventfd::EventFd,
}

/// The pager's side of sharing its userfaultfd with the cow engine.
#[derive(Default)]
pub(crate) struct WpLink {
    /// Pages are installed write-protected (cow with the uffd tracker
    /// keeps all of RAM protected). Held for reading across each install,
    /// so that turning it on (with the write lock, while all of RAM is
    /// protected) never races an install without protection.
    pub protect_installs: RwLock<bool>,
    /// The cow fault handler, while one runs.
    pub sink: Mutex<Option<WpSink>>,
}

/// What the handler and the fill share.
pub(crate) struct Pager {
    pub uffd: Arc<Uffd>,
    pub wp: WpLink,
    /// Zero pages to install write-protected (`UFFDIO_ZEROPAGE` cannot).
    zeros: Vec<u8>,
    pub spans: Vec<Span>,
    /// The restore plan, sorted by guest frame.
    pub runs: Vec<Run>,
    pub chain: Vec<EpochReader>,
    /// One bit per guest frame: claimed by the thread that installs it.
    claimed: Vec<AtomicU64>,
    pub counters: Counters,
    /// Fault service times, µs.
    pub latencies: Mutex<Vec<u32>>,
    /// The first failure (a page that fails its checksum, an I/O error).
    pub failure: Mutex<Option<String>>,
    /// Host ranges claimed but never installed because they failed:
    /// whoever touches them waits until [`Pager::release_refused`].
    refused: Mutex<Vec<(u64, u64)>>,
    pub failed: AtomicBool,
    /// The pager is being shut down.
    pub stopping: AtomicBool,
    pub started: Instant,
    /// Set when every page is installed: ns after `started`.
    pub resident_ns: AtomicU64,
}

impl Pager {
    pub(crate) fn new(uffd: Arc<Uffd>, spans: Vec<Span>, mut runs: Vec<Run>, chain: Vec<EpochReader>) -> Pager {
        runs.sort_by_key(|r| r.gfn);
        let frames = spans.iter().map(|s| (s.gpa + s.len) / PAGE as u64).max().unwrap_or(0);
        Pager {
            uffd,
            wp: WpLink::default(),
            zeros: Vec::new(),
            spans,
            runs,
            chain,
            claimed: (0..frames.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            counters: Counters::default(),
            latencies: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            refused: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            resident_ns: AtomicU64::new(0),
        }
    }

    /// Record the first failure.
    pub(crate) fn fail(&self, why: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::error!(%why, "lazy restore failed");
            *f = Some(why);
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
    pub(crate) fn install(&self, run: &Run, gfn: u64, count: u64, buf: &mut Vec<u8>) -> Result<u64, String> {
        let mut done = 0;
        for (g, n) in self.claim_range(gfn, count) {
            let host = self
                .host_of(g)
                .ok_or_else(|| format!("guest frame {g:#x} is not guest RAM"))?;
            let len = n * PAGE as u64;
            match run.source {
                Source::Zero => {
                    self.install_zeros(host, len)
                        .map_err(|e| format!("installing zero pages at guest frame {g:#x}: {e}"))?;
                    self.counters.zero_pages.fetch_add(n, Ordering::Relaxed);
                }
                Source::Data { epoch, page } => {
                    let r = &self.chain[epoch];
                    let first = page + (g - run.gfn);
                    buf.resize(len as usize, 0);
                    if r.read_pages(first, buf).is_ok() {
                        self.counters.bytes_read.fetch_add(len, Ordering::Relaxed);
                        let wp = self.wp.protect_installs.read().unwrap_or_else(|p| p.into_inner());
                        // SAFETY: `buf` holds `len` readable bytes for the call.
                        unsafe { self.uffd.copy(host, buf.as_ptr(), len, *wp) }
                            .map_err(|e| format!("installing pages at guest frame {g:#x}: {e}"))?;
                    } else {
                        // Page by page: install the good ones, refuse the bad.
                        self.install_each(r, first, host, n, buf)?;
                    }
                }
            }
            done += n;
        }
        Ok(done)
    }

    /// Install zero pages at `[host, host + len)`: the shared zero page, or
    /// copies of it when installs must arrive write-protected.
    fn install_zeros(&self, host: u64, len: u64) -> Result<(), uffd::UffdError> {
        let wp = self.wp.protect_installs.read().unwrap_or_else(|p| p.into_inner());
        if !*wp {
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

    /// Make zero pages installable write-protected (cow snapshots follow).
    pub(crate) fn with_protected_installs(mut self) -> Pager {
        self.zeros = vec![0; FILL_PAGES as usize * PAGE];
        self
    }

    /// Hand a write-protect fault at `addr` to the cow fault handler, or,
    /// with none running, lift the protection (nothing needs the page saved).
    pub(crate) fn forward_wp(&self, addr: u64) -> Result<(), String> {
        let sink = self.wp.sink.lock().unwrap_or_else(|p| p.into_inner());
        match &*sink {
            Some(s) => {
                s.queue.lock().unwrap_or_else(|p| p.into_inner()).push(addr);
                s.wake
                    .write(1)
                    .map_err(|e| format!("waking the cow fault handler: {e}"))
            }
            None => self
                .uffd
                .unprotect(addr & !(PAGE as u64 - 1), PAGE as u64, true)
                .map_err(|e| format!("lifting write protection at {addr:#x}: {e}")),
        }
    }
}

impl Pager {
    /// Install `n` data pages from `first` of `r` at `host` one at a time;
    /// a page that fails is refused (never installed). Err names the first.
    fn install_each(&self, r: &EpochReader, first: u64, host: u64, n: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut bad = None;
        for i in 0..n {
            let page = &mut buf[..PAGE];
            let at = host + i * PAGE as u64;
            match r.read_pages(first + i, page) {
                Ok(()) => {
                    self.counters.bytes_read.fetch_add(PAGE as u64, Ordering::Relaxed);
                    let wp = self.wp.protect_installs.read().unwrap_or_else(|p| p.into_inner());
                    // SAFETY: `page` holds one readable page for the call.
                    unsafe { self.uffd.copy(at, page.as_ptr(), PAGE as u64, *wp) }
                        .map_err(|e| format!("installing a page at {at:#x}: {e}"))?;
                }
                Err(e) => {
                    self.refused
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((at, PAGE as u64));
                    bad.get_or_insert_with(|| describe(r, e));
                }
            }
        }
        bad.map_or(Ok(()), Err)
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

/// A page that cannot be used: name the epoch and the page.
fn describe(r: &EpochReader, e: StoreError) -> String {
    format!("epoch {}: {e}; the guest never ran on that page", r.header().id)
}
