//! Reclamation on synthetic stores: the retained set is exactly what the
//! policy says, every retained epoch restores to what it restored to
//! before, chains are folded to the limit, the result verifies, and all of
//! it with and without compression, on a linear history and on a tree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use store::{
    Access, Codec, EpochMeta, Ledger, Mode, PAGE, Policy, ReclaimOptions, Source, Store, plan, reclaim, verify,
};

mod common;

const PAGES: u64 = 64;
const MS: u64 = 1_000_000;
const T0: u64 = 1_700_000_000_000 * MS;

use common::Rng;

/// Write epoch `id` (parent `parent`) at `t`: a full epoch lists every
/// page, an incremental one a random few; some pages are zero, some
/// compressible, some random.
fn write(s: &Store, rng: &mut Rng, id: u64, parent: Option<u64>, t: u64) {
    let mut w = s
        .writer(EpochMeta {
            id,
            parent,
            mode: Mode::Cow,
            full: parent.is_none(),
            created_ns: t,
            vcpus: 1,
            mem_size: PAGES * PAGE as u64,
            progress: Some(id),
            regions: Vec::new(),
        })
        .unwrap();
    w.write_state(format!("state-{id}").as_bytes()).unwrap();
    for gfn in 0..PAGES {
        if parent.is_some() && !rng.next_u64().is_multiple_of(5) {
            continue;
        }
        match rng.next_u64() % 4 {
            0 => w.zero_pages(gfn, 1).unwrap(),
            1 => w.data_pages(gfn, &vec![(id as u8) ^ (gfn as u8); PAGE]).unwrap(),
            _ => {
                let page: Vec<u8> = (0..PAGE).map(|_| rng.next_u64() as u8).collect();
                w.data_pages(gfn, &page).unwrap();
            }
        }
    }
    w.commit(id * 1000).unwrap();
}

/// State and memory image of epoch `id`.
fn image(s: &Store, id: u64) -> (Vec<u8>, Vec<u8>) {
    common::image(s, id, PAGES as usize)
}

fn images(s: &Store) -> BTreeMap<u64, (Vec<u8>, Vec<u8>)> {
    s.ids().unwrap().into_iter().map(|id| (id, image(s, id))).collect()
}

fn chain_len(s: &Store, id: u64) -> usize {
    s.chain(id).unwrap().len()
}

fn check(codec: Codec, tree: bool) {
    let dir = common::TestDir::new(env!("CARGO_TARGET_TMPDIR"), &format!("reclaim-{codec}-{tree}"));
    let s = Store::open_or_create(&dir.join("s")).unwrap();
    s.set_compression(codec);
    let mut rng = Rng(0x1234_5678 ^ codec.code() as u64);
    // 120 epochs 100 ms apart (12 s); with `tree`, epochs 60.. branch off 40.
    let mut times = Vec::new();
    for id in 1..=120u64 {
        let parent = match id {
            1 => None,
            61 if tree => Some(40),
            _ => Some(id - 1),
        };
        let t = T0 + id * 100 * MS;
        write(&s, &mut rng, id, parent, t);
        times.push((id, t));
    }
    let before = images(&s);
    let policy = Policy::parse("1s:all,4s:500ms,10s:2s").unwrap();
    let opts = ReclaimOptions {
        policy: policy.clone(),
        max_chain: 6,
        rate: None,
        codec: None,
        batch_merges: false,
        ..Default::default()
    };
    let pass = reclaim(&s, &opts, &[], &AtomicBool::new(false), &mut |_, _| {}).unwrap();
    let kept: Vec<u64> = s.ids().unwrap();
    let want: Vec<u64> = policy.retained(&times).into_iter().collect();
    assert_eq!(kept, want, "retained set");
    assert!(kept.len() < 50, "{kept:?}");
    for id in &kept {
        assert_eq!(image(&s, *id), before[id], "epoch {id} changed ({codec}, tree {tree})");
        assert!(chain_len(&s, *id) <= 6, "epoch {id} chain {}", chain_len(&s, *id));
        if codec != Codec::None {
            let h = s.open_epoch(*id).unwrap().header().clone();
            assert!(h.codec == codec || h.pages_data == 0, "{h:?}");
        }
    }
    assert_eq!(pass.merged + pass.dropped, 120 - kept.len() as u64);
    assert!(pass.rewrites > 0 && pass.bytes_freed > 0, "{pass:?}");
    let ledger = Ledger::load(&dir.join("s")).unwrap().unwrap();
    assert_eq!(ledger.merged, pass.merged);
    assert_eq!(ledger.policy, "1s:all,4s:500ms,10s:2s");
    let v = verify(&dir.join("s"), &mut |_, _| {}).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    // A second pass finds nothing to do.
    let again = reclaim(&s, &opts, &[], &AtomicBool::new(false), &mut |_, _| {}).unwrap();
    assert_eq!((again.rewrites, again.merged, again.dropped), (0, 0, 0), "{again:?}");
    // Readers see the same through a fresh handle.
    let r = Store::open(&dir.join("s"), Access::Read).unwrap();
    assert_eq!(image(&r, *kept.last().unwrap()), before[kept.last().unwrap()]);
}

