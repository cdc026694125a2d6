//! Off-host epochs (`--replicate s3://...`) against a real object store (a
//! single-node Garage): a replicated VM restores on "another host" (an
//! empty directory, the local store gone) to the uninterrupted checksum,
//! the remote store mirrors the local one, and a wrong key or bucket is
//! refused in one clear line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
use crate::garage_support;
use crate::store_support;

use common::*;
use garage_support::{Garage, S3};

/// Rate-limited memstress lasting about 6 s.
const SPEC: &str = "memstress,wss=16M,ops=36000,rate=6000,pattern=hotcold";

fn run_args<'a>(snaps: &'a str, url: &'a str) -> Vec<&'a str> {
    run_spec(SPEC, snaps, url)
}

fn run_spec<'a>(spec: &'a str, snaps: &'a str, url: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--workload",
        spec,
        "--mem",
        "64M",
        "--snapshot-dir",
        snaps,
        "--interval",
        "100ms",
        "--pause-probe",
        "0",
        "--retain",
        "all",
        "--replicate",
        url,
    ]
}

#[test]
#[cfg_attr(any(no_kvm, no_garage), ignore = "needs /dev/kvm and Garage")]
fn a_replicated_vm_restores_on_another_host() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("replicate");
    let Some(garage) = Garage::start(&dir.join("garage")) else {
        return;
    };
    let (ops, sum) = reference(SPEC, 1);
    // A run stopped cleanly: everything it committed is off-host at the end.
    let snaps = dir.join("snaps");
    let url = garage.url("vm1");
    let report = dir.join("run.json");
    let sock = dir.join("api.sock");
    let mut args = run_args(snaps.to_str().unwrap(), &url);
    args.extend([
        "--report",
        report.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let mut cmd = consnap();
    garage.env(cmd.args(&args));
    let mut child = spawn(&mut cmd);
    child.wait_for("10 committed epochs", |_| epoch_count(&snaps) >= 10);
    // The control API gives the replication lag while it runs.
    let out = run_ok(consnap().arg("ctl").arg("--sock").arg(&sock).args(["--json", "stats"]));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let live = &stats["replication"];
    assert_eq!(live["url"], url.as_str(), "{stats}");
    assert!(
        live["newest_epoch"].as_u64().is_some() && live["lag_s"].as_f64().unwrap() < 30.0,
        "{stats}"
    );
    stop_term(child, &args);
    let r = read_report(&report);
    let rep = &r["replication"];
    let local = store_support::ids(&snaps);
    assert_eq!(rep["newest_epoch"].as_u64(), local.last().copied(), "{rep}");
    // Every local epoch is off-host, or stood for by a merged epoch if
    // replication ever fell a second behind (a loaded machine).
    let covered = rep["covered_epochs"].as_u64().unwrap();
    assert_eq!(
        rep["remote_epochs"].as_u64(),
        Some(local.len() as u64 - covered),
        "{rep}"
    );
    assert_eq!(rep["backlog_epochs"], 0, "{rep}");
    assert!(rep["error"].is_null(), "{rep}");
    assert!(rep["uploaded_bytes"].as_u64().unwrap() > 0, "{rep}");
    // `ls` and `verify` take the URL: the same epochs, all restorable,
    // every byte sound.
    let listed = garage.ls(&url, &[]);
    let ids: Vec<u64> = listed.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(
        ids.iter().all(|i| local.contains(i)) && ids.len() as u64 + covered == local.len() as u64,
        "{ids:?} against {local:?}"
    );
    assert!(listed.iter().all(|r| r["restorable"] == true), "{listed:?}");
    let mut cmd = consnap();
    let out = run_ok(garage.env(cmd.args(["verify", &url, "--cache"]).arg(dir.join("verify-cache"))));
    assert!(String::from_utf8_lossy(&out.stdout).contains("fetched into"), "{out:?}");
    // Another host: no local store, an empty cache.
    std::fs::remove_dir_all(&snaps).unwrap();
    for (n, at) in [
        ("latest", "latest".to_string()),
        ("middle", ids[ids.len() / 2].to_string()),
    ] {
        let cache = dir.join(format!("host2-{n}"));
        let r = garage.restore(&url, &cache, &dir.join(format!("restore-{n}.json")), &["--at", &at]);
        assert_eq!(
            (r["ops"].as_u64(), r["checksum"].as_str()),
            (Some(ops), Some(sum.as_str())),
            "{n}: {r}"
        );
        let fetched = &r["restored_from"]["remote"];
        assert!(fetched["downloaded"].as_u64().unwrap() >= 1, "{r}");
        assert_eq!(fetched["url"], url.as_str(), "{r}");
        // Lazily: the chain read in place, pages by ranged GETs as the
        // guest and the fill need them, nothing kept locally.
        let home = dir.join(format!("host2-{n}-lazy"));
        let r = garage.restore_lazy(&url, &home, &dir.join(format!("lazy-{n}.json")), &["--at", &at]);
        assert_eq!(
            (r["ops"].as_u64(), r["checksum"].as_str()),
            (Some(ops), Some(sum.as_str())),
            "{n}, lazy: {r}"
        );
        let from = &r["restored_from"];
        assert!(
            from["remote"]["cache"].is_null() && from["remote"]["downloaded"] == 0,
            "{r}"
        );
        assert!(from["remote"]["bytes"].as_u64().unwrap() > 0, "{r}");
        let lazy = &from["lazy"];
        let installed = lazy["fault_pages"].as_u64().unwrap() + lazy["fill_pages"].as_u64().unwrap();
        assert!(installed > 0, "{r}");
    }
    // Killed -9 part-way: what reached the object store restores exactly.
    let snaps2 = dir.join("snaps2");
    let url2 = garage.url("vm2");
    let mut cmd = consnap();
    garage.env(cmd.args(run_args(snaps2.to_str().unwrap(), &url2)));
    let mut child = spawn(&mut cmd);
    child.wait_for("8 committed epochs", |_| epoch_count(&snaps2) >= 8);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = child.stop(libc::SIGKILL);
    assert_killed(&out, libc::SIGKILL, &["run", "--replicate"]);
    let r = garage.restore(&url2, &dir.join("host3"), &dir.join("restore-killed.json"), &[]);
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "{r}"
    );
}

