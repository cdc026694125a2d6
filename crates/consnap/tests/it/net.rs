//! Output commit: no client ever sees a state a crash could undo.
//!
//! The kv guest serves a key-value store over UDP on a virtio-net device.
//! A peer in a network namespace of the test's own (with the TAP, a
//! static neighbour entry for the guest, and nothing else) sends numbered
//! puts, up to 16 at a time, retrying unanswered ones, and records every
//! put it saw acknowledged. The VMM is killed with SIGKILL at random
//! moments and the latest epoch restored on the same TAP while the peer
//! goes on; at the end every acknowledged put must still be there (a get
//! returns it or a later value put under that key). With `--net-commit
//! none` acknowledged puts are lost: the mutation check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;

use common::*;

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: &str = "10.77.0.2";
const GUEST_MAC: &str = "52:54:00:77:00:02";
const TAP: &str = "kv0";
const KEYS: u64 = 512;
const WINDOW: usize = 16;

/// A network namespace with a TAP in it, removed on drop.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// `None` (the test is skipped, and says so) where this process may not
    /// make one; with `CONSNAP_REQUIRE_NETNS=1` that is a failure.
    pub fn new(tag: &str) -> Option<Netns> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("csn-{}-{tag}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let ns = Netns { name };
        let n = ns.name.as_str();
        let made = ip(&["netns", "add", n])
            .and_then(|_| ip(&["-n", n, "link", "set", "lo", "up"]))
            .and_then(|_| ip(&["-n", n, "tuntap", "add", "mode", "tap", "name", TAP]))
            .and_then(|_| ip(&["-n", n, "addr", "add", "10.77.0.1/24", "dev", TAP]))
            .and_then(|_| ip(&["-n", n, "link", "set", TAP, "up"]))
            .and_then(|_| {
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
                ])
            });
        match made {
            Ok(()) => Some(ns),
            Err(e) => {
                assert!(
                    std::env::var("CONSNAP_REQUIRE_NETNS").as_deref() != Ok("1"),
                    "CONSNAP_REQUIRE_NETNS=1 but no network namespace with a TAP: {e}"
                );
                eprintln!("skipped: cannot make a network namespace with a TAP here ({e})");
                None
            }
        }
    }

    /// `consnap ARGS` inside the namespace.
    pub fn consnap(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_consnap")])
            .args(args);
        c
    }
}

/// Move the calling thread into network namespace `name`.
fn enter(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: setns on an open namespace file; it changes only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// What the peer saw: per key, the highest value acknowledged, and every
/// value it sent.
#[derive(Default)]
struct Ledger {
    acked: HashMap<u64, u64>,
    sent: HashMap<u64, Vec<u64>>,
    puts_acked: u64,
}

struct Peer {
    sock: UdpSocket,
    guest: SocketAddr,
    seq: u64,
}

fn request(seq: u64, op: u8, key: u64, value: u64) -> [u8; 25] {
    let mut b = [0u8; 25];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8] = op;
    b[9..17].copy_from_slice(&key.to_le_bytes());
    b[17..].copy_from_slice(&value.to_le_bytes());
    b
}

fn reply(b: &[u8]) -> Option<(u64, u64, u64)> {
    let w = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    (b.len() == 24).then(|| (w(0), w(8), w(16)))
}