#[test]
fn linear_history_uncompressed() {
    check(Codec::None, false);
}

#[test]
fn linear_history_zstd() {
    check(Codec::Zstd, false);
}

#[test]
fn tree_lz4() {
    check(Codec::Lz4, true);
}

#[test]
fn tree_uncompressed() {
    check(Codec::None, true);
}

#[test]
fn keep_all_only_folds() {
    let dir = common::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "reclaim-fold");
    let s = Store::open_or_create(&dir.join("s")).unwrap();
    let mut rng = Rng(99);
    for id in 1..=40u64 {
        write(&s, &mut rng, id, (id > 1).then(|| id - 1), T0 + id * MS);
    }
    let before = images(&s);
    let opts = ReclaimOptions {
        policy: Policy::keep_all(),
        max_chain: 8,
        rate: None,
        codec: None,
        batch_merges: false,
        ..Default::default()
    };
    let pass = reclaim(&s, &opts, &[], &AtomicBool::new(false), &mut |_, _| {}).unwrap();
    assert_eq!(s.ids().unwrap().len(), 40);
    assert!(pass.folds > 0);
    // Folding removes nothing: it copies pages still needed by other
    // epochs into the folded ones, so it costs space, and the ledger says
    // so with a negative net (ls shows it signed, never as 0).
    assert_eq!((pass.merged, pass.dropped), (0, 0));
    assert!(pass.reclaimed() < 0, "{pass:?}");
    let ledger = Ledger::load(&dir.join("s")).unwrap().unwrap();
    assert_eq!(ledger.reclaimed(), pass.reclaimed());
    for id in 1..=40 {
        assert!(chain_len(&s, id) <= 8);
        assert_eq!(image(&s, id), before[&id]);
    }
}

#[test]
fn a_pinned_epoch_is_kept_and_reclamation_needs_the_lock() {
    let dir = common::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "reclaim-pin");
    let s = Store::open_or_create(&dir.join("s")).unwrap();
    let mut rng = Rng(7);
    for id in 1..=30u64 {
        write(&s, &mut rng, id, (id > 1).then(|| id - 1), T0 + id * 1000 * MS);
    }
    let opts = ReclaimOptions {
        policy: Policy::parse("5s:all").unwrap(),
        max_chain: 0,
        rate: None,
        codec: None,
        batch_merges: false,
        ..Default::default()
    };
    let reader = Store::open(&dir.join("s"), Access::Read).unwrap();
    assert!(reclaim(&reader, &opts, &[], &AtomicBool::new(false), &mut |_, _| {}).is_err());
    reclaim(&s, &opts, &[10], &AtomicBool::new(false), &mut |_, _| {}).unwrap();
    assert_eq!(s.ids().unwrap(), vec![10, 25, 26, 27, 28, 29, 30]);
    assert!(s.open_epoch(10).unwrap().header().is_full());
}

