//! Workload specification: parsed from the guest command line.
//!
//! The command line is a list of space-separated `key=value` words, one of
//! which is `workload=NAME`. The host CLI's `--workload NAME,k=v,...` is sugar
//! for the same words, so `qemu -append` can pass exactly what consnap passes.
//! Words `virtio_mmio.device=...` that a VMM adds to name its devices
//! ([`crate::mmio`]) may appear anywhere among them; they are checked here
//! and collected by [`crate::mmio::devices`].

use core::fmt;

use crate::mmio;

/// The workloads the guest can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Write pages of a working set at a given rate and pattern.
    Memstress,
    /// Compile-like heap churn (the paper's Compilation workload).
    Build,
    /// Rate-limited sequential receive into a file cache (the paper's Ftp workload).
    Ftp,
    /// A database log: random 4 KiB disk writes with periodic flushes and an
    /// in-memory index (always uses the disk).
    Dblog,
    /// Disk throughput: blocks read or written in order or at random
    /// (always uses the disk).
    Diskio,
}

impl Kind {
    /// All workloads, in the order they are documented.
    pub const ALL: [Kind; 5] = [Kind::Memstress, Kind::Build, Kind::Ftp, Kind::Dblog, Kind::Diskio];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Memstress => "memstress",
            Kind::Build => "build",
            Kind::Ftp => "ftp",
            Kind::Dblog => "dblog",
            Kind::Diskio => "diskio",
        }
    }

    /// The keys this workload accepts besides `workload`.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::Memstress => &["wss", "ops", "seed", "rate", "pattern", "hot", "hotw"],
            Kind::Build => &["wss", "ops", "seed", "filesize", "disk", "irq", "dsize"],
            Kind::Ftp => &["wss", "ops", "seed", "rate", "chunk", "disk", "irq", "dsize"],
            Kind::Dblog => &["wss", "ops", "seed", "rate", "flush", "dsize", "disk", "irq"],
            Kind::Diskio => &["wss", "ops", "seed", "pattern", "chunk", "io", "dsize", "disk", "irq"],
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
    /// Operations over all vCPUs: page writes (memstress), files (build),
    /// chunks (ftp), 4 KiB disk writes (dblog).
    pub ops: u64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Rate limit per vCPU: pages/s (memstress), bytes/s (ftp) or writes/s
    /// (dblog); 0 = unlimited.
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
    /// Whether the workload uses the virtio-blk disk (`disk=on`; always on
    /// for dblog). See [`Spec::uses_disk`].
    pub disk: bool,
    /// Whether the guest's disk driver waits for the device's interrupt
    /// (`irq=on`) instead of polling the used ring (the default).
    pub irq: bool,
    /// Bytes of disk the workload uses, from offset 0, over all vCPUs (a
    /// multiple of 4096); vCPU i uses the i-th of `ncpus` equal parts.
    pub dsize: u64,
    /// dblog: a FLUSH after every this many writes (0: never).
    pub flush: u64,
    /// diskio: write blocks (`io=write`) rather than read them.
    pub io_write: bool,
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
                write!(f, "no workload given (expected workload=memstress|build|ftp|dblog)")
            }
            ParseError::UnknownWorkload(w) => {
                write!(f, "unknown workload '{w}' (known: memstress, build, ftp, dblog)")
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
            disk: false,
            irq: false,
            dsize: 64 << 20,
            flush: 16,
            io_write: false,
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
            Kind::Dblog => Spec {
                wss: 4 << 20,
                ops: 16384,
                disk: true,
                ..base
            },
            Kind::Diskio => Spec {
                wss: 1 << 20,
                ops: 4096,
                pattern: Pattern::Seq,
                chunk: 1 << 20,
                disk: true,
                io_write: true,
                ..base
            },
        }
    }

    /// Whether the workload reads and writes the disk (`disk=on`, or dblog).
    pub fn uses_disk(&self) -> bool {
        self.disk
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
            if key == mmio::KEY {
                // A device the VMM names (Linux's syntax); any number of them.
                mmio::parse_device(value).ok_or(ParseError::BadValue {
                    key,
                    value,
                    expected: "SIZE@BASE:IRQ[:ID] such as 4K@0xd0000000:5",
                })?;
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
            "disk" => self.disk = parse_on_off(value).ok_or(bad("on or off"))?,
            "irq" => self.irq = parse_on_off(value).ok_or(bad("on or off"))?,
            "dsize" => self.dsize = parse_size(value).ok_or(bad("a size such as 64M"))?,
            "flush" => self.flush = parse_count(value).ok_or(bad("a count of writes such as 16, or 0 for never"))?,
            "io" => {
                self.io_write = match value {
                    "read" => false,
                    "write" => true,
                    _ => return Err(bad("read or write")),
                }
            }
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
        if self.irq && !self.disk {
            return Err(Inconsistent("irq=on needs disk=on"));
        }
        if self.disk && (self.dsize < PAGE || !self.dsize.is_multiple_of(PAGE)) {
            return Err(Inconsistent("dsize must be a positive multiple of 4K"));
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
                if self.disk && self.dsize < 64 * crate::compile::source_slot_bytes(self.filesize) {
                    return Err(Inconsistent(
                        "build with disk=on needs dsize of at least 64 source slots (filesize + 16, rounded up to 512)",
                    ));
                }
            }
            Kind::Ftp => {
                if self.chunk < 512 || !self.chunk.is_multiple_of(8) {
                    return Err(Inconsistent("chunk must be a multiple of 8 and at least 512"));
                }
                if self.chunk.saturating_mul(4) > self.wss {
                    return Err(Inconsistent("ftp needs wss of at least 4 chunks"));
                }
                if self.disk && !self.chunk.is_multiple_of(512) {
                    return Err(Inconsistent("ftp with disk=on needs chunk to be a multiple of 512"));
                }
                if self.disk && self.chunk.saturating_mul(16) > self.dsize {
                    return Err(Inconsistent("ftp with disk=on needs dsize of at least 16 chunks"));
                }
            }
            Kind::Dblog => {
                if !self.disk {
                    return Err(Inconsistent("dblog always uses the disk (disk=off is not allowed)"));
                }
                if self.wss < 64 << 10 {
                    return Err(Inconsistent("dblog needs wss of at least 64K"));
                }
                if self.dsize < 256 << 10 {
                    return Err(Inconsistent("dblog needs dsize of at least 256K"));
                }
            }
            Kind::Diskio => {
                if !self.disk {
                    return Err(Inconsistent("diskio always uses the disk (disk=off is not allowed)"));
                }
                if self.chunk < 512 || !self.chunk.is_multiple_of(512) || self.chunk > (16 << 20) {
                    return Err(Inconsistent("diskio needs chunk to be whole sectors, 512 to 16M"));
                }
                if self.chunk > self.wss {
                    return Err(Inconsistent("diskio needs wss of at least one chunk"));
                }
                if self.chunk > self.dsize {
                    return Err(Inconsistent("diskio needs dsize of at least one chunk"));
                }
                if self.pattern == Pattern::HotCold {
                    return Err(Inconsistent("diskio takes pattern=seq or pattern=random"));
                }
            }
        }
        Ok(())
    }
}

