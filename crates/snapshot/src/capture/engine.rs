//! The snapshot engine, run as a controller task: every `interval` it
//! pauses the VM, captures the machine state, lets the capture strategy
//! take what it must while paused, resumes, and hands the rest of the epoch
//! to the writer thread. It never blocks on the writer: if an epoch is
//! still being saved when the next one is due, the interval stretches until
//! it is done, and the report counts it (an epoch's parent must exist
//! before its child is captured).
//!
//! An epoch counts only once its file is durable and renamed into place. A
//! failed epoch leaves nothing visible; its dirty pages go back to the
//! machine's dirty set (a failed full epoch makes the next one full), so no
//! write is ever lost from the chain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use store::{EpochMeta, Mode, Store};
use vmm::dirty::{DirtySet, PageBits};
use vmm::machine::Machine;
use vmm::region::Region;
use vmm::run::{Task, TaskFlow};

use crate::capture::cow::{Cow, CowOptions};
use crate::capture::errlog::ErrorLog;
use crate::capture::error::{EpochError, EpochFailure, SnapshotError};
use crate::capture::job::EpochStats;
use crate::capture::regions::RegionCapture;
use crate::capture::stop_copy::StopCopy;
use crate::capture::strategy::{EpochCtx, StopCopyFull, Strategy};
use crate::capture::target::Target;
use crate::capture::worker::{Done, Health, Writer};

/// What to snapshot, where and how often.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Capture mode.
    pub mode: Mode,
    /// Time between the starts of two epochs.
    pub interval: Duration,
    /// Stop the VM once this many snapshots in a row have failed (`None`:
    /// never; every failure is reported and the VM keeps running).
    pub stop_after: Option<u32>,
    /// Tuning of `cow`.
    pub cow: CowOptions,
    /// Write page data with O_DIRECT (bypassing the page cache).
    pub direct_io: bool,
    /// An epoch due this long while the one before it is still being
    /// saved makes the writer run at the vCPUs' priority until that one is
    /// durable (`None`: never). See `Writer::set_urgent`.
    pub max_lag: Option<Duration>,
    /// While the store takes more than this, a due epoch waits (the
    /// reclaimer frees space meanwhile), for at most
    /// [`SPACE_PATIENCE`] or ten intervals: then it is taken anyway, since
    /// protection comes before the bound.
    pub max_store: Option<u64>,
    /// Likewise while a chain of the store has this many files (0: no
    /// bound): the reclaimer folds it meanwhile.
    pub max_chain: usize,
}

/// How long an epoch waits at most for the store to fall under
/// `max_store` (or ten intervals, if longer).
pub const SPACE_PATIENCE: Duration = Duration::from_secs(5);
/// How often a waiting epoch looks at the store's size again.
const SPACE_RETRY: Duration = Duration::from_millis(10);

/// Failures injected on purpose, for tests of what the engine does with
/// them (feature `testing`; the product has none).
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Default)]
pub struct Inject {
    /// Capture attempts (1-based) that fail at their very end, as a failed
    /// final rename would.
    pub fail_attempts: Vec<u64>,
    /// Capture attempts whose background job panics (a writer thread that dies).
    pub panic_attempts: Vec<u64>,
}

#[cfg(feature = "testing")]
impl Inject {
    /// From `CONSNAP_FAIL_EPOCHS=3,4`: those capture attempts fail at their
    /// very end, as a failed write would, so that tests of the whole program
    /// can check that no dirty page is lost.
    pub fn from_env() -> Inject {
        Inject {
            fail_attempts: std::env::var("CONSNAP_FAIL_EPOCHS")
                .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
                .unwrap_or_default(),
            panic_attempts: Vec::new(),
        }
    }
}

/// One committed epoch, for the report.
#[derive(Debug, Clone)]
pub struct EpochRecord {
    /// Epoch id.
    pub id: u64,
    /// Parent epoch.
    pub parent: Option<u64>,
    /// Full epoch.
    pub full: bool,
    /// Pages written with data.
    pub pages_data: u64,
    /// Pages recorded as zero.
    pub pages_zero: u64,
    /// Size of the epoch file.
    pub bytes: u64,
    /// Time the guest did not run (pause request to resume).
    pub pause: Duration,
    /// Of which: stopping the vCPUs.
    pub vcpu_pause: Duration,
    /// From the pause request to the epoch being durable and visible.
    pub durable: Duration,
    /// Costs of the background part.
    pub stats: EpochStats,
}

