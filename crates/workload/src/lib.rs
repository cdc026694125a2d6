//! Deterministic workloads for consnap.
//!
//! This crate is `no_std` and allocation-free so that exactly the same code
//! runs in ring 3 of the workload guest and on the host, where tests compute
//! reference checksums. Every workload is a pure function of its [`Spec`],
//! the vCPU share it runs on, and the (initially zero) memory it is given,
//! and, for the disk workloads (`disk=on`, dblog), of the share's part of
//! the disk, which starts zero as well.
//!
//! The kv workload is different: a UDP key-value server ([`kv`], on the
//! frames of [`net`]) whose state is a function of the requests it
//! receives; the guest's network driver feeds it, not [`run_share`].
#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod abi;
mod compile;
mod dblog;
pub mod disk;
mod diskio;
mod ftp;
pub mod hash;
pub mod kv;
mod memstress;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod spec;

#[cfg(feature = "std")]
pub use disk::MemDisk;
pub use disk::{Disk, DiskError};
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
    /// Byte offset of this share's part of the disk (0 without a disk).
    pub disk_off: u64,
    /// Bytes of disk this share uses (multiple of 4096; 0 without a disk).
    pub disk_bytes: u64,
}

impl Share {
    /// Split `spec` across `ncpus` vCPUs: memory, ops and the disk area
    /// (`dsize` from offset 0) are divided evenly.
    pub fn new(spec: &Spec, cpu: u32, ncpus: u32) -> Share {
        let n = u64::from(ncpus.max(1));
        let c = u64::from(cpu);
        let bytes = (spec.wss / n) / spec::PAGE * spec::PAGE;
        let ops = spec.ops / n + u64::from(c < spec.ops % n);
        let mut s = spec.seed ^ c.wrapping_mul(0xA076_1D64_78BD_642F);
        let seed = rng::splitmix64(&mut s);
        let disk_bytes = if spec.uses_disk() {
            (spec.dsize / n) / spec::PAGE * spec::PAGE
        } else {
            0
        };
        Share {
            spec: *spec,
            cpu,
            ncpus,
            bytes: bytes.max(spec::PAGE),
            ops,
            seed,
            disk_off: c * disk_bytes,
            disk_bytes,
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
/// and zero on first use) and, if the spec uses the disk, on `disk`
/// (whose part `[share.disk_off, + share.disk_bytes)` must be zero on first
/// use). A disk workload given no disk does nothing and reports one error;
/// a disk given to another workload is not touched.
///
/// A disk workload reads its whole disk part back at the end, and the
/// checksum covers what it read.
///
/// kv is served by the guest's network driver through [`kv::KvServer`],
/// not here: for it this touches neither `mem` nor the disk and reports
/// no ops and one error.
pub fn run_share(share: &Share, mem: &mut [u64], env: &mut dyn Env, disk: Option<&mut dyn Disk>) -> Outcome {
    if share.spec.kind == Kind::Kv {
        return Outcome {
            ops: 0,
            checksum: 0,
            errors: 1,
        };
    }
    let len = share.words().min(mem.len());
    let mem = &mut mem[..len];
    let mut disk = match disk {
        _ if !share.spec.uses_disk() => None,
        Some(d) => Some(d),
        None => {
            return Outcome {
                ops: 0,
                checksum: 0,
                errors: 1,
            };
        }
    };
    let kind = share.spec.kind;
    let (ops, acc, mut errors) = match disk.as_mut() {
        None => match kind {
            Kind::Memstress => memstress::run(share, mem, env),
            Kind::Build => compile::run(share, mem, env, None),
            Kind::Ftp => ftp::run(share, mem, env),
            // Not reached: their specs always use the disk; kv returned above.
            Kind::Dblog | Kind::Diskio | Kind::Kv => (0, 0, 1),
        },
        Some(d) => {
            let d: &mut dyn Disk = &mut **d;
            match kind {
                Kind::Memstress => memstress::run(share, mem, env),
                Kind::Build => compile::run(share, mem, env, Some(d)),
                Kind::Ftp => ftp::run_disk(share, mem, env, d),
                Kind::Dblog => dblog::run(share, mem, env, d),
                Kind::Diskio => diskio::run(share, mem, env, d),
                // Not reached: returned above.
                Kind::Kv => (0, 0, 1),
            }
        }
    };
    let mut h = hash::Hasher::new(share.seed);
    h.words(mem);
    h.word(acc);
    h.word(ops);
    if let Some(d) = disk {
        let (sum, read_errors) = disk::readback(share, d);
        h.word(sum);
        errors += read_errors;
    }
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
    reference_with_disk(spec, ncpus).0
}

/// [`reference`], and the disk as the guest leaves it: an image of `dsize`
/// bytes, the area the workload uses (empty if it uses no disk).
#[cfg(feature = "std")]
pub fn reference_with_disk(spec: &Spec, ncpus: u32) -> (Outcome, MemDisk) {
    let mut disk = MemDisk::new(if spec.uses_disk() { spec.dsize } else { 0 });
    let outcomes: std::vec::Vec<Outcome> = (0..ncpus.max(1))
        .map(|cpu| {
            let share = Share::new(spec, cpu, ncpus.max(1));
            let mut mem = std::vec![0u64; share.words()];
            run_share(&share, &mut mem, &mut NoEnv, Some(&mut disk))
        })
        .collect();
    (combine(&outcomes), disk)
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
            Kind::Dblog => 2_000,
            Kind::Diskio => 200,
            Kind::Kv => 0,
        };
        s.chunk = 16 << 10;
        s.filesize = 8 << 10;
        s.dsize = 2 << 20;
        s
    }

    /// Every workload run_share runs (all but kv), and build and ftp with
    /// `disk=on` too.
    fn all_small() -> std::vec::Vec<Spec> {
        let mut v: std::vec::Vec<Spec> = Kind::ALL.into_iter().filter(|k| *k != Kind::Kv).map(small).collect();
        v.push(Spec {
            disk: true,
            ..small(Kind::Build)
        });
        v.push(Spec {
            disk: true,
            ..small(Kind::Ftp)
        });
        v
    }

    #[test]
    fn every_workload_is_deterministic_and_seed_sensitive() {
        for spec in all_small() {
            let what = (spec.kind, spec.disk);
            let a = reference(&spec, 1);
            assert_eq!(a, reference(&spec, 1), "{what:?} not deterministic");
            assert_eq!(a.ops, spec.ops);
            assert_eq!(a.errors, 0, "{what:?} found integrity errors");
            let other = Spec { seed: 2, ..spec };
            assert_ne!(a.checksum, reference(&other, 1).checksum, "{what:?} ignores seed");
            let two = reference(&spec, 2);
            assert_eq!(two.ops, spec.ops);
            assert_eq!(two.errors, 0, "{what:?} on 2 vCPUs found integrity errors");
            assert_ne!(two.checksum, a.checksum);
        }
    }

    /// Checksums of workloads without a disk, as computed before the disk
    /// workloads existed: the guest must report the same as it always did.
    #[test]
    fn checksums_without_a_disk_are_unchanged() {
        for (words, ncpus, want) in [
            (
                "workload=memstress wss=4M ops=50000 seed=3",
                1,
                0xf1e0_5105_298a_8a76_u64,
            ),
            (
                "workload=memstress wss=4M ops=50000 pattern=hotcold",
                2,
                0xba09_a8a1_e48c_f3b5,
            ),
            ("workload=build wss=4M ops=20 filesize=8K", 1, 0x424f_ef69_241d_704e),
            (
                "workload=build wss=8M ops=30 filesize=8K seed=5",
                2,
                0x47a8_c0f7_9cd1_b9ab,
            ),
            ("workload=ftp wss=4M ops=300 chunk=16K", 1, 0xa84b_8304_d70b_b9cc),
            ("workload=ftp wss=4M ops=301 chunk=16K seed=7", 2, 0x9e0b_4889_6f4b_3b38),
        ] {
            let spec = Spec::parse(words).unwrap();
            assert_eq!(reference(&spec, ncpus).checksum, want, "{words} on {ncpus} vCPUs");
            // A disk offered to a workload that does not use one changes nothing.
            let share = Share::new(&spec, 0, 1);
            let mut mem = std::vec![0u64; share.words()];
            let mut disk = MemDisk::new(1 << 20);
            run_share(&share, &mut mem, &mut NoEnv, Some(&mut disk));
            assert!(disk.to_bytes().iter().all(|b| *b == 0), "{words} wrote to the disk");
        }
    }

    fn run_on(share: &Share, disk: &mut dyn Disk) -> Outcome {
        let mut mem = std::vec![0u64; share.words()];
        run_share(share, &mut mem, &mut NoEnv, Some(disk))
    }

    #[test]
    fn disk_workloads_write_their_part_of_the_disk_only() {
        for spec in all_small().into_iter().filter(Spec::uses_disk) {
            let what = spec.kind;
            let (_, disk1) = reference_with_disk(&spec, 1);
            assert_eq!(disk1.sectors() * disk::SECTOR, spec.dsize);
            let (_, disk2) = reference_with_disk(&spec, 2);
            assert_ne!(disk1, disk2, "{what:?}");
            let bytes = disk2.to_bytes();
            let half = bytes.len() / 2;
            for part in [&bytes[..half], &bytes[half..]] {
                assert!(part.iter().any(|b| *b != 0), "{what:?}: a vCPU left its part empty");
            }
            // vCPU 1 of 2 alone writes its half and nothing else.
            let mut alone = MemDisk::new(spec.dsize);
            run_on(&Share::new(&spec, 1, 2), &mut alone);
            let alone = alone.to_bytes();
            assert!(alone[..half].iter().all(|b| *b == 0), "{what:?}");
            assert!(alone[half..] == bytes[half..], "{what:?}");
        }
    }

    /// A disk that drops every `drop_every`-th write and flips a bit in
    /// every 64 KiB read (the size only the final read-back uses).
    struct Faulty {
        inner: MemDisk,
        writes: u64,
        drop_every: u64,
        flip_readback: bool,
    }

    impl Disk for Faulty {
        fn sectors(&self) -> u64 {
            self.inner.sectors()
        }
        fn read(&mut self, sector: u64, buf: &mut [u64]) -> Result<(), DiskError> {
            self.inner.read(sector, buf)?;
            if self.flip_readback && buf.len() == 8192 {
                buf[100] ^= 1;
            }
            Ok(())
        }
        fn write(&mut self, sector: u64, buf: &[u64]) -> Result<(), DiskError> {
            self.writes += 1;
            if self.drop_every != 0 && self.writes.is_multiple_of(self.drop_every) {
                return Ok(());
            }
            self.inner.write(sector, buf)
        }
        fn flush(&mut self) -> Result<(), DiskError> {
            Ok(())
        }
    }

    #[test]
    fn the_checksum_covers_the_disk_and_lost_writes_are_caught() {
        for spec in all_small().into_iter().filter(Spec::uses_disk) {
            let what = spec.kind;
            let share = Share::new(&spec, 0, 1);
            let good = run_on(&share, &mut MemDisk::new(spec.dsize));
            let faulty = |drop_every, flip_readback| Faulty {
                inner: MemDisk::new(spec.dsize),
                writes: 0,
                drop_every,
                flip_readback,
            };
            let flipped = run_on(&share, &mut faulty(0, true));
            assert_ne!(
                flipped.checksum, good.checksum,
                "{what:?}: read-back not in the checksum"
            );
            let lossy = run_on(&share, &mut faulty(7, false));
            assert_ne!(lossy.checksum, good.checksum, "{what:?}");
            // build and diskio do not check what they wrote (diskio only
            // measures throughput); the checksum still differs.
            if what != Kind::Build && what != Kind::Diskio {
                assert!(lossy.errors > 0, "{what:?} did not notice lost writes");
            }
            // A disk workload given no disk does nothing and says so.
            let mut mem = std::vec![0u64; share.words()];
            assert_eq!(run_share(&share, &mut mem, &mut NoEnv, None).errors, 1);
            // irq only changes how the guest waits for the disk.
            assert_eq!(reference(&Spec { irq: true, ..spec }, 1), reference(&spec, 1));
        }
    }

    #[test]
    fn the_disk_changes_what_build_and_ftp_compute() {
        for kind in [Kind::Build, Kind::Ftp] {
            let spec = small(kind);
            let on = Spec { disk: true, ..spec };
            assert_ne!(reference(&spec, 1).checksum, reference(&on, 1).checksum, "{kind:?}");
            assert_eq!(reference(&on, 1).ops, spec.ops);
        }
        // dblog's disk size matters.
        let d = small(Kind::Dblog);
        assert_ne!(reference(&d, 1), reference(&Spec { dsize: 1 << 20, ..d }, 1));
        // Every flush comes with a read of a random page, which the checksum covers.
        assert_ne!(
            reference(&d, 1).checksum,
            reference(&Spec { flush: 0, ..d }, 1).checksum
        );
    }

    #[test]
    fn run_share_leaves_kv_to_the_network_driver() {
        for words in ["workload=kv ip=10.0.2.15", "workload=kv ip=10.0.2.15 disk=on dsize=64K"] {
            let spec = Spec::parse(words).unwrap();
            let share = Share::new(&spec, 0, 1);
            let mut mem = std::vec![7u64; share.words()];
            let mut disk = MemDisk::new(64 << 10);
            let out = run_share(&share, &mut mem, &mut NoEnv, Some(&mut disk));
            assert_eq!((out.ops, out.errors), (0, 1), "{words}");
            assert!(mem.iter().all(|w| *w == 7), "{words} touched memory");
            assert!(disk.to_bytes().iter().all(|b| *b == 0), "{words} touched the disk");
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
