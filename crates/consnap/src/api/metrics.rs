//! `GET /metrics`: the figures of `GET /stats` in the Prometheus text
//! exposition format (version 0.0.4).

use std::fmt::Write;

use super::VmState;
use super::board::{Board, snap_stats};
use crate::report::{Percentiles, Spread};

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn value(&mut self, name: &str, labels: &str, v: f64) {
        let v = if v.is_finite() { v } else { 0.0 };
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.head(name, kind, help);
        self.value(name, "", v);
    }

    /// A summary in seconds from percentiles in microseconds.
    fn latency(&mut self, name: &str, help: &str, p: &Percentiles, sum_s: f64) {
        self.head(name, "summary", help);
        for (q, us) in [("0.5", p.p50_us), ("0.99", p.p99_us), ("1", p.max_us)] {
            self.value(name, &format!("quantile=\"{q}\""), us / 1e6);
        }
        self.value(&format!("{name}_sum"), "", sum_s);
        self.value(&format!("{name}_count"), "", p.count as f64);
    }

    /// A summary of a per-epoch count.
    fn spread(&mut self, name: &str, help: &str, s: &Spread, count: usize) {
        self.head(name, "summary", help);
        self.value(name, "quantile=\"0.5\"", s.p50 as f64);
        self.value(name, "quantile=\"1\"", s.max as f64);
        self.value(&format!("{name}_sum"), "", s.total as f64);
        self.value(&format!("{name}_count"), "", count as f64);
    }
}

/// The metrics of `board`.
pub fn render(board: &Board) -> String {
    let mut o = Out(String::new());
    o.head("consnap_vm_state", "gauge", "1 for the state the VM is in.");
    for s in [VmState::Running, VmState::Paused, VmState::Stopping] {
        let v = if board.state == s { 1.0 } else { 0.0 };
        o.value("consnap_vm_state", &format!("state=\"{}\"", s.name()), v);
    }
    o.one(
        "consnap_uptime_seconds",
        "gauge",
        "Seconds since the VM was created or restored.",
        board.uptime_s(),
    );
    o.one("consnap_vcpus", "gauge", "vCPUs.", f64::from(board.vcpus));
    o.one("consnap_memory_bytes", "gauge", "Guest RAM.", board.mem_bytes as f64);
    if let Some(ops) = board.ops {
        o.one(
            "consnap_guest_ops_total",
            "counter",
            "Ops the workload guest has done.",
            ops as f64,
        );
    }
    if let Some(rate) = board.ops_rate() {
        o.one(
            "consnap_guest_ops_per_second",
            "gauge",
            "The workload guest's recent op rate.",
            rate,
        );
    }
    let probe_sum: f64 = board.probe.iter().map(|d| d.as_secs_f64()).sum::<f64>()
        + board
            .snap
            .as_ref()
            .map_or(0.0, |f| f.records.iter().map(|r| r.vcpu_pause.as_secs_f64()).sum());
    o.latency(
        "consnap_vcpu_pause_seconds",
        "Time to stop every vCPU (pause probes and snapshots).",
        &board.vcpu_pause(),
        probe_sum,
    );
    output(&mut o, board);
    let Some(f) = &board.snap else {
        return o.0;
    };
    let s = snap_stats(f);
    o.head("consnap_snapshot_mode", "gauge", "1 for the capture mode in use.");
    o.value("consnap_snapshot_mode", &format!("mode=\"{}\"", s.mode), 1.0);
    o.one(
        "consnap_snapshot_interval_seconds",
        "gauge",
        "Time between epochs.",
        s.interval_ms / 1e3,
    );
    o.one(
        "consnap_snapshot_epochs_committed_total",
        "counter",
        "Epochs committed (durable).",
        s.committed as f64,
    );
    o.one(
        "consnap_snapshot_errors_total",
        "counter",
        "Snapshot errors (failed epochs and others).",
        s.failed as f64,
    );
    let sum = |get: fn(&snapshot::EpochRecord) -> f64| f.records.iter().map(get).sum::<f64>();
    o.latency(
        "consnap_snapshot_pause_seconds",
        "Guest downtime per epoch.",
        &s.pause,
        sum(|r| r.pause.as_secs_f64()),
    );
    o.latency(
        "consnap_snapshot_durable_seconds",
        "Pause request to durable, per epoch.",
        &s.durable,
        sum(|r| r.durable.as_secs_f64()),
    );
    o.spread("consnap_snapshot_pages", "Data pages per epoch.", &s.pages, s.committed);
    o.spread(
        "consnap_snapshot_bytes",
        "Epoch file bytes per epoch.",
        &s.bytes,
        s.committed,
    );
    o.spread(
        "consnap_snapshot_faults",
        "Write-protect faults per epoch (cow).",
        &s.faults,
        s.committed,
    );
    o.one(
        "consnap_snapshot_save_bytes_per_second",
        "gauge",
        "Page bytes saved per second of writer or saver time.",
        s.save_mb_s * 1e6,
    );
    o.one(
        "consnap_snapshot_in_flight",
        "gauge",
        "1 while an epoch is being saved.",
        if s.in_flight.is_some() { 1.0 } else { 0.0 },
    );
    o.one(
        "consnap_snapshot_delayed_total",
        "counter",
        "Times an epoch was due while the previous one was still being saved.",
        s.delayed as f64,
    );
    o.one(
        "consnap_snapshot_delayed_seconds_total",
        "counter",
        "Total time epochs were late because of that.",
        s.delayed_ms / 1e3,
    );
    o.0
}

