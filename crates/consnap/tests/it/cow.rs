//! Copy-on-write epochs (`--mode cow`) end to end: snapshots every 20 ms,
//! a SIGKILL at a random moment, then the latest committed epoch and 20
//! (build: 8) randomly chosen ones each restored and run to the end with
//! the checksum of an uninterrupted run (memstress: every epoch's memory
//! checked by `verify --workload` too); and the message a host without
//! userfaultfd support gets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::*;

/// Workloads that last several seconds: memstress 20 s on any machine (it
/// is rate-limited and idles between ops, so a long run costs little CPU,
/// and its 21 restores run at once), build about three and five here (it
/// is CPU-bound, so every restore of it costs what is left of it in CPU).
/// On a 2-core host kept busy by other processes the saver, at a lower
/// priority than everything else, commits an epoch every 0.5 s or so
/// (measured under `stress-ng --cpu 2`), so 21 epochs may take 10 s.
fn spec(workload: &str, vcpus: u32) -> String {
    match workload {
        "memstress" => format!(
            "memstress,wss=32M,ops={},rate=10000,pattern=random",
            200_000 * u64::from(vcpus)
        ),
        "build" => format!("build,wss=32M,ops={}", if vcpus == 1 { 5_000 } else { 12_000 }),
        _ => unreachable!(),
    }
}

/// `pause_copy`: `--cow-pause-copy`, so that hot blocks copied in the
/// pause are checked too.
fn random_kill(workload: &str, vcpus: u32, pause_copy: &str) {
    if !kvm_ready() {
        return;
    }
    let seed = seed();
    let mut rng = Rng(seed);
    let spec = spec(workload, vcpus);
    let (ops, sum) = reference(&spec, vcpus);
    let dir = tempdir(&format!("cow-kill-{workload}-{vcpus}"));
    let snaps = dir.join("snaps");
    let args = [
        "run",
        "--workload",
        &spec,
        "--vcpus",
        &vcpus.to_string(),
        "--snapshot-dir",
        snaps.to_str().unwrap(),
        "--mode",
        "cow",
        "--interval",
        "20ms",
        "--cow-pause-copy",
        pause_copy,
        "--pause-probe",
        "0",
    ];
    // At least 21 epochs, then a random moment within the next 0.4 s.
    let child = start_until_epochs(&args, &snaps, 21);
    let extra = Duration::from_millis(rng.next_u64() % 400);
    let t = Instant::now();
    while t.elapsed() < extra {
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.stop(libc::SIGKILL);
    assert_killed(&out, libc::SIGKILL, &args);

    let epochs = ls(&snaps);
    let ids: Vec<u64> = epochs.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(ids.len() >= 21, "{epochs:?}");
    assert!(epochs.iter().all(|e| e["mode"] == "cow"), "{epochs:?}");
    if workload == "memstress" {
        // Every epoch, word by word against the host's memstress at the op
        // count the epoch holds (and the count read at its capture).
        let out = run_ok(consnap().args(["verify", "--workload"]).arg(&snaps));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("no problems"), "{text}");
    } else {
        let out = output(consnap().args(["verify", "--workload"]).arg(&snaps));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("only memstress"), "{err}");
    }
    // Every memstress epoch was checked word by word above, so its 21
    // restores cost little (it idles); build's are CPU-bound (each runs
    // what is left of it), and 9 of them are what the suite can afford.
    let restores = if workload == "memstress" { 21 } else { 9 };
    let mut chosen = vec![*ids.last().unwrap()];
    while chosen.len() < restores {
        let id = ids[(rng.next_u64() % ids.len() as u64) as usize];
        if !chosen.contains(&id) {
            chosen.push(id);
        }
    }
    // Two restores of the CPU-bound build at a time (the machine has two
    // cores); memstress is rate-limited and idles between its ops, so all.
    let at_once = if workload == "memstress" { 21 } else { 2 };
    for (id, r) in restore_each(&snaps, &chosen, &dir, at_once) {
        assert_eq!(r["status"], "poweroff", "epoch {id}: {r}");
        assert_eq!(r["ops"], ops, "epoch {id}");
        assert_eq!(r["workload_errors"], 0, "epoch {id}");
        assert_eq!(
            r["checksum"],
            sum.as_str(),
            "restore of cow epoch {id} diverged ({workload}, {vcpus} vCPUs, seed {seed})"
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_killed_at_random_1_vcpu() {
    random_kill("memstress", 1, "0ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_killed_at_random_2_vcpus() {
    random_kill("memstress", 2, "1ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_killed_at_random_1_vcpu() {
    random_kill("build", 1, "0ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_killed_at_random_2_vcpus() {
    random_kill("build", 2, "1ms");
}

/// Without kernel-mode userfaultfd (an unprivileged user, with
/// vm.unprivileged_userfaultfd = 0 and /dev/userfaultfd root-only), `run`
/// says what is missing, how to fix it, and that stop-copy works; before
/// any VM starts.
#[test]
#[cfg_attr(
    any(no_root, no_uffd_limited),
    ignore = "needs root and vm.unprivileged_userfaultfd=0"
)]
fn a_host_without_userfaultfd_is_told_what_is_missing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vmm::testing::missing("root", "to run consnap as another user");
    }
    let unprivileged = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if unprivileged.trim() != "0" {
        vmm::testing::missing(
            "vm.unprivileged_userfaultfd=0",
            format!("it is {}, so any user may create one", unprivileged.trim()),
        );
    }
    let dir = tempdir("cow-host");
    let snaps = dir.join("snaps");
    let out = output(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_consnap"))
            .args([
                "run",
                "--workload",
                "memstress,ops=10",
                "--mode",
                "cow",
                "--snapshot-dir",
            ])
            .arg(&snaps),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for needle in [
        "--mode cow cannot run on this host",
        "userfaultfd",
        "CAP_SYS_PTRACE",
        "/dev/userfaultfd",
        "vm.unprivileged_userfaultfd=1",
        "--mode stop-copy works without it",
    ] {
        assert!(err.contains(needle), "missing '{needle}' in:\n{err}");
    }
    assert_eq!(err.lines().count(), 1, "one line:\n{err}");
    assert!(!snaps.exists(), "nothing may be created before the check");
}