/// Content of page `gfn` as epoch `id` wrote it.
fn page_of(id: u64, gfn: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    for (i, b) in p.iter_mut().enumerate().step_by(512) {
        *b = (id.wrapping_mul(31) ^ gfn ^ i as u64) as u8;
    }
    p[..8].copy_from_slice(&id.to_le_bytes());
    p[8..16].copy_from_slice(&gfn.to_le_bytes());
    p
}

/// What a background reclaimer sees at 20 ms: a pass every 25 epochs over
/// a growing history, default policy, a 16-file limit. Every kept epoch
/// stays within the limit after each pass and restores what it was
/// written as, and folding copies a small multiple of what was written,
/// never the 16 MiB memory again and again (it used to make every
/// one-second epoch FULL).
#[test]
fn passes_at_20ms_keep_chains_short_and_copy_little() {
    const MEM: u64 = 4096;
    const N: u64 = 1500;
    let dir = common::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "reclaim-20ms");
    let s = Store::open_or_create(&dir.join("s")).unwrap();
    let mut rng = Rng(2020);
    let opts = ReclaimOptions {
        policy: Policy::default(),
        max_chain: 16,
        rate: None,
        codec: Some(Codec::None),
        batch_merges: true,
        ..Default::default()
    };
    // Which epoch last wrote each page, as of each epoch.
    let mut owner = vec![0u64; MEM as usize];
    let mut model: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let (mut written, mut full_rewrites) = (0u64, 0u64);
    for id in 1..=N {
        let meta = EpochMeta {
            id,
            parent: (id > 1).then(|| s.ids().unwrap().last().copied().unwrap()),
            mode: Mode::Cow,
            full: id == 1,
            created_ns: T0 + id * 20 * MS,
            vcpus: 1,
            mem_size: MEM * PAGE as u64,
            progress: Some(id),
            regions: Vec::new(),
        };
        let mut w = s.writer(meta).unwrap();
        w.write_state(b"s").unwrap();
        let gfns: Vec<u64> = if id == 1 {
            (0..MEM).collect()
        } else {
            let mut g: Vec<u64> = (0..2).map(|_| rng.below(MEM)).collect();
            g.sort_unstable();
            g.dedup();
            g
        };
        for &g in &gfns {
            w.data_pages(g, &page_of(id, g)).unwrap();
            owner[g as usize] = id;
        }
        written += gfns.len() as u64 * PAGE as u64;
        w.commit(id).unwrap();
        model.insert(id, owner.clone());
        if id % 25 == 0 {
            let before: Vec<u64> = s
                .ids()
                .unwrap()
                .into_iter()
                .filter(|&i| s.open_epoch(i).unwrap().header().is_full())
                .collect();
            reclaim(&s, &opts, &[], &AtomicBool::new(false), &mut |_, _| {}).unwrap();
            let kept = s.ids().unwrap();
            for &k in &kept {
                assert!(
                    chain_len(&s, k) <= 16,
                    "after epoch {id}: epoch {k} reads {} files",
                    chain_len(&s, k)
                );
                if k != 1 && s.open_epoch(k).unwrap().header().is_full() && !before.contains(&k) {
                    full_rewrites += 1;
                }
            }
            model.retain(|k, _| kept.contains(k) || *k > id);
        }
    }
    for id in s.ids().unwrap() {
        let chain = s.chain(id).unwrap();
        let want = &model[&id];
        let mut page = vec![0u8; PAGE];
        for run in plan(&chain).unwrap() {
            for i in 0..run.count {
                let gfn = run.gfn + i;
                match run.source {
                    Source::Data { epoch, page: p } => chain[epoch].read_pages(p + i, &mut page).unwrap(),
                    Source::Zero => panic!("epoch {id}: page {gfn} zero"),
                }
                assert_eq!(page, page_of(want[gfn as usize], gfn), "epoch {id} page {gfn}");
            }
        }
    }
    let ledger = Ledger::load(&dir.join("s")).unwrap().unwrap();
    // Merging alone copies about what was written once (every dropped
    // epoch's pages move into the next kept one) when a bucket merges at
    // once; folding adds a copy per level. Full rewrites of the 16 MiB
    // memory would add 16 MiB each. (2.2 times here; 3.4 times with
    // `batch_merges` off, whose merges grow at every pass.)
    assert!(
        ledger.bytes_written < 3 * written,
        "reclamation wrote {} bytes for {written} bytes of epochs ({} full rewrites)",
        ledger.bytes_written,
        full_rewrites
    );
    eprintln!(
        "reclamation wrote {} bytes for {written} bytes of epochs; {full_rewrites} epochs rewritten FULL",
        ledger.bytes_written
    );
    // A FULL rewrite happens only when the oldest kept epoch loses its
    // base: here twice, when the first second's epochs expire (the oldest
    // survivor, then the one-second epoch that outlives it). Every other
    // epoch built on an expiring base becomes a diff against a kept epoch
    // sharing an ancestor with it. (Before folding used levels, this run
    // made 33 FULL rewrites: every one-second epoch became FULL; with
    // levels and without those diffs, 5.)
    assert!(full_rewrites <= 2, "{full_rewrites} epochs rewritten FULL");
}

