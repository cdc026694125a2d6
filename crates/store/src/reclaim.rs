//! Space reclamation: merging epochs that fall out of the retention policy
//! into the next retained epoch, and folding long chains, by rewriting
//! epoch files; then removing the epochs nothing needs any more.
//!
//! One operation does both: *rebase* epoch N onto an older ancestor A (or
//! onto nothing: a FULL epoch). The new N holds every page that N and the
//! epochs between N and A list, each from the newest of them, so it
//! restores to exactly what N restored to. It is written under a temporary
//! name and committed over N like any epoch (fsync, rename, fsync of the
//! directory). Epochs are removed only after every rebase of the pass has
//! committed, newest first, so at every instant each file present is an
//! epoch whose chain is intact: a crash at any point loses nothing that is
//! retained, and leaves at most a temporary file that the next writer
//! removes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::codec::Codec;
use crate::cursor::PageCursor;
use crate::error::{Result, StoreError};
use crate::fold;
use crate::format::{Header, PAGE};
use crate::ledger::Ledger;
use crate::plan::{Covered, Run, Source, claims, plan};
use crate::reader::EpochReader;
use crate::retain::Policy;
use crate::store::Store;
use crate::writer::{EpochMeta, EpochWriter};

/// Default `--max-chain`: the most files a restore of a retained epoch
/// reads (see docs/DESIGN.md for the measurement behind it).
pub const DEFAULT_MAX_CHAIN: usize = 64;

/// What a reclamation pass keeps and how.
#[derive(Debug, Clone)]
pub struct ReclaimOptions {
    /// Which epochs to keep.
    pub policy: Policy,
    /// Fold chains longer than this (0 = never fold).
    pub max_chain: usize,
    /// Limit reads plus writes to this many bytes per second.
    pub rate: Option<u64>,
    /// Compression of rewritten epochs; `None` keeps each epoch's own.
    pub codec: Option<Codec>,
    /// Let dropped epochs wait until their whole bucket can merge at once
    /// ([`Policy::waiting`]): for the reclaimer of a running store, whose
    /// passes come every fraction of a second. Off, a pass leaves exactly
    /// the policy's epochs (offline compaction).
    pub batch_merges: bool,
    /// Bound on the store's size (`--max-store`): while the epochs the
    /// policy keeps would take more, the oldest of them go too (never the
    /// newest or a pinned one), so that the store stays under it.
    pub max_store: Option<u64>,
    /// Room to leave under `max_chain` and `max_store` for what the writer
    /// adds before the next pass ends (a running store's reclaimer
    /// measures it); RECLAIM records the bounds without it.
    pub headroom: Headroom,
}

/// Epochs and bytes a running store gains between the starts of two
/// reclamation passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    /// Epochs (each lengthens the newest chain by one).
    pub epochs: usize,
    /// Bytes of epoch files.
    pub bytes: u64,
}

impl Default for ReclaimOptions {
    fn default() -> Self {
        ReclaimOptions {
            policy: Policy::default(),
            max_chain: DEFAULT_MAX_CHAIN,
            rate: None,
            codec: None,
            batch_merges: false,
            max_store: None,
            headroom: Headroom::default(),
        }
    }
}

/// Pages a cursor reads at a time while rewriting.
const WINDOW: u64 = 256;

/// One planned rebase.
#[derive(Debug, Clone, Copy)]
struct Rebase {
    id: u64,
    onto: Option<u64>,
    fold: bool,
    /// `onto` is not an ancestor of `id` (see [`cross_base`]).
    cross: bool,
    /// Estimated bytes to read and write, for progress.
    bytes: u64,
}

/// What a pass will do, computed from the headers alone.
#[derive(Debug, Default)]
struct Plan {
    keep: BTreeSet<u64>,
    rebases: Vec<Rebase>,
    remove: Vec<u64>,
    /// Epochs the policy keeps that go for `max_store`.
    evicted: u64,
}

struct Throttle {
    rate: Option<u64>,
    started: Instant,
    bytes: u64,
}

impl Throttle {
    fn account(&mut self, n: u64, stop: &AtomicBool) {
        self.bytes += n;
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return;
        };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        while self.started.elapsed() < due && !stop.load(Ordering::Relaxed) {
            std::thread::sleep((due - self.started.elapsed()).min(Duration::from_millis(50)));
        }
    }
}

