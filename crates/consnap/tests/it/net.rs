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

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench::net::ns::{GUEST_IP, GUEST_MAC, Netns, TAP};
use bench::net::peer::{Ask, Peer};
use workload::kv::Op;

use crate::common;

use common::*;

const KEYS: u64 = 512;
const WINDOW: usize = 16;

/// A namespace for one test. Always `Some`: tests that need one are
/// ignored under the `no_netns` and `no_tap` cfgs, and one that runs fails
/// where this process may not make one.
fn netns(tag: &str) -> Option<Netns> {
    match Netns::new(tag) {
        Ok(ns) => Some(ns),
        Err(e) => vmm::testing::missing("a network namespace with a TAP", e),
    }
}

/// `consnap ARGS` in `ns`.
fn consnap_in(ns: &Netns, args: &[&str]) -> std::process::Command {
    let mut c = consnap();
    c.args(args);
    ns.command(&c)
}

/// What the peer saw: per key, the highest value acknowledged, and every
/// value it sent.
#[derive(Default)]
struct Ledger {
    acked: HashMap<u64, u64>,
    sent: HashMap<u64, Vec<u64>>,
    puts_acked: u64,
}

fn ask(op: Op, key: u64, value: u64) -> Ask {
    Ask { op, key, value }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(120)
}

/// Keys in flight are distinct: a put goes to a key only once the previous
/// one to it was answered.
fn put_loop(ns: &str, stop: &AtomicBool, ledger: &Mutex<Ledger>) {
    let mut peer = Peer::new(ns).unwrap();
    let busy: Mutex<HashSet<u64>> = Mutex::default();
    let mut value = 0u64;
    peer.run(
        WINDOW,
        || {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let mut b = busy.lock().unwrap();
            let key = (0..KEYS).map(|k| (value + k) % KEYS).find(|k| !b.contains(k))?;
            b.insert(key);
            value += 1;
            ledger.lock().unwrap().sent.entry(key).or_default().push(value);
            Some(ask(Op::Put, key, value))
        },
        |a| {
            let (key, value) = (a.ask.key, a.ask.value);
            assert_eq!(
                a.reply.value, value,
                "a put of {value} under {key} was answered otherwise"
            );
            busy.lock().unwrap().remove(&key);
            let mut l = ledger.lock().unwrap();
            let acked = l.acked.entry(key).or_insert(0);
            *acked = (*acked).max(value);
            l.puts_acked += 1;
        },
        deadline(),
    )
    .unwrap();
}

