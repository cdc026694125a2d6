//! `cow`: the ConSnap pipeline. While paused, capture the state, find the
//! pages written since the last epoch and write-protect them (in blocks and
//! merged runs); resume at once. The saver (on the writer thread) then saves
//! the protected pages while the guest runs, and the fault handler thread
//! copies a page aside before the guest may write it. The first epoch is
//! full, saved the same way. Which pages were written comes from a
//! [`Tracker`]: write protection itself (the default) or KVM's dirty log.
//!
//! Host requirements: userfaultfd with write-protect and
//! `UFFD_FEATURE_WP_UNPOPULATED`, created without the user-mode-only flag
//! (KVM's own accesses to guest memory fault too).

mod arming;
mod hashes;
mod saver;
mod shared;
mod slab;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

#[cfg(feature = "testing")]
pub use shared::CowTestHooks;
pub use shared::{CowOptions, Tracker};
use store::Mode;
use uffd::{Uffd, feature};
use vmm::dirty::{DirtySet, PageBits};
use vmm_sys_util::eventfd::EventFd;

use self::shared::CowState;
use crate::capture::adapt::{CostModel, EpochChoice, Observed};
use crate::capture::error::{EpochFailure, SnapshotError};
use crate::capture::hot::Hotness;
use crate::capture::job::{Committed, EpochStats, JobFn};
use crate::capture::strategy::{EpochCtx, Strategy};
use crate::capture::target::Target;
use crate::capture::worker::{self, Health};

/// The `cow` strategy.
pub(crate) struct Cow {
    opts: CowOptions,
    shared: Option<Arc<CowState>>,
    stop: Option<EventFd>,
    handler: Option<JoinHandle<()>>,
    scratch: Arc<Mutex<Vec<saver::Buffers>>>,
    hot: Option<Hotness>,
    /// `Tracker::Uffd`: the pages populated when tracking started.
    written_before: Option<DirtySet>,
    /// The tracker in use.
    tracker: Tracker,
    /// `--cow-tracker auto`: the cost model.
    model: Option<CostModel>,
    /// What the model will learn from the incremental epoch in flight.
    flight: Option<InFlight>,
    /// Epochs the model learned from.
    learned: u64,
    /// When the last epoch's pause began, and the time from it to this one's.
    last_pause: Option<Instant>,
    cur_span: std::time::Duration,
}

/// The incremental epoch in flight, for the cost model.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    tracker: Tracker,
    /// Committed.
    ok: bool,
    /// Dirty-log epochs: pages found dirty.
    pages: u64,
    /// Blocks written (uffd) or spanned by the dirty pages (dirty log).
    blocks: u64,
    pause_pages: u64,
    pause_copy_time: std::time::Duration,
    /// Time since the pause before.
    span: std::time::Duration,
    /// The interval asked for at its pause.
    interval: std::time::Duration,
}

impl Cow {
    pub(crate) fn new(opts: CowOptions) -> Cow {
        Cow {
            shared: None,
            stop: None,
            handler: None,
            scratch: Arc::default(),
            hot: None,
            written_before: None,
            tracker: opts.tracker,
            model: opts.adapt.map(CostModel::new),
            flight: None,
            learned: 0,
            last_pause: None,
            cur_span: std::time::Duration::ZERO,
            opts,
        }
    }

    /// Check that this host can run the cow engine (used for a clear error up front).
    pub fn probe() -> Result<(), uffd::UffdError> {
        Uffd::new(feature::PAGEFAULT_FLAG_WP | feature::WP_UNPOPULATED).map(drop)
    }
}

impl Strategy for Cow {
    fn mode(&self) -> Mode {
        Mode::Cow
    }

