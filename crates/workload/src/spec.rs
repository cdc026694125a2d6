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
    /// A UDP key-value server ([`crate::kv`]) at `ip=` and `port=`; with
    /// `disk=on` it logs every applied put. It is served by the guest's
    /// network driver, not by [`crate::run_share`].
    Kv,
}

impl Kind {
    /// All workloads, in the order they are documented.
    pub const ALL: [Kind; 6] = [
        Kind::Memstress,
        Kind::Build,
        Kind::Ftp,
        Kind::Dblog,
        Kind::Diskio,
        Kind::Kv,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Memstress => "memstress",
            Kind::Build => "build",
            Kind::Ftp => "ftp",
            Kind::Dblog => "dblog",
            Kind::Diskio => "diskio",
            Kind::Kv => "kv",
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
            Kind::Kv => &["wss", "ip", "port", "disk", "irq", "dsize"],
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
    /// kv: the guest's IPv4 address (`ip=A.B.C.D`, required for kv and
    /// taken by no other workload; 0.0.0.0 for them).
    pub ip: [u8; 4],
    /// kv: the UDP port the server listens on (`port=N`, 1..=65535).
    pub port: u16,
}

/// kv's UDP port unless `port=` says otherwise.
pub const DEFAULT_PORT: u16 = 7000;

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
    /// A key the workload requires was not given.
    MissingKey {
        /// The selected workload.
        workload: Kind,
        /// The key.
        key: &'static str,
    },
}

impl fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::MissingWorkload => {
                write!(f, "no workload given (expected workload=")?;
                write_names(f, "|")?;
                write!(f, ")")
            }
            ParseError::UnknownWorkload(w) => {
                write!(f, "unknown workload '{w}' (known: ")?;
                write_names(f, ", ")?;
                write!(f, ")")
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
            ParseError::MissingKey { workload, key } => {
                write!(f, "workload {} needs {key}=", workload.name())?;
                match *key {
                    "ip" => write!(f, "A.B.C.D, the guest's IPv4 address"),
                    _ => write!(f, "..."),
                }
            }
        }
    }
}

/// The workloads' names, separated by `sep`.
fn write_names(f: &mut fmt::Formatter<'_>, sep: &str) -> fmt::Result {
    for (i, k) in Kind::ALL.into_iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        f.write_str(k.name())?;
    }
    Ok(())
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
            ip: [0; 4],
            port: DEFAULT_PORT,
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
            Kind::Kv => Spec { wss: 4 << 20, ..base },
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
            "ip" => self.ip = parse_unicast_ipv4(value).ok_or(bad("a unicast IPv4 address such as 10.0.2.15"))?,
            "port" => {
                self.port = parse_decimal(value)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or(bad("a UDP port 1..=65535"))?
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
            Kind::Kv => {
                // `ip=` never sets 0.0.0.0, so this is "not given".
                if self.ip == [0; 4] {
                    return Err(ParseError::MissingKey {
                        workload: Kind::Kv,
                        key: "ip",
                    });
                }
            }
        }
        Ok(())
    }
}

fn parse_percent(s: &str) -> Option<u64> {
    parse_count(s).filter(|p| *p <= 100)
}

/// Plain decimal digits (no sign, no suffix), at most 19 of them.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Dotted-quad IPv4 `A.B.C.D`, each part 0..=255 in decimal without
/// leading zeros (so `010` is not mistaken for octal); an address a host
/// can have: not 0.0.0.0, not multicast (224/4), not broadcast.
fn parse_unicast_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for octet in ip.iter_mut() {
        let part = parts.next()?;
        if part.len() > 1 && part.starts_with('0') {
            return None;
        }
        *octet = u8::try_from(parse_decimal(part)?).ok()?;
    }
    let unicast = ip != [0; 4] && ip[0] < 224;
    (parts.next().is_none() && unicast).then_some(ip)
}

fn parse_on_off(s: &str) -> Option<bool> {
    match s {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
