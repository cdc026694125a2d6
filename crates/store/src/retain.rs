//! Retention policies: which epochs a store keeps as they age.
//!
//! A policy is a list of tiers, youngest first, such as
//! `10s:all,1m:1s,1h:1m,1d:1h`: every epoch of the last 10 s, then one per
//! second up to 1 minute old, one per minute up to 1 hour, one per hour up
//! to 1 day; older epochs go. Ages count back from the newest epoch's
//! capture time (the store's "now"), so a store that nobody writes keeps
//! its shape. Within a tier of granularity G, time is cut into buckets
//! `[k·G, (k+1)·G)` of Unix time, and an epoch is kept when no other epoch
//! of the store is newer in the same bucket. Each granularity must be a
//! multiple of the previous one, so buckets nest and an epoch kept at a
//! coarse tier was also kept at every finer one: no epoch is ever needed
//! after it was dropped. The newest epoch is always kept.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

/// The default policy (see docs/DESIGN.md, Snapshot store, for why).
pub const DEFAULT_POLICY: &str = "10s:all,1m:1s,1h:1m,1d:1h";

/// One tier: epochs up to `span` old, one per `every` (all if `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Oldest age in this tier, ns.
    pub span: u64,
    /// Granularity, ns; `None` keeps every epoch.
    pub every: Option<u64>,
}

/// A parsed `--retain` policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Tiers, youngest first; empty keeps every epoch forever.
    pub tiers: Vec<Tier>,
    text: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::parse(DEFAULT_POLICY).unwrap_or_else(|_| Policy::keep_all())
    }
}

/// Most tiers a policy may have.
const MAX_TIERS: usize = 16;
/// Longest span a policy may name (10 years).
const MAX_SPAN: u64 = 10 * 366 * 86_400 * 1_000_000_000;

/// Why a `--retain` policy is refused; each names the tier at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// Nothing was given.
    #[error("the policy is empty (example: 10s:all,1m:1s,1h:1m)")]
    Empty,
    /// A tier without its colon.
    #[error("tier {tier} '{part}' is not SPAN:EVERY (such as 1m:1s or 10s:all)")]
    NotSpanEvery {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
    },
    /// A duration with no unit, or one policies do not know.
    #[error(
        "tier {tier} '{part}': '{text}' is not a duration (a whole number and ms, s, m, h, d or w, such as 10s or 24h)"
    )]
    Unit {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
        /// The duration as given.
        text: String,
    },
    /// A duration whose number is not a whole number.
    #[error("tier {tier} '{part}': '{text}' is not a duration (a whole number and a unit, such as 10s)")]
    Number {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
        /// The duration as given.
        text: String,
    },
    /// A duration beyond [`MAX_SPAN`].
    #[error("tier {tier} '{part}': '{text}' is longer than 10 years")]
    TooLong {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
        /// The duration as given.
        text: String,
    },
    /// A duration of zero.
    #[error("tier {tier} '{part}': '{text}' is zero: every duration in a policy must be longer")]
    Zero {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
        /// The duration as given.
        text: String,
    },
    /// A tier that ends before the one before it.
    #[error("tier {tier} '{part}' must reach further back than the tier before it")]
    NotFurther {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
    },
    /// `all` after a thinned tier.
    #[error(
        "tier {tier} '{part}' keeps all epochs, but an earlier tier already thinned them out (tiers go from fine to coarse)"
    )]
    AllAfterThinned {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
    },
    /// A granularity that is no multiple of the previous tier's.
    #[error(
        "tier {tier} '{part}': its granularity must be a multiple of the previous tier's, so that an epoch kept now is still wanted later"
    )]
    NotAMultiple {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
    },
    /// A granularity coarser than the tier's span.
    #[error("tier {tier} '{part}': one epoch per {} ms is coarser than the tier's own span", .every_ns / 1_000_000)]
    Coarser {
        /// 1-based.
        tier: usize,
        /// The tier as given.
        part: String,
        /// Its granularity, ns.
        every_ns: u64,
    },
    /// More than [`MAX_TIERS`] tiers.
    #[error("more than {MAX_TIERS} tiers")]
    TooManyTiers,
}