    fn prepare(&mut self, t: &mut dyn Target, health: &Arc<Health>) -> Result<(), SnapshotError> {
        let ram = t.ram().clone();
        let thread_err = |source| SnapshotError::Thread {
            thread: "fault handler",
            source,
        };
        let (u, faults) = match &self.opts.lazy {
            // A lazily restored VM: its pager reads the one userfaultfd and
            // forwards write-protect faults here.
            Some(link) => {
                let queue = Arc::new(Mutex::new(Vec::new()));
                let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err)?;
                link.set_sink(Some(crate::restore::lazy::WpSink {
                    queue: queue.clone(),
                    wake: wake.try_clone().map_err(thread_err)?,
                }));
                (link.uffd(), shared::Faults::Forwarded(queue, wake))
            }
            None => {
                let u = Uffd::new(feature::PAGEFAULT_FLAG_WP | feature::WP_UNPOPULATED).map_err(SnapshotError::Cow)?;
                for r in ram.ranges() {
                    u.register(ram.host_ptr(r) as u64, r.len, uffd::Mode::WriteProtect)
                        .map_err(SnapshotError::Cow)?;
                }
                (Arc::new(u), shared::Faults::Uffd)
            }
        };
        if self.opts.tracker == Tracker::DirtyLog || self.opts.adapt.is_some() {
            // Manual re-arming must be asked for before KVM logs anything.
            if let Some(policy) = self.opts.hot
                && t.set_manual_rearm()?
            {
                self.hot = Some(Hotness::new(policy));
            }
        }
        match self.opts.tracker {
            Tracker::DirtyLog => {
                t.set_dirty_logging(true)?;
            }
            Tracker::Uffd => {
                // The pages written so far; every other page is zero.
                self.written_before = Some(DirtySet {
                    ranges: ram
                        .ranges()
                        .iter()
                        .map(|r| crate::pages::may_hold_data(&ram, r))
                        .collect(),
                });
                // Map every page that is not populated yet to the (huge)
                // zero page, so that write protection covers all of RAM at
                // the PMD level: protecting a never-populated range would
                // need small-page markers and split the huge pages to come.
                // (Not while a lazy restore fills RAM: that would wait for
                // every page; its pages are small ones anyway.)
                if !ram.on_demand() {
                    for r in ram.ranges() {
                        populate_read(ram.host_ptr(r), r.len);
                    }
                }
            }
        }
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err);
        let shared = Arc::new(CowState::new(u, ram, self.opts.clone(), evt()?));
        let protect = || {
            if self.opts.tracker == Tracker::Uffd {
                // From now on every write is seen: the first (full) epoch then
                // reads only the pages written before and the blocks written
                // since, and knows the rest is zero without reading it.
                shared.protect_all()
            } else {
                Ok(())
            }
        };
        match &self.opts.lazy {
            // Pages still to arrive come write-protected from now on (one
            // the guest writes before the saver has it must fault), and
            // none arrives unprotected after RAM was protected.
            Some(link) => link.protect_installs(true, protect),
            None => protect(),
        }
        .map_err(SnapshotError::Cow)?;
        let stop = evt()?;
        let stop2 = stop.try_clone().map_err(thread_err)?;
        let sh = shared.clone();
        let handler = worker::spawn("faults", worker::HANDLER_NICE, health.clone(), move |ready| {
            shared::handle_faults(&sh, &faults, &stop2, ready);
        })?;
        self.shared = Some(shared);
        self.stop = Some(stop);
        self.handler = Some(handler);
        Ok(())
    }

    fn paused(&mut self, t: &mut dyn Target, ctx: &mut EpochCtx) -> Result<JobFn, EpochFailure> {
        let shared = self.shared.clone().ok_or(EpochFailure::ThreadGone("fault handler"))?;
        let t0 = Instant::now();
        self.cur_span = self.span(t0);
        // Learn from the last epoch (its counters), then start this one's.
        let next = self.learn(&shared);
        shared.counters.reset();
        let mut choice = self.model.as_ref().map(|m| EpochChoice {
            tracker: self.tracker,
            copied_in_pause: false,
            switched: false,
            predicted: m.last,
            span: self.cur_span,
        });
        if !ctx.meta.full && next != self.tracker {
            if let Some(c) = &mut choice {
                c.switched = true;
                c.tracker = next;
            }
            return self.switch(t, ctx, shared, next, t0, choice);
        }
        if self.tracker == Tracker::Uffd {
            shared.save_as(Tracker::Uffd);
            return self.paused_uffd(t, ctx, shared, t0, choice);
        }
        shared.save_as(Tracker::DirtyLog);
        self.paused_dirty_log(t, ctx, shared, t0, choice)
    }

    fn finished(&mut self, ok: bool) {
        if let Some(f) = &mut self.flight {
            f.ok = ok;
        }
        let Some(s) = &self.shared else { return };
        let saved_as = s.saving_as();
        if !s.keeps_hashes() {
            return;
        }
        let mut h = s.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            h.commit();
        } else {
            // The table keeps describing the last committed epoch.
            h.discard();
            drop(h);
            if saved_as == Tracker::Uffd {
                // Every block is examined again next time.
                s.release_all();
            }
        }
    }

    fn abort(&mut self) {
        if let Some(s) = &self.shared {
            s.release_all();
        }
    }

    fn shutdown(&mut self) {
        if let Some(link) = &self.opts.lazy {
            // Pages arrive writable again, and a write-protect fault only
            // lifts the protection; then every protection goes.
            link.protect_installs(false, || ());
            link.set_sink(None);
        }
        if let Some(s) = &self.shared {
            s.release_all();
        }
        if let Some(stop) = &self.stop {
            let _ = stop.write(1);
        }
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        self.shared = None;
    }
}

