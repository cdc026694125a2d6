//! An epoch's background job (what the writer thread runs after the VM
//! resumed) and what it yields once the epoch is committed.

use std::time::Duration;

use store::EpochInfo;

use crate::capture::error::EpochFailure;

/// What a committed epoch cost, for the report.
#[derive(Debug, Clone, Default)]
pub struct EpochStats {
    /// Write-protect faults the guest took on this epoch's pages (cow).
    pub faults: u64,
    /// Pages copied aside by the fault handler before the guest wrote them (cow).
    pub pages_copied_aside: u64,
    /// Pages copied aside in all, on faults or ahead of the saver (cow).
    pub pages_captured: u64,
    /// Times the fault handler waited for copy-aside memory (cow overload).
    pub aside_waits: u64,
    /// write-protect calls made to arm this epoch (cow).
    pub protect_calls: u64,
    /// Pages whose hash was compared with the last epoch's (cow, `uffd` tracker).
    pub pages_examined: u64,
    /// Pages of hot blocks copied during the pause and left writable (cow, `uffd`).
    pub pages_in_pause: u64,
    /// Faults on blocks with nothing left to save: the guest's first write
    /// to a block since it was saved (how the `uffd` tracker learns of it).
    pub tracking_faults: u64,
    /// Time the fault handler spent serving this epoch's faults: what the
    /// writers waited, beyond the fault's own round trip (cow).
    pub fault_time: Duration,
    /// The longest single fault service (cow).
    pub fault_max: Duration,
    /// Of the pause: taking (and re-arming) the dirty set.
    pub dirty_time: Duration,
    /// Of the pause: copying pages (stop-copy) or write-protecting them (cow).
    pub capture_time: Duration,
    /// Time the background part took (writer or saver), resume to commit.
    pub save_time: Duration,
    /// `--cow-tracker auto`: what the engine chose for this epoch.
    pub choice: Option<crate::capture::adapt::EpochChoice>,
}

/// A committed epoch.
#[derive(Debug)]
pub struct Committed {
    /// Its file and header.
    pub info: EpochInfo,
    /// Costs.
    pub stats: EpochStats,
}

/// The background part of an epoch: gets the pause length in ns (for the
/// header) and commits the epoch.
pub type JobFn = Box<dyn FnOnce(u64) -> Result<Committed, EpochFailure> + Send>;
