//! The disk a workload may use: a block device of 512-byte sectors.
//!
//! In the guest it is the virtio-blk driver; on the host, for reference
//! runs, an in-memory image ([`MemDisk`], feature `std`). Buffers are
//! slices of 64-bit words (little-endian on the disk, as in x86 memory)
//! whose length is a multiple of [`SECTOR_WORDS`]; in the guest they are
//! guest memory the device reads or writes directly.

use core::fmt;

use crate::Share;
use crate::hash::Hasher;

/// Bytes per sector.
pub const SECTOR: u64 = 512;

/// 64-bit words per sector.
pub const SECTOR_WORDS: usize = 64;

/// Why a disk request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskError {
    /// The request reaches beyond the disk.
    OutOfRange {
        /// First sector of the request.
        sector: u64,
        /// Sectors requested.
        count: u64,
        /// Sectors the disk has.
        capacity: u64,
    },
    /// The buffer is not a whole number of sectors.
    Misaligned,
    /// The device answered with this virtio-blk status (1 IOERR, 2 UNSUPP)
    /// or another value it should not write.
    Device(u8),
    /// The disk is read-only.
    ReadOnly,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::OutOfRange {
                sector,
                count,
                capacity,
            } => {
                write!(f, "sectors {sector}+{count} are beyond the disk's {capacity}")
            }
            DiskError::Misaligned => write!(f, "buffer is not a whole number of 512-byte sectors"),
            DiskError::Device(s) => write!(f, "device status {s}"),
            DiskError::ReadOnly => write!(f, "the disk is read-only"),
        }
    }
}

/// A block device.
pub trait Disk {
    /// Capacity in sectors.
    fn sectors(&self) -> u64;
    /// Read `buf.len() / SECTOR_WORDS` sectors from `sector` into `buf`.
    fn read(&mut self, sector: u64, buf: &mut [u64]) -> Result<(), DiskError>;
    /// Write `buf` to the disk from `sector`.
    fn write(&mut self, sector: u64, buf: &[u64]) -> Result<(), DiskError>;
    /// Make every completed write durable.
    fn flush(&mut self) -> Result<(), DiskError>;
}

/// Check a request against a disk of `capacity` sectors; returns its
/// sector count.
pub fn check_request(capacity: u64, sector: u64, words: usize) -> Result<u64, DiskError> {
    if !words.is_multiple_of(SECTOR_WORDS) {
        return Err(DiskError::Misaligned);
    }
    let count = (words / SECTOR_WORDS) as u64;
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(count),
        _ => Err(DiskError::OutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}

/// Words read at a time by [`readback`]: 64 KiB.
const READBACK_WORDS: usize = 8192;

/// Read the share's whole disk area back through `disk` and checksum it;
/// returns the checksum and the number of failed reads. This is how a disk
/// workload's final checksum covers what it wrote.
pub(crate) fn readback(share: &Share, disk: &mut dyn Disk) -> (u64, u64) {
    let mut buf = [0u64; READBACK_WORDS];
    let mut h = Hasher::new(share.seed ^ 0x6469_736b);
    let mut errors = 0;
    let mut at = share.disk_off / SECTOR;
    let end = (share.disk_off + share.disk_bytes) / SECTOR;
    while at < end {
        let n = (end - at).min((READBACK_WORDS / SECTOR_WORDS) as u64);
        let part = &mut buf[..n as usize * SECTOR_WORDS];
        if disk.read(at, part).is_err() {
            errors += 1;
            part.fill(0);
        }
        h.words(part);
        at += n;
    }
    (h.finish(), errors)
}

/// A disk image in host memory, initially zero (feature `std`).
#[cfg(feature = "std")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemDisk {
    words: std::vec::Vec<u64>,
}

#[cfg(feature = "std")]
impl MemDisk {
    /// A zeroed disk of `bytes` (rounded down to whole sectors).
    pub fn new(bytes: u64) -> MemDisk {
        MemDisk {
            words: std::vec![0; (bytes / SECTOR) as usize * SECTOR_WORDS],
        }
    }

    /// The image as bytes, as a disk file holds it.
    pub fn to_bytes(&self) -> std::vec::Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

#[cfg(feature = "std")]
impl Disk for MemDisk {
    fn sectors(&self) -> u64 {
        (self.words.len() / SECTOR_WORDS) as u64
    }

    fn read(&mut self, sector: u64, buf: &mut [u64]) -> Result<(), DiskError> {
        check_request(self.sectors(), sector, buf.len())?;
        let at = sector as usize * SECTOR_WORDS;
        buf.copy_from_slice(&self.words[at..at + buf.len()]);
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u64]) -> Result<(), DiskError> {
        check_request(self.sectors(), sector, buf.len())?;
        let at = sector as usize * SECTOR_WORDS;
        self.words[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn mem_disk_reads_what_was_written_and_checks_bounds() {
        let mut d = MemDisk::new(4096);
        assert_eq!(d.sectors(), 8);
        let data: std::vec::Vec<u64> = (0..128).collect();
        d.write(6, &data).unwrap();
        let mut back = [0u64; 128];
        d.read(6, &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
        assert_eq!(&d.to_bytes()[3072..3080], &0u64.to_le_bytes());
        assert_eq!(&d.to_bytes()[3080..3088], &1u64.to_le_bytes());
        assert_eq!(
            d.write(7, &data),
            Err(DiskError::OutOfRange {
                sector: 7,
                count: 2,
                capacity: 8
            })
        );
        assert_eq!(d.read(0, &mut back[..10]), Err(DiskError::Misaligned));
        assert!(d.read(u64::MAX, &mut back).is_err());
    }
}
