//! A network namespace of its own with a TAP in it, for the kv guest and
//! a peer: the host's end is 10.77.0.1/24 on TAP `kv0`, the guest is
//! 10.77.0.2 with a fixed MAC (a permanent neighbour entry, so that no ARP
//! waits for an epoch). Removed on drop. Needs root (CAP_NET_ADMIN and
//! CAP_SYS_ADMIN).

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// The host's address on the TAP.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The guest's address and MAC.
pub const GUEST_IP: &str = "10.77.0.2";
pub const GUEST_MAC: &str = "52:54:00:77:00:02";
/// The TAP device in the namespace.
pub const TAP: &str = "kv0";

/// Why a namespace could not be made or entered.
#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("ip {args}: {why}")]
    Ip { args: String, why: String },
    #[error("cannot enter network namespace {name}: {source}")]
    Enter { name: String, source: std::io::Error },
}

/// A network namespace with the TAP (see the module documentation).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let failed = |why: String| NetnsError::Ip {
        args: args.join(" "),
        why,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

impl Netns {
    /// A new namespace named after this process and `tag`.
    pub fn new(tag: &str) -> Result<Netns, NetnsError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("csn-{}-{tag}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        // From here on, drop removes it.
        let ns = Netns { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "tuntap", "add", "mode", "tap", "name", TAP])?;
        ip(&["-n", n, "addr", "add", "10.77.0.1/24", "dev", TAP])?;
        ip(&["-n", n, "link", "set", TAP, "up"])?;
        ip(&[
            "-n",
            n,
            "neigh",
            "add",
            GUEST_IP,
            "lladdr",
            GUEST_MAC,
            "dev",
            TAP,
            "nud",
            "permanent",
        ])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program ARGS` run inside the namespace, with the environment
    /// changes made to `program` (`ip netns exec` execs it: the child's pid
    /// is the program's).
    pub fn command(&self, program: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program.get_program())
            .args(program.get_args());
        for (k, v) in program.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Move the calling thread into network namespace `name`.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let failed = |source| NetnsError::Enter {
        name: name.to_string(),
        source,
    };
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).map_err(failed)?;
    // SAFETY: setns on an open namespace file; it changes only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(())
}
