//! Guest RAM: private anonymous memory, laid out around the x86 MMIO hole.
//!
//! RAM is `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`, 2 MiB aligned and
//! advised `MADV_HUGEPAGE`: the copy-on-write snapshot engine
//! write-protects it with userfaultfd, which needs private anonymous
//! memory, and transparent huge pages roughly double the guest's speed. Writes the VMM itself makes through vm-memory (loaders,
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
        source: std::io::Error,
    },
    /// An access outside guest RAM.
    #[error("guest memory access outside RAM: {0}")]
    Access(String),
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
///
/// Each range is its own private anonymous mapping, aligned to 2 MiB so
/// that transparent huge pages can back it, and advised `MADV_HUGEPAGE`
/// unless huge pages are turned off. Guest memory is only ever read or
/// written through volatile accesses (vm-memory's `VolatileSlice`) or by
/// the kernel (file I/O, userfaultfd): vCPUs may write it at any time, so
/// no Rust reference to its bytes is ever formed.
#[derive(Debug)]
pub struct GuestRam {
    /// Regions over `maps`, which they do not own. Declared before `maps`:
    /// fields drop in declaration order, so the regions are gone before
    /// the mappings are unmapped.
    mem: GuestMemory,
    ranges: Vec<RamRange>,
    maps: Mappings,
    size: u64,
    huge_pages: bool,
    /// Pages arrive on demand (a lazy restore): a page not mapped yet is
    /// not known to be zero.
    on_demand: std::sync::atomic::AtomicBool,
}

/// The mappings `map_aligned` made for one GuestRam, (start, length) each;
/// unmapped when dropped.
#[derive(Debug, Default)]
struct Mappings(Vec<(usize, usize)>);

impl Drop for Mappings {
    fn drop(&mut self) {
        for &(start, len) in &self.0 {
            // SAFETY: unmapping a mapping `map_aligned` made, which only
            // this value owns. Whatever refers into it is gone: the
            // GuestRam's regions drop before its `maps` (field order), or
            // before this local (declared first) when building fails; KVM
            // reaches guest RAM only from vCPU threads, each of which holds
            // an `Arc<GuestRam>` until it ends.
            unsafe { libc::munmap(start as *mut libc::c_void, len) };
        }
    }
}

/// Alignment of each RAM mapping (one huge page).
pub const HUGE_PAGE: u64 = 2 << 20;

