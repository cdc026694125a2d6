//! diskio: disk throughput. Every op reads or writes one `chunk`-sized
//! block of the share's disk area, in order (`pattern=seq`, wrapping
//! around) or at random (`pattern=random`); `io=read` or `io=write`. The
//! guest does as little besides the I/O as it can: a written block is the
//! I/O buffer with the op number in each sector's first word, and a read
//! block contributes its first words to the checksum.
//!
//! Memory layout of a share: the I/O buffer, `chunk` bytes.

use crate::disk::{Disk, SECTOR};
use crate::rng::Rng;
use crate::spec::Pattern;
use crate::{Env, Share};

/// Sector words of the buffer.
const SECTOR_WORDS: usize = (SECTOR / 8) as usize;

pub(crate) fn run(share: &Share, mem: &mut [u64], env: &mut dyn Env, disk: &mut dyn Disk) -> (u64, u64, u64) {
    let chunk = share.spec.chunk;
    let words = (chunk / 8) as usize;
    let blocks = share.disk_bytes / chunk;
    if mem.len() < words || blocks == 0 {
        return (0, 0, 1);
    }
    let buf = &mut mem[..words];
    let write = share.spec.io_write;
    let mut rng = Rng::new(share.seed);
    let (mut acc, mut errors) = (0u64, 0u64);
    for op in 0..share.ops {
        let block = match share.spec.pattern {
            Pattern::Seq => op % blocks,
            _ => rng.below(blocks),
        };
        let sector = (share.disk_off + block * chunk) / SECTOR;
        if write {
            for s in buf.chunks_mut(SECTOR_WORDS) {
                s[0] = op;
            }
            if disk.write(sector, buf).is_err() {
                errors += 1;
            }
        } else {
            match disk.read(sector, buf) {
                Ok(()) => acc = acc.rotate_left(1) ^ buf[0] ^ buf[words - 1],
                Err(_) => errors += 1,
            }
        }
        env.step(op + 1, (op + 1) * chunk);
    }
    (share.ops, acc, errors)
}
