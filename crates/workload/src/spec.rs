//! Workload specification: parsed from the guest command line.
//!
//! The command line is a list of space-separated `key=value` words, one of
//! which is `workload=NAME`. The host CLI's `--workload NAME,k=v,...` is sugar
//! for the same words, so `qemu -append` can pass exactly what consnap passes.

use core::fmt;

/// The workloads the guest can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Write pages of a working set at a given rate and pattern.
    Memstress,
    /// Compile-like heap churn (the paper's Compilation workload).
    Build,
    /// Rate-limited sequential receive into a file cache (the paper's Ftp workload).
    Ftp,
}

impl Kind {
    /// All workloads, in the order they are documented.
    pub const ALL: [Kind; 3] = [Kind::Memstress, Kind::Build, Kind::Ftp];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Memstress => "memstress",
            Kind::Build => "build",
            Kind::Ftp => "ftp",
        }
    }

    /// The keys this workload accepts besides `workload`.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::Memstress => &["wss", "ops", "seed", "rate", "pattern", "hot", "hotw"],
            Kind::Build => &["wss", "ops", "seed", "filesize"],
            Kind::Ftp => &["wss", "ops", "seed", "rate", "chunk"],
        }
    }

    fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Which pages memstress writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Pages in order, wrapping around.
    Seq,
    /// Uniformly random pages.
    Random,
    /// `hotw` percent of writes go to the first `hot` percent of pages.
    HotCold,
}

impl Pattern {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Random => "random",
            Pattern::HotCold => "hotcold",
        }
    }
}

/// Page size the workloads reason in.
pub const PAGE: u64 = 4096;

/// A complete, validated workload specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Which workload.
    pub kind: Kind,
    /// Working-set size in bytes, over all vCPUs (a multiple of 4096).
    pub wss: u64,
    /// Operations over all vCPUs: page writes (memstress), files (build), chunks (ftp).
    pub ops: u64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Rate limit per vCPU: pages/s (memstress) or bytes/s (ftp); 0 = unlimited.
    pub rate: u64,
    /// memstress page pattern.
    pub pattern: Pattern,
    /// memstress hot set, percent of pages.
    pub hot: u64,
    /// memstress share of writes that go to the hot set, percent.
    pub hotw: u64,
    /// ftp chunk size in bytes.
    pub chunk: u64,
    /// build source size per file in bytes.
    pub filesize: u64,
}

/// Why a command line was rejected. Borrows the offending text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError<'a> {
    /// No `workload=` word.
    MissingWorkload,
    /// `workload=` names no known workload.
    UnknownWorkload(&'a str),
    /// A word that is not `key=value`.
    NotKeyValue(&'a str),
    /// A key the workload does not take.
    UnknownKey {
        /// The selected workload.
        workload: Kind,
        /// The key.
        key: &'a str,
    },
    /// A key given twice.
    Duplicate(&'a str),
    /// A value that does not parse or is out of range.
    BadValue {
        /// The key.
        key: &'a str,
        /// The value as given.
        value: &'a str,
        /// What was expected.
        expected: &'static str,
    },
    /// Values that do not fit together.
    Inconsistent(&'static str),
}

impl fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::MissingWorkload => {
                write!(f, "no workload given (expected workload=memstress|build|ftp)")
            }
            ParseError::UnknownWorkload(w) => {
                write!(f, "unknown workload '{w}' (known: memstress, build, ftp)")
            }
            ParseError::NotKeyValue(w) => write!(f, "'{w}' is not key=value"),
            ParseError::UnknownKey { workload, key } => {
                write!(f, "unknown key '{key}' for workload {} (known:", workload.name())?;
                for k in workload.keys() {
                    write!(f, " {k}")?;
                }
                write!(f, ")")
            }
            ParseError::Duplicate(k) => write!(f, "key '{k}' given twice"),
            ParseError::BadValue { key, value, expected } => {
                write!(f, "bad value '{value}' for '{key}': expected {expected}")
            }
            ParseError::Inconsistent(why) => write!(f, "{why}"),
        }
    }
}

/// Parse a size with an optional binary suffix: `4096`, `64K`, `64M`, `1G`, `1GiB`, `1T`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = split_suffix(s, 1024)?;
    num.checked_mul(mult)
}

