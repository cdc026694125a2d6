//! Checking the workload guest's memory against the host's own computation.
//!
//! memstress is a pure function of its spec and its op count, and the guest
//! publishes, per vCPU, the ops it has completed (`workload::abi`) and where
//! its working set lies. So the memory of any snapshot can be checked word
//! by word: each vCPU's share must equal the reference after its published
//! op count, except that the one op in flight when the VM was paused may be
//! partly written (every word is then the value before or after that op).
//! This is what proves that an epoch restores what the guest really had,
//! not only that its checksums match what was written.

use thiserror::Error;
use workload::abi::{self, off};
use workload::{Kind, NoEnv, Share, Spec};

use vmm::memory::GuestRam;

/// Why a memory image does not pass.
#[derive(Debug, Error)]
pub enum CheckError {
    /// The saved workload words do not parse.
    #[error("workload spec {spec:?} does not parse: {why}")]
    Spec {
        /// The words.
        spec: String,
        /// Parser message.
        why: String,
    },
    /// Only memstress has memory that is a function of the op count alone.
    #[error("only memstress memory can be checked against the reference; this guest runs {0}")]
    Unsupported(&'static str),
    /// The guest is running but has not published where its working set is.
    #[error(
        "the status page says the workload runs but gives no working-set address (a guest older than status ABI field `arena`)"
    )]
    NoArena,
    /// The published layout does not fit guest RAM.
    #[error("vCPU {cpu}'s working set at {gpa:#x} (+{bytes} bytes) is not in guest RAM")]
    OutOfRam {
        /// vCPU.
        cpu: u32,
        /// Start of its share.
        gpa: u64,
        /// Its size.
        bytes: u64,
    },
    /// Memory differs from the reference.
    #[error(
        "vCPU {cpu} at {ops} ops: {pages} page(s) of its working set differ from the reference, first at guest-physical {first:#x}"
    )]
    Differs {
        /// vCPU.
        cpu: u32,
        /// Its published op count.
        ops: u64,
        /// Pages that differ.
        pages: u64,
        /// Guest-physical address of the first differing page.
        first: u64,
    },
}

/// What a passing check covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// vCPUs whose share was checked (0 if the workload had not started).
    pub shares: u32,
    /// Ops done, summed over vCPUs.
    pub ops: u64,
    /// Bytes of guest memory compared.
    pub bytes: u64,
}

