//! The restore cache (`restore s3://...` without `--cache`) against two
//! object stores (two single-node Garages) holding a store each under the
//! same URL: each endpoint and store gets an entry of its own, a `--cache`
//! holding another store is refused with the way forward, and the cache
//! is pruned least recently used first, never the entry in use.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::garage_support::{Garage, S3};

/// Rate-limited memstress lasting about 3 s.
const SPEC: &str = "memstress,wss=16M,ops=12000,rate=4000";

/// Run the workload to its end, replicating to `url` on `g`.
fn replicate(g: &Garage, snaps: &Path, url: &str) {
    let mut cmd = g.consnap();
    cmd.args(["run", "--workload", SPEC, "--mem", "64M", "--interval", "100ms"])
        .args(["--pause-probe", "0", "--snapshot-dir"])
        .arg(snaps)
        .args(["--replicate", url]);
    run_ok(&mut cmd);
}

/// `consnap ARGS` through `g` with HOME `home`.
fn cmd(g: &Garage, home: &Path, args: &[&str]) -> Command {
    let mut c = g.consnap();
    c.args(args).env("HOME", home).env_remove(CACHE_MAX);
    c
}

const CACHE_MAX: &str = "CONSNAP_CACHE_MAX";

/// `restore URL` (no --cache) through `g` with HOME `home`, to its end;
/// its report and the cache entry it used.
fn restore(g: &Garage, home: &Path, url: &str, report: &Path, env: &[(&str, &str)]) -> (serde_json::Value, PathBuf) {
    let mut c = cmd(g, home, &["restore", url, "--pause-probe", "0", "--report"]);
    c.arg(report).envs(env.iter().copied());
    run_ok(&mut c);
    let r = read_report(report);
    assert!(r["checksum"].is_string(), "{r}");
    let cache = PathBuf::from(r["restored_from"]["remote"]["cache"].as_str().unwrap());
    (r, cache)
}

/// `cache ls --json` with HOME `home`.
fn cache_ls(g: &Garage, home: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(&mut cmd(g, home, &["cache", "ls", "--json"]));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn dirs(listed: &[serde_json::Value]) -> Vec<PathBuf> {
    listed
        .iter()
        .map(|e| PathBuf::from(e["dir"].as_str().unwrap()))
        .collect()
}

#[test]
fn the_restore_cache_is_keyed_by_endpoint_and_store_and_pruned_lru_first() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("replicate-cache");
    let Some(g1) = Garage::start(&dir.join("garage1")) else {
        return;
    };
    let Some(g2) = Garage::start(&dir.join("garage2")) else {
        return;
    };
    // The same URL on two object stores, holding two stores.
    let url = g1.url("vm");
    replicate(&g1, &dir.join("snaps1"), &url);
    replicate(&g2, &dir.join("snaps2"), &url);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let root = home.join(".cache/consnap/remote");
    let (_, a) = restore(&g1, &home, &url, &dir.join("r1.json"), &[]);
    let (_, b) = restore(&g2, &home, &url, &dir.join("r2.json"), &[]);
    let (ea, eb) = (a.parent().unwrap().to_path_buf(), b.parent().unwrap().to_path_buf());
    assert_ne!(ea, eb);
    assert_eq!((ea.parent(), eb.parent()), (Some(&*root), Some(&*root)));
    for (e, g) in [(&ea, &g1), (&eb, &g2)] {
        let port = g.endpoint.rsplit(':').next().unwrap();
        let name = e.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("127.0.0.1-{port}_consnap-test_vm_")),
            "{name}"
        );
        assert_eq!(mode(e), 0o700, "{}", e.display());
        assert_eq!(mode(&e.join("store")), 0o700);
        assert_eq!((mode(&e.join("ORIGIN")), mode(&e.join("LOCK"))), (0o600, 0o600));
    }
    assert_eq!(mode(&root), 0o700);
    // Listed least recently used first, each with its endpoint and store.
    let listed = cache_ls(&g1, &home);
    assert_eq!(dirs(&listed), [ea.clone(), eb.clone()], "{listed:?}");
    assert!(
        listed.iter().all(|e| e["url"] == url.as_str() && e["in_use"] == false),
        "{listed:?}"
    );
    assert_ne!(listed[0]["store"], listed[1]["store"], "{listed:?}");
    assert_ne!(listed[0]["endpoint"], listed[1]["endpoint"], "{listed:?}");
    let text = run_ok(&mut cmd(&g1, &home, &["cache", "ls"])).stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("2 stores") && text.contains("limit 4.0 GiB"), "{text}");

    // A --cache holding another store: refused, saying what to do.
    let out = output(cmd(&g2, &home, &["restore", &url, "--cache"]).arg(&a));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refusing to fetch into")
            && err.contains(&url)
            && err.contains("give --cache a new or empty directory")
            && err.contains(&format!("remove {}", a.display())),
        "{err}"
    );

    // Pruned to a size the newer entry fits in: the older one goes.
    let (sa, sb) = (
        listed[0]["bytes"].as_u64().unwrap(),
        listed[1]["bytes"].as_u64().unwrap(),
    );
    let max = (sa + sb - 1).to_string();
    let out = run_ok(&mut cmd(&g1, &home, &["cache", "prune", "--max-size", &max]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("removed {}", ea.display())), "{text}");
    assert_eq!(dirs(&cache_ls(&g1, &home)), std::slice::from_ref(&eb));

    // An entry in use is kept by `prune --all`.
    let first = first_epoch(&g1, &home, &url);
    let mut c = cmd(&g1, &home, &["restore", &url, "--pause-probe", "0", "--at", &first]);
    let mut child = spawn(&mut c);
    child.wait_for("the restore cache entry in use", |_| {
        cache_ls(&g1, &home).iter().any(|e| e["in_use"] == true)
    });
    let out = run_ok(&mut cmd(&g1, &home, &["cache", "prune", "--all"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("kept {} (in use)", ea.display()))
            && text.contains(&format!("removed {}", eb.display())),
        "{text}"
    );
    let out = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dirs(&cache_ls(&g1, &home)), std::slice::from_ref(&ea));

    // Over CONSNAP_CACHE_MAX after a fetch: the least recently used entry
    // goes, never the one being restored.
    let (_, b2) = restore(&g2, &home, &url, &dir.join("r4.json"), &[(CACHE_MAX, "1")]);
    assert_eq!(b2, b);
    assert_eq!(dirs(&cache_ls(&g1, &home)), std::slice::from_ref(&eb));
    // A bad limit is refused before anything is fetched.
    let out = output(cmd(&g1, &home, &["restore", &url]).env(CACHE_MAX, "lots"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("CONSNAP_CACHE_MAX=\"lots\""),
        "{err}"
    );
    assert_eq!(dirs(&cache_ls(&g1, &home)), [eb]);
}

/// The first epoch of the store at `url` through `g`.
fn first_epoch(g: &Garage, home: &Path, url: &str) -> String {
    let out = run_ok(&mut cmd(g, home, &["ls", "--json", url]));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows[0]["id"].as_u64().unwrap().to_string()
}
