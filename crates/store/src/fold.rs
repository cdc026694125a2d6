//! Folding: keeping every retained epoch's chain within `--max-chain`
//! files, at a write cost that does not grow with the chain.
//!
//! Epochs get a *level* from a ladder of time granularities that nests
//! with the retention tiers (for the default policy: 3.9, 15.6, 62.5 and
//! 250 ms, then 1 s, 4 s, 12 s, 1 min, 4 min, 12 min, 1 h, then steps of 4):
//! an epoch's level is the coarsest granularity whose bucket it closes
//! (it is the newest kept epoch of its bucket, and a newer epoch lies in
//! a later one). Folding an epoch rebases it onto its nearest ancestor of
//! the same level or higher, which copies only the pages of the finer
//! epochs in between. Chains then take the shape of a skip list, a few
//! epochs per level, and each page version is copied about once per
//! level, the coarse levels seldom: this is the paper's multi-granularity
//! merging applied to chain length. Folding is lazy: it happens only where
//! a chain is longer than the limit, so stores that are restored from
//! short chains anyway cost nothing.

use std::collections::{BTreeMap, BTreeSet};

use crate::retain::{Policy, newest_in_buckets};

/// Finest granularity of the ladder, ns.
const FINEST: u64 = 1_000_000;

/// Granularities of the folding levels, finest first, in ns: each a
/// multiple of the one before, with every tier's granularity among them,
/// and steps of 2 to 5 between.
pub(crate) fn ladder(policy: &Policy) -> Vec<u64> {
    let mut stops: Vec<u64> = policy.tiers.iter().filter_map(|t| t.every).collect();
    stops.sort_unstable();
    stops.dedup();
    let mut out = Vec::new();
    // Below the finest tier: quarters while they divide it.
    let first = stops.first().copied().unwrap_or(FINEST);
    let mut below = Vec::new();
    let mut g = first;
    while g.is_multiple_of(4) && g / 4 >= FINEST {
        g /= 4;
        below.push(g);
    }
    out.extend(below.into_iter().rev());
    out.push(first);
    // Between tiers: the largest step of 4, 3, 5, 2 that still divides.
    for &next in stops.iter().skip(1) {
        let mut cur = *out.last().unwrap_or(&first);
        while let Some(step) = [4, 3, 5, 2]
            .into_iter()
            .find(|s| next.is_multiple_of(cur * s) && cur * s < next)
        {
            cur *= step;
            out.push(cur);
        }
        out.push(next);
    }
    // Above the coarsest tier (or for a keep-all policy): steps of 4, up to
    // about a year.
    let mut cur = *out.last().unwrap_or(&first);
    while cur < 365 * 86_400 * 1_000_000_000 {
        cur *= 4;
        out.push(cur);
    }
    out
}

/// Each kept epoch's level: 0, or 1 + the index in `ladder` of the
/// coarsest granularity whose bucket it closes.
pub(crate) fn levels(ladder: &[u64], kept: &[(u64, u64)]) -> BTreeMap<u64, usize> {
    let newest = kept.iter().map(|(_, t)| *t).max().unwrap_or(0);
    let last = newest_in_buckets(ladder.iter().copied(), kept);
    kept.iter()
        .map(|&(id, at)| {
            let level = ladder
                .iter()
                .take_while(|&&g| last.get(&(g, at / g)) == Some(&id) && newest >= (at / g + 1) * g)
                .count();
            (id, level)
        })
        .collect()
}

/// One fold decided by [`bound_chains`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fold {
    /// The epoch rewritten.
    pub id: u64,
    /// Its new parent (`None`: a FULL epoch).
    pub onto: Option<u64>,
    /// Pages it will read, estimated from the headers.
    pub pages: u64,
}

