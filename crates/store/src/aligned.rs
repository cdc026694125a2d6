//! A page-aligned byte buffer, for O_DIRECT reads and writes.

use std::alloc::Layout;

/// Page-aligned, zero-initialised bytes.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads, like &[u8].
unsafe impl Sync for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

const ALIGN: usize = 4096;
/// Buffers this large or larger are mapped, not allocated.
const MAPPED: usize = 1 << 20;

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(ALIGN).next_multiple_of(ALIGN), ALIGN)
            .unwrap_or_else(|_| Layout::new::<[u8; ALIGN]>())
    }

    /// A buffer of at least `len` bytes (whole pages). From 1 MiB up it is
    /// an anonymous mapping, zero without being written: the allocator's
    /// zeroed alignment path writes every byte (a 256 MiB copy-aside slab
    /// took 180 ms before a cow guest could start).
    pub fn new(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        if layout.size() >= MAPPED {
            // SAFETY: a fresh private anonymous mapping; nothing else refers
            // to it, and `Drop` unmaps exactly this range.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    layout.size(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw != libc::MAP_FAILED
                && let Some(ptr) = std::ptr::NonNull::new(raw.cast::<u8>())
            {
                return AlignedBuf {
                    ptr,
                    len: layout.size(),
                };
            }
            std::alloc::handle_alloc_error(layout)
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len: layout.size(),
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len >= MAPPED {
            // SAFETY: mapped in `new` with exactly this length.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            return;
        }
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}
