//! consnap's snapshot engine: captures epochs of a running [`vmm::Machine`]
//! into a [`store::Store`], and brings a machine back from one.

mod engine;
pub mod pages;
mod restore;
mod writer;

pub use engine::{EpochRecord, SnapshotConfig, SnapshotEngine, SnapshotError};
pub use restore::{RestoreError, Restored, restore};
pub use store::Mode;
