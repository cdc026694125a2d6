//! A fast, deterministic 64-bit checksum over 64-bit words.
//!
//! Four independent lanes of an xxHash64-style round keep the multiplier
//! pipeline busy, so hashing a whole working set runs near memory speed.
//! It is a checksum for equality of states, not a cryptographic hash.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;

#[inline(always)]
fn round(acc: u64, word: u64) -> u64 {
    acc.wrapping_add(word.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

/// Final avalanche so that every input bit affects every output bit.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(P2);
    x ^= x >> 29;
    x = x.wrapping_mul(P3);
    x ^ (x >> 32)
}

/// Streaming checksum over words.
#[derive(Debug, Clone)]
pub struct Hasher {
    lanes: [u64; 4],
    words: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Hasher {
    /// A hasher whose result also depends on `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            lanes: [
                seed.wrapping_add(P1).wrapping_add(P2),
                seed.wrapping_add(P2),
                seed,
                seed.wrapping_sub(P1),
            ],
            words: 0,
        }
    }

    /// Feed one word.
    #[inline]
    pub fn word(&mut self, w: u64) {
        let lane = (self.words & 3) as usize;
        self.lanes[lane] = round(self.lanes[lane], w);
        self.words += 1;
    }

    /// Feed a slice of words. Equivalent to calling [`Hasher::word`] on each.
    pub fn words(&mut self, data: &[u64]) {
        let mut rest = data;
        while self.words & 3 != 0 {
            match rest.split_first() {
                Some((w, tail)) => {
                    self.word(*w);
                    rest = tail;
                }
                None => return,
            }
        }
        let mut chunks = rest.chunks_exact(4);
        let [mut a, mut b, mut c, mut d] = self.lanes;
        for ch in &mut chunks {
            a = round(a, ch[0]);
            b = round(b, ch[1]);
            c = round(c, ch[2]);
            d = round(d, ch[3]);
        }
        self.lanes = [a, b, c, d];
        self.words += (rest.len() - chunks.remainder().len()) as u64;
        for w in chunks.remainder() {
            self.word(*w);
        }
    }

    /// The checksum of everything fed so far.
    pub fn finish(&self) -> u64 {
        let [a, b, c, d] = self.lanes;
        let mut h = a
            .rotate_left(1)
            .wrapping_add(b.rotate_left(7))
            .wrapping_add(c.rotate_left(12))
            .wrapping_add(d.rotate_left(18));
        for lane in self.lanes {
            h = (h ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4);
        }
        mix64(h ^ self.words)
    }
}

/// One-shot checksum of a word slice.
pub fn hash_words(seed: u64, data: &[u64]) -> u64 {
    let mut h = Hasher::new(seed);
    h.words(data);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot_for_any_split() {
        let data: [u64; 11] = core::array::from_fn(|i| (i as u64) * 0x1234_5678_9abc);
        let whole = hash_words(7, &data);
        for split in 0..data.len() {
            let mut h = Hasher::new(7);
            h.words(&data[..split]);
            h.words(&data[split..]);
            assert_eq!(h.finish(), whole, "split at {split}");
        }
    }

    #[test]
    fn sensitive_to_content_order_length_and_seed() {
        let a = [1u64, 2, 3, 4, 5];
        let b = [1u64, 2, 3, 5, 4];
        assert_ne!(hash_words(0, &a), hash_words(0, &b));
        assert_ne!(hash_words(0, &a), hash_words(0, &a[..4]));
        assert_ne!(hash_words(0, &a), hash_words(1, &a));
        assert_ne!(hash_words(0, &[0]), hash_words(0, &[0, 0]));
    }
}
