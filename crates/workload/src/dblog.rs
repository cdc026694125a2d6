//! dblog: a database log. Every op writes one 4 KiB record to a random page
//! of the share's disk area and updates an in-memory index; after every
//! `flush` writes the log FLUSHes the disk and checks one random page
//! against the index by reading it back.
//!
//! Memory layout of a share: one 4 KiB record buffer (the I/O buffer), then
//! the index, two words per disk page: the checksum of the record last
//! written there and how many times the page was written. The share writes
//! over `pages` = min(its disk area / 4 KiB, index entries) pages.
//!
//! A record is `[op, page, version, seed-derived words...]`, so every write
//! differs from the one before it on the same page.

use crate::disk::{Disk, SECTOR};
use crate::hash::hash_words;
use crate::rng::{Rng, splitmix64};
use crate::spec::PAGE;
use crate::{Env, Share};

const RECORD_WORDS: usize = (PAGE / 8) as usize;

pub(crate) fn run(share: &Share, mem: &mut [u64], env: &mut dyn Env, disk: &mut dyn Disk) -> (u64, u64, u64) {
    if mem.len() < RECORD_WORDS {
        return (0, 0, 0);
    }
    let (rec, index) = mem.split_at_mut(RECORD_WORDS);
    let pages = (share.disk_bytes / PAGE).min(index.len() as u64 / 2);
    if pages == 0 {
        return (0, 0, 0);
    }
    let sector = |p: u64| (share.disk_off + p * PAGE) / SECTOR;
    let flush = share.spec.flush;
    let mut rng = Rng::new(share.seed);
    let mut acc = 0u64;
    let mut errors = 0u64;
    for op in 0..share.ops {
        let page = rng.below(pages);
        let e = page as usize * 2;
        let version = index[e + 1] + 1;
        let mut state = share.seed ^ op.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        rec[0] = op;
        rec[1] = page;
        rec[2] = version;
        for w in rec[3..].iter_mut() {
            *w = splitmix64(&mut state);
        }
        if disk.write(sector(page), rec).is_err() {
            errors += 1;
        }
        let sum = hash_words(page, rec);
        index[e] = sum;
        index[e + 1] = version;
        acc = acc.rotate_left(5) ^ sum;
        if flush != 0 && (op + 1) % flush == 0 {
            if disk.flush().is_err() {
                errors += 1;
            }
            // A reader: look a page up in the index and read its record.
            let q = rng.below(pages);
            let f = q as usize * 2;
            if index[f + 1] != 0 {
                let got = match disk.read(sector(q), rec) {
                    Ok(()) => hash_words(q, rec),
                    Err(_) => !index[f],
                };
                if got != index[f] || rec[1] != q || rec[2] != index[f + 1] {
                    errors += 1;
                }
                acc = acc.rotate_left(3) ^ got;
            }
        }
        env.step(op + 1, op + 1);
    }
    (share.ops, acc, errors)
}
