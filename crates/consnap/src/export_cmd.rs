//! `consnap export`: write the disks of an epoch into new images without
//! running the VM.

use std::path::PathBuf;

use clap::Args;
use store::{Access, Store};
use thiserror::Error;

use crate::progress::Bar;

/// Why the disks cannot be exported.
#[derive(Debug, Error)]
pub enum ExportError {
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// `--at` names no epoch.
    #[error(transparent)]
    At(#[from] crate::at::AtError),
    /// The disks cannot be written.
    #[error(transparent)]
    Restore(#[from] snapshot::RestoreError),
    /// Nothing to do.
    #[error("give --disk-out PATH for each disk of the epoch, in order (`consnap inspect DIR ID` lists them)")]
    NoOutput,
    /// An object store.
    #[error(
        "{0}: export reads a local snapshot directory; restore the epoch from the object store with `consnap restore --cache DIR` first, or export from the directory the run wrote"
    )]
    Remote(String),
}

/// Options of `consnap export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Epoch: an id from `consnap ls`, `latest`, a time before now such as
    /// `-30s`, or an RFC 3339 time.
    #[arg(long, default_value = "latest", allow_hyphen_values = true)]
    pub at: String,
    /// Write the epoch's disk into this new image (repeatable: one per
    /// disk, in order; the path must not exist).
    #[arg(long, value_name = "PATH")]
    pub disk_out: Vec<PathBuf>,
}

/// Write the epoch's disks; returns consnap's exit status.
pub fn export(a: ExportArgs) -> Result<i32, ExportError> {
    if let Some(d) = a.dir.to_str().filter(|d| remote::RemoteUrl::is_remote(d)) {
        return Err(ExportError::Remote(d.to_string()));
    }
    if a.disk_out.is_empty() {
        return Err(ExportError::NoOutput);
    }
    let store = Store::open(&a.dir, Access::Read)?;
    let id = crate::at::resolve(&store, &a.at)?;
    let bar = Bar::new(&format!("exporting the disks of epoch {id}"), true);
    let read = snapshot::restore::export_disks(&store, id, &a.disk_out, &mut |done, total| bar.update(done, total));
    bar.finish();
    let read = read?;
    for p in &a.disk_out {
        eprintln!("consnap: wrote {} (epoch {id})", p.display());
    }
    tracing::info!(epoch = id, bytes = read, "disks exported");
    Ok(0)
}
