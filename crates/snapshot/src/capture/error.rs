//! Errors of the snapshot engine: one typed error for an epoch, from its
//! capture to its commit, and the errors of setting the engine up.

use thiserror::Error;

use crate::capture::target::TargetError;

/// What went wrong with one epoch. Always wrapped in [`EpochError`], which names the epoch.
#[derive(Debug, Error)]
pub enum EpochFailure {
    /// The snapshot directory or the epoch file.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Pausing, capturing state, dirty tracking or resuming the machine.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Write-protecting or releasing guest memory.
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    /// Reading guest memory.
    #[error(transparent)]
    Memory(#[from] vmm::memory::MemoryError),
    /// The saver ended with pages of the epoch neither saved nor copied
    /// aside (an engine defect: the epoch is not committed).
    #[error("{pages} pages were neither saved nor copied aside")]
    Unsaved {
        /// How many.
        pages: usize,
    },
    /// Reading a region (a disk) as it was at the pause.
    #[error("{region}: {source}")]
    Region {
        /// Which region.
        region: String,
        /// Cause.
        source: std::io::Error,
    },
    /// An engine thread is gone.
    #[error("the {0} thread is gone")]
    ThreadGone(&'static str),
    /// An engine thread panicked.
    #[error("the {thread} thread panicked: {message}")]
    Panicked {
        /// Which thread.
        thread: &'static str,
        /// The panic message.
        message: String,
    },
    /// The test hook `CONSNAP_FAIL_EPOCHS` asked for this failure.
    #[cfg(feature = "testing")]
    #[error("injected failure (CONSNAP_FAIL_EPOCHS)")]
    Injected,
}

/// One epoch that was not committed, and why.
#[derive(Debug, Error)]
#[error("epoch {id}: {failure}")]
pub struct EpochError {
    /// The epoch's id.
    pub id: u64,
    /// The cause.
    pub failure: EpochFailure,
}

impl EpochError {
    /// Wrap `failure` for epoch `id`.
    pub fn new(id: u64, failure: impl Into<EpochFailure>) -> EpochError {
        EpochError {
            id,
            failure: failure.into(),
        }
    }
}

/// Errors setting the engine up before the VM runs.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Arming dirty tracking or registering memory failed.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// userfaultfd is unavailable or refused.
    #[error("--mode cow cannot run on this host: {0}; --mode stop-copy works without it")]
    Cow(#[source] uffd::UffdError),
    /// The snapshot directory cannot be used: not a directory, not a
    /// store, unreadable, or in use by another process.
    #[error("snapshot directory unusable: {source}")]
    Store {
        /// The directory.
        dir: std::path::PathBuf,
        /// Cause.
        source: store::StoreError,
    },
    /// An engine thread could not start.
    #[error("cannot start the snapshot {thread} thread: {source}")]
    Thread {
        /// Which thread.
        thread: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// An engine thread did not report ready.
    #[error("the snapshot {0} thread did not start")]
    NotReady(&'static str),
    /// A mode switch that cannot be made on a running VM.
    #[error(
        "cannot switch from {} to {} while the VM runs: cow registers guest memory with userfaultfd before the vCPUs start; only stop-copy and stop-copy-full switch at run time (restart with --mode {})",
        from.name(), to.name(), to.name()
    )]
    ModeSwitch {
        /// The current mode.
        from: store::Mode,
        /// The mode asked for.
        to: store::Mode,
    },
}
