//! An epoch's page checksums (PAGE_SUMS), read as they are needed.
//!
//! From format version 4 the checksums are verified a block at a time: the
//! section ends with a table holding the checksum of each block of
//! [`SUMS_PER_BLOCK`] page checksums, and only the table is read when the
//! epoch is opened. A block is read, checked against its table entry and
//! kept the first time a page it covers is verified, so opening an epoch
//! of 16 GiB of data reads 64 KiB of table instead of 32 MiB of
//! checksums. Older versions have no table: their checksums are read
//! whole at open, covered by the section checksum, as before.

use std::path::Path;
use std::sync::OnceLock;

use crate::error::{Result, StoreError};
use crate::format::{SUMS_PER_BLOCK, checksum, le64};

/// Reads a range of the epoch's bytes (the reader's file or object).
pub(crate) type ReadAt<'a> = &'a dyn Fn(&mut [u8], u64) -> std::io::Result<()>;

/// The page checksums of one epoch.
#[derive(Debug)]
pub(crate) enum PageSums {
    /// Version 1 to 3: the whole section, already verified.
    Whole(Vec<u8>),
    /// Version 4: the verified block table, blocks loaded on first use.
    Blocks {
        /// File offset of the first page checksum.
        at: u64,
        /// Data pages (checksums) in all.
        pages: u64,
        /// Checksum of each block's bytes.
        table: Vec<u64>,
        /// Each block once read and verified.
        loaded: Vec<OnceLock<Box<[u8]>>>,
    },
}

impl PageSums {
    /// Checksums of `pages` data pages from offset `at`, verified a block at
    /// a time against `table` (the decoded block table, itself verified).
    pub(crate) fn blocks(at: u64, pages: u64, table: &[u8]) -> PageSums {
        let table: Vec<u64> = table.chunks_exact(8).map(|b| le64(b, 0)).collect();
        let loaded = (0..table.len()).map(|_| OnceLock::new()).collect();
        PageSums::Blocks {
            at,
            pages,
            table,
            loaded,
        }
    }

    /// Data pages `[first, first + n)`'s checksums, in order, as
    /// little-endian bytes, handed to `each` a block's worth at a time
    /// (with the first page of the piece); a block not read yet is read
    /// through `read` and verified.
    pub(crate) fn for_range(
        &self,
        first: u64,
        n: u64,
        path: &Path,
        read: ReadAt<'_>,
        each: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let end = first
            .checked_add(n)
            .ok_or(StoreError::Usage("page checksum range overflows"))?;
        match self {
            PageSums::Whole(bytes) => {
                let byte = |p: u64| usize::try_from(p).ok().and_then(|p| p.checked_mul(8));
                let piece = byte(first)
                    .zip(byte(end))
                    .and_then(|(a, b)| bytes.get(a..b))
                    .ok_or(StoreError::Usage("page outside PAGE_SUMS"))?;
                each(first, piece)
            }
            PageSums::Blocks { pages, .. } if end > *pages => Err(StoreError::Usage("page outside PAGE_SUMS")),
            // No pages: no block to read (and `end - 1` below needs one).
            PageSums::Blocks { .. } if n == 0 => Ok(()),
            PageSums::Blocks { .. } => {
                self.load(first / SUMS_PER_BLOCK, (end - 1) / SUMS_PER_BLOCK, path, read)?;
                let mut p = first;
                while p < end {
                    let b = p / SUMS_PER_BLOCK;
                    let block = self.loaded_block(b)?;
                    let from = p - b * SUMS_PER_BLOCK;
                    let to = (end - b * SUMS_PER_BLOCK).min(SUMS_PER_BLOCK);
                    each(p, &block[from as usize * 8..to as usize * 8])?;
                    p = b * SUMS_PER_BLOCK + to;
                }
                Ok(())
            }
        }
    }

    /// Read and verify the blocks of `[b0, b1]` not loaded yet, each run
    /// of them in one read (a restore reading megabytes of pages at a time
    /// needs several blocks at once).
    fn load(&self, b0: u64, b1: u64, path: &Path, read: ReadAt<'_>) -> Result<()> {
        let PageSums::Blocks {
            at,
            pages,
            table,
            loaded,
        } = self
        else {
            return Ok(());
        };
        let missing = |b: u64| loaded.get(b as usize).is_some_and(|l| l.get().is_none());
        let mut b = b0;
        while b <= b1 {
            if !missing(b) {
                b += 1;
                continue;
            }
            let mut z = b;
            while z < b1 && missing(z + 1) {
                z += 1;
            }
            let first = b * SUMS_PER_BLOCK;
            let last = ((z + 1) * SUMS_PER_BLOCK).min(*pages);
            let offset = at + first * 8;
            let mut bytes = vec![0u8; (last - first) as usize * 8];
            read(&mut bytes, offset).map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                op: "read page checksums",
                source,
            })?;
            for (i, chunk) in bytes.chunks(SUMS_PER_BLOCK as usize * 8).enumerate() {
                let k = b + i as u64;
                if checksum(chunk) != table[k as usize] {
                    let (p0, o0) = (k * SUMS_PER_BLOCK, offset + i as u64 * SUMS_PER_BLOCK * 8);
                    let n = chunk.len() as u64 / 8;
                    return Err(StoreError::Corrupt {
                        path: path.to_path_buf(),
                        why: format!(
                            "page checksum block {k} (data pages {p0}..{}, bytes {o0}..{} of the file) fails its checksum in the PAGE_SUMS block table",
                            p0 + n,
                            o0 + n * 8
                        ),
                    });
                }
                // Another thread may have loaded it meanwhile: the same
                // verified bytes either way.
                let _ = loaded[k as usize].set(chunk.into());
            }
            b = z + 1;
        }
        Ok(())
    }

    /// Block `b`, loaded by [`PageSums::load`].
    fn loaded_block(&self, b: u64) -> Result<&[u8]> {
        match self {
            PageSums::Blocks { loaded, .. } => loaded
                .get(b as usize)
                .and_then(OnceLock::get)
                .map(|b| &b[..])
                .ok_or(StoreError::Usage("page checksum block not loaded")),
            PageSums::Whole(_) => Err(StoreError::Usage("no PAGE_SUMS blocks before version 4")),
        }
    }

    /// Bytes of checksums held in memory (the table and loaded blocks).
    #[cfg(test)]
    fn held(&self) -> usize {
        match self {
            PageSums::Whole(b) => b.len(),
            PageSums::Blocks { table, loaded, .. } => {
                table.len() * 8 + loaded.iter().filter_map(OnceLock::get).map(|b| b.len()).sum::<usize>()
            }
        }
    }
}