/// Map `len` bytes of private anonymous memory aligned to [`HUGE_PAGE`];
/// returns (aligned start, mapping start, mapping length).
fn map_aligned(len: u64, huge: bool) -> Result<(*mut u8, usize, usize), MemoryError> {
    let total = len as usize + HUGE_PAGE as usize;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choice.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MemoryError::Mmap {
            size: len,
            source: std::io::Error::last_os_error(),
        });
    }
    let base = p as usize;
    let start = base.next_multiple_of(HUGE_PAGE as usize);
    let head = start - base;
    let tail = total - head - len as usize;
    // SAFETY: both trimmed pieces lie inside the mapping just made and are
    // not used; trimming them leaves [start, start + len) mapped.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((start + len as usize) as *mut libc::c_void, tail);
        }
    }
    if huge {
        // SAFETY: advice on our own mapping; failure (THP disabled) is harmless.
        unsafe { libc::madvise(start as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
    }
    Ok((start as *mut u8, start, len as usize))
}

impl GuestRam {
    /// Map `size` bytes of guest RAM backed by transparent huge pages where the host allows.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_huge_pages(size, true)
    }

    /// Map `size` bytes of guest RAM; `huge` asks for transparent huge pages.
    pub fn with_huge_pages(size: u64, huge: bool) -> Result<Self, MemoryError> {
        let ranges = layout(size)?;
        if let Some(avail) = host_available_memory()
            && size > avail
        {
            return Err(MemoryError::TooLarge {
                requested: size >> 20,
                available: avail >> 20,
            });
        }
        // Before `regions`, so that on an early return the regions drop first.
        let mut maps = Mappings(Vec::with_capacity(ranges.len()));
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let len = r.len as usize;
            let (ptr, start, mlen) = map_aligned(r.len, huge)?;
            maps.0.push((start, mlen));
            let bitmap = AtomicBitmap::new(len, NonZeroUsize::new(PAGE_SIZE as usize).unwrap_or(NonZeroUsize::MIN));
            // SAFETY: `ptr` is a live private anonymous mapping of `len` bytes,
            // readable and writable, that outlives the region: `maps` owns it
            // and drops after the regions (see `Mappings`). The GuestMemory
            // holding the regions is lent out by reference only.
            let map = unsafe {
                vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(len, bitmap)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .with_raw_mmap_pointer(ptr)
            }
            .build()
            .map_err(|e| MemoryError::Layout(format!("region at {:#x}: {e}", r.gpa)))?;
            let region = GuestRegionMmap::new(map, GuestAddress(r.gpa))
                .ok_or_else(|| MemoryError::Layout(format!("region at {:#x} overflows", r.gpa)))?;
            regions.push(region);
        }
        let mem = GuestMemory::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(Self {
            mem,
            ranges,
            maps,
            size,
            huge_pages: huge,
            on_demand: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Mark RAM as filled on demand (by a lazy restore's pager): from now
    /// on a page that is not mapped yet may still hold data, so whoever
    /// reads all of RAM must read it (the read waits for the pager).
    pub fn mark_on_demand(&self) {
        self.on_demand.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether pages may still arrive on demand: see [`GuestRam::mark_on_demand`].
    pub fn on_demand(&self) -> bool {
        self.on_demand.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The vm-memory view (loaders and devices write through this, which marks pages dirty).
    /// Its regions do not own their mappings, which go with this GuestRam:
    /// use it through the reference, never keep a clone of it.
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

    /// True when transparent huge pages were asked for.
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    fn region(&self, range: &RamRange) -> &GuestRegionMmap<AtomicBitmap> {
        // Ranges and regions are created together, in the same order.
        self.mem
            .iter()
            .find(|r| r.start_addr().0 == range.gpa)
            .unwrap_or_else(|| unreachable!("range {range:?} has no region"))
    }

    /// Host address of the start of `range` (for KVM slots, userfaultfd and file I/O).
    pub fn host_ptr(&self, range: &RamRange) -> *mut u8 {
        self.region(range).get_mmap().as_ptr()
    }

    /// The range holding `[gpa, gpa + len)` and the host address of `gpa`.
    pub fn host_addr(&self, gpa: u64, len: u64) -> Option<(RamRange, u64)> {
        let r = *self
            .ranges
            .iter()
            .find(|r| r.gpa <= gpa && gpa.checked_add(len).is_some_and(|e| e <= r.end()))?;
        Some((r, self.host_ptr(&r) as u64 + (gpa - r.gpa)))
    }

    /// The guest-physical address of host address `addr`, if it is guest RAM.
    pub fn gpa_of(&self, addr: u64) -> Option<u64> {
        self.ranges.iter().find_map(|r| {
            let base = self.host_ptr(r) as u64;
            (base <= addr && addr < base + r.len).then(|| r.gpa + (addr - base))
        })
    }

    /// Copy `dst.len()` bytes of guest memory at `gpa` into `dst`, with volatile reads.
    pub fn read_to(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), dst.len())
            .map_err(|e| MemoryError::Access(format!("{:#x}+{:#x}: {e}", gpa, dst.len())))?;
        slice.copy_to(dst);
        Ok(())
    }

    /// Copy `src` into guest memory at `gpa`, with volatile writes. Recorded
    /// as VMM writes like any write through [`GuestRam::memory`].
    pub fn write_from(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), src.len())
            .map_err(|e| MemoryError::Access(format!("{:#x}+{:#x}: {e}", gpa, src.len())))?;
        slice.copy_from(src);
        Ok(())
    }

    /// Read `len` bytes from `file` at `offset` straight into guest memory at
    /// `gpa` (restore fills RAM this way before any vCPU exists). Not
    /// recorded as VMM writes.
    pub fn fill_from_file(&self, gpa: u64, len: u64, file: &std::fs::File, offset: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let (_, addr) = self.host_addr(gpa, len).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{gpa:#x}+{len:#x} is not guest RAM"),
            )
        })?;
        let mut done = 0u64;
        while done < len {
            // SAFETY: [addr, addr + len) is inside a live guest RAM mapping
            // (checked above); the kernel writes into it like a DMA engine,
            // and no Rust reference to those bytes exists.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    (addr + done) as *mut libc::c_void,
                    (len - done) as usize,
                    (offset + done) as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n as u64;
        }
        Ok(())
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

    /// Bytes of this RAM backed by transparent huge pages (from
    /// /proc/self/smaps), for reports; `None` if unreadable.
    pub fn anon_huge_bytes(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut total = 0;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((span, _)) = line.split_once(' ')
                && let Some((a, b)) = span.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = self.maps.0.iter().any(|&(s, l)| a < s + l && s < b);
                continue;
            }
            if inside && let Some(v) = line.strip_prefix("AnonHugePages:") {
                total += v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024;
            }
        }
        Some(total)
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

    #[test]
    fn mappings_are_huge_page_aligned_and_addressable() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(MMIO_HOLE_START + (64 << 20)).unwrap();
        assert_eq!(ram.ranges().len(), 2);
        for r in ram.ranges() {
            assert_eq!(ram.host_ptr(r) as u64 % HUGE_PAGE, 0);
        }
        let high = MMIO_HOLE_END + 5 * PAGE_SIZE + 7;
        ram.memory().write_slice(b"abc", GuestAddress(high)).unwrap();
        let (r, addr) = ram.host_addr(high, 3).unwrap();
        assert_eq!(r.slot, 1);
        assert_eq!(ram.gpa_of(addr), Some(high));
        assert!(
            ram.host_addr(MMIO_HOLE_START - 1, 2).is_none(),
            "crosses the end of RAM"
        );
        let mut b = [0u8; 3];
        ram.read_to(high, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(ram.read_to(MMIO_HOLE_START, &mut b).is_err());

        // Restore fills guest memory from a file.
        let path = std::env::temp_dir().join(format!("consnap-fill-{}", std::process::id()));
        std::fs::write(&path, vec![0x42u8; 3 * PAGE_SIZE as usize]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        ram.fill_from_file(PAGE_SIZE, 2 * PAGE_SIZE, &f, PAGE_SIZE).unwrap();
        let short = ram.fill_from_file(0, 4 * PAGE_SIZE, &f, 0);
        std::fs::remove_file(&path).unwrap();
        assert!(short.is_err(), "reading past the end of the file is an error");
        assert_eq!(ram.read_u64(PAGE_SIZE), Some(0x4242_4242_4242_4242));
        assert_eq!(ram.read_u8(3 * PAGE_SIZE - 1), Some(0x42));
        assert_eq!(ram.read_u8(3 * PAGE_SIZE + 5000), Some(0));
    }
}
