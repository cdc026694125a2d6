//! consnap's snapshot engine: captures epochs of a running machine into a
//! [`store::Store`] with one of three strategies (`stop-copy-full`,
//! `stop-copy`, `cow`), and brings a machine back from one.

mod cow;
mod engine;
mod errlog;
mod error;
mod fill;
mod hot;
mod lazy;
pub mod pages;
mod restore;
mod stop_copy;
mod strategy;
mod target;
mod worker;

#[cfg(feature = "testing")]
pub use cow::CowTestHooks;
pub use cow::{CowOptions, Tracker};
#[cfg(feature = "testing")]
pub use engine::Inject;
pub use engine::{EpochRecord, SnapshotConfig, SnapshotEngine};
pub use error::{EpochError, EpochFailure, SnapshotError};
pub use hot::HotPolicy;
pub use lazy::{LazyLink, LazyPager, LazyStats, restore_lazy, restore_lazy_from};
pub use restore::{RestoreError, Restored, RestoredRam, restore, restore_ram};
pub use store::Mode;
pub use strategy::EpochStats;
pub use target::{Captured, Target, TargetError};
