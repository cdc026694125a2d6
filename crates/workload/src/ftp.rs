//! ftp: receive fixed-size chunks into a file cache, checksum them, and read
//! earlier chunks back to verify them.
//!
//! Memory layout of a share: a table with one checksum word per cache slot,
//! then the slots. Chunk `i` lands in slot `i % slots`, so the dirty stream is
//! sequential and, with a rate set, paced like a network link.

use crate::hash::hash_words;
use crate::rng::splitmix64;
use crate::{Env, Share};

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
        // "Receive" the chunk: the link delivers a deterministic byte stream.
        let mut state = share.seed ^ op.wrapping_mul(0xD1B5_4A32_D192_ED03);
        for w in data.iter_mut() {
            *w = splitmix64(&mut state);
        }
        let sum = hash_words(op, data);
        table[slot] = sum ^ op;
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
