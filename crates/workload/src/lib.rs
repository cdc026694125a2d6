//! Deterministic workloads for consnap.
//!
//! This crate is `no_std` and allocation-free so that exactly the same code
//! runs in ring 3 of the workload guest and on the host, where tests compute
//! reference checksums. Every workload is a pure function of its [`Spec`],
//! the vCPU share it runs on, and the (initially zero) memory it is given.
#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod abi;
mod compile;
mod ftp;
pub mod hash;
mod memstress;
pub mod rng;
pub mod spec;

pub use spec::{Kind, ParseError, Pattern, Spec};

/// What the environment provides to a running workload.
pub trait Env {
    /// Called after every operation: `ops` done so far by this share and
    /// `units` of rate-limited work (pages or bytes) done so far. The guest
    /// publishes progress here and, when a rate is set, waits until the work
    /// is due.
    fn step(&mut self, ops: u64, units: u64);
}

/// An environment that neither reports nor paces (host reference runs).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEnv;

impl Env for NoEnv {
    #[inline]
    fn step(&mut self, _ops: u64, _units: u64) {}
}

/// The part of a workload one vCPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// The whole specification.
    pub spec: Spec,
    /// Index of this vCPU.
    pub cpu: u32,
    /// Number of vCPUs.
    pub ncpus: u32,
    /// Bytes of memory this share works on (multiple of 4096).
    pub bytes: u64,
    /// Operations this share performs.
    pub ops: u64,
    /// Seed of this share.
    pub seed: u64,
}

impl Share {
    /// Split `spec` across `ncpus` vCPUs: memory and ops are divided evenly.
    pub fn new(spec: &Spec, cpu: u32, ncpus: u32) -> Share {
        let n = u64::from(ncpus.max(1));
        let c = u64::from(cpu);
        let bytes = (spec.wss / n) / spec::PAGE * spec::PAGE;
        let ops = spec.ops / n + u64::from(c < spec.ops % n);
        let mut s = spec.seed ^ c.wrapping_mul(0xA076_1D64_78BD_642F);
        let seed = rng::splitmix64(&mut s);
        Share {
            spec: *spec,
            cpu,
            ncpus,
            bytes: bytes.max(spec::PAGE),
            ops,
            seed,
        }
    }

    /// Number of 64-bit words of memory this share needs.
    pub fn words(&self) -> usize {
        (self.bytes / 8) as usize
    }
}

/// Result of one share, or of the whole workload once combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Operations done.
    pub ops: u64,
    /// Checksum over the final working state.
    pub checksum: u64,
    /// Integrity errors the workload detected (should be zero).
    pub errors: u64,
}

/// Run one share of a workload on `mem` (which must be `share.words()` long
/// and zero on first use).
pub fn run_share(share: &Share, mem: &mut [u64], env: &mut dyn Env) -> Outcome {
    let len = share.words().min(mem.len());
    let mem = &mut mem[..len];
    let (ops, acc, errors) = match share.spec.kind {
        Kind::Memstress => memstress::run(share, mem, env),
        Kind::Build => compile::run(share, mem, env),
        Kind::Ftp => ftp::run(share, mem, env),
    };
    let mut h = hash::Hasher::new(share.seed);
    h.words(mem);
    h.word(acc);
    h.word(ops);
    Outcome {
        ops,
        checksum: h.finish(),
        errors,
    }
}

/// Combine per-vCPU outcomes, in vCPU order, into the workload's outcome.
pub fn combine(shares: &[Outcome]) -> Outcome {
    let mut h = hash::Hasher::new(shares.len() as u64);
    let mut total = Outcome::default();
    for s in shares {
        h.word(s.ops);
        h.word(s.checksum);
        total.ops += s.ops;
        total.errors += s.errors;
    }
    total.checksum = h.finish();
    total
}

/// Compute on the host what the guest will report for `spec` on `ncpus` vCPUs.
#[cfg(feature = "std")]
pub fn reference(spec: &Spec, ncpus: u32) -> Outcome {
    let outcomes: std::vec::Vec<Outcome> = (0..ncpus.max(1))
        .map(|cpu| {
            let share = Share::new(spec, cpu, ncpus.max(1));
            let mut mem = std::vec![0u64; share.words()];
            run_share(&share, &mut mem, &mut NoEnv)
        })
        .collect();
    combine(&outcomes)
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    fn small(kind: Kind) -> Spec {
        let mut s = Spec::defaults(kind);
        s.wss = 4 << 20;
        s.ops = match kind {
            Kind::Memstress => 50_000,
            Kind::Build => 20,
            Kind::Ftp => 300,
        };
        s.chunk = 16 << 10;
        s.filesize = 8 << 10;
        s
    }

    #[test]
    fn every_workload_is_deterministic_and_seed_sensitive() {
        for kind in Kind::ALL {
            let spec = small(kind);
            let a = reference(&spec, 1);
            assert_eq!(a, reference(&spec, 1), "{kind:?} not deterministic");
            assert_eq!(a.ops, spec.ops);
            assert_eq!(a.errors, 0, "{kind:?} found integrity errors");
            let other = Spec { seed: 2, ..spec };
            assert_ne!(a.checksum, reference(&other, 1).checksum, "{kind:?} ignores seed");
            let two = reference(&spec, 2);
            assert_eq!(two.ops, spec.ops);
            assert_ne!(two.checksum, a.checksum);
        }
    }

    #[test]
    fn shares_split_ops_and_memory() {
        let spec = Spec {
            ops: 7,
            ..small(Kind::Memstress)
        };
        let s: std::vec::Vec<Share> = (0..3).map(|c| Share::new(&spec, c, 3)).collect();
        assert_eq!(s.iter().map(|x| x.ops).sum::<u64>(), 7);
        assert!(s.iter().all(|x| x.bytes % 4096 == 0 && x.bytes * 3 <= spec.wss));
        assert_ne!(s[0].seed, s[1].seed);
    }

    #[test]
    fn memstress_patterns_differ() {
        let base = small(Kind::Memstress);
        let seq = reference(
            &Spec {
                pattern: Pattern::Seq,
                ..base
            },
            1,
        );
        let rnd = reference(
            &Spec {
                pattern: Pattern::Random,
                ..base
            },
            1,
        );
        let hc = reference(
            &Spec {
                pattern: Pattern::HotCold,
                ..base
            },
            1,
        );
        assert_ne!(seq.checksum, rnd.checksum);
        assert_ne!(rnd.checksum, hc.checksum);
    }
}