#[test]
#[cfg_attr(any(no_kvm, no_garage), ignore = "needs /dev/kvm and Garage")]
fn the_object_store_mirrors_reclamation() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("replicate-reclaim");
    let Some(garage) = Garage::start(&dir.join("garage")) else {
        return;
    };
    // Long enough for 40 epochs even when every one waits for the object
    // store (--replicate-backlog 1) and for the folds that keep chains at
    // 4 files (the run is stopped at epoch 40).
    let spec = "memstress,wss=16M,ops=180000,rate=6000,pattern=hotcold";
    let (ops, sum) = reference(spec, 1);
    // Epochs every 50 ms merged into 200 ms buckets once 200 ms old, and
    // chains folded beyond 4: the local store rewrites and deletes epochs
    // all the time, and the object store follows.
    let snaps = dir.join("snaps");
    let url = garage.url("vm3");
    let report = dir.join("run.json");
    let mut cmd = consnap();
    garage.env(cmd.args([
        "run",
        "--workload",
        spec,
        "--mem",
        "64M",
        "--snapshot-dir",
        snaps.to_str().unwrap(),
        "--interval",
        "50ms",
        "--pause-probe",
        "0",
        "--retain",
        "200ms:all,1m:200ms",
        "--max-chain",
        "4",
        "--replicate",
        &url,
        // Any epoch not off-host yet is over this limit: every snapshot
        // waits until the previous one is up.
        "--replicate-backlog",
        "1",
        "--replicate-overflow",
        "throttle",
        "--report",
        report.to_str().unwrap(),
    ]));
    let mut child = spawn(&mut cmd);
    // Epoch 40 taken (ids keep growing while merges remove epochs): about 2 s.
    child.wait_for("epoch 40", |_| {
        std::fs::read_dir(snaps.join("epochs")).is_ok_and(|d| {
            d.flatten()
                .filter_map(|e| store::epoch_id_of(e.file_name().to_str()?))
                .any(|id| id >= 40)
        })
    });
    stop_term(child, &["run", "--replicate", &url]);
    let r = read_report(&report);
    let rep = &r["replication"];
    assert!(r["reclaim"]["epochs_merged"].as_u64().unwrap() > 0, "{}", r["reclaim"]);
    assert!(rep["deleted_objects"].as_u64().unwrap() > 0, "{rep}");
    assert_eq!(rep["backlog_epochs"], 0, "{rep}");
    assert_eq!(rep["overflow"], "throttle", "{rep}");
    assert!(rep["over_limit_s"].as_f64().unwrap() > 0.0, "{rep}");
    assert!(r["snapshots"]["count"].as_u64().unwrap() >= 5, "{}", r["snapshots"]);
    // The remote store holds exactly the local epochs, each restorable.
    let local = store_support::ids(&snaps);
    let listed = garage.ls(&url, &[]);
    let ids: Vec<u64> = listed.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, local);
    assert!(listed.iter().all(|r| r["restorable"] == true), "{listed:?}");
    // The oldest and the newest restore elsewhere to the uninterrupted checksum.
    for at in [local[0], *local.last().unwrap()] {
        let r = garage.restore(
            &url,
            &dir.join(format!("host-{at}")),
            &dir.join(format!("restore-{at}.json")),
            &["--at", &at.to_string()],
        );
        assert_eq!(
            (r["ops"].as_u64(), r["checksum"].as_str()),
            (Some(ops), Some(sum.as_str())),
            "epoch {at}: {r}"
        );
    }
}

