//! ftp: receive fixed-size chunks into a file cache, checksum them, and read
//! earlier chunks back to verify them.
//!
//! Memory layout of a share: a table with one checksum word per cache slot,
//! then the slots. Chunk `i` lands in slot `i % slots`, so the dirty stream is
//! sequential and, with a rate set, paced like a network link.
//!
//! With `disk=on` the server also stores every chunk on the disk, as an FTP
//! server stores an upload: chunk `i` at byte `(i % dslots) × chunk` of the
//! share's disk area (`dslots` chunks fit in it), and the read-back check
//! reads the earlier chunk from the disk into a scratch chunk placed after
//! the slots. Both checks look `lag` chunks back: half the slots, or half
//! the disk slots if fewer, so the chunk is still in its cache slot's table
//! entry and not yet overwritten on the disk.

use crate::disk::{Disk, SECTOR};
use crate::hash::hash_words;
use crate::rng::splitmix64;
use crate::{Env, Share};

/// "Receive" chunk `op`: the link delivers a deterministic byte stream.
/// Returns the value its table entry gets.
fn receive(share: &Share, op: u64, data: &mut [u64]) -> u64 {
    let mut state = share.seed ^ op.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for w in data.iter_mut() {
        *w = splitmix64(&mut state);
    }
    hash_words(op, data) ^ op
}

pub(crate) fn run(share: &Share, mem: &mut [u64], env: &mut dyn Env) -> (u64, u64, u64) {
    let chunk_words = (share.spec.chunk / 8) as usize;
    let slots = mem.len() / (chunk_words + 1);
    if slots < 2 {
        return (0, 0, 0);
    }
    let (table, cache) = mem.split_at_mut(slots);
    let mut acc = 0u64;
    let mut errors = 0u64;
    for op in 0..share.ops {
        let slot = (op % slots as u64) as usize;
        let data = &mut cache[slot * chunk_words..(slot + 1) * chunk_words];
        table[slot] = receive(share, op, data);
        // Read back a chunk received earlier and check it against its table entry.
        let back = op.wrapping_sub(slots as u64 / 2);
        if op >= slots as u64 / 2 {
            let bslot = (back % slots as u64) as usize;
            let bdata = &cache[bslot * chunk_words..(bslot + 1) * chunk_words];
            let got = hash_words(back, bdata);
            if got ^ back != table[bslot] {
                errors += 1;
            }
            acc = acc.rotate_left(7) ^ got;
        }
        env.step(op + 1, (op + 1) * share.spec.chunk);
    }
    (share.ops, acc, errors)
}

/// ftp with `disk=on` (see the module doc).
pub(crate) fn run_disk(share: &Share, mem: &mut [u64], env: &mut dyn Env, disk: &mut dyn Disk) -> (u64, u64, u64) {
    let chunk = share.spec.chunk;
    let chunk_words = (chunk / 8) as usize;
    let slots = mem.len().saturating_sub(chunk_words) / (chunk_words + 1);
    let dslots = share.disk_bytes / chunk;
    if slots < 2 || dslots < 2 {
        return (0, 0, 0);
    }
    let (table, rest) = mem.split_at_mut(slots);
    let (cache, rest) = rest.split_at_mut(slots * chunk_words);
    let scratch = &mut rest[..chunk_words];
    let lag = (slots as u64).min(dslots) / 2;
    let sector = |i: u64| (share.disk_off + (i % dslots) * chunk) / SECTOR;
    let mut acc = 0u64;
    let mut errors = 0u64;
    for op in 0..share.ops {
        let slot = (op % slots as u64) as usize;
        let data = &mut cache[slot * chunk_words..(slot + 1) * chunk_words];
        table[slot] = receive(share, op, data);
        if disk.write(sector(op), data).is_err() {
            errors += 1;
        }
        if op >= lag {
            let back = op - lag;
            let bslot = (back % slots as u64) as usize;
            let got = match disk.read(sector(back), scratch) {
                Ok(()) => hash_words(back, scratch),
                Err(_) => 0,
            };
            if got ^ back != table[bslot] {
                errors += 1;
            }
            acc = acc.rotate_left(7) ^ got;
        }
        env.step(op + 1, (op + 1) * chunk);
    }
    (share.ops, acc, errors)
}
