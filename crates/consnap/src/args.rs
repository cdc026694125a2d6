//! Parsing of sizes, durations and workload specs given on the command line.

use std::time::Duration;

use thiserror::Error;
use workload::Spec;

/// Why a size, a duration, a lag or a workload spec is refused; each names
/// the text given.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArgError {
    /// Not a size.
    #[error("'{0}' is not a size (examples: 512M, 1G, 1T, 4096)")]
    NotASize(String),
    /// Not a duration.
    #[error("'{0}' is not a duration (examples: 250us, 0.5ms, 10ms, 1.5s, 2m, 1h, 7d, 0)")]
    NotADuration(String),
    /// A duration beyond [`MAX_DURATION`].
    #[error("'{0}' is longer than 1 year (365 days), the longest duration consnap accepts")]
    TooLong(String),
    /// A duration that rounds to 0 but is not 0.
    #[error("'{0}' is shorter than 1ns")]
    TooShort(String),
    /// `--max-lag 0`.
    #[error("'0' is not a lag: give a duration longer than 0, or 'never'")]
    ZeroLag,
    /// `--max-lag` that is neither a duration nor `never`.
    #[error("{0}, or 'never'")]
    NotALag(#[source] Box<ArgError>),
    /// An `--on-snapshot-error` policy that is none of the three.
    #[error("--on-snapshot-error '{0}': give stop, continue or stop-after=N (N at least 1)")]
    OnSnapshotError(String),
    /// A `--disk` value with an unknown option.
    #[error("--disk '{0}': the only option after the path is ',readonly' (PATH[,readonly])")]
    DiskOption(String),
    /// A `--net` value that is not `tap=NAME[,mac=MAC]`.
    #[error(
        "--net '{0}': give tap=NAME[,mac=52:54:00:12:34:56] (NAME: 1 to 15 letters, digits, '-', '_', '.'; a unicast MAC; a restore keeps the saved MAC)"
    )]
    NetOption(String),
    /// A `--workload` spec the workload guest refuses (`why`: the spec
    /// parser's message; its error borrows the spec, so it is kept as text).
    #[error("invalid --workload '{spec}': {why}")]
    Workload {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
}

/// `--disk PATH[,readonly]`.
pub fn disk(s: &str) -> Result<vmm::machine::DiskAttach, ArgError> {
    let (path, readonly) = match s.rsplit_once(',') {
        Some((p, "readonly")) => (p, true),
        Some((_, _)) => return Err(ArgError::DiskOption(s.to_string())),
        None => (s, false),
    };
    if path.is_empty() {
        return Err(ArgError::DiskOption(s.to_string()));
    }
    Ok(vmm::machine::DiskAttach {
        readonly,
        ..vmm::machine::DiskAttach::new(path.into())
    })
}

/// `restore --net tap=NAME`: a restore keeps the saved MAC.
pub fn restore_net(s: &str) -> Result<vmm::machine::NetAttach, ArgError> {
    net(s).and_then(|n| match n.mac {
        None => Ok(n),
        Some(_) => Err(ArgError::NetOption(s.to_string())),
    })
}

/// `run --net tap=NAME[,mac=MAC]`.
pub fn net(s: &str) -> Result<vmm::machine::NetAttach, ArgError> {
    let bad = || ArgError::NetOption(s.to_string());
    let (mut tap, mut mac) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if tap.is_none() && vmm::devices::virtio::tap::valid_name(name) => {
                tap = Some(name.to_string())
            }
            Some(("mac", m)) if mac.is_none() => mac = Some(vmm::devices::virtio::net::parse_mac(m).ok_or_else(bad)?),
            _ => return Err(bad()),
        }
    }
    Ok(vmm::machine::NetAttach {
        tap: Some(tap.ok_or_else(bad)?),
        mac,
    })
}