fn healthy(store: &Store) -> Result<BTreeMap<u64, (Header, u64)>> {
    // A writer may commit epochs while the directory is read, and readdir
    // may return an epoch added meanwhile without its parent, added just
    // before it. Every epoch up to the newest one a first listing saw was
    // committed before the second listing began (commits are in order),
    // so the second listing, cut at that bound, sees each whole chain.
    let bound = store.ids()?.last().copied().unwrap_or(0);
    let mut heads = BTreeMap::new();
    for (id, info) in store.list_cached()?.into_iter().filter(|(id, _)| *id <= bound) {
        let info = info.map_err(|e| StoreError::Corrupt {
            path: store.epoch_path(id),
            why: format!("reclamation needs every epoch intact, and this one is not ({e}); run `consnap verify`"),
        })?;
        heads.insert(id, (info.header, info.file_bytes));
    }
    for (id, (h, _)) in &heads {
        if !h.is_full() && !heads.contains_key(&h.parent) {
            return Err(StoreError::MissingParent {
                dir: store.dir().to_path_buf(),
                id: *id,
                parent: h.parent,
            });
        }
    }
    Ok(heads)
}

fn plan_pass(heads: &BTreeMap<u64, (Header, u64)>, opts: &ReclaimOptions, pinned: &[u64]) -> Plan {
    let times: Vec<(u64, u64)> = heads.iter().map(|(id, (h, _))| (*id, h.created_ns)).collect();
    let mut keep = opts.policy.retained(&times);
    if opts.batch_merges {
        keep.extend(opts.policy.waiting(&times));
    }
    keep.extend(pinned.iter().filter(|p| heads.contains_key(p)));
    let evicted = opts.max_store.map_or(0, |cap| {
        // Room for what the store gains until the next pass; and merging
        // the rest into what is kept grows it: aim a fifth lower (below
        // where the writer waits, `Usage::at_bounds`).
        let target = cap.saturating_sub(opts.headroom.bytes) / 10 * 8;
        evict_for_space(heads, &mut keep, pinned, target)
    });
    let pages = |id: u64| heads.get(&id).map_or(0, |(h, _)| h.pages_data);
    // The parent each kept epoch will have: its nearest kept ancestor, or
    // none when the chain's full epoch is not kept.
    let mut parent: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    let mut rebases: BTreeMap<u64, Rebase> = BTreeMap::new();
    let mut planned: BTreeMap<u64, u64> = BTreeMap::new();
    for &id in &keep {
        let (h, _) = &heads[&id];
        let mut onto = None;
        let mut bytes = pages(id);
        let mut at = h;
        while !at.is_full() {
            if keep.contains(&at.parent) {
                onto = Some(at.parent);
                break;
            }
            bytes += pages(at.parent);
            at = &heads[&at.parent].0;
        }
        let current = (!h.is_full()).then_some(h.parent);
        // Its chain's base is going: rather than a FULL copy, a diff
        // against another kept epoch that shares an ancestor with it.
        if onto.is_none()
            && !h.is_full()
            && let Some((y, est)) = cross_base(heads, &keep, id, &pages)
            && est * 2 < pages_of_root(heads, id)
        {
            (onto, bytes) = (Some(y), est);
        }
        parent.insert(id, onto);
        if onto != current {
            // What the epoch will hold, for the fold step's estimates.
            planned.insert(
                id,
                if onto.is_none() {
                    pages_of_root(heads, id).max(bytes)
                } else {
                    bytes
                },
            );
            rebases.insert(
                id,
                Rebase {
                    id,
                    onto,
                    fold: false,
                    cross: false,
                    bytes: bytes * PAGE as u64,
                },
            );
        }
    }
    // Fold: no kept epoch's chain may be longer than max_chain (fold.rs).
    let kept_times: Vec<(u64, u64)> = times.iter().filter(|(id, _)| keep.contains(id)).copied().collect();
    let levels = fold::levels(&fold::ladder(&opts.policy), &kept_times);
    let planned_pages = |id: u64| planned.get(&id).copied().unwrap_or_else(|| pages(id));
    let ram_pages = heads.values().map(|(h, _)| h.mem_size / PAGE as u64).max().unwrap_or(0);
    // Chains grow by one an epoch until the next pass ends: fold below the
    // bound by that much, but never below half of it (folding to chains
    // much shorter rewrites nearly every epoch as a full one).
    let max_chain = match opts.max_chain {
        0 => 0,
        m => m.saturating_sub(opts.headroom.epochs).max(m.div_ceil(2)),
    };
    for f in fold::bound_chains(&keep, &mut parent, max_chain, &levels, &planned_pages, ram_pages) {
        let r = rebases.entry(f.id).or_insert(Rebase {
            id: f.id,
            onto: f.onto,
            fold: true,
            cross: false,
            bytes: 0,
        });
        r.onto = f.onto;
        r.fold = true;
        r.bytes = r.bytes.max(f.pages * PAGE as u64);
    }
    let remove = heads.keys().rev().copied().filter(|id| !keep.contains(id)).collect();
    // Rebases onto an epoch outside the current chain go first, while the
    // ancestor they share with it is still in both chains.
    let mut rebases: Vec<Rebase> = rebases.into_values().collect();
    for r in &mut rebases {
        r.cross = r.onto.is_some_and(|a| !descends(heads, r.id, a));
    }
    rebases.sort_by_key(|r| (!r.cross, r.id));
    Plan {
        keep,
        rebases,
        remove,
        evicted,
    }
}

