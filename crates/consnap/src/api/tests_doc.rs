//! The drift check without a VM: every report type the API answers with,
//! filled in completely (every optional part present), is validated
//! against docs/openapi.yaml's schema for its operation. The end-to-end
//! test (tests/it/api.rs) validates a real server's answers the same way.

use serde::Serialize;

use super::openapi_check::Document;
use super::{SnapConfig, SnapStats, Stats, VmInfo, VmState};
use crate::ls_cmd::Row;
use crate::report::{EpochEntry, Latency, NetFigures, OutputFigures, Percentiles, Replication, Spread};

fn epoch() -> EpochEntry {
    EpochEntry {
        id: 7,
        parent: Some(6),
        full: false,
        pages: 10,
        zero_pages: 1,
        bytes: 45_000,
        pause_us: 800.0,
        vcpu_pause_us: 30.0,
        durable_ms: 4.5,
        save_ms: 3.0,
        faults: 2,
        copied_aside: 2,
        captured: 3,
        aside_waits: 0,
        protect_calls: 1,
        examined: 5,
        tracking_faults: 1,
        copied_in_pause: 4,
        fault_service_us: 12.0,
        fault_max_us: 6.0,
        dirty_us: 100.0,
        capture_us: 600.0,
        tracker: Some("dirty-log".into()),
        choice: Some("copy-in-pause".into()),
        predicted_uffd_us_per_s: Some(450000.0),
        predicted_dirty_log_us_per_s: Some(15000.0),
    }
}

fn percentiles() -> Percentiles {
    Percentiles {
        count: 3,
        p50_us: 10.0,
        p99_us: 20.0,
        max_us: 30.0,
    }
}

fn spread() -> Spread {
    Spread {
        total: 9,
        p50: 3,
        max: 5,
    }
}

fn snap_stats() -> SnapStats {
    SnapStats {
        mode: "stop-copy".into(),
        interval_ms: 20.0,
        committed: 3,
        failed: 1,
        errors: vec!["epoch 4: disk full".into()],
        pause: percentiles(),
        durable: percentiles(),
        pages: spread(),
        bytes: spread(),
        faults: spread(),
        save_mb_s: 900.0,
        in_flight: Some(8),
        delayed: 2,
        delayed_ms: 13.0,
        space_waits: 1,
        space_wait_ms: 40.0,
        adaptive: Some(crate::report::Adaptive {
            epochs_uffd: 8,
            epochs_dirty_log: 30,
            switches: 1,
            copied_in_pause: 29,
            protected: 1,
            predicted_ms: 12.5,
            measured_ms: 3.0,
        }),
        last: Some(epoch()),
    }
}

fn replication() -> Replication {
    Replication {
        url: "s3://bucket/prefix".into(),
        newest_epoch: Some(6),
        lag_s: Some(0.5),
        remote_epochs: 6,
        backlog_epochs: 1,
        backlog_bytes: 4096,
        remote_step_s: Some(0.02),
        merged_uploads: 1,
        covered_epochs: 2,
        uploaded_objects: 8,
        uploaded_bytes: 1 << 20,
        deleted_objects: 1,
        manifests: 2,
        upload_mb_s: Some(50.0),
        error: Some("connection refused".into()),
        backlog_limit_bytes: 1 << 30,
        overflow: "throttle".into(),
        over_limit_s: 0.0,
    }
}

fn output() -> OutputFigures {
    OutputFigures {
        commit: true,
        held: 1,
        held_bytes: 60,
        released: 10,
        released_bytes: 600,
        dropped_at_exit: 0,
        held_bytes_max: 120,
        at_cap: 0,
        send_errors: 0,
        release_ms: Some(Latency {
            p50: 1.0,
            p99: 2.0,
            max: 3.0,
        }),
    }
}