/// Fold until no chain of a `keep` epoch, following `parent` (planned
/// parents after merging, updated in place), is longer than `limit`.
/// `pages` gives each epoch's page count; `ram_pages` is the guest's size
/// in pages (no FULL epoch holds more).
pub(crate) fn bound_chains(
    keep: &BTreeSet<u64>,
    parent: &mut BTreeMap<u64, Option<u64>>,
    limit: usize,
    levels: &BTreeMap<u64, usize>,
    pages: &dyn Fn(u64) -> u64,
    ram_pages: u64,
) -> Vec<Fold> {
    let mut folds = Vec::new();
    if limit == 0 {
        return folds;
    }
    let chain_of = |parent: &BTreeMap<u64, Option<u64>>, id: u64| {
        let mut chain = vec![id];
        let mut at = parent.get(&id).copied().flatten();
        while let Some(a) = at {
            chain.push(a);
            at = parent.get(&a).copied().flatten();
        }
        chain
    };
    let level = |id: u64| levels.get(&id).copied().unwrap_or(0);
    // Page counts as planned: a folded epoch holds what its fold copies.
    let mut planned: BTreeMap<u64, u64> = BTreeMap::new();
    // Oldest first: the first epoch over the limit is folded, and every
    // later epoch of its chain gains with it.
    for &id in keep {
        loop {
            let chain = chain_of(parent, id);
            let d = chain.len();
            if d <= limit {
                break;
            }
            let size = |c: u64| planned.get(&c).copied().unwrap_or_else(|| pages(c));
            // below[i]: pages of chain[i..] (the chain is newest first).
            let mut below = vec![0u64; d + 1];
            for i in (0..d).rev() {
                below[i] = below[i + 1] + size(chain[i]);
            }
            let pick = cheapest_shortcut(&chain, &level, &below);
            // No shortcut: the newest epoch of the chain's highest level
            // has no ancestor of its level (it is the first of a new,
            // coarser level): it goes onto the chain's base, or becomes
            // the new FULL base if that copies as much.
            let top = || {
                (0..d.saturating_sub(2))
                    .filter(|&i| level(chain[i]) > 0)
                    .max_by_key(|&i| (level(chain[i]), std::cmp::Reverse(i)))
            };
            let (xi, onto) = match pick {
                Some((xi, ti)) => (xi, Some(ti)),
                None => match top() {
                    Some(top) => (top, Some(d - 1)),
                    // All one level: rebase this epoch onto its ancestor at
                    // depth limit / 2.
                    None => (0, Some(d - limit / 2)),
                },
            };
            let onto = onto.filter(|&t| t < d && t > xi + 1);
            let est = below[xi] - onto.map_or(0, |t| below[t]);
            // What a FULL copy of the epoch would hold: at least its base,
            // at most every page its chain lists, never more than the guest.
            let full_pages = below[d - 1].max(below[xi].min(ram_pages));
            // Copying half a full epoch anyway: make it full, which also
            // ends the chain there.
            let onto = onto.filter(|_| est * 2 < full_pages).map(|t| chain[t]);
            let x = chain[xi];
            if onto.is_none() && xi + 1 == d {
                break; // already full
            }
            parent.insert(x, onto);
            planned.insert(x, if onto.is_some() { est } else { est.min(full_pages) });
            match folds.iter_mut().find(|f: &&mut Fold| f.id == x) {
                Some(f) => {
                    f.onto = onto;
                    f.pages = f.pages.max(est);
                }
                None => folds.push(Fold {
                    id: x,
                    onto,
                    pages: est,
                }),
            }
        }
    }
    folds
}

