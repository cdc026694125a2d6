//! Store errors. Each names the file or epoch at fault.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong reading or writing a store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// An I/O call failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The directory is not a consnap store.
    #[error("{path} is not a consnap snapshot directory (no valid STORE file): {why}")]
    NotAStore {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Another process holds the store.
    #[error("snapshot directory {0} is in use by another consnap process")]
    Busy(PathBuf),
    /// A file is damaged.
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file from a newer or older consnap.
    #[error("{path}: format version {found} is not supported (this consnap reads version {supported})")]
    Version {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// No such epoch.
    #[error("epoch {id} is not in {dir}")]
    NoEpoch {
        /// The store.
        dir: PathBuf,
        /// Requested epoch.
        id: u64,
    },
    /// The store has no epochs.
    #[error("{0} holds no snapshots")]
    Empty(PathBuf),
    /// A chain is broken.
    #[error("epoch {id} needs its parent epoch {parent}, which is missing from {dir}")]
    MissingParent {
        /// The store.
        dir: PathBuf,
        /// The epoch.
        id: u64,
        /// Its parent.
        parent: u64,
    },
    /// Epochs that do not belong together.
    #[error("{path}: {why}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The writer was used out of order.
    /// A chain has more files than this process may keep open.
    #[error(
        "epoch {id} of {dir} is built on a chain of more than {files} files, more than this process may open at once ({limit}): shorten the chains with `consnap compact {dir} --max-chain 64`"
    )]
    ChainTooLong {
        /// The store.
        dir: PathBuf,
        /// The epoch restored.
        id: u64,
        /// Files opened when the limit was hit.
        files: usize,
        /// The open-file limit.
        limit: u64,
    },
    #[error("epoch writer misuse: {0}")]
    Usage(&'static str),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, StoreError>;

pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { path, op, source }
}