/// Output commit and the network devices.
fn output(o: &mut Out, board: &Board) {
    if let Some(g) = board.output_figures() {
        o.one(
            "consnap_output_held_frames",
            "gauge",
            "Frames (and console writes) waiting for their epoch to be durable.",
            g.held as f64,
        );
        o.one(
            "consnap_output_held_bytes",
            "gauge",
            "Their bytes.",
            g.held_bytes as f64,
        );
        o.one(
            "consnap_output_released_frames_total",
            "counter",
            "Frames (and console writes) sent once their epoch was durable.",
            g.released as f64,
        );
        o.one(
            "consnap_output_released_bytes_total",
            "counter",
            "Their bytes.",
            g.released_bytes as f64,
        );
        o.one(
            "consnap_output_at_cap_total",
            "counter",
            "Times output did not fit under --output-hold (the guest's TX queue waited).",
            g.at_cap as f64,
        );
        if let Some(l) = g.release_ms {
            o.head(
                "consnap_output_release_seconds",
                "summary",
                "From a frame made available to it written out.",
            );
            for (q, ms) in [("0.5", l.p50), ("0.99", l.p99), ("1", l.max)] {
                o.value("consnap_output_release_seconds", &format!("quantile=\"{q}\""), ms / 1e3);
            }
        }
    }
    let nets: Vec<_> = board.nets.iter().map(|n| crate::report::NetFigures::of(n)).collect();
    for (name, help, get) in [
        (
            "consnap_net_rx_frames_total",
            "Frames delivered to the guest.",
            (|n: &crate::report::NetFigures| n.rx_frames) as fn(&crate::report::NetFigures) -> u64,
        ),
        (
            "consnap_net_rx_dropped_total",
            "Received frames larger than the guest's buffers.",
            |n| n.rx_dropped,
        ),
        ("consnap_net_tx_frames_total", "Frames the guest sent.", |n| n.tx_frames),
        (
            "consnap_net_tx_bad_total",
            "Malformed TX chains completed unsent.",
            |n| n.tx_bad,
        ),
    ] {
        if nets.is_empty() {
            break;
        }
        o.head(name, "counter", help);
        for n in &nets {
            o.value(name, &format!("tap=\"{}\"", n.tap), get(n) as f64);
        }
    }
}