impl Peer {
    /// A socket in namespace `ns` (the calling thread moves there).
    fn new(ns: &str) -> Peer {
        enter(ns);
        let sock = UdpSocket::bind((HOST_IP, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        Peer {
            sock,
            guest: format!("{GUEST_IP}:7000").parse().unwrap(),
            seq: 0,
        }
    }

    /// Run `ops` (op, key, value), up to [`WINDOW`] at a time, each resent
    /// every 100 ms until answered, until all are answered or `deadline`;
    /// `more` is asked for further ones while it says so.
    fn run(
        &mut self,
        mut next: impl FnMut() -> Option<(u8, u64, u64)>,
        mut answered: impl FnMut(u8, u64, u64, (u64, u64, u64)),
        deadline: Instant,
    ) {
        let mut out: HashMap<u64, (u8, u64, u64, Instant)> = HashMap::new();
        let mut more = true;
        let mut buf = [0u8; 64];
        loop {
            while more && out.len() < WINDOW {
                let Some((op, key, value)) = next() else {
                    more = false;
                    break;
                };
                self.seq += 1;
                self.sock
                    .send_to(&request(self.seq, op, key, value), self.guest)
                    .unwrap();
                out.insert(self.seq, (op, key, value, Instant::now()));
            }
            if !more && out.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the guest stopped answering: {} requests open",
                out.len()
            );
            if let Ok((n, _)) = self.sock.recv_from(&mut buf)
                && let Some(r) = reply(&buf[..n])
                && let Some((op, key, value, _)) = out.remove(&r.0)
            {
                answered(op, key, value, r);
            }
            for (seq, (op, key, value, at)) in out.iter_mut() {
                if at.elapsed() > Duration::from_millis(100) {
                    let _ = self.sock.send_to(&request(*seq, *op, *key, *value), self.guest);
                    *at = Instant::now();
                }
            }
        }
    }
}

/// Keys in flight are distinct: a put goes to a key only once the previous
/// one to it was answered.
fn put_loop(ns: &str, stop: &AtomicBool, ledger: &Mutex<Ledger>) {
    let mut peer = Peer::new(ns);
    let busy: Arc<Mutex<std::collections::HashSet<u64>>> = Arc::default();
    let mut value = 0u64;
    let (b1, b2) = (busy.clone(), busy.clone());
    peer.run(
        || {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let mut b = b1.lock().unwrap();
            let key = (0..KEYS).map(|k| (value + k) % KEYS).find(|k| !b.contains(k))?;
            b.insert(key);
            value += 1;
            let mut l = ledger.lock().unwrap();
            l.sent.entry(key).or_default().push(value);
            Some((1, key, value))
        },
        |_, key, value, (_, stored, _)| {
            assert_eq!(stored, value, "a put of {value} under {key} was answered with {stored}");
            b2.lock().unwrap().remove(&key);
            let mut l = ledger.lock().unwrap();
            let a = l.acked.entry(key).or_insert(0);
            *a = (*a).max(value);
            l.puts_acked += 1;
        },
        Instant::now() + Duration::from_secs(120),
    );
}

/// Puts acknowledged but not found afterwards.
fn lost_puts(ns: &Netns, ledger: &Ledger) -> Vec<(u64, u64, u64)> {
    let mut peer = Peer::new(&ns.name);
    let mut keys = ledger.acked.keys().copied().collect::<Vec<_>>().into_iter();
    let mut lost = Vec::new();
    peer.run(
        || keys.next().map(|k| (2, k, 0)),
        |_, key, _, (_, stored, _)| {
            let acked = ledger.acked[&key];
            if stored < acked {
                lost.push((key, acked, stored));
            } else {
                assert!(
                    ledger.sent[&key].contains(&stored),
                    "key {key} holds {stored}, which was never put there"
                );
            }
        },
        Instant::now() + Duration::from_secs(120),
    );
    lost
}

/// Ask the guest to stop; it answers with its state checksum.
fn stop_guest(ns: &Netns) {
    let mut peer = Peer::new(&ns.name);
    let mut once = Some((3, 0, 0));
    peer.run(
        || once.take(),
        |_, _, _, _| {},
        Instant::now() + Duration::from_secs(60),
    );
}

/// The kill -9 test: `kills` times, a random moment after the guest
/// answered, SIGKILL and a restore of the latest epoch on the same TAP.
/// Returns the acknowledged puts that were lost.
fn kill_restore(
    ns: &Netns,
    dir: &Path,
    mode: &str,
    vcpus: u32,
    interval: &str,
    commit: &str,
    kills: u32,
) -> Vec<(u64, u64, u64)> {
    let snaps = dir.join("snaps");
    let snaps_s = snaps.to_str().unwrap().to_string();
    let vcpus_s = vcpus.to_string();
    let net = format!("tap={TAP},mac={GUEST_MAC}");
    let spec = format!("kv,ip={GUEST_IP},wss=8M");
    let session = [
        "--snapshot-dir",
        &snaps_s,
        "--mode",
        mode,
        "--interval",
        interval,
        "--net-commit",
        commit,
        "--pause-probe",
        "0",
    ];
    let mut run: Vec<&str> = vec!["run", "--workload", &spec, "--vcpus", &vcpus_s, "--net", &net];
    run.extend(session);
    let mut child = spawn(&mut ns.consnap(&run));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let (ns_name, ledger, stop) = (ns.name.clone(), ledger.clone(), stop.clone());
        std::thread::spawn(move || put_loop(&ns_name, &stop, &ledger))
    };
    let mut rng = Rng(seed());
    let min_epochs = if interval == "1s" { 2 } else { 5 };
    for k in 0..kills {
        // Some puts answered and some epochs committed, then a random moment.
        let acked_before = ledger.lock().unwrap().puts_acked;
        child.wait_for("puts answered and epochs committed", |_| {
            ledger.lock().unwrap().puts_acked > acked_before + 20 && epoch_count(&snaps) >= min_epochs
        });
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        let out = child.stop(libc::SIGKILL);
        assert_killed(&out, libc::SIGKILL, &run);
        let mut restore = vec!["restore", &snaps_s, "--at", "latest"];
        restore.extend(session);
        child = spawn(&mut ns.consnap(&restore));
        eprintln!("kill {k}: {} puts answered so far", ledger.lock().unwrap().puts_acked);
    }
    let acked_before = ledger.lock().unwrap().puts_acked;
    child.wait_for("puts answered after the last restore", |_| {
        ledger.lock().unwrap().puts_acked > acked_before + 20
    });
    stop.store(true, Ordering::Relaxed);
    peer.join().unwrap();
    let lost = lost_puts(ns, &ledger.lock().unwrap());
    stop_guest(ns);
    let out = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lost
}

