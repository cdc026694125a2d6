//! The JSON run report (schema in docs/REPORT.md).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snapshot::{EpochRecord, Mode, SnapshotEngine};
use thiserror::Error;

/// Report schema identifier; bump when fields change meaning.
pub const SCHEMA: &str = "consnap.report/1";

/// Percentiles of a set of durations, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Maximum.
    pub max_us: f64,
}

fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

impl Percentiles {
    /// Compute from samples (nearest-rank).
    pub fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        Self {
            count: v.len(),
            p50_us: nearest_rank(&v, 0.50),
            p99_us: nearest_rank(&v, 0.99),
            max_us: v[v.len() - 1],
        }
    }
}

/// Distribution of a per-epoch count.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spread {
    /// Sum over epochs.
    pub total: u64,
    /// Median.
    pub p50: u64,
    /// Maximum.
    pub max: u64,
}

impl Spread {
    fn of(values: impl Iterator<Item = u64>) -> Self {
        let mut v: Vec<u64> = values.collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        Self {
            total: v.iter().sum(),
            p50: v[v.len().div_ceil(2) - 1],
            max: v[v.len() - 1],
        }
    }
}

/// One committed epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochEntry {
    /// Epoch id.
    pub id: u64,
    /// Parent epoch (null for full epochs).
    pub parent: Option<u64>,
    /// Full epoch.
    pub full: bool,
    /// Pages written with data.
    pub pages: u64,
    /// Pages recorded as zero.
    pub zero_pages: u64,
    /// Epoch file size.
    pub bytes: u64,
    /// Guest downtime.
    pub pause_us: f64,
    /// Of which: stopping the vCPUs.
    pub vcpu_pause_us: f64,
    /// Pause request to durable.
    pub durable_ms: f64,
    /// Resume to commit: the writer's or saver's time.
    pub save_ms: f64,
    /// Write-protect faults the guest took on this epoch's pages (cow).
    pub faults: u64,
    /// Pages the fault handler copied aside (cow).
    pub copied_aside: u64,
    /// Pages copied aside in all, on faults or ahead of the saver (cow).
    pub captured: u64,
    /// Times the fault handler waited for copy-aside memory (cow).
    pub aside_waits: u64,
    /// Write-protect calls made while paused (cow).
    pub protect_calls: u64,
    /// Pages whose hash was compared with the last epoch's (cow, `uffd` tracker).
    pub examined: u64,
    /// Faults that only told the `uffd` tracker a block was written.
    pub tracking_faults: u64,
    /// Pages of hot blocks copied during the pause and left writable (cow, `uffd`).
    pub copied_in_pause: u64,
    /// Time the fault handler spent serving this epoch's faults (cow).
    pub fault_service_us: f64,
    /// The longest single fault service (cow).
    pub fault_max_us: f64,
    /// Of the pause: taking and re-arming the dirty set.
    pub dirty_us: f64,
    /// Of the pause: copying (stop-copy) or write-protecting (cow) the pages.
    pub capture_us: f64,
    /// `--cow-tracker auto`: the tracker that found this epoch's pages
    /// (`uffd` or `dirty-log`; null for other modes).
    #[serde(default)]
    pub tracker: Option<String>,
    /// `--cow-tracker auto`: `protect`, `copy-in-pause` (a dirty-log epoch's
    /// pages all copied while paused) or `switch` (the tracker changed at
    /// this pause).
    #[serde(default)]
    pub choice: Option<String>,
    /// `--cow-tracker auto`: the cost model's prediction, from the epoch
    /// before, of what each tracker costs the vCPUs, µs per second.
    #[serde(default)]
    pub predicted_uffd_us_per_s: Option<f64>,
    #[serde(default)]
    pub predicted_dirty_log_us_per_s: Option<f64>,
}

/// The name a report gives a tracker.
fn tracker_name(t: snapshot::Tracker) -> &'static str {
    match t {
        snapshot::Tracker::Uffd => "uffd",
        snapshot::Tracker::DirtyLog => "dirty-log",
    }
}

