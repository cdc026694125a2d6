//! Sets of guest pages, one bitmap per RAM range (bit i = page i of the
//! range), as KVM's dirty log reports them.

use crate::memory::RamRange;

/// A page bitmap for one RAM range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageBits {
    words: Vec<u64>,
    pages: u64,
}

impl PageBits {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> PageBits {
        PageBits {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// A set over `pages` pages from bitmap words (extra bits beyond `pages` are dropped).
    pub fn from_words(mut words: Vec<u64>, pages: u64) -> PageBits {
        words.resize(pages.div_ceil(64) as usize, 0);
        if !pages.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (pages % 64)) - 1;
        }
        PageBits { words, pages }
    }

    /// Every page.
    pub fn full(pages: u64) -> PageBits {
        PageBits::from_words(vec![u64::MAX; pages.div_ceil(64) as usize], pages)
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Add `other`'s pages (the same range).
    pub fn or(&mut self, other: &PageBits) {
        for (d, s) in self.words.iter_mut().zip(&other.words) {
            *d |= *s;
        }
    }

    /// Remove `other`'s pages (the same range).
    pub fn remove(&mut self, other: &PageBits) {
        for (d, s) in self.words.iter_mut().zip(&other.words) {
            *d &= !*s;
        }
    }

    /// Add pages from raw bitmap words.
    pub fn or_words(&mut self, words: &[u64]) {
        for (d, s) in self.words.iter_mut().zip(words) {
            *d |= *s;
        }
        if !self.pages.is_multiple_of(64)
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << (self.pages % 64)) - 1;
        }
    }

    /// Add page `p`.
    pub fn set(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Add pages [start, end) (clipped to the set's size), a word at a time.
    pub fn set_span(&mut self, start: u64, end: u64) {
        let end = end.min(self.pages);
        let mut p = start;
        while p < end {
            let (w, bit) = ((p / 64) as usize, p % 64);
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            self.words[w] |= mask;
            p += n;
        }
    }

    /// Remove page `p`.
    pub fn unset(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] &= !(1 << (p % 64));
        }
    }

    /// Remove and return the pages in [start, end), ascending.
    pub fn take_span(&mut self, start: u64, end: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut p = start;
        while let Some(q) = self.next_set(p).filter(|q| *q < end) {
            out.push(q);
            self.unset(q);
            p = q + 1;
        }
        out
    }

    /// Is page `p` in the set?
    pub fn get(&self, p: u64) -> bool {
        p < self.pages && self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True when no page is set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Remove every page.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Pages in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut word = word;
            std::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let b = u64::from(word.trailing_zeros());
                word &= word - 1;
                Some(w as u64 * 64 + b)
            })
        })
    }

    /// Maximal runs of consecutive pages, as (first, count), ascending.
    pub fn runs(&self) -> Runs<'_> {
        Runs { bits: self, at: 0 }
    }

    /// Next set page at or after `p`.
    pub fn next_set(&self, p: u64) -> Option<u64> {
        self.scan(p, false)
    }

    /// Next clear page at or after `p` (`pages()` if none).
    pub fn next_clear(&self, p: u64) -> u64 {
        self.scan(p, true).unwrap_or(self.pages)
    }

    fn scan(&self, p: u64, clear: bool) -> Option<u64> {
        let mut w = (p / 64) as usize;
        if w >= self.words.len() {
            return None;
        }
        let flip = |x: u64| if clear { !x } else { x };
        let mut word = flip(self.words[w]) & (u64::MAX << (p % 64));
        loop {
            if word != 0 {
                let at = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (at < self.pages).then_some(at);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = flip(self.words[w]);
        }
    }
}

/// Iterator over the runs of a [`PageBits`].
#[derive(Debug)]
pub struct Runs<'a> {
    bits: &'a PageBits,
    at: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.bits.next_set(self.at)?;
        let end = self.bits.next_clear(start);
        self.at = end;
        Some((start, end - start))
    }
}

/// A set of guest pages over all RAM ranges (in [`crate::memory::GuestRam::ranges`] order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// One bitmap per RAM range.
    pub ranges: Vec<PageBits>,
}

