//! The controller's view of a lazy restore's pager: stop the VM when the
//! pager fails (a page that fails its checksum is never installed), and
//! the pager's figures for the report.

use std::time::{Duration, Instant};

use snapshot::{LazyPager, LazyStats};
use vmm::machine::Machine;
use vmm::run::{Task, TaskFlow};

use crate::report::LazyFigures;

/// How often the controller looks at the pager while pages arrive.
const EVERY: Duration = Duration::from_millis(10);

/// A controller task over an optional pager.
pub struct Watch<'a> {
    pager: Option<&'a LazyPager>,
    next: Instant,
}

impl<'a> Watch<'a> {
    pub fn new(pager: Option<&'a LazyPager>) -> Self {
        Watch {
            pager,
            next: Instant::now() + EVERY,
        }
    }
}

impl Task for Watch<'_> {
    fn due(&self) -> Option<Instant> {
        // A pager thread can fail at any time: keep looking while there is
        // a pager.
        self.pager.map(|_| self.next)
    }

    fn run(&mut self, _m: &mut Machine) -> TaskFlow {
        self.next = Instant::now() + EVERY;
        match self.pager.and_then(LazyPager::failure) {
            Some(why) => TaskFlow::Stop(format!("lazy restore: {why}")),
            None => TaskFlow::Continue,
        }
    }
}

/// Seconds from the start of the restore until the guest's op counter
/// first moved: `progress` holds (ms since `sampled_from_s`, ops) samples.
pub fn first_op_s(progress: &[(u64, u64)], sampled_from_s: f64) -> Option<f64> {
    let first = progress.first()?.1;
    progress
        .iter()
        .find(|p| p.1 > first)
        .map(|p| sampled_from_s + p.0 as f64 / 1e3)
}

/// The report's figures from the pager's counters.
pub fn figures(s: &LazyStats) -> LazyFigures {
    LazyFigures {
        resident_s: s.resident_s,
        huge_s: s.huge_s,
        faults: s.faults,
        fault_pages: s.fault_pages,
        fill_pages: s.fill_pages,
        zero_pages: s.zero_pages,
        zero_regions: s.zero_regions,
        fault_p50_us: s.fault_us[0],
        fault_p99_us: s.fault_us[1],
        fault_max_us: s.fault_us[2],
    }
}