/// Take the oldest kept epochs out of `keep` (never the newest epoch or a
/// pinned one) while what is kept takes more than `cap` bytes. The
/// estimate is the kept files' sizes: merging the rest into them changes
/// it a little either way, and the next pass corrects what this one
/// misjudged. Returns how many were taken out.
fn evict_for_space(heads: &BTreeMap<u64, (Header, u64)>, keep: &mut BTreeSet<u64>, pinned: &[u64], cap: u64) -> u64 {
    let newest = heads.keys().next_back().copied();
    let size = |id: &u64| heads.get(id).map_or(0, |(_, b)| *b);
    let mut kept: u64 = keep.iter().map(size).sum();
    let mut evicted = 0;
    let oldest_first: Vec<u64> = keep.iter().copied().collect();
    for id in oldest_first {
        if kept <= cap {
            break;
        }
        if Some(id) == newest || pinned.contains(&id) {
            continue;
        }
        keep.remove(&id);
        kept = kept.saturating_sub(size(&id));
        evicted += 1;
    }
    evicted
}

/// How big a store is and how long its chains are: what `--max-store`
/// and `--max-chain` bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Epochs.
    pub epochs: u64,
    /// Bytes of epoch files.
    pub bytes: u64,
    /// Files a restore of the epoch with the longest chain reads.
    pub longest_chain: u64,
}

impl Usage {
    /// Whether the store is at its bounds: within a tenth of `max_store`
    /// (room for the epoch being written and for a pass's rewrites, which
    /// are committed before the epochs they merge are removed: a rebased
    /// full epoch can be a twentieth of the bound), or with a chain of
    /// `max_chain` files (the next epoch would make it longer). The writer
    /// waits and the reclaimer hurries while this holds; both ask here.
    pub fn at_bounds(&self, max_store: Option<u64>, max_chain: usize) -> bool {
        max_store.is_some_and(|m| self.bytes > m - m / 10) || (max_chain > 0 && self.longest_chain >= max_chain as u64)
    }
}

/// The store's [`Usage`], from its headers (cached between calls).
pub fn usage(store: &Store) -> Result<Usage> {
    usage_since(store, u64::MAX).map(|(u, _)| u)
}

/// The store's [`Usage`] and the bytes of its epochs newer than `since`.
pub fn usage_since(store: &Store, since: u64) -> Result<(Usage, u64)> {
    let mut newer = 0;
    let mut u = Usage::default();
    let mut parents: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    for (id, info) in store.list_cached()? {
        let Ok(info) = info else { continue };
        u.epochs += 1;
        u.bytes += info.file_bytes;
        if id > since {
            newer += info.file_bytes;
        }
        parents.insert(id, (!info.header.is_full()).then_some(info.header.parent));
    }
    // Chain lengths, oldest first (parents are older): one step each.
    let mut len: BTreeMap<u64, u64> = BTreeMap::new();
    for (id, parent) in &parents {
        let l = match parent {
            None => 1,
            Some(p) => len.get(p).map_or(1, |pl| pl + 1),
        };
        len.insert(*id, l);
        u.longest_chain = u.longest_chain.max(l);
    }
    Ok((u, newer))
}

