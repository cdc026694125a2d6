//! `consnap ls`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};
use store::{Access, Store};
use thiserror::Error;

use crate::remote_args::{self, RemoteArgsError};

/// Why a store cannot be listed.
#[derive(Debug, Error)]
pub enum LsError {
    /// The local store cannot be opened or read.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The object store cannot be read.
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    /// The object store cannot be reached as given.
    #[error(transparent)]
    RemoteArgs(#[from] RemoteArgsError),
    /// The listing cannot be written to stdout.
    #[error("cannot write the listing: {0}")]
    Write(#[source] std::io::Error),
}

/// Options of `consnap ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Snapshot directory, or an object store a run replicated to
    /// (s3://BUCKET/PREFIX: its MANIFEST and each epoch's header are read).
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The key an object store's epochs are encrypted with.
    #[arg(long, value_name = "FILE")]
    pub encrypt_key: Option<PathBuf>,
    /// Read headers, indexes, states and chains but not the pages: quick
    /// on a large store, but `restorable` then means "unless a page is
    /// damaged" (`pages_checked: false`). By default every page an epoch's
    /// restore takes is checked, as `verify` and `restore` do.
    #[arg(long)]
    pub quick: bool,
}

/// One entry of the listing: a committed epoch, or a file in `epochs/`
/// that is not one (`id` null).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Row {
    /// Epoch id (null for a file that is not an epoch).
    pub id: Option<u64>,
    /// The file's real name in `epochs/`.
    pub file: String,
    /// Parent epoch.
    pub parent: Option<u64>,
    /// Creation time, ns since the Unix epoch.
    pub created_ns: u64,
    /// The same in UTC.
    pub time: String,
    /// Capture mode.
    pub mode: String,
    /// Full epoch.
    pub full: bool,
    /// Data pages.
    pub pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// File size.
    pub bytes: u64,
    /// Of the page data, bytes of disk blocks (the VM's disks).
    pub disk_bytes: u64,
    /// Guest downtime.
    pub pause_us: f64,
    /// Ops the workload guest had done.
    pub guest_ops: Option<u64>,
    /// The entry itself is unreadable, or not an epoch file (see `error`).
    pub damaged: bool,
    /// Why the entry is damaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The parent epoch's file does not exist.
    pub parent_missing: bool,
    /// Why the epoch cannot be restored although its own header opens: an
    /// ancestor is missing, damaged or describes another machine, its
    /// state is damaged, or a page its restore takes fails its checksum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_error: Option<String>,
    /// An epoch that `consnap restore --at ID` restores, as `verify` and
    /// `restore` find it (`store::assess`): its chain is complete, its state
    /// intact and, when `pages_checked`, every page it takes too.
    pub restorable: bool,
    /// Whether the pages were read for `restorable` (not with `ls --quick`,
    /// the control API or an object store).
    #[serde(default)]
    pub pages_checked: bool,
    /// Its retention tier under the store's policy (`10s:all`, ...).
    #[serde(default)]
    pub tier: Option<String>,
    /// Files a restore of it reads (its chain), when restorable.
    #[serde(default)]
    pub chain: Option<usize>,
    /// Compression of its page data.
    #[serde(default)]
    pub compression: String,
    /// Epochs merged into it by reclamation.
    #[serde(default)]
    pub merged: u64,
    /// Guest RAM bytes and vCPUs, which must be equal along a chain.
    #[serde(skip)]
    machine: (u64, u32),
}

impl Row {
    pub fn is_bad(&self) -> bool {
        self.damaged || self.chain_error.is_some()
    }
}

pub use crate::args::{human, utc};

/// What reclamation freed and wrote, net: `freed 1.2 GiB, wrote 300.0
/// MiB, net 900.0 MiB reclaimed`. The net is negative when folds (which
/// copy pages still needed elsewhere into shorter chains) wrote more than
/// merges and drops freed: shown so, as the cost of short chains.
pub fn net_reclaimed(freed: u64, written: u64) -> String {
    let net = if freed >= written {
        format!("net {} reclaimed", human(freed - written))
    } else {
        format!(
            "net {} more used (folding copies pages to keep chains short)",
            human(written - freed)
        )
    };
    format!("freed {}, wrote {}, {net}", human(freed), human(written))
}