/// What `--cow-tracker auto` chose over a run: epochs per tracker and per
/// choice, and the cost it predicted for its choices against what was
/// measured of them (fault service and pause copies; KVM's own dirty-log
/// faults are not visible to consnap).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Adaptive {
    pub epochs_uffd: u64,
    pub epochs_dirty_log: u64,
    pub switches: u64,
    /// Dirty-log epochs copied during the pause, and those protected.
    pub copied_in_pause: u64,
    pub protected: u64,
    pub predicted_ms: f64,
    pub measured_ms: f64,
}

impl Adaptive {
    /// From the epochs' records; `None` when no epoch was chosen adaptively.
    pub fn of(records: &[EpochRecord]) -> Option<Adaptive> {
        let mut a = Adaptive::default();
        let mut any = false;
        for r in records {
            let Some(c) = r.stats.choice else { continue };
            any = true;
            match c.tracker {
                snapshot::Tracker::Uffd => a.epochs_uffd += 1,
                snapshot::Tracker::DirtyLog if c.copied_in_pause => a.copied_in_pause += 1,
                snapshot::Tracker::DirtyLog => a.protected += 1,
            }
            a.switches += u64::from(c.switched);
            let rate = match c.tracker {
                snapshot::Tracker::Uffd => c.predicted.uffd_us_per_s,
                snapshot::Tracker::DirtyLog => c.predicted.dirty_log_us_per_s,
            };
            a.predicted_ms += rate * c.span.as_secs_f64() / 1e3;
            let pause_copy = if c.copied_in_pause {
                r.stats.capture_time
            } else {
                Duration::ZERO
            };
            a.measured_ms += (r.stats.fault_time + pause_copy).as_secs_f64() * 1e3;
        }
        a.epochs_dirty_log = a.copied_in_pause + a.protected;
        any.then_some(a)
    }
}

impl From<&EpochRecord> for EpochEntry {
    fn from(r: &EpochRecord) -> Self {
        Self {
            id: r.id,
            parent: r.parent,
            full: r.full,
            pages: r.pages_data,
            zero_pages: r.pages_zero,
            bytes: r.bytes,
            pause_us: r.pause.as_secs_f64() * 1e6,
            vcpu_pause_us: r.vcpu_pause.as_secs_f64() * 1e6,
            durable_ms: r.durable.as_secs_f64() * 1e3,
            save_ms: r.stats.save_time.as_secs_f64() * 1e3,
            faults: r.stats.faults,
            copied_aside: r.stats.pages_copied_aside,
            captured: r.stats.pages_captured,
            aside_waits: r.stats.aside_waits,
            protect_calls: r.stats.protect_calls,
            examined: r.stats.pages_examined,
            tracking_faults: r.stats.tracking_faults,
            copied_in_pause: r.stats.pages_in_pause,
            fault_service_us: r.stats.fault_time.as_secs_f64() * 1e6,
            fault_max_us: r.stats.fault_max.as_secs_f64() * 1e6,
            dirty_us: r.stats.dirty_time.as_secs_f64() * 1e6,
            capture_us: r.stats.capture_time.as_secs_f64() * 1e6,
            tracker: r.stats.choice.map(|c| tracker_name(c.tracker).to_string()),
            choice: r.stats.choice.map(|c| {
                if c.switched {
                    "switch"
                } else if c.copied_in_pause {
                    "copy-in-pause"
                } else {
                    "protect"
                }
                .to_string()
            }),
            predicted_uffd_us_per_s: r.stats.choice.map(|c| c.predicted.uffd_us_per_s),
            predicted_dirty_log_us_per_s: r.stats.choice.map(|c| c.predicted.dirty_log_us_per_s),
        }
    }
}

