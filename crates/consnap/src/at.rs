//! Which epoch `--at` names: an id, `latest`, a time before now (`-30s`)
//! or an RFC 3339 timestamp; for a time, the newest epoch captured at or
//! before it.

use store::Store;
use thiserror::Error;

use crate::args::{self, ArgError};

/// Why `--at` names no epoch; each names the store (a directory or an
/// object store's URL) and what was given.
#[derive(Debug, Error)]
pub enum AtError {
    /// The store cannot be listed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// `latest` in a store without epochs.
    #[error("{store} has no epoch")]
    Empty {
        /// The store.
        store: String,
    },
    /// An id the store does not hold.
    #[error("{store} has no epoch {id}")]
    NoEpoch {
        /// The store.
        store: String,
        /// The id given.
        id: u64,
    },
    /// `-DURATION` with a duration that does not parse.
    #[error("--at '{at}': {source}")]
    Ago {
        /// As given.
        at: String,
        /// Why the duration is refused.
        #[source]
        source: ArgError,
    },
    /// Neither an id, `latest`, `-DURATION` nor a time.
    #[error(
        "--at '{at}' is not an epoch id, 'latest', a time before now such as -30s, or an RFC 3339 time such as 2026-11-26T12:00:00Z"
    )]
    NotATime {
        /// As given.
        at: String,
    },
    /// A time before the store's first epoch.
    #[error("no epoch in {store} was captured at or before {} (--at {at})", crate::ls_cmd::utc(*.when_ns))]
    NoneBefore {
        /// The store.
        store: String,
        /// As given.
        at: String,
        /// The time it names, Unix ns.
        when_ns: u64,
    },
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parse `2026-11-26T12:00:00Z`, `2026-11-26T12:00:00.250+01:00`, also
/// with a space for the `T`, into Unix ns.
pub fn rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ns = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = s.get(start..i)?;
        if digits.is_empty() {
            return None;
        }
        let d9: String = digits.chars().chain(std::iter::repeat('0')).take(9).collect();
        frac_ns = d9.parse().ok()?;
    }
    let offset_s = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && &tz[3..4] == ":" => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let v = oh * 3600 + om * 60;
            if tz.starts_with('-') { -v } else { v }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    u64::try_from(secs)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(frac_ns as u64)
}

/// The epoch `at` names in `store`.
pub fn resolve(store: &Store, at: &str) -> Result<u64, AtError> {
    if at == "latest" {
        return Ok(store.latest()?);
    }
    if let Ok(id) = at.parse::<u64>() {
        return Ok(id);
    }
    let listed = store.list()?;
    let epochs: Vec<(u64, u64)> = listed
        .iter()
        .filter_map(|(id, i)| i.as_ref().ok().map(|i| (*id, i.header.created_ns)))
        .collect();
    resolve_in(&epochs, at, &store.dir().display().to_string())
}

/// [`resolve`] over (id, capture time) pairs of the store `name`, such as
/// a remote store's manifest.
pub fn resolve_in(epochs: &[(u64, u64)], at: &str, name: &str) -> Result<u64, AtError> {
    if at == "latest" {
        return epochs.iter().map(|e| e.0).max().ok_or_else(|| AtError::Empty {
            store: name.to_string(),
        });
    }
    if let Ok(id) = at.parse::<u64>() {
        return epochs
            .iter()
            .any(|e| e.0 == id)
            .then_some(id)
            .ok_or_else(|| AtError::NoEpoch {
                store: name.to_string(),
                id,
            });
    }
    let when = if let Some(ago) = at.strip_prefix('-') {
        let d = args::duration(ago).map_err(|source| AtError::Ago {
            at: at.to_string(),
            source,
        })?;
        store::now_ns().saturating_sub(d.as_nanos() as u64)
    } else {
        rfc3339(at).ok_or_else(|| AtError::NotATime { at: at.to_string() })?
    };
    epochs
        .iter()
        .filter(|(_, t)| *t <= when)
        .max_by_key(|(id, t)| (*t, *id))
        .map(|(id, _)| *id)
        .ok_or_else(|| AtError::NoneBefore {
            store: name.to_string(),
            at: at.to_string(),
            when_ns: when,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400_000_000_000));
        assert_eq!(rfc3339("2026-11-26T12:00:00.123Z"), Some(1_795_694_400_123_000_000));
        assert_eq!(
            rfc3339("2026-11-26T13:00:00.123+01:00"),
            Some(1_795_694_400_123_000_000)
        );
        assert_eq!(rfc3339("2026-11-26 11:30:00-00:30"), Some(1_795_694_400_000_000_000));
        for bad in [
            "2026-11-26",
            "2026-13-01T00:00:00Z",
            "2026-11-26T12:00:00",
            "x026-11-26T12:00:00Z",
            "2026-11-26T12:00:00.Z",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn refusals_name_the_store_and_the_text() {
        let epochs = [(3, 1_000_000_000), (5, 2_000_000_000)];
        assert_eq!(resolve_in(&epochs, "latest", "s").unwrap(), 5);
        assert_eq!(resolve_in(&epochs, "1970-01-01T00:00:01.5Z", "s").unwrap(), 3);
        for (at, msg) in [
            ("4", "s has no epoch 4"),
            (
                "-5",
                "--at '-5': '5' is not a duration (examples: 250us, 0.5ms, 10ms, 1.5s, 2m, 1h, 7d, 0)",
            ),
            (
                "soon",
                "--at 'soon' is not an epoch id, 'latest', a time before now such as -30s, or an RFC 3339 time such as 2026-11-26T12:00:00Z",
            ),
            (
                "1970-01-01T00:00:00Z",
                "no epoch in s was captured at or before 1970-01-01 00:00:00.000 (--at 1970-01-01T00:00:00Z)",
            ),
        ] {
            assert_eq!(resolve_in(&epochs, at, "s").unwrap_err().to_string(), msg);
        }
        assert_eq!(
            resolve_in(&[], "latest", "s").unwrap_err().to_string(),
            "s has no epoch"
        );
    }
}