fn parse_percent(s: &str) -> Option<u64> {
    parse_count(s).filter(|p| *p <= 100)
}

fn parse_on_off(s: &str) -> Option<bool> {
    match s {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
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

    #[test]
    fn disk_keys_and_device_words_anywhere() {
        let line = "virtio_mmio.device=512@0xfeb00000:5 workload=ftp disk=on irq=on dsize=16M \
                    virtio_mmio.device=512@0xfeb00e00:12 chunk=64K virtio_mmio.device=4K@0xd0000000:5:1";
        let s = Spec::parse(line).unwrap();
        assert!(s.disk && s.irq && s.uses_disk());
        assert_eq!((s.dsize, s.chunk), (16 << 20, 64 << 10));
        assert_eq!(Spec::parse("workload=ftp disk=on irq=on dsize=16M chunk=64K"), Ok(s));
        let d = Spec::parse("workload=dblog").unwrap();
        assert_eq!(d, Spec::defaults(Kind::Dblog));
        assert!(d.uses_disk() && !d.irq);
        assert_eq!((d.flush, d.dsize, d.wss), (16, 64 << 20, 4 << 20));
        let d = Spec::parse("workload=dblog flush=0 rate=2k disk=on wss=1M dsize=1M ops=10 seed=4").unwrap();
        assert_eq!((d.flush, d.rate, d.dsize), (0, 2000, 1 << 20));
        assert!(!Spec::parse("workload=build").unwrap().uses_disk());
        assert!(Spec::parse("workload=build disk=on").unwrap().uses_disk());
        // consnap's --workload sugar: the words are just more keys.
        assert!(Spec::parse("workload=memstress virtio_mmio.device=4K@0xd0000000:5").is_ok());
    }

    #[test]
    fn rejects_bad_disk_settings_and_dotted_words() {
        assert!(matches!(
            Spec::parse("workload=ftp virtio_mmio.device=4K@0xd0000000"),
            Err(ParseError::BadValue {
                key: "virtio_mmio.device",
                value: "4K@0xd0000000",
                ..
            })
        ));
        assert!(matches!(
            Spec::parse("workload=ftp foo.bar=1"),
            Err(ParseError::UnknownKey { key: "foo.bar", .. })
        ));
        assert!(matches!(
            Spec::parse("workload=ftp virtio_mmio.devices=4K@0x1000:5"),
            Err(ParseError::UnknownKey { .. })
        ));
        assert!(matches!(
            Spec::parse("workload=memstress disk=on"),
            Err(ParseError::UnknownKey { key: "disk", .. })
        ));
        assert!(matches!(
            Spec::parse("workload=ftp disk=yes"),
            Err(ParseError::BadValue { key: "disk", .. })
        ));
        assert_eq!(
            Spec::parse("workload=ftp disk=on disk=off"),
            Err(ParseError::Duplicate("disk"))
        );
        for inconsistent in [
            "workload=ftp irq=on",
            "workload=dblog disk=off",
            "workload=dblog wss=32K",
            "workload=dblog dsize=128K",
            "workload=ftp disk=on dsize=5000",
            "workload=ftp disk=on chunk=1000",
            "workload=ftp disk=on chunk=64K dsize=512K",
            "workload=build disk=on dsize=1M",
        ] {
            assert!(
                matches!(Spec::parse(inconsistent), Err(ParseError::Inconsistent(_))),
                "{inconsistent}"
            );
        }
        // dsize only matters with the disk.
        assert!(Spec::parse("workload=ftp dsize=5000").is_ok());
    }
}