/// Snapshot figures of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshots {
    /// Snapshot directory.
    pub dir: String,
    /// Mode.
    pub mode: String,
    /// Interval in milliseconds.
    pub interval_ms: f64,
    /// Committed epochs.
    pub count: usize,
    /// Failed attempts.
    pub failed: usize,
    /// Times a snapshot was due while the previous one was still being saved
    /// (the interval then stretches until it is durable).
    pub delayed: u64,
    /// Total time snapshots were late because of that.
    pub delayed_ms: f64,
    /// Times a snapshot over a second late made the writer run at the
    /// vCPUs' priority until the one before it was saved.
    pub urgent: u64,
    /// Times a snapshot waited for the store to fall under --max-store.
    pub space_waits: u64,
    /// Total time snapshots waited for that.
    pub space_wait_ms: f64,
    /// Preparing the capture before the vCPUs started (cow: registering
    /// and write-protecting all of RAM).
    pub arm_ms: f64,
    /// Error messages.
    pub errors: Vec<String>,
    /// Guest downtime per epoch.
    pub pause: Percentiles,
    /// Stopping the vCPUs, per epoch.
    pub vcpu_pause: Percentiles,
    /// Pause request to durable, per epoch.
    pub durable: Percentiles,
    /// Data pages per epoch.
    pub pages: Spread,
    /// File bytes per epoch.
    pub bytes: Spread,
    /// Write-protect faults per epoch (cow).
    pub faults: Spread,
    /// Page bytes saved per second of writer or saver time.
    pub save_mb_s: f64,
    /// `--cow-tracker auto`: what the engine chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<Adaptive>,
    /// Every committed epoch.
    pub epochs: Vec<EpochEntry>,
}

/// What the snapshot figures are computed from: a copy of the engine's
/// configuration, records and counters, which the controller keeps up to
/// date (appending only what is new) so that other threads can compute
/// figures without touching the engine.
#[derive(Debug, Clone)]
pub struct EngineFigures {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Mode (the one set last).
    pub mode: Mode,
    /// Interval (the one set last).
    pub interval: Duration,
    /// Committed epochs, in order.
    pub records: Vec<EpochRecord>,
    /// Snapshot errors, in order.
    pub errors: Vec<String>,
    /// Times an epoch was due while the previous one was still being saved.
    pub overloads: u64,
    /// Total time epochs were late because of that.
    pub overload_time: Duration,
    /// Times the writer was made urgent.
    pub urgent: u64,
    /// Times an epoch waited for the store to fall under --max-store.
    pub space_waits: u64,
    /// Total time epochs waited for that.
    pub space_wait_time: Duration,
    /// Preparing the capture.
    pub arm_time: Duration,
    /// The epoch being saved, if any.
    pub in_flight: Option<u64>,
}

impl EngineFigures {
    /// The figures of `e`.
    pub fn new(e: &SnapshotEngine) -> Self {
        let mut f = Self {
            dir: e.config().dir.clone(),
            mode: e.config().mode,
            interval: e.config().interval,
            records: Vec::new(),
            errors: Vec::new(),
            overloads: 0,
            overload_time: Duration::ZERO,
            urgent: 0,
            space_waits: 0,
            space_wait_time: Duration::ZERO,
            arm_time: Duration::ZERO,
            in_flight: None,
        };
        f.update(e);
        f
    }

    /// Catch up with `e`: copy what changed, append new records and errors.
    pub fn update(&mut self, e: &SnapshotEngine) {
        self.mode = e.config().mode;
        self.interval = e.config().interval;
        self.overloads = e.overloads;
        self.overload_time = e.overload_time;
        self.urgent = e.urgent;
        self.space_waits = e.space_waits;
        self.space_wait_time = e.space_wait_time;
        self.arm_time = e.arm_time;
        self.in_flight = e.in_flight();
        if let Some(new) = e.records.get(self.records.len()..) {
            self.records.extend_from_slice(new);
        }
        if let Some(new) = e.errors.get(self.errors.len()..) {
            self.errors.extend_from_slice(new);
        }
    }
}

impl Snapshots {
    /// Figures from an engine after its last epoch.
    pub fn from_engine(e: &SnapshotEngine) -> Self {
        Self::of(&EngineFigures::new(e), true)
    }