/// Pages of the FULL epoch at the end of `id`'s current chain.
fn pages_of_root(heads: &BTreeMap<u64, (Header, u64)>, id: u64) -> u64 {
    let mut at = heads.get(&id).map(|(h, _)| h);
    while let Some(h) = at {
        if h.is_full() {
            return h.pages_data;
        }
        at = heads.get(&h.parent).map(|(h, _)| h);
    }
    0
}

/// For a kept epoch `id` whose chain keeps no epoch (its base is going):
/// the kept epoch older than it that shares the nearest common ancestor
/// with it at the least cost, and that cost in pages. Rebased onto such an
/// epoch Y, `id` must list every page its chain lists above the common
/// ancestor C and every page Y's chain lists above C, each as `id` has it:
/// elsewhere both equal C. This turns what would be a FULL rewrite of each
/// epoch built on an expiring base into a small diff (the oldest of them
/// still becomes FULL).
fn cross_base(
    heads: &BTreeMap<u64, (Header, u64)>,
    keep: &BTreeSet<u64>,
    id: u64,
    pages: &dyn Fn(u64) -> u64,
) -> Option<(u64, u64)> {
    // Cost of `id`'s own side up to each of its ancestors.
    let mut cost_x = BTreeMap::new();
    let (mut at, mut sum) = (id, 0);
    loop {
        cost_x.insert(at, sum);
        let (h, _) = heads.get(&at)?;
        if h.is_full() {
            break;
        }
        sum += pages(at);
        at = h.parent;
    }
    keep.range(..id)
        .rev()
        .take(16)
        .filter_map(|&y| {
            let (mut at, mut cost_y) = (y, 0);
            loop {
                if let Some(cx) = cost_x.get(&at) {
                    return Some((y, cx + cost_y));
                }
                let (h, _) = heads.get(&at)?;
                if h.is_full() {
                    return None;
                }
                cost_y += pages(at);
                at = h.parent;
            }
        })
        .min_by_key(|&(_, c)| c)
}

/// Progress of a pass: bytes done and the estimated total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Run one reclamation pass over `store` (which must be open for
/// writing): keep what `opts.policy` and `pinned` ask for, merge the rest
/// into the epochs kept, fold chains longer than `opts.max_chain`, remove
/// what is no longer needed, and add the figures to `DIR/RECLAIM`.
/// Returns this pass's figures. Setting `stop` ends the pass early (an
/// unfinished rewrite is discarded; nothing retained is lost).
pub fn reclaim(
    store: &Store,
    opts: &ReclaimOptions,
    pinned: &[u64],
    stop: &AtomicBool,
    progress: Progress<'_>,
) -> Result<Ledger> {
    if !store.is_writer() {
        return Err(StoreError::Usage("reclamation needs the store's lock"));
    }
    let started = Instant::now();
    record_settings(store, opts)?;
    let heads = healthy(store)?;
    let plan = plan_pass(&heads, opts, pinned);
    let mut pass = Ledger {
        passes: 1,
        evicted: plan.evicted,
        ..Ledger::default()
    };
    let total: u64 = plan.rebases.iter().map(|r| r.bytes).sum::<u64>() * 2;
    let mut throttle = Throttle {
        rate: opts.rate,
        started,
        bytes: 0,
    };
    let mut done = 0;
    for r in &plan.rebases {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        rebase(
            store,
            r,
            &plan.keep,
            opts.codec,
            &mut pass,
            &mut throttle,
            stop,
            &mut |n| {
                done += n;
                progress(done, total.max(done));
            },
        )?;
    }
    let finished = plan.rebases.iter().all(|r| pass_done(store, r));
    if finished && !stop.load(Ordering::Relaxed) {
        for id in &plan.remove {
            let path = store.epoch_path(*id);
            let size = heads.get(id).map_or(0, |(_, s)| *s);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::error::io(&path, "remove")(e)),
            }
            pass.bytes_freed += size;
            let needed = plan.keep.iter().any(|k| descends(&heads, *k, *id));
            if needed {
                pass.merged += 1;
            } else {
                pass.dropped += 1;
            }
        }
        if !plan.remove.is_empty() {
            crate::durable::fsync_dir(&store.dir().join("epochs"))?;
        }
    }
    pass.time_ns = started.elapsed().as_nanos() as u64;
    if pass.rewrites + pass.merged + pass.dropped > 0 {
        tracing::debug!(evicted = pass.evicted, "reclamation pass");
        let mut ledger = crate::ledger::Ledger::load(store.dir())
            .ok()
            .flatten()
            .unwrap_or_default();
        ledger.add(&pass);
        ledger.policy = opts.policy.text().to_string();
        ledger.max_chain = u32::try_from(opts.max_chain).unwrap_or(u32::MAX);
        ledger.save(store.dir())?;
    } else {
        pass.passes = 0;
    }
    Ok(pass)
}

