//! Runs of consnap itself: `consnap run` for the fixed work, then
//! `consnap restore --at latest` of what it saved, run to the end.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

use crate::matrix::Mode;
use crate::proc::{self, ProcError};
use crate::results::{Pause, Record};

/// Why a run of consnap failed (`what`: `run`, `restore`, `calibrate`).
#[derive(Debug, Error)]
pub enum ConsnapRunError {
    /// consnap could not be started.
    #[error(transparent)]
    Start(#[from] ProcError),
    /// It could not be waited for, or ran past its deadline.
    #[error("consnap {what}: {source}")]
    Wait {
        what: &'static str,
        #[source]
        source: ProcError,
    },
    /// It ended without writing its report.
    #[error("consnap {what} exited with {status} and no report ({source}): {stderr}")]
    NoReport {
        what: &'static str,
        status: ExitStatus,
        #[source]
        source: std::io::Error,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// Its report is not JSON.
    #[error("consnap {what}: unreadable report {path}: {source}")]
    BadReport {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// It failed.
    #[error("consnap {what} exited with {status}: {why}")]
    Failed {
        what: &'static str,
        status: ExitStatus,
        /// The report's error, or the last lines of its stderr.
        why: String,
    },
    /// The report lacks the run's time.
    #[error("the report has no wall_time_s")]
    NoWallTime,
    /// A run stopped at its cap, with nothing to check its restore against.
    #[error("stopped at its cap, and no baseline checksum to check its restore against")]
    NoBaseline,
    /// The run ended without the workload's checksum.
    #[error("the run ended without a checksum (status {status})")]
    NoChecksum {
        /// The report's status, as JSON.
        status: Value,
    },
    /// A snapshot run committed no epoch.
    #[error("no snapshot was committed")]
    NoSnapshot,
    /// The disk image of a disk workload could not be made.
    #[error("cannot make the disk image: {0}")]
    Disk(#[source] std::io::Error),
    /// Calibration runs ended too soon to measure a rate.
    #[error("could not measure the rate of {spec}: every run was too short")]
    Calibration { spec: String },
}

/// What every run shares.
pub struct Ctx {
    /// The consnap binary.
    pub exe: PathBuf,
    /// Scratch space for snapshots and reports (emptied per run).
    pub scratch: PathBuf,
    pub mem: String,
    pub vcpus: u32,
}

/// For a disk workload (`disk=on`, dblog, diskio): a fresh zero image of
/// its disk area plus a MiB at `path`, and the flags that attach it.
fn disk_args(spec: &str, path: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    let Ok(s) = workload::Spec::parse(&crate::matrix::guest_words(spec)) else {
        return Ok(Vec::new());
    };
    if !s.uses_disk() {
        return Ok(Vec::new());
    }
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)?.set_len(s.dsize + (1 << 20))?;
    Ok(vec!["--disk".into(), path.as_os_str().to_owned()])
}

/// How long a run may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Past this the run is killed and counts as failed.
    pub deadline: Duration,
    /// A snapshot run still going at this time is stopped (SIGTERM, a clean
    /// end with a report); its time is then a lower bound.
    pub cap: Option<Duration>,
}

/// Run `spec` under consnap in `mode` (not a QEMU mode) at `interval`, and
/// fill `rec` with what the report says; then restore the newest epoch and
/// run it to the end, expecting the checksum of the run itself or, for a
/// run stopped at its cap, `expect` (the baseline's). A failure is
/// returned as the record's error.
pub fn run(
    ctx: &Ctx,
    spec: &str,
    mode: Mode,
    interval: Option<Duration>,
    limits: Limits,
    expect: Option<&str>,
    rec: &mut Record,
) {
    if let Err(e) = run_inner(ctx, spec, mode, interval, limits, expect, rec) {
        rec.error = Some(e.to_string());
    }
}

fn run_inner(
    ctx: &Ctx,
    spec: &str,
    mode: Mode,
    interval: Option<Duration>,
    limits: Limits,
    expect: Option<&str>,
    rec: &mut Record,
) -> Result<(), ConsnapRunError> {
    let snaps = ctx.scratch.join("snaps");
    let _ = std::fs::remove_dir_all(&snaps);
    let report = ctx.scratch.join("run.json");
    let _ = std::fs::remove_file(&report);
    let disk = ctx.scratch.join("disk.img");
    let mut cmd = Command::new(&ctx.exe);
    cmd.args(["run", "--workload", spec, "--mem", &ctx.mem, "--vcpus"])
        .arg(ctx.vcpus.to_string())
        .args(["--pause-probe", "0", "--report"])
        .arg(&report)
        .args(disk_args(spec, &disk).map_err(ConsnapRunError::Disk)?);
    if let (true, Some(iv)) = (mode.snapshots(), interval) {
        cmd.arg("--snapshot-dir")
            .arg(&snaps)
            .args(["--mode", mode.name(), "--interval"])
            .arg(format!("{}ms", iv.as_millis()));
    }
    let cap = limits.cap.filter(|_| mode.snapshots());
    let r = run_to_report(&mut cmd, &ctx.scratch, "run", &report, limits.deadline, cap)?;
    rec.wall_s = f(&r["wall_time_s"]).ok_or(ConsnapRunError::NoWallTime)?;
    let idle = f(&r["vcpu_idle_s"]).unwrap_or(0.0);
    // The vCPUs' own run, from their start to their end: the VM's set-up,
    // the engine's arming before it and the last epoch's save after it
    // are no guest time (older reports have only the whole command's).
    let ran = f(&r["vcpu_run_s"]).filter(|t| *t > 0.0);
    rec.run_s = ran.map(|t| t / f64::from(ctx.vcpus.max(1)));
    rec.busy_s = Some(ran.unwrap_or(rec.wall_s * ctx.vcpus as f64) - idle);
    rec.checksum = r["checksum"].as_str().map(str::to_string);
    let expect = if rec.checksum.is_none() && r["status"].as_str() == Some("signal") && cap.is_some() {
        rec.stopped_s = Some(rec.wall_s);
        expect.ok_or(ConsnapRunError::NoBaseline)?
    } else {
        rec.checksum.as_deref().ok_or_else(|| ConsnapRunError::NoChecksum {
            status: r["status"].clone(),
        })?
    }
    .to_string();
    if mode.snapshots() {
        let s = &r["snapshots"];
        rec.snapshots = s["count"].as_u64().unwrap_or(0);
        rec.delayed = s["delayed"].as_u64().unwrap_or(0);
        rec.pause = Some(Pause {
            p50_us: f(&s["pause"]["p50_us"]).unwrap_or(0.0),
            p99_us: f(&s["pause"]["p99_us"]).unwrap_or(0.0),
            max_us: f(&s["pause"]["max_us"]).unwrap_or(0.0),
        });
        rec.durable_p50_ms = f(&s["durable"]["p50_us"]).map(|us| us / 1e3);
        rec.bytes_p50 = f(&s["bytes"]["p50"]);
        rec.faults_p50 = f(&s["faults"]["p50"]);
        rec.save_mb_s = f(&s["save_mb_s"]);
        rec.store_bytes = Some(proc::du(&snaps));
        if rec.snapshots == 0 {
            return Err(ConsnapRunError::NoSnapshot);
        }
        // The newest epoch, restored and run to the end.
        let rreport = ctx.scratch.join("restore.json");
        let _ = std::fs::remove_file(&rreport);
        let mut cmd = Command::new(&ctx.exe);
        cmd.arg("restore")
            .arg(&snaps)
            .args(["--at", "latest", "--pause-probe", "0", "--report"])
            .arg(&rreport);
        let restored = ctx.scratch.join("restored.img");
        let _ = std::fs::remove_file(&restored);
        if !disk_args(spec, &disk).map_err(ConsnapRunError::Disk)?.is_empty() {
            cmd.arg("--disk").arg(&restored);
        }
        let rr = run_to_report(&mut cmd, &ctx.scratch, "restore", &rreport, limits.deadline, None);
        let _ = std::fs::remove_file(&restored);
        let rr = rr?;
        rec.restore_s = f(&rr["restored_from"]["restore_s"]);
        rec.restore_ok = Some(rr["checksum"].as_str() == Some(expect.as_str()));
    }
    let _ = std::fs::remove_dir_all(&snaps);
    let _ = std::fs::remove_file(&disk);
    Ok(())
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Run a consnap command to its end and read its report.
fn run_to_report(
    cmd: &mut Command,
    scratch: &Path,
    what: &'static str,
    report: &Path,
    deadline: Duration,
    cap: Option<Duration>,
) -> Result<Value, ConsnapRunError> {
    let (out, err) = (scratch.join(format!("{what}.out")), scratch.join(format!("{what}.err")));
    let started = Instant::now();
    let mut child = proc::spawn(cmd, &out, &err)?;
    let ended =
        proc::wait(&mut child, started, deadline, cap).map_err(|source| ConsnapRunError::Wait { what, source })?;
    let text = std::fs::read(report).map_err(|source| ConsnapRunError::NoReport {
        what,
        status: ended.status,
        source,
        stderr: proc::tail(&err, 3),
    })?;
    let v: Value = serde_json::from_slice(&text).map_err(|source| ConsnapRunError::BadReport {
        what,
        path: report.to_path_buf(),
        source,
    })?;
    let stopped_at_cap = ended.capped && v["status"].as_str() == Some("signal");
    if !(ended.status.success() || stopped_at_cap) {
        return Err(ConsnapRunError::Failed {
            what,
            status: ended.status,
            why: v["error"].as_str().map_or_else(|| proc::tail(&err, 3), str::to_string),
        });
    }
    Ok(v)
}

/// Guest ops per second of `spec` (without ops) under consnap without
/// snapshots: the ops of a short run over the CPU time its vCPUs got (per
/// vCPU). Time the host gave to other work is left out, so a calibration on
/// a busy machine sizes runs that last at least as long as asked, never
/// ones that end before their first snapshot.
pub fn calibrate(ctx: &Ctx, spec: &str, guess_ops: u64) -> Result<f64, ConsnapRunError> {
    let mut ops = guess_ops;
    for _ in 0..4 {
        let report = ctx.scratch.join("calibrate.json");
        let mut cmd = Command::new(&ctx.exe);
        cmd.args([
            "run",
            "--workload",
            &format!("{spec},ops={ops}"),
            "--mem",
            &ctx.mem,
            "--vcpus",
        ])
        .arg(ctx.vcpus.to_string())
        .args(["--pause-probe", "0", "--report"])
        .arg(&report)
        .args(disk_args(spec, &ctx.scratch.join("disk.img")).map_err(ConsnapRunError::Disk)?);
        let r = run_to_report(
            &mut cmd,
            &ctx.scratch,
            "calibrate",
            &report,
            Duration::from_secs(120),
            None,
        )?;
        let done = r["ops"].as_u64().unwrap_or(0) as f64;
        let busy = f(&r["vcpu_cpu_s"]).unwrap_or(0.0) / f64::from(ctx.vcpus.max(1));
        if busy >= 1.0 && done > 0.0 {
            return Ok(done / busy);
        }
        // Too short to measure: ten times the work.
        tracing::info!(spec, ops, busy, "calibration run too short, trying more ops");
        ops = ops.saturating_mul(10);
    }
    Err(ConsnapRunError::Calibration { spec: spec.to_string() })
}
