//! The saver: writes the pages of a copy-on-write epoch while the guest
//! runs, in ascending page order, span by span: claim the span's pending
//! pages and copied-aside pages, copy the claimed ones from guest memory
//! (still write-protected, so unchanged since the pause), release the span
//! (under `Tracker::DirtyLog` lift its protection; under `Tracker::Uffd`
//! keep it, so that the next write is seen), then write the pages (under
//! `Tracker::Uffd` only those whose hash changed since the last epoch).

use store::{EpochInfo, EpochWriter};
use vmm::dirty::PageBits;
use vmm::memory::PAGE_SIZE;

use super::shared::{CowState, Tracker};
use crate::capture::error::EpochFailure;
use crate::capture::strategy::EpochFile;
use crate::pages::{self, PageBuf};

const PAGE: usize = PAGE_SIZE as usize;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Save one epoch whose pages `shared` holds armed and pending, and commit
/// it. On failure every protection is lifted before returning.
pub(crate) fn save_epoch(
    shared: &CowState,
    file: EpochFile,
    bufs: &mut Buffers,
    pause_ns: u64,
) -> Result<EpochInfo, EpochFailure> {
    let Buffers { scratch, out } = bufs;
    let full = file.meta.full;
    // Pages gathered for an epoch that failed are not this epoch's.
    out.clear();
    if !shared.opts.saver_delay().is_zero() {
        std::thread::sleep(shared.opts.saver_delay());
    }
    if full && shared.keeps_hashes() {
        shared.hashes.lock().unwrap_or_else(|p| p.into_inner()).stage_full();
    }
    let r = (|| {
        let mut w = file.open()?;
        for ri in 0..shared.ranges.len() {
            save_range(shared, ri, full, &mut w, scratch, out)?;
        }
        out.finish(&mut w)?;
        let (leftovers, aborted) = {
            let g = shared.lock();
            let n = g.aside.len() + g.pending.iter().map(|p| p.count() as usize).sum::<usize>();
            (n, g.aborted)
        };
        if aborted {
            return Err(EpochFailure::ThreadGone("saver (epoch abandoned)"));
        }
        if leftovers != 0 {
            return Err(EpochFailure::Unsaved { pages: leftovers });
        }
        file.regions.commit(w, pause_ns)
    })();
    if r.is_err() {
        shared.release_all();
    }
    r
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    /// Claimed by the saver: still protected in guest memory.
    Guest,
    /// Copied aside by the fault handler.
    Aside,
    /// Not populated at the pause of a full epoch: zero.
    Zero,
    /// Copied aside, and unchanged since the last epoch: not in this one.
    Skip,
}

