//! Guest RAM: private anonymous memory, laid out around the x86 MMIO hole.
//!
//! RAM is `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`: the copy-on-write
//! snapshot engine write-protects it with userfaultfd, which needs private
//! anonymous memory. Writes the VMM itself makes through vm-memory (loaders,
//! device emulation) are recorded in a per-page bitmap, which snapshotting
//! ORs with KVM's dirty log.

use std::num::NonZeroUsize;

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

/// Guest page size used for dirty tracking and snapshots.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC live inside).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the MMIO hole; RAM continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Smallest guest RAM consnap accepts.
pub const MIN_RAM: u64 = 16 << 20;
/// Largest guest RAM consnap accepts.
pub const MAX_RAM: u64 = 1 << 40;

/// The memory type consnap uses.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors building guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Size outside the supported range or not page aligned.
    #[error("--mem {size} bytes is not supported: it must be a multiple of 4 KiB between 16 MiB and 1 TiB")]
    BadSize {
        /// Requested size.
        size: u64,
    },
    /// More than the host has.
    #[error("--mem {requested} MiB is more than this host can give ({available} MiB of RAM available)")]
    TooLarge {
        /// Requested MiB.
        requested: u64,
        /// Available MiB.
        available: u64,
    },
    /// mmap failed.
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Mmap {
        /// Region size.
        size: u64,
        /// Cause.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory rejected the layout.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// KVM memory slot.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RamRange {
    /// Number of pages in the range.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

/// Split `size` bytes of RAM into ranges below and above the MMIO hole.
pub fn layout(size: u64) -> Result<Vec<RamRange>, MemoryError> {
    if !(MIN_RAM..=MAX_RAM).contains(&size) || !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::BadSize { size });
    }
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        slot: 0,
        gpa: 0,
        len: low,
    }];
    if size > low {
        ranges.push(RamRange {
            slot: 1,
            gpa: MMIO_HOLE_END,
            len: size - low,
        });
    }
    Ok(ranges)
}

/// MemAvailable from /proc/meminfo, in bytes, if readable.
pub fn host_available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Guest RAM with its layout.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemory,
    ranges: Vec<RamRange>,
    size: u64,
}