struct InFlight {
    id: u64,
    parent: Option<u64>,
    full: bool,
    taken: Option<DirtySet>,
    /// Each region's units in this epoch (handed back if it fails).
    taken_regions: Vec<PageBits>,
    started: Instant,
    pause: Duration,
    vcpu_pause: Duration,
}

/// The engine; see the module documentation.
pub struct SnapshotEngine {
    cfg: SnapshotConfig,
    store: Arc<Store>,
    strategy: Box<dyn Strategy>,
    /// The machine's regions besides RAM (disks), from `prepare`.
    regions: Vec<Arc<dyn Region>>,
    health: Arc<Health>,
    parent: Option<u64>,
    need_full: bool,
    next_due: Instant,
    writer: Option<Writer>,
    in_flight: Option<InFlight>,
    stretching: Option<Instant>,
    /// Committed epochs, in order.
    pub records: Vec<EpochRecord>,
    /// Failed epochs and other snapshot errors, in order.
    pub errors: Vec<String>,
    /// Times an epoch was due while the previous one was still being saved.
    pub overloads: u64,
    /// Total time epochs were late because of that.
    pub overload_time: Duration,
    /// Times a late epoch made the writer urgent (see `SnapshotConfig::max_lag`).
    pub urgent: u64,
    /// Times an epoch waited because the store was over `max_store`.
    pub space_waits: u64,
    /// Total time epochs waited for that.
    pub space_wait_time: Duration,
    /// How long preparing the capture took, before the vCPUs started
    /// (cow: registering and write-protecting all of RAM).
    pub arm_time: Duration,
    /// Since when the due epoch waits for space, if it does.
    space_waiting: Option<Instant>,
    log: ErrorLog,
    attempts: u64,
    /// A mode asked for at run time, applied when the next epoch starts.
    switch_to: Option<Mode>,
    /// Snapshots failed since the last committed one.
    failed_in_row: u32,
    /// Test hook: which capture attempts fail on purpose.
    #[cfg(feature = "testing")]
    inject: Inject,
}

impl std::fmt::Debug for SnapshotEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotEngine")
            .field("cfg", &self.cfg)
            .field("parent", &self.parent)
            .field("committed", &self.records.len())
            .finish_non_exhaustive()
    }
}

/// How long the controller waits before checking again whether an overdue
/// epoch can start.
const RETRY: Duration = Duration::from_millis(1);

impl SnapshotEngine {
    /// An engine writing to `cfg.dir`. `parent` is the epoch of that store
    /// the VM was restored from (the first epoch may then be incremental).
    /// A store that cannot be opened (not a store, not a directory, in use
    /// by another process) is refused before anything runs.
    pub fn new(cfg: SnapshotConfig, parent: Option<u64>) -> Result<SnapshotEngine, SnapshotError> {
        let strategy: Box<dyn Strategy> = match cfg.mode {
            Mode::StopCopyFull => Box::<StopCopyFull>::default(),
            Mode::StopCopy => Box::<StopCopy>::default(),
            Mode::Cow => Box::new(Cow::new(cfg.cow.clone())),
        };
        let store = Store::open_or_create(&cfg.dir).map_err(|source| SnapshotError::Store {
            dir: cfg.dir.clone(),
            source,
        })?;
        let e = SnapshotEngine {
            next_due: Instant::now() + cfg.interval,
            log: ErrorLog::new(cfg.stop_after),
            cfg,
            store: Arc::new(store),
            strategy,
            regions: Vec::new(),
            health: Arc::default(),
            parent,
            need_full: parent.is_none(),
            writer: None,
            in_flight: None,
            stretching: None,
            records: Vec::new(),
            errors: Vec::new(),
            overloads: 0,
            overload_time: Duration::ZERO,
            urgent: 0,
            space_waits: 0,
            space_wait_time: Duration::ZERO,
            arm_time: Duration::ZERO,
            space_waiting: None,
            attempts: 0,
            switch_to: None,
            failed_in_row: 0,
            #[cfg(feature = "testing")]
            inject: Inject::from_env(),
        };
        Ok(e)
    }