/// The fold that shortens `chain` (newest first) at the least copy per
/// epoch it skips: each candidate goes onto its nearest ancestor of its
/// level or higher and copies its own pages and those of the epochs it
/// skips (`below[i]` is the page count of `chain[i..]`). Fine levels thus
/// go first, and a coarse epoch, whose fold copies the union of a long
/// stretch, is folded only when the finer ones no longer suffice.
/// Returns (index of the epoch, index of its new parent).
fn cheapest_shortcut(chain: &[u64], level: &dyn Fn(u64) -> usize, below: &[u64]) -> Option<(usize, usize)> {
    let d = chain.len();
    // Nearest ancestor of level >= chain[i]'s, for every i, with a
    // stack of candidate ancestors scanned from the base.
    let mut target = vec![None; d];
    let mut stack: Vec<usize> = Vec::new();
    for i in (0..d).rev() {
        while stack.last().is_some_and(|&a| level(chain[a]) < level(chain[i])) {
            stack.pop();
        }
        target[i] = stack.last().copied();
        stack.push(i);
    }
    (0..d)
        .filter_map(|i| target[i].filter(|&t| t > i + 1).map(|t| (i, t)))
        .min_by(|&(i, t), &(j, u)| {
            // cost / skipped, compared without division; ties: the
            // higher level, then the older.
            let a = u128::from(below[i] - below[t]) * (u - j - 1) as u128;
            let b = u128::from(below[j] - below[u]) * (t - i - 1) as u128;
            a.cmp(&b).then(level(chain[j]).cmp(&level(chain[i]))).then(j.cmp(&i))
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    #[test]
    fn the_ladder_nests_with_the_tiers() {
        let l = ladder(&Policy::parse("10s:all,1m:1s,1h:1m,1d:1h").unwrap());
        let want = [
            S / 256,
            S / 64,
            S / 16,
            S / 4,
            S,
            4 * S,
            12 * S,
            60 * S,
            240 * S,
            720 * S,
            3600 * S,
            4 * 3600 * S,
            16 * 3600 * S,
        ];
        assert_eq!(&l[..want.len()], &want);
        assert!(l.windows(2).all(|w| w[1] % w[0] == 0 && w[1] / w[0] <= 5));
        let all = ladder(&Policy::keep_all());
        assert_eq!(all[0], MS);
        assert!(all.windows(2).all(|w| w[1] == 4 * w[0]));
    }

    #[test]
    fn an_epoch_closing_a_bucket_takes_its_level() {
        let lad = [S, 4 * S];
        // 0.5 s, 0.9 s (closes second 0), 1.5 s (closes second 1), 3.9 s
        // (closes second 3 and the 4 s bucket), 4.2 s (newest: closes
        // nothing).
        let kept = [
            (1, S / 2),
            (2, 9 * S / 10),
            (3, 3 * S / 2),
            (4, 39 * S / 10),
            (5, 42 * S / 10),
        ];
        let l = levels(&lad, &kept);
        assert_eq!(l.values().copied().collect::<Vec<_>>(), [0, 1, 1, 2, 0]);
    }

    type Linear = (BTreeSet<u64>, BTreeMap<u64, Option<u64>>, Vec<(u64, u64)>);

    /// A linear chain of `n` kept epochs, 20 ms apart: kept set, parents,
    /// capture times.
    fn linear(n: u64) -> Linear {
        let keep: BTreeSet<u64> = (1..=n).collect();
        let parent = (1..=n).map(|i| (i, (i > 1).then(|| i - 1))).collect();
        let times = (1..=n).map(|i| (i, i * 20 * MS)).collect();
        (keep, parent, times)
    }

    fn depth(parent: &BTreeMap<u64, Option<u64>>, id: u64) -> usize {
        let mut d = 1;
        let mut at = parent[&id];
        while let Some(a) = at {
            d += 1;
            at = parent[&a];
        }
        d
    }

    #[test]
    fn folding_bounds_every_chain_and_copies_little() {
        // 600 epochs at 20 ms (12 s, all kept), 10 pages each, full 100,000.
        let (keep, mut parent, times) = linear(600);
        let lad = ladder(&Policy::parse("10s:all,1m:1s,1h:1m,1d:1h").unwrap());
        let lv = levels(&lad, &times);
        let pages = |id: u64| if id == 1 { 100_000 } else { 10 };
        let folds = bound_chains(&keep, &mut parent, 24, &lv, &pages, 100_000);
        for &id in &keep {
            assert!(depth(&parent, id) <= 24, "epoch {id}: {}", depth(&parent, id));
        }
        assert!(
            folds.iter().all(|f| f.onto.is_some()),
            "a fold rewrote a full epoch: {folds:?}"
        );
        let copied: u64 = folds.iter().map(|f| f.pages).sum();
        // Each epoch's pages copied a few times (once per level), never
        // the 100,000-page base.
        assert!(copied < 600 * 10 * 8, "{copied} pages copied by {} folds", folds.len());
    }

    #[test]
    fn large_coarse_epochs_are_left_alone_while_folding_fine_ones_suffices() {
        // The default policy 10 min into a run at 20 ms: a FULL base, nine
        // minute epochs of 40,000 pages (each the union of a minute), 60
        // one-second epochs of 1,200 and 500 epochs of 20 ms of 25.
        let mut times = vec![(1, 0)];
        times.extend((2..=10).map(|i| (i, (i - 1) * 60 * S)));
        times.extend((11..=70).map(|i| (i, 540 * S + (i - 10) * S)));
        times.extend((71..=570).map(|i| (i, 600 * S + (i - 70) * 20 * MS)));
        let keep: BTreeSet<u64> = times.iter().map(|t| t.0).collect();
        let mut parent: BTreeMap<u64, Option<u64>> = keep.iter().map(|&i| (i, (i > 1).then(|| i - 1))).collect();
        let pages = |id: u64| match id {
            1 => 60_000,
            2..=10 => 40_000,
            11..=70 => 1_200,
            _ => 25,
        };
        let lv = levels(&ladder(&Policy::parse(crate::DEFAULT_POLICY).unwrap()), &times);
        let folds = bound_chains(&keep, &mut parent, 64, &lv, &pages, 262_144);
        assert!(keep.iter().all(|&id| depth(&parent, id) <= 64));
        assert!(folds.iter().all(|f| f.id > 10), "a minute epoch was folded: {folds:?}");
        let copied: u64 = folds.iter().map(|f| f.pages).sum();
        // Two 12 s folds in the one-second tier (14,400 pages each) and the
        // 20 ms tier's own levels up to 4 s: less than folding one minute
        // epoch would copy (picking the coarsest level first, as before,
        // made minute epoch 8 FULL and copied 280,000 pages).
        assert!(copied < 80_000, "{copied} pages copied by {} folds", folds.len());
    }

    #[test]
    fn a_chain_with_no_levels_is_cut_in_half() {
        let (keep, mut parent, _) = linear(100);
        let lv = BTreeMap::new();
        let folds = bound_chains(&keep, &mut parent, 16, &lv, &|_| 1, 1000);
        assert!(keep.iter().all(|&id| depth(&parent, id) <= 16));
        assert!(!folds.is_empty());
    }

    #[test]
    fn a_fold_that_copies_half_a_full_epoch_makes_it_full() {
        let (keep, mut parent, times) = linear(40);
        let lad = ladder(&Policy::keep_all());
        let lv = levels(&lad, &times);
        // Every epoch as large as the full one.
        let folds = bound_chains(&keep, &mut parent, 8, &lv, &|_| 100, 100);
        assert!(folds.iter().any(|f| f.onto.is_none()), "{folds:?}");
        assert!(keep.iter().all(|&id| depth(&parent, id) <= 8));
    }
}