/// `MADV_POPULATE_READ`: map missing pages (the zero page) without writing them.
fn populate_read(start: *mut u8, len: u64) {
    const MADV_POPULATE_READ: libc::c_int = 22;
    // SAFETY: advice over guest RAM, which is mapped for the whole range;
    // reading populates zero pages and changes no contents. Failure (an old
    // kernel) leaves pages unpopulated: they are then protected as markers.
    unsafe { libc::madvise(start.cast(), len as usize, MADV_POPULATE_READ) };
}

impl Cow {
    /// While paused, under `Tracker::Uffd`: every block written since the
    /// last epoch (no longer protected) is pending and protected again; the
    /// first epoch takes all of RAM.
    fn paused_uffd(
        &mut self,
        t: &mut dyn Target,
        ctx: &mut EpochCtx,
        shared: Arc<CowState>,
        t0: Instant,
        choice: Option<EpochChoice>,
    ) -> Result<JobFn, EpochFailure> {
        if !ctx.meta.full {
            // The blocks written since the last epoch, and no bitmap of all
            // of RAM (see `arming`). VMM writes went through protected pages
            // too, so vm-memory's bitmap is not needed (a full epoch clears
            // it). A failure hands nothing back: it releases every block,
            // and the next epoch examines them all against the last commit.
            ctx.taken = Some(DirtySet::default());
            let mut blocks = shared.unarmed_blocks();
            let t1 = Instant::now();
            // Hot blocks: copied now and left writable (they are examined
            // again next epoch whatever happens to them).
            shared.copy_hot(&mut blocks, self.opts.pause_copy_budget);
            self.flight = Some(InFlight {
                tracker: Tracker::Uffd,
                ok: false,
                pages: 0,
                blocks: blocks.iter().map(PageBits::count).sum(),
                pause_pages: 0,
                pause_copy_time: std::time::Duration::ZERO,
                span: self.cur_span,
                interval: ctx.interval,
            });
            let calls = shared.arm_blocks(&blocks)?;
            return Ok(self.job(ctx, shared, calls, t1 - t0, t1.elapsed(), choice));
        }
        self.flight = None;
        drop(t.take_dirty()?);
        // Written before tracking started, or in a block written since;
        // the saver records every other page as zero.
        let mut pages = shared.unarmed_pages();
        match self.written_before.take() {
            Some(w) => pages.or(&w),
            None => pages = DirtySet::all(t.ram().ranges()),
        }
        let t1 = Instant::now();
        let calls = shared.arm(&pages)?;
        Ok(self.job(ctx, shared, calls, t1 - t0, t1.elapsed(), choice))
    }