/// Why epoch `id` cannot be restored because of its ancestors, following
/// parents through `rows` down to a full epoch.
fn chain_error(rows: &BTreeMap<u64, &Row>, id: u64) -> Option<String> {
    let mut at = rows.get(&id)?;
    // Parents have smaller ids (the reader checks it), so this ends; the
    // bound only guards against a bug.
    for _ in 0..=rows.len() {
        if at.full {
            return None;
        }
        let child = at.id?;
        let parent = at.parent?;
        let who = if child == id {
            "its parent".to_string()
        } else {
            format!("its ancestor (the parent of epoch {child})")
        };
        match rows.get(&parent) {
            None => return Some(format!("{who} epoch {parent} is missing")),
            Some(p) if p.damaged => return Some(format!("{who} epoch {parent} is damaged")),
            Some(p) if p.machine != at.machine => {
                return Some(format!(
                    "{who} epoch {parent} describes another machine ({} bytes of RAM and {} vCPUs, not {} and {})",
                    p.machine.0, p.machine.1, at.machine.0, at.machine.1
                ));
            }
            Some(p) => at = p,
        }
    }
    Some("its chain of parents does not end".into())
}

/// List the epochs of a snapshot directory. Exits 1 when any entry is
/// damaged, cannot be restored, or is a file that is not an epoch.
pub fn ls(a: LsArgs) -> Result<i32, LsError> {
    let rows = match a.dir.to_str().filter(|d| remote::RemoteUrl::is_remote(d)) {
        Some(url) => remote_rows(url, a.encrypt_key.as_deref())?,
        None => {
            crate::remote_args::remote_only(&a.dir, "--encrypt-key", a.encrypt_key.is_some())?;
            let depth = if a.quick {
                store::Depth::Structure
            } else {
                store::Depth::Pages
            };
            rows(&a.dir, depth)?
        }
    };
    let ledger = store::Ledger::load(&a.dir).ok().flatten();
    let policy = ledger
        .as_ref()
        .and_then(|l| store::Policy::parse(&l.policy).ok())
        .unwrap_or_default();
    let bad = rows.iter().any(Row::is_bad);
    let summary = summary(&rows, ledger.as_ref(), &policy);
    match print(&rows, a.json).and_then(|()| {
        if a.json {
            Ok(())
        } else {
            writeln!(std::io::stdout(), "{summary}")
        }
    }) {
        Ok(()) => {}
        // `consnap ls | head` closes the pipe early: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(LsError::Write(e)),
    }
    Ok(i32::from(bad))
}

