//! Captured state besides guest RAM: a region of 4 KiB units that a
//! device owns (a disk's blocks), which every epoch holds beside RAM.
//!
//! Guest RAM is captured by the snapshot engine's trackers (KVM's dirty
//! log, userfaultfd write protection). A region is captured by its device,
//! through this interface: the device knows which units the guest wrote
//! (it wrote them itself), and copies a unit aside before it overwrites it
//! while an epoch holding that unit is being saved. The rule is the one
//! guest RAM follows under `cow`: at the pause the epoch's units are
//! *frozen*; after the VM resumes the saver reads each frozen unit as it
//! was at the pause, from the backing file if the guest has not written it
//! since, from the copy aside if it has.

use std::io;

use crate::dirty::PageBits;

/// Bytes in one unit of a region (a disk block, a guest page).
pub const UNIT: u64 = 4096;

/// What kind of state a region holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// A virtio-blk disk's image.
    Disk,
}

/// A region as a snapshot describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Its kind.
    pub kind: RegionKind,
    /// Its size in bytes (the last unit may be partly beyond it: those
    /// bytes read as zeros).
    pub bytes: u64,
    /// The guest cannot write it.
    pub readonly: bool,
    /// For messages: the device and its backing file.
    pub name: String,
}

impl RegionInfo {
    /// Units of [`UNIT`] bytes that hold its bytes.
    pub fn units(&self) -> u64 {
        self.bytes.div_ceil(UNIT)
    }
}

/// A region the snapshot engine captures (see the module documentation).
pub trait Region: Send + Sync {
    /// What it is.
    fn info(&self) -> RegionInfo;
    /// The units written since the last call (called with the device
    /// quiesced, at a pause).
    fn take_dirty(&self) -> PageBits;
    /// Hand units back to dirty tracking (an epoch that failed to save them).
    fn mark_dirty(&self, units: &PageBits);
    /// The units that may hold data (the others are known to be zero, such
    /// as holes of a sparse file): what a full epoch reads.
    fn populated(&self) -> io::Result<PageBits>;
    /// At a pause, with the device quiesced: from now until [`Region::thaw`]
    /// the device copies each unit of `units` aside before it overwrites it.
    fn freeze(&self, units: PageBits);
    /// Read units `[first, first + buf.len() / UNIT)` as they were at
    /// [`Region::freeze`] (each must be frozen); after this the device no
    /// longer needs to copy them aside.
    fn read_frozen(&self, first: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The epoch is saved or abandoned: drop what is frozen and copied aside.
    fn thaw(&self);
}