/// Parse `500ms`, `10s`, `2m`, `24h`, `7d`, `2w` into ns (whole numbers
/// only): `text` of tier `tier` (1-based), `part` as given.
fn duration(text: &str, tier: usize, part: &str) -> Result<u64, PolicyError> {
    let (t, p) = (text.to_string(), part.to_string());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = text.split_at(digits);
    let unit_ns: u64 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        "w" => 7 * 86_400_000_000_000,
        _ => return Err(PolicyError::Unit { tier, part: p, text: t }),
    };
    let Ok(n) = num.parse::<u64>() else {
        return Err(PolicyError::Number { tier, part: p, text: t });
    };
    let Some(ns) = n.checked_mul(unit_ns).filter(|&v| v <= MAX_SPAN) else {
        return Err(PolicyError::TooLong { tier, part: p, text: t });
    };
    if ns == 0 {
        return Err(PolicyError::Zero { tier, part: p, text: t });
    }
    Ok(ns)
}

impl Policy {
    /// Keep every epoch (`--retain all`): no epoch is ever merged away.
    pub fn keep_all() -> Policy {
        Policy {
            tiers: Vec::new(),
            text: "all".into(),
        }
    }

    /// Parse a policy such as `10s:all,1m:1s,1h:1m,1d:1h`, or `all`.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let text = text.trim();
        if text == "all" {
            return Ok(Policy::keep_all());
        }
        if text.is_empty() {
            return Err(PolicyError::Empty);
        }
        let mut tiers: Vec<Tier> = Vec::new();
        for (i, part) in text.split(',').enumerate() {
            let tier = i + 1;
            let at = || part.to_string();
            let (span, every) = part
                .split_once(':')
                .ok_or_else(|| PolicyError::NotSpanEvery { tier, part: at() })?;
            let span = duration(span, tier, part)?;
            let every = match every {
                "all" => None,
                e => Some(duration(e, tier, part)?),
            };
            if let Some(prev) = tiers.last() {
                if span <= prev.span {
                    return Err(PolicyError::NotFurther { tier, part: at() });
                }
                match (prev.every, every) {
                    (Some(_), None) => return Err(PolicyError::AllAfterThinned { tier, part: at() }),
                    (Some(p), Some(e)) if e % p != 0 => return Err(PolicyError::NotAMultiple { tier, part: at() }),
                    _ => {}
                }
            }
            if let Some(every_ns) = every.filter(|&e| e > span) {
                return Err(PolicyError::Coarser {
                    tier,
                    part: at(),
                    every_ns,
                });
            }
            tiers.push(Tier { span, every });
            if tiers.len() > MAX_TIERS {
                return Err(PolicyError::TooManyTiers);
            }
        }
        Ok(Policy {
            tiers,
            text: text.to_string(),
        })
    }

    /// The policy as given.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// True for `all`.
    pub fn keeps_all(&self) -> bool {
        self.tiers.is_empty()
    }

    /// The tier an epoch of `age_ns` falls in, `None` past the last one.
    pub fn tier_of(&self, age_ns: u64) -> Option<usize> {
        if self.keeps_all() {
            return Some(0);
        }
        self.tiers.iter().position(|t| age_ns <= t.span)
    }

    /// A tier's name for listings: `10s:all`, or `all` for a keep-all policy.
    pub fn tier_name(&self, tier: usize) -> String {
        if self.keeps_all() {
            return "all".into();
        }
        self.text.split(',').nth(tier).unwrap_or("").to_string()
    }

    /// How old a kept epoch must be before the finest tier has settled
    /// whether it stays: that tier's span when it keeps every epoch (a
    /// younger one may still be thinned out), its granularity otherwise
    /// (the bucket has closed); 0 for `all`.
    pub fn settle_ns(&self) -> u64 {
        self.tiers.first().map_or(0, |t| t.every.unwrap_or(t.span))
    }

    /// The ids of `epochs` (id, capture time ns) this policy keeps: the
    /// newest epoch, and those that pass their tier. Ages count from the
    /// newest capture time.
    pub fn retained(&self, epochs: &[(u64, u64)]) -> BTreeSet<u64> {
        let Some(&(latest, _)) = epochs.iter().max_by_key(|(id, _)| *id) else {
            return BTreeSet::new();
        };
        if self.keeps_all() {
            return epochs.iter().map(|(id, _)| *id).collect();
        }
        let now = epochs.iter().map(|(_, t)| *t).max().unwrap_or(0);
        let newest = newest_in_buckets(self.tiers.iter().filter_map(|t| t.every), epochs);
        let mut keep = BTreeSet::from([latest]);
        for &(id, at) in epochs {
            let Some(tier) = self.tier_of(now.saturating_sub(at)) else {
                continue;
            };
            let kept = match self.tiers[tier].every {
                None => true,
                Some(g) => newest.get(&(g, at / g)) == Some(&id),
            };
            if kept {
                keep.insert(id);
            }
        }
        keep
    }
}