    /// While paused, under `Tracker::DirtyLog`: the pages KVM logged (a
    /// full epoch: every populated page), copied now when the cost model
    /// says they are few enough, otherwise write-protected.
    fn paused_dirty_log(
        &mut self,
        t: &mut dyn Target,
        ctx: &mut EpochCtx,
        shared: Arc<CowState>,
        t0: Instant,
        mut choice: Option<EpochChoice>,
    ) -> Result<JobFn, EpochFailure> {
        let taken = t.take_dirty()?;
        // Re-protect the pages worth tracking (all of them, without a policy).
        if let Some(h) = &mut self.hot {
            t.rearm_dirty(&h.rearm(&taken))?;
        }
        self.flight = None;
        if ctx.meta.full {
            // Every populated page; the rest is zero at this instant, and
            // is not write-protected: a protected unpopulated page would be
            // faulted in later as a small page, splitting the huge pages
            // the guest has not touched yet.
            let ram = t.ram();
            let pages = DirtySet {
                ranges: ram
                    .ranges()
                    .iter()
                    .map(|r| crate::pages::may_hold_data(ram, r))
                    .collect(),
            };
            let t1 = Instant::now();
            let calls = shared.arm(&pages)?;
            return Ok(self.job(ctx, shared, calls, t1 - t0, t1.elapsed(), choice));
        }
        let interval = ctx.interval;
        // Kept for a failure to hand back.
        let pages: &DirtySet = ctx.taken.insert(taken);
        // Only the cost model looks at the set's size (each count walks a
        // bitmap of all RAM).
        let mut flight = self.model.as_ref().map(|m| {
            let f = InFlight {
                tracker: Tracker::DirtyLog,
                ok: false,
                pages: pages.count(),
                blocks: shared.blocks_of(pages),
                pause_pages: 0,
                pause_copy_time: std::time::Duration::ZERO,
                span: self.cur_span,
                interval,
            };
            (m.pause_pages(), f)
        });
        let t1 = Instant::now();
        // A small dirty set is copied now, as stop-copy does: no
        // protection, no fault, a pause longer by about a µs a page.
        let calls = match &mut flight {
            Some((budget, f)) if f.pages <= *budget && shared.copy_pages(pages) => {
                f.pause_pages = f.pages;
                f.pause_copy_time = t1.elapsed();
                if let Some(c) = &mut choice {
                    c.copied_in_pause = true;
                }
                0
            }
            _ => shared.arm(pages)?,
        };
        self.flight = flight.map(|(_, f)| f);
        Ok(self.job(ctx, shared, calls, t1 - t0, t1.elapsed(), choice))
    }

    /// `--cow-tracker auto`: what the last epoch cost, told to the model
    /// (only a committed incremental epoch teaches it); the tracker for
    /// the next epoch.
    fn learn(&mut self, shared: &CowState) -> Tracker {
        let (Some(model), Some(f)) = (&mut self.model, self.flight.take()) else {
            return self.tracker;
        };
        if !f.ok || f.tracker != self.tracker {
            return self.tracker;
        }
        let c = &shared.counters;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let seen = Observed {
            pages: match f.tracker {
                Tracker::Uffd => ld(&c.kept),
                Tracker::DirtyLog => f.pages,
            },
            blocks: f.blocks,
            faults: ld(&c.faults),
            fault_time: std::time::Duration::from_nanos(ld(&c.fault_ns)),
            pause_pages: f.pause_pages,
            pause_copy_time: f.pause_copy_time,
            span: f.span,
        };
        let next = model.observe(f.tracker, &seen, f.interval);
        self.learned += 1;
        match self.opts.flip_tracker_every() {
            0 => next,
            n if self.learned.is_multiple_of(u64::from(n)) => match self.tracker {
                Tracker::Uffd => Tracker::DirtyLog,
                Tracker::DirtyLog => Tracker::Uffd,
            },
            _ => self.tracker,
        }
    }

