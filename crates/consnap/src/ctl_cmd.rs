//! `consnap ctl`: a client of the control API of a running consnap.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::api::client::{self, Answer, ClientError};
use crate::api::{ConfigPatch, SnapConfig, Stats, VmInfo, VmState};
use crate::live::saver_words;
use crate::ls_cmd::{self, Row};
use crate::report::{EpochEntry, Percentiles};

/// Why a `ctl` operation failed.
#[derive(Debug, Error)]
pub enum CtlError {
    /// A `set` word that is no setting.
    #[error("'{0}' is not interval=DURATION or mode=MODE")]
    NotASetting(String),
    /// The settings cannot be encoded.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    /// The API did not answer.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The API refused (its message and HTTP status).
    #[error("{message} ({status})")]
    Refused {
        /// The API's message.
        message: String,
        /// The HTTP status.
        status: u16,
    },
    /// An answer that is not what the API documents.
    #[error("unexpected answer from consnap: {0}")]
    Decode(#[source] serde_json::Error),
    /// The listing cannot be written to stdout.
    #[error("cannot write the listing: {0}")]
    WriteListing(#[source] std::io::Error),
    /// The answer cannot be written to stdout.
    #[error("cannot write: {0}")]
    Write(#[source] std::io::Error),
}

/// Options of `consnap ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The API socket of the consnap to drive (its --api-sock).
    #[arg(long, value_name = "PATH")]
    pub sock: PathBuf,
    /// Print the API's JSON answer instead of text (before or after the operation).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub op: CtlOp,
}

/// `consnap ctl` operations.
#[derive(Debug, Subcommand)]
pub enum CtlOp {
    /// The VM's state, size, uptime and the guest's progress.
    Status,
    /// Pause the VM (snapshots go on; the VM stays paused).
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Take a snapshot now; prints its epoch once durable.
    Snapshot,
    /// List the snapshots (as `consnap ls`).
    Ls,
    /// Snapshot figures: pauses, pages, bytes, saver rate, backlog, errors.
    Stats,
    /// The same in the Prometheus text format.
    Metrics,
    /// Show the snapshot configuration.
    Config,
    /// Change the snapshot configuration: interval=DURATION, mode=MODE.
    Set {
        /// KEY=VALUE settings, such as interval=20ms mode=stop-copy-full.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
}

/// Longest a snapshot may take to become durable before `ctl` gives up.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(150);
const TIMEOUT: Duration = Duration::from_secs(30);

fn decode<T: DeserializeOwned>(a: &Answer) -> Result<T, CtlError> {
    serde_json::from_slice(&a.body).map_err(CtlError::Decode)
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2}ms", v / 1e3)
    } else {
        format!("{v:.0}us")
    }
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {} p99 {} max {} (n={})",
        us(p.p50_us),
        us(p.p99_us),
        us(p.max_us),
        p.count
    )
}

/// ` (N ops/s)`, or nothing while paused (the guest does no ops then).
fn rate_text(state: VmState, rate: Option<f64>) -> String {
    match rate {
        Some(r) if state != VmState::Paused => format!(" ({r:.0} ops/s)"),
        _ => String::new(),
    }
}

fn status_text(v: &VmInfo) -> String {
    let mut s = format!(
        "{}, {} vCPU{}, {} MiB, up {:.1}s",
        v.state.name(),
        v.vcpus,
        if v.vcpus == 1 { "" } else { "s" },
        v.mem_bytes >> 20,
        v.uptime_s
    );
    if let Some(w) = &v.workload {
        s += &format!("; {w}");
        if let Some(ops) = v.ops {
            s += &format!(" {ops} ops");
        }
        s += &rate_text(v.state, v.ops_per_s);
    }
    s += if v.snapshots {
        "; snapshots on"
    } else {
        "; snapshots off"
    };
    s
}

fn config_text(c: &SnapConfig) -> String {
    let others: Vec<&str> = c.modes.iter().map(String::as_str).filter(|m| *m != c.mode).collect();
    let switch = if others.is_empty() {
        format!("{} cannot be switched at run time", c.mode)
    } else {
        format!("can switch to {}", others.join(", "))
    };
    format!("mode {} every {} into {} ({switch})", c.mode, c.interval, c.dir)
}

fn epoch_text(e: &EpochEntry) -> String {
    format!(
        "epoch {} durable: {}, {} pages, {} bytes, pause {}, durable after {:.1}ms",
        e.id,
        if e.full { "full" } else { "incremental" },
        e.pages,
        e.bytes,
        us(e.pause_us),
        e.durable_ms
    )
}

fn stats_text(st: &Stats) -> String {
    let mut s = format!("{}, up {:.1}s", st.state.name(), st.uptime_s);
    if let Some(ops) = st.ops {
        s += &format!(", guest {ops} ops");
    }
    s += &rate_text(st.state, st.ops_per_s);
    s += &format!("\nvCPU pause    {}", percentiles(&st.vcpu_pause));
    let Some(n) = &st.snapshots else {
        return s + "\nsnapshots off";
    };
    s += &format!(
        "\nsnapshots     {} committed, {} failed, mode {} every {}ms",
        n.committed, n.failed, n.mode, n.interval_ms
    );
    s += &format!("\npause         {}", percentiles(&n.pause));
    s += &format!("\ndurable after {}", percentiles(&n.durable));
    s += &format!(
        "\npages/epoch   p50 {} max {}; bytes/epoch p50 {} max {}; faults/epoch p50 {} max {}",
        n.pages.p50, n.pages.max, n.bytes.p50, n.bytes.max, n.faults.p50, n.faults.max
    );
    s += &format!(
        "\nsaver         {:.0} MB/s, {}",
        n.save_mb_s,
        saver_words(n.in_flight, n.delayed, n.delayed_ms)
    );
    for e in &n.errors {
        s += &format!("\nerror         {e}");
    }
    s
}