/// Longest duration any option accepts: one year (365 days). Longer ones
/// are refused rather than overflowing the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parse a byte size such as `256M`, `1G`, `1T`, `4096`.
pub fn size(s: &str) -> Result<u64, ArgError> {
    workload::spec::parse_size(s).ok_or_else(|| ArgError::NotASize(s.to_string()))
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
pub fn utc(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = store::civil::from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ns / 1_000_000 % 1000
    )
}

/// A size for people: `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `n` things for messages: `1 epoch`, `2 epochs`, `0 files`.
pub fn counted(n: impl Into<u64>, thing: &str) -> String {
    match n.into() {
        1 => format!("1 {thing}"),
        n => format!("{n} {thing}s"),
    }
}

/// A size for messages, in the largest unit that shows it exactly:
/// `256 MiB`, `1 GiB`, `12 KiB`, `1 bytes`.
pub fn show_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, unit) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// `--max-lag`: a duration, or `never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxLag(pub Option<Duration>);

/// Parse `--max-lag`: `never` or a [`duration`] longer than 0.
pub fn max_lag(s: &str) -> Result<MaxLag, ArgError> {
    if s == "never" {
        return Ok(MaxLag(None));
    }
    match duration(s) {
        Ok(d) if d.is_zero() => Err(ArgError::ZeroLag),
        Ok(d) => Ok(MaxLag(Some(d))),
        Err(e) => Err(ArgError::NotALag(Box::new(e))),
    }
}

/// What to do when snapshots fail (`--on-snapshot-error`): `stop` at
/// the first failure, `continue` (keep the VM running unprotected for as
/// long as they fail), or `stop-after=N` failures in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Report every failure and keep the VM running.
    Continue,
    /// Stop the VM once this many snapshots in a row have failed.
    StopAfter(u32),
}

impl OnError {
    /// The engine's `stop_after`.
    pub fn stop_after(self) -> Option<u32> {
        match self {
            OnError::Continue => None,
            OnError::StopAfter(n) => Some(n),
        }
    }
}

/// `--on-snapshot-error`: `stop`, `continue` or `stop-after=N` (N ≥ 1).
pub fn on_snapshot_error(s: &str) -> Result<OnError, ArgError> {
    match s {
        "stop" => Ok(OnError::StopAfter(1)),
        "continue" => Ok(OnError::Continue),
        _ => s
            .strip_prefix("stop-after=")
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n >= 1)
            .map(OnError::StopAfter)
            .ok_or_else(|| ArgError::OnSnapshotError(s.to_string())),
    }
}

/// Parse a duration: a decimal number and a unit (`ns`, `us`, `ms`, `s`,
/// `m` or `min`, `h`, `d`), such as `250us`, `0.5ms`, `1.5s`, `2m`, `1h`,
/// `7d`; `0` means off. At most [`MAX_DURATION`]; resolution 1 ns.
pub fn duration(s: &str) -> Result<Duration, ArgError> {
    let err = || ArgError::NotADuration(s.to_string());
    let too_long = || ArgError::TooLong(s.to_string());
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let num_len = s.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
    let (num, unit) = s.split_at(num_len);
    let unit_ns: u128 = match unit {
        "ns" => 1,
        "us" | "\u{b5}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => return Err(err()),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || (num.contains('.') && frac.is_empty()) || frac.contains('.') {
        return Err(err());
    }
    let mut whole: u128 = 0;
    for b in int.bytes() {
        whole = whole
            .checked_mul(10)
            .and_then(|w| w.checked_add(u128::from(b - b'0')))
            .ok_or_else(too_long)?;
    }
    // Digits beyond the 18th are below a nanosecond even in hours.
    let frac = &frac[..frac.len().min(18)];
    let mut part: u128 = 0;
    for b in frac.bytes() {
        part = part * 10 + u128::from(b - b'0');
    }
    let ns = whole
        .checked_mul(unit_ns)
        .and_then(|w| w.checked_add(part * unit_ns / 10u128.pow(frac.len() as u32)))
        .ok_or_else(too_long)?;
    if ns > MAX_DURATION.as_nanos() {
        return Err(too_long());
    }
    if ns == 0 && s.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
        return Err(ArgError::TooShort(s.to_string()));
    }
    Ok(Duration::from_nanos(ns as u64))
}

