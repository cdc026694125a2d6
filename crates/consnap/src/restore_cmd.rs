//! `consnap restore`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use store::{Access, Store};
use thiserror::Error;

use crate::at::AtError;
use crate::remote_args::{self, RemoteArgsError};
use crate::report::RestoredFrom;
use crate::session::{self, SessionArgs, SessionError};

/// Why `consnap restore` cannot restore or run its VM.
#[derive(Debug, Error)]
pub enum RestoreCmdError {
    /// The session's options, or the run itself.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// `--cache` with `--lazy` from an object store.
    #[error(
        "--cache: a lazy restore from an object store reads its epochs in place, by ranged GETs, and keeps no local copy; drop --cache or --lazy"
    )]
    LazyCache,
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// `--at` names no epoch.
    #[error(transparent)]
    At(#[from] AtError),
    /// The epoch cannot be restored; `fallback` suggests another.
    #[error("cannot restore epoch {id}: {source}{fallback}")]
    Refused {
        /// The epoch.
        id: u64,
        /// Why.
        #[source]
        source: snapshot::RestoreError,
        /// The epoch to try instead, if any.
        fallback: Fallback,
    },
    /// The object store cannot be read.
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    /// The object store cannot be reached as given.
    #[error(transparent)]
    RemoteArgs(#[from] RemoteArgsError),
    /// `--at` names an epoch the object store's manifest lacks.
    #[error("{url} has no epoch {id} in its manifest")]
    NotInManifest {
        /// The object store.
        url: String,
        /// The epoch.
        id: u64,
    },
    /// An epoch of an object store cannot be restored in place.
    #[error("cannot restore epoch {id} of {url}: {source}")]
    RemoteRefused {
        /// The epoch.
        id: u64,
        /// The object store.
        url: String,
        /// Why.
        #[source]
        source: snapshot::RestoreError,
    },
}

/// What a refused restore suggests instead.
#[derive(Debug)]
pub enum Fallback {
    /// Nothing: another epoch would fail the same way.
    Unsought,
    /// The newest epoch of the store `dir` that can be restored.
    Intact {
        /// The epoch.
        id: u64,
        /// The store.
        dir: PathBuf,
    },
    /// No other epoch of the store can be restored.
    NoneIntact,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fallback::Unsought => Ok(()),
            Fallback::Intact { id, dir } => write!(
                f,
                "; the newest epoch that restores is {id}: consnap restore {} --at {id}",
                dir.display()
            ),
            Fallback::NoneIntact => f.write_str("; no other epoch in the store can be restored"),
        }
    }
}

/// Options of `consnap restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot directory, or an object store a run replicated to
    /// (s3://BUCKET/PREFIX: the epoch's chain is fetched into --cache
    /// first, or read in place with --lazy; endpoint and credentials as
    /// for --replicate).
    pub dir: PathBuf,
    /// Where the chain of an epoch restored from an object store is
    /// copied (a store directory holding that store or nothing; later
    /// restores reuse what it holds). Default: an entry of the restore
    /// cache, $HOME/.cache/consnap/remote/ (`consnap cache ls`), kept
    /// under CONSNAP_CACHE_MAX (default 4G) by removing the least recently
    /// used entries.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Epoch to restore: an id from `consnap ls`, `latest`, a time before
    /// now such as `-30s`, or an RFC 3339 time (the newest epoch captured
    /// at or before it).
    #[arg(long, default_value = "latest", allow_hyphen_values = true)]
    pub at: String,
    /// Start the VM at once and bring guest pages in on demand (and in
    /// the background), each verified before the guest sees it. From an
    /// object store, pages are fetched by ranged GETs and nothing is kept
    /// locally.
    #[arg(long)]
    pub lazy: bool,
    /// Write the epoch's disk into this new image and run the VM on it
    /// (repeatable: one per disk of the epoch, in order). The path must not
    /// exist; the image the VM first ran on is never changed. With --lazy
    /// the image fills from the store while the VM runs.
    #[arg(long, value_name = "NEWPATH")]
    pub disk: Vec<PathBuf>,
    /// Reattach the epoch's networks to these TAP devices (repeatable, in
    /// order; by default each to the TAP of the same name it had).
    #[arg(long, value_name = "tap=NAME", value_parser = crate::args::restore_net)]
    pub net: Vec<vmm::machine::NetAttach>,
    /// Reporting and snapshot options.
    #[command(flatten)]
    pub session: SessionArgs,
}

