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
    // Guest RAM's pages (region 0) are claimed in a bitmap, a word at a
    // time: a chain of 64 epochs of scattered writes has about 100,000
    // extents, and claiming them in the interval map took about 20 ms
    // before a lazy restore's first instruction. Regions (up to 2^48 units
    // each) keep the map.
    let ram_end = chain
        .iter()
        .filter_map(|e| {
            e.borrow()
                .index()
                .iter()
                .rev()
                .find(|x| crate::format::region_of(x.gfn) == 0)
                .map(|x| x.gfn + u64::from(x.count))
        })
        .max()
        .unwrap_or(0);
    let mut ram = ClaimBits::new(ram_end);
    let mut covered = Covered::default();
    let mut runs = Vec::new();
    for (i, epoch) in chain.iter().enumerate() {
        for ext in epoch.borrow().index() {
            let (a, b) = (ext.gfn, ext.gfn + u64::from(ext.count));
            let mut add = |s: u64, e: u64| {
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
            };
            if b <= ram_end {
                ram.claim(a, b, &mut add);
            } else {
                for (s, e) in covered.claim(a, b) {
                    add(s, e);
                }
            }
        }
    }
    runs.sort_unstable_by_key(|r| r.gfn);
    runs
}

/// Pages claimed so far, one bit each, below a bound.
struct ClaimBits(Vec<u64>);

impl ClaimBits {
    fn new(end: u64) -> ClaimBits {
        ClaimBits(vec![0; end.div_ceil(64) as usize])
    }

    /// Claim [a, b): `new` gets each part not claimed before, in order.
    fn claim(&mut self, a: u64, b: u64, new: &mut impl FnMut(u64, u64)) {
        let mut p = a;
        while p < b {
            // The next unclaimed page at or after p.
            let (w, bit) = ((p / 64) as usize, p % 64);
            let free = !self.0[w] & (u64::MAX << bit);
            if free == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            let s = p / 64 * 64 + u64::from(free.trailing_zeros());
            if s >= b {
                return;
            }
            // Where the unclaimed run ends (a claimed page, or b).
            let mut e = s;
            loop {
                let (w, bit) = ((e / 64) as usize, e % 64);
                let taken = self.0[w] & (u64::MAX << bit);
                if taken != 0 {
                    e = e / 64 * 64 + u64::from(taken.trailing_zeros());
                    break;
                }
                e = (e / 64 + 1) * 64;
                if e >= b {
                    break;
                }
            }
            let e = e.min(b);
            new(s, e);
            let mut q = s;
            while q < e {
                let (w, bit) = ((q / 64) as usize, q % 64);
                let n = (64 - bit).min(e - q);
                self.0[w] |= if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
                q += n;
            }
            p = e;
        }
    }
}

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

    /// The bitmap and the interval map claim alike, on random extents.
    #[test]
    fn the_bitmap_claims_what_the_interval_map_claims() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..50 {
            let mut bits = ClaimBits::new(1000);
            let mut map = Covered::default();
            for _ in 0..60 {
                let a = rnd(1000);
                let b = (a + 1 + rnd(200)).min(1000);
                let mut got = Vec::new();
                bits.claim(a, b, &mut |s, e| got.push((s, e)));
                assert_eq!(got, map.claim(a, b), "claiming {a}..{b}");
            }
        }
    }

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