#[test]
#[cfg_attr(any(no_kvm, no_garage), ignore = "needs /dev/kvm and Garage")]
fn a_wrong_key_or_bucket_is_refused_in_one_line() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("replicate-bad");
    let Some(garage) = Garage::start(&dir.join("garage")) else {
        return;
    };
    let snaps = dir.join("snaps");
    let s = snaps.to_str().unwrap();
    for (what, url, secret) in [
        ("a wrong secret key", garage.url("x"), "0".repeat(64)),
        (
            "a missing bucket",
            "s3://no-such-bucket/x".to_string(),
            garage_support::SECRET.to_string(),
        ),
    ] {
        let mut cmd = consnap();
        garage
            .env(cmd.args(run_args(s, &url)))
            .env("AWS_SECRET_ACCESS_KEY", &secret);
        let out = output(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("--replicate")).collect();
        assert_eq!(lines.len(), 1, "{what}: {err}");
        assert!(lines[0].contains(&url) && !err.contains("panicked"), "{what}: {err}");
    }
    // Restoring from a prefix nothing was replicated to.
    let mut cmd = consnap();
    garage.env(cmd.args(["restore", &garage.url("empty")]));
    let out = output(&mut cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no consnap store") && err.contains("s3://consnap-test/empty"),
        "{err}"
    );
}

/// Some pages of guest data in epoch `id`'s file (4 KiB each, not all zero).
fn guest_pages(snaps: &std::path::Path, id: u64) -> Vec<Vec<u8>> {
    let store = store::Store::open(snaps, store::Access::Read).unwrap();
    let e = store.open_epoch(id).unwrap();
    let data = e.header().sections[3];
    let bytes = std::fs::read(e.path()).unwrap();
    let pages: Vec<Vec<u8>> = (0..data.len / 4096)
        .map(|i| bytes[(data.offset + i * 4096) as usize..][..4096].to_vec())
        .filter(|p| p.iter().any(|b| *b != 0))
        .collect();
    let step = (pages.len() / 32).max(1);
    pages.into_iter().step_by(step).take(32).collect()
}

