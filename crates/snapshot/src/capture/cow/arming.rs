//! The pause's side of the copy-on-write engine: which pages an epoch
//! takes, copying hot blocks while paused, and arming write protection.
//!
//! Under `Tracker::Uffd` an incremental epoch works on *blocks* only: the
//! blocks written since the last epoch are exactly the blocks not armed,
//! a bitmap of one bit per 2 MiB. So the pause's work grows with the
//! blocks written, not with guest RAM: it never builds, copies or scans a
//! bitmap of every page (at 16 GiB one is 512 KiB, and the pause built,
//! copied and scanned several).

use std::sync::atomic::Ordering;

use uffd::UffdError;
use vmm::dirty::{DirtySet, PageBits};

use super::shared::{CaptureAt, CowState, Inner};

impl CowState {
    /// Runs of set blocks of `blocks` within [b0, b1), merging gaps of up
    /// to the configured number of pages, as page ranges.
    pub(crate) fn merged_runs(&self, ri: usize, blocks: &PageBits, b0: u64, b1: u64) -> Vec<(u64, u64)> {
        let gap = self.opts.merge_gap_pages.div_ceil(self.opts.block_pages);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut b = b0;
        while let Some(s) = blocks.next_set(b).filter(|s| *s < b1) {
            let e = blocks.next_clear(s).min(b1);
            let (ps, _) = self.block_pages(ri, s);
            let (_, pe) = self.block_pages(ri, e - 1);
            match out.last_mut() {
                Some(last) if ps - last.1 <= gap * self.opts.block_pages => last.1 = pe,
                _ => out.push((ps, pe)),
            }
            b = e;
        }
        out
    }

    /// While paused: make `pages` pending and write-protect their blocks,
    /// in merged runs. Every protected block is marked armed, so that the
    /// saver visits and lifts it. Returns the number of protect calls.
    pub(crate) fn arm(&self, pages: &DirtySet) -> Result<u64, UffdError> {
        let mut g = self.lock();
        let mut blocks = Vec::with_capacity(self.ranges.len());
        for ri in 0..self.ranges.len() {
            let mut b = PageBits::new(g.armed[ri].pages());
            if let Some(bits) = pages.ranges.get(ri) {
                g.pending[ri] = bits.clone();
                for (first, n) in bits.runs() {
                    b.set_span(
                        first / self.opts.block_pages,
                        (first + n - 1) / self.opts.block_pages + 1,
                    );
                }
            }
            blocks.push(b);
        }
        self.protect_blocks(g, &blocks)
    }

    /// While paused, under `Tracker::Uffd`: make every page of `blocks`
    /// pending and write-protect them. Nothing is pending before (the last
    /// epoch's saver claimed every page, or a failure released them).
    pub(crate) fn arm_blocks(&self, blocks: &[PageBits]) -> Result<u64, UffdError> {
        let mut g = self.lock();
        for (ri, b) in blocks.iter().enumerate() {
            self.add_block_pages(ri, b, &mut g.pending[ri]);
        }
        self.protect_blocks(g, blocks)
    }

    /// Write-protect `blocks` in merged runs and mark them armed; capture
    /// ahead starts from the first block.
    fn protect_blocks(&self, mut g: std::sync::MutexGuard<'_, Inner>, blocks: &[PageBits]) -> Result<u64, UffdError> {
        g.aborted = false;
        let mut calls = 0;
        for (ri, b) in blocks.iter().enumerate() {
            let nblocks = g.armed[ri].pages();
            let runs = self.merged_runs(ri, b, 0, nblocks);
            for &(s, e) in &runs {
                // Blocks still armed from earlier epochs stay armed
                // (`Tracker::Uffd`); a merged gap is armed too.
                g.armed[ri].set_span(s / self.opts.block_pages, e.div_ceil(self.opts.block_pages));
            }
            for (s, e) in runs {
                let (addr, len) = self.span(ri, s, e);
                if let Err(err) = self.uffd.protect(addr, len) {
                    drop(g);
                    self.release_all();
                    return Err(err);
                }
                calls += 1;
            }
        }
        g.capture = self.opts.capture_ahead.then_some(CaptureAt::START);
        Ok(calls)
    }

    /// Start capturing ahead of the saver (armed by [`CowState::arm`]). Only
    /// once the vCPUs run again: woken inside the pause, the fault handler
    /// preempted the pausing thread on this 2-core host and made 1 pause in
    /// 20 last 2-8 ms instead of 0.1 ms.
    pub(crate) fn start_capture(&self) {
        let _ = self.kick.write(1);
    }

