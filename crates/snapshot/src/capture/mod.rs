//! Taking epochs of a running machine: the engine, a controller task
//! ([`SnapshotEngine`]), pauses the machine every interval and hands the
//! epoch to a capture strategy (`stop-copy-full`, `stop-copy`, `cow`),
//! whose job then finishes and commits it on the writer thread. The
//! engine sees the machine through [`Target`] (a fake machine in the
//! tests).

pub mod adapt;
pub(crate) mod cow;
mod engine;
mod errlog;
pub(crate) mod error;
mod hot;
pub(crate) mod job;
pub(crate) mod regions;
mod stop_copy;
pub(crate) mod strategy;
pub(crate) mod target;
pub(crate) mod worker;

pub use adapt::{AdaptPolicy, EpochChoice, Prediction};
#[cfg(feature = "testing")]
pub use cow::CowTestHooks;
pub use cow::{CowOptions, Tracker};
#[cfg(feature = "testing")]
pub use engine::Inject;
pub use engine::{EpochRecord, SnapshotConfig, SnapshotEngine};
pub use error::{EpochError, EpochFailure, SnapshotError};
pub use hot::HotPolicy;
pub use job::EpochStats;
pub use target::{Captured, Target, TargetError};
