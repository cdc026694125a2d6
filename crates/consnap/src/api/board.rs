//! What the controller shares with the API server and the live status
//! line: a board it publishes every few hundred milliseconds (and after
//! every command), and the commands that travel the other way.
//!
//! The controller only ever `try_lock`s the board, so a reader computing
//! figures never holds it up; readers compute on their own threads.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use snapshot::Mode;
use thiserror::Error;

use super::{SnapConfig, SnapStats, Stats, VmInfo, VmState};
use crate::args::{self, ArgError};
use crate::report::{EngineFigures, EpochEntry, Percentiles, Snapshots};

/// Error messages `GET /stats` shows.
const ERRORS_SHOWN: usize = 10;

/// The published state of a run.
#[derive(Debug)]
pub struct Board {
    /// What the VM is doing.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// When the VM was created or restored.
    pub started: Instant,
    /// The workload guest's workload.
    pub workload: Option<String>,
    /// Ops the workload guest published.
    pub ops: Option<u64>,
    /// Its recent rate.
    pub ops_per_s: Option<f64>,
    /// Pause-probe latencies so far.
    pub probe: Vec<Duration>,
    /// Snapshot figures, when snapshots are on.
    pub snap: Option<EngineFigures>,
    /// Replication to an object store, when on.
    pub replica: Option<remote::ReplicaWatch>,
    /// The output gate, when output commit is on or the VM has a network.
    pub output: Option<std::sync::Arc<vmm::devices::output::OutputGate>>,
    /// The network devices.
    pub nets: Vec<std::sync::Arc<vmm::devices::virtio::net::Net>>,
}

/// Where the board lives between the controller and its readers: the
/// board behind its lock, and the flag that says a command waits for the
/// controller.
#[derive(Debug)]
pub struct BoardCell {
    /// The board.
    pub board: Mutex<Board>,
    /// Set by the server after queueing a command; the controller clears it
    /// before draining the queue.
    pub pending: AtomicBool,
}

impl BoardCell {
    /// A board for a VM that is about to run.
    pub fn new(board: Board) -> BoardCell {
        BoardCell {
            board: Mutex::new(board),
            pending: AtomicBool::new(false),
        }
    }

