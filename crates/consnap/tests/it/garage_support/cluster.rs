//! A 3-node Garage cluster (replication factor 3), each node in its own
//! network namespace on a bridge, and "hosts" (namespaces of their own on
//! the same bridge) to run consnap in: a replicating host whose network
//! can be cut, and another host that restores with nothing local. Needs
//! root and iproute2; the whole of it (processes, namespaces, links) goes
//! away when the cluster is dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{BUCKET, KEY_ID, REGION, S3, SECRET};

/// Nodes of the cluster.
pub const NODES: usize = 3;
/// Hosts for consnap.
pub const HOSTS: usize = 2;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The cluster; see the module's text.
pub struct Cluster {
    /// Short and unique per cluster: names its namespaces and links.
    tag: String,
    dir: PathBuf,
    bin: PathBuf,
    nodes: Vec<Option<Child>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2's ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process may build namespaces (root, and `ip` there):
/// always true, or the test fails (tests that need them are ignored under
/// the `no_netns` cfg).
fn can_build() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
    if root && ip {
        return true;
    }
    let why = if root { "no iproute2 (ip)" } else { "not root" };
    vmm::testing::missing("network namespaces", why)
}

impl Cluster {
    fn ns(&self, what: &str) -> String {
        format!("cs{}{what}", self.tag)
    }

    /// Namespace of node `k`.
    fn node_ns(&self, k: usize) -> String {
        self.ns(&format!("n{k}"))
    }

    /// Namespace of host `j`.
    pub fn host_ns(&self, j: usize) -> String {
        self.ns(&format!("h{j}"))
    }

    fn node_addr(k: usize) -> String {
        format!("10.77.0.{}", 10 + k)
    }

    fn config(&self, k: usize) -> PathBuf {
        self.dir.join(format!("n{k}/garage.toml"))
    }

    /// Start the cluster with its files under `dir`: namespaces, bridge,
    /// nodes, layout, key and bucket. Always `Some`: without a Garage binary
    /// or root the test fails.
    pub fn start(dir: &Path) -> Option<Cluster> {
        let bin = super::binary()?;
        if !can_build() {
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}x{n}", std::process::id() % 0xfffff);
        let mut c = Cluster {
            tag,
            dir: dir.to_path_buf(),
            bin,
            nodes: Vec::new(),
        };
        let bridge = c.ns("b");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["link", "set", &bridge, "up"]);
        let spaces: Vec<(String, String)> = (0..NODES)
            .map(|k| (c.node_ns(k), Self::node_addr(k)))
            .chain((0..HOSTS).map(|j| (c.host_ns(j), format!("10.77.0.{}", 100 + j))))
            .collect();
        for (i, (ns, addr)) in spaces.iter().enumerate() {
            let veth = c.ns(&format!("v{i}"));
            ip(&["netns", "add", ns]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            ip(&["link", "set", &veth, "master", &bridge, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for k in 0..NODES {
            c.write_config(k);
            let child = c.spawn_node(k);
            c.nodes.push(Some(child));
        }
        c.lay_out();
        c.wait_s3();
        Some(c)
    }

    fn write_config(&self, k: usize) {
        let d = self.dir.join(format!("n{k}"));
        std::fs::create_dir_all(&d).unwrap();
        let addr = Self::node_addr(k);
        super::write_config(&self.config(k), &d, 3, &format!("{addr}:3901"), &format!("{addr}:3900"));
    }

    fn spawn_node(&self, k: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{k}/garage.log")))
            .unwrap();
        Command::new("ip")
            .args(["netns", "exec", &self.node_ns(k)])
            .arg(&self.bin)
            .arg("-c")
            .arg(self.config(k))
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// `garage ARGS` run against node `k`, retried (the node may still be
    /// starting) until it succeeds or 30 s pass; its stdout.
    fn garage(&self, k: usize, args: &[&str]) -> String {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.node_ns(k)])
                .arg(&self.bin)
                .arg("-c")
                .arg(self.config(k))
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < until,
                "garage {}: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Connect the nodes, give each a role, apply the layout, import the
    /// key and make the bucket.
    fn lay_out(&self) {
        let ids: Vec<String> = (0..NODES)
            .map(|k| self.garage(k, &["node", "id", "-q"]).trim().to_string())
            .collect();
        for id in &ids[1..] {
            self.garage(0, &["node", "connect", id]);
        }
        for id in &ids {
            let short = id.split('@').next().unwrap();
            self.garage(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        self.garage(0, &["layout", "apply", "--version", "1"]);
        self.garage(0, &["key", "import", "--yes", "-n", "consnap", KEY_ID, SECRET]);
        self.garage(0, &["bucket", "create", BUCKET]);
        self.garage(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", KEY_ID,
            ],
        );
    }

    /// Until the S3 API answers from host 0 (a store with nothing in it
    /// says so; before the layout has spread, requests fail otherwise).
    fn wait_s3(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = self.consnap(0);
            let out = cmd.args(["ls", &self.url("probe")]).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("holds no consnap store") {
                return;
            }
            assert!(Instant::now() < until, "S3 not ready in 30 s: {err}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kill node `k` (SIGKILL).
    pub fn kill(&mut self, k: usize) {
        if let Some(mut c) = self.nodes[k].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Take host `j`'s link down (`false`) or up again.
    pub fn link(&self, j: usize, up: bool) {
        let ns = self.host_ns(j);
        ip(&["-n", &ns, "link", "set", "eth0", if up { "up" } else { "down" }]);
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        (0..NODES)
            .map(|k| {
                let log = std::fs::read_to_string(self.dir.join(format!("n{k}/garage.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- node {k}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `consnap` in host `j`, pointed at node 0's S3 endpoint.
    pub fn consnap(&self, j: usize) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host_ns(j)])
            .arg(env!("CARGO_BIN_EXE_consnap"))
            .env("AWS_ENDPOINT_URL", format!("http://{}:3900", Self::node_addr(0)))
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE");
        cmd
    }

    /// Host `j`, as a place to run consnap against the cluster from.
    pub fn host(&self, j: usize) -> Host<'_> {
        Host { cluster: self, j }
    }

    /// `s3://BUCKET/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }
}

/// One host of a [`Cluster`].
pub struct Host<'a> {
    cluster: &'a Cluster,
    j: usize,
}

impl S3 for Host<'_> {
    fn consnap(&self) -> Command {
        self.cluster.consnap(self.j)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for k in 0..self.nodes.len() {
            self.kill(k);
        }
        for k in 0..NODES {
            let _ = Command::new("ip").args(["netns", "del", &self.node_ns(k)]).output();
        }
        for j in 0..HOSTS {
            let _ = Command::new("ip").args(["netns", "del", &self.host_ns(j)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.ns("b")]).output();
    }
}
