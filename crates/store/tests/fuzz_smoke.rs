//! The fuzz targets' checks (`store::fuzzing`, also run by `cargo fuzz`
//! from `fuzz/`) over the seed corpus and a few thousand mutations of it,
//! on stable Rust in every test run: arbitrary bytes in an epoch file
//! (checksums left wrong, and made right again), a `--retain` text or a
//! RECLAIM file are refused or accepted, never a panic.
//!
//! `CONSNAP_FUZZ_SEEDS=1 cargo test -p store --test fuzz_smoke -- --ignored`
//! writes the epoch and RECLAIM seeds into fuzz/corpus.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use store::{Codec, EpochMeta, Ledger, Mode, PAGE, Store, fuzzing};

#[path = "../../vmm/src/testing.rs"]
#[allow(dead_code)]
mod testing;

use testing::Rng;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

/// Small valid epoch files: a full and an incremental epoch of an 8-page
/// guest, uncompressed, zstd and lz4.
fn seed_epochs(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for codec in [Codec::None, Codec::Zstd, Codec::Lz4] {
        let s = Store::open_or_create(&dir.join(codec.to_string())).unwrap();
        s.set_compression(codec);
        let meta = |id: u64, parent: Option<u64>| EpochMeta {
            id,
            parent,
            mode: Mode::Cow,
            full: parent.is_none(),
            created_ns: id * 1000,
            vcpus: 1,
            mem_size: 8 * PAGE as u64,
            progress: Some(id),
            regions: Vec::new(),
        };
        let mut w = s.writer(meta(1, None)).unwrap();
        w.write_state(b"state-1").unwrap();
        w.data_pages(0, &[vec![1u8; PAGE], (0..PAGE).map(|i| i as u8).collect()].concat())
            .unwrap();
        w.zero_pages(2, 2).unwrap();
        w.data_pages(4, &vec![2u8; 3 * PAGE]).unwrap();
        w.zero_pages(7, 1).unwrap();
        w.commit(10).unwrap();
        let mut w = s.writer(meta(2, Some(1))).unwrap();
        w.write_state(b"state-2").unwrap();
        w.scattered_pages(&[1], &vec![9u8; PAGE]).unwrap();
        w.zero_pages(4, 1).unwrap();
        w.data_pages(5, &vec![8u8; PAGE]).unwrap();
        w.commit(20).unwrap();
        for id in [1, 2] {
            out.push(std::fs::read(s.epoch_path(id)).unwrap());
        }
    }
    out
}

fn seed_ledgers() -> Vec<Vec<u8>> {
    let mut l = Ledger {
        policy: "10s:all,1m:1s".into(),
        max_chain: 64,
        passes: 3,
        merged: 40,
        folds: 2,
        bytes_written: 1 << 20,
        ..Ledger::default()
    };
    let a = l.encode();
    l.policy = String::new();
    vec![a, l.encode()]
}

fn files(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// One mutation of `seed`: flipped bytes, a field set to an edge value,
/// a cut, or a stretch copied elsewhere.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    if b.is_empty() {
        return vec![rng.next_u64() as u8; 1 + rng.below(64) as usize];
    }
    // Most changes where the metadata is: the header and the tables.
    let hot = b.len().min(4096 + 1024) as u64;
    let at = |rng: &mut Rng, len: usize| {
        if rng.below(4) == 0 {
            rng.below(len as u64) as usize
        } else {
            rng.below(hot.min(len as u64)) as usize
        }
    };
    for _ in 0..1 + rng.below(3) {
        match rng.below(5) {
            0 => {
                let i = at(rng, b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = at(rng, b.len()) & !7;
                let v: u64 = match rng.below(6) {
                    0 => 0,
                    1 => 1,
                    2 => u64::MAX,
                    3 => u64::from(u32::MAX),
                    4 => seed.len() as u64 + rng.below(8192),
                    _ => rng.next_u64(),
                };
                let n = if rng.below(2) == 0 { 4 } else { 8 };
                if i + n <= b.len() {
                    b[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
                }
            }
            2 => b.truncate(rng.below(b.len() as u64 + 1) as usize),
            3 => {
                let (from, to) = (at(rng, b.len()), at(rng, b.len()));
                let n = (rng.below(64) as usize).min(b.len() - from).min(b.len() - to);
                let chunk = b[from..from + n].to_vec();
                b[to..to + n].copy_from_slice(&chunk);
            }
            _ => {
                let i = at(rng, b.len());
                b[i] = rng.next_u64() as u8;
            }
        }
        if b.is_empty() {
            break;
        }
    }
    b
}

fn scratch(name: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("consnap-fuzz-smoke-{name}-{}", std::process::id()))
}

#[test]
fn epoch_files_of_arbitrary_bytes_never_panic_the_reader() {
    let dir = testing::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "fuzz-smoke");
    let seeds = seed_epochs(&dir);
    let mut rng = Rng(testing::seed());
    let (plain, sealed) = (scratch("epoch"), scratch("sealed"));
    for seed in &seeds {
        fuzzing::epoch(&plain, seed);
        fuzzing::sealed_epoch(&sealed, seed);
        for _ in 0..2000 {
            let m = mutate(&mut rng, seed);
            fuzzing::epoch(&plain, &m);
            fuzzing::sealed_epoch(&sealed, &m);
        }
    }
    for f in files(&corpus().join("epoch")) {
        fuzzing::epoch(&plain, &f);
    }
}

#[test]
fn policies_and_ledgers_of_arbitrary_bytes_never_panic() {
    let mut rng = Rng(testing::seed());
    let mut policies = files(&corpus().join("policy"));
    policies.push(b"10s:all,1m:1s,1h:1m,1d:1h".to_vec());
    assert!(
        policies.len() > 10,
        "the policy seeds are missing from fuzz/corpus/policy"
    );
    for seed in &policies {
        fuzzing::policy(seed);
        for _ in 0..1000 {
            fuzzing::policy(&mutate(&mut rng, seed));
        }
    }
    for seed in seed_ledgers().iter().chain(files(&corpus().join("ledger")).iter()) {
        fuzzing::ledger(seed);
        for _ in 0..2000 {
            fuzzing::ledger(&mutate(&mut rng, seed));
        }
    }
}

/// Write the seeds of the epoch, sealed_epoch and ledger targets into
/// fuzz/corpus (run by hand; see the module comment).
#[test]
#[ignore = "writes the fuzz seeds: run by hand with CONSNAP_FUZZ_SEEDS=1"]
fn write_fuzz_seeds() {
    if std::env::var_os("CONSNAP_FUZZ_SEEDS").is_none() {
        return;
    }
    let dir = testing::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "fuzz-seeds");
    for (target, seeds) in [
        ("epoch", seed_epochs(&dir)),
        ("sealed_epoch", seed_epochs(&dir.join("s"))),
        ("ledger", seed_ledgers()),
    ] {
        let d = corpus().join(target);
        std::fs::create_dir_all(&d).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s).unwrap();
        }
    }
}