/// Puts acknowledged but not found afterwards (key, acknowledged, found).
fn lost_puts(ns: &Netns, ledger: &Ledger) -> Vec<(u64, u64, u64)> {
    let mut peer = Peer::new(ns.name()).unwrap();
    let mut keys = ledger.acked.keys().copied().collect::<Vec<_>>().into_iter();
    let mut lost = Vec::new();
    peer.run(
        WINDOW,
        || keys.next().map(|k| ask(Op::Get, k, 0)),
        |a| {
            let (key, stored) = (a.ask.key, a.reply.value);
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
        deadline(),
    )
    .unwrap();
    lost
}

/// Ask the guest to stop; returns the state checksum its reply carries.
fn stop_guest(ns: &Netns) -> u64 {
    let mut peer = Peer::new(ns.name()).unwrap();
    peer.call(ask(Op::Stop, 0, 0), deadline()).unwrap().reply.value
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
    let mut child = spawn(&mut consnap_in(ns, &run));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let (ns_name, ledger, stop) = (ns.name().to_string(), ledger.clone(), stop.clone());
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
        child = spawn(&mut consnap_in(ns, &restore));
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
    let Some(ns) = netns("kv") else { return };
    let dir = tempdir(&format!("net-{mode}-{vcpus}-{interval}"));
    let lost = kill_restore(&ns, dir.path(), mode, vcpus, interval, "epoch", 2);
    assert!(lost.is_empty(), "acknowledged puts lost (key, acked, found): {lost:?}");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_cow_1_vcpu_20ms() {
    no_acknowledged_put_is_lost("cow", 1, "20ms");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_cow_1_vcpu_1s() {
    no_acknowledged_put_is_lost("cow", 1, "1s");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_cow_2_vcpus_20ms() {
    no_acknowledged_put_is_lost("cow", 2, "20ms");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_cow_2_vcpus_1s() {
    no_acknowledged_put_is_lost("cow", 2, "1s");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_stop_copy_1_vcpu_20ms() {
    no_acknowledged_put_is_lost("stop-copy", 1, "20ms");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_stop_copy_1_vcpu_1s() {
    no_acknowledged_put_is_lost("stop-copy", 1, "1s");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_stop_copy_2_vcpus_20ms() {
    no_acknowledged_put_is_lost("stop-copy", 2, "20ms");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_stop_copy_2_vcpus_1s() {
    no_acknowledged_put_is_lost("stop-copy", 2, "1s");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_stop_copy_full_1_vcpu_20ms() {
    no_acknowledged_put_is_lost("stop-copy-full", 1, "20ms");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_stop_copy_full_1_vcpu_1s() {
    no_acknowledged_put_is_lost("stop-copy-full", 1, "1s");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_stop_copy_full_2_vcpus_20ms() {
    no_acknowledged_put_is_lost("stop-copy-full", 2, "20ms");
}

#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_stop_copy_full_2_vcpus_1s() {
    no_acknowledged_put_is_lost("stop-copy-full", 2, "1s");
}

/// The mutation check: without output commit, a kill loses puts the peer
/// saw acknowledged (the test above would catch a gate that lets frames
/// out early).
#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn without_output_commit_acknowledged_puts_are_lost() {
    if !kvm_ready() {
        return;
    }
    let Some(ns) = netns("none") else { return };
    let dir = tempdir("net-none");
    let lost = kill_restore(&ns, dir.path(), "cow", 1, "20ms", "none", 3);
    eprintln!("without output commit: {} acknowledged puts lost", lost.len());
    assert!(!lost.is_empty(), "no acknowledged put was lost without output commit");
}

/// Run `puts` (key, value) through the peer, then stop the guest; returns
/// the checksum its stop reply carries.
fn drive(ns: &Netns, puts: &[(u64, u64)]) -> u64 {
    let mut peer = Peer::new(ns.name()).unwrap();
    let mut it = puts.iter();
    peer.run(
        WINDOW,
        || it.next().map(|&(k, v)| ask(Op::Put, k, v)),
        |a| assert_eq!(a.reply.value, a.ask.value),
        deadline(),
    )
    .unwrap();
    stop_guest(ns)
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
#[cfg_attr(
    any(no_kvm, no_qemu, no_netns, no_tap),
    ignore = "needs /dev/kvm, QEMU and a TAP in a netns"
)]
fn kv_in_qemu_answers_the_same_peer() {
    if !kvm_ready() || !crate::qemu::qemu_ready() {
        return;
    }
    let Some(ns) = netns("qemu") else { return };
    let dir = tempdir("net-qemu");
    let elf = dir.join("guest.elf");
    run_ok(consnap().args(["guest", "export"]).arg(&elf));
    let puts: Vec<(u64, u64)> = (0..300u64).map(|i| (i % 97, i * 7 + 1)).collect();
    let want = reference(&puts);
    for smp in [1, 2] {
        let spec = format!("kv,ip={GUEST_IP},wss=8M");
        let net = format!("tap={TAP},mac={GUEST_MAC}");
        let child = spawn(&mut consnap_in(
            &ns,
            &["run", "--workload", &spec, "--vcpus", &smp.to_string(), "--net", &net],
        ));
        assert_eq!(drive(&ns, &puts), want, "consnap, {smp} vCPUs");
        let out = child.wait();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut qemu = bench::microvm::command(&elf, &guest_words(&spec), "256M", smp);
        qemu.args(["-serial", "stdio"]);
        bench::microvm::net(&mut qemu, TAP, GUEST_MAC);
        let child = spawn(&mut ns.command(&qemu));
        assert_eq!(drive(&ns, &puts), want, "QEMU, {smp} vCPUs");
        let out = child.wait();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // isa-debug-exit: QEMU exits with 2 * code + 1.
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains(&format!("checksum={want:#018x}")), "{stdout}");
    }
}

fn ctl_stats(sock: &Path) -> serde_json::Value {
    let out = run_ok(consnap().arg("ctl").arg("--sock").arg(sock).args(["--json", "stats"]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// At the cap (`--output-hold`) the guest's replies wait in its TX ring;
/// the API shows what is held; once epochs are durable everything is
/// answered and nothing is dropped.
#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn at_the_cap_the_guest_waits_and_nothing_is_lost() {
    if !kvm_ready() {
        return;
    }
    let Some(ns) = netns("cap") else { return };
    let dir = tempdir("net-cap");
    let (snaps, sock, report) = (dir.join("snaps"), dir.join("api.sock"), dir.join("r.json"));
    let spec = format!("kv,ip={GUEST_IP},wss=8M");
    let net = format!("tap={TAP},mac={GUEST_MAC}");
    let mut cmd = consnap();
    cmd.args(["run", "--workload", &spec, "--net", &net, "--pause-probe", "0"])
        .args(["--interval", "300ms", "--output-hold", "1K", "--snapshot-dir"])
        .arg(&snaps)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--report")
        .arg(&report);
    let mut child = spawn(&mut ns.command(&cmd));
    child.wait_for("the API socket", |_| sock.exists());
    // 48 puts at once: a reply frame is 66 bytes, so about 15 fit.
    let order = Arc::new(Mutex::new(Vec::new()));
    let peer = {
        let (name, order) = (ns.name().to_string(), order.clone());
        std::thread::spawn(move || {
            let mut p = Peer::new(&name).unwrap();
            // The guest answers before the burst starts.
            p.call(ask(Op::Get, 0, 0), deadline()).unwrap();
            let mut i = 0u64;
            p.run(
                48,
                || {
                    i += 1;
                    (i <= 48).then(|| ask(Op::Put, i, i * 10))
                },
                |a| order.lock().unwrap().push(a.ask.key),
                deadline(),
            )
            .unwrap();
        })
    };
    let until = Instant::now() + Duration::from_secs(60);
    let held = loop {
        let s = ctl_stats(&sock);
        if s["output"]["at_cap"].as_u64().unwrap_or(0) > 0 {
            break s;
        }
        assert!(Instant::now() < until, "the cap was never reached: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(held["output"]["held_bytes"].as_u64().unwrap() <= 1024, "{held}");
    let metrics = run_ok(consnap().arg("ctl").arg("--sock").arg(&sock).arg("metrics"));
    let text = String::from_utf8(metrics.stdout).unwrap();
    for name in [
        "consnap_output_held_frames ",
        "consnap_output_held_bytes ",
        "consnap_output_at_cap_total ",
        "consnap_output_released_frames_total ",
        "consnap_net_tx_frames_total{tap=\"kv0\"} ",
        "consnap_net_rx_frames_total{tap=\"kv0\"} ",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    peer.join().unwrap();
    // Every put answered. (The order in which replies reach the peer is
    // not checked here: a full run once saw 2 of 48 arrive last, after
    // the peer had resent them; the gate's own order is checked by vmm's
    // output and virtio_net tests.)
    let mut order = order.lock().unwrap().clone();
    order.sort_unstable();
    assert_eq!(order, (1..=48).collect::<Vec<_>>(), "puts left unanswered");
    stop_guest(&ns);
    let out = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_report(&report);
    let o = &r["output"];
    assert!(o["at_cap"].as_u64().unwrap() > 0, "{o}");
    assert!(o["held_bytes_max"].as_u64().unwrap() <= 1024, "{o}");
    assert_eq!(
        (o["dropped_at_exit"].as_u64(), o["send_errors"].as_u64()),
        (Some(0), Some(0)),
        "{o}"
    );
    assert_eq!(o["released"], r["nets"][0]["tx_frames"], "{r}");
}

/// `--console-commit epoch`: what the guest prints waits for its epoch; a
/// kill before that epoch is durable shows nothing of it, and a guest that
/// powers off has all of it printed.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn console_output_waits_for_its_epoch() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("console-commit");
    let snaps = dir.join("snaps");
    let long = "memstress,wss=16M,ops=200000,rate=20000";
    for (commit, shown) in [("epoch", false), ("none", true)] {
        let _ = std::fs::remove_dir_all(&snaps);
        let mut child = spawn(
            consnap()
                .args([
                    "run",
                    "--workload",
                    long,
                    "--interval",
                    "30s",
                    "--console-commit",
                    commit,
                ])
                .arg("--snapshot-dir")
                .arg(&snaps),
        );
        let seen = |c: &Child| c.stdout_contains("consnap-guest: workload=memstress");
        if shown {
            child.wait_for("the guest's first line", seen);
        } else {
            std::thread::sleep(Duration::from_millis(1500));
            assert!(!seen(&child), "printed before its epoch: {}", child.stdout());
        }
        let out = child.stop(libc::SIGKILL);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.contains("consnap-guest: workload=memstress"),
            shown,
            "{commit}: {stdout}"
        );
    }
    let out = run_ok(
        consnap()
            .args([
                "run",
                "--workload",
                "memstress,wss=16M,ops=1000",
                "--console-commit",
                "epoch",
            ])
            .arg("--snapshot-dir")
            .arg(dir.join("short")),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("consnap-guest: done"));
}

/// With `--net-commit remote` a reply waits until the object store holds
/// its epoch: the host is lost (kill -9, and the restore comes from the
/// object store, not the local directory) and still no acknowledged put
/// is gone. With local commit the same loses puts (the object store lags).
#[test]
#[cfg_attr(
    any(no_kvm, no_garage, no_netns, no_tap),
    ignore = "needs /dev/kvm, Garage and a TAP in a netns"
)]
fn with_remote_commit_losing_the_host_loses_no_acknowledged_put() {
    if !kvm_ready() {
        return;
    }
    let Some(ns) = netns("remote") else { return };
    let dir = tempdir("net-remote");
    let Some(garage) = crate::garage_support::Garage::start_in(&dir.join("garage"), Some(ns.name())) else {
        return;
    };
    for (commit, lossless) in [("remote", true), ("epoch", false)] {
        let url = format!("s3://{}/kv-{commit}", crate::garage_support::BUCKET);
        let snaps = dir.join(format!("snaps-{commit}"));
        let spec = format!("kv,ip={GUEST_IP},wss=8M");
        let net = format!("tap={TAP},mac={GUEST_MAC}");
        let mut run = consnap();
        run.args(["run", "--workload", &spec, "--net", &net, "--pause-probe", "0"])
            .args(["--interval", "50ms", "--net-commit", commit, "--replicate", &url])
            .arg("--snapshot-dir")
            .arg(&snaps);
        garage.env(&mut run);
        let mut child = spawn(&mut ns.command(&run));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let peer = {
            let (name, ledger, stop) = (ns.name().to_string(), ledger.clone(), stop.clone());
            std::thread::spawn(move || put_loop(&name, &stop, &ledger))
        };
        child.wait_for("puts answered", |_| ledger.lock().unwrap().puts_acked > 200);
        let out = child.stop(libc::SIGKILL);
        assert_killed(&out, libc::SIGKILL, &[commit]);
        let mut restore = consnap();
        restore
            .args(["restore", &url, "--at", "latest", "--pause-probe", "0", "--cache"])
            .arg(dir.join(format!("cache-{commit}")));
        garage.env(&mut restore);
        let mut child = spawn(&mut ns.command(&restore));
        let acked = ledger.lock().unwrap().puts_acked;
        child.wait_for("puts answered after the restore", |_| {
            ledger.lock().unwrap().puts_acked > acked + 20
        });
        stop.store(true, Ordering::Relaxed);
        peer.join().unwrap();
        let lost = lost_puts(&ns, &ledger.lock().unwrap());
        stop_guest(&ns);
        let out = child.wait();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        if lossless {
            assert!(lost.is_empty(), "--net-commit remote lost acknowledged puts: {lost:?}");
        } else {
            eprintln!(
                "local commit, restored from the object store: {} acknowledged puts lost",
                lost.len()
            );
            assert!(
                !lost.is_empty(),
                "local commit lost nothing though the object store lags"
            );
        }
    }
}

/// `kv` with `disk=on`: every applied put is also appended to a log on the
/// disk; the guest's checksum and the image's log are the host reference's.
#[test]
#[cfg_attr(any(no_kvm, no_netns, no_tap), ignore = "needs /dev/kvm and a TAP in a netns")]
fn kv_logs_its_puts_on_the_disk() {
    if !kvm_ready() {
        return;
    }
    let Some(ns) = netns("kvdisk") else { return };
    let dir = tempdir("net-kv-disk");
    let image = dir.join("log.img");
    let bytes = 1u64 << 20;
    std::fs::File::create(&image).unwrap().set_len(bytes).unwrap();
    let spec = format!("kv,ip={GUEST_IP},wss=8M,disk=on,dsize=1M");
    let net = format!("tap={TAP},mac={GUEST_MAC}");
    let child = spawn(&mut consnap_in(
        &ns,
        &[
            "run",
            "--workload",
            &spec,
            "--net",
            &net,
            "--disk",
            image.to_str().unwrap(),
        ],
    ));
    // One at a time: the log's order is the order sent.
    let puts: Vec<(u64, u64)> = (0..150u64).map(|i| (i % 40, i + 1)).collect();
    let mut peer = Peer::new(ns.name()).unwrap();
    let mut it = puts.iter();
    peer.run(1, || it.next().map(|&(k, v)| ask(Op::Put, k, v)), |_| {}, deadline())
        .unwrap();
    let sum = stop_guest(&ns);
    let out = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut table = vec![0u64; (8 << 20) / 8];
    let mut disk = workload::MemDisk::new(bytes);
    let mut want = workload::kv::KvServer::new([0x52, 0x54, 0, 0x77, 0, 2], [10, 77, 0, 2], 7000, &mut table)
        .with_log(&mut disk, bytes);
    for (i, &(key, value)) in puts.iter().enumerate() {
        want.execute(&workload::kv::Request {
            seq: i as u64,
            op: Op::Put,
            key,
            value,
        });
    }
    want.flush().unwrap();
    assert_eq!(sum, want.checksum(), "the stop reply's checksum");
    assert_eq!(want.logged(), Some(150));
    assert!(
        std::fs::read(&image).unwrap() == disk.to_bytes(),
        "the disk's log differs from the reference"
    );
}