fn save_range(
    shared: &CowState,
    ri: usize,
    full: bool,
    w: &mut EpochWriter,
    scratch: &mut PageBuf,
    out: &mut Out,
) -> Result<(), EpochFailure> {
    let range = shared.ranges[ri];
    let pages_n = range.pages();
    let bp = shared.opts.block_pages;
    let span = shared.opts.chunk_pages.div_ceil(bp).max(1) * bp;
    let gfn0 = range.gpa / PAGE_SIZE;
    // A span's entries are distinct pages of it: never more than `span`.
    // Sized here, not under the lock (pre-faulting costs about 5 µs a page).
    if scratch.len() < span as usize * PAGE {
        *scratch = pages::prefaulted(span as usize * PAGE);
    }
    let mut cursor = 0u64;
    loop {
        let mut g = shared.lock();
        if g.aborted {
            return Err(EpochFailure::ThreadGone("saver (epoch abandoned)"));
        }
        let next_pending = g.pending[ri].next_set(cursor);
        let next_aside = g.aside.range((ri, cursor)..(ri + 1, 0)).next().map(|(k, _)| k.1);
        // Under `Tracker::DirtyLog` every armed block is visited, to lift it;
        // under `Tracker::Uffd` armed blocks stay armed, and only pending or
        // copied-aside pages need the saver.
        let next_armed = if shared.saving_as() == Tracker::DirtyLog {
            g.armed[ri].next_set(cursor.div_ceil(bp)).map(|b| b * bp)
        } else {
            None
        };
        let Some(p0) = [next_pending, next_aside, next_armed].into_iter().flatten().min() else {
            drop(g);
            if full && cursor < pages_n {
                out.flush(w)?;
                w.zero_pages(gfn0 + cursor, pages_n - cursor)?;
            }
            return Ok(());
        };
        let start = (p0 / bp * bp).max(cursor);
        let end = (start + span).min(pages_n);
        if full && start > cursor {
            // A full epoch lists every page: these were not populated at the pause.
            out.flush(w)?;
            w.zero_pages(gfn0 + cursor, start - cursor)?;
        }
        let claimed = g.pending[ri].take_span(start, end);
        let aside: Vec<(u64, (u32, Option<u64>))> =
            g.aside.range((ri, start)..(ri, end)).map(|(k, v)| (k.1, *v)).collect();
        let mut entries: Vec<(u64, Src)> = claimed
            .iter()
            .map(|p| (*p, Src::Guest))
            .chain(aside.iter().map(|(p, _)| (*p, Src::Aside)))
            .collect();
        if full {
            let mut have = PageBits::new(end - start);
            for (p, _) in &entries {
                have.set(p - start);
            }
            entries.extend((start..end).filter(|p| !have.get(p - start)).map(|p| (p, Src::Zero)));
        }
        entries.sort_unstable_by_key(|e| e.0);
        // Copied-aside pages go to their place in the scratch buffer now,
        // freeing their slots; under `Tracker::Uffd` those whose hash (taken
        // when they were copied) shows no change are dropped at once.
        let mut known: Vec<Option<u64>> = vec![None; entries.len()];
        // Copied-aside pages to copy out of their slots once the lock is
        // free: (entry, slot); the slots are this thread's until freed.
        let mut from_slab: Vec<(usize, u32)> = Vec::with_capacity(aside.len());
        {
            let uffd = shared.saving_as() == Tracker::Uffd && !full;
            let mut hashes = uffd.then(|| shared.hashes.lock().unwrap_or_else(|p| p.into_inner()));
            let inner = &mut *g;
            let mut unchanged = 0u64;
            for (p, (slot, h)) in &aside {
                inner.aside.remove(&(ri, *p));
                let i = entries.partition_point(|e| e.0 < *p);
                if let (Some(hs), Some(h)) = (hashes.as_mut(), *h) {
                    if !hs.changed(ri, *p, h) {
                        entries[i].1 = Src::Skip;
                        unchanged += 1;
                        inner.free.push(*slot);
                        continue;
                    }
                    known[i] = Some(h);
                }
                from_slab.push((i, *slot));
            }
            shared
                .counters
                .examined
                .fetch_add(unchanged, std::sync::atomic::Ordering::Relaxed);
            inner.held = Some((ri, start, end));
        }
        drop(g);
        if !from_slab.is_empty() {
            for &(i, slot) in &from_slab {
                // SAFETY: the slot's entry was taken out of `aside` under
                // the lock and the slot is not free yet: this thread owns it.
                unsafe {
                    shared
                        .slab
                        .with_slot(slot, |page| scratch[i * PAGE..(i + 1) * PAGE].copy_from_slice(page))
                };
            }
            shared.lock().free.extend(from_slab.iter().map(|&(_, slot)| slot));
        }
        shared.cv.notify_all();

        // Copy, then release the span at once, then write: the guest waits
        // for a memory copy at most, never for the disk.
        let copied = copy_claimed(shared, ri, &entries, scratch);
        let released = match shared.saving_as() {
            Tracker::DirtyLog => lift(shared, ri, start, end),
            Tracker::Uffd => {
                release(shared);
                Ok(())
            }
        };
        copied?;
        released?;
        let keep = changed(shared, ri, full, &entries, &known, scratch);
        if shared.saving_as() == Tracker::Uffd && !full {
            // A block with a changed page is hot: captured ahead next time.
            let mut g = shared.lock();
            for b in start / bp..end.div_ceil(bp) {
                g.hot[ri].unset(b);
            }
            for (k, (p, _)) in entries.iter().enumerate() {
                if keep[k] {
                    g.hot[ri].set(p / bp);
                }
            }
        }
        write_span(&entries, &keep, scratch, w, out, gfn0)?;
        cursor = end;
    }
}