impl Policy {
    /// Epochs the policy no longer keeps that should wait before being
    /// merged, so that a whole bucket merges in one rewrite. An epoch X
    /// that has left tier j-1 and is not the one tier j keeps of its bucket
    /// (granularity g) would merge into its newest kept successor; while
    /// that bucket's kept epoch R is still inside tier j-1, that successor
    /// is an epoch of tier j-1 that will leave soon and merge again, so
    /// merging at every pass copies each page version once per epoch
    /// between X and R: a quadratic number of copies (at 20 ms with the
    /// default policy, 50 growing merges a second into each second's epoch
    /// and 60 into each minute's). Waiting until R leaves tier j-1 merges
    /// the bucket once. Only when g is at most tier j-1's span, so that
    /// the wait ends and holds at most one bucket per tier boundary.
    pub fn waiting(&self, epochs: &[(u64, u64)]) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        if self.keeps_all() {
            return out;
        }
        let keep = self.retained(epochs);
        let now = epochs.iter().map(|(_, t)| *t).max().unwrap_or(0);
        let newest = newest_in_buckets(self.tiers.iter().filter_map(|t| t.every), epochs);
        let time: BTreeMap<u64, u64> = epochs.iter().copied().collect();
        for &(id, at) in epochs {
            if keep.contains(&id) {
                continue;
            }
            let Some(j) = self.tier_of(now.saturating_sub(at)).filter(|&j| j > 0) else {
                continue;
            };
            let (finer, Some(g)) = (self.tiers[j - 1].span, self.tiers[j].every) else {
                continue;
            };
            if g > finer {
                continue;
            }
            let r_at = newest.get(&(g, at / g)).and_then(|r| time.get(r)).copied().unwrap_or(0);
            if now.saturating_sub(r_at) <= finer {
                out.insert(id);
            }
        }
        out
    }
}