    /// Time since the last pause began (the epoch's span); `now` begins this one.
    fn span(&mut self, now: Instant) -> std::time::Duration {
        let span = self.last_pause.map_or(std::time::Duration::ZERO, |t| now - t);
        self.last_pause = Some(now);
        span
    }

    /// While paused: an incremental epoch that moves to tracker `next`.
    fn switch(
        &mut self,
        t: &mut dyn Target,
        ctx: &mut EpochCtx,
        shared: Arc<CowState>,
        next: Tracker,
        t0: Instant,
        choice: Option<EpochChoice>,
    ) -> Result<JobFn, EpochFailure> {
        tracing::debug!(
            "cow: switching to the {next:?} tracker ({:?})",
            choice.map(|c| c.predicted)
        );
        // (`learn` took the last epoch's flight: none is in flight now.)
        match next {
            Tracker::DirtyLog => {
                // This epoch is the blocks written since the last one, saved
                // as uffd saves them; KVM logs every write from now on. Its
                // blocks stay protected until a dirty-log saver lifts them.
                // Should it fail, the blocks it held are known nowhere else:
                // no dirty set to hand back, so the next epoch is full.
                t.set_dirty_logging(true)?;
                self.tracker = Tracker::DirtyLog;
                shared.save_as(Tracker::Uffd);
                let job = self.paused_uffd(t, ctx, shared, t0, choice);
                ctx.taken = None;
                self.flight = None;
                job
            }
            Tracker::Uffd => {
                // This epoch is the pages the log found, saved as uffd saves
                // them (compared with their hashes, which the dirty-log
                // epochs kept up to date); all of RAM is protected again
                // first, so that every write from now on is seen, and KVM
                // stops logging (and maps huge pages again).
                shared.save_as(Tracker::Uffd);
                // Kept for a failure to hand back.
                let taken = ctx.taken.insert(t.take_dirty()?);
                t.set_dirty_logging(false)?;
                shared.protect_all()?;
                self.tracker = Tracker::Uffd;
                let t1 = Instant::now();
                let calls = shared.arm(taken)?;
                Ok(self.job(ctx, shared, calls, t1 - t0, t1.elapsed(), choice))
            }
        }
    }

    /// The background part: save the armed pages and commit.
    fn job(
        &self,
        ctx: &mut EpochCtx,
        shared: Arc<CowState>,
        calls: u64,
        dirty_time: std::time::Duration,
        capture_time: std::time::Duration,
        choice: Option<EpochChoice>,
    ) -> JobFn {
        let file = ctx.take_file();
        let pool = self.scratch.clone();
        Box::new(move |pause_ns| {
            shared.start_capture();
            let started = Instant::now();
            let mut bufs = pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_else(saver::Buffers::new);
            let r = saver::save_epoch(&shared, file, &mut bufs, pause_ns);
            pool.lock().unwrap_or_else(|p| p.into_inner()).push(bufs);
            let c = &shared.counters;
            let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            Ok(Committed {
                info: r?,
                stats: EpochStats {
                    faults: ld(&c.faults),
                    pages_copied_aside: ld(&c.copied),
                    pages_captured: ld(&c.captured),
                    aside_waits: ld(&c.waits),
                    protect_calls: calls,
                    dirty_time,
                    capture_time,
                    save_time: started.elapsed(),
                    pages_examined: ld(&c.examined),
                    pages_in_pause: ld(&c.in_pause),
                    tracking_faults: ld(&c.spurious),
                    fault_time: std::time::Duration::from_nanos(ld(&c.fault_ns)),
                    fault_max: std::time::Duration::from_nanos(ld(&c.fault_max_ns)),
                    choice,
                },
            })
        })
    }
}

impl Drop for Cow {
    fn drop(&mut self) {
        self.shutdown();
    }
}
