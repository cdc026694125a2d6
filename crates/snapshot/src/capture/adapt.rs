//! The cost model of the adaptive `cow` engine (`--cow-tracker auto`).
//!
//! Two ways to learn which pages an epoch must save cost the guest very
//! different amounts depending on how it writes:
//! - **uffd** (write protection per 2 MiB block): one fault per block the
//!   guest writes in an epoch, served in user space (measured here: about
//!   33 µs of handler work per tracking fault, up to 400 µs when the block
//!   has pages to copy aside, plus about 110 µs for the woken vCPU to run
//!   again and KVM mapping the block anew); huge pages stay whole.
//! - **dirty-log** (KVM's dirty log, per 4 KiB page): one fault per page,
//!   served inside KVM (6.7-11 µs here); the pages of a small dirty set are
//!   copied during the pause (like stop-copy, no protection, no fault), a
//!   large one is write-protected and saved copy-on-write.
//!
//! A guest writing a few pages in many blocks (a paced or sparse writer)
//! pays a fault per block under uffd and one per page under the dirty log:
//! 50 random writes an epoch cost about 45 uffd faults (10+ ms) or 50
//! dirty-log faults (0.5 ms). A guest rewriting whole blocks pays a fault
//! per block under uffd and 512 under the dirty log. The model predicts,
//! from the last epoch, what each tracker would have cost the vCPUs, and
//! the engine switches (at a pause) when the other is predicted to cost
//! less than half for several epochs in a row.

use std::time::Duration;

/// How `cow` learns which pages changed since the last epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracker {
    /// Write protection itself: all of RAM stays write-protected between
    /// epochs, so the first write to a block faults and marks it written;
    /// a written block's pages are compared with their hashes at the last
    /// epoch, and only changed pages are saved. No KVM dirty logging, so
    /// KVM keeps mapping huge pages.
    Uffd,
    /// KVM's dirty log, re-armed on cold regions only; each epoch
    /// write-protects and saves exactly the logged pages.
    DirtyLog,
}

/// The model's constants (host measurements) and switching rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptPolicy {
    /// vCPU time of one KVM dirty-log fault (this host: 6.7-11 µs).
    pub dirty_log_fault: Duration,
    /// What a userfaultfd fault costs the vCPU beyond the handler's work:
    /// the wake-up and KVM mapping the block again (this host: ~110 µs).
    pub uffd_wake: Duration,
    /// A dirty-log epoch copies its pages during the pause when that is
    /// predicted to take no longer than this; otherwise it protects them.
    pub pause_copy: Duration,
    /// Switch when the other tracker is predicted to cost less than this
    /// fraction of the current one ...
    pub switch_ratio: f64,
    /// ... in this many epochs in a row, counted from ...
    pub streak: u32,
    /// ... this many epochs after the last switch (or the start).
    pub dwell: u32,
}

impl Default for AdaptPolicy {
    fn default() -> Self {
        AdaptPolicy {
            dirty_log_fault: Duration::from_micros(10),
            uffd_wake: Duration::from_micros(110),
            pause_copy: Duration::from_micros(500),
            switch_ratio: 0.8,
            streak: 3,
            dwell: 8,
        }
    }
}

/// What one committed epoch showed, for the model.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Observed {
    /// Pages the epoch saved as changed (uffd) or found dirty (dirty log).
    pub pages: u64,
    /// Distinct 2 MiB blocks those pages (or the written blocks) span.
    pub blocks: u64,
    /// Write-protect faults served, and the handler's time on them.
    pub faults: u64,
    pub fault_time: Duration,
    /// Pages copied during the pause, and the time it took.
    pub pause_pages: u64,
    pub pause_copy_time: Duration,
    /// How long the guest wrote them: the time between the epoch's pause
    /// and the one before (longer than the interval when saving lagged).
    pub span: Duration,
}

/// Predicted vCPU cost under each tracker, µs per second of guest time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prediction {
    pub uffd_us_per_s: f64,
    pub dirty_log_us_per_s: f64,
}

