//! Crash safety of the store: kill -9 at random moments while epochs are
//! written and reclaimed in the background, and while `consnap compact`
//! runs; 50 kills (more with `CONSNAP_KILL_ROUNDS`). After each kill the
//! store verifies, and every epoch present restores to exactly the memory
//! it restored to whenever it was seen before; at the end the latest and a
//! random retained epoch run to the checksum of an uninterrupted run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod store_support;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use store_support::*;

/// Rate-limited memstress lasting about 90 s of guest time, far longer
/// than all rounds together.
const SPEC: &str = "memstress,wss=8M,ops=1800000,rate=20000,pattern=hotcold";

/// Check the store after a kill: it verifies (leftover temporary files
/// allowed), and every epoch restores to the memory it had when first seen.
fn check(snaps: &std::path::Path, seen: &mut BTreeMap<u64, u64>, what: &str) {
    let v = store::verify(snaps, &mut |_, _| {}).unwrap();
    assert!(v.problems.is_empty(), "{what}: {:?}", v.problems);
    for id in ids(snaps) {
        let d = digest(snaps, id).unwrap_or_else(|e| panic!("{what}: epoch {id} does not restore: {e}"));
        let first = *seen.entry(id).or_insert(d);
        assert_eq!(d, first, "{what}: epoch {id} restores to different memory than before");
    }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn kill_9_while_writing_and_while_compacting() {
    if !kvm_ready() {
        return;
    }
    let rounds: u64 = std::env::var("CONSNAP_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
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
    let handles: Vec<_> = chosen
        .iter()
        .map(|&id| {
            let snaps = snaps.clone();
            let report = dir.join(format!("restore-{id}.json"));
            std::thread::spawn(move || (id, restore(&snaps, &id.to_string(), &[], &report)))
        })
        .collect();
    for h in handles {
        let (id, r) = h.join().unwrap();
        assert_eq!(r["ops"], ops, "epoch {id}");
        assert_eq!(r["checksum"], sum.as_str(), "epoch {id} diverged");
    }
}
