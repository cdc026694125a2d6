//! Page-level helpers: host residency, zero pages, pre-faulted buffers.

use std::fs::File;
use std::os::unix::fs::FileExt;

use store::AlignedBuf;
use vmm::dirty::PageBits;

/// Guest page size.
pub const PAGE: usize = 4096;

/// A zeroed, page-aligned buffer whose pages are already faulted in, so
/// that it can be written with O_DIRECT and copied into without a host
/// page fault per page: the store's [`AlignedBuf`], pre-faulted.
pub struct PageBuf(AlignedBuf);

impl PageBuf {
    /// A buffer of `len` bytes (rounded up to whole pages).
    pub fn new(len: usize) -> PageBuf {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let mut buf = AlignedBuf::new(len);
        if buf.len() >= 1 << 20 {
            // SAFETY: the range is exactly the buffer's allocation;
            // populating writable anonymous pages changes no contents (they
            // stay zero). Older kernels return EINVAL and the pages fault on use.
            unsafe { libc::madvise(buf.as_mut_ptr().cast(), buf.len(), MADV_POPULATE_WRITE) };
        }
        PageBuf(buf)
    }

    /// A buffer of `len` bytes whose pages fault in on first use (or
    /// when the caller populates them).
    pub fn unpopulated(len: usize) -> PageBuf {
        PageBuf(AlignedBuf::new(len))
    }

    /// An empty buffer (one page).
    pub fn empty() -> PageBuf {
        PageBuf::new(PAGE)
    }

    /// The store's buffer, to hand to a writer.
    pub fn into_aligned(self) -> AlignedBuf {
        self.0
    }

    /// A buffer back from a writer (it was pre-faulted when first made).
    pub fn from_aligned(buf: AlignedBuf) -> PageBuf {
        PageBuf(buf)
    }
}

impl Default for PageBuf {
    fn default() -> Self {
        PageBuf::empty()
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBuf({} bytes)", self.0.len())
    }
}

/// A zeroed, page-aligned, pre-faulted buffer of at least `len` bytes.
pub fn prefaulted(len: usize) -> PageBuf {
    PageBuf::new(len)
}

/// True when the page holds only zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    let all = chunks.by_ref().all(|c| {
        c.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
        }) == 0
    });
    all && chunks.remainder().iter().all(|b| *b == 0)
}

/// Which pages of a host mapping may hold data: present in RAM or swapped
/// out, per /proc/self/pagemap. A page never touched reads as zero and
/// needs no scanning. Falls back to "every page" if pagemap is unreadable.
pub fn populated(host: *const u8, pages: u64) -> PageBits {
    let all = || PageBits::full(pages);
    let Ok(f) = File::open("/proc/self/pagemap") else {
        return all();
    };
    let mut bits = PageBits::new(pages);
    let first = host as u64 / PAGE as u64;
    let mut buf = vec![0u8; 8 * 8192];
    let mut done = 0u64;
    while done < pages {
        let n = (pages - done).min(8192);
        let bytes = &mut buf[..(n * 8) as usize];
        if f.read_exact_at(bytes, (first + done) * 8).is_err() {
            return all();
        }
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if entry & (3 << 62) != 0 {
                bits.set(done + i as u64);
            }
        }
        done += n;
    }
    bits
}

/// Which pages of `range` may hold data: [`populated`], unless pages of
/// `ram` arrive on demand (a lazy restore), where a page not mapped yet
/// is not known to be zero and every page must be read.
pub fn may_hold_data(ram: &vmm::memory::GuestRam, range: &vmm::memory::RamRange) -> PageBits {
    if ram.on_demand() {
        PageBits::full(range.pages())
    } else {
        populated(ram.host_ptr(range), range.pages())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_buffers_are_aligned_and_zeroed() {
        let mut b = PageBuf::new(3 << 20);
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
        assert_eq!(b.len(), 3 << 20);
        assert!(b.iter().all(|x| *x == 0));
        b[5] = 1;
        assert_eq!(PageBuf::new(1).len(), PAGE);
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
    }

    #[test]
    fn pagemap_sees_touched_pages_only() {
        let len = 64 * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: offsets are inside the mapping.
        unsafe {
            p.cast::<u8>().add(3 * PAGE).write(1);
            p.cast::<u8>().add(40 * PAGE).write(1);
        }
        let bits = populated(p.cast(), 64);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, len) };
        assert_eq!(bits.iter().collect::<Vec<_>>(), vec![3, 40]);
    }
}
