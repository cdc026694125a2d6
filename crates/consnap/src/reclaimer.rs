//! The background reclaimer of `consnap run` and `restore`: a thread that
//! every so often runs a reclamation pass over the store the snapshot
//! engine writes, through the engine's own handle (which holds the store's
//! lock). It shares nothing with capture but the directory: it never takes
//! a lock the engine waits for, runs at low CPU and I/O priority, and its
//! I/O can be rate-limited (`--reclaim-rate`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use store::{Ledger, ReclaimOptions, Store};

/// What the reclaimer did during a run (the report's `reclaim` section).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReclaimReport {
    /// The policy.
    pub retain: String,
    /// `--max-chain`.
    pub max_chain: usize,
    /// `--reclaim-rate` in bytes per second, if limited.
    pub rate: Option<u64>,
    /// Passes that changed something.
    pub passes: u64,
    /// Epochs removed after being merged into a retained epoch.
    pub epochs_merged: u64,
    /// Epochs removed that nothing needed.
    pub epochs_dropped: u64,
    /// Rewrites that shortened a chain.
    pub folds: u64,
    /// Epoch files rewritten.
    pub rewrites: u64,
    /// Bytes of files removed or replaced.
    pub bytes_freed: u64,
    /// Bytes written by rewrites.
    pub bytes_written: u64,
    /// Net bytes reclaimed: freed minus written.
    pub bytes_reclaimed: i64,
    /// Bytes read by rewrites.
    pub bytes_read: u64,
    /// Time spent in passes, seconds.
    pub time_s: f64,
    /// Failed passes and why (the first few).
    pub errors: Vec<String>,
    /// `--max-store` in bytes, if bounded.
    pub max_store: Option<u64>,
    /// Epochs the policy keeps that went to stay under `--max-store`.
    pub epochs_evicted: u64,
    /// Passes run at the vCPUs' priority because the store was over
    /// `--max-store` or a chain longer than `--max-chain`.
    pub urgent_passes: u64,
    /// The largest store size seen, bytes.
    pub max_bytes_seen: u64,
    /// The longest chain seen, files.
    pub max_chain_seen: u64,
    /// The store's size and longest chain, sampled every second.
    pub usage: Vec<UsageSample>,
}

/// One sample of the store's usage.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct UsageSample {
    /// Seconds since the reclaimer started.
    pub t_s: f64,
    /// Bytes of epoch files.
    pub bytes: u64,
    /// Epochs.
    pub epochs: u64,
    /// Files a restore of the epoch with the longest chain reads.
    pub longest_chain: u64,
}

impl ReclaimReport {
    fn add(&mut self, p: &Ledger) {
        self.passes += p.passes;
        self.epochs_merged += p.merged;
        self.epochs_dropped += p.dropped;
        self.folds += p.folds;
        self.rewrites += p.rewrites;
        self.bytes_freed += p.bytes_freed;
        self.bytes_written += p.bytes_written;
        self.bytes_reclaimed = self.bytes_freed as i64 - self.bytes_written as i64;
        self.bytes_read += p.bytes_read;
        self.time_s += p.time_ns as f64 / 1e9;
        self.epochs_evicted += p.evicted;
    }

    fn sample(&mut self, started: Instant, u: store::Usage) {
        self.max_bytes_seen = self.max_bytes_seen.max(u.bytes);
        self.max_chain_seen = self.max_chain_seen.max(u.longest_chain);
        if self.usage.len() < MAX_SAMPLES {
            self.usage.push(UsageSample {
                t_s: started.elapsed().as_secs_f64(),
                bytes: u.bytes,
                epochs: u.epochs,
                longest_chain: u.longest_chain,
            });
        }
    }
}

/// Usage samples kept in the report (a day at one a second).
const MAX_SAMPLES: usize = 86_400;
/// Time between usage samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Time between passes.
const PERIOD: Duration = Duration::from_millis(500);
/// Failed passes kept in the report.
const MAX_ERRORS: usize = 5;

/// A running reclaimer.
#[derive(Debug)]
pub struct Reclaimer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ReclaimReport>>,
    /// The report when no thread runs (nothing to do, or it could not start).
    idle: ReclaimReport,
}

/// Set this thread's CPU and I/O priority: `urgent`, that of the vCPUs
/// (nice 0, the default I/O level), while the store is over its bounds;
/// otherwise below them (nice 10, the lowest best-effort I/O level), so
/// that capture and the guest come first. Raising it back needs
/// CAP_SYS_NICE (root has it); without, it stays low and a warning says so.
fn set_priority(urgent: bool) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let nice = if urgent { 0 } else { 10 };
    // SAFETY: setpriority on our own thread id with a valid nice value.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 && urgent {
        tracing::warn!(
            "the reclaimer cannot raise its priority to catch up ({}): it stays below the vCPUs",
            std::io::Error::last_os_error()
        );
    }
    // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_BE << 13 | level).
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    let level: libc::c_long = if urgent { 4 } else { 7 };
    // SAFETY: ioprio_set on our own thread id with a valid class and level.
    unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, (2 << 13) | level) };
}

/// Whether `u` is at the bounds of `opts` (the writer's test too).
fn over_bounds(u: &store::Usage, opts: &ReclaimOptions) -> bool {
    u.at_bounds(opts.max_store, opts.max_chain)
}