    /// Figures from `f`; with `epochs`, the list of every epoch too.
    pub fn of(f: &EngineFigures, epochs: bool) -> Self {
        let r = &f.records;
        Self {
            dir: f.dir.display().to_string(),
            mode: f.mode.name().to_string(),
            interval_ms: f.interval.as_secs_f64() * 1e3,
            count: r.len(),
            failed: f.errors.len(),
            delayed: f.overloads,
            delayed_ms: f.overload_time.as_secs_f64() * 1e3,
            urgent: f.urgent,
            space_waits: f.space_waits,
            space_wait_ms: f.space_wait_time.as_secs_f64() * 1e3,
            arm_ms: f.arm_time.as_secs_f64() * 1e3,
            errors: f.errors.clone(),
            pause: Percentiles::of(&r.iter().map(|x| x.pause).collect::<Vec<_>>()),
            vcpu_pause: Percentiles::of(&r.iter().map(|x| x.vcpu_pause).collect::<Vec<_>>()),
            durable: Percentiles::of(&r.iter().map(|x| x.durable).collect::<Vec<_>>()),
            pages: Spread::of(r.iter().map(|x| x.pages_data)),
            bytes: Spread::of(r.iter().map(|x| x.bytes)),
            faults: Spread::of(r.iter().map(|x| x.stats.faults)),
            save_mb_s: {
                let secs: f64 = r.iter().map(|x| x.stats.save_time.as_secs_f64()).sum();
                let bytes: u64 = r.iter().map(|x| x.pages_data * 4096).sum();
                if secs > 0.0 { bytes as f64 / secs / 1e6 } else { 0.0 }
            },
            adaptive: Adaptive::of(r),
            epochs: if epochs {
                r.iter().map(EpochEntry::from).collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// Where a restored run came from.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredFrom {
    /// Snapshot directory.
    pub dir: String,
    /// Epoch.
    pub epoch: u64,
    /// Epochs read (chain length).
    pub chain: usize,
    /// Page data read.
    pub bytes_read: u64,
    /// Seconds to rebuild the VM before it ran (lazy: before its first
    /// instruction, with guest pages still to come).
    pub restore_s: f64,
    /// Seconds from the start of the restore until the guest's op counter
    /// first moved (from the progress samples; none if it never did).
    pub first_op_s: Option<f64>,
    /// Restored from an object store: what was fetched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteFetch>,
    /// Lazy restore only (`--lazy`): what the pager did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyFigures>,
}

/// What a restore from an object store fetched before the VM was built.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteFetch {
    /// The remote store.
    pub url: String,
    /// The local copy the restore read (none: a lazy restore, which reads
    /// the epochs in place by ranged GETs).
    pub cache: Option<String>,
    /// Epochs downloaded (the rest of the chain was in the copy already;
    /// none for a lazy restore).
    pub downloaded: usize,
    /// Bytes downloaded and seconds it took before the VM was built (for
    /// a lazy restore: opening the chain, its page data then comes by
    /// ranged GETs).
    pub bytes: u64,
    pub seconds: f64,
}

/// What a lazy restore's pager did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LazyFigures {
    /// Seconds from the start of the restore until every guest page was
    /// installed (none: the run ended first).
    pub resident_s: Option<f64>,
    /// Seconds from the start of the restore until the installed pages
    /// were collapsed back into huge pages (none: not done, as with cow
    /// snapshots, or the run ended first).
    pub huge_s: Option<f64>,
    /// Faults served, and pages installed on faults and by the fill.
    pub faults: u64,
    pub fault_pages: u64,
    pub fill_pages: u64,
    /// Zero pages installed.
    pub zero_pages: u64,
    /// 2 MiB regions without data that a fault handed back to the kernel
    /// instead (they fault in as huge pages of zeros).
    pub zero_regions: u64,
    /// Time to serve a fault (read, verify, install), µs.
    pub fault_p50_us: u32,
    pub fault_p99_us: u32,
    pub fault_max_us: u32,
}

/// The report of one `consnap run` or `consnap restore`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// "run" or "restore".
    pub command: &'static str,
    /// How the run ended: poweroff, reset, shutdown, signal, error.
    pub status: String,
    /// Error message when status is "error".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// consnap's own exit status.
    pub exit_code: i32,
    /// Code the guest wrote to the debug-exit port.
    pub guest_exit_code: Option<u32>,
    /// Workload name (workload guest only).
    pub workload: Option<String>,
    /// Workload parameters as guest command-line words.
    pub workload_spec: Option<String>,
    /// Ops the guest completed (final if it finished, else last published).
    pub ops: Option<u64>,
    /// Workload checksum, hex (only once the guest finished).
    pub checksum: Option<String>,
    /// Integrity errors the workload found.
    pub workload_errors: Option<u64>,
    /// Seconds from VM creation to the end.
    pub wall_time_s: f64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Guest RAM backed by transparent huge pages at the end of the run.
    pub anon_huge_bytes: Option<u64>,
    /// CPU time the vCPU threads used (guest work, exits, faults), seconds.
    pub vcpu_cpu_s: f64,
    /// Time the vCPU threads were runnable but waited for a CPU, seconds.
    pub vcpu_wait_s: f64,
    /// Time the vCPU threads slept because the guest asked to idle (a
    /// rate-limited workload ahead of its rate), seconds: its slack.
    pub vcpu_idle_s: f64,
    /// Time the vCPUs ran the guest, from their start (after the VM's
    /// set-up and the snapshot engine's arming) to their end (before the
    /// last epoch's save finishes), summed over vCPUs, seconds. Minus
    /// `vcpu_idle_s`: the vCPU time the guest used, snapshots' pauses and
    /// faults included.
    pub vcpu_run_s: f64,
    /// Latency of pausing all vCPUs (pause probes and snapshots).
    pub pause: Percentiles,
    /// Guest progress over time: [milliseconds, ops].
    pub progress: Vec<(u64, u64)>,
    /// Snapshot figures, when snapshots were taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Snapshots>,
    /// For `restore`: the epoch the VM came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<RestoredFrom>,
    /// What the background reclaimer did, when snapshots were taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaim: Option<crate::reclaimer::ReclaimReport>,
    /// Replication to an object store (`--replicate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
    /// Output commit (held and released output), when the machine has a
    /// network or its console goes through the gate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputFigures>,
    /// Each network device's counters, in slot order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetFigures>,
}