fn net() -> NetFigures {
    NetFigures {
        tap: "tap0".into(),
        mac: "52:54:00:12:34:56".into(),
        rx_frames: 1,
        rx_bytes: 60,
        rx_dropped: 0,
        tx_frames: 2,
        tx_bytes: 120,
        tx_bad: 0,
    }
}

fn stats(full: bool) -> Stats {
    Stats {
        state: VmState::Running,
        uptime_s: 1.5,
        ops: full.then_some(1000),
        ops_per_s: full.then_some(700.0),
        vcpu_pause: percentiles(),
        snapshots: full.then(snap_stats),
        replication: full.then(replication),
        output: full.then(output),
        nets: if full { vec![net()] } else { Vec::new() },
    }
}

fn rows() -> Vec<Row> {
    let mut sound = Row::default();
    sound.id = Some(7);
    sound.file = "00000000000000000007.epoch".into();
    sound.parent = Some(6);
    sound.created_ns = 1_700_000_000_000_000_000;
    sound.time = "2023-11-14 22:13:20.000".into();
    sound.mode = "stop-copy".into();
    sound.pages = 10;
    sound.bytes = 45_000;
    sound.guest_ops = Some(1000);
    sound.restorable = true;
    sound.tier = Some("10s:all".into());
    sound.chain = Some(2);
    sound.compression = "lz4".into();
    sound.merged = 3;
    let mut damaged = Row::default();
    damaged.file = "stray.tmp".into();
    damaged.damaged = true;
    damaged.error = Some("not an epoch file".into());
    damaged.parent_missing = true;
    damaged.chain_error = Some("epoch 5 is missing".into());
    vec![sound, damaged]
}

/// Validate `value` as the answer to `METHOD path`; a mismatch goes in `wrong`.
fn check(doc: &Document, wrong: &mut Vec<String>, method: &str, path: &str, value: &impl Serialize) {
    let body = serde_json::to_vec(value).unwrap();
    if let Err(e) = doc.check(method, path, 200, "application/json", &body) {
        wrong.push(e);
    }
}

#[test]
fn every_report_matches_the_document() {
    let doc = Document::load();
    let mut wrong = Vec::new();
    let vm = VmInfo {
        state: VmState::Paused,
        vcpus: 2,
        mem_bytes: 256 << 20,
        uptime_s: 3.0,
        workload: Some("memstress".into()),
        ops: Some(5),
        ops_per_s: Some(0.0),
        snapshots: true,
    };
    for path in ["/vm", "/vm/pause", "/vm/resume"] {
        check(&doc, &mut wrong, if path == "/vm" { "GET" } else { "PUT" }, path, &vm);
    }
    let config = SnapConfig {
        dir: "/tmp/snaps".into(),
        mode: "stop-copy".into(),
        interval: "20ms".into(),
        interval_ms: 20.0,
        modes: vec!["stop-copy".into(), "stop-copy-full".into()],
    };
    check(&doc, &mut wrong, "GET", "/snapshots/config", &config);
    check(&doc, &mut wrong, "PATCH", "/snapshots/config", &config);
    check(&doc, &mut wrong, "PUT", "/snapshots/take", &epoch());
    check(&doc, &mut wrong, "GET", "/snapshots", &rows());
    check(&doc, &mut wrong, "GET", "/stats", &stats(true));
    check(&doc, &mut wrong, "GET", "/stats", &stats(false));
    assert!(
        wrong.is_empty(),
        "docs/openapi.yaml does not describe these answers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn a_field_the_document_lacks_fails_the_check() {
    let doc = Document::load();
    let mut v = serde_json::to_value(epoch()).unwrap();
    v["new_figure"] = serde_json::json!(1);
    let err = doc
        .check(
            "PUT",
            "/snapshots/take",
            200,
            "application/json",
            v.to_string().as_bytes(),
        )
        .unwrap_err();
    assert!(err.contains("new_figure"), "{err}");
    let err = doc.check("GET", "/vm", 418, "application/json", b"{}").unwrap_err();
    assert!(err.contains("not documented"), "{err}");
}