/// Parse a count with an optional decimal suffix: `200000`, `200k`, `2M`, `1G`, `1T`.
pub fn parse_count(s: &str) -> Option<u64> {
    let (num, mult) = split_suffix(s, 1000)?;
    num.checked_mul(mult)
}

fn split_suffix(s: &str, base: u64) -> Option<(u64, u64)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let (num, suffix) = s.split_at(digits);
    let mut n: u64 = 0;
    for b in num.bytes() {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    let mult = match suffix {
        "" | "B" => 1,
        "k" | "K" | "KiB" | "KB" => base,
        "m" | "M" | "MiB" | "MB" => base * base,
        "g" | "G" | "GiB" | "GB" => base * base * base,
        "t" | "T" | "TiB" | "TB" => base * base * base * base,
        _ => return None,
    };
    Some((n, mult))
}

fn parse_rate(s: &str, bytes: bool) -> Option<u64> {
    if s == "max" {
        return Some(0);
    }
    let s = s.strip_suffix("/s").unwrap_or(s);
    if bytes { parse_size(s) } else { parse_count(s) }
}

impl Spec {
    /// Defaults for a workload.
    pub fn defaults(kind: Kind) -> Spec {
        let base = Spec {
            kind,
            wss: 64 << 20,
            ops: 1_000_000,
            seed: 1,
            rate: 0,
            pattern: Pattern::Random,
            hot: 10,
            hotw: 90,
            chunk: 64 << 10,
            filesize: 32 << 10,
        };
        match kind {
            Kind::Memstress => base,
            Kind::Build => Spec {
                wss: 128 << 20,
                ops: 400,
                ..base
            },
            Kind::Ftp => Spec {
                wss: 256 << 20,
                ops: 8192,
                ..base
            },
        }
    }