/// What replication to an object store did (at the end of the run, or so
/// far in the control API's `GET /stats`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Replication {
    /// The remote store.
    pub url: String,
    /// The newest epoch off-host, and how old it was at the end (the
    /// recovery point had the host been lost then).
    pub newest_epoch: Option<u64>,
    pub lag_s: Option<f64>,
    /// Epochs the remote store holds.
    pub remote_epochs: u64,
    /// Epochs and bytes committed locally and not off-host at the end.
    pub backlog_epochs: u64,
    pub backlog_bytes: u64,
    /// The granularity off-host: the median capture-time step between the
    /// newest remote epochs (coarser than the interval after replication
    /// fell behind and shipped merged epochs).
    #[serde(default)]
    pub remote_step_s: Option<f64>,
    /// Merged epochs shipped because replication was behind, and the
    /// local epochs they stand for (which stay local only).
    #[serde(default)]
    pub merged_uploads: u64,
    #[serde(default)]
    pub covered_epochs: u64,
    /// Objects and bytes uploaded, objects deleted, manifests written.
    pub uploaded_objects: u64,
    pub uploaded_bytes: u64,
    pub deleted_objects: u64,
    pub manifests: u64,
    /// Upload throughput while uploading, MB/s.
    pub upload_mb_s: Option<f64>,
    /// The last error, if the last attempt failed.
    pub error: Option<String>,
    /// `--replicate-backlog` and `--replicate-overflow`, and for how long
    /// the backlog was over that limit (with `throttle`, snapshots waited
    /// that long).
    pub backlog_limit_bytes: u64,
    pub overflow: String,
    pub over_limit_s: f64,
}

