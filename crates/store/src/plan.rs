//! Where each guest page comes from when restoring an epoch.
//!
//! Walk the chain newest first; each extent contributes the pages no newer
//! epoch has claimed. The chain ends at a full epoch, so every page of RAM
//! is claimed exactly once, and each data page is read once.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use crate::error::{Result, StoreError};
use crate::format::ExtentKind;
use crate::reader::EpochReader;

/// A run of pages and its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First guest frame number.
    pub gfn: u64,
    /// Pages.
    pub count: u64,
    /// Where they come from.
    pub source: Source,
}

/// Source of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// All-zero pages.
    Zero,
    /// Data pages of `chain[epoch]`, starting at data page `page`.
    Data {
        /// Index into the chain (0 = the restored epoch).
        epoch: usize,
        /// First data page.
        page: u64,
    },
}

/// Covered frame intervals, start -> end (exclusive), non-overlapping.
#[derive(Default)]
pub(crate) struct Covered(BTreeMap<u64, u64>);

impl Covered {
    /// The covered intervals, ascending: touching claims are one interval.
    pub(crate) fn intervals(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(s, e)| (*s, *e))
    }

    /// Parts of [a, b) not yet covered; then cover [a, b). Logarithmic in
    /// the number of intervals plus the number it touches.
    pub(crate) fn claim(&mut self, a: u64, b: u64) -> Vec<(u64, u64)> {
        use std::ops::Bound::{Excluded, Included};
        // Intervals that overlap or touch [a, b], in order.
        let mut touching: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.0.range(..=a).next_back().filter(|(_, e)| **e >= a) {
            touching.push((s, e));
        }
        touching.extend(self.0.range((Excluded(a), Included(b))).map(|(s, e)| (*s, *e)));
        let mut gaps = Vec::new();
        let mut at = a;
        for &(s, e) in &touching {
            if s > at {
                gaps.push((at, s.min(b)));
            }
            at = at.max(e);
            if at >= b {
                break;
            }
        }
        if at < b {
            gaps.push((at, b));
        }
        let lo = touching.first().map_or(a, |t| t.0.min(a));
        let hi = touching.last().map_or(b, |t| t.1.max(b));
        for (s, _) in &touching {
            self.0.remove(s);
        }
        self.0.insert(lo, hi);
        gaps
    }

    #[cfg(test)]
    fn total(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

/// Where each page listed by `chain` (newest first) comes from: the newest
/// epoch that lists it. Runs ascend by frame number.
pub fn claims<R: Borrow<EpochReader>>(chain: &[R]) -> Vec<Run> {
    let mut covered = Covered::default();
    let mut runs = Vec::new();
    for (i, epoch) in chain.iter().enumerate() {
        for ext in epoch.borrow().index() {
            let (a, b) = (ext.gfn, ext.gfn + u64::from(ext.count));
            for (s, e) in covered.claim(a, b) {
                let source = match ext.kind {
                    ExtentKind::Zero => Source::Zero,
                    ExtentKind::Data => Source::Data {
                        epoch: i,
                        page: ext.data_page + (s - a),
                    },
                };
                runs.push(Run {
                    gfn: s,
                    count: e - s,
                    source,
                });
            }
        }
    }
    runs.sort_by_key(|r| r.gfn);
    runs
}

/// Plan the restore of `chain[0]` (chain newest first, ending at a full epoch).
pub fn plan<R: Borrow<EpochReader>>(chain: &[R]) -> Result<Vec<Run>> {
    let Some(base) = chain.last().map(Borrow::borrow) else {
        return Err(StoreError::Usage("empty chain"));
    };
    if !base.header().is_full() {
        return Err(StoreError::Corrupt {
            path: base.path().to_path_buf(),
            why: "chain does not end at a full epoch".into(),
        });
    }
    let runs = claims(chain);
    let covered: u64 = runs.iter().map(|r| r.count).sum();
    let base_pages = base.header().pages_data + base.header().pages_zero;
    if covered != base_pages {
        return Err(StoreError::Corrupt {
            path: chain[0].borrow().path().to_path_buf(),
            why: format!(
                "chain covers {covered} pages but its full epoch has {base_pages}: an incremental epoch records pages outside guest RAM"
            ),
        });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_returns_only_new_parts() {
        let mut c = Covered::default();
        assert_eq!(c.claim(10, 20), vec![(10, 20)]);
        assert_eq!(c.claim(5, 25), vec![(5, 10), (20, 25)]);
        assert_eq!(c.claim(12, 18), vec![]);
        assert_eq!(c.claim(30, 40), vec![(30, 40)]);
        assert_eq!(c.claim(0, 50), vec![(0, 5), (25, 30), (40, 50)]);
        assert_eq!(c.total(), 50);
        assert_eq!(c.0.len(), 1);
        // Touching intervals merge; gaps between many small ones are found.
        let mut c = Covered::default();
        for i in 0..100 {
            assert_eq!(c.claim(i * 10, i * 10 + 5), vec![(i * 10, i * 10 + 5)]);
        }
        let gaps = c.claim(3, 997);
        assert_eq!(gaps.len(), 100);
        assert_eq!(gaps[0], (5, 10));
        assert_eq!(gaps[98], (985, 990));
        assert_eq!(gaps[99], (995, 997));
        assert_eq!(c.0.len(), 1);
        assert_eq!(c.claim(997, 1001), vec![(997, 1001)]);
        assert_eq!(c.0.len(), 1, "touching intervals merge");
    }
}
