//! Page-level helpers: host residency, zero pages, pre-faulted buffers.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vmm::dirty::PageBits;

/// Guest page size.
pub const PAGE: usize = 4096;

/// A zeroed buffer of `len` bytes whose pages are already faulted in.
///
/// A large `vec![0; n]` is fresh anonymous memory that the kernel has not
/// populated yet; touching it page by page costs a fault each (about 2 µs
/// here). MADV_POPULATE_WRITE faults the whole range in one call, cheaper,
/// and ahead of the pause that will copy into it.
pub fn prefaulted(len: usize) -> Vec<u8> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let v = vec![0u8; len];
    if len >= 1 << 20 {
        let start = (v.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (v.as_ptr() as usize + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside `v`'s allocation; populating
            // writable anonymous pages changes no contents (they stay zero).
            // Older kernels return EINVAL, and the pages then fault on use.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE) };
        }
    }
    v
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

#[cfg(test)]
mod tests {
    use super::*;

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