impl Replication {
    /// From the replicator's status, `now_ns` being the end of the run.
    pub fn from_status(s: &remote::ReplicaStatus, now_ns: u64) -> Replication {
        Replication {
            url: s.url.clone(),
            newest_epoch: s.newest_id,
            lag_s: s.newest_created_ns.map(|t| now_ns.saturating_sub(t) as f64 / 1e9),
            remote_epochs: s.remote_epochs,
            backlog_epochs: s.backlog_epochs,
            backlog_bytes: s.backlog_bytes,
            remote_step_s: s.remote_step_ns.map(|n| n as f64 / 1e9),
            merged_uploads: s.merged_uploads,
            covered_epochs: s.covered_epochs,
            uploaded_objects: s.uploaded_objects,
            uploaded_bytes: s.uploaded_bytes,
            deleted_objects: s.deleted_objects,
            manifests: s.manifests,
            upload_mb_s: (s.upload_s > 0.0).then(|| s.uploaded_bytes as f64 / 1e6 / s.upload_s),
            error: s.last_error.clone(),
            backlog_limit_bytes: s.limit.map_or(0, |l| l.bytes),
            overflow: if s.limit.is_some_and(|l| l.throttle) {
                "throttle"
            } else {
                "continue"
            }
            .into(),
            over_limit_s: s.over_limit_s,
        }
    }
}

impl Report {
    /// The report as JSON text.
    pub fn to_json(&self) -> Result<Vec<u8>, ReportError> {
        let mut v = serde_json::to_vec_pretty(self).map_err(ReportError::Encode)?;
        v.push(b'\n');
        Ok(v)
    }
}

/// Errors writing the report. Each names the path given to `--report`.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The path is a directory.
    #[error("--report {0}: is a directory")]
    IsDir(PathBuf),
    /// The path cannot be written (checked before the VM starts).
    #[error("--report {path}: cannot write here: {source}")]
    Unwritable {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Writing the report at the end failed.
    #[error("cannot write report {path}: {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// serde_json failed (not expected).
    #[error("cannot encode the report: {0}")]
    Encode(serde_json::Error),
}

/// Where the report goes, checked before the VM starts.
///
/// A regular file, or nothing yet, is replaced atomically: the report is
/// written to a temporary file beside it, which is renamed over it. Anything
/// else (a FIFO, a character device such as /dev/null, a symbolic link) is
/// opened before the VM starts and written into: it is never replaced. A
/// FIFO's open waits for its reader, as a shell redirection does.
#[derive(Debug)]
pub enum ReportTarget {
    /// Write `path` atomically.
    Replace {
        /// The path.
        path: PathBuf,
    },
    /// Write into `file`, opened from `path`.
    Into {
        /// The path.
        path: PathBuf,
        /// It, opened for writing.
        file: File,
    },
}