/// The image of a chain given as readers (newest first).
fn image_of(chain: &[store::EpochReader]) -> (Vec<u8>, Vec<u8>) {
    let mut mem = vec![0xeeu8; PAGES as usize * PAGE];
    for run in plan(chain).unwrap() {
        let dst = &mut mem[run.gfn as usize * PAGE..(run.gfn + run.count) as usize * PAGE];
        match run.source {
            Source::Zero => dst.fill(0),
            Source::Data { epoch, page } => chain[epoch].read_pages(page, dst).unwrap(),
        }
    }
    (chain[0].state().unwrap(), mem)
}

#[test]
fn merged_epochs_to_ship_restore_like_the_epoch_they_stand_for() {
    use std::os::fd::AsRawFd;
    let dir = common::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "merged-onto");
    let s = Store::open_or_create(&dir.join("s")).unwrap();
    let mut rng = Rng(0x5eed);
    for id in 1..=6u64 {
        write(&s, &mut rng, id, (id > 1).then(|| id - 1), T0 + id * 100 * MS);
    }
    let want = image(&s, 6);
    let files = |s: &Store| std::fs::read_dir(s.dir().join("epochs")).unwrap().count();
    let before = files(&s);
    for (codec, onto, parent) in [(Codec::Zstd, Some(2), Some(2)), (Codec::None, None, None)] {
        let d = store::merged_onto(&s, 6, |p| Some(p) == onto, codec).unwrap();
        assert_eq!(files(&s), before, "the merged epoch is not in the store");
        assert_eq!(
            (d.header.id, (!d.header.is_full()).then_some(d.header.parent)),
            (6, parent)
        );
        let stands_for: Vec<u64> = if parent.is_some() {
            vec![5, 4, 3]
        } else {
            vec![5, 4, 3, 2, 1]
        };
        assert_eq!(d.merged, stands_for);
        assert_eq!(d.header.merged, stands_for.len() as u64);
        assert_eq!(d.header.codec, codec);
        let path = format!("/proc/self/fd/{}", d.file.as_raw_fd());
        let r = store::EpochReader::open(std::path::Path::new(&path)).unwrap();
        assert_eq!(r.file_len(), d.len);
        let mut chain = vec![r];
        if let Some(p) = parent {
            chain.extend(s.chain(p).unwrap());
        }
        assert!(
            image_of(&chain) == want,
            "merged onto {parent:?} restores to another state"
        );
    }
}