#[test]
#[cfg_attr(any(no_kvm, no_garage), ignore = "needs /dev/kvm and Garage")]
fn encrypted_epochs_restore_only_with_their_key() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("replicate-sealed");
    let Some(garage) = Garage::start(&dir.join("garage")) else {
        return;
    };
    // Another seed for the encrypted run: its pages must not be found in
    // the plain run's objects either.
    let sealed_spec = format!("{SPEC},seed=9");
    let (ops, sum) = reference(&sealed_spec, 1);
    let key = dir.join("key");
    std::fs::write(&key, "7e".repeat(32)).unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, [3u8; 32]).unwrap();
    // The same run twice, in plain and encrypted.
    let mut pages = Vec::new();
    for (name, sealed) in [("plain", false), ("sealed", true)] {
        let snaps = dir.join(name);
        let url = garage.url(name);
        let spec = if sealed { sealed_spec.as_str() } else { SPEC };
        let mut args = run_spec(spec, snaps.to_str().unwrap(), &url);
        if sealed {
            args.extend(["--encrypt-key", key.to_str().unwrap()]);
        }
        let mut cmd = consnap();
        garage.env(cmd.args(&args));
        let mut child = spawn(&mut cmd);
        child.wait_for("6 committed epochs", |_| epoch_count(&snaps) >= 6);
        stop_term(child, &args);
        pages.push(guest_pages(&snaps, *store_support::ids(&snaps).last().unwrap()));
    }
    // Only pages the other run does not hold (the guest's code and tables
    // are the same in both).
    let files_hold = |name: &str, page: &[u8]| {
        std::fs::read_dir(dir.join(name).join("epochs"))
            .unwrap()
            .flatten()
            .any(|e| std::fs::read(e.path()).unwrap().windows(4096).any(|w| w == page))
    };
    pages[0].retain(|p| !files_hold("sealed", p));
    pages[1].retain(|p| !files_hold("plain", p));
    assert!(
        !pages[0].is_empty() && !pages[1].is_empty(),
        "no page of its own in each run"
    );
    // Guest memory shows through in the object store's files when plain
    // (which shows the check can see it), never when encrypted.
    assert!(
        pages[0].iter().any(|p| garage.data_holds(p)),
        "plain pages not found in Garage's data"
    );
    assert!(
        !pages[1].iter().any(|p| garage.data_holds(p)),
        "an encrypted store's guest page is readable in Garage's data"
    );
    // Restored elsewhere with the key: the uninterrupted checksum.
    let url = garage.url("sealed");
    let r = garage.restore(
        &url,
        &dir.join("host2"),
        &dir.join("restore.json"),
        &["--encrypt-key", key.to_str().unwrap()],
    );
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "{r}"
    );
    // Lazily, each 1 MiB chunk authenticated as it is fetched.
    let r = garage.restore_lazy(
        &url,
        &dir.join("host2-lazy"),
        &dir.join("lazy.json"),
        &["--encrypt-key", key.to_str().unwrap()],
    );
    assert_eq!(
        (r["ops"].as_u64(), r["checksum"].as_str()),
        (Some(ops), Some(sum.as_str())),
        "lazy: {r}"
    );
    // Without the key, or with another one: one clear line, nothing fetched.
    for (extra, what) in [(None, "give --encrypt-key"), (Some(&wrong), "--encrypt-key gives key")] {
        let cache = dir.join("host3");
        let mut cmd = consnap();
        garage.env(cmd.args(["restore", &url, "--cache"]).arg(&cache));
        if let Some(k) = extra {
            cmd.arg("--encrypt-key").arg(k);
        }
        let out = output(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(what) && err.contains(&url), "{err}");
        assert!(!cache.join("epochs").exists() || epoch_count(&cache) == 0, "{err}");
        let mut cmd = consnap();
        garage.env(cmd.args(["restore", &url, "--lazy"]));
        if let Some(k) = extra {
            cmd.arg("--encrypt-key").arg(k);
        }
        let out = output(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "lazy: {err}");
        assert!(err.contains(what) && err.contains(&url), "lazy: {err}");
    }
    // `ls` reads the encrypted headers with the key.
    let listed = garage.ls(&url, &["--encrypt-key", key.to_str().unwrap()]);
    assert!(
        !listed.is_empty() && listed.iter().all(|r| r["restorable"] == true),
        "{listed:?}"
    );
}

/// A VM with a disk, replicated: its disks travel in the epochs, and both
/// an eager restore (through the cache) and a lazy one (blocks by ranged
/// GETs) rebuild the disk onto a new image and finish with the
/// uninterrupted checksum and disk.
#[test]
#[cfg_attr(any(no_kvm, no_garage), ignore = "needs /dev/kvm and Garage")]
fn a_replicated_disk_restores_on_another_host() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("replicate-disk");
    let Some(garage) = Garage::start(&dir.join("garage")) else {
        return;
    };
    let spec = "dblog,wss=1M,ops=4000,rate=1500,dsize=4M,flush=8";
    let parsed = parse_spec(spec);
    let (want, disk) = workload::reference_with_disk(&parsed, 1);
    let mut want_image = disk.to_bytes();
    want_image.resize(5 << 20, 0);
    let snaps = dir.join("snaps");
    let url = garage.url("vm-disk");
    let img = dir.join("d.img");
    std::fs::File::create(&img).unwrap().set_len(5 << 20).unwrap();
    let mut args = run_spec(spec, snaps.to_str().unwrap(), &url);
    args.extend(["--disk", img.to_str().unwrap()]);
    let mut cmd = consnap();
    garage.env(cmd.args(&args));
    let mut child = spawn(&mut cmd);
    child.wait_for("8 committed epochs", |_| epoch_count(&snaps) >= 8);
    stop_term(child, &args);
    for lazy in [false, true] {
        let new = dir.join(format!("restored-{lazy}.img"));
        let report = dir.join(format!("restore-{lazy}.json"));
        let disk_arg = ["--disk", new.to_str().unwrap()];
        let r = if lazy {
            garage.restore_lazy(&url, &dir.join("home"), &report, &disk_arg)
        } else {
            garage.restore(&url, &dir.join("cache"), &report, &disk_arg)
        };
        assert_eq!(r["checksum"], format!("{:#018x}", want.checksum), "lazy {lazy}: {r}");
        assert!(
            std::fs::read(&new).unwrap() == want_image,
            "lazy {lazy}: the restored disk differs"
        );
    }
}