    /// Test hook: make these capture attempts fail (replacing what
    /// `CONSNAP_FAIL_EPOCHS` asked for).
    #[cfg(feature = "testing")]
    pub fn set_inject(&mut self, inject: Inject) {
        self.inject = inject;
    }

    fn report(&mut self, msg: &str) {
        tracing::debug!(error = %msg, "snapshot failed");
        self.failed_in_row = self.failed_in_row.saturating_add(1);
        self.log.error(msg);
        self.errors.push(msg.to_string());
    }

    /// Whether the failures in a row reached `stop_after`: no more
    /// snapshots are tried and the run stops.
    fn giving_up(&self) -> bool {
        self.cfg.stop_after.is_some_and(|n| self.failed_in_row >= n.max(1))
    }

    /// Check that `mode` can run on this host, before anything starts.
    pub fn check_host(mode: Mode) -> Result<(), SnapshotError> {
        if mode == Mode::Cow {
            Cow::probe().map_err(SnapshotError::Cow)?;
        }
        Ok(())
    }

    /// Arm dirty tracking and start the engine's threads, before the vCPUs start.
    pub fn prepare(&mut self, t: &mut dyn Target) -> Result<(), SnapshotError> {
        self.regions = t.regions();
        let t0 = Instant::now();
        self.strategy.prepare(t, &self.health)?;
        self.arm_time = t0.elapsed();
        self.writer = Some(Writer::start(self.health.clone())?);
        Ok(())
    }

    /// The store the engine writes (it holds the store's lock; a reclaimer
    /// in this process works through it).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// The configuration (at run time: the interval and mode last set).
    pub fn config(&self) -> &SnapshotConfig {
        &self.cfg
    }