/// The PATCH body from `KEY=VALUE` words.
fn patch(settings: &[String]) -> Result<String, CtlError> {
    let mut p = ConfigPatch::default();
    for s in settings {
        match s.split_once('=') {
            Some(("interval", v)) => p.interval = Some(v.to_string()),
            Some(("mode", v)) => p.mode = Some(v.to_string()),
            _ => return Err(CtlError::NotASetting(s.clone())),
        }
    }
    serde_json::to_string(&p).map_err(CtlError::Encode)
}

/// Run one `ctl` operation; returns the exit status.
pub fn ctl(a: CtlArgs) -> Result<i32, CtlError> {
    let (method, path, body, timeout) = match &a.op {
        CtlOp::Status => ("GET", "/vm", None, TIMEOUT),
        CtlOp::Pause => ("PUT", "/vm/pause", None, TIMEOUT),
        CtlOp::Resume => ("PUT", "/vm/resume", None, TIMEOUT),
        CtlOp::Snapshot => ("PUT", "/snapshots/take", None, SNAPSHOT_TIMEOUT),
        CtlOp::Ls => ("GET", "/snapshots", None, TIMEOUT),
        CtlOp::Stats => ("GET", "/stats", None, TIMEOUT),
        CtlOp::Metrics => ("GET", "/metrics", None, TIMEOUT),
        CtlOp::Config => ("GET", "/snapshots/config", None, TIMEOUT),
        CtlOp::Set { settings } => ("PATCH", "/snapshots/config", Some(patch(settings)?), TIMEOUT),
    };
    let answer = client::call(&a.sock, method, path, body, timeout)?;
    if !(200..300).contains(&answer.status) {
        return Err(CtlError::Refused {
            message: answer.error_message(),
            status: answer.status,
        });
    }
    let mut code = 0;
    let text = if a.json || matches!(a.op, CtlOp::Metrics) {
        String::from_utf8_lossy(&answer.body).trim_end().to_string()
    } else {
        match &a.op {
            CtlOp::Status | CtlOp::Pause | CtlOp::Resume => status_text(&decode(&answer)?),
            CtlOp::Snapshot => epoch_text(&decode(&answer)?),
            CtlOp::Stats => stats_text(&decode(&answer)?),
            CtlOp::Config | CtlOp::Set { .. } => config_text(&decode(&answer)?),
            CtlOp::Ls => {
                let rows: Vec<Row> = decode(&answer)?;
                code = i32::from(rows.iter().any(Row::is_bad));
                return match ls_cmd::print(&rows, false) {
                    Ok(()) => Ok(code),
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(code),
                    Err(e) => Err(CtlError::WriteListing(e)),
                };
            }
            CtlOp::Metrics => String::new(),
        }
    };
    if a.json && matches!(a.op, CtlOp::Ls) {
        let rows: Vec<Row> = decode(&answer)?;
        code = i32::from(rows.iter().any(Row::is_bad));
    }
    match writeln!(std::io::stdout(), "{text}") {
        Ok(()) => Ok(code),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(code),
        Err(e) => Err(CtlError::Write(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_a_patch() {
        let p = patch(&["interval=20ms".into(), "mode=stop-copy".into()]).unwrap();
        assert_eq!(p, r#"{"interval":"20ms","mode":"stop-copy"}"#);
        assert_eq!(
            patch(&["speed=3".into()]).unwrap_err().to_string(),
            "'speed=3' is not interval=DURATION or mode=MODE"
        );
        assert!(patch(&["interval".into()]).is_err());
    }

    #[test]
    fn json_goes_before_or_after_the_operation() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            ctl: CtlArgs,
        }
        use clap::Parser;
        for words in [
            &["x", "--sock", "S", "--json", "ls"][..],
            &["x", "--sock", "S", "ls", "--json"],
        ] {
            let cli = Cli::try_parse_from(words).unwrap_or_else(|e| panic!("{words:?}: {e}"));
            assert!(cli.ctl.json && matches!(cli.ctl.op, CtlOp::Ls), "{words:?}");
        }
    }

    #[test]
    fn config_names_only_the_modes_to_switch_to() {
        let config = |mode: &str, modes: &[&str]| SnapConfig {
            dir: "/s".into(),
            mode: mode.into(),
            interval: "20ms".into(),
            interval_ms: 20.0,
            modes: modes.iter().map(|m| m.to_string()).collect(),
        };
        assert_eq!(
            config_text(&config("cow", &["cow"])),
            "mode cow every 20ms into /s (cow cannot be switched at run time)"
        );
        assert_eq!(
            config_text(&config("stop-copy", &["stop-copy", "stop-copy-full"])),
            "mode stop-copy every 20ms into /s (can switch to stop-copy-full)"
        );
    }

    #[test]
    fn a_paused_vm_shows_no_op_rate() {
        let mut vm = VmInfo {
            state: VmState::Running,
            vcpus: 1,
            mem_bytes: 256 << 20,
            uptime_s: 2.0,
            workload: Some("memstress".into()),
            ops: Some(100),
            ops_per_s: Some(50.0),
            snapshots: true,
        };
        assert!(status_text(&vm).contains("100 ops (50 ops/s)"), "{}", status_text(&vm));
        vm.state = VmState::Paused;
        assert!(!status_text(&vm).contains("ops/s"), "{}", status_text(&vm));
    }
}