    /// While paused, under `Tracker::Uffd`: copy the hot blocks among
    /// `blocks` aside, within `budget` and the free copy-aside memory
    /// (keeping a quarter for faults), and take them out of `blocks`, so
    /// that they are not write-protected: they stay writable and are
    /// examined again next epoch. Returns the pages copied.
    pub(crate) fn copy_hot(&self, blocks: &mut [PageBits], budget: std::time::Duration) -> u64 {
        if budget.is_zero() {
            return 0;
        }
        let t = std::time::Instant::now();
        let mut g = self.lock();
        let reserve = self.aside_reserve(&g);
        let mut copied = 0;
        'ranges: for (ri, bits) in blocks.iter_mut().enumerate() {
            let mut b = 0;
            while let Some(hb) = g.hot[ri].next_set(b) {
                b = hb + 1;
                if t.elapsed() >= budget {
                    break 'ranges;
                }
                if !bits.get(hb) {
                    continue;
                }
                let (b0, b1) = self.block_pages(ri, hb);
                if g.free.len() < (b1 - b0) as usize + reserve {
                    break 'ranges;
                }
                let want: Vec<u64> = (b0..b1).collect();
                self.copy_aside(&mut g, ri, &want, false);
                bits.unset(hb);
                copied += want.len() as u64;
            }
        }
        self.counters.in_pause.fetch_add(copied, Ordering::Relaxed);
        copied
    }

    /// Write-protect all of RAM, with nothing pending (`Tracker::Uffd`,
    /// before the vCPUs start).
    pub(crate) fn protect_all(&self) -> Result<(), UffdError> {
        let mut g = self.lock();
        for ri in 0..self.ranges.len() {
            let n = g.armed[ri].pages();
            g.armed[ri] = PageBits::full(n);
            let (addr, len) = self.span(ri, 0, self.ranges[ri].pages());
            self.uffd.protect(addr, len)?;
        }
        Ok(())
    }

    /// The blocks that are not write-protected, per range: under
    /// `Tracker::Uffd`, the blocks written (or released) since the last epoch.
    pub(crate) fn unarmed_blocks(&self) -> Vec<PageBits> {
        let g = self.lock();
        g.armed
            .iter()
            .map(|armed| {
                let mut b = PageBits::full(armed.pages());
                b.remove(armed);
                b
            })
            .collect()
    }

    /// Every page of the blocks that are not write-protected.
    pub(crate) fn unarmed_pages(&self) -> DirtySet {
        let mut out = DirtySet::empty(&self.ranges);
        for (ri, blocks) in self.unarmed_blocks().iter().enumerate() {
            self.add_block_pages(ri, blocks, &mut out.ranges[ri]);
        }
        out
    }

    /// Add every page of the blocks `blocks` of range `ri` to `pages`, a
    /// run of blocks at a time.
    fn add_block_pages(&self, ri: usize, blocks: &PageBits, pages: &mut PageBits) {
        for (first, n) in blocks.runs() {
            let (p0, _) = self.block_pages(ri, first);
            let (_, p1) = self.block_pages(ri, first + n - 1);
            pages.set_span(p0, p1);
        }
    }

    /// While paused, under the dirty log: copy every page of `pages` aside
    /// now and protect nothing (a small dirty set: the pause grows by the
    /// copy, and the guest takes no fault). False, copying nothing, when
    /// the copy-aside memory lacks room (keeping a quarter for faults).
    pub(crate) fn copy_pages(&self, pages: &DirtySet) -> bool {
        let mut g = self.lock();
        let n = pages.count() as usize;
        if g.free.len() < n + self.aside_reserve(&g) {
            return false;
        }
        g.aborted = false;
        g.capture = None;
        for (ri, bits) in pages.ranges.iter().enumerate() {
            let want: Vec<u64> = bits.iter().collect();
            if !want.is_empty() {
                self.copy_aside(&mut g, ri, &want, false);
            }
        }
        self.counters.in_pause.fetch_add(n as u64, Ordering::Relaxed);
        true
    }

    /// Protection blocks holding at least one page of `pages`.
    pub(crate) fn blocks_of(&self, pages: &DirtySet) -> u64 {
        let bp = self.opts.block_pages;
        pages
            .ranges
            .iter()
            .map(|bits| {
                if bp >= 64 {
                    // Whole words per block (blocks are 1 or 512 pages).
                    let words = (bp / 64) as usize;
                    bits.words().chunks(words).filter(|c| c.iter().any(|w| *w != 0)).count() as u64
                } else {
                    let mut last = None;
                    bits.iter().filter(|p| last.replace(p / bp) != Some(p / bp)).count() as u64
                }
            })
            .sum()
    }
}
