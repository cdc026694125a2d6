//! memstress: write pages of a working set in a chosen pattern.
//!
//! One operation writes one 64-byte line of one page, so every op dirties a
//! page and the dirty set per interval is set by the rate and the pattern.

use crate::rng::Rng;
use crate::spec::{PAGE, Pattern};
use crate::{Env, Share};

const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
const LINES_PER_PAGE: u64 = PAGE / 64;

pub(crate) fn run(share: &Share, mem: &mut [u64], env: &mut dyn Env) -> (u64, u64, u64) {
    let pages = (mem.len() / WORDS_PER_PAGE) as u64;
    if pages == 0 {
        return (0, 0, 0);
    }
    let spec = &share.spec;
    let hot_pages = (pages * spec.hot / 100).clamp(1, pages);
    let mut rng = Rng::new(share.seed);
    let mut acc = 0u64;
    for op in 0..share.ops {
        let page = match spec.pattern {
            Pattern::Seq => op % pages,
            Pattern::Random => rng.below(pages),
            Pattern::HotCold => {
                if hot_pages == pages || rng.percent(spec.hotw) {
                    rng.below(hot_pages)
                } else {
                    hot_pages + rng.below(pages - hot_pages)
                }
            }
        };
        let line = rng.below(LINES_PER_PAGE) as usize;
        let base = page as usize * WORDS_PER_PAGE + line * 8;
        let r = rng.next_u64();
        let cell = &mut mem[base..base + 8];
        let mut carry = cell[7] ^ op;
        for (i, w) in cell.iter_mut().enumerate() {
            carry = (*w ^ r.rotate_left(i as u32 * 8))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(carry);
            *w = carry;
        }
        acc = acc.rotate_left(5) ^ carry;
        env.step(op + 1, op + 1);
    }
    (share.ops, acc, 0)
}