    /// Parse space-separated `key=value` words (a guest command line).
    pub fn parse(cmdline: &str) -> Result<Spec, ParseError<'_>> {
        let mut kind = None;
        for word in cmdline.split_ascii_whitespace() {
            if let Some(name) = word.strip_prefix("workload=") {
                if kind.is_some() {
                    return Err(ParseError::Duplicate("workload"));
                }
                kind = Some(Kind::from_name(name).ok_or(ParseError::UnknownWorkload(name))?);
            }
        }
        let kind = kind.ok_or(ParseError::MissingWorkload)?;
        let mut spec = Spec::defaults(kind);
        let mut seen: u32 = 0;
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').ok_or(ParseError::NotKeyValue(word))?;
            if key == "workload" {
                continue;
            }
            let idx = kind
                .keys()
                .iter()
                .position(|k| *k == key)
                .ok_or(ParseError::UnknownKey { workload: kind, key })?;
            if seen & (1 << idx) != 0 {
                return Err(ParseError::Duplicate(key));
            }
            seen |= 1 << idx;
            spec.set(key, value)?;
        }
        spec.validate()?;
        Ok(spec)
    }

    fn set<'a>(&mut self, key: &'a str, value: &'a str) -> Result<(), ParseError<'a>> {
        let bad = |expected| ParseError::BadValue { key, value, expected };
        match key {
            "wss" => self.wss = parse_size(value).ok_or(bad("a size such as 64M"))?,
            "ops" => self.ops = parse_count(value).ok_or(bad("a count such as 200000"))?,
            "seed" => self.seed = parse_count(value).ok_or(bad("an unsigned integer"))?,
            "rate" => {
                let bytes = self.kind == Kind::Ftp;
                let expected = if bytes {
                    "bytes per second such as 100M, or max"
                } else {
                    "pages per second such as 50k, or max"
                };
                self.rate = parse_rate(value, bytes).ok_or(bad(expected))?;
            }
            "pattern" => {
                self.pattern = match value {
                    "seq" | "sequential" => Pattern::Seq,
                    "random" | "uniform" => Pattern::Random,
                    "hotcold" => Pattern::HotCold,
                    _ => return Err(bad("seq, random or hotcold")),
                }
            }
            "hot" => self.hot = parse_percent(value).ok_or(bad("a percentage 1..=100"))?,
            "hotw" => self.hotw = parse_percent(value).ok_or(bad("a percentage 0..=100"))?,
            "chunk" => self.chunk = parse_size(value).ok_or(bad("a size such as 64K"))?,
            "filesize" => self.filesize = parse_size(value).ok_or(bad("a size such as 32K"))?,
            _ => {
                return Err(ParseError::UnknownKey {
                    workload: self.kind,
                    key,
                });
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ParseError<'static>> {
        use ParseError::Inconsistent;
        if self.wss < PAGE || !self.wss.is_multiple_of(PAGE) {
            return Err(Inconsistent("wss must be a positive multiple of 4K"));
        }
        if self.hot == 0 {
            return Err(Inconsistent("hot must be at least 1 percent"));
        }
        match self.kind {
            Kind::Memstress => {}
            Kind::Build => {
                if !(256..=(16 << 20)).contains(&self.filesize) {
                    return Err(Inconsistent("filesize must be between 256 and 16M"));
                }
                if self.wss < 16 * self.filesize.max(64 << 10) {
                    return Err(Inconsistent("build needs wss of at least 16 x filesize (and 1M)"));
                }
            }
            Kind::Ftp => {
                if self.chunk < 512 || !self.chunk.is_multiple_of(8) {
                    return Err(Inconsistent("chunk must be a multiple of 8 and at least 512"));
                }
                if self.chunk.saturating_mul(4) > self.wss {
                    return Err(Inconsistent("ftp needs wss of at least 4 chunks"));
                }
            }
        }
        Ok(())
    }
}

fn parse_percent(s: &str) -> Option<u64> {
    parse_count(s).filter(|p| *p <= 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_keys_and_suffixes() {
        let s =
            Spec::parse("workload=memstress wss=64M ops=200k seed=9 rate=50k pattern=hotcold hot=5 hotw=95").unwrap();
        assert_eq!(s.kind, Kind::Memstress);
        assert_eq!(s.wss, 64 << 20);
        assert_eq!(s.ops, 200_000);
        assert_eq!(s.seed, 9);
        assert_eq!(s.rate, 50_000);
        assert_eq!(s.pattern, Pattern::HotCold);
        assert_eq!((s.hot, s.hotw), (5, 95));
        let f = Spec::parse("ops=10 workload=ftp rate=100M chunk=16K").unwrap();
        assert_eq!((f.kind, f.rate, f.chunk, f.ops), (Kind::Ftp, 100 << 20, 16 << 10, 10));
        assert_eq!(Spec::parse("workload=ftp rate=max").unwrap().rate, 0);
        assert_eq!(Spec::parse("workload=build").unwrap(), Spec::defaults(Kind::Build));
    }

    #[test]
    fn sizes_and_counts_up_to_tera() {
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("2TiB"), Some(2 << 40));
        assert_eq!(parse_size("3G"), Some(3 << 30));
        assert_eq!(parse_size("16777216T"), None, "2^64 overflows");
        assert_eq!(parse_count("1T"), Some(1_000_000_000_000));
        assert_eq!(parse_count("2t"), Some(2_000_000_000_000));
        assert_eq!(parse_size("1P"), None);
    }

    #[test]
    fn rejects_bad_input_with_named_culprit() {
        assert_eq!(Spec::parse("wss=1M"), Err(ParseError::MissingWorkload));
        assert_eq!(Spec::parse("workload=nope"), Err(ParseError::UnknownWorkload("nope")));
        assert!(matches!(
            Spec::parse("workload=build pattern=seq"),
            Err(ParseError::UnknownKey { key: "pattern", .. })
        ));
        assert!(matches!(
            Spec::parse("workload=memstress wss=12Q"),
            Err(ParseError::BadValue {
                key: "wss",
                value: "12Q",
                ..
            })
        ));
        assert_eq!(
            Spec::parse("workload=memstress ops=1 ops=2"),
            Err(ParseError::Duplicate("ops"))
        );
        assert_eq!(
            Spec::parse("workload=memstress junk"),
            Err(ParseError::NotKeyValue("junk"))
        );
        assert!(matches!(
            Spec::parse("workload=memstress wss=5000"),
            Err(ParseError::Inconsistent(_))
        ));
        assert!(matches!(
            Spec::parse("workload=ftp wss=64K chunk=64K"),
            Err(ParseError::Inconsistent(_))
        ));
        assert!(Spec::parse("workload=memstress ops=99999999999999999999").is_err());
        assert!(Spec::parse("workload=memstress hot=101").is_err());
    }
}
