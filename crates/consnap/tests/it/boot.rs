//! Booting the workload guest: every workload on 1 and 2 vCPUs gives the
//! checksum the host computes with the same workload code, run after run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;

fn run_workload(spec: &str, vcpus: u32, dir: &std::path::Path, tag: &str) -> serde_json::Value {
    let report = dir.join(format!("{tag}.json"));
    let out = run_ok(
        consnap()
            .args(["run", "--workload", spec, "--vcpus", &vcpus.to_string(), "--report"])
            .arg(&report),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r = read_report(&report);
    assert!(
        stdout.contains(&format!("checksum={}", r["checksum"].as_str().unwrap())),
        "serial output does not show the reported checksum:\n{stdout}"
    );
    r
}

fn check(spec: &str, vcpus: u32) {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir(&format!("boot-{}-{vcpus}", spec.replace([',', '='], "_")));
    let (ops, sum) = reference(spec, vcpus);
    let a = run_workload(spec, vcpus, &dir, "a");
    let b = run_workload(spec, vcpus, &dir, "b");
    for r in [&a, &b] {
        assert_eq!(r["status"], "poweroff");
        assert_eq!(r["exit_code"], 0);
        assert_eq!(r["guest_exit_code"], 0);
        assert_eq!(r["vcpus"], vcpus);
        assert_eq!(r["ops"], ops);
        assert_eq!(r["workload_errors"], 0);
        assert_eq!(
            r["checksum"],
            sum.as_str(),
            "guest and host reference disagree for {spec}"
        );
        assert!(r["wall_time_s"].as_f64().unwrap() > 0.0);
        assert!(r["pause"]["count"].as_u64().is_some());
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_1_vcpu() {
    check("memstress,wss=64M,ops=200000,seed=1", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memstress_2_vcpus() {
    check("memstress,wss=64M,ops=200000,seed=1,pattern=hotcold", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_1_vcpu() {
    check("build,wss=64M,ops=200", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn build_2_vcpus() {
    check("build,wss=64M,ops=200", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_1_vcpu() {
    check("ftp,wss=64M,ops=3000,chunk=32K", 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_2_vcpus_rate_limited() {
    check("ftp,wss=64M,ops=2000,rate=400M", 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn pause_figures_are_reported() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("pause-figures");
    let report = dir.join("r.json");
    // The rate limit makes the run last at least a second on any machine:
    // about a hundred probe and sample intervals of 10ms. The checks below
    // need a handful of each.
    run_ok(
        consnap()
            .args([
                "run",
                "--workload",
                "memstress,wss=32M,ops=10000,rate=5000",
                "--vcpus",
                "2",
            ])
            .args(["--pause-probe", "10ms", "--sample-interval", "10ms", "--report"])
            .arg(&report),
    );
    let r = read_report(&report);
    let pause = &r["pause"];
    assert!(pause["count"].as_u64().unwrap() >= 5, "{pause}");
    let (p50, p99, max) = (
        pause["p50_us"].as_f64().unwrap(),
        pause["p99_us"].as_f64().unwrap(),
        pause["max_us"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{pause}");
    let progress = r["progress"].as_array().unwrap();
    assert!(progress.len() >= 3, "too few progress samples: {progress:?}");
    let ops: Vec<u64> = progress.iter().map(|s| s[1].as_u64().unwrap()).collect();
    assert!(
        ops.windows(2).all(|w| w[0] <= w[1]),
        "progress must not go backwards: {ops:?}"
    );
    assert!(
        *ops.last().unwrap() <= r["ops"].as_u64().unwrap(),
        "progress beyond the final count: {ops:?}"
    );
    assert!(ops.iter().any(|&n| n > 0), "progress never moved: {ops:?}");
}