    /// Lock the board (readers; the controller uses `try_lock`).
    pub fn lock(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The modes a run in `mode` can switch to.
pub fn switchable(mode: Mode) -> Vec<Mode> {
    match mode {
        Mode::Cow => vec![Mode::Cow],
        Mode::StopCopy | Mode::StopCopyFull => vec![Mode::StopCopy, Mode::StopCopyFull],
    }
}

/// A mode by its name in the API and on the command line.
pub fn mode_by_name(name: &str) -> Option<Mode> {
    [Mode::Cow, Mode::StopCopy, Mode::StopCopyFull]
        .into_iter()
        .find(|m| m.name() == name)
}

/// The snapshot configuration as the API shows it.
pub fn snap_config(dir: &std::path::Path, mode: Mode, interval: Duration) -> SnapConfig {
    SnapConfig {
        dir: dir.display().to_string(),
        mode: mode.name().to_string(),
        interval: args::show_duration(interval),
        interval_ms: interval.as_secs_f64() * 1e3,
        modes: switchable(mode).iter().map(|m| m.name().to_string()).collect(),
    }
}

impl Board {
    /// Seconds since the VM started.
    pub fn uptime_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The guest's op rate as shown: 0 while paused (the controller's
    /// window still holds the last second before the pause), else the
    /// published rate.
    pub fn ops_rate(&self) -> Option<f64> {
        match self.state {
            VmState::Paused => self.ops.map(|_| 0.0),
            _ => self.ops_per_s,
        }
    }

    /// `GET /vm`.
    pub fn vm_info(&self) -> VmInfo {
        VmInfo {
            state: self.state,
            vcpus: self.vcpus,
            mem_bytes: self.mem_bytes,
            uptime_s: self.uptime_s(),
            workload: self.workload.clone(),
            ops: self.ops,
            ops_per_s: self.ops_rate(),
            snapshots: self.snap.is_some(),
        }
    }

    /// `GET /snapshots/config` (`None`: snapshots are off).
    pub fn config(&self) -> Option<SnapConfig> {
        self.snap.as_ref().map(|f| snap_config(&f.dir, f.mode, f.interval))
    }

    /// The snapshot directory, when snapshots are on.
    pub fn snapshot_dir(&self) -> Option<PathBuf> {
        self.snap.as_ref().map(|f| f.dir.clone())
    }

    /// Latency of stopping every vCPU: pause probes and snapshots.
    pub fn vcpu_pause(&self) -> Percentiles {
        let mut all = self.probe.clone();
        if let Some(f) = &self.snap {
            all.extend(f.records.iter().map(|r| r.vcpu_pause));
        }
        Percentiles::of(&all)
    }

    /// `GET /stats`: figures over the whole run.
    pub fn stats(&self) -> Stats {
        Stats {
            state: self.state,
            uptime_s: self.uptime_s(),
            ops: self.ops,
            ops_per_s: self.ops_rate(),
            vcpu_pause: self.vcpu_pause(),
            snapshots: self.snap.as_ref().map(snap_stats),
            replication: self
                .replica
                .as_ref()
                .map(|w| crate::report::Replication::from_status(&w.status(), store::now_ns())),
            output: self.output_figures(),
            nets: self.nets.iter().map(|n| crate::report::NetFigures::of(n)).collect(),
        }
    }

    /// The output gate's figures now.
    pub fn output_figures(&self) -> Option<crate::report::OutputFigures> {
        self.output
            .as_ref()
            .map(|g| crate::report::OutputFigures::of(&g.stats()))
    }
}

/// The snapshot part of `GET /stats`, from the report's figures.
pub fn snap_stats(f: &EngineFigures) -> SnapStats {
    let s = Snapshots::of(f, false);
    let skip = f.errors.len().saturating_sub(ERRORS_SHOWN);
    SnapStats {
        mode: s.mode,
        interval_ms: s.interval_ms,
        committed: s.count,
        failed: s.failed,
        errors: f.errors[skip..].to_vec(),
        pause: s.pause,
        durable: s.durable,
        pages: s.pages,
        bytes: s.bytes,
        faults: s.faults,
        save_mb_s: s.save_mb_s,
        in_flight: f.in_flight,
        delayed: s.delayed,
        delayed_ms: s.delayed_ms,
        space_waits: s.space_waits,
        space_wait_ms: s.space_wait_ms,
        adaptive: s.adaptive,
        last: f.records.last().map(EpochEntry::from),
    }
}

/// What a client asks the controller to do.
#[derive(Debug)]
pub enum Command {
    /// Stop the vCPUs until [`Command::Resume`].
    Pause,
    /// Let them run again.
    Resume,
    /// Take an epoch now; answered once it is durable.
    Take,
    /// Change the interval and/or the mode.
    Configure {
        /// New interval.
        interval: Option<Duration>,
        /// New mode.
        mode: Option<Mode>,
    },
}

/// A command's successful answer.
#[derive(Debug)]
pub enum Answer {
    /// The VM's state after a pause or resume.
    State(VmState),
    /// The epoch a take produced, durable.
    Epoch(EpochEntry),
    /// The configuration after a change.
    Config(SnapConfig),
}

/// Why a command was not carried out.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// It cannot be done in the run's current state (HTTP 409).
    Conflict(String),
    /// It was tried and failed (HTTP 500).
    Failed(String),
}

/// The controller's reply to one command.
pub type Reply = Result<Answer, Refusal>;

/// A command with the channel for its reply.
#[derive(Debug)]
pub struct Envelope {
    /// The command.
    pub cmd: Command,
    /// Where the reply goes (the client may have given up: sending never blocks).
    pub reply: tokio::sync::oneshot::Sender<Reply>,
}

/// Why snapshot endpoints refuse when snapshots are off.
pub const SNAPSHOTS_OFF: &str = "snapshots are off: start the VM with --snapshot-dir";

/// An interval as the API takes it (docs/openapi.yaml): a whole number of
/// `ms` (1 to 10 digits), `s` (7), `m` (5) or `h` (3), without leading
/// zeros, so at least 1ms (below it the VM would spend most of its time
/// paused) and at most about 115 days.
pub fn api_interval(text: &str) -> Result<Duration, ConfigPatchError> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = text.split_at(digits);
    let max_digits = match unit {
        "ms" => 10,
        "s" => 7,
        "m" => 5,
        "h" => 3,
        _ => 0,
    };
    if num.is_empty() || num.starts_with('0') || num.len() > max_digits {
        return Err(ConfigPatchError::Interval { text: text.to_string() });
    }
    Ok(args::duration(text)?)
}