    /// The epoch being saved, if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|f| f.id)
    }

    /// Change the interval at run time: the next epoch is due one new
    /// interval after the start of the last one (at once if that has passed).
    pub fn set_interval(&mut self, interval: Duration) {
        let now = Instant::now();
        let last = self.next_due.checked_sub(self.cfg.interval).unwrap_or(now);
        self.cfg.interval = interval;
        self.next_due = last.checked_add(interval).unwrap_or(now).max(now);
    }

    /// Take an epoch at the next tick instead of waiting for the interval;
    /// the interval then counts from it. Refused (false) while an epoch is
    /// in flight: its successor cannot start before it is durable.
    pub fn request_now(&mut self) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        self.next_due = Instant::now();
        true
    }

    /// Collect finished epochs without capturing one; never blocks.
    pub fn poll(&mut self, t: &mut dyn Target) -> TaskFlow {
        if let Some(f) = self.fatal() {
            return self.stop_now(t, f);
        }
        let failure = self.collect(t, Duration::ZERO);
        self.flow(failure)
    }

    /// Switch the capture mode at run time, from the next epoch on (which
    /// is then full). Only between `stop-copy` and `stop-copy-full`: `cow`
    /// registers guest memory with userfaultfd and turns on manual dirty-log
    /// re-arming before the vCPUs start, which cannot be done or undone on a
    /// running VM.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), SnapshotError> {
        let from = self.cfg.mode;
        if mode == from {
            return Ok(());
        }
        if mode == Mode::Cow || from == Mode::Cow {
            return Err(SnapshotError::ModeSwitch { from, to: mode });
        }
        self.cfg.mode = mode;
        self.switch_to = Some(mode);
        Ok(())
    }

    /// Apply a mode switch asked for with [`SnapshotEngine::set_mode`]
    /// (no epoch is in flight).
    fn apply_switch(&mut self, t: &mut dyn Target) -> Result<(), CaptureError> {
        let Some(mode) = self.switch_to.take() else {
            return Ok(());
        };
        if mode == self.strategy.mode() {
            return Ok(());
        }
        let mut next: Box<dyn Strategy> = match mode {
            Mode::StopCopy => Box::<StopCopy>::default(),
            _ => Box::<StopCopyFull>::default(),
        };
        // stop-copy turns KVM's dirty log on; stop-copy-full needs none.
        if mode == Mode::StopCopyFull
            && let Err(e) = t.set_dirty_logging(false)
        {
            tracing::warn!("dirty logging stays on after switching to stop-copy-full: {e}");
        }
        if let Err(e) = next.prepare(t, &self.health) {
            self.switch_to = Some(mode);
            return Err(Failed(format!("cannot switch to {}: {e}", mode.name())));
        }
        self.strategy.shutdown();
        self.strategy = next;
        // What was dirtied before logging started is known to no log.
        self.need_full = true;
        tracing::info!(mode = mode.name(), "snapshot mode switched");
        Ok(())
    }

    /// One controller tick: collect finished epochs, then capture one if due.
    pub fn tick(&mut self, t: &mut dyn Target) -> TaskFlow {
        let started = Instant::now();
        if let Some(f) = self.fatal() {
            return self.stop_now(t, f);
        }
        let mut failure = self.collect(t, Duration::ZERO);
        if self.in_flight.is_some() {
            // Due, but the previous epoch is still being saved: stretch the interval.
            if self.stretching.is_none() {
                self.overloads += 1;
                self.stretching = Some(started);
            }
            if let (Some(since), Some(lag), Some(w)) = (self.stretching, self.cfg.max_lag, self.writer.as_mut())
                && started.duration_since(since) >= lag
                && w.set_urgent(true)
            {
                self.urgent += 1;
                tracing::info!(
                    epoch = self.in_flight.as_ref().map_or(0, |f| f.id),
                    "the next epoch is over {lag:?} late: the writer runs at the vCPUs' priority until this one is saved"
                );
            }
            self.next_due = started + RETRY;
            return self.flow(failure);
        }
        if let Some(since) = self.stretching.take() {
            self.overload_time += since.elapsed();
            if let Some(w) = self.writer.as_mut() {
                w.set_urgent(false);
            }
        }
        if self.wait_for_space(started) {
            self.next_due = started + SPACE_RETRY;
            return self.flow(failure);
        }
        if !self.giving_up() {
            match self.capture(t) {
                Ok(()) => {}
                Err(Fatal(msg)) => return self.stop_now(t, msg),
                Err(Failed(msg)) => {
                    self.report(&msg);
                    failure.get_or_insert(msg);
                }
            }
        }
        self.next_due = (started + self.cfg.interval).max(Instant::now());
        self.flow(failure)
    }

    /// Whether the due epoch waits because the store is at its bounds
    /// (`max_store`, `max_chain`; [`store::Usage::at_bounds`]): until the
    /// reclaimer brings it back under, or for at most
    /// [`SPACE_PATIENCE`] (ten intervals if longer), after which it goes
    /// ahead with a warning.
    fn wait_for_space(&mut self, now: Instant) -> bool {
        if self.cfg.max_store.is_none() && self.cfg.max_chain == 0 {
            return false;
        }
        let over = store::usage(&self.store).is_ok_and(|u| u.at_bounds(self.cfg.max_store, self.cfg.max_chain));
        let since = match (over, self.space_waiting) {
            (false, None) => return false,
            (false, Some(since)) => {
                self.space_waiting = None;
                self.space_wait_time += now.duration_since(since);
                return false;
            }
            (true, None) => {
                self.space_waits += 1;
                self.space_waiting = Some(now);
                now
            }
            (true, Some(since)) => since,
        };
        let patience = SPACE_PATIENCE.max(self.cfg.interval * 10);
        if now.duration_since(since) < patience {
            return true;
        }
        tracing::warn!(
            "the store has been at --max-store or --max-chain for {patience:?}: the reclaimer cannot keep up, and this epoch is taken anyway"
        );
        self.space_waiting = None;
        self.space_wait_time += now.duration_since(since);
        false
    }

    fn flow(&self, failure: Option<String>) -> TaskFlow {
        match failure {
            Some(msg) if self.giving_up() => TaskFlow::Stop(match self.failed_in_row {
                1 => format!("stopping on snapshot failure: {msg}"),
                n => format!("stopping after {n} failed snapshots in a row: {msg}"),
            }),
            _ => TaskFlow::Continue,
        }
    }

    /// A dead engine thread stops the run.
    fn fatal(&self) -> Option<String> {
        self.health.check().map(|f| f.to_string())
    }

    fn stop_now(&mut self, t: &mut dyn Target, msg: String) -> TaskFlow {
        self.strategy.abort();
        if let Some(f) = self.in_flight.take() {
            self.lost(t, f.full, f.taken, &f.taken_regions);
        }
        let msg = format!("snapshot engine failed: {msg}");
        tracing::debug!(error = %msg, "snapshot engine stopped");
        self.log.flush();
        self.errors.push(msg.clone());
        // The run stops with this message (it is not a retried snapshot error).
        TaskFlow::Stop(msg)
    }

    /// Wait for the epoch in flight, if any (at the end of a run, with the
    /// vCPUs stopped), then stop the engine's threads. Returns the epoch's
    /// failure message.
    pub fn finish(&mut self, t: &mut dyn Target) -> Option<String> {
        let failure = self.wait(t);
        self.strategy.shutdown();
        self.log.flush();
        failure
    }

    /// Wait for the epoch in flight, if any. Returns its failure message.
    pub fn wait(&mut self, t: &mut dyn Target) -> Option<String> {
        let mut failure = None;
        while self.in_flight.is_some() {
            if let Some(f) = self.fatal() {
                self.stop_now(t, f.clone());
                return Some(f);
            }
            if let Some(msg) = self.collect(t, Duration::from_millis(50)) {
                failure.get_or_insert(msg);
            }
        }
        failure
    }

    /// Process finished jobs, waiting up to `wait` for one; returns the first failure.
    fn collect(&mut self, t: &mut dyn Target, wait: Duration) -> Option<String> {
        let mut failure = None;
        while self.in_flight.is_some() {
            let done = match self.writer.as_ref().map(|w| w.done(wait)) {
                Some(Ok(Some(d))) => d,
                Some(Ok(None)) => break,
                Some(Err(())) | None => Done {
                    id: self.in_flight.as_ref().map_or(0, |f| f.id),
                    result: Err(EpochFailure::ThreadGone("writer")),
                    finished: Instant::now(),
                },
            };
            if let Some(msg) = self.complete(t, done) {
                failure.get_or_insert(msg);
            }
        }
        failure
    }

    fn complete(&mut self, t: &mut dyn Target, done: Done) -> Option<String> {
        let f = self.in_flight.take()?;
        self.strategy.finished(done.result.is_ok());
        match done.result {
            Ok(c) => {
                self.parent = Some(f.id);
                self.failed_in_row = 0;
                if f.full {
                    self.need_full = false;
                }
                let h = &c.info.header;
                tracing::info!(epoch = f.id, pages = h.pages_data, "epoch committed");
                self.records.push(EpochRecord {
                    id: f.id,
                    parent: f.parent,
                    full: f.full,
                    pages_data: h.pages_data,
                    pages_zero: h.pages_zero,
                    bytes: c.info.file_bytes,
                    pause: f.pause,
                    vcpu_pause: f.vcpu_pause,
                    durable: done.finished.duration_since(f.started),
                    stats: c.stats,
                });
                None
            }
            Err(failure) => {
                self.lost(t, f.full, f.taken, &f.taken_regions);
                let msg = EpochError::new(done.id, failure).to_string();
                self.report(&msg);
                Some(msg)
            }
        }
    }

    /// An epoch did not make it: its pages go back to the dirty set, and
    /// its regions' units to their devices' dirty sets.
    fn lost(&mut self, t: &mut dyn Target, full: bool, taken: Option<DirtySet>, taken_regions: &[PageBits]) {
        for (r, units) in self.regions.iter().zip(taken_regions) {
            r.mark_dirty(units);
        }
        if full {
            self.need_full = true;
        }
        match taken {
            Some(d) => t.mark_dirty(&d),
            // Nothing to hand back: only a full epoch is safe next.
            None if !full => self.need_full = true,
            None => {}
        }
    }

    fn meta(&self, t: &dyn Target, id: u64, full: bool, created_ns: u64) -> EpochMeta {
        EpochMeta {
            id,
            parent: if full { None } else { self.parent },
            mode: self.strategy.mode(),
            full,
            created_ns,
            vcpus: t.vcpus(),
            mem_size: t.ram().size(),
            progress: t.progress(),
            regions: self
                .regions
                .iter()
                .map(|r| crate::capture::regions::describe(&**r))
                .collect(),
        }
    }

    /// Without the test hooks, the job as it is.
    #[cfg(not(feature = "testing"))]
    fn inject(&self, job: crate::capture::job::JobFn) -> crate::capture::job::JobFn {
        job
    }

    /// Test hooks: make this attempt's job panic, or fail at its very end
    /// (the file it committed is removed again, as if the final rename had
    /// failed), so that the failure takes the same path as a real one.
    #[cfg(feature = "testing")]
    fn inject(&self, job: crate::capture::job::JobFn) -> crate::capture::job::JobFn {
        let n = self.attempts;
        if self.inject.panic_attempts.contains(&n) {
            return Box::new(move |pause_ns| {
                drop(job(pause_ns));
                panic!("injected writer panic")
            });
        }
        if self.inject.fail_attempts.contains(&n) {
            return Box::new(move |pause_ns| {
                let c = job(pause_ns)?;
                Err(match std::fs::remove_file(&c.info.path) {
                    Ok(()) => EpochFailure::Injected,
                    Err(source) => EpochFailure::Store(store::StoreError::Io {
                        path: c.info.path.clone(),
                        op: "remove",
                        source,
                    }),
                })
            });
        }
        job
    }

    /// Take one epoch now (none may be in flight).
    fn capture(&mut self, t: &mut dyn Target) -> Result<(), CaptureError> {
        self.apply_switch(t)?;
        let unusable = |e: store::StoreError| Failed(format!("snapshot directory unusable: {e}"));
        let store = self.store.clone();
        let id = store.next_id().map_err(unusable)?;
        let fail = |f: EpochFailure| Failed(EpochError::new(id, f).to_string());
        let full = self.need_full || self.strategy.always_full();
        let started = Instant::now();
        let created_ns = store::now_ns();
        let Some(cap) = t.pause_and_capture().map_err(|e| fail(e.into()))? else {
            // The guest is powering off: there is nothing left to protect.
            return Ok(());
        };
        // Everything the guest sent before this pause belongs to this epoch.
        let output = t.seal_output();
        let (regions, taken_regions) = match RegionCapture::take(&self.regions, full) {
            Ok(r) => r,
            Err(f) => {
                if let Err(e) = t.resume() {
                    return Err(Fatal(format!("cannot resume the VM after epoch {id}: {e}")));
                }
                return Err(fail(f));
            }
        };
        let mut ctx = EpochCtx {
            meta: self.meta(t, id, full, created_ns),
            store,
            state: cap.state,
            taken: None,
            direct_io: self.cfg.direct_io,
            regions,
            interval: self.cfg.interval,
        };
        let job = self.strategy.paused(t, &mut ctx);
        if let Err(e) = t.resume() {
            self.strategy.abort();
            return Err(Fatal(format!("cannot resume the VM after epoch {id}: {e}")));
        }
        let pause = started.elapsed();
        let job = match job {
            Ok(j) => j,
            Err(f) => {
                self.strategy.finished(false);
                self.lost(t, full, ctx.taken, &taken_regions);
                return Err(fail(f));
            }
        };
        self.attempts += 1;
        let job = self.inject(job);
        // Output made before the pause leaves once the epoch is durable:
        // right after its commit, on the writer's thread.
        let job: crate::capture::job::JobFn = match output {
            Some(release) => Box::new(move |pause_ns| {
                let committed = job(pause_ns)?;
                release(id);
                Ok(committed)
            }),
            None => job,
        };
        let submitted = self
            .writer
            .as_ref()
            .is_some_and(|w| w.submit(id, pause.as_nanos() as u64, job));
        if !submitted {
            self.strategy.abort();
            self.lost(t, full, ctx.taken, &taken_regions);
            return Err(Fatal(
                EpochError::new(id, EpochFailure::ThreadGone("writer")).to_string(),
            ));
        }
        self.in_flight = Some(InFlight {
            id,
            parent: if full { None } else { self.parent },
            full,
            taken: ctx.taken,
            taken_regions,
            started,
            pause,
            vcpu_pause: cap.vcpu_pause,
        });
        Ok(())
    }
}

enum CaptureError {
    /// The epoch failed (the message names it); the run may go on.
    Failed(String),
    /// The engine cannot go on.
    Fatal(String),
}
use CaptureError::{Failed, Fatal};

impl Drop for SnapshotEngine {
    fn drop(&mut self) {
        self.strategy.shutdown();
        self.log.flush();
    }
}

impl Task for SnapshotEngine {
    fn due(&self) -> Option<Instant> {
        Some(self.next_due)
    }

    fn run(&mut self, m: &mut Machine) -> TaskFlow {
        self.tick(m)
    }
}