impl DirtySet {
    /// An empty set shaped like `ranges`.
    pub fn empty(ranges: &[RamRange]) -> DirtySet {
        DirtySet {
            ranges: ranges.iter().map(|r| PageBits::new(r.pages())).collect(),
        }
    }

    /// Every page of `ranges`.
    pub fn all(ranges: &[RamRange]) -> DirtySet {
        DirtySet {
            ranges: ranges.iter().map(|r| PageBits::full(r.pages())).collect(),
        }
    }

    /// Add `other`'s pages.
    pub fn or(&mut self, other: &DirtySet) {
        if self.ranges.len() < other.ranges.len() {
            self.ranges.extend(other.ranges[self.ranges.len()..].iter().cloned());
        }
        for (d, s) in self.ranges.iter_mut().zip(&other.ranges) {
            d.or(s);
        }
    }

    /// Remove `other`'s pages.
    pub fn remove(&mut self, other: &DirtySet) {
        for (d, s) in self.ranges.iter_mut().zip(&other.ranges) {
            d.remove(s);
        }
    }

    /// Pages in the set.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(PageBits::count).sum()
    }

    /// True when no page is set.
    pub fn is_empty(&self) -> bool {
        self.ranges.iter().all(PageBits::is_empty)
    }

    /// Is the page at guest-physical `gpa` in the set?
    pub fn contains_gpa(&self, ranges: &[RamRange], gpa: u64) -> bool {
        ranges
            .iter()
            .zip(&self.ranges)
            .find(|(r, _)| r.gpa <= gpa && gpa < r.end())
            .is_some_and(|(r, b)| b.get((gpa - r.gpa) / crate::memory::PAGE_SIZE))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bits_runs_and_scans() {
        let mut b = PageBits::new(200);
        for p in [0, 1, 2, 63, 64, 65, 130, 199] {
            b.set(p);
        }
        b.set(500); // outside: ignored
        assert_eq!(b.count(), 8);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(0, 3), (63, 3), (130, 1), (199, 1)]);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 1, 2, 63, 64, 65, 130, 199]);
        assert_eq!(b.next_set(3), Some(63));
        assert_eq!(b.next_clear(63), 66);
        assert_eq!(b.next_set(200), None);
        let full = PageBits::full(70);
        assert_eq!(full.count(), 70);
        assert_eq!(full.runs().collect::<Vec<_>>(), vec![(0, 70)]);
        let mut w = PageBits::from_words(vec![u64::MAX, u64::MAX], 65);
        assert_eq!(w.count(), 65);
        w.or_words(&[0, u64::MAX]);
        assert_eq!(w.count(), 65);
        assert!(!w.is_empty());
        w.clear();
        assert!(w.is_empty());
    }

    #[test]
    fn spans_are_set_a_word_at_a_time_like_page_by_page() {
        for (start, end) in [
            (0, 0),
            (0, 1),
            (3, 64),
            (0, 64),
            (63, 65),
            (5, 200),
            (64, 128),
            (190, 500),
        ] {
            let mut a = PageBits::new(200);
            a.set_span(start, end);
            let mut b = PageBits::new(200);
            for p in start..end {
                b.set(p);
            }
            assert_eq!(a.words(), b.words(), "[{start}, {end})");
        }
    }

    #[test]
    fn sets_over_ranges() {
        let ranges = crate::memory::layout(5 << 30).unwrap();
        let mut a = DirtySet::empty(&ranges);
        let mut b = DirtySet::empty(&ranges);
        a.ranges[0].set(1);
        b.ranges[1].set(2);
        a.or(&b);
        assert_eq!(a.count(), 2);
        assert!(a.contains_gpa(&ranges, 4096 + 5));
        assert!(a.contains_gpa(&ranges, crate::memory::MMIO_HOLE_END + 2 * 4096));
        assert!(!a.contains_gpa(&ranges, 0));
        assert_eq!(DirtySet::all(&ranges).count(), (5u64 << 30) / 4096);
    }
}