/// Copy the claimed pages of `entries` from guest memory into `scratch`.
fn copy_claimed(shared: &CowState, ri: usize, entries: &[(u64, Src)], scratch: &mut [u8]) -> Result<(), EpochFailure> {
    let base = shared.ranges[ri].gpa;
    let mut i = 0;
    while i < entries.len() {
        let (p, src) = entries[i];
        if src == Src::Guest {
            // A run of consecutive claimed pages is one copy.
            let mut j = i + 1;
            while j < entries.len() && entries[j].1 == Src::Guest && entries[j].0 == p + (j - i) as u64 {
                j += 1;
            }
            shared
                .ram
                .read_to(base + p * PAGE_SIZE, &mut scratch[i * PAGE..j * PAGE])?;
            i = j;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// Which entries go into the epoch: all of them under `Tracker::DirtyLog`
/// (the dirty log named them) and in full epochs; under `Tracker::Uffd`
/// those whose keyed hash differs from the last committed epoch's. The
/// new hashes of what is saved are staged, to apply once this epoch
/// commits (under the dirty log only when the engine may switch to uffd,
/// which then needs a table that is right).
fn changed(
    shared: &CowState,
    ri: usize,
    full: bool,
    entries: &[(u64, Src)],
    known: &[Option<u64>],
    scratch: &[u8],
) -> Vec<bool> {
    let compare = shared.saving_as() == Tracker::Uffd && !full;
    if !shared.keeps_hashes() {
        let keep: Vec<bool> = entries.iter().map(|e| e.1 != Src::Skip).collect();
        count_kept(shared, full, &keep);
        return keep;
    }
    let mut hashes = shared.hashes.lock().unwrap_or_else(|p| p.into_inner());
    let mut examined = 0u64;
    let keep: Vec<bool> = entries
        .iter()
        .enumerate()
        .map(|(k, &(p, src))| {
            if src == Src::Skip {
                return false;
            }
            examined += 1;
            let h = match (known[k], src) {
                (Some(h), _) => h,
                (None, Src::Zero) => hashes.hash(&ZERO_PAGE),
                (None, _) => hashes.hash(&scratch[k * PAGE..(k + 1) * PAGE]),
            };
            let c = !compare || hashes.changed(ri, p, h);
            if c {
                hashes.stage(ri, p, h);
            }
            c
        })
        .collect();
    drop(hashes);
    if compare {
        shared
            .counters
            .examined
            .fetch_add(examined, std::sync::atomic::Ordering::Relaxed);
    }
    count_kept(shared, full, &keep);
    keep
}

/// Count the pages an incremental epoch saves (for the cost model).
fn count_kept(shared: &CowState, full: bool, keep: &[bool]) {
    if !full {
        let n = keep.iter().filter(|k| **k).count() as u64;
        shared.counters.kept.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The saver's reused buffers.
pub(crate) struct Buffers {
    /// A span's pages, in page order.
    pub scratch: PageBuf,
    /// Data pages on their way to the file.
    pub out: Out,
}

impl Buffers {
    pub(crate) fn new() -> Buffers {
        Buffers {
            scratch: PageBuf::default(),
            out: Out::new(),
        }
    }
}

/// Data pages gathered across spans so that they reach the file in few,
/// large writes (each O_DIRECT write costs a device notification), and the
/// zero pages among them, which are only indexed: a zero page between two
/// data pages does not split the write. A full buffer goes to the store's
/// writing thread while the saver fills another (`spare`: those not in
/// flight), so that copying, hashing and checksumming overlap the disk's work.
pub(crate) struct Out {
    buf: PageBuf,
    spare: Vec<PageBuf>,
    gfns: Vec<u64>,
    zeros: Vec<u64>,
}

/// Gather up to this much page data before writing it.
const OUT_BYTES: usize = 4 << 20;
/// ... and up to this many zero pages.
const OUT_ZEROS: usize = 1 << 16;

impl Out {
    pub(crate) fn new() -> Out {
        Out {
            buf: pages::prefaulted(OUT_BYTES),
            spare: Vec::new(),
            gfns: Vec::new(),
            zeros: Vec::new(),
        }
    }

    /// Forget what was gathered (for an epoch that failed).
    fn clear(&mut self) {
        self.gfns.clear();
        self.zeros.clear();
    }

    fn push(&mut self, w: &mut EpochWriter, gfn: u64, page: &[u8]) -> Result<(), EpochFailure> {
        if (self.gfns.len() + 1) * PAGE > self.buf.len() {
            self.flush(w)?;
        }
        let at = self.gfns.len() * PAGE;
        self.buf[at..at + PAGE].copy_from_slice(page);
        self.gfns.push(gfn);
        Ok(())
    }

    fn push_zero(&mut self, w: &mut EpochWriter, gfn: u64) -> Result<(), EpochFailure> {
        if self.zeros.len() >= OUT_ZEROS {
            self.flush(w)?;
        }
        self.zeros.push(gfn);
        Ok(())
    }

    /// Hand what was gathered to the writer, and take the other buffer.
    pub(crate) fn flush(&mut self, w: &mut EpochWriter) -> Result<(), EpochFailure> {
        if self.gfns.is_empty() && self.zeros.is_empty() {
            return Ok(());
        }
        // A buffer in flight is the writer's until it comes back; one is
        // made (once per saver's buffers, up to the writer's depth) when
        // none is free.
        let next = match self.spare.pop() {
            Some(b) => b,
            None => pages::prefaulted(OUT_BYTES),
        };
        let full = std::mem::replace(&mut self.buf, next);
        let back = w.pages_with_zeros_owned(&self.gfns, full.into_aligned(), &self.zeros);
        self.clear();
        self.spare.extend(back?.map(PageBuf::from_aligned));
        Ok(())
    }

    /// Flush, and wait for every write, getting their buffers back.
    pub(crate) fn finish(&mut self, w: &mut EpochWriter) -> Result<(), EpochFailure> {
        self.flush(w)?;
        self.spare.extend(w.settle()?.into_iter().map(PageBuf::from_aligned));
        Ok(())
    }
}

/// Write a span from `scratch` through `out`: the kept data pages, and
/// zero and never-touched pages (only indexed).
fn write_span(
    entries: &[(u64, Src)],
    keep: &[bool],
    scratch: &[u8],
    w: &mut EpochWriter,
    out: &mut Out,
    gfn0: u64,
) -> Result<(), EpochFailure> {
    for (k, &(p, src)) in entries.iter().enumerate() {
        if !keep[k] {
            // Unchanged since the last epoch: not in this one.
            continue;
        }
        let page = &scratch[k * PAGE..(k + 1) * PAGE];
        if src == Src::Zero || pages::is_zero(page) {
            out.push_zero(w, gfn0 + p)?;
        } else {
            out.push(w, gfn0 + p, page)?;
        }
    }
    Ok(())
}

/// Release the span the saver held, keeping its protection.
fn release(shared: &CowState) {
    shared.lock().held = None;
    shared.cv.notify_all();
}

/// Lift protection on the armed blocks of [start, end) and release the span.
fn lift(shared: &CowState, ri: usize, start: u64, end: u64) -> Result<(), EpochFailure> {
    let bp = shared.opts.block_pages;
    let mut g = shared.lock();
    let (b0, b1) = (start / bp, end.div_ceil(bp));
    let runs = shared.merged_runs(ri, &g.armed[ri], b0, b1);
    let mut result = Ok(());
    for (s, e) in runs {
        let (addr, len) = shared.span(ri, s, e);
        if let Err(err) = shared.uffd.unprotect(addr, len, true) {
            result = Err(err.into());
            break;
        }
    }
    for b in b0..b1 {
        g.armed[ri].unset(b);
    }
    g.held = None;
    drop(g);
    shared.cv.notify_all();
    result
}
