//! `consnap ls`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use store::{Access, Store};

/// Options of `consnap ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    id: u64,
    parent: Option<u64>,
    created_ns: u64,
    time: String,
    mode: String,
    full: bool,
    pages: u64,
    zero_pages: u64,
    bytes: u64,
    pause_us: f64,
    guest_ops: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
pub fn utc(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ns / 1_000_000 % 1000
    )
}

fn human(bytes: u64) -> String {
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

/// List the epochs of a snapshot directory.
pub fn ls(a: LsArgs) -> Result<i32, String> {
    let store = Store::open(&a.dir, Access::Read).map_err(|e| e.to_string())?;
    let listed = store.list().map_err(|e| e.to_string())?;
    let rows: Vec<Row> = listed
        .into_iter()
        .map(|(id, info)| match info {
            Ok(i) => {
                let h = i.header;
                Row {
                    id,
                    parent: (h.parent != 0).then_some(h.parent),
                    created_ns: h.created_ns,
                    time: utc(h.created_ns),
                    mode: h.mode.name().into(),
                    full: h.is_full(),
                    pages: h.pages_data,
                    zero_pages: h.pages_zero,
                    bytes: i.file_bytes,
                    pause_us: h.pause_ns as f64 / 1e3,
                    guest_ops: (h.guest_ops != u64::MAX).then_some(h.guest_ops),
                    error: None,
                }
            }
            Err(e) => Row {
                id,
                parent: None,
                created_ns: 0,
                time: String::new(),
                mode: String::new(),
                full: false,
                pages: 0,
                zero_pages: 0,
                bytes: 0,
                pause_us: 0.0,
                guest_ops: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    let damaged = rows.iter().any(|r| r.error.is_some());
    match print(&rows, a.json) {
        Ok(()) => {}
        // `consnap ls | head` closes the pipe early: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(format!("cannot write the listing: {e}")),
    }
    Ok(i32::from(damaged))
}

fn print(rows: &[Row], json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(rows).map_err(std::io::Error::other)?;
        writeln!(out, "{text}")?;
    } else {
        writeln!(
            out,
            "{:>6} {:>6}  {:<23}  {:<14} {:<4} {:>8} {:>8} {:>10} {:>10} {:>10}",
            "ID", "PARENT", "TIME (UTC)", "MODE", "KIND", "PAGES", "ZERO", "BYTES", "PAUSE", "GUEST OPS"
        )?;
        for r in rows {
            if let Some(e) = &r.error {
                writeln!(out, "{:>6}  damaged: {e}", r.id)?;
                continue;
            }
            writeln!(
                out,
                "{:>6} {:>6}  {:<23}  {:<14} {:<4} {:>8} {:>8} {:>10} {:>10} {:>10}",
                r.id,
                r.parent.map_or("-".to_string(), |p| p.to_string()),
                r.time,
                r.mode,
                if r.full { "full" } else { "incr" },
                r.pages,
                r.zero_pages,
                human(r.bytes),
                format!("{:.1}ms", r.pause_us / 1e3),
                r.guest_ops.map_or("-".to_string(), |o| o.to_string()),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formatting() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(super::utc(1_795_694_400_123_000_000), "2026-11-26 12:00:00.123");
        assert_eq!(super::utc(951_782_400_000_000_000), "2000-02-29 00:00:00.000");
    }
}
