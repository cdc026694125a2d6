//! `consnap cache`: list and prune the restore cache (remote_cache.rs).

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use thiserror::Error;

use crate::ls_cmd::{human, utc};
use crate::remote_cache::{self, CacheError, Entry};

/// Why the cache cannot be listed or pruned.
#[derive(Debug, Error)]
pub enum CacheCmdError {
    /// The cache cannot be read or changed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The listing cannot be written to stdout.
    #[error("cannot write the listing: {0}")]
    Write(#[source] std::io::Error),
}

/// Options of `consnap cache`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// List the stores copied from object stores: size, URL, endpoint and
    /// last use, least recently used first.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove copies, least recently used first, never one in use. Without
    /// options: down to CONSNAP_CACHE_MAX (default 4G).
    Prune {
        /// Remove until the cache holds at most SIZE (such as 1G).
        #[arg(long, value_name = "SIZE", value_parser = crate::args::size)]
        max_size: Option<u64>,
        /// Remove every copy not used for DURATION (such as 7d).
        #[arg(long, value_name = "DURATION", value_parser = crate::args::duration)]
        older_than: Option<Duration>,
        /// Remove every copy not in use.
        #[arg(long, conflicts_with_all = ["max_size", "older_than"])]
        all: bool,
    },
}

/// One entry, for `cache ls --json`.
#[derive(Debug, Serialize)]
struct Listed {
    dir: String,
    /// The store inside it (what `restore --cache` and `ls` take).
    store_dir: String,
    url: Option<String>,
    endpoint: Option<String>,
    store: Option<String>,
    bytes: u64,
    last_used_ns: u64,
    in_use: bool,
}

/// Run `consnap cache`; its exit status.
pub fn cache(a: CacheArgs) -> Result<i32, CacheCmdError> {
    let root = remote_cache::root()?;
    let out = match a.command {
        CacheCommand::Ls { json } => ls(&root, json)?,
        CacheCommand::Prune {
            max_size,
            older_than,
            all,
        } => {
            let max = match (max_size, older_than, all) {
                (None, None, false) => remote_cache::max_size()?,
                _ => max_size,
            };
            prune(&root, max, older_than, all)?
        }
    };
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(CacheCmdError::Write(e)),
    }
}

/// What an entry holds, on one line.
fn describe(e: &Entry) -> String {
    match &e.origin {
        Some(o) => format!("{} via {} (store {})", o.url, o.endpoint, o.store),
        None => "(left by an older consnap: origin unknown)".into(),
    }
}

fn ls(root: &std::path::Path, json: bool) -> Result<String, CacheCmdError> {
    let entries = remote_cache::list(root)?;
    if json {
        let listed: Vec<Listed> = entries
            .iter()
            .map(|e| Listed {
                dir: e.dir.display().to_string(),
                store_dir: e.store().display().to_string(),
                url: e.origin.as_ref().map(|o| o.url.clone()),
                endpoint: e.origin.as_ref().map(|o| o.endpoint.clone()),
                store: e.origin.as_ref().map(|o| o.store.clone()),
                bytes: e.bytes,
                last_used_ns: e.last_used_ns,
                in_use: remote_cache::in_use(e),
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&listed).unwrap_or_default() + "\n");
    }
    let mut s = String::new();
    if !entries.is_empty() {
        s += &format!("{:<23}  {:>10}  {:<6}  WHAT\n", "LAST USED (UTC)", "SIZE", "IN USE");
    }
    for e in &entries {
        s += &format!(
            "{:<23}  {:>10}  {:<6}  {}\n      {}\n",
            utc(e.last_used_ns),
            human(e.bytes),
            if remote_cache::in_use(e) { "yes" } else { "" },
            describe(e),
            e.dir.display()
        );
    }
    let total: u64 = entries.iter().map(|e| e.bytes).sum();
    let limit = match remote_cache::max_size()? {
        Some(m) => format!("limit {}", human(m)),
        None => "no limit".into(),
    };
    s += &format!(
        "{}, {} in {} ({limit}, {}); `consnap cache prune` removes copies\n",
        crate::args::counted(entries.len() as u64, "store"),
        human(total),
        root.display(),
        remote_cache::MAX_VAR
    );
    Ok(s)
}

fn prune(
    root: &std::path::Path,
    max: Option<u64>,
    older_than: Option<Duration>,
    all: bool,
) -> Result<String, CacheCmdError> {
    let entries = remote_cache::list(root)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let (mut s, mut removed, mut freed) = (String::new(), 0u64, 0u64);
    for e in &entries {
        let old = older_than.is_some_and(|d| now.saturating_sub(e.last_used_ns) > d.as_nanos() as u64);
        let over = max.is_some_and(|m| total > m);
        if !(all || old || over) {
            continue;
        }
        if !remote_cache::remove(e)? {
            s += &format!("kept {} (in use): {}\n", e.dir.display(), describe(e));
            continue;
        }
        total -= e.bytes;
        removed += 1;
        freed += e.bytes;
        s += &format!(
            "removed {} ({}, last used {}): {}\n",
            e.dir.display(),
            human(e.bytes),
            utc(e.last_used_ns),
            describe(e)
        );
    }
    s += &format!(
        "removed {}, freed {}; {} left in {}\n",
        crate::args::counted(removed, "store"),
        human(freed),
        human(total),
        root.display()
    );
    Ok(s)
}
