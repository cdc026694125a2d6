//! The buffers of a descriptor chain, and moving bytes between them and
//! guest memory (shared by the virtio devices).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg {
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

/// The guest memory of bytes `[skip, skip + len)` of the buffers `segs`,
/// as volatile slices; `None` if any part lies outside guest RAM.
pub(crate) fn guest_slices<'m>(
    mem: &'m GuestMemory,
    segs: &[Seg],
    mut skip: u64,
    len: u64,
) -> Option<Vec<vm_memory::VolatileSlice<'m, vm_memory::bitmap::BS<'m, vm_memory::bitmap::AtomicBitmap>>>> {
    let mut out = Vec::new();
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let mut addr = s.addr.checked_add(skip)?;
        let mut n = (s.len - skip).min(left);
        skip = 0;
        left -= n;
        // A buffer may span two regions of RAM only at their border.
        while n > 0 {
            let slice = mem.get_slice(GuestAddress(addr), n as usize).ok().or_else(|| {
                let r = mem.find_region(GuestAddress(addr))?;
                let fit = r.len() - (addr - r.start_addr().0);
                mem.get_slice(GuestAddress(addr), fit as usize).ok()
            })?;
            addr += slice.len() as u64;
            n -= slice.len() as u64;
            out.push(slice);
        }
    }
    (left == 0).then_some(out)
}

/// The guest address of byte `at` of the buffers `segs`.
/// The guest address of byte `at` of `segs`.
pub(crate) fn locate(segs: &[Seg], mut at: u64) -> Option<u64> {
    for s in segs {
        if at < s.len {
            return s.addr.checked_add(at);
        }
        at -= s.len;
    }
    None
}

/// Copy `dst.len()` bytes from byte `skip` of the buffers `segs`.
/// Read `dst.len()` bytes of `segs`, after the first `skip`.
pub(crate) fn gather(
    mem: &GuestMemory,
    segs: &[Seg],
    mut skip: u64,
    dst: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for s in segs {
        if done == dst.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = ((s.len - skip) as usize).min(dst.len() - done);
        mem.read_slice(&mut dst[done..done + n], GuestAddress(s.addr + skip))?;
        done += n;
        skip = 0;
    }
    Ok(())
}

/// Copy `src` into the buffers `segs` from their byte `skip`.
/// Write `src` into `segs`, after the first `skip` bytes.
pub(crate) fn scatter(
    mem: &GuestMemory,
    segs: &[Seg],
    mut skip: u64,
    src: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for s in segs {
        if done == src.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = ((s.len - skip) as usize).min(src.len() - done);
        mem.write_slice(&src[done..done + n], GuestAddress(s.addr + skip))?;
        done += n;
        skip = 0;
    }
    Ok(())
}