/// Record `opts`' policy and `--max-chain` in RECLAIM before any epoch is
/// rewritten or removed, when they differ from what it holds: a pass cut
/// short (kill -9) must leave the settings that chose what it removed, or
/// the next pass could run with others and drop what the user kept.
fn record_settings(store: &Store, opts: &ReclaimOptions) -> Result<()> {
    let mut ledger = crate::ledger::Ledger::load(store.dir())?.unwrap_or_default();
    let max_chain = u32::try_from(opts.max_chain).unwrap_or(u32::MAX);
    if ledger.policy == opts.policy.text() && ledger.max_chain == max_chain {
        return Ok(());
    }
    ledger.policy = opts.policy.text().to_string();
    ledger.max_chain = max_chain;
    ledger.save(store.dir())
}

/// True when epoch `r.id` now has the parent the plan gave it.
fn pass_done(store: &Store, r: &Rebase) -> bool {
    crate::reader::read_header(&store.epoch_path(r.id))
        .is_ok_and(|(h, _)| (if h.is_full() { None } else { Some(h.parent) }) == r.onto)
}

/// Whether `id` has `ancestor` in its original chain.
fn descends(heads: &BTreeMap<u64, (Header, u64)>, id: u64, ancestor: u64) -> bool {
    let mut at = heads.get(&id).map(|(h, _)| h);
    while let Some(h) = at {
        if h.is_full() {
            return false;
        }
        if h.parent == ancestor {
            return true;
        }
        at = heads.get(&h.parent).map(|(h, _)| h);
    }
    false
}

/// Rewrite epoch `r.id` onto `r.onto`.
#[allow(clippy::too_many_arguments)]
fn rebase(
    store: &Store,
    r: &Rebase,
    keep: &BTreeSet<u64>,
    codec: Option<Codec>,
    pass: &mut Ledger,
    throttle: &mut Throttle,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let chain = store.chain(r.id)?;
    let cut = match r.onto {
        None => chain.len(),
        Some(_) if r.cross => chain.len(),
        Some(a) => chain
            .iter()
            .position(|e| e.header().id == a)
            .ok_or_else(|| StoreError::Corrupt {
                path: store.epoch_path(r.id),
                why: format!("epoch {a} is not in the chain of epoch {}", r.id),
            })?,
    };
    let (sub, runs, between) = match (r.cross, r.onto) {
        (true, Some(y)) => {
            let (runs, between) = cross_runs(store, &chain, y)?;
            (&chain[..], runs, between)
        }
        _ => {
            let sub = &chain[..cut];
            let runs = if r.onto.is_none() { plan(sub)? } else { claims(sub) };
            (sub, runs, sub.len())
        }
    };
    let head = sub[0].header().clone();
    let merged = head.merged
        + sub[1..between]
            .iter()
            .filter(|e| !keep.contains(&e.header().id))
            .map(|e| 1 + e.header().merged)
            .sum::<u64>();
    debug_assert_eq!(head.id, r.id);
    let meta = EpochMeta::rewrite_of(&head, r.onto);
    let mut w = store.rewriter(meta)?;
    w.compress(codec.unwrap_or(head.codec))?;
    w.use_direct_io();
    w.set_merged(merged);
    w.write_state(&sub[0].state()?)?;
    let read = copy_runs(&mut w, sub, runs, |moved| {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        throttle.account(moved, stop);
        progress(moved);
        true
    })?;
    let Some(read) = read else {
        return Ok(());
    };
    let old = sub[0].file_len();
    let info = w.commit(head.pause_ns)?;
    pass.rewrites += 1;
    if r.fold {
        pass.folds += 1;
    }
    pass.bytes_freed += old;
    pass.bytes_written += info.file_bytes;
    pass.bytes_read += read;
    Ok(())
}