/// The block table for `sums` (page checksums as little-endian bytes): the
/// checksum of each block of [`SUMS_PER_BLOCK`] of them.
pub(crate) fn block_table(sums: &[u8]) -> Vec<u8> {
    sums.chunks(SUMS_PER_BLOCK as usize * 8)
        .flat_map(|b| checksum(b).to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::format::sum_table_len;
    use std::cell::Cell;

    /// A PAGE_SUMS section for `pages` pages at file offset 100 of a
    /// fake file, and a reader that counts its reads.
    fn file(pages: u64) -> (Vec<u8>, Vec<u8>) {
        let sums: Vec<u8> = (0..pages).flat_map(|p| (p * 7 + 1).to_le_bytes()).collect();
        let table = block_table(&sums);
        assert_eq!(table.len() as u64, sum_table_len(pages));
        let mut f = vec![0u8; 100];
        f.extend_from_slice(&sums);
        f.extend_from_slice(&table);
        (f, table)
    }

    fn collect(s: &PageSums, first: u64, n: u64, f: &[u8], reads: &Cell<usize>) -> Result<Vec<u64>> {
        let read = |buf: &mut [u8], at: u64| {
            reads.set(reads.get() + 1);
            buf.copy_from_slice(&f[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let mut out = Vec::new();
        s.for_range(first, n, Path::new("e"), &read, &mut |p, b| {
            assert_eq!(p, first + out.len() as u64);
            out.extend(b.chunks_exact(8).map(|c| le64(c, 0)));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn blocks_are_read_once_when_first_needed() {
        let pages = 3 * SUMS_PER_BLOCK + 5;
        let (f, table) = file(pages);
        let s = PageSums::blocks(100, pages, &table);
        let reads = Cell::new(0);
        assert_eq!(s.held(), 32, "only the table at open");
        // A range across blocks 0 and 1: one read for both.
        let got = collect(&s, 510, 4, &f, &reads).unwrap();
        assert_eq!(got, (510..514).map(|p| p * 7 + 1).collect::<Vec<_>>());
        assert_eq!(reads.get(), 1);
        collect(&s, 0, 512, &f, &reads).unwrap();
        assert_eq!(reads.get(), 1, "block 0 is kept");
        // The last, short block.
        let got = collect(&s, pages - 1, 1, &f, &reads).unwrap();
        assert_eq!(got, vec![(pages - 1) * 7 + 1]);
        assert_eq!(reads.get(), 2);
        // All of them: only block 2 is left to read.
        let got = collect(&s, 0, pages, &f, &reads).unwrap();
        assert_eq!(got, (0..pages).map(|p| p * 7 + 1).collect::<Vec<_>>());
        assert_eq!(reads.get(), 3);
        assert!(collect(&s, pages, 1, &f, &reads).is_err(), "past the last page");
        assert_eq!(collect(&s, 0, 0, &f, &reads).unwrap(), Vec::<u64>::new(), "no pages");
        assert_eq!(reads.get(), 3);
    }

    #[test]
    fn a_damaged_block_fails_only_the_pages_it_covers() {
        let pages = 2 * SUMS_PER_BLOCK;
        let (mut f, table) = file(pages);
        f[100 + 8 * 600] ^= 1;
        let s = PageSums::blocks(100, pages, &table);
        let reads = Cell::new(0);
        collect(&s, 0, 512, &f, &reads).unwrap();
        let e = collect(&s, 512, 1, &f, &reads).unwrap_err().to_string();
        assert!(e.contains("page checksum block 1 (data pages 512..1024"), "{e}");
        // Still refused the next time: a failed block is not kept.
        assert!(collect(&s, 1000, 2, &f, &reads).is_err());
    }

    #[test]
    fn whole_sections_serve_any_range() {
        let sums: Vec<u8> = (0..10u64).flat_map(|p| p.to_le_bytes()).collect();
        let s = PageSums::Whole(sums);
        let reads = Cell::new(0);
        assert_eq!(collect(&s, 3, 4, &[], &reads).unwrap(), vec![3, 4, 5, 6]);
        assert_eq!(reads.get(), 0);
        assert!(collect(&s, 8, 3, &[], &reads).is_err());
    }
}
