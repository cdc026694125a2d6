//! Off-host epochs against a 3-node Garage cluster (replication factor 3),
//! each node in its own network namespace: replication goes on when a node
//! dies and when the replicating host's network is cut (the backlog grows,
//! then drains, nothing lost), restores go on when a node dies during
//! them, and a VM restores on another host (a namespace of its own with an
//! empty directory) to the uninterrupted checksum.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use crate::common::*;
use crate::garage_support::S3;
use crate::garage_support::cluster::Cluster;

/// Rate-limited memstress lasting about 20 s.
const LONG: &str = "memstress,wss=16M,ops=120000,rate=6000,pattern=hotcold";

/// The replicating run's retention policy: every epoch for 2 s, then one
/// per 100 ms (the interval: as the default policy at 1 s, the epochs it
/// keeps past 2 s are not rewritten when they leave the first tier).
const POLICY: &str = "2s:all,1m:100ms";

/// `GET /stats`'s `replication`, or null while the API is not up.
fn replication(sock: &Path) -> serde_json::Value {
    let out = output(consnap().arg("ctl").arg("--sock").arg(sock).args(["--json", "stats"]));
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["replication"].clone()
}

fn newest(sock: &Path) -> u64 {
    replication(sock)["newest_epoch"].as_u64().unwrap_or(0)
}

#[test]
#[cfg_attr(
    any(no_kvm, no_garage, no_netns),
    ignore = "needs /dev/kvm, Garage and netns (root, ip)"
)]
fn replication_to_a_cluster_rides_out_a_dead_node_and_a_cut_network() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("cluster-replicate");
    let Some(mut cl) = Cluster::start(&dir.join("cluster")) else {
        return;
    };
    let (ops, sum) = reference(LONG, 1);
    let snaps = dir.join("snaps");
    let sock = dir.join("api.sock");
    let report = dir.join("run.json");
    let url = cl.url("vm");
    let mut cmd = cl.consnap(0);
    cmd.args(["run", "--workload", LONG, "--mem", "64M", "--snapshot-dir"])
        .arg(&snaps)
        .args(["--interval", "100ms", "--pause-probe", "0", "--retain", POLICY])
        .args(["--replicate", &url, "--report"])
        .arg(&report)
        .arg("--api-sock")
        .arg(&sock);
    let mut child = spawn(&mut cmd);
    child.wait_for("5 epochs off-host", |_| newest(&sock) >= 5);
    // One node of three dies: writes still reach a quorum.
    cl.kill(2);
    let at_kill = newest(&sock);
    child.wait_for("10 more epochs off-host with a node dead", |_| {
        newest(&sock) >= at_kill + 10
    });
    // The replicating host loses its network for longer than replication
    // lets a backlog wait (5 s): snapshots go on locally.
    cl.link(0, false);
    child.wait_for("replication 6 s behind while cut off", |_| {
        replication(&sock)["lag_s"].as_f64().is_some_and(|l| l >= 6.0)
    });
    let cut = replication(&sock);
    let up = cut["newest_epoch"].as_u64().unwrap();
    let waiting = crate::store_support::ids(&snaps)
        .into_iter()
        .filter(|&i| i > up)
        .count();
    assert!(
        waiting >= 15,
        "the backlog did not grow while cut off: {waiting} epochs, {cut}"
    );
    // Back on the network: the backlog drains while the guest runs.
    cl.link(0, true);
    let at_heal = crate::store_support::ids(&snaps).last().copied().unwrap();
    child.wait_for("the backlog to drain", |_| newest(&sock) >= at_heal);
    let out = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_report(&report);
    let rep = &r["replication"];
    let local = crate::store_support::ids(&snaps);
    assert_eq!(rep["newest_epoch"].as_u64(), local.last().copied(), "{rep}");
    assert_eq!(rep["backlog_epochs"], 0, "{rep}");
    // Long behind after the cut: the backlog went up as a merged epoch
    // standing for a run of local ones (every local epoch is off-host or
    // stood for). Once caught up, those the policy keeps past its 2 s of
    // every epoch went up too: only younger ones, or ones waiting to be
    // merged locally, may stay local only.
    let (remote, covered) = (
        rep["remote_epochs"].as_u64().unwrap(),
        rep["covered_epochs"].as_u64().unwrap(),
    );
    assert!(rep["merged_uploads"].as_u64().unwrap() >= 1, "{rep}");
    assert_eq!(remote + covered, local.len() as u64, "{rep}");
    // Another host, nothing local, one node still dead: the remote epochs
    // are local ones, each restorable; the newest restores eagerly and a
    // middle one lazily, both to the uninterrupted checksum.
    let other = cl.host(1);
    let listed = other.ls(&url, &[]);
    let ids: Vec<u64> = listed.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len() as u64, remote);
    assert!(ids.iter().all(|i| local.contains(i)), "{ids:?} not all in {local:?}");
    let times = crate::store_support::times(&snaps);
    let policy = store::Policy::parse(POLICY).unwrap();
    let kept = policy.retained(&times);
    let newest_t = times.iter().map(|&(_, t)| t).max().unwrap();
    let settled: Vec<u64> = times
        .iter()
        .filter(|&&(id, t)| kept.contains(&id) && newest_t - t >= policy.settle_ns())
        .map(|&(id, _)| id)
        .collect();
    assert!(settled.len() >= 10, "{times:?}");
    let missing: Vec<&u64> = settled.iter().filter(|i| !ids.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "kept past 2 s but local only: {missing:?} ({ids:?})"
    );
    assert!(listed.iter().all(|r| r["restorable"] == true), "{listed:?}");
    let r = other.restore(&url, &dir.join("host1-cache"), &dir.join("restore.json"), &[]);
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "{r}"
    );
    let middle = ids[ids.len() / 2].to_string();
    let r = other.restore_lazy(
        &url,
        &dir.join("host1-home"),
        &dir.join("lazy.json"),
        &["--at", &middle],
    );
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "lazy: {r}"
    );
}