/// The model's state, kept by the `cow` strategy.
#[derive(Debug)]
pub(crate) struct CostModel {
    policy: AdaptPolicy,
    /// Handler time per uffd fault, µs (moving average of what was measured).
    fault_us: f64,
    /// Pause copy time per page, µs (moving average).
    copy_us: f64,
    /// Of the blocks a dirty-log epoch protected, the share the guest wrote
    /// before the saver lifted them (moving average; 1 until measured).
    fault_share: f64,
    /// Epochs in a row in which the other tracker looked cheaper.
    streak: u32,
    /// Epochs since the last switch.
    since_switch: u32,
    /// The last prediction.
    pub last: Prediction,
}

impl CostModel {
    pub(crate) fn new(policy: AdaptPolicy) -> CostModel {
        CostModel {
            policy,
            fault_us: 250.0,
            copy_us: 0.7,
            fault_share: 1.0,
            streak: 0,
            since_switch: 0,
            last: Prediction::default(),
        }
    }

    /// Pages a dirty-log epoch may copy during the pause.
    pub(crate) fn pause_pages(&self) -> u64 {
        (self.policy.pause_copy.as_secs_f64() * 1e6 / self.copy_us.max(0.05)) as u64
    }

    /// Learn from the epoch just saved under `tracker`; returns the
    /// tracker the next epoch should use.
    pub(crate) fn observe(&mut self, tracker: Tracker, o: &Observed, interval: Duration) -> Tracker {
        let ewma = |old: f64, new: f64| 0.75 * old + 0.25 * new;
        if o.faults > 0 {
            self.fault_us = ewma(self.fault_us, o.fault_time.as_secs_f64() * 1e6 / o.faults as f64);
        }
        if o.pause_pages >= 16 {
            self.copy_us = ewma(
                self.copy_us,
                o.pause_copy_time.as_secs_f64() * 1e6 / o.pause_pages as f64,
            );
        }
        let per_fault = self.fault_us + self.policy.uffd_wake.as_secs_f64() * 1e6;
        let dl_fault = self.policy.dirty_log_fault.as_secs_f64() * 1e6;
        // Costs are compared per second of guest time, over the time the
        // epoch's writes took (its span): under uffd a saver that cannot
        // keep up stretches epochs, and then a block rewritten many times
        // costs one fault for the whole longer epoch, where the dirty log
        // would charge every page it is asked to track again each epoch.
        let span = o.span.max(interval).as_secs_f64().max(1e-3);
        // What one epoch at the interval asked for would hold, for the
        // pause-copy choice: fewer pages than a late epoch, as many blocks.
        let on_time = o.pages as f64 * interval.as_secs_f64() / span;
        let pages = o.pages as f64;
        let blocks = (o.blocks as f64).min(pages.max(1.0));
        let faults = (o.faults as f64).min(pages.max(1.0));
        let per_s = |us: f64| us / span;
        let p = Prediction {
            // Measured while under uffd: every fault the guest took.
            uffd_us_per_s: per_s(match tracker {
                Tracker::Uffd => faults * per_fault,
                Tracker::DirtyLog => blocks * per_fault,
            }),
            dirty_log_us_per_s: per_s(if on_time <= self.pause_pages() as f64 {
                pages * (dl_fault + self.copy_us)
            } else {
                // Too many to copy in the pause: protected, and the blocks
                // written again before the saver lifted them fault too.
                pages * dl_fault + blocks * self.fault_share * per_fault
            }),
        };
        self.last = p;
        self.since_switch = self.since_switch.saturating_add(1);
        let (cur, other, next) = match tracker {
            Tracker::Uffd => (p.uffd_us_per_s, p.dirty_log_us_per_s, Tracker::DirtyLog),
            Tracker::DirtyLog => (p.dirty_log_us_per_s, p.uffd_us_per_s, Tracker::Uffd),
        };
        // Epochs right after a switch (or the start) do not count: the
        // guest's writing there is not what it settles to.
        if other < cur * self.policy.switch_ratio && self.since_switch > self.policy.dwell {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        if self.streak >= self.policy.streak {
            self.streak = 0;
            self.since_switch = 0;
            return next;
        }
        tracker
    }
}

/// What the adaptive engine chose for one epoch (its report line).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochChoice {
    /// The tracker that found this epoch's pages (after a switch: the new one).
    pub tracker: Tracker,
    /// A dirty-log epoch whose pages were all copied during the pause.
    pub copied_in_pause: bool,
    /// The engine switched trackers at this epoch's pause.
    pub switched: bool,
    /// What the model predicted, from the epoch before, for either tracker.
    pub predicted: Prediction,
    /// The time from the pause before to this epoch's.
    pub span: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    const IV: Duration = Duration::from_millis(20);