/// The rows of a listing, annotated with which epochs restore (read to
/// `depth`), tiers and chain lengths (also served by the control API and
/// shown by `ctl` and `demo`).
pub fn rows(dir: &Path, depth: store::Depth) -> Result<Vec<Row>, LsError> {
    let store = Store::open(dir, Access::Read)?;
    let bar = crate::progress::Bar::new("checking", false);
    let health = store::assess(&store, depth, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    let listed = store.list()?;
    let name_of = |id: u64| store::epoch_file_name(id);
    let mut rows: Vec<Row> = listed
        .into_iter()
        .map(|(id, info)| match info {
            Ok(i) => row_of(id, name_of(id), &i.header, i.file_bytes),
            Err(e) => Row {
                id: Some(id),
                file: name_of(id),
                damaged: true,
                error: Some(e.to_string()),
                ..Row::default()
            },
        })
        .collect();
    let strays = store.strays()?;
    for stray in strays {
        rows.push(Row {
            file: stray
                .path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            damaged: true,
            error: Some(format!("{}: {}", stray.path.display(), stray.why)),
            ..Row::default()
        });
    }
    let ledger = store::Ledger::load(dir).ok().flatten();
    let policy = ledger
        .as_ref()
        .and_then(|l| store::Policy::parse(&l.policy).ok())
        .unwrap_or_default();
    mark_missing_parents(&mut rows);
    for r in rows.iter_mut() {
        r.pages_checked = depth == store::Depth::Pages;
        match r.id.and_then(|id| health.epochs.get(&id)) {
            Some(store::Verdict::Restores { chain }) => {
                r.restorable = true;
                r.chain = Some(*chain);
            }
            Some(store::Verdict::Fails(why)) if !r.damaged => r.chain_error = Some(why.clone()),
            _ => {}
        }
    }
    annotate(&mut rows, &policy);
    Ok(rows)
}

/// The row of a sound epoch.
fn row_of(id: u64, file: String, h: &store::Header, bytes: u64) -> Row {
    Row {
        id: Some(id),
        file,
        parent: (h.parent != 0).then_some(h.parent),
        created_ns: h.created_ns,
        time: utc(h.created_ns),
        mode: h.mode.name().into(),
        full: h.is_full(),
        pages: h.pages_data,
        zero_pages: h.pages_zero,
        bytes,
        disk_bytes: h.region_pages_data * store::PAGE as u64,
        pause_us: h.pause_ns as f64 / 1e3,
        guest_ops: (h.progress != u64::MAX).then_some(h.progress),
        compression: h.codec.name().into(),
        merged: h.merged,
        machine: (h.mem_size, h.vcpus),
        ..Row::default()
    }
}

/// The rows of a remote store: its MANIFEST, and each epoch's header.
pub fn remote_rows(url: &str, key: Option<&Path>) -> Result<Vec<Row>, LsError> {
    let client = remote_args::remote_client(url, key)?;
    let m = remote::manifest(&client)?;
    let mut rows: Vec<Row> = remote::headers(&client, &m)?
        .into_iter()
        .map(|(e, h)| match h {
            Ok(h) => row_of(e.id, e.object, &h, e.bytes),
            Err(err) => Row {
                id: Some(e.id),
                file: e.object,
                damaged: true,
                error: Some(err.to_string()),
                ..Row::default()
            },
        })
        .collect();
    finish(&mut rows, &store::Policy::default());
    Ok(rows)
}

/// Chain errors, restorability, tiers and chain lengths.
fn finish(rows: &mut [Row], policy: &store::Policy) {
    mark_missing_parents(rows);
    let ids: BTreeMap<u64, &Row> = rows.iter().filter_map(|r| Some((r.id?, r))).collect();
    let broken: Vec<(u64, Option<String>)> = rows
        .iter()
        .filter(|r| !r.damaged)
        .filter_map(|r| {
            let id = r.id?;
            Some((id, chain_error(&ids, id)))
        })
        .collect();
    for (id, why) in broken {
        if let Some(r) = rows.iter_mut().find(|r| r.id == Some(id)) {
            r.chain_error = why;
        }
    }
    for r in rows.iter_mut() {
        r.restorable = r.id.is_some() && !r.is_bad();
    }
    annotate(rows, policy);
}

/// Mark the epochs whose parent epoch is not among `rows`.
fn mark_missing_parents(rows: &mut [Row]) {
    let ids: std::collections::BTreeSet<u64> = rows.iter().filter_map(|r| r.id).collect();
    for r in rows.iter_mut() {
        r.parent_missing = r.parent.is_some_and(|p| !ids.contains(&p));
    }
}

/// Tier and chain length of each epoch.
fn annotate(rows: &mut [Row], policy: &store::Policy) {
    let now = rows
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.created_ns)
        .max()
        .unwrap_or(0);
    let parents: BTreeMap<u64, Option<u64>> = rows.iter().filter_map(|r| Some((r.id?, r.parent))).collect();
    for r in rows.iter_mut().filter(|r| r.error.is_none() && r.id.is_some()) {
        r.tier = Some(match policy.tier_of(now.saturating_sub(r.created_ns)) {
            Some(t) => policy.tier_name(t),
            None => "expired".into(),
        });
        if r.restorable && r.chain.is_none() {
            let mut n = 1;
            let mut at = r.parent;
            while let Some(p) = at {
                n += 1;
                at = parents.get(&p).copied().flatten();
                if n > parents.len() {
                    break;
                }
            }
            r.chain = Some(n);
        }
    }
}

