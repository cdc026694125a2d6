//! `consnap verify`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use guest::host::check::CheckError;
use thiserror::Error;

use crate::progress::Bar;
use crate::remote_args::{self, RemoteArgsError};

/// Why a store cannot be verified (problems found in it are not errors:
/// they are reported, and the exit status is 1).
#[derive(Debug, Error)]
pub enum VerifyError {
    /// The object store cannot be reached as given.
    #[error(transparent)]
    RemoteArgs(#[from] RemoteArgsError),
    /// The object store cannot be read.
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    /// The store cannot be opened or listed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// `--workload`: an epoch's memory cannot be restored.
    #[error(transparent)]
    Restore(#[from] snapshot::RestoreError),
    /// `--workload` on a store of another guest.
    #[error("epoch {id}: the guest is not the workload guest; --workload has nothing to check")]
    NotWorkloadGuest {
        /// The epoch.
        id: u64,
    },
    /// `--workload`: an epoch's memory cannot be checked.
    #[error("--workload cannot check epoch {id}: {source}")]
    Check {
        /// The epoch.
        id: u64,
        /// Why.
        #[source]
        source: CheckError,
    },
    /// The report cannot be written to stdout.
    #[error("cannot write the report: {0}")]
    Write(#[source] std::io::Error),
}

/// Options of `consnap verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Snapshot directory, or an object store a run replicated to
    /// (s3://BUCKET/PREFIX: every epoch is fetched into --cache, checked
    /// against its object name on the way, then verified there).
    pub dir: PathBuf,
    /// Where a remote store is copied (as for `restore --cache`; default:
    /// the restore cache).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// The key an object store's epochs are encrypted with.
    #[arg(long, value_name = "FILE")]
    pub encrypt_key: Option<PathBuf>,
    /// Also restore every epoch's memory and compare it word by word with
    /// what the workload guest must hold at the op count it published
    /// (memstress only): proves that epochs restore what the guest had.
    #[arg(long)]
    pub workload: bool,
}

/// Check every byte of a store; exit status 1 on any problem, each named
/// with its file, byte offsets and what is wrong.
pub fn verify(mut a: VerifyArgs) -> Result<i32, VerifyError> {
    let mut fetched = None;
    let mut _copy = None;
    if !a.dir.to_str().is_some_and(remote::RemoteUrl::is_remote) {
        remote_args::remote_only(&a.dir, "--cache", a.cache.is_some())?;
        remote_args::remote_only(&a.dir, "--encrypt-key", a.encrypt_key.is_some())?;
    }
    if let Some(url) = a.dir.to_str().filter(|d| remote::RemoteUrl::is_remote(d)) {
        let client = remote_args::remote_client(url, a.encrypt_key.as_deref())?;
        let u = client.url().clone();
        let m = remote::manifest(&client)?;
        let copy = remote_args::Copy::new(a.cache.as_deref(), &client, &m)?;
        let cache = copy.dir.clone();
        let f = remote::fetch_all(&client, &m, &cache)?;
        copy.bound()?;
        _copy = Some(copy);
        fetched = Some(format!(
            "{} epochs of {u} fetched into {} ({} downloaded, {} bytes, {:.2} s) and verified there",
            f.chain,
            cache.display(),
            f.downloaded,
            f.bytes,
            f.seconds
        ));
        a.dir = cache;
    }
    let bar = Bar::new("verifying", false);
    let mut v = store::verify(&a.dir, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    if a.workload && v.problems.is_empty() {
        let (problems, notes) = check_workload(&a.dir)?;
        v.problems.extend(problems);
        v.notes.extend(notes);
    }
    let mut out = std::io::stdout().lock();
    let mut print = || -> std::io::Result<()> {
        for p in &v.problems {
            writeln!(out, "{p}")?;
        }
        for n in v.notes.iter().chain(&fetched) {
            writeln!(out, "note: {n}")?;
        }
        writeln!(
            out,
            "{}: {}, {} checked, {} restore: {}",
            a.dir.display(),
            crate::args::counted(v.epochs, "epoch"),
            crate::ls_cmd::human(v.bytes),
            v.restorable,
            match v.problems.len() {
                0 => "no problems".to_string(),
                1 => "1 problem".to_string(),
                n => format!("{n} problems"),
            }
        )
    };
    match print() {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(VerifyError::Write(e)),
    }
    Ok(i32::from(!v.problems.is_empty()))
}

/// Restore each epoch's RAM and check it against the workload reference.
fn check_workload(dir: &std::path::Path) -> Result<(Vec<store::Problem>, Vec<String>), VerifyError> {
    use store::{Access, Store};
    let store = Store::open(dir, Access::Read)?;
    let ids = store.ids()?;
    let bar = Bar::new("checking memory", false);
    let (mut problems, mut checked, mut idle) = (Vec::new(), 0u64, 0u64);
    for (i, &id) in ids.iter().enumerate() {
        bar.update(i as u64, ids.len() as u64);
        let r = snapshot::restore_ram(&store, id, &mut |_, _| {})?;
        let Some(spec) = guest::host::workload_of(&r.state.config) else {
            return Err(VerifyError::NotWorkloadGuest { id });
        };
        match guest::host::check::check(&r.ram, &spec) {
            Ok(c) if c.shares == 0 => idle += 1,
            Ok(c) => match r.progress {
                Some(at_capture) if at_capture != c.ops => problems.push(store::Problem {
                    path: store.epoch_path(id),
                    what: format!(
                        "epoch {id} restores a status page saying {} ops, but the guest had done {at_capture} when it was captured",
                        c.ops
                    ),
                }),
                _ => checked += 1,
            },
            Err(e @ (CheckError::Differs { .. } | CheckError::OutOfRam { .. })) => problems.push(store::Problem {
                path: store.epoch_path(id),
                what: format!("epoch {id} restores memory the guest never had: {e}"),
            }),
            Err(source) => return Err(VerifyError::Check { id, source }),
        }
    }
    bar.finish();
    let mut notes = vec![format!(
        "--workload: {checked} epochs' memory equals the reference at their op counts"
    )];
    if idle > 0 {
        notes.push(format!(
            "--workload: {idle} epochs precede the workload's start (nothing to compare)"
        ));
    }
    Ok((problems, notes))
}