/// A temporary file beside `path`, created exclusively (never through a
/// link someone planted), mode 0666 less the umask.
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, File)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "report".into(), |n| n.to_string_lossy());
    let mut last = None;
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = dir.join(format!(".{name}.{}-{nanos:09}-{attempt}.tmp", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}

impl ReportTarget {
    /// Check that `path` can take the report, before anything runs.
    pub fn open(path: &Path) -> Result<ReportTarget, ReportError> {
        let unwritable = |source| ReportError::Unwritable {
            path: path.to_path_buf(),
            source,
        };
        if path.as_os_str().as_encoded_bytes().ends_with(b"/") {
            return Err(ReportError::IsDir(path.to_path_buf()));
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unwritable(e)),
            Ok(m) if m.is_dir() => return Err(ReportError::IsDir(path.to_path_buf())),
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                // A FIFO, a device, a socket or a symbolic link: write into
                // it (creating the file a dangling link names).
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    // Truncated only when the report is written, after the run.
                    .truncate(false)
                    .open(path)
                    .map_err(|e| {
                        if e.raw_os_error() == Some(libc::EISDIR) {
                            ReportError::IsDir(path.to_path_buf())
                        } else {
                            unwritable(e)
                        }
                    })?;
                return Ok(ReportTarget::Into {
                    path: path.to_path_buf(),
                    file,
                });
            }
        }
        // A regular file or nothing: the directory must take a temporary file.
        let (tmp, _) = create_temp(path).map_err(unwritable)?;
        let _ = std::fs::remove_file(&tmp);
        Ok(ReportTarget::Replace {
            path: path.to_path_buf(),
        })
    }

    /// Write `report`. A failed atomic write leaves no temporary file behind.
    pub fn write(self, report: &Report) -> Result<(), ReportError> {
        let json = report.to_json()?;
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReportError::Write { path, source }
        };
        match self {
            ReportTarget::Into { path, mut file } => {
                // Through a symbolic link to a regular file: replace its contents.
                if file.metadata().is_ok_and(|m| m.is_file()) {
                    file.set_len(0).map_err(failed(&path))?;
                }
                file.write_all(&json).map_err(failed(&path))
            }
            ReportTarget::Replace { path } => {
                // Something other than a regular file appeared there meanwhile: never replace it.
                if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
                    return ReportTarget::open(&path)?.write(report);
                }
                let (tmp, mut file) = create_temp(&path).map_err(failed(&path))?;
                let written = (|| {
                    // Keep the mode of a report being replaced.
                    if let Ok(m) = std::fs::symlink_metadata(&path)
                        && m.is_file()
                    {
                        file.set_permissions(m.permissions())?;
                    }
                    file.write_all(&json)?;
                    file.sync_all()?;
                    std::fs::rename(&tmp, &path)
                })();
                if written.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                written.map_err(failed(&path))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let p = Percentiles::of(&s);
        assert_eq!((p.count, p.p50_us, p.p99_us, p.max_us), (100, 50.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&[]).count, 0);
        let sp = Spread::of([5u64, 1, 3].into_iter());
        assert_eq!((sp.total, sp.p50, sp.max), (9, 3, 5));
    }
}

/// What the output gate did (see `vmm::devices::output`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputFigures {
    /// Output waited for its epoch (`--net-commit epoch` or `--console-commit epoch`).
    pub commit: bool,
    /// Frames and console writes waiting for their epoch now, and their bytes.
    #[serde(default)]
    pub held: u64,
    #[serde(default)]
    pub held_bytes: u64,
    /// Frames and console writes sent, and their bytes.
    pub released: u64,
    pub released_bytes: u64,
    /// Still held when the run ended, dropped (no durable epoch covered them).
    pub dropped_at_exit: u64,
    /// Most bytes held at once, and the times output did not fit (`--output-hold`).
    pub held_bytes_max: u64,
    pub at_cap: u64,
    /// Writes a sink refused (a TAP gone, the console closed).
    pub send_errors: u64,
    /// From the guest's frame to the wire, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_ms: Option<Latency>,
}

/// p50, p99 and max of a latency, milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl OutputFigures {
    /// From the gate's counters.
    pub fn of(s: &vmm::devices::output::OutputStats) -> OutputFigures {
        OutputFigures {
            commit: s.commit,
            held: s.held_units,
            held_bytes: s.held_bytes,
            released: s.released_units,
            released_bytes: s.released_bytes,
            dropped_at_exit: s.dropped_at_exit,
            held_bytes_max: s.held_bytes_max,
            at_cap: s.at_cap,
            send_errors: s.send_errors,
            release_ms: s.release_ms.map(|[p50, p99, max]| Latency { p50, p99, max }),
        }
    }
}

/// One network device's counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetFigures {
    pub tap: String,
    pub mac: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Received frames larger than the guest's buffers.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Malformed TX chains completed unsent.
    pub tx_bad: u64,
}

impl NetFigures {
    /// From a device.
    pub fn of(n: &vmm::devices::virtio::net::Net) -> NetFigures {
        let c = n.counters();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        NetFigures {
            tap: n.tap().name().to_string(),
            mac: vmm::devices::virtio::net::format_mac(&n.mac()),
            rx_frames: get(&c.rx_frames),
            rx_bytes: get(&c.rx_bytes),
            rx_dropped: get(&c.rx_dropped),
            tx_frames: get(&c.tx_frames),
            tx_bytes: get(&c.tx_bytes),
            tx_bad: get(&c.tx_bad),
        }
    }
}