/// A duration as [`duration`] parses it back, in the largest unit that
/// shows it exactly: `20ms`, `1500ms`, `2m`, `250us`, `0`.
pub fn show_duration(d: Duration) -> String {
    const UNITS: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let ns = d.as_nanos();
    if ns == 0 {
        return "0".into();
    }
    UNITS
        .iter()
        .find(|(unit, _)| ns.is_multiple_of(*unit))
        .map_or_else(|| format!("{ns}ns"), |(unit, name)| format!("{}{name}", ns / unit))
}

/// Turn `NAME,key=value,...` into guest command-line words, validated.
pub fn workload_cmdline(spec: &str) -> Result<(String, Spec), ArgError> {
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or_default();
    let mut words = vec![format!("workload={name}")];
    words.extend(parts.filter(|p| !p.is_empty()).map(str::to_string));
    let cmdline = words.join(" ");
    let parsed = Spec::parse(&cmdline).map_err(|e| ArgError::Workload {
        spec: spec.to_string(),
        why: e.to_string(),
    })?;
    Ok((cmdline, parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_name_a_tap_and_maybe_a_mac() {
        let n = net("tap=tap0,mac=52:54:00:ab:cd:ef").unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(net("tap=t1").unwrap().mac, None);
        for bad in [
            "",
            "tap=",
            "mac=52:54:00:ab:cd:ef",
            "tap=a/b",
            "tap=t,tap=u",
            "tap=t,mac=53:54:00:ab:cd:ef",
            "tap=t,mac=52:54:00:ab:cd",
            "tap=t,mac=52:54:00:ab:cd:ef:00",
            "tap=t,mtu=9000",
            "tap0",
        ] {
            assert_eq!(net(bad), Err(ArgError::NetOption(bad.into())), "{bad:?}");
        }
        assert!(restore_net("tap=t1").is_ok());
        assert!(
            restore_net("tap=t1,mac=52:54:00:ab:cd:ef").is_err(),
            "a restore keeps the MAC"
        );
    }

    #[test]
    fn parses_and_rejects() {
        assert_eq!(size("256M"), Ok(256 << 20));
        assert_eq!(size("1T"), Ok(1 << 40));
        assert!(size("lots").is_err());
        assert_eq!(duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert!(duration("5").is_err());
        let (c, s) = workload_cmdline("memstress,wss=64M,ops=10").unwrap();
        assert_eq!(c, "workload=memstress wss=64M ops=10");
        assert_eq!(s.ops, 10);
        let e = workload_cmdline("memstress,bogus=1").unwrap_err().to_string();
        assert!(
            e.starts_with("invalid --workload 'memstress,bogus=1': ") && e.contains("bogus"),
            "{e}"
        );
        assert!(
            workload_cmdline("nope")
                .unwrap_err()
                .to_string()
                .contains("unknown workload")
        );
        assert_eq!(
            size("lots").unwrap_err().to_string(),
            "'lots' is not a size (examples: 512M, 1G, 1T, 4096)"
        );
    }

    #[test]
    fn max_lag_is_a_duration_or_never() {
        assert_eq!(max_lag("never"), Ok(MaxLag(None)));
        assert_eq!(max_lag("250ms"), Ok(MaxLag(Some(Duration::from_millis(250)))));
        assert_eq!(
            max_lag("0").unwrap_err().to_string(),
            "'0' is not a lag: give a duration longer than 0, or 'never'"
        );
        assert_eq!(
            max_lag("soon").unwrap_err().to_string(),
            "'soon' is not a duration (examples: 250us, 0.5ms, 10ms, 1.5s, 2m, 1h, 7d, 0), or 'never'"
        );
    }

    #[test]
    fn fractional_durations_and_hours() {
        let ok = |s: &str, ns: u64| assert_eq!(duration(s), Ok(Duration::from_nanos(ns)), "{s}");
        ok("1.5s", 1_500_000_000);
        ok("0.5ms", 500_000);
        ok("1h", 3_600_000_000_000);
        ok("2.5m", 150_000_000_000);
        ok("2min", 120_000_000_000);
        ok("250us", 250_000);
        ok("7ns", 7);
        ok("0.000000001s", 1);
        ok("0.0000000019s", 1);
        ok("0s", 0);
        ok("0.0ms", 0);
        ok("8760h", 365 * 24 * 3_600_000_000_000);
        ok("0.001h", 3_600_000_000);
        for bad in ["", ".5s", "1.s", "1.2.3s", "s", "1x", "-1s", "1 s", "1e3s", "1.5"] {
            assert_eq!(duration(bad), Err(ArgError::NotADuration(bad.to_string())), "{bad:?}");
        }
        assert_eq!(
            duration("0.1ns").unwrap_err().to_string(),
            "'0.1ns' is shorter than 1ns"
        );
    }

    #[test]
    fn durations_beyond_a_year_are_refused() {
        for long in [
            "18446744073709551615s",
            "18446744073709551615h",
            "99999999999999999999999999999999999999999999s",
            "8761h",
            "365.0001d",
            "31536000.000000001s",
        ] {
            let e = duration(long).unwrap_err().to_string();
            assert!(e.contains("1 year") || e.contains("not a duration"), "{long}: {e}");
        }
        assert_eq!(
            duration("8761h").unwrap_err().to_string(),
            "'8761h' is longer than 1 year (365 days), the longest duration consnap accepts"
        );
        assert_eq!(
            duration("31536000.000000001s"),
            Err(ArgError::TooLong("31536000.000000001s".into()))
        );
        assert_eq!(duration("31536000s"), Ok(MAX_DURATION));
        // Days parse as --retain's do; a year and a day is too long, not unknown.
        assert_eq!(duration("365d"), Ok(MAX_DURATION));
        assert_eq!(duration("1.5d"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(duration("366d"), Err(ArgError::TooLong("366d".into())));
    }

    #[test]
    fn counts_agree_with_their_nouns() {
        assert_eq!(counted(1u32, "epoch"), "1 epoch");
        assert_eq!(counted(0u32, "file"), "0 files");
        assert_eq!(counted(2u64, "vCPU"), "2 vCPUs");
    }

    #[test]
    fn snapshot_error_policies() {
        assert_eq!(on_snapshot_error("stop"), Ok(OnError::StopAfter(1)));
        assert_eq!(on_snapshot_error("continue"), Ok(OnError::Continue));
        assert_eq!(on_snapshot_error("stop-after=10"), Ok(OnError::StopAfter(10)));
        for bad in ["stop-after=0", "stop-after=", "stop-after=-1", "sometimes", ""] {
            let e = on_snapshot_error(bad).unwrap_err().to_string();
            assert!(e.contains("stop, continue or stop-after=N"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_are_shown_as_they_parse() {
        for (d, s) in [
            (Duration::from_millis(20), "20ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_micros(250), "250us"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::ZERO, "0"),
        ] {
            assert_eq!(show_duration(d), s);
            assert_eq!(duration(s), Ok(d));
        }
    }

    #[test]
    fn sizes_are_shown_in_a_unit_that_shows_them() {
        assert_eq!(show_size(1), "1 bytes");
        assert_eq!(show_size(4097), "4097 bytes");
        assert_eq!(show_size(12 << 10), "12 KiB");
        assert_eq!(show_size(1536 << 10), "1536 KiB");
        assert_eq!(show_size(256 << 20), "256 MiB");
        assert_eq!(show_size(3 << 30), "3 GiB");
        assert_eq!(show_size(1 << 40), "1 TiB");
    }
}