    fn uffd_epoch(faults: u64, pages: u64, blocks: u64) -> Observed {
        Observed {
            pages,
            blocks,
            faults,
            fault_time: Duration::from_micros(150 * faults),
            ..Observed::default()
        }
    }

    #[test]
    fn a_sparse_writer_moves_to_the_dirty_log_after_the_streak() {
        let mut m = CostModel::new(AdaptPolicy::default());
        // 50 pages in 45 blocks an epoch: 45 faults under uffd.
        let mut t = Tracker::Uffd;
        let mut switched_at = None;
        for e in 1..=20 {
            t = m.observe(t, &uffd_epoch(45, 50, 45), IV);
            if t == Tracker::DirtyLog {
                switched_at = Some(e);
                break;
            }
        }
        assert_eq!(switched_at, Some(11), "after the dwell and the streak: {:?}", m.last);
        assert!(m.last.dirty_log_us_per_s < m.last.uffd_us_per_s / 10.0, "{:?}", m.last);
    }

    #[test]
    fn a_dense_writer_stays_on_uffd_and_returns_to_it() {
        let mut m = CostModel::new(AdaptPolicy::default());
        // 33,000 pages in 128 blocks an epoch.
        for _ in 0..50 {
            assert_eq!(
                m.observe(Tracker::Uffd, &uffd_epoch(128, 33_000, 128), IV),
                Tracker::Uffd
            );
        }
        // Under the dirty log, the same writer: back to uffd.
        let mut m = CostModel::new(AdaptPolicy::default());
        let dl = Observed {
            pages: 33_000,
            blocks: 128,
            ..Observed::default()
        };
        let mut t = Tracker::DirtyLog;
        for _ in 0..12 {
            t = m.observe(t, &dl, IV);
        }
        assert_eq!(t, Tracker::Uffd, "{:?}", m.last);
    }

    #[test]
    fn a_writer_between_the_two_does_not_flap() {
        let mut m = CostModel::new(AdaptPolicy::default());
        // build-like: 700 pages in 6 blocks.
        let mut t = Tracker::Uffd;
        let mut switches = 0;
        for _ in 0..200 {
            let next = m.observe(t, &uffd_epoch(6, 700, 6), IV);
            switches += u32::from(next != t);
            t = next;
        }
        assert_eq!((t, switches), (Tracker::Uffd, 0), "{:?}", m.last);
    }

    #[test]
    fn a_dense_writer_whose_uffd_epochs_come_late_stays_on_uffd() {
        // Figure 1's load: 128,000 random writes/s over 128 blocks, 20 ms
        // asked. The uffd saver cannot keep up and epochs come every
        // 150 ms with 17,000 pages, the guest faulting 78 times an epoch;
        // the dirty log would charge a fault per page: 1.1 s a second.
        let mut m = CostModel::new(AdaptPolicy::default());
        let late = Observed {
            span: Duration::from_millis(150),
            ..uffd_epoch(78, 17_000, 128)
        };
        for _ in 0..30 {
            assert_eq!(m.observe(Tracker::Uffd, &late, IV), Tracker::Uffd, "{:?}", m.last);
        }
        assert!(m.last.dirty_log_us_per_s > 5.0 * m.last.uffd_us_per_s, "{:?}", m.last);
        // A sparse writer's late epochs still move it.
        let mut m = CostModel::new(AdaptPolicy::default());
        let sparse = Observed {
            span: Duration::from_millis(60),
            ..uffd_epoch(100, 150, 100)
        };
        let mut t = Tracker::Uffd;
        for _ in 0..12 {
            t = m.observe(t, &sparse, IV);
        }
        assert_eq!(t, Tracker::DirtyLog, "{:?}", m.last);
    }

    #[test]
    fn pause_copies_are_learned() {
        let mut m = CostModel::new(AdaptPolicy::default());
        let before = m.pause_pages();
        let slow = Observed {
            pause_pages: 100,
            pause_copy_time: Duration::from_micros(500),
            ..Observed::default()
        };
        for _ in 0..20 {
            m.observe(Tracker::DirtyLog, &slow, IV);
        }
        assert!(m.pause_pages() < before / 3, "{} -> {}", before, m.pause_pages());
    }
}