/// The policy and --max-chain of a pass are in RECLAIM before it rewrites
/// or removes anything: a pass cut short at once (as by kill -9) leaves
/// them, so the next bare `compact` uses what the user asked for.
#[test]
fn the_policy_is_recorded_before_any_rewrite() {
    let dir = common::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "reclaim-policy-first");
    let s = Store::open_or_create(&dir.join("s")).unwrap();
    let mut rng = Rng(7);
    for id in 1..=20u64 {
        write(&s, &mut rng, id, (id > 1).then(|| id - 1), T0 + id * 100 * MS);
    }
    let files = s.ids().unwrap();
    let opts = ReclaimOptions {
        policy: Policy::parse("1s:all,1m:1s").unwrap(),
        max_chain: 5,
        rate: None,
        codec: None,
        batch_merges: false,
        ..Default::default()
    };
    // Stopped before its first rewrite.
    let pass = reclaim(&s, &opts, &[], &AtomicBool::new(true), &mut |_, _| {}).unwrap();
    assert_eq!((pass.rewrites, pass.merged, pass.dropped), (0, 0, 0));
    assert_eq!(s.ids().unwrap(), files, "nothing was removed");
    let ledger = Ledger::load(&dir.join("s")).unwrap().unwrap();
    assert_eq!((ledger.policy.as_str(), ledger.max_chain), ("1s:all,1m:1s", 5));
}

/// `max_store`: the oldest epochs the policy keeps go while the kept ones
/// would take more than the bound; the newest stays; what is kept still
/// restores as before; `usage` reports the size and the longest chain.
#[test]
fn max_store_evicts_the_oldest_kept_epochs() {
    let dir = common::TestDir::new(env!("CARGO_TARGET_TMPDIR"), "reclaim-max-store");
    let s = Store::open_or_create(&dir.join("s")).unwrap();
    let mut rng = Rng(11);
    for id in 1..=30u64 {
        write(&s, &mut rng, id, (id > 1).then(|| id - 1), T0 + id * 100 * MS);
    }
    let before = images(&s);
    let all = store::usage(&s).unwrap();
    assert_eq!((all.epochs, all.longest_chain), (30, 30));
    let cap = all.bytes / 3;
    let opts = ReclaimOptions {
        policy: Policy::keep_all(),
        max_chain: 0,
        max_store: Some(cap),
        ..ReclaimOptions::default()
    };
    let pass = reclaim(&s, &opts, &[], &AtomicBool::new(false), &mut |_, _| {}).unwrap();
    let kept = s.ids().unwrap();
    assert!(pass.evicted > 0 && kept.len() < 30, "{pass:?}");
    assert_eq!(kept.last(), Some(&30), "the newest stays");
    assert!(kept.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        *kept.first().unwrap(),
        30 - kept.len() as u64 + 1,
        "the oldest went first: {kept:?}"
    );
    for id in &kept {
        assert_eq!(image(&s, *id), before[id], "epoch {id}");
    }
    // A pass judges what merging will cost from file sizes; the next ones
    // correct it (a running store's reclaimer passes again at once while
    // over the bound).
    let mut after = store::usage(&s).unwrap();
    for _ in 0..4 {
        if after.bytes <= cap {
            break;
        }
        reclaim(&s, &opts, &[], &AtomicBool::new(false), &mut |_, _| {}).unwrap();
        after = store::usage(&s).unwrap();
    }
    assert!(after.bytes <= cap, "{after:?} against {cap}");
    assert_eq!(s.ids().unwrap().last(), Some(&30));
    assert_eq!(after.epochs, s.ids().unwrap().len() as u64);
    let last = s.ids().unwrap();
    for id in &last {
        assert_eq!(image(&s, *id), before[id], "epoch {id}");
    }
}
