//! Every byte of a store matters: 400 bytes flipped (more with `CONSNAP_FLIPS`) one at a time across
//! all its files (STORE, RECLAIM, epochs compressed and not, merged and
//! folded). Each flip is found by `verify`; a restore of an epoch fails
//! exactly when the flip is in something that restore reads (and names
//! the file), and otherwise restores to exactly the same memory; the
//! store's verdict (`store::assess`, behind ls, verify, inspect and
//! restore's suggestion) agrees with the restore every time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
use crate::store_support;

use common::*;
use store_support::*;

/// A store with epochs in both codecs, merged and folded ones, and RECLAIM.
fn mixed_store(dir: &std::path::Path) -> std::path::PathBuf {
    let snaps = dir.join("snaps");
    let s = snaps.to_str().unwrap();
    let spec = "memstress,wss=2M,ops=2000000,rate=20000,pattern=hotcold";
    let common = ["--interval", "30ms", "--pause-probe", "0", "--retain", "all"];
    let mut a = vec![
        "run",
        "--workload",
        spec,
        "--mem",
        "16M",
        "--snapshot-dir",
        s,
        "--compress",
        "lz4",
    ];
    a.extend(common);
    run_and_kill(&a, &snaps, 6);
    let n = epoch_count(&snaps);
    let mut b = vec!["restore", s, "--snapshot-dir", s, "--compress", "none"];
    b.extend(common);
    run_and_kill(&b, &snaps, n + 6);
    run_ok(consnap().args([
        "compact",
        s,
        "--retain",
        "all",
        "--max-chain",
        "4",
        "--compress",
        "zstd",
    ]));
    snaps
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn four_hundred_flipped_bytes_are_all_detected() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("flips");
    let snaps = mixed_store(&dir);
    let flips: u64 = std::env::var("CONSNAP_FLIPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let mut rng = Rng(seed());
    let ids = ids(&snaps);
    let good: Vec<(u64, u64)> = ids.iter().map(|id| (*id, digest(&snaps, *id).unwrap())).collect();
    let needs: Vec<_> = ids.iter().map(|id| needed(&snaps, *id)).collect();
    let files = files(&snaps);
    let sizes: Vec<u64> = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).collect();
    let total: u64 = sizes.iter().sum();
    let codecs: std::collections::BTreeSet<String> = ls(&snaps)
        .iter()
        .map(|e| e["compression"].as_str().unwrap().to_string())
        .collect();
    assert!(codecs.len() >= 2, "both compressed and plain epochs: {codecs:?}");
    let (mut restores_failed, mut restores_ok) = (0, 0);
    for n in 0..flips {
        // Most flips anywhere; a third inside the first page of a file and
        // its tables, where the metadata is.
        let (file, offset) = if n % 3 == 0 {
            let i = rng.below(files.len() as u64) as usize;
            (i, rng.below(sizes[i].min(4096 + 512)))
        } else {
            let mut at = rng.below(total);
            let mut i = 0;
            while at >= sizes[i] {
                at -= sizes[i];
                i += 1;
            }
            (i, at)
        };
        let path = &files[file];
        let original = std::fs::read(path).unwrap();
        let mut bad = original.clone();
        bad[offset as usize] ^= (rng.below(255) + 1) as u8;
        std::fs::write(path, &bad).unwrap();
        let what = format!("flip {n}: byte {offset} of {}", path.display());
        // verify finds it and names the file (a damaged STORE makes the
        // directory no store at all).
        match store::verify(&snaps, &mut |_, _| {}) {
            Ok(v) => assert!(
                v.problems.iter().any(|p| p.path == *path),
                "{what}: verify found nothing: {:?}",
                v.problems
            ),
            Err(e) => assert!(path.ends_with("STORE"), "{what}: {e}"),
        }
        if n % 100 == 0 {
            let out = output(consnap().arg("verify").arg(&snaps));
            assert_eq!(out.status.code(), Some(1), "{what}");
            let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            assert!(
                text.contains(path.file_name().unwrap().to_str().unwrap()),
                "{what}: {text}"
            );
        }
        // The store's verdict (what ls, verify, inspect and restore's
        // suggestion use) must match what a restore does, epoch by epoch.
        let health = store::Store::open(&snaps, store::Access::Read)
            .ok()
            .and_then(|s| store::assess(&s, store::Depth::Pages, &mut |_, _| {}).ok());
        let verdict = |id: u64| {
            health
                .as_ref()
                .and_then(|h| h.epochs.get(&id))
                .map(|v| matches!(v, store::Verdict::Restores { .. }))
        };
        for (k, (id, sum)) in good.iter().enumerate() {
            let must_fail = path.ends_with("STORE") || is_needed(&needs[k], path, offset);
            let touches_chain = needs[k].contains_key(path);
            if !touches_chain && !must_fail && n % 10 != 0 {
                continue;
            }
            match digest(&snaps, *id) {
                Ok(d) => {
                    assert!(!must_fail, "{what}: restore of epoch {id} did not notice");
                    assert_eq!(
                        verdict(*id),
                        Some(true),
                        "{what}: epoch {id} restores, but the store says not"
                    );
                    assert_eq!(d, *sum, "{what}: epoch {id} restored to different memory");
                    restores_ok += 1;
                }
                Err(e) => {
                    assert!(must_fail, "{what}: restore of epoch {id} failed needlessly: {e}");
                    assert_ne!(
                        verdict(*id),
                        Some(true),
                        "{what}: the store says epoch {id} restores: {e}"
                    );
                    if !path.ends_with("STORE") {
                        assert!(e.contains(path.to_str().unwrap()), "{what}: {e}");
                    }
                    restores_failed += 1;
                }
            }
        }
        std::fs::write(path, &original).unwrap();
    }
    eprintln!("{flips} flips: {restores_failed} restores refused, {restores_ok} restored exactly");
    assert!(restores_failed > 0 && restores_ok > 0);
    let v = store::verify(&snaps, &mut |_, _| {}).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}