/// Why a `PATCH /snapshots/config` body cannot be used (HTTP 400).
#[derive(Debug, Error)]
pub enum ConfigPatchError {
    /// Not JSON.
    #[error("the body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// JSON, but not an object.
    #[error(r#"the body must be a JSON object such as {{"interval": "20ms"}}"#)]
    NotAnObject,
    /// An empty object.
    #[error("give interval and/or mode")]
    Empty,
    /// A field whose value is not a string.
    #[error("{field} must be a string")]
    NotAString {
        /// The field.
        field: String,
    },
    /// An interval the API does not take (see [`api_interval`]).
    #[error("interval '{text}' is not a whole number of ms, s, m or h of at least 1ms (such as 20ms, 1500ms, 1s, 5m)")]
    Interval {
        /// As given.
        text: String,
    },
    /// An interval that is no duration.
    #[error(transparent)]
    Duration(#[from] ArgError),
    /// A mode that does not exist.
    #[error("unknown mode '{mode}': cow, stop-copy or stop-copy-full")]
    UnknownMode {
        /// As given.
        mode: String,
    },
    /// A field that cannot be set.
    #[error("unknown field '{field}': only interval and mode can be set")]
    UnknownField {
        /// As given.
        field: String,
    },
}

/// Check a `PATCH /snapshots/config` body: a JSON object with `interval`
/// (see [`api_interval`]) and/or `mode` (a mode name), nothing else.
pub fn parse_patch(body: &[u8]) -> Result<(Option<Duration>, Option<Mode>), ConfigPatchError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(ConfigPatchError::NotJson)?;
    let serde_json::Value::Object(fields) = value else {
        return Err(ConfigPatchError::NotAnObject);
    };
    if fields.is_empty() {
        return Err(ConfigPatchError::Empty);
    }
    let mut interval = None;
    let mut mode = None;
    for (key, v) in &fields {
        let Some(text) = v.as_str() else {
            return Err(ConfigPatchError::NotAString { field: key.clone() });
        };
        match key.as_str() {
            "interval" => interval = Some(api_interval(text)?),
            "mode" => {
                mode =
                    Some(mode_by_name(text).ok_or_else(|| ConfigPatchError::UnknownMode { mode: text.to_string() })?);
            }
            other => {
                return Err(ConfigPatchError::UnknownField {
                    field: other.to_string(),
                });
            }
        }
    }
    Ok((interval, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_guest_does_no_ops_per_second() {
        let mut board = Board {
            state: VmState::Running,
            vcpus: 1,
            mem_bytes: 1 << 20,
            started: Instant::now(),
            workload: Some("memstress".into()),
            ops: Some(1000),
            ops_per_s: Some(500.0),
            probe: Vec::new(),
            snap: None,
            replica: None,
            output: None,
            nets: Vec::new(),
        };
        assert_eq!(board.vm_info().ops_per_s, Some(500.0));
        board.state = VmState::Paused;
        assert_eq!(board.vm_info().ops_per_s, Some(0.0));
        assert_eq!(board.stats().ops_per_s, Some(0.0));
        board.ops = None;
        assert_eq!(board.vm_info().ops_per_s, None, "no workload guest, no rate");
    }

    #[test]
    fn config_patches_are_checked() {
        let ok = |b: &str| parse_patch(b.as_bytes()).unwrap();
        let err = |b: &str| parse_patch(b.as_bytes()).unwrap_err().to_string();
        assert_eq!(ok(r#"{"interval":"20ms"}"#), (Some(Duration::from_millis(20)), None));
        assert_eq!(ok(r#"{"mode":"stop-copy-full"}"#), (None, Some(Mode::StopCopyFull)));
        assert_eq!(
            ok(r#"{"mode":"cow","interval":"1s"}"#),
            (Some(Duration::from_secs(1)), Some(Mode::Cow))
        );
        assert!(err("").contains("not JSON"));
        assert_eq!(
            err("[1]"),
            r#"the body must be a JSON object such as {"interval": "20ms"}"#
        );
        assert!(err("{}").contains("give interval"));
        assert!(err(r#"{"interval":null}"#).contains("must be a string"));
        assert!(err(r#"{"interval":20}"#).contains("must be a string"));
        for bad in [
            "0",
            "0ms",
            "05ms",
            "500us",
            "1.5s",
            "2y",
            "ms",
            "12345678901ms",
            "12345678s",
            "1000h",
            " 1s",
        ] {
            let body = format!(r#"{{"interval":"{bad}"}}"#);
            assert!(err(&body).contains("not a whole number"), "{bad}: {}", err(&body));
        }
        for (good, d) in [
            ("1ms", Duration::from_millis(1)),
            ("9999999999ms", Duration::from_millis(9_999_999_999)),
            ("9999999s", Duration::from_secs(9_999_999)),
            ("99999m", Duration::from_secs(99_999 * 60)),
            ("999h", Duration::from_secs(999 * 3600)),
        ] {
            assert_eq!(api_interval(good).ok(), Some(d));
        }
        assert!(err(r#"{"mode":"fast"}"#).contains("unknown mode"));
        assert!(err(r#"{"speed":"1"}"#).contains("unknown field 'speed'"));
    }
}
