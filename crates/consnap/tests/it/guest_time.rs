//! Guest time across a restore: the guest's clock continues from the
//! capture instant, so a rate-limited workload restored from an epoch keeps
//! its pace whether it is restored at once or long after the capture (it
//! must not run unthrottled to catch up with the host's clock).
//!
//! The checks are events, not durations: a paced guest that is ahead of its
//! rate asks consnap to idle (the idle port; the report's `vcpu_idle_s`),
//! and one behind it never does. How long runs take is a figure of
//! `consnap bench` (busy time of the paced workloads), not a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;

const VCPUS: u32 = 2;
/// memstress `rate` is pages per second per vCPU.
const RATE: u64 = 10_000;
const OPS: u64 = 80_000;
/// Restore the newest of these epochs (incremental ones) that leaves at
/// least 2 s of paced work: on a loaded machine the first epochs can come
/// late (each waits for the last to be durable).
const EPOCHS: std::ops::RangeInclusive<u64> = 2..=5;

/// Guest ops recorded in epoch `id` (`consnap ls --json`).
fn epoch_ops(snaps: &std::path::Path, id: u64) -> u64 {
    let out = consnap().args(["ls", "--json"]).arg(snaps).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("no epoch {id} in {rows}"));
    row["guest_ops"].as_u64().unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_delayed_restore_runs_as_long_as_an_immediate_one() {
    if !kvm_ready() {
        return;
    }
    let spec = format!("memstress,wss=32M,ops={OPS},rate={RATE}");
    let dir = tempdir("guest-time");
    let snaps = dir.join("snaps");
    run_and_kill(
        &[
            "run",
            "--workload",
            &spec,
            "--vcpus",
            &VCPUS.to_string(),
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--interval",
            "100ms",
        ],
        &snaps,
        6,
    );
    let seconds = |ops: u64| ops as f64 / (RATE * u64::from(VCPUS)) as f64;
    let left_by_epoch: Vec<(u64, u64)> = EPOCHS.map(|id| (id, OPS - epoch_ops(&snaps, id))).collect();
    let Some(&(epoch, left)) = left_by_epoch.iter().rev().find(|(_, ops)| seconds(*ops) >= 2.0) else {
        panic!("no epoch leaves 2 s of paced work (epoch, ops left): {left_by_epoch:?}");
    };
    let expected = seconds(left);

    let at = epoch.to_string();
    let now = restore(&snaps, &at, &[], &dir.join("now.json"));
    // Longer than the paced work left: a guest clock that jumped by the
    // delay would leave the guest behind its pace for all of its work.
    let delay = Duration::from_secs_f64(expected + 1.0);
    std::thread::sleep(delay);
    let later = restore(&snaps, &at, &[], &dir.join("later.json"));

    let reference = reference(&spec, VCPUS).1;
    let (t_now, t_later) = (
        now["wall_time_s"].as_f64().unwrap(),
        later["wall_time_s"].as_f64().unwrap(),
    );
    eprintln!(
        "{left} ops left, {expected:.2}s expected; restored at once: {t_now:.2}s, {delay:.1?} later: {t_later:.2}s"
    );
    for r in [&now, &later] {
        assert_eq!(r["status"], "poweroff", "{r}");
        assert_eq!(r["checksum"], reference.as_str(), "{r}");
    }
    // Both restored guests were ahead of their pace at some point, so their
    // clock did not jump by the delay (nor, at once, by the time since the
    // capture).
    assert!(
        now["vcpu_idle_s"].as_f64().unwrap() > 0.0,
        "restored at once, the guest never idled: it ran behind its pace\n{now}"
    );
    assert!(
        later["vcpu_idle_s"].as_f64().unwrap() > 0.0,
        "restored {delay:?} later, the guest never idled: its clock jumped by the delay\n{later}"
    );
}

/// A rate-limited guest that is ahead of its rate sleeps through the idle
/// port instead of spinning (the report counts the time its vCPU threads
/// slept), and keeps its checksum. How much CPU it saves is a figure of
/// `consnap bench` (busy time of memstress-moderate), not a test.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_rate_limited_guest_idles() {
    if !kvm_ready() {
        return;
    }
    let spec = format!("memstress,wss=32M,ops={},rate={RATE}", 2 * RATE * u64::from(VCPUS));
    let dir = tempdir("guest-idle");
    let report = dir.join("r.json");
    let r = run_ok(
        consnap()
            .args([
                "run",
                "--workload",
                &spec,
                "--vcpus",
                &VCPUS.to_string(),
                "--interval",
                "50ms",
            ])
            .arg("--snapshot-dir")
            .arg(dir.join("snaps"))
            .arg("--report")
            .arg(&report),
    );
    drop(r);
    let r = read_report(&report);
    let (ops, sum) = reference(&spec, VCPUS);
    assert_eq!(r["checksum"], sum.as_str());
    assert_eq!(r["ops"], ops);
    let wall = r["wall_time_s"].as_f64().unwrap();
    let cpu = r["vcpu_cpu_s"].as_f64().unwrap();
    let idle = r["vcpu_idle_s"].as_f64().unwrap();
    eprintln!("{VCPUS} rate-limited vCPUs: {wall:.2} s wall, {cpu:.2} s CPU, {idle:.2} s idle");
    assert!(idle > 0.0, "the rate-limited vCPUs never idled: they spin\n{r}");
    // The vCPUs' run lies inside the command's time (each vCPU's), and
    // holds their idling.
    let run = r["vcpu_run_s"].as_f64().unwrap();
    assert!(
        run <= wall * VCPUS as f64 && run >= idle,
        "vcpu_run_s {run} against wall {wall}, idle {idle}\n{r}"
    );
}