/// Check `ram`, the memory of a workload guest started with the words
/// `spec`, against the reference computation.
pub fn check(ram: &GuestRam, spec: &str) -> Result<Checked, CheckError> {
    let parsed = Spec::parse(spec).map_err(|e| CheckError::Spec {
        spec: spec.to_string(),
        why: e.to_string(),
    })?;
    if parsed.kind != Kind::Memstress {
        return Err(CheckError::Unsupported(parsed.kind.name()));
    }
    let none = Checked {
        shares: 0,
        ops: 0,
        bytes: 0,
    };
    let Some(status) = super::status::read(ram) else {
        return Ok(none);
    };
    if status.state < abi::state::RUNNING || status.ncpus == 0 {
        return Ok(none);
    }
    let arena = ram.read_u64(abi::STATUS_GPA + off::ARENA).unwrap_or(0);
    if arena == 0 {
        return Err(CheckError::NoArena);
    }
    let ncpus = status.ncpus.min(abi::MAX_CPUS as u32);
    let mut out = none;
    for cpu in 0..ncpus {
        let mut share = Share::new(&parsed, cpu, ncpus);
        let total = share.ops;
        let ops = ram
            .read_u64(abi::STATUS_GPA + off::OPS_DONE + u64::from(cpu) * 8)
            .unwrap_or(0);
        let gpa = arena + u64::from(cpu) * share.bytes;
        let oob = || CheckError::OutOfRam {
            cpu,
            gpa,
            bytes: share.bytes,
        };
        let mut before = vec![0u64; share.words()];
        share.ops = ops;
        workload::run_share(&share, &mut before, &mut NoEnv, None);
        let mut after = vec![0u64; share.words()];
        // The op in flight at the pause, if any is left.
        share.ops = if ops < total { ops + 1 } else { ops };
        workload::run_share(&share, &mut after, &mut NoEnv, None);
        let mut page = [0u8; 4096];
        let (mut bad, mut first) = (0u64, 0u64);
        for (i, (b, a)) in before.chunks(512).zip(after.chunks(512)).enumerate() {
            let at = gpa + i as u64 * 4096;
            ram.read_to(at, &mut page[..b.len() * 8]).map_err(|_| oob())?;
            let differs = page.chunks_exact(8).zip(b.iter().zip(a)).any(|(w, (b, a))| {
                let w = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                w != *b && w != *a
            });
            if differs {
                if bad == 0 {
                    first = at;
                }
                bad += 1;
            }
        }
        if bad != 0 {
            return Err(CheckError::Differs {
                cpu,
                ops,
                pages: bad,
                first,
            });
        }
        out.shares += 1;
        out.ops += ops;
        out.bytes += share.bytes;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SPEC: &str = "workload=memstress wss=64K ops=1000 pattern=random";
    const ARENA: u64 = 4 << 20;

    fn words_of(spec: &Spec, ops: u64) -> Vec<u64> {
        let mut share = Share::new(spec, 0, 1);
        share.ops = ops;
        let mut mem = vec![0u64; share.words()];
        workload::run_share(&share, &mut mem, &mut NoEnv, None);
        mem
    }

    fn bytes(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// A guest paused after `ops` ops, with memory `mem`.
    fn guest(ops: u64, mem: &[u64]) -> GuestRam {
        let ram = GuestRam::with_huge_pages(16 << 20, false).unwrap();
        let s = abi::STATUS_GPA;
        let put = |off: u64, v: u64| ram.write_from(s + off, &v.to_le_bytes()).unwrap();
        put(off::MAGIC, abi::STATUS_MAGIC);
        put(off::STATE, u64::from(abi::state::RUNNING) | (1 << 32)); // state, ncpus
        put(off::ARENA, ARENA);
        put(off::OPS_DONE, ops);
        ram.write_from(ARENA, &bytes(mem)).unwrap();
        ram
    }

    #[test]
    fn memory_at_the_published_op_count_passes() {
        let spec = Spec::parse(SPEC).unwrap();
        let got = check(&guest(400, &words_of(&spec, 400)), SPEC).unwrap();
        assert_eq!((got.shares, got.ops, got.bytes), (1, 400, 64 << 10));
    }

    #[test]
    fn an_op_half_done_at_the_pause_passes() {
        let spec = Spec::parse(SPEC).unwrap();
        let (before, after) = (words_of(&spec, 400), words_of(&spec, 401));
        let changed: Vec<usize> = (0..before.len()).filter(|&i| before[i] != after[i]).collect();
        assert!(changed.len() >= 2, "one op rewrites a line of 8 words");
        let mut mem = before.clone();
        mem[changed[0]] = after[changed[0]];
        check(&guest(400, &mem), SPEC).unwrap();
    }

    #[test]
    fn a_stale_or_foreign_word_fails_and_names_its_page() {
        let spec = Spec::parse(SPEC).unwrap();
        // Memory one op behind the counter: a lost write.
        let err = check(&guest(401, &words_of(&spec, 399)), SPEC).unwrap_err();
        assert!(
            matches!(
                err,
                CheckError::Differs {
                    pages: 1..=2,
                    ops: 401,
                    ..
                }
            ),
            "{err}"
        );
        let mut mem = words_of(&spec, 400);
        mem[3000] ^= 1;
        let err = check(&guest(400, &mem), SPEC).unwrap_err();
        match err {
            CheckError::Differs { first, pages: 1, .. } => assert_eq!(first, ARENA + 3000 * 8 / 4096 * 4096),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn other_workloads_and_missing_layout_are_named() {
        let ram = guest(1, &[0; 8]);
        let err = check(&ram, "workload=build").unwrap_err();
        assert!(err.to_string().contains("build"), "{err}");
        ram.write_from(abi::STATUS_GPA + off::ARENA, &0u64.to_le_bytes())
            .unwrap();
        assert!(matches!(check(&ram, SPEC), Err(CheckError::NoArena)));
        assert!(matches!(check(&ram, "nonsense=1"), Err(CheckError::Spec { .. })));
    }
}