impl Reclaimer {
    /// Start reclaiming `store` with `opts`. `pinned` is an epoch that must
    /// stay until the engine has committed an epoch of its own (the epoch a
    /// restored VM continues from: the engine's first epoch names it as
    /// parent).
    pub fn start(store: Arc<Store>, opts: ReclaimOptions, pinned: Option<u64>) -> Reclaimer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let start_latest = store.latest().unwrap_or(0);
        let idle = ReclaimReport {
            retain: opts.policy.text().to_string(),
            max_chain: opts.max_chain,
            rate: opts.rate,
            max_store: opts.max_store,
            ..ReclaimReport::default()
        };
        // Keeping every epoch in chains of any length leaves nothing to do:
        // no thread, rather than one listing the store twice a second.
        if opts.policy.keeps_all() && opts.max_chain == 0 {
            return Reclaimer {
                stop,
                thread: None,
                idle,
            };
        }
        let report = idle.clone();
        let thread = std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || run(&store, &opts, pinned, start_latest, &flag, report));
        match thread {
            Ok(t) => Reclaimer {
                stop,
                thread: Some(t),
                idle,
            },
            Err(e) => {
                tracing::warn!("cannot start the reclaimer thread: {e}");
                Reclaimer {
                    stop,
                    thread: None,
                    idle,
                }
            }
        }
    }

    /// Stop (an unfinished rewrite is discarded) and return what it did.
    pub fn finish(mut self) -> ReclaimReport {
        self.stop.store(true, Ordering::Relaxed);
        let idle = std::mem::take(&mut self.idle);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(idle)
    }
}

/// The reclaimer thread: a pass every [`PERIOD`], or one after another at
/// the vCPUs' priority while the store is over its bounds; the store's
/// usage sampled every second, during passes too.
fn run(
    store: &Store,
    opts: &ReclaimOptions,
    pinned: Option<u64>,
    start_latest: u64,
    stop: &AtomicBool,
    mut report: ReclaimReport,
) -> ReclaimReport {
    let started = Instant::now();
    let mut urgent = false;
    set_priority(urgent);
    let last_sample = std::cell::Cell::new(started - SAMPLE_EVERY);
    // Keep `u` as a sample when the last one is a second old.
    let record = |report: &mut ReclaimReport, u: store::Usage| {
        if last_sample.get().elapsed() >= SAMPLE_EVERY {
            last_sample.set(Instant::now());
            report.sample(started, u);
        }
    };
    // Look at the store when a sample is due (`force`: whatever the time)
    // and keep it; returns what it saw.
    let sample = |report: &mut ReclaimReport, force: bool| -> Option<store::Usage> {
        if !force && last_sample.get().elapsed() < SAMPLE_EVERY {
            return None;
        }
        let u = store::usage(store).ok()?;
        record(report, u);
        Some(u)
    };
    let mut next = Instant::now() + PERIOD;
    // What the store gained between the starts of two passes: the room a
    // pass leaves under the bounds (decaying slowly, so that one quiet
    // cycle does not leave the next busy one without it).
    let mut headroom = store::Headroom::default();
    let mut last_start: Option<u64> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return report;
        }
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return report;
            }
            sample(&mut report, false);
            std::thread::sleep(Duration::from_millis(20));
        }
        let latest = store.latest().unwrap_or(0);
        let pin: Vec<u64> = match pinned {
            Some(p) if latest <= start_latest => vec![p],
            _ => Vec::new(),
        };
        // One look at the store: its usage now, and what it gained since
        // the last pass started.
        let now = store::usage_since(store, last_start.unwrap_or(u64::MAX)).ok();
        if let (Some(before), Some((_, bytes))) = (last_start, now) {
            let epochs = usize::try_from(latest.saturating_sub(before)).unwrap_or(usize::MAX);
            headroom = store::Headroom {
                epochs: (epochs + 1).max(headroom.epochs * 7 / 8),
                bytes: bytes.max(headroom.bytes / 8 * 7),
            };
        }
        last_start = Some(latest);
        if let Some((u, _)) = now {
            record(&mut report, u);
        }
        // Over a bound now: this pass runs at the vCPUs' priority.
        let over = now.is_some_and(|(u, _)| over_bounds(&u, opts));
        if over != urgent {
            urgent = over;
            set_priority(urgent);
            tracing::info!(urgent, "the reclaimer's priority changes with the store's bounds");
        }
        let pass_opts = ReclaimOptions {
            headroom,
            ..opts.clone()
        };
        let pass = store::reclaim(store, &pass_opts, &pin, stop, &mut |_, _| {
            sample(&mut report, false);
        });
        match pass {
            Ok(pass) => {
                if pass.evicted > 0 && report.epochs_evicted == 0 {
                    tracing::warn!(
                        "the store is over --max-store: its oldest epochs go, though the policy keeps them (counted in the report's reclaim.epochs_evicted)"
                    );
                }
                report.add(&pass);
                if urgent {
                    report.urgent_passes += pass.passes;
                }
            }
            Err(e) => {
                tracing::warn!("reclamation pass failed: {e}");
                if report.errors.len() < MAX_ERRORS {
                    report.errors.push(e.to_string());
                }
            }
        }
        let over = sample(&mut report, true).is_some_and(|u| over_bounds(&u, opts));
        next = if over { Instant::now() } else { Instant::now() + PERIOD };
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
