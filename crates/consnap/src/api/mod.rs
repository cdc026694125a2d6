//! The control API: HTTP/1.1 with JSON bodies over a Unix socket
//! (docs/openapi.yaml). The server runs on a thread of its own; reads are
//! answered there from a board the controller publishes, and commands go
//! to the controller through a bounded channel with a reply channel, so
//! that no client can block the controller or the vCPUs.

pub mod board;
pub mod client;
pub mod conn;
pub mod metrics;
#[cfg(test)]
mod openapi_check;
pub mod server;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_conn;
#[cfg(test)]
mod tests_doc;

use serde::{Deserialize, Serialize};

use crate::report::{EpochEntry, Percentiles, Spread};

/// Every route the server answers, as (method, path); docs/openapi.yaml
/// documents exactly these (a test checks it).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/vm"),
    ("PUT", "/vm/pause"),
    ("PUT", "/vm/resume"),
    ("GET", "/snapshots"),
    ("PUT", "/snapshots/take"),
    ("GET", "/snapshots/config"),
    ("PATCH", "/snapshots/config"),
    ("GET", "/stats"),
    ("GET", "/metrics"),
];

/// What the VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The vCPUs run (snapshot pauses aside).
    Running,
    /// Paused through the API: the vCPUs stay stopped until resumed.
    Paused,
    /// The run is ending: the last epoch is being saved and the report written.
    Stopping,
}

impl VmState {
    /// The state's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
        }
    }
}

/// `GET /vm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// running, paused or stopping.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Seconds since the VM was created (or restored).
    pub uptime_s: f64,
    /// The workload guest's workload, if it runs one.
    pub workload: Option<String>,
    /// Ops the workload guest has published.
    pub ops: Option<u64>,
    /// Its ops per second over the last second or so.
    pub ops_per_s: Option<f64>,
    /// Whether snapshots are taken (`--snapshot-dir`).
    pub snapshots: bool,
}

/// `GET /snapshots/config`, and the answer to `PATCH /snapshots/config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapConfig {
    /// Snapshot directory.
    pub dir: String,
    /// Capture mode (a switch applies from the next epoch).
    pub mode: String,
    /// Time between epochs, as a duration (`20ms`).
    pub interval: String,
    /// The same in milliseconds.
    pub interval_ms: f64,
    /// The modes this run can switch to.
    pub modes: Vec<String>,
}

/// The body of `PATCH /snapshots/config`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    /// New interval, a duration such as `20ms` (1ms to 1 year).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// New mode: `stop-copy` or `stop-copy-full` (from either of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `GET /stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// running, paused or stopping.
    pub state: VmState,
    /// Seconds since the VM was created (or restored).
    pub uptime_s: f64,
    /// Ops the workload guest has published.
    pub ops: Option<u64>,
    /// Its ops per second over the last second or so.
    pub ops_per_s: Option<f64>,
    /// Latency of stopping every vCPU, over pause probes and snapshots.
    pub vcpu_pause: Percentiles,
    /// Snapshot figures (null without `--snapshot-dir`).
    pub snapshots: Option<SnapStats>,
    /// Replication to an object store (null without `--replicate`).
    #[serde(default)]
    pub replication: Option<crate::report::Replication>,
    /// Output commit: held, released, at the cap, release latency (null
    /// without a network or `--console-commit epoch`).
    #[serde(default)]
    pub output: Option<crate::report::OutputFigures>,
    /// Each network device's counters.
    #[serde(default)]
    pub nets: Vec<crate::report::NetFigures>,
}

/// Snapshot figures of `GET /stats`, over the whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapStats {
    /// Capture mode.
    pub mode: String,
    /// Interval in milliseconds.
    pub interval_ms: f64,
    /// Epochs committed.
    pub committed: usize,
    /// Snapshot errors (failed epochs and others).
    pub failed: usize,
    /// The last few error messages, oldest first.
    pub errors: Vec<String>,
    /// Guest downtime per epoch.
    pub pause: Percentiles,
    /// Pause request to durable, per epoch.
    pub durable: Percentiles,
    /// Data pages per epoch.
    pub pages: Spread,
    /// File bytes per epoch.
    pub bytes: Spread,
    /// Write-protect faults per epoch (cow).
    pub faults: Spread,
    /// Page bytes saved per second of writer or saver time, in MB/s.
    pub save_mb_s: f64,
    /// The epoch being saved now, if any.
    pub in_flight: Option<u64>,
    /// Times an epoch was due while the previous one was still being saved
    /// (the interval then stretched).
    pub delayed: u64,
    /// Total time epochs were late because of that.
    pub delayed_ms: f64,
    /// Times an epoch waited for the store to fall under --max-store or
    /// --max-chain.
    pub space_waits: u64,
    /// Total time epochs waited for that.
    pub space_wait_ms: f64,
    /// `--cow-tracker auto`: what the engine chose (null otherwise).
    pub adaptive: Option<crate::report::Adaptive>,
    /// The last committed epoch.
    pub last: Option<EpochEntry>,
}

/// The body of every error answer: one line of JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}