fn summary(rows: &[Row], ledger: Option<&store::Ledger>, policy: &store::Policy) -> String {
    let epochs = rows.iter().filter(|r| r.id.is_some()).count();
    let bytes: u64 = rows.iter().map(|r| r.bytes).sum();
    let longest = rows.iter().filter_map(|r| r.chain).max().unwrap_or(0);
    let mut line = format!(
        "{} in {}, {} in all; longest chain {}; policy {}",
        crate::args::counted(epochs as u64, "epoch"),
        crate::args::counted(rows.len() as u64, "file"),
        human(bytes),
        crate::args::counted(longest as u64, "file"),
        policy.text()
    );
    match ledger {
        Some(l) => {
            line += &format!(
                "; reclamation merged {} epochs, dropped {}, rewrote {} ({} folds) in {:.1}s: {}",
                l.merged,
                l.dropped,
                l.rewrites,
                l.folds,
                l.time_ns as f64 / 1e9,
                net_reclaimed(l.bytes_freed, l.bytes_written)
            );
        }
        None => line += "; nothing reclaimed yet",
    }
    let unrestorable = rows.iter().filter(|r| r.id.is_some() && !r.restorable).count();
    if unrestorable > 0 {
        let verb = if unrestorable == 1 { "does" } else { "do" };
        line += &format!(
            "; {} {verb} not restore",
            crate::args::counted(unrestorable as u64, "epoch")
        );
    }
    if rows.iter().any(|r| r.id.is_some() && !r.pages_checked) {
        line += "; pages not read: restorable assumes they are intact (consnap verify reads them)";
    }
    line
}

pub fn print(rows: &[Row], json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(rows).map_err(std::io::Error::other)?;
        writeln!(out, "{text}")?;
    } else {
        writeln!(
            out,
            "{:>6} {:>6}  {:<23}  {:<14} {:<4} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>5}  TIER",
            "ID",
            "PARENT",
            "TIME (UTC)",
            "MODE",
            "KIND",
            "PAGES",
            "ZERO",
            "BYTES",
            "DISK",
            "PAUSE",
            "GUEST OPS",
            "FILES",
        )?;
        for r in rows {
            let id = r.id.map_or_else(|| "-".to_string(), |i| i.to_string());
            if let Some(e) = &r.error {
                let what = if r.id.is_some() { "damaged" } else { "not an epoch" };
                writeln!(out, "{id:>6}  {what}: {e}")?;
                continue;
            }
            writeln!(
                out,
                "{:>6} {:>6}  {:<23}  {:<14} {:<4} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>5}  {}",
                id,
                r.parent.map_or("-".to_string(), |p| {
                    if r.parent_missing {
                        format!("{p}!")
                    } else {
                        p.to_string()
                    }
                }),
                r.time,
                r.mode,
                if r.full { "full" } else { "incr" },
                r.pages,
                r.zero_pages,
                human(r.bytes),
                if r.disk_bytes > 0 {
                    human(r.disk_bytes)
                } else {
                    "-".into()
                },
                format!("{:.1}ms", r.pause_us / 1e3),
                r.guest_ops.map_or("-".to_string(), |o| o.to_string()),
                r.chain.map_or("-".to_string(), |c| c.to_string()),
                r.tier.as_deref().unwrap_or("-"),
            )?;
            if let Some(why) = &r.chain_error {
                writeln!(out, "{id:>6}  cannot be restored: {why}")?;
            }
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
