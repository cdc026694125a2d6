//! A real S3-compatible object store for the replication tests: a
//! single-node Garage, or a 3-node cluster in network namespaces
//! (`cluster`); Garage is built once per machine by scripts/garage.sh,
//! which the test script runs and names in `CONSNAP_GARAGE`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "consnap-test";
pub const KEY_ID: &str = "GKconsnaptest0123456789ab";
pub const SECRET: &str = "5ecre7c0115a9000000000000000000000000000000000000000000000000001";
pub const REGION: &str = "garage";

/// A Garage server, stopped when dropped.
pub struct Garage {
    child: Child,
    /// Its S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The Garage binary: `CONSNAP_GARAGE`, else the one the build found
/// (build-support/test_deps.rs: `CONSNAP_GARAGE` then, or the cache
/// scripts/garage.sh builds into). Tests that need it are ignored under the
/// `no_garage` cfg; one that runs fails without it. Always `Some`.
pub(super) fn binary() -> Option<PathBuf> {
    let p = std::env::var_os("CONSNAP_GARAGE")
        .map(PathBuf::from)
        .or_else(|| option_env!("CONSNAP_BUILD_GARAGE").map(PathBuf::from));
    match p {
        Some(p) if p.exists() => Some(p),
        Some(p) => vmm::testing::missing("Garage", format!("{} does not exist", p.display())),
        None => vmm::testing::missing("Garage", "run scripts/garage.sh, set CONSNAP_GARAGE"),
    }
}

impl Garage {
    /// Start a single-node Garage with its data in `dir`, a default key and
    /// bucket, fsync on. Always `Some`: without a binary the test fails.
    pub fn start(dir: &Path) -> Option<Garage> {
        Self::start_in(dir, None)
    }

    /// [`Garage::start`] inside network namespace `netns` (its endpoint is
    /// that namespace's loopback).
    pub fn start_in(dir: &Path, netns: Option<&str>) -> Option<Garage> {
        let bin = binary()?;
        std::fs::create_dir_all(dir).unwrap();
        let (rpc, s3) = (free_port(), free_port());
        let config = dir.join("garage.toml");
        write_config(&config, dir, 1, &format!("127.0.0.1:{rpc}"), &format!("127.0.0.1:{s3}"));
        let log = std::fs::File::create(dir.join("garage.log")).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("-c")
            .arg(&config)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", KEY_ID)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut g = Garage {
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
            dir: dir.to_path_buf(),
        };
        g.wait_ready(s3, netns);
        Some(g)
    }

    /// Until the S3 port answers and the default bucket exists (Garage
    /// logs its creation, or that it was there, before serving).
    fn wait_ready(&mut self, port: u16, netns: Option<&str>) {
        let until = Instant::now() + Duration::from_secs(30);
        // Connect from the namespace Garage is in (a thread of its own
        // moves there).
        let answers = || {
            std::thread::scope(|s| {
                s.spawn(|| {
                    if let Some(ns) = netns {
                        bench::net::ns::enter(ns).unwrap();
                    }
                    TcpStream::connect(("127.0.0.1", port)).is_ok()
                })
                .join()
                .unwrap_or(false)
            })
        };
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("garage exited ({st}):\n{}", self.log());
            }
            if answers() {
                // The default key and bucket are made before the API binds.
                std::thread::sleep(Duration::from_millis(200));
                return;
            }
            assert!(Instant::now() < until, "garage not ready in 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether any file of Garage's data holds `needle` (blocks are
    /// stored uncompressed here, so page contents show through unless
    /// they were encrypted).
    pub fn data_holds(&self, needle: &[u8]) -> bool {
        fn walk(dir: &Path, needle: &[u8]) -> bool {
            let Ok(rd) = std::fs::read_dir(dir) else { return false };
            rd.flatten().any(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, needle)
                } else {
                    std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
                }
            })
        }
        walk(&self.dir.join("data"), needle)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }

    /// Point `cmd` at this Garage the way S3 tools are pointed.
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
    }

    /// `s3://BUCKET/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }
}

/// Write the configuration of a Garage node keeping its data in `dir`
/// (fsync on, no compression, so that page contents show through in its
/// files), with RPC and the S3 API on `rpc` and `s3` (`host:port`), to
/// `path`, readable by its owner only.
pub(super) fn write_config(path: &Path, dir: &Path, replication: u32, rpc: &str, s3: &str) {
    let text = format!(
        r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
replication_factor = {replication}
metadata_fsync = true
data_fsync = true
compression_level = "none"
rpc_bind_addr = "{rpc}"
rpc_public_addr = "{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "{s3}"
"#,
        dir = dir.display(),
        secret = "c0115a9e".repeat(8),
    );
    write_private(path, &text);
}

/// Write `text` to `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// Somewhere consnap runs against an object store: a command line pointed
/// at it the way S3 tools are.
pub trait S3 {
    /// `consnap`, with the endpoint and credentials in its environment.
    fn consnap(&self) -> Command;

    /// `consnap ls --json URL EXTRA...`, which must succeed.
    fn ls(&self, url: &str, extra: &[&str]) -> Vec<serde_json::Value> {
        let out = crate::common::run_ok(self.consnap().args(["ls", "--json", url]).args(extra));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `consnap restore URL --pause-probe 0 --cache CACHE --report REPORT
    /// EXTRA...` run to its end; its report.
    fn restore(&self, url: &str, cache: &Path, report: &Path, extra: &[&str]) -> serde_json::Value {
        let mut cmd = self.consnap();
        cmd.args(["restore", url, "--pause-probe", "0", "--cache"])
            .arg(cache)
            .arg("--report")
            .arg(report)
            .args(extra);
        crate::common::run_ok(&mut cmd);
        crate::common::read_report(report)
    }

    /// `consnap restore URL --lazy --pause-probe 0 --report REPORT EXTRA...`
    /// run to its end on "another host": HOME is `home` (which must stay
    /// empty: a lazy restore from an object store keeps nothing locally);
    /// its report.
    fn restore_lazy(&self, url: &str, home: &Path, report: &Path, extra: &[&str]) -> serde_json::Value {
        std::fs::create_dir_all(home).unwrap();
        let mut cmd = self.consnap();
        cmd.args(["restore", url, "--lazy", "--pause-probe", "0", "--report"])
            .arg(report)
            .args(extra)
            .env("HOME", home);
        crate::common::run_ok(&mut cmd);
        let left: Vec<_> = std::fs::read_dir(home).unwrap().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "a lazy restore from {url} wrote {left:?}");
        crate::common::read_report(report)
    }
}

impl S3 for Garage {
    fn consnap(&self) -> Command {
        let mut cmd = crate::common::consnap();
        self.env(&mut cmd);
        cmd
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
