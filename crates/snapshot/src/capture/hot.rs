//! Which dirty pages to track again ("track only where it pays").
//!
//! After KVM reports a page dirty, re-protecting it so that its next write
//! is logged costs a fault on that next write (about 11 µs here, 15 times
//! the cost of copying the page). A page written in most epochs is cheaper
//! to save every epoch untracked. With KVM's manual dirty-log protection,
//! consnap re-arms only the pages of cold regions: a region (64 pages, one
//! bitmap word) dirty in `min_streak` epochs in a row with at least
//! `min_pages` dirty pages stays unprotected, and so keeps being reported
//! dirty and saved. Every `probe_every` epochs every region is re-armed, so
//! that a region that cooled down is found out.

use vmm::dirty::{DirtySet, PageBits};

/// The policy's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotPolicy {
    /// Consecutive dirty epochs that make a region hot.
    pub min_streak: u8,
    /// Dirty pages (of 64) a region needs to count as hot.
    pub min_pages: u32,
    /// Re-arm every region this often (in epochs) to detect cooling.
    pub probe_every: u64,
}

impl Default for HotPolicy {
    fn default() -> Self {
        HotPolicy {
            min_streak: 2,
            min_pages: 8,
            probe_every: 8,
        }
    }
}

/// Per-region history.
#[derive(Debug, Default)]
pub(crate) struct Hotness {
    policy: HotPolicy,
    streak: Vec<Vec<u8>>,
    epoch: u64,
    /// Pages left unprotected at the last epoch.
    pub untracked: u64,
}

impl Hotness {
    pub(crate) fn new(policy: HotPolicy) -> Hotness {
        Hotness {
            policy,
            ..Hotness::default()
        }
    }

    /// Given this epoch's dirty set, the pages to re-protect.
    pub(crate) fn rearm(&mut self, dirty: &DirtySet) -> DirtySet {
        self.epoch += 1;
        let probe = self.policy.probe_every != 0 && self.epoch.is_multiple_of(self.policy.probe_every);
        self.streak.resize(dirty.ranges.len(), Vec::new());
        self.untracked = 0;
        let mut out = DirtySet { ranges: Vec::new() };
        for (bits, streak) in dirty.ranges.iter().zip(self.streak.iter_mut()) {
            streak.resize(bits.words().len(), 0);
            let mut words = bits.words().to_vec();
            for (w, s) in words.iter_mut().zip(streak.iter_mut()) {
                *s = if *w == 0 { 0 } else { s.saturating_add(1) };
                let hot = !probe && *s >= self.policy.min_streak && w.count_ones() >= self.policy.min_pages;
                if hot {
                    self.untracked += u64::from(w.count_ones());
                    *w = 0;
                }
            }
            out.ranges.push(PageBits::from_words(words, bits.pages()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(words: &[u64]) -> DirtySet {
        DirtySet {
            ranges: vec![PageBits::from_words(words.to_vec(), words.len() as u64 * 64)],
        }
    }

    #[test]
    fn hot_regions_stay_unprotected_until_the_probe() {
        let mut h = Hotness::new(HotPolicy {
            min_streak: 2,
            min_pages: 8,
            probe_every: 4,
        });
        let busy = u64::MAX;
        let sparse = 0b1011;
        // Epoch 1: everything re-armed (no history yet).
        assert_eq!(h.rearm(&set(&[busy, sparse, 0])), set(&[busy, sparse, 0]));
        // Epoch 2: the busy word is hot; the sparse one has too few pages.
        assert_eq!(h.rearm(&set(&[busy, sparse, 0])), set(&[0, sparse, 0]));
        assert_eq!(h.untracked, 64);
        assert_eq!(h.rearm(&set(&[busy, 0, 1])), set(&[0, 0, 1]));
        // Epoch 4 probes: everything dirty is re-armed.
        assert_eq!(h.rearm(&set(&[busy, 0, 0])), set(&[busy, 0, 0]));
        // A word that was clean once starts over.
        assert_eq!(h.rearm(&set(&[0, busy, 0])), set(&[0, busy, 0]));
    }
}
