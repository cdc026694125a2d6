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
    }
}

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

/// Lower this thread's CPU and I/O priority, so that capture and the guest
/// come first.
fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: setpriority on our own thread id; failure changes nothing.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) };
    // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_BE << 13 | 7).
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const BE_LOWEST: libc::c_long = (2 << 13) | 7;
    // SAFETY: ioprio_set on our own thread id with a valid class and level.
    unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, BE_LOWEST) };
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
        let mut report = idle.clone();
        let thread = std::thread::Builder::new().name("reclaim".into()).spawn(move || {
            lower_priority();
            let mut next = Instant::now() + PERIOD;
            loop {
                while Instant::now() < next {
                    if flag.load(Ordering::Relaxed) {
                        return report;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                next = Instant::now() + PERIOD;
                let pin: Vec<u64> = match pinned {
                    Some(p) if store.latest().unwrap_or(0) <= start_latest => vec![p],
                    _ => Vec::new(),
                };
                match store::reclaim(&store, &opts, &pin, &flag, &mut |_, _| {}) {
                    Ok(pass) => report.add(&pass),
                    Err(e) => {
                        tracing::warn!("reclamation pass failed: {e}");
                        if report.errors.len() < MAX_ERRORS {
                            report.errors.push(e.to_string());
                        }
                    }
                }
            }
        });
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

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