/// Why epoch `id` cannot be restored, and the newest epoch that can (as
/// [`store::assess`] finds: the answer of `ls` and `verify`).
fn refusal(store: &Store, id: u64, e: snapshot::RestoreError) -> RestoreCmdError {
    let fallback = fallback(store, id, &e);
    RestoreCmdError::Refused {
        id,
        source: e,
        fallback,
    }
}

/// The newest epoch to restore instead of `id`, which failed with `e`.
fn fallback(store: &Store, id: u64, e: &snapshot::RestoreError) -> Fallback {
    // Not damage: another epoch would fail the same way (and each check
    // would walk a chain that long again), or the options are at fault.
    if matches!(
        e,
        snapshot::RestoreError::Store(store::StoreError::ChainTooLong { .. })
            | snapshot::RestoreError::Disks { .. }
            | snapshot::RestoreError::Disk { .. }
    ) {
        return Fallback::Unsought;
    }
    // The answer `ls` and `verify` give: every epoch's chain, state and
    // every page it takes, read once.
    let intact = store::assess(store, store::Depth::Pages, &mut |_, _| {})
        .ok()
        .and_then(|h| h.restorable().rev().find(|c| *c != id));
    match intact {
        Some(c) => Fallback::Intact {
            id: c,
            dir: store.dir().to_path_buf(),
        },
        None => Fallback::NoneIntact,
    }
}

fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Restore a VM and run it to its end; returns consnap's exit status.
pub fn restore(mut a: RestoreArgs) -> Result<i32, RestoreCmdError> {
    let started = Instant::now();
    let remote = a.dir.to_str().is_some_and(remote::RemoteUrl::is_remote);
    if !remote {
        remote_args::remote_only(&a.dir, "--cache", a.cache.is_some())?;
        let key_unused = a.session.encrypt_key.is_some() && a.session.replicate.is_none();
        remote_args::remote_only(&a.dir, "--encrypt-key", key_unused)?;
    }
    let pre = session::preflight(&a.session)?;
    let mut _copy = None;
    let fetched = match a.dir.to_str().filter(|d| remote::RemoteUrl::is_remote(d)) {
        Some(url) if a.lazy => {
            if a.cache.is_some() {
                return Err(RestoreCmdError::LazyCache);
            }
            let url = url.to_string();
            return restore_remote_lazy(a, &url, pre, started);
        }
        Some(url) => {
            let (f, copy) = fetch_remote(url, &a.at, a.cache.as_deref(), a.session.encrypt_key.as_deref())?;
            a.dir = copy.dir.clone();
            a.at = f.1.to_string();
            // The restore cache's entry stays in use until the end.
            _copy = Some(copy);
            Some(f.0)
        }
        None => None,
    };
    tracing::debug!(us = started.elapsed().as_micros() as u64, "restore: preflight done");
    let store = Store::open(&a.dir, Access::Read)?;
    let id = crate::at::resolve(&store, &a.at)?;
    tracing::debug!(
        us = started.elapsed().as_micros() as u64,
        "restore: store opened, epoch {id} chosen"
    );
    let (restored, pager) = if a.lazy {
        // cow snapshots share guest RAM's userfaultfd with the pager.
        let for_cow = a.session.snapshot_dir.is_some() && a.session.mode == session::ModeArg::Cow;
        match snapshot::restore_lazy(
            &store,
            id,
            |c| session::attach(c, &a.disk, &a.net, &pre.output),
            for_cow,
        ) {
            Ok((r, p)) => (r, Some(p)),
            Err(e) => return Err(refusal(&store, id, e)),
        }
    } else {
        let bar = crate::progress::Bar::new(&format!("restoring epoch {id}"), true);
        let restored = snapshot::restore(
            &store,
            id,
            |c| session::attach(c, &a.disk, &a.net, &pre.output),
            &mut |done, total| {
                bar.update(done, total);
            },
        );
        bar.finish();
        match restored {
            Ok(r) => (r, None),
            Err(e) => return Err(refusal(&store, id, e)),
        }
    };
    let from = RestoredFrom {
        dir: a.dir.display().to_string(),
        epoch: id,
        chain: restored.chain,
        bytes_read: restored.bytes_read,
        restore_s: started.elapsed().as_secs_f64(),
        first_op_s: None,
        remote: fetched,
        lazy: None,
    };
    tracing::info!(
        epoch = id,
        chain = restored.chain,
        bytes = restored.bytes_read,
        "restored"
    );
    let parent = a
        .session
        .snapshot_dir
        .as_deref()
        .filter(|d| same_dir(d, &a.dir))
        .map(|_| id);
    drop(store);
    Ok(session::execute(
        restored.machine,
        "restore",
        &a.session,
        pre,
        Some(session::Origin { from, parent, pager }),
        started,
    )?)
}