impl GuestRam {
    /// Map `size` bytes of private anonymous guest RAM.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let ranges = layout(size)?;
        if let Some(avail) = host_available_memory()
            && size > avail
        {
            return Err(MemoryError::TooLarge {
                requested: size >> 20,
                available: avail >> 20,
            });
        }
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let len = r.len as usize;
            let bitmap = AtomicBitmap::new(len, NonZeroUsize::new(PAGE_SIZE as usize).unwrap_or(NonZeroUsize::MIN));
            let map = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(len, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|source| MemoryError::Mmap { size: r.len, source })?;
            let region = GuestRegionMmap::new(map, GuestAddress(r.gpa))
                .ok_or_else(|| MemoryError::Layout(format!("region at {:#x} overflows", r.gpa)))?;
            regions.push(region);
        }
        let mem = GuestMemory::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(Self { mem, ranges, size })
    }

    /// The vm-memory view (loaders and devices write through this, which marks pages dirty).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// RAM ranges in guest-physical order.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn region(&self, range: &RamRange) -> &GuestRegionMmap<AtomicBitmap> {
        // Ranges and regions are created together, in the same order.
        self.mem
            .iter()
            .find(|r| r.start_addr().0 == range.gpa)
            .unwrap_or_else(|| unreachable!("range {range:?} has no region"))
    }

    /// Host address of the start of `range`.
    pub fn host_ptr(&self, range: &RamRange) -> *mut u8 {
        self.region(range).get_mmap().as_ptr()
    }

    /// The whole range as a byte slice for reading.
    ///
    /// # Safety
    /// vCPUs or other threads may write guest memory concurrently; callers
    /// must either have paused all writers or tolerate torn reads.
    pub unsafe fn range_bytes(&self, range: &RamRange) -> &[u8] {
        // SAFETY: the mapping is live for `self`'s lifetime and `len` bytes long;
        // the caller upholds the concurrency contract.
        unsafe { std::slice::from_raw_parts(self.host_ptr(range), range.len as usize) }
    }

    /// The whole range as a mutable byte slice.
    ///
    /// # Safety
    /// As [`GuestRam::range_bytes`], and no other reference to the range may
    /// be alive. Writes made through it are not recorded in the VMM bitmap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_bytes_mut(&self, range: &RamRange) -> &mut [u8] {
        // SAFETY: as above; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.host_ptr(range), range.len as usize) }
    }

    /// Pages of `range` the VMM wrote since the last call, as a bitmap of
    /// u64 words (bit i = page i of the range); clears the record.
    pub fn take_vmm_dirty(&self, range: &RamRange) -> Vec<u64> {
        self.region(range).get_mmap().bitmap().get_and_reset()
    }

    /// Forget every VMM write recorded so far (after restore or a full snapshot).
    pub fn clear_vmm_dirty(&self) {
        for r in &self.ranges {
            self.region(r).get_mmap().bitmap().reset();
        }
    }

    /// Read a little-endian u64 at `gpa` (used to sample the guest status page).
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.read_array(gpa).map(u64::from_le_bytes)
    }

    /// `N` bytes at `gpa`, or `None` outside RAM.
    fn read_array<const N: usize>(&self, gpa: u64) -> Option<[u8; N]> {
        use vm_memory::Bytes;
        let mut b = [0u8; N];
        self.mem.read_slice(&mut b, GuestAddress(gpa)).ok()?;
        Some(b)
    }

    /// Read one byte at `gpa`.
    pub fn read_u8(&self, gpa: u64) -> Option<u8> {
        self.read_array(gpa).map(u8::from_le_bytes)
    }

    /// Translate a guest linear address to guest-physical by walking the
    /// guest's page tables (no paging, 4-level long mode, or 32-bit PAE).
    pub fn translate(&self, sregs: &kvm_bindings::kvm_sregs, va: u64) -> Option<u64> {
        const PG: u64 = 1 << 31;
        const PAE: u64 = 1 << 5;
        const LMA: u64 = 1 << 10;
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        if sregs.cr0 & PG == 0 {
            return Some(va & 0xffff_ffff);
        }
        let (levels, mut table) = if sregs.efer & LMA != 0 {
            (4, sregs.cr3 & ADDR)
        } else if sregs.cr4 & PAE != 0 {
            let pdpte = self.read_u64((sregs.cr3 & 0xffff_ffe0) + ((va >> 30) & 3) * 8)?;
            if pdpte & 1 == 0 {
                return None;
            }
            (2, pdpte & ADDR)
        } else {
            return None;
        };
        for level in (0..levels).rev() {
            let shift = 12 + 9 * level;
            let entry = self.read_u64(table + ((va >> shift) & 0x1ff) * 8)?;
            if entry & 1 == 0 {
                return None;
            }
            if level == 0 || (level <= 2 && entry & 0x80 != 0) {
                let mask = (1u64 << shift) - 1;
                return Some((entry & ADDR & !mask) | (va & mask));
            }
            table = entry & ADDR;
        }
        None
    }

    /// Read a little-endian u32 at `gpa`.
    pub fn read_u32(&self, gpa: u64) -> Option<u32> {
        self.read_array(gpa).map(u32::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(layout(256 << 20).unwrap().len(), 1);
        let big = layout(4 << 30).unwrap();
        assert_eq!(big.len(), 2);
        assert_eq!(big[0].end(), MMIO_HOLE_START);
        assert_eq!(big[1].gpa, MMIO_HOLE_END);
        assert_eq!(big[0].len + big[1].len, 4 << 30);
        assert!(layout(1 << 20).is_err());
        assert!(layout((64 << 20) + 1).is_err());
    }

    #[test]
    fn vmm_writes_are_tracked_per_page() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.memory()
            .write_slice(&[1, 2, 3], GuestAddress(3 * PAGE_SIZE + 10))
            .unwrap();
        let bits = ram.take_vmm_dirty(&ram.ranges()[0]);
        assert_eq!(bits[0], 1 << 3);
        assert_eq!(ram.take_vmm_dirty(&ram.ranges()[0])[0], 0);
        assert_eq!(ram.read_u64(3 * PAGE_SIZE + 8), Some(0x0003_0201 << 16));
    }
}