/// Write the pages of `runs` (sources in `sub`) into `w`, each run's data
/// from the epoch that holds it. `each(bytes moved)` is called as data
/// goes through and may stop the copy (returning false): then `None`;
/// else the bytes read.
pub(crate) fn copy_runs(
    w: &mut EpochWriter,
    sub: &[EpochReader],
    runs: Vec<Run>,
    mut each: impl FnMut(u64) -> bool,
) -> Result<Option<u64>> {
    let mut cursors: Vec<PageCursor<'_>> = sub.iter().map(|e| PageCursor::new(e, WINDOW)).collect();
    for run in runs {
        match run.source {
            Source::Zero => w.zero_pages(run.gfn, run.count)?,
            Source::Data { epoch, page } => {
                let mut done = 0;
                while done < run.count {
                    let n = (run.count - done).min(WINDOW);
                    let bytes = cursors[epoch].pages(page + done, n)?;
                    w.data_pages(run.gfn + done, bytes)?;
                    done += n;
                    if !each(2 * n * PAGE as u64) {
                        return Ok(None);
                    }
                }
            }
        }
    }
    Ok(Some(cursors.iter().map(|c| c.bytes_read).sum()))
}

/// Pages to write when rebasing the epoch of `chain` onto `y`, which is
/// not in its chain (see [`cross_base`]), with their sources in `chain`;
/// and how many epochs of `chain` lie above the common ancestor.
fn cross_runs(store: &Store, chain: &[crate::reader::EpochReader], y: u64) -> Result<(Vec<Run>, usize)> {
    let all = plan(chain)?;
    let ychain = store.chain(y)?;
    let common = ychain.iter().enumerate().find_map(|(cy, e)| {
        let id = e.header().id;
        chain.iter().position(|x| x.header().id == id).map(|cx| (cx, cy))
    });
    let Some((cx, cy)) = common else {
        // No common ancestor (cannot happen for a planned cross rebase):
        // every page, which is a correct diff against anything.
        return Ok((all, chain.len()));
    };
    let mut want = Covered::default();
    for r in claims(&chain[..cx]).into_iter().chain(claims(&ychain[..cy])) {
        want.claim(r.gfn, r.gfn + r.count);
    }
    let want: Vec<(u64, u64)> = want.intervals().collect();
    Ok((intersect(&all, &want), cx))
}

/// The parts of `runs` (ascending, disjoint) inside `ranges` (ascending,
/// disjoint, half-open), with their data sources shifted to match.
fn intersect(runs: &[Run], ranges: &[(u64, u64)]) -> Vec<Run> {
    let mut out = Vec::new();
    let mut i = 0;
    for run in runs {
        let end = run.gfn + run.count;
        while i < ranges.len() && ranges[i].1 <= run.gfn {
            i += 1;
        }
        let mut j = i;
        while j < ranges.len() && ranges[j].0 < end {
            let (a, b) = (ranges[j].0.max(run.gfn), ranges[j].1.min(end));
            let source = match run.source {
                Source::Zero => Source::Zero,
                Source::Data { epoch, page } => Source::Data {
                    epoch,
                    page: page + (a - run.gfn),
                },
            };
            out.push(Run {
                gfn: a,
                count: b - a,
                source,
            });
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersect_cuts_runs_and_shifts_their_sources() {
        let runs = [
            Run {
                gfn: 0,
                count: 10,
                source: Source::Data { epoch: 1, page: 100 },
            },
            Run {
                gfn: 10,
                count: 5,
                source: Source::Zero,
            },
            Run {
                gfn: 20,
                count: 4,
                source: Source::Data { epoch: 0, page: 7 },
            },
        ];
        let got = intersect(&runs, &[(2, 4), (8, 12), (21, 22), (30, 40)]);
        let want = [
            (2, 2, Source::Data { epoch: 1, page: 102 }),
            (8, 2, Source::Data { epoch: 1, page: 108 }),
            (10, 2, Source::Zero),
            (21, 1, Source::Data { epoch: 0, page: 8 }),
        ];
        let got: Vec<_> = got.iter().map(|r| (r.gfn, r.count, r.source)).collect();
        assert_eq!(got, want);
    }
}