/// Restore lazily from the object store `url`, reading the chain in
/// place: headers, indexes and page checksums first, page data by ranged
/// GETs as the guest (and the background fill) needs it. Nothing of guest
/// memory is written to the local disk.
fn restore_remote_lazy(
    a: RestoreArgs,
    url: &str,
    pre: session::Preflight,
    started: Instant,
) -> Result<i32, RestoreCmdError> {
    let (client, m, id) = remote_epoch(url, &a.at, a.session.encrypt_key.as_deref())?;
    let client = std::sync::Arc::new(client);
    let u = client.url().clone();
    remote::check_key(&client, &m)?;
    let entry = m
        .get(id)
        .ok_or_else(|| RestoreCmdError::NotInManifest { url: u.to_string(), id })?;
    let head = remote::header(&client, entry)?;
    let opened = std::sync::Mutex::new(None);
    let for_cow = a.session.snapshot_dir.is_some() && a.session.mode == session::ModeArg::Cow;
    let (restored, pager) = snapshot::restore_lazy_from(
        &head,
        || {
            let c = remote::open_chain(&client, &m, id)
                .map_err(|e| snapshot::RestoreError::Chain { id, why: e.to_string() })?;
            let fetched = c.stats.bytes.load(std::sync::atomic::Ordering::Relaxed);
            *opened.lock().unwrap_or_else(|p| p.into_inner()) = Some((c.seconds, fetched));
            Ok(c.chain)
        },
        |c| session::attach(c, &a.disk, &a.net, &pre.output),
        for_cow,
    )
    .map_err(|source| RestoreCmdError::RemoteRefused {
        id,
        url: u.to_string(),
        source,
    })?;
    let (seconds, bytes) = opened
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or_default();
    tracing::info!(
        epoch = id,
        chain = restored.chain,
        seconds,
        bytes,
        "opened in place in {u}"
    );
    let from = RestoredFrom {
        dir: u.to_string(),
        epoch: id,
        chain: restored.chain,
        bytes_read: restored.bytes_read,
        restore_s: started.elapsed().as_secs_f64(),
        first_op_s: None,
        remote: Some(crate::report::RemoteFetch {
            url: u.to_string(),
            cache: None,
            downloaded: 0,
            bytes,
            seconds,
        }),
        lazy: None,
    };
    Ok(session::execute(
        restored.machine,
        "restore",
        &a.session,
        pre,
        Some(session::Origin {
            from,
            parent: None,
            pager: Some(pager),
        }),
        started,
    )?)
}

/// A client for the object store `url`, its manifest, and the epoch `at`
/// names there (ids and capture times from the manifest).
fn remote_epoch(
    url: &str,
    at: &str,
    key: Option<&std::path::Path>,
) -> Result<(remote::Client, remote::Manifest, u64), RestoreCmdError> {
    let client = remote_args::remote_client(url, key)?;
    let m = remote::manifest(&client)?;
    let epochs: Vec<(u64, u64)> = m.epochs.iter().map(|e| (e.id, e.created_ns)).collect();
    let id = crate::at::resolve_in(&epochs, at, &client.url().to_string())?;
    Ok((client, m, id))
}

/// Fetch the chain of the epoch `at` names in the object store `url` into
/// a local store (`cache`, or the restore cache); returns what was fetched
/// with the epoch's id, and the local copy.
fn fetch_remote(
    url: &str,
    at: &str,
    cache: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<((crate::report::RemoteFetch, u64), remote_args::Copy), RestoreCmdError> {
    let (client, m, id) = remote_epoch(url, at, key)?;
    let u = client.url().clone();
    let copy = remote_args::Copy::new(cache, &client, &m)?;
    let f = remote::fetch_chain(&client, &m, id, &copy.dir)?;
    copy.bound()?;
    tracing::info!(
        epoch = id,
        downloaded = f.downloaded,
        bytes = f.bytes,
        seconds = f.seconds,
        "fetched from {u}"
    );
    Ok((
        (
            crate::report::RemoteFetch {
                url: u.to_string(),
                cache: Some(copy.dir.display().to_string()),
                downloaded: f.downloaded,
                bytes: f.bytes,
                seconds: f.seconds,
            },
            id,
        ),
        copy,
    ))
}
