//! Parsing of sizes, durations and workload specs given on the command line.

use std::time::Duration;

use workload::Spec;

/// Parse a byte size such as `256M`, `1G`, `4096`.
pub fn size(s: &str) -> Result<u64, String> {
    workload::spec::parse_size(s).ok_or_else(|| format!("'{s}' is not a size (examples: 512M, 1G, 4096)"))
}

/// Parse a duration such as `100ms`, `2s`, `1m`, `250us`; `0` means off.
pub fn duration(s: &str) -> Result<Duration, String> {
    let err = || format!("'{s}' is not a duration (examples: 10ms, 1s, 2m, 0)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let digits = s.bytes().take_while(|b| b.is_ascii_digit()).count();
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().map_err(|_| err())?;
    let d = match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        _ => return Err(err()),
    };
    Ok(d)
}

/// Turn `NAME,key=value,...` into guest command-line words, validated.
pub fn workload_cmdline(spec: &str) -> Result<(String, Spec), String> {
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or_default();
    let mut words = vec![format!("workload={name}")];
    words.extend(parts.filter(|p| !p.is_empty()).map(str::to_string));
    let cmdline = words.join(" ");
    let parsed = Spec::parse(&cmdline).map_err(|e| format!("invalid --workload '{spec}': {e}"))?;
    Ok((cmdline, parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(size("256M"), Ok(256 << 20));
        assert!(size("lots").is_err());
        assert_eq!(duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert!(duration("5").is_err());
        assert!(duration("1h").is_err());
        let (c, s) = workload_cmdline("memstress,wss=64M,ops=10").unwrap();
        assert_eq!(c, "workload=memstress wss=64M ops=10");
        assert_eq!(s.ops, 10);
        let e = workload_cmdline("memstress,bogus=1").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        assert!(workload_cmdline("nope").unwrap_err().contains("unknown workload"));
    }
}
