//! The copy-aside slab: pages copied out of guest RAM before a write lands,
//! held until the saver writes them.

use vmm::memory::PAGE_SIZE;

/// Copy-aside memory: pages in slots. A slot belongs to the thread that
/// took it from the free list (`Inner::free`, in `shared.rs`) under the
/// lock until it goes back there (or to the one that took its entry out of
/// `Inner::aside`), so it is read and written without the lock: the saver
/// copies its pages out of the slab with the lock free for faults and the
/// next pause.
pub(crate) struct Slab {
    /// Owns the memory; never dereferenced after [`Slab::new`] (a slice
    /// over it would cover slots other threads hold `&mut` to).
    _buf: crate::pages::PageBuf,
    base: *mut u8,
    slots: usize,
    /// Faults the slab's pages in ahead of use, after the guest started.
    populate: Option<std::thread::JoinHandle<()>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

// SAFETY: the slab owns its buffer and reaches it only through `base`, one
// slot at a time; each slot is accessed by one thread at a time (its
// owner, see above), so sharing the base pointer is sound.
unsafe impl Send for Slab {}
// SAFETY: as for Send.
unsafe impl Sync for Slab {}

impl Slab {
    /// `slots` pages, pre-faulted: a fresh host page costs a fault (about
    /// 5 µs here) on its first copy, which would land on a waiting writer.
    pub(crate) fn new(slots: usize) -> Slab {
        let len = slots * PAGE_SIZE as usize;
        let mut buf = crate::pages::PageBuf::unpopulated(len);
        let base = buf.as_mut_ptr();
        // Faulting 256 MiB in took about 180 ms before the guest could
        // start; a thread does it now, 2 MiB at a time from the first slot
        // (the free list hands slots out from 0), and a slot used before
        // it got there costs its first touch (about 5 µs) once.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let at = base as usize;
        let populate = std::thread::Builder::new()
            .name("consnap-slab".into())
            .spawn(move || {
                const MADV_POPULATE_WRITE: libc::c_int = 23;
                const STEP: usize = 2 << 20;
                let mut off = 0;
                while off < len && !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = STEP.min(len - off);
                    // SAFETY: [at + off, at + off + n) lies in the slab's
                    // buffer, which outlives this thread (`Drop` joins it
                    // first); populating writable anonymous pages changes no
                    // contents, so slots in use meanwhile are unaffected.
                    unsafe { libc::madvise((at + off) as *mut libc::c_void, n, MADV_POPULATE_WRITE) };
                    off += n;
                }
            })
            .ok();
        Slab {
            _buf: buf,
            base,
            slots,
            populate,
            stop,
        }
    }

    pub(crate) unsafe fn with_slot<R>(&self, slot: u32, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let slot = slot as usize;
        assert!(slot < self.slots, "copy-aside slot {slot} out of {}", self.slots);
        // SAFETY: the slot's page lies inside the buffer (checked above;
        // `PageBuf::new` gave at least `slots` pages), which lives as long
        // as `self`. The slice covers this slot only, and no reference to
        // the rest of the buffer is formed: other threads' `&mut` to their
        // own slots stay unaliased. The caller guarantees that nobody else
        // touches this slot meanwhile.
        let page =
            unsafe { std::slice::from_raw_parts_mut(self.base.add(slot * PAGE_SIZE as usize), PAGE_SIZE as usize) };
        f(page)
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.populate.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod slab_tests {
    use super::{PAGE_SIZE, Slab};

    /// Threads write and read their own slots at once, each holding its
    /// slot's `&mut` throughout; every slot keeps what its owner wrote.
    /// (Meant for Miri too, where a slice over the whole slab formed while
    /// others hold their slots is an aliasing error.)
    #[test]
    fn owners_use_their_slots_at_once() {
        let slab = Slab::new(4);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let slab = &slab;
                // SAFETY: thread `t` is the only one to use slot `t`.
                s.spawn(move || unsafe {
                    slab.with_slot(t, |page| {
                        for round in 0..200u8 {
                            page.fill(round ^ t as u8);
                            std::thread::yield_now();
                            assert!(page.iter().all(|b| *b == round ^ t as u8));
                        }
                    })
                });
            }
        });
        for t in 0..4u32 {
            // SAFETY: the threads are done; this one owns every slot.
            let first = unsafe { slab.with_slot(t, |page| (page.len(), page[0], page[PAGE_SIZE as usize - 1])) };
            assert_eq!(first, (PAGE_SIZE as usize, 199 ^ t as u8, 199 ^ t as u8));
        }
    }

    #[test]
    #[should_panic(expected = "copy-aside slot 4 out of 4")]
    fn a_slot_past_the_end_is_refused() {
        let slab = Slab::new(4);
        // SAFETY: nobody else uses the slab (and the call panics first).
        unsafe { slab.with_slot(4, |_| ()) };
    }
}