fn no_acknowledged_put_is_lost(mode: &str, vcpus: u32, interval: &str) {
    if !kvm_ready() {
        return;
    }
    let Some(ns) = Netns::new("kv") else { return };
    let dir = tempdir(&format!("net-{mode}-{vcpus}-{interval}"));
    let lost = kill_restore(&ns, dir.path(), mode, vcpus, interval, "epoch", 2);
    assert!(lost.is_empty(), "acknowledged puts lost (key, acked, found): {lost:?}");
}

#[test]
fn kv_cow_1_vcpu_20ms() {
    no_acknowledged_put_is_lost("cow", 1, "20ms");
}

#[test]
fn kv_cow_2_vcpus_20ms() {
    no_acknowledged_put_is_lost("cow", 2, "20ms");
}

#[test]
fn kv_stop_copy_2_vcpus_20ms() {
    no_acknowledged_put_is_lost("stop-copy", 2, "20ms");
}

#[test]
fn kv_stop_copy_full_1_vcpu_20ms() {
    no_acknowledged_put_is_lost("stop-copy-full", 1, "20ms");
}

#[test]
fn kv_cow_2_vcpus_1s() {
    no_acknowledged_put_is_lost("cow", 2, "1s");
}

#[test]
fn kv_stop_copy_1_vcpu_1s() {
    no_acknowledged_put_is_lost("stop-copy", 1, "1s");
}

/// The mutation check: without output commit, a kill loses puts the peer
/// saw acknowledged (the test above would catch a gate that lets frames
/// out early).
#[test]
fn without_output_commit_acknowledged_puts_are_lost() {
    if !kvm_ready() {
        return;
    }
    let Some(ns) = Netns::new("none") else { return };
    let dir = tempdir("net-none");
    let lost = kill_restore(&ns, dir.path(), "cow", 1, "20ms", "none", 3);
    eprintln!("without output commit: {} acknowledged puts lost", lost.len());
    assert!(!lost.is_empty(), "no acknowledged put was lost without output commit");
}

/// Run `puts` (key, value) through the peer, then stop the guest; returns
/// the checksum its stop reply carries.
fn drive(ns: &Netns, puts: &[(u64, u64)]) -> u64 {
    let mut peer = Peer::new(&ns.name);
    let mut it = puts.iter();
    peer.run(
        || it.next().map(|&(k, v)| (1, k, v)),
        |_, _, value, (_, stored, _)| assert_eq!(stored, value),
        Instant::now() + Duration::from_secs(120),
    );
    let mut sum = 0;
    let mut once = Some((3, 0, 0));
    peer.run(
        || once.take(),
        |_, _, _, (_, checksum, _)| sum = checksum,
        Instant::now() + Duration::from_secs(60),
    );
    sum
}

/// The checksum a kv server holds after `puts`, computed on the host.
fn reference(puts: &[(u64, u64)]) -> u64 {
    use workload::kv::{KvServer, Op, Request};
    let mut table = vec![0u64; (8 << 20) / 8];
    let mut s = KvServer::new([0x52, 0x54, 0, 0x77, 0, 2], [10, 77, 0, 2], 7000, &mut table);
    for (i, &(key, value)) in puts.iter().enumerate() {
        s.execute(&Request {
            seq: i as u64,
            op: Op::Put,
            key,
            value,
        });
    }
    s.checksum()
}

/// The same ELF and driver on QEMU's microvm with its virtio-net device on
/// the same TAP answer the same peer, and hold what consnap's guest holds.
#[test]
fn kv_in_qemu_answers_the_same_peer() {
    if !kvm_ready() || !crate::qemu::qemu_ready() {
        return;
    }
    let Some(ns) = Netns::new("qemu") else { return };
    let dir = tempdir("net-qemu");
    let elf = dir.join("guest.elf");
    run_ok(consnap().args(["guest", "export"]).arg(&elf));
    let puts: Vec<(u64, u64)> = (0..300u64).map(|i| (i % 97, i * 7 + 1)).collect();
    let want = reference(&puts);
    for smp in [1, 2] {
        let spec = format!("kv,ip={GUEST_IP},wss=8M");
        let net = format!("tap={TAP},mac={GUEST_MAC}");
        let child = spawn(&mut ns.consnap(&["run", "--workload", &spec, "--vcpus", &smp.to_string(), "--net", &net]));
        assert_eq!(drive(&ns, &puts), want, "consnap, {smp} vCPUs");
        let out = child.wait();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut qemu = bench::microvm::command(&elf, &guest_words(&spec), "256M", smp);
        qemu.args(["-serial", "stdio"]);
        bench::microvm::net(&mut qemu, TAP, GUEST_MAC);
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(qemu.get_program())
            .args(qemu.get_args());
        let child = spawn(&mut cmd);
        assert_eq!(drive(&ns, &puts), want, "QEMU, {smp} vCPUs");
        let out = child.wait();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // isa-debug-exit: QEMU exits with 2 * code + 1.
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains(&format!("checksum={want:#018x}")), "{stdout}");
    }
}
