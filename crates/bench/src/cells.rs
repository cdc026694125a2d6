//! The results as cells (a workload, an interval, a mode, over its repeats),
//! each run's loss against its baseline, and the statistics of them.

use std::collections::BTreeMap;

use crate::matrix::Mode;
use crate::results::Record;

/// The newest record of each key.
pub(crate) fn latest(records: &[Record]) -> Vec<&Record> {
    let mut by_key: BTreeMap<&str, &Record> = BTreeMap::new();
    for r in records {
        by_key.insert(&r.key, r);
    }
    let mut out: Vec<&Record> = by_key.into_values().collect();
    out.sort_by_key(|r| (r.workload.clone(), r.interval_ms, r.mode.clone(), r.rep));
    out
}

/// The run without snapshots that `r` is compared with.
pub(crate) fn baseline<'a>(all: &[&'a Record], r: &Record) -> Option<&'a Record> {
    let base = Mode::parse(&r.mode)?.baseline().name();
    all.iter().copied().find(|b| {
        b.spec == r.spec
            && b.mode == base
            && b.rep == r.rep
            && b.mem == r.mem
            && b.vcpus == r.vcpus
            && b.error.is_none()
    })
}

/// Runs whose checksum (or whose restore's) is not the uninterrupted one.
pub fn wrong_checksums(records: &[Record]) -> Vec<&Record> {
    let all = latest(records);
    all.iter()
        .copied()
        .filter(|r| r.error.is_none())
        .filter(|r| {
            // A run stopped at its cap has no checksum of its own; its
            // restore is checked against the baseline's.
            let own = r.stopped_s.is_none()
                && baseline(&all, r).is_some_and(|b| b.checksum.is_some() && b.checksum != r.checksum);
            own || r.restore_ok == Some(false)
        })
        .collect()
}

/// One cell: a workload, an interval and a mode, over its repeats.
#[derive(Default)]
pub(crate) struct Cell<'a> {
    pub runs: Vec<&'a Record>,
    /// Extra time against the baseline of the same repeat (the guest's own
    /// run where both have it, else the command's wall time), %.
    pub loss: Vec<f64>,
    /// Extra busy vCPU time against the baseline (paced workloads), %.
    pub cpu: Vec<f64>,
    /// The baselines' times the losses were taken against, s.
    pub base_time: Vec<f64>,
    /// The baselines' busy vCPU times the CPU figures were taken against, s.
    pub base_busy: Vec<f64>,
    /// Runs stopped at the cap, whose loss is a lower bound.
    pub stopped: usize,
}

impl Cell<'_> {
    /// The loss, median and range; `> ` when a run was stopped at the cap
    /// (its loss is a lower bound, so the median is one too).
    pub(crate) fn loss_text(&self) -> String {
        let bound = if self.stopped > 0 { "> " } else { "" };
        format!("{bound}{}", pct(&self.loss))
    }

    /// The losses a cell is judged on: the CPU figures for a paced
    /// workload (when measured), the time losses otherwise.
    pub(crate) fn judged(&self, paced: bool) -> &[f64] {
        if paced && !self.cpu.is_empty() {
            &self.cpu
        } else {
            &self.loss
        }
    }
}

/// The smallest noise [`noise`] assumes for a workload, %.
pub(crate) const NOISE_FLOOR: f64 = 5.0;

/// The noise of `workload`'s timings on this machine, %: the widest spread
/// (max − min over the median) of one cell's baseline runs, over the
/// workload's cells with two or more repeats, and at least [`NOISE_FLOOR`].
pub(crate) fn noise(cells: &Cells, workload: &str) -> f64 {
    widest_spread(cells, workload, |c| &c.base_time)
}

/// The noise of a paced workload's CPU figure, %: the widest spread of one
/// cell's baseline busy times, at least [`NOISE_FLOOR`].
pub(crate) fn cpu_noise(cells: &Cells, workload: &str) -> f64 {
    widest_spread(cells, workload, |c| &c.base_busy)
}

/// The widest spread (max − min over the median, %) of the figures `of`
/// one of `workload`'s cells with two or more of them, at least
/// [`NOISE_FLOOR`].
fn widest_spread(cells: &Cells, workload: &str, of: impl for<'c> Fn(&'c Cell<'_>) -> &'c [f64]) -> f64 {
    cells
        .iter()
        .filter(|((w, _, _), c)| w == workload && of(c).len() >= 2)
        .filter_map(|(_, c)| {
            let xs = of(c);
            let m = median(xs).filter(|m| *m > 0.0)?;
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Some((hi - lo) / m * 100.0)
        })
        .fold(NOISE_FLOOR, f64::max)
}

pub(crate) fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub(crate) fn pct(xs: &[f64]) -> String {
    let Some(m) = median(xs) else {
        return "—".into();
    };
    if xs.len() == 1 {
        return format!("{m:+.1}%");
    }
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:+.1}% ({lo:+.0}…{hi:+.0}, n={})", xs.len())
}

pub(crate) fn interval(ms: u64) -> String {
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

pub(crate) type Cells<'a> = BTreeMap<(String, u64, Mode), Cell<'a>>;

pub(crate) fn cells<'a>(all: &[&'a Record]) -> Cells<'a> {
    let mut out: Cells<'a> = BTreeMap::new();
    for &r in all.iter().filter(|r| r.error.is_none()) {
        let Some(mode) = Mode::parse(&r.mode) else { continue };
        let c = out.entry((r.workload.clone(), r.interval_ms, mode)).or_default();
        c.runs.push(r);
        c.stopped += usize::from(r.stopped_s.is_some());
        if let Some(b) = baseline(all, r).filter(|_| mode.snapshots()) {
            // The guest's own run where both have it, else the command's.
            let (t, tb) = match (r.run_s, b.run_s) {
                (Some(t), Some(tb)) if tb > 0.0 => (t, tb),
                _ => (r.wall_s, b.wall_s),
            };
            c.loss.push((t / tb - 1.0) * 100.0);
            c.base_time.push(tb);
            if let (Some(x), Some(y)) = (r.busy_s, b.busy_s) {
                c.cpu.push((x / y - 1.0) * 100.0);
                c.base_busy.push(y);
            }
        }
    }
    out
}
