//! consnap's snapshot engine, in two halves:
//! - [`capture`]: takes epochs of a running machine into a
//!   [`store::Store`] with one of three strategies (`stop-copy-full`,
//!   `stop-copy`, `cow`);
//! - [`restore`]: brings a machine back from an epoch, eagerly or lazily
//!   (pages on demand).
//!
//! [`pages`] holds what both halves use to handle guest pages.

pub mod capture;
pub mod pages;
pub mod restore;

pub use capture::{
    AdaptPolicy, Captured, CowOptions, EpochChoice, EpochError, EpochFailure, EpochRecord, EpochStats, HotPolicy,
    SnapshotConfig, SnapshotEngine, SnapshotError, Target, TargetError, Tracker,
};
#[cfg(feature = "testing")]
pub use capture::{CowTestHooks, Inject};
pub use restore::{
    LazyLink, LazyPager, LazyStats, RestoreError, Restored, RestoredRam, restore, restore_lazy, restore_lazy_from,
    restore_ram,
};
pub use store::Mode;

/// Text of a panic payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
