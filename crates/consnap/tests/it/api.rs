//! The control API end to end: a run driven through `--api-sock` with
//! `consnap ctl` and raw requests (pause, resume, snapshot now, interval
//! and mode changes, stats, metrics, bad requests, stuck clients) keeps its
//! checksum, and so does an epoch taken while the VM was paused; every
//! answer matches docs/openapi.yaml (the drift check against a real
//! server); the socket's rules (0600, stale replaced, live refused).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

#[path = "../../src/api/openapi_check.rs"]
mod openapi_check;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use common::*;
use openapi_check::Document;
use serde_json::Value;

/// `consnap ctl --sock SOCK --json ARGS`, which must succeed.
#[track_caller]
fn ctl(sock: &Path, args: &[&str]) -> Value {
    let out = run_ok(consnap().arg("ctl").arg("--sock").arg(sock).arg("--json").args(args));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `consnap ctl` that must fail; returns its stderr.
#[track_caller]
fn ctl_fails(sock: &Path, args: &[&str]) -> String {
    let out = output(consnap().arg("ctl").arg("--sock").arg(sock).args(args));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "ctl {args:?} should fail: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

/// An answer read off the socket: status, Content-Type and body.
struct Raw {
    status: u16,
    content_type: String,
    body: String,
}

/// Send raw bytes, read the answer until the server closes.
fn raw_answer(sock: &Path, request: &[u8]) -> Raw {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map_or(String::new(), |(_, v)| v.trim().to_string());
    Raw {
        status,
        content_type,
        body: body.to_string(),
    }
}

/// Send raw bytes; (status, body).
fn raw(sock: &Path, request: &[u8]) -> (u16, String) {
    let a = raw_answer(sock, request);
    (a.status, a.body)
}

/// `METHOD path` with `body`, whose answer must match docs/openapi.yaml;
/// (status, body). Documented operations that answered 2xx go in `ok`.
#[track_caller]
fn checked(
    doc: &Document,
    ok: &mut BTreeSet<(String, String)>,
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let a = raw_answer(sock, &request(method, path, body));
    let bare = path.split('?').next().unwrap_or(path);
    let documented = doc.operations().contains(&(method.to_string(), bare.to_string()));
    let verdict = if documented {
        doc.check(method, bare, a.status, &a.content_type, a.body.as_bytes())
    } else {
        // Not an operation: the answer is the document's error body.
        let v: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", a.body));
        doc.check_schema("Error", &v)
    };
    if let Err(e) = verdict {
        panic!("docs/openapi.yaml does not describe the answer: {e}\n{}", a.body);
    }
    if documented && (200..300).contains(&a.status) {
        ok.insert((method.to_string(), bare.to_string()));
    }
    (a.status, a.body)
}

fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: consnap\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A 4xx answer whose body is one line of JSON with an error message.
#[track_caller]
fn assert_json_error(answer: (u16, String), want: u16, what: &str) {
    let (status, body) = answer;
    assert_eq!(status, want, "{what}: {body}");
    assert_eq!(body.trim_end().lines().count(), 1, "{what}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {body}");
}

/// Every sample line is `name{labels} value`, and every name has HELP and TYPE.
fn check_prometheus(text: &str) {
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let base = name.split('{').next().unwrap();
        assert!(
            base.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "bad name in {line:?}"
        );
        let family = base.trim_end_matches("_sum").trim_end_matches("_count");
        assert!(typed.contains(base) || typed.contains(family), "no TYPE for {line:?}");
    }
}

fn ops(sock: &Path) -> u64 {
    ctl(sock, &["status"])["ops"].as_u64().unwrap_or(0)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_run_driven_through_the_api_keeps_its_checksum() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("api-run");
    let snaps = dir.join("snaps");
    let sock = dir.join("api.sock");
    let report = dir.join("report.json");
    let spec = "memstress,wss=32M,ops=2400000,seed=7,rate=200000";
    let mut child = spawn(
        consnap()
            .args(["run", "--workload", spec, "--mode", "stop-copy", "--interval", "200ms"])
            .arg("--snapshot-dir")
            .arg(&snaps)
            // The epoch taken while paused is restored at the end: keep it.
            .args(["--retain", "all"])
            .arg("--api-sock")
            .arg(&sock)
            .arg("--report")
            .arg(&report),
    );
    child.wait_for("the API socket", |_| sock.exists());
    let mode = std::fs::symlink_metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is {mode:o}");

    let vm = ctl(&sock, &["status"]);
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["vcpus"], 1);
    assert_eq!(vm["workload"], "memstress");
    assert_eq!(vm["snapshots"], true);

    // Paused: the guest makes no progress, snapshots go on, the VM stays paused.
    child.wait_for("guest progress", |_| ops(&sock) > 10_000);
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused");
    let held = ops(&sock);
    let before = epoch_count(&snaps);
    child.wait_for("epochs while paused", |_| epoch_count(&snaps) >= before + 2);
    let taken = ctl(&sock, &["snapshot"]);
    let paused_epoch = taken["id"].as_u64().unwrap();
    assert_eq!(ctl(&sock, &["status"])["state"], "paused");
    assert_eq!(ops(&sock), held, "the guest ran while paused");
    let listed = ls(&snaps);
    let row = listed.iter().find(|r| r["id"] == paused_epoch).unwrap();
    assert_eq!(row["guest_ops"].as_u64(), Some(held), "{row}");
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused", "pausing twice is harmless");
    assert_eq!(ctl(&sock, &["resume"])["state"], "running");
    child.wait_for("progress after resume", |_| ops(&sock) > held);

    // Snapshot now, while running: durable when answered.
    let e = ctl(&sock, &["snapshot"]);
    let id = e["id"].as_u64().unwrap();
    assert!(id > paused_epoch);
    assert!(snaps.join("epochs").join(format!("{id:020}.epoch")).exists());
    assert!(e["durable_ms"].as_f64().unwrap() > 0.0, "{e}");
    let api_ls = ctl(&sock, &["ls"]);
    assert!(
        api_ls
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == id && r["restorable"] == true)
    );

    // Interval and mode at run time. At 1 h no periodic epoch is due (one
    // may still be under way): the ten that come next come from the new
    // interval, or the harness deadline fails the test.
    assert_eq!(ctl(&sock, &["set", "interval=1h"])["interval"], "1h");
    let n = epoch_count(&snaps);
    let c = ctl(&sock, &["set", "interval=20ms"]);
    assert_eq!(c["interval"], "20ms");
    assert_eq!(ctl(&sock, &["config"])["interval_ms"], 20.0);
    child.wait_for("epochs at 20ms", |_| epoch_count(&snaps) >= n + 11);
    let c = ctl(&sock, &["set", "mode=stop-copy-full", "interval=100ms"]);
    assert_eq!(
        (c["mode"].as_str(), c["interval"].as_str()),
        (Some("stop-copy-full"), Some("100ms"))
    );
    let full = ctl(&sock, &["snapshot"]);
    assert_eq!(full["full"], true, "{full}");
    assert_eq!(ctl(&sock, &["set", "mode=stop-copy"])["mode"], "stop-copy");
    let next = ctl(&sock, &["snapshot"]);
    // The first stop-copy epoch after the switch is full: this one, or a
    // periodic epoch (100 ms) that came between the switch and it.
    let full_id = full["id"].as_u64().unwrap();
    let listed = ls(&snaps);
    let first = listed
        .iter()
        .filter(|r| r["id"].as_u64().unwrap() > full_id && r["mode"] == "stop-copy")
        .min_by_key(|r| r["id"].as_u64().unwrap())
        .unwrap();
    assert!(first["id"].as_u64() <= next["id"].as_u64(), "{first} {next}");
    assert_eq!(
        first["full"], true,
        "the first stop-copy epoch after a switch is full: {first}"
    );
    let incr = ctl(&sock, &["snapshot"]);
    assert_eq!(incr["full"], false, "{incr}");
    let err = ctl_fails(&sock, &["set", "mode=cow"]);
    assert!(
        err.contains("cannot switch from stop-copy to cow") && err.contains("(409)"),
        "{err}"
    );
    let err = ctl_fails(&sock, &["set", "interval=0.5ms"]);
    assert!(err.contains("(400)"), "{err}");

    // Stats and metrics.
    let s = ctl(&sock, &["stats"]);
    let snap = &s["snapshots"];
    assert!(snap["committed"].as_u64().unwrap() >= 10, "{s}");
    assert_eq!(snap["failed"], 0, "{s}");
    assert!(snap["pause"]["p99_us"].as_f64().unwrap() > 0.0, "{s}");
    assert!(snap["durable"]["max_us"].as_f64().unwrap() > 0.0, "{s}");
    assert!(snap["pages"]["total"].as_u64().unwrap() > 0, "{s}");
    assert!(snap["save_mb_s"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["vcpu_pause"]["count"].as_u64().unwrap() > 0, "{s}");
    let metrics = run_ok(consnap().arg("ctl").arg("--sock").arg(&sock).arg("metrics"));
    let text = String::from_utf8(metrics.stdout).unwrap();
    check_prometheus(&text);
    for name in [
        "consnap_vm_state{state=\"running\"} 1",
        "consnap_snapshot_epochs_committed_total ",
        "consnap_snapshot_pause_seconds{quantile=\"0.99\"} ",
        "consnap_snapshot_durable_seconds_count ",
        "consnap_snapshot_pages_sum ",
        "consnap_snapshot_save_bytes_per_second ",
        "consnap_snapshot_in_flight ",
        "consnap_guest_ops_total ",
    ] {
        assert!(text.contains(name), "no {name} in\n{text}");
    }

    // Every operation's answers, and the errors, match docs/openapi.yaml
    // (the drift check against a real server).
    let doc = Document::load();
    let mut ok = BTreeSet::new();
    for (method, path, body, want) in [
        ("GET", "/vm", "", 200),
        ("PUT", "/vm/pause", "", 200),
        ("GET", "/stats", "", 200),
        ("PUT", "/snapshots/take", "", 200),
        ("PUT", "/vm/resume", "", 200),
        ("GET", "/snapshots", "", 200),
        ("GET", "/snapshots/config", "", 200),
        ("PATCH", "/snapshots/config", r#"{"interval":"100ms"}"#, 200),
        ("PUT", "/snapshots/take", "", 200),
        ("GET", "/stats", "", 200),
        ("GET", "/metrics", "", 200),
        ("PATCH", "/snapshots/config", r#"{"mode":"cow"}"#, 409),
        // Bad requests: one-line JSON errors, and the VM does not notice.
        ("GET", "/nope", "", 404),
        ("DELETE", "/vm", "", 405),
        ("GET", "/stats?full=1", "", 400),
        ("PATCH", "/snapshots/config", "{\"interval\":", 400),
        ("PATCH", "/snapshots/config", "{\"interval\":\"1s\",\"x\":1}", 400),
        ("PATCH", "/snapshots/config", "{\"mode\":null}", 400),
        ("PATCH", "/snapshots/config", &"x".repeat(20_000), 413),
    ] {
        let (status, text) = checked(&doc, &mut ok, &sock, method, path, body);
        assert_eq!(status, want, "{method} {path}: {text}");
        if status >= 400 {
            assert_json_error((status, text), want, &format!("{method} {path}"));
        }
    }
    assert_eq!(ok, doc.operations(), "not every documented operation was checked");
    let wrong_type = b"PATCH /snapshots/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}";
    let a = raw_answer(&sock, wrong_type);
    doc.check(
        "PATCH",
        "/snapshots/config",
        a.status,
        &a.content_type,
        a.body.as_bytes(),
    )
    .unwrap();
    assert_eq!(a.status, 415, "{}", a.body);
    for garbage in [&b"NOT HTTP AT ALL\r\n\r\n"[..], b"\x00\x01garbage\r\n\r\n"] {
        assert_json_error(raw(&sock, garbage), 400, "a byte stream that is not HTTP");
    }

    // Stuck clients (half-sent headers and bodies, idle connections far
    // beyond the limit of 32) block neither capture nor other clients: a
    // client is answered while they are all open.
    let stuck: Vec<UnixStream> = (0..8)
        .map(|i| {
            let mut s = UnixStream::connect(&sock).unwrap();
            let half: &[u8] = if i % 2 == 0 {
                b"PATCH /snapshots/config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            } else {
                b"GET /stats HTTP/1.1\r\nHost: x\r\n"
            };
            s.write_all(half).unwrap();
            s
        })
        .collect();
    let idle: Vec<UnixStream> = (0..64).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    let n = epoch_count(&snaps);
    let a = raw_answer(&sock, &request("GET", "/vm", ""));
    assert_eq!(a.status, 200, "a client among stuck ones: {}", a.body);
    doc.check("GET", "/vm", a.status, &a.content_type, a.body.as_bytes())
        .unwrap();
    child.wait_for("epochs while clients are stuck", |_| epoch_count(&snaps) >= n + 5);
    assert_eq!(ctl(&sock, &["status"])["state"], "running");
    drop(idle);
    drop(stuck);

    let out = child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(" epochs, last pause "),
        "no live status line on stderr:\n{err}"
    );
    assert!(!sock.exists(), "the socket outlived the run");
    let r = read_report(&report);
    let want = reference(spec, 1).1;
    assert_eq!(r["checksum"], want.as_str());
    assert_eq!(r["snapshots"]["failed"], 0, "{}", r["snapshots"]);

    // The epoch taken while paused restores to the same end.
    let rr = restore(&snaps, &paused_epoch.to_string(), &["--quiet"], &dir.join("rr.json"));
    assert_eq!(rr["checksum"], want.as_str());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_socket_is_private_a_stale_one_is_replaced_a_live_one_refused() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("api-sock");
    let quick = [
        "run",
        "--workload",
        "memstress,ops=1000",
        "--pause-probe",
        "0",
        "--api-sock",
    ];
    // Left behind by a process that died: nobody listens.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    run_ok(consnap().args(quick).arg(&stale));
    assert!(!stale.exists(), "the socket outlived the run");

    let live = dir.join("live.sock");
    let _listener = UnixListener::bind(&live).unwrap();
    let out = output(consnap().args(quick).arg(&live));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("a process is listening there"), "{err}");
    assert!(out.stdout.is_empty(), "the VM ran");
    assert!(live.exists(), "another process's socket was removed");

    let file = dir.join("file");
    std::fs::write(&file, b"keep").unwrap();
    let out = output(consnap().args(quick).arg(&file));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    // Without snapshots, the snapshot endpoints refuse with 409.
    let sock = dir.join("api.sock");
    let mut child = spawn(
        consnap()
            .args(["run", "--workload", "memstress,ops=3000000,rate=500000", "--api-sock"])
            .arg(&sock),
    );
    child.wait_for("the API socket", |_| sock.exists());
    for args in [&["snapshot"][..], &["ls"], &["config"], &["set", "interval=1s"]] {
        let err = ctl_fails(&sock, args);
        assert!(
            err.contains("snapshots are off") && err.contains("(409)"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(ctl(&sock, &["stats"])["snapshots"], Value::Null);
    let doc = Document::load();
    let mut ok = BTreeSet::new();
    for (method, path, body, want) in [
        ("GET", "/vm", "", 200),
        ("GET", "/stats", "", 200),
        ("GET", "/metrics", "", 200),
        ("GET", "/snapshots", "", 409),
        ("PUT", "/snapshots/take", "", 409),
        ("GET", "/snapshots/config", "", 409),
        ("PATCH", "/snapshots/config", r#"{"interval":"1s"}"#, 409),
    ] {
        let (status, text) = checked(&doc, &mut ok, &sock, method, path, body);
        assert_eq!(status, want, "{method} {path}: {text}");
    }
    child.stop(libc::SIGTERM);
    assert!(!sock.exists());
    let err = ctl_fails(&sock, &["status"]);
    assert!(err.contains("cannot connect"), "{err}");
}