/// All-out memstress over 96 MiB, several seconds (several epochs even
/// when the first, full one is slow to save on a loaded machine).
const BIG: &str = "memstress,wss=96M,ops=16000000";

/// A cluster holding a replicated run of [`BIG`]: the cluster, the local
/// store's epoch ids and the remote store's URL.
fn replicated_big(dir: &Path) -> Option<(Cluster, Vec<u64>, String)> {
    let cl = Cluster::start(&dir.join("cluster"))?;
    let snaps = dir.join("snaps");
    let url = cl.url("big");
    let mut cmd = cl.consnap(0);
    cmd.args(["run", "--workload", BIG, "--mem", "160M", "--snapshot-dir"])
        .arg(&snaps)
        .args(["--mode", "cow", "--interval", "200ms", "--pause-probe", "0"])
        .args(["--retain", "all", "--replicate", &url]);
    run_ok(&mut cmd);
    let local = crate::store_support::ids(&snaps);
    assert!(local.len() >= 3, "{local:?}");
    Some((cl, local, url))
}

#[test]
#[cfg_attr(
    any(no_kvm, no_garage, no_netns),
    ignore = "needs /dev/kvm, Garage and netns (root, ip)"
)]
fn an_eager_restore_from_a_cluster_goes_on_when_a_node_dies() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("cluster-eager");
    let (ops, sum) = reference(BIG, 1);
    let Some((mut cl, _, url)) = replicated_big(&dir) else {
        return;
    };
    // On another host: a node dies while the chain downloads.
    let cache = dir.join("host1-cache");
    let report = dir.join("restore.json");
    let mut cmd = cl.consnap(1);
    cmd.args(["restore", &url, "--pause-probe", "0", "--cache"])
        .arg(&cache)
        .arg("--report")
        .arg(&report);
    let mut child = spawn(&mut cmd);
    child.wait_for("the download under way", |_| {
        std::fs::read_dir(cache.join("epochs")).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-fetch-"))
        })
    });
    cl.kill(1);
    let out = child.wait();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cl.logs()
    );
    let r = read_report(&report);
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "{r}"
    );
}

#[test]
#[cfg_attr(
    any(no_kvm, no_garage, no_netns),
    ignore = "needs /dev/kvm, Garage and netns (root, ip)"
)]
fn a_lazy_restore_from_a_cluster_goes_on_when_a_node_dies() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("cluster-lazy");
    let (ops, sum) = reference(BIG, 1);
    let Some((mut cl, _, url)) = replicated_big(&dir) else {
        return;
    };
    // From a middle epoch of the remote store (replication may have
    // shipped merged epochs), on another host: a node dies while pages
    // come in.
    let sock = dir.join("lazy.sock");
    let report = dir.join("lazy.json");
    let remote = cl.host(1).ls(&url, &[]);
    let at = &remote[remote.len() / 2];
    let (middle, from_ops) = (at["id"].as_u64().unwrap(), at["guest_ops"].as_u64().unwrap());
    let mut cmd = cl.consnap(1);
    cmd.args([
        "restore",
        &url,
        "--lazy",
        "--at",
        &middle.to_string(),
        "--pause-probe",
        "0",
        "--report",
    ])
    .arg(&report)
    .arg("--api-sock")
    .arg(&sock);
    let started = std::time::Instant::now();
    let mut child = spawn(&mut cmd);
    child.wait_for("the restored guest at work", |_| {
        guest_ops(&sock).is_some_and(|o| o > from_ops)
    });
    cl.kill(2);
    let killed_s = started.elapsed().as_secs_f64();
    let out = child.wait();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cl.logs()
    );
    let r = read_report(&report);
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "lazy: {r}"
    );
    let lazy = &r["restored_from"]["lazy"];
    assert!(lazy["fill_pages"].as_u64().unwrap() > 0, "{r}");
    // The node died while pages were still coming in.
    let resident = lazy["resident_s"].as_f64().unwrap();
    assert!(
        resident > killed_s,
        "every page was in at {resident} s, before the node died at {killed_s} s"
    );
}
