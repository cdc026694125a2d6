//! Crash safety of the store: kill -9 at random moments while epochs are
//! written and reclaimed in the background, and while `consnap compact`
//! runs; 16 kills (more with `CONSNAP_KILL_ROUNDS`). After each kill the
//! store verifies, and every epoch present restores to exactly the memory
//! it restored to whenever it was seen before; at the end the latest and a
//! random retained epoch run to the checksum of an uninterrupted run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
use crate::store_support;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use store_support::*;

/// Rate-limited memstress lasting 30 s of guest time: a write round runs
/// the guest until its first epoch, then up to 0.7 s more: about 0.4 s on
/// an idle machine and 0.85 s under `stress-ng --cpu 2` (the saver, at low
/// priority, then commits an epoch every 0.45 s or so), so 16 rounds (14 s
/// at that) end well before it does; the final restores run what is left,
/// idling between ops (they ran 70 s with 75 s of work, holding one of the
/// suite's two test threads).
const SPEC: &str = "memstress,wss=8M,ops=600000,rate=20000,pattern=hotcold";

/// What an epoch's restore reads: (inode, size, mtime) of every file of
/// its chain. A rebase or fold rewrites a file under a new inode.
fn chain_files(store: &store::Store, id: u64) -> Vec<(u64, u64, i128)> {
    use std::os::unix::fs::MetadataExt;
    store
        .chain(id)
        .unwrap_or_else(|e| panic!("epoch {id} has no chain: {e}"))
        .iter()
        .map(|e| {
            let m = e.file().unwrap().metadata().unwrap();
            (
                m.ino(),
                m.size(),
                i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            )
        })
        .collect()
}

/// Check the store after a kill: it verifies (leftover temporary files
/// allowed), and every epoch restores to the memory it had when first
/// seen. An epoch is digested again only when a file of its chain changed
/// since it was last digested (merged, folded or new), which keeps each
/// check proportional to what reclamation did.
fn check(snaps: &std::path::Path, seen: &mut Seen, what: &str) {
    let t = std::time::Instant::now();
    let v = store::verify(snaps, &mut |_, _| {}).unwrap();
    let verified = t.elapsed();
    let mut digested = 0;
    assert!(v.problems.is_empty(), "{what}: {:?}", v.problems);
    let store = store::Store::open(snaps, store::Access::Read).unwrap();
    let present = store.ids().unwrap();
    for &id in &present {
        let files = chain_files(&store, id);
        if seen.get(&id).is_some_and(|(_, f)| *f == files) {
            continue;
        }
        let d = digest(snaps, id).unwrap_or_else(|e| panic!("{what}: epoch {id} does not restore: {e}"));
        digested += 1;
        let first = seen.entry(id).or_insert((d, files.clone()));
        assert_eq!(
            d, first.0,
            "{what}: epoch {id} restores to different memory than before"
        );
        first.1 = files;
    }
    eprintln!(
        "{what}: {} epochs verified in {verified:.1?}, {digested} digested, {:.1?} in all",
        present.len(),
        t.elapsed()
    );
}

/// Per epoch: the digest first seen, and the chain files last digested.
type Seen = BTreeMap<u64, (u64, Vec<(u64, u64, i128)>)>;

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kill_9_while_writing_and_while_compacting() {
    if !kvm_ready() {
        return;
    }
    let rounds: u64 = std::env::var("CONSNAP_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let mut rng = Rng(seed());
    let dir = tempdir("store-kill");
    let snaps = dir.join("snaps");
    let s = snaps.to_str().unwrap().to_string();
    let mut seen = BTreeMap::new();
    let session = |retain: &'static str| -> Vec<String> {
        [
            "--snapshot-dir",
            &s,
            "--interval",
            "20ms",
            "--pause-probe",
            "0",
            "--retain",
            retain,
            "--max-chain",
            "5",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let write_round = |rng: &mut Rng, retain: &'static str, first: bool| {
        let mut args: Vec<String> = if first {
            ["run", "--workload", SPEC, "--mem", "32M"]
                .iter()
                .map(|x| x.to_string())
                .collect()
        } else {
            vec!["restore".into(), s.clone(), "--at".into(), "latest".into()]
        };
        args.extend(session(retain));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let before = epoch_count(&snaps);
        let child = start_until_epochs(&args, &snaps, before + 1);
        sleep_ms(rng.below(700));
        let out = child.stop(libc::SIGKILL);
        assert_killed(&out, libc::SIGKILL, &args);
    };
    // Writing, with the background reclaimer busy merging and folding.
    let policy = "200ms:all,2s:100ms,1m:400ms";
    for round in 0..rounds / 2 {
        write_round(&mut rng, policy, round == 0);
        check(&snaps, &mut seen, &format!("after kill {round} while writing"));
    }
    // Compacting: each round gets fresh epochs to merge (written without
    // reclamation), then compact is killed part-way.
    for round in rounds / 2..rounds {
        write_round(&mut rng, "all", false);
        check(&snaps, &mut seen, &format!("before kill {round}"));
        let coarse = ["1s:all,1m:500ms", "300ms:all,1m:200ms", "2s:all,1m:1s"][(round % 3) as usize];
        let child = spawn(consnap().args(["compact", &s, "--retain", coarse, "--max-chain", "3"]));
        sleep_ms(rng.below(120));
        drop(child.stop(libc::SIGKILL));
        check(&snaps, &mut seen, &format!("after kill {round} while compacting"));
    }
    // What remains runs to the checksum of an uninterrupted run.
    let (ops, sum) = reference(SPEC, 1);
    let all = ids(&snaps);
    let chosen = [*all.last().unwrap(), all[rng.below(all.len() as u64) as usize]];
    for (id, r) in restore_each(&snaps, &chosen, &dir, chosen.len()) {
        assert_eq!(r["ops"], ops, "epoch {id}");
        assert_eq!(r["checksum"], sum.as_str(), "epoch {id} diverged");
    }
}