/// For each granularity `g` of `grans` and each bucket `[k·g, (k+1)·g)` of
/// capture time that holds one of `epochs` (id, time ns): the id of its
/// newest epoch, keyed by `(g, k)`.
pub(crate) fn newest_in_buckets(
    grans: impl IntoIterator<Item = u64>,
    epochs: &[(u64, u64)],
) -> BTreeMap<(u64, u64), u64> {
    let mut newest: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
    for g in grans {
        for &(id, at) in epochs {
            let e = newest.entry((g, at / g)).or_insert((at, id));
            if (at, id) > *e {
                *e = (at, id);
            }
        }
    }
    newest.into_iter().map(|(k, (_, id))| (k, id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_bucket_waits_until_it_can_merge_at_once() {
        // 20 ms epochs over 12.8 s, policy 10s:all,1m:1s.
        let p = Policy::parse("10s:all,1m:1s").unwrap();
        let ms = S / 1000;
        let at = |id: u64| id * 20 * ms;
        let epochs: Vec<(u64, u64)> = (1..=640).map(|i| (i, at(i))).collect();
        let keep = p.retained(&epochs);
        let wait = p.waiting(&epochs);
        assert!(wait.is_disjoint(&keep));
        // Second 1 (1.00-1.98 s): its kept epoch (1.98 s) is 10.82 s old,
        // out of the 10 s tier: that bucket merges now, nothing waits.
        // Second 2: its kept epoch (2.98 s) is 9.82 s old, still in the
        // 10 s tier: the epochs of second 2 that left the tier (2.00-2.78
        // s) wait for it, instead of merging into 2.80 s now, then 2.80 s
        // into 2.82 s, and so on.
        let want: Vec<u64> = (100..=139).collect();
        assert_eq!(wait.iter().copied().collect::<Vec<_>>(), want);
        assert!((100..=139).all(|id| !keep.contains(&id)));
        // A policy whose coarser bucket is longer than the finer tier never
        // waits (the wait would not end in time), nor does keep-all.
        let q = Policy::parse("10s:all,1h:1m").unwrap();
        assert!(q.waiting(&epochs).is_empty());
        assert!(Policy::keep_all().waiting(&epochs).is_empty());
    }

    #[test]
    fn a_kept_epoch_settles_once_the_finest_tier_is_done_with_it() {
        assert_eq!(Policy::parse("10s:all,1m:1s").unwrap().settle_ns(), 10 * S);
        assert_eq!(Policy::parse("1m:1s,1h:1m").unwrap().settle_ns(), S);
        assert_eq!(Policy::keep_all().settle_ns(), 0);
    }

    #[test]
    fn parses_and_explains_refusals() {
        let p = Policy::parse("10s:all,10m:1s,24h:1m,7d:1h").unwrap();
        assert_eq!(p.tiers.len(), 4);
        assert_eq!(
            p.tiers[1],
            Tier {
                span: 600 * S,
                every: Some(S)
            }
        );
        assert_eq!(p.tier_name(2), "24h:1m");
        assert!(Policy::parse("all").unwrap().keeps_all());
        Policy::default();
        for (bad, why) in [
            ("", "empty"),
            ("10s", "not SPAN:EVERY"),
            ("10x:all", "not a duration"),
            ("10s:all,5s:1s", "further back"),
            ("10s:1s,1m:all", "thinned"),
            ("10s:2s,1m:3s", "multiple"),
            ("1s:2s", "coarser"),
            ("0s:all", "zero"),
            ("1.5s:all", "not a duration"),
            ("99999999999w:all", "10 years"),
        ] {
            let e = Policy::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // The messages, word for word: the tier, as given, and what is wrong.
        for (bad, msg) in [
            (
                "10s:all,1x:1s",
                "tier 2 '1x:1s': '1x' is not a duration (a whole number and ms, s, m, h, d or w, such as 10s or 24h)",
            ),
            (
                "1s:2s",
                "tier 1 '1s:2s': one epoch per 2000 ms is coarser than the tier's own span",
            ),
            (
                "0s:all",
                "tier 1 '0s:all': '0s' is zero: every duration in a policy must be longer",
            ),
        ] {
            assert_eq!(Policy::parse(bad).unwrap_err().to_string(), msg);
        }
    }

    #[test]
    fn keeps_what_the_tiers_say() {
        // An epoch every 100 ms for 10 s.
        let epochs: Vec<(u64, u64)> = (0..100).map(|i| (i + 1, 1000 * S + i * S / 10)).collect();
        let p = Policy::parse("1s:all,5s:1s").unwrap();
        let keep = p.retained(&epochs);
        let now = epochs[99].1;
        for &(id, at) in &epochs {
            let age = now - at;
            let want = if age <= S {
                true
            } else if age <= 5 * S {
                // The last epoch of each second.
                (at + S / 10) / S != at / S
            } else {
                false
            };
            assert_eq!(keep.contains(&id), want || id == 100, "epoch {id} age {age}");
        }
        // Monotone: what is dropped at one time is never kept later.
        let later: Vec<(u64, u64)> = epochs
            .iter()
            .copied()
            .filter(|(id, _)| keep.contains(id))
            .chain((101..130).map(|i| (i, 1000 * S + (i - 1) * S / 10)))
            .collect();
        let keep2 = p.retained(&later);
        let all2 = p.retained(&(1..130).map(|i| (i, 1000 * S + (i - 1) * S / 10)).collect::<Vec<_>>());
        assert_eq!(keep2, all2);
    }
}
