//! What every page held at the last committed epoch, as a keyed 64-bit
//! hash, so that the `uffd` tracker saves only the pages of a written block
//! that really changed.
//!
//! The hash is XXH3-64 with a random seed drawn at start, which the guest
//! cannot read: with the public seed 0 of the store's checksums a birthday
//! search would let a guest make its own snapshot wrong. The seed makes
//! chance collisions 2^-64 a page, but XXH3 is no pseudo-random function:
//! nothing proves a guest cannot craft a page that keeps its hash whatever
//! the seed. Such a page would be taken as unchanged and not saved, so the
//! guest's own snapshots would restore its older contents; nothing else is
//! affected (docs/COW.md, "Trackers", on why a keyed PRF is not used: 10-15
//! times the cost). Updates of an epoch are staged
//! and applied only once the epoch is committed; a failed epoch's updates
//! are discarded, so the table always describes the last committed epoch.

use vmm::memory::RamRange;

/// Per-page hashes of the last committed epoch.
#[derive(Debug)]
pub(crate) struct Hashes {
    seed: u64,
    table: Vec<Vec<u64>>,
    /// The table describes a committed epoch (false until the first one).
    known: bool,
    staged: Vec<(usize, u64, u64)>,
    staged_full: bool,
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Time and address bits: still unknown to the guest.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ (&b as *const _ as u64).rotate_left(32);
    }
    u64::from_le_bytes(b)
}

impl Hashes {
    pub(crate) fn new(ranges: &[RamRange]) -> Hashes {
        Hashes {
            seed: random_seed(),
            table: ranges.iter().map(|r| vec![0; r.pages() as usize]).collect(),
            known: false,
            staged: Vec::new(),
            staged_full: false,
        }
    }

    /// The key.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// The keyed hash of one page.
    pub(crate) fn hash(&self, page: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(page, self.seed)
    }

    /// Did page `p` of range `ri` change since the last committed epoch?
    pub(crate) fn changed(&self, ri: usize, p: u64, h: u64) -> bool {
        !self.known || self.table[ri].get(p as usize) != Some(&h)
    }

    /// Record page `p`'s new hash, to apply if this epoch commits.
    pub(crate) fn stage(&mut self, ri: usize, p: u64, h: u64) {
        self.staged.push((ri, p, h));
    }

    /// The epoch being saved is full: once committed, the table is complete.
    pub(crate) fn stage_full(&mut self) {
        self.staged_full = true;
    }

    /// The epoch was committed: apply its updates. A full epoch stages
    /// only the pages it read; the rest (never populated, written as zero
    /// runs) hold zeros.
    pub(crate) fn commit(&mut self) {
        if std::mem::take(&mut self.staged_full) {
            let zero = self.hash(&[0u8; vmm::memory::PAGE_SIZE as usize]);
            for t in &mut self.table {
                t.fill(zero);
            }
            self.known = true;
        }
        for (ri, p, h) in self.staged.drain(..) {
            if let Some(slot) = self.table.get_mut(ri).and_then(|t| t.get_mut(p as usize)) {
                *slot = h;
            }
        }
    }

    /// The epoch failed: forget its updates.
    pub(crate) fn discard(&mut self) {
        self.staged.clear();
        self.staged_full = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_apply_only_on_commit() {
        let ranges = vmm::memory::layout(16 << 20).unwrap_or_default();
        let mut h = Hashes::new(&ranges);
        let a = h.hash(&[1u8; 4096]);
        let b = h.hash(&[2u8; 4096]);
        assert_ne!(a, b);
        assert!(h.changed(0, 3, a), "nothing is known before a full epoch");
        h.stage(0, 3, a);
        h.stage_full();
        h.discard();
        assert!(h.changed(0, 3, a));
        h.stage(0, 3, a);
        h.stage_full();
        h.commit();
        assert!(!h.changed(0, 3, a));
        assert!(h.changed(0, 3, b));
        h.stage(0, 3, b);
        h.discard();
        assert!(!h.changed(0, 3, a), "a failed epoch leaves the table as it was");
        // A full epoch's pages that it did not stage were zero.
        let zero = h.hash(&[0u8; 4096]);
        assert!(!h.changed(0, 5, zero), "unstaged pages of a full epoch are zero");
        h.stage(0, 5, b);
        h.commit();
        assert!(h.changed(0, 5, zero));
        h.stage(0, 3, a);
        h.stage_full();
        h.commit();
        assert!(!h.changed(0, 5, zero), "unstaged pages of a full epoch are zero");
        assert!(!h.changed(0, 3, a));
        let other = Hashes::new(&ranges);
        assert_ne!(other.hash(&[1u8; 4096]), a, "each run draws its own key");
    }
}
