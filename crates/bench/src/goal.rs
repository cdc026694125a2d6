//! The adaptive engine's goal, cell by cell: cow's loss against the better
//! of the two stop-and-copy baselines (incremental `stop-copy`, full
//! `stop-copy-full`), whichever lost less in that cell.
//!
//! The goal: cow loses no more than the better baseline wherever the
//! difference is above the workload's noise, and at most 0.3 of it
//! wherever the better baseline loses more than [`BIG_LOSS`] %. A paced
//! workload's losses are its busy-vCPU growth, an all-out one's its wall
//! time.

use std::fmt::Write as _;

use crate::cells::{Cell, Cells, interval, median};
use crate::matrix::Mode;

/// Where the better baseline loses more than this (%), cow must lose at
/// most [`BIG_RATIO`] of it.
pub(crate) const BIG_LOSS: f64 = 20.0;
pub(crate) const BIG_RATIO: f64 = 0.3;

/// One cell's comparison.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    /// The better baseline and its median loss, %.
    pub base: Mode,
    pub base_loss: f64,
    /// Whether that median is a lower bound (runs stopped at the cap).
    pub base_bound: bool,
    pub cow_loss: f64,
    pub cow_bound: bool,
    /// The goal that applies: 1.0, or [`BIG_RATIO`].
    pub goal: f64,
    pub met: bool,
}

/// The loss a cell's comparison uses: CPU growth for a paced workload.
fn loss(c: &Cell, paced: bool) -> Option<f64> {
    median(c.judged(paced))
}

/// cow against the better of `sc` and `full` in one cell; `noise` in %.
pub(crate) fn verdict(sc: Option<&Cell>, full: Option<&Cell>, cow: &Cell, noise: f64, paced: bool) -> Option<Verdict> {
    let y = loss(cow, paced)?;
    let (base, x, bound) = [(Mode::StopCopy, sc), (Mode::StopCopyFull, full)]
        .into_iter()
        .filter_map(|(m, c)| Some((m, loss(c?, paced)?, c?.stopped > 0)))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    let cow_bound = cow.stopped > 0;
    let (goal, met) = if x > BIG_LOSS {
        // A baseline stopped at the cap lost at least x: the goal holds
        // against the bound only if it holds against x.
        (BIG_RATIO, !cow_bound && y <= BIG_RATIO * x)
    } else {
        (1.0, !cow_bound && y - x <= noise)
    };
    Some(Verdict {
        base,
        base_loss: x,
        base_bound: bound,
        cow_loss: y,
        cow_bound,
        goal,
        met,
    })
}

/// The section of the report: one row per workload and interval where cow
/// and a baseline ran, and the count of cells that meet the goal.
/// `noise(workload, paced)` gives the workload's noise in %.
pub(crate) fn section(d: &mut String, cells: &Cells, workloads: &[(String, bool)], noise: &dyn Fn(&str, bool) -> f64) {
    let mut rows = Vec::new();
    for (w, paced) in workloads {
        let n = noise(w, *paced);
        for ((_, ms, _), cow) in cells.iter().filter(|(k, _)| &k.0 == w && k.2 == Mode::Cow) {
            let get = |m: Mode| cells.get(&(w.clone(), *ms, m));
            if let Some(v) = verdict(get(Mode::StopCopy), get(Mode::StopCopyFull), cow, n, *paced) {
                rows.push((w.as_str(), *ms, *paced, n, v));
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    let met = rows.iter().filter(|r| r.4.met).count();
    let _ = writeln!(d, "## cow against the better baseline\n");
    let _ = writeln!(
        d,
        "In each cell the better baseline is whichever of stop-copy and stop-copy-full lost less (median). The goal: cow \
         loses no more than it where the difference is above the workload's noise, and at most {BIG_RATIO} of it where it \
         loses more than {BIG_LOSS:.0}%. Losses are CPU growth for the paced workloads (noise: the spread of their baselines' \
         busy vCPU time), wall time otherwise. `>`: a lower bound (runs stopped at the cap). **{met} of {} cells meet the \
         goal.**\n",
        rows.len()
    );
    let _ = writeln!(
        d,
        "| workload | interval | better baseline | its loss | cow | cow / better | goal | noise | met |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (w, ms, paced, n, v) in rows {
        let b = |bound: bool| if bound { "> " } else { "" };
        let ratio = if v.base_loss > 0.0 {
            format!("{:.2}", v.cow_loss / v.base_loss)
        } else {
            "—".into()
        };
        let _ = writeln!(
            d,
            "| {w} | {} | {} | {}{:+.1}%{} | {}{:+.1}% | {ratio} | ≤ {} | {n:.0}% | {} |",
            interval(ms),
            v.base.name(),
            b(v.base_bound),
            v.base_loss,
            if paced { " CPU" } else { "" },
            b(v.cow_bound),
            v.cow_loss,
            if v.goal < 1.0 {
                format!("{BIG_RATIO}")
            } else {
                "1.0 or noise".into()
            },
            if v.met { "yes" } else { "**no**" },
        );
    }
    let _ = writeln!(d);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cell(loss: &[f64], stopped: usize) -> Cell<'static> {
        Cell {
            loss: loss.to_vec(),
            stopped,
            ..Cell::default()
        }
    }

    #[test]
    fn cow_is_held_to_the_baseline_that_lost_less() {
        // stop-copy +200 %, full +30 %: the goal is 0.3 × 30 = 9 %.
        let (sc, full) = (cell(&[200.0], 0), cell(&[30.0, 29.0, 31.0], 0));
        let v = verdict(Some(&sc), Some(&full), &cell(&[8.0], 0), 5.0, false).unwrap();
        assert_eq!(
            (v.base, v.base_loss, v.goal, v.met),
            (Mode::StopCopyFull, 30.0, BIG_RATIO, true)
        );
        let v = verdict(Some(&sc), Some(&full), &cell(&[10.0], 0), 5.0, false).unwrap();
        assert!(!v.met, "{v:?}");
        // A small baseline loss: cow may lose as much, plus the noise.
        let small = cell(&[10.0], 0);
        assert!(verdict(Some(&small), None, &cell(&[14.0], 0), 5.0, false).unwrap().met);
        let v = verdict(Some(&small), None, &cell(&[16.0], 0), 5.0, false).unwrap();
        assert_eq!((v.goal, v.met), (1.0, false));
        // A cow run stopped at the cap never meets the goal.
        assert!(!verdict(Some(&small), None, &cell(&[10.0], 1), 5.0, false).unwrap().met);
        // No baseline, no verdict.
        assert!(verdict(None, None, &cell(&[1.0], 0), 5.0, false).is_none());
    }

    #[test]
    fn a_paced_workload_is_judged_on_its_cpu_growth() {
        let paced = |wall: f64, cpu: f64| Cell {
            loss: vec![wall],
            cpu: vec![cpu],
            ..Cell::default()
        };
        let v = verdict(Some(&paced(1.0, 100.0)), None, &paced(0.0, 40.0), 5.0, true).unwrap();
        assert_eq!((v.base_loss, v.cow_loss, v.met), (100.0, 40.0, false));
        let v = verdict(Some(&paced(1.0, 100.0)), None, &paced(0.0, 40.0), 5.0, false).unwrap();
        assert_eq!((v.base_loss, v.met), (1.0, true));
    }
}
