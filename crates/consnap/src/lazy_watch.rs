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
pub struct Watch<'a>(pub Option<&'a LazyPager>);

impl Task for Watch<'_> {
    fn due(&self) -> Option<Instant> {
        // Failures can come at any time, also after the fill (a fault in a
        // page the fill could not read is not possible then, but a pager
        // thread can still die): keep looking while there is a pager.
        self.0.map(|_| Instant::now() + EVERY)
    }

    fn run(&mut self, _m: &mut Machine) -> TaskFlow {
        match self.0.and_then(LazyPager::failure) {
            Some(why) => TaskFlow::Stop(format!("lazy restore: {why}")),
            None => TaskFlow::Continue,
        }
    }
}

/// The report's figures from the pager's counters and the progress samples.
pub fn figures(s: &LazyStats, progress: &[(u64, u64)]) -> LazyFigures {
    let first = progress.first().map(|p| p.1);
    let first_op_s = first
        .and_then(|f| progress.iter().find(|p| p.1 > f))
        .map(|p| p.0 as f64 / 1e3);
    LazyFigures {
        resident_s: s.resident_s,
        first_op_s,
        faults: s.faults,
        fault_pages: s.fault_pages,
        fill_pages: s.fill_pages,
        zero_pages: s.zero_pages,
        fault_p50_us: s.fault_us[0],
        fault_p99_us: s.fault_us[1],
        fault_max_us: s.fault_us[2],
    }
}
