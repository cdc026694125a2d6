//! QEMU on the same workload guest: the exported ELF booted with
//! `-kernel`, snapshots driven over QMP, and the newest snapshot restored
//! with `-incoming` and run to the end.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use thiserror::Error;

use crate::matrix::Mode;
use crate::proc::{self, ProcError};
use crate::results::{Pause, Record};

/// Why a QEMU run failed.
#[derive(Debug, Error)]
pub enum QemuError {
    /// QEMU could not be started or waited for.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// QEMU ended before its QMP socket existed.
    #[error("QEMU exited with {status} before its QMP socket was ready")]
    EarlyExit { status: ExitStatus },
    /// The QMP socket cannot be connected to.
    #[error("QMP socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading from QMP failed.
    #[error("QMP: {0}")]
    Io(#[source] std::io::Error),
    /// QEMU closed QMP.
    #[error("QMP: QEMU closed the connection")]
    Closed,
    /// QMP sent a line that is not JSON.
    #[error("QMP: bad reply {line:?}: {source}")]
    BadReply {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    /// A command could not be sent.
    #[error("QMP {cmd}: {source}")]
    Send {
        cmd: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("QMP {cmd}: {desc}")]
    Refused { cmd: &'static str, desc: String },
    /// A snapshot (a migration to a file) failed.
    #[error("QEMU migration {state}: {desc}")]
    Migration { state: String, desc: String },
    /// A snapshot failed while the guest was still running.
    #[error("{source}: {stderr}")]
    Snapshot {
        #[source]
        source: Box<QemuError>,
        /// The last lines of QEMU's stderr.
        stderr: String,
    },
    /// The guest finished before QEMU took a snapshot: after `ran`, the
    /// first being due one `interval` after QMP was ready. `last` is why
    /// the last attempt failed, if one was made (QEMU closing QMP as it
    /// exits, or a refusal).
    #[error(
        "the guest finished after {:.2} s, before QEMU took a snapshot (the first was due at {:.2} s){}",
        .ran.as_secs_f64(),
        .interval.as_secs_f64(),
        .last.as_ref().map_or_else(String::new, |e| format!("; the last attempt failed: {e}"))
    )]
    NoSnapshot {
        ran: Duration,
        interval: Duration,
        last: Option<Box<QemuError>>,
    },
    /// A calibration run under QEMU did not last long enough to measure.
    #[error("calibrating {spec} under QEMU: still under a second with {ops} ops")]
    Calibration { spec: String, ops: u64 },
    /// The restored QEMU did not start running within its limit.
    #[error("the restored QEMU never ran (status {status}): {stderr}")]
    NeverRan {
        /// Its last `query-status` answer.
        status: Value,
        stderr: String,
    },
    /// QEMU did not end with the guest's exit (`who`: `QEMU`, `restored QEMU`).
    #[error("{who} exited with {status}: {stderr}")]
    Exited {
        who: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    /// The console file cannot be read.
    #[error("{path}: {source}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The guest printed no checksum.
    #[error("the guest printed no checksum in {path}")]
    NoChecksum { path: PathBuf },
}

/// QEMU's binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// The minimal firmware: SeaBIOS takes 4-10 s to boot here.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
/// A `migrate` right after the previous one completed fails with
/// "duplicate yank instance".
const YANK_GAP: Duration = Duration::from_millis(300);

/// QEMU's version line, or `None` when it does not run.
pub fn version() -> Option<String> {
    let out = Command::new(QEMU).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string)
}

/// What every QEMU run shares.
pub struct Ctx {
    /// The exported workload guest.
    pub elf: PathBuf,
    pub scratch: PathBuf,
    pub mem: String,
    pub vcpus: u32,
}

impl Ctx {
    fn command(&self, spec: &str, qmp: &Path, console: &Path) -> Command {
        let words = crate::matrix::guest_words(spec);
        let mut cmd = Command::new(QEMU);
        // A disk workload: microvm, which has virtio-mmio and appends the
        // device's word to the command line (as consnap does), and a fresh
        // image like consnap's runs get.
        let disk = self.scratch.join("qemu-disk.img");
        if let Some(bytes) = disk_bytes(spec) {
            let _ = std::fs::remove_file(&disk);
            if let Err(e) = std::fs::File::create(&disk).and_then(|f| f.set_len(bytes)) {
                tracing::warn!("cannot make {}: {e}", disk.display());
            }
            cmd.args([
                "-M",
                "microvm,acpi=off",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-drive",
            ])
            .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
            .args(["-device", "virtio-blk-device,drive=d0"]);
        }
        cmd.args(["-enable-kvm", "-m", &self.mem, "-smp"])
            .arg(self.vcpus.to_string())
            .args(["-display", "none", "-no-reboot", "-monitor", "none"])
            .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1", "-kernel"])
            .arg(&self.elf)
            .args(["-append", &words, "-serial"])
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if Path::new(QBOOT).exists() && disk_bytes(spec).is_none() {
            cmd.args(["-bios", QBOOT]);
        }
        cmd
    }
}

/// The image size of a disk workload (its area and a MiB), `None` without a disk.
fn disk_bytes(spec: &str) -> Option<u64> {
    let s = workload::Spec::parse(&crate::matrix::guest_words(spec)).ok()?;
    s.uses_disk().then_some(s.dsize + (1 << 20))
}

/// A QMP connection.
struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
}

impl Qmp {
    /// Connect (QEMU creates the socket shortly after it starts) and leave
    /// capabilities negotiation.
    fn connect(path: &Path, child: &mut Child) -> Result<Qmp, QemuError> {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(20) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        return Err(QemuError::EarlyExit { status: st });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(QemuError::Socket {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let wr = s.try_clone().map_err(QemuError::Io)?;
        let mut q = Qmp {
            rd: BufReader::new(s),
            wr,
        };
        q.read()?; // greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        match self.rd.read_line(&mut line) {
            Ok(0) => Err(QemuError::Closed),
            Ok(_) => serde_json::from_str(&line).map_err(|source| QemuError::BadReply { line, source }),
            Err(e) => Err(QemuError::Io(e)),
        }
    }

    /// Run a command and return its `return` value; events are skipped.
    fn execute(&mut self, cmd: &'static str, args: Value) -> Result<Value, QemuError> {
        let mut msg = json!({ "execute": cmd, "arguments": args }).to_string();
        msg.push('\n');
        self.wr
            .write_all(msg.as_bytes())
            .map_err(|source| QemuError::Send { cmd, source })?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QemuError::Refused {
                    cmd,
                    desc: e["desc"].as_str().unwrap_or("error").to_string(),
                });
            }
        }
    }

    /// Poll `query-migrate` until the migration ends; its final state.
    fn wait_migration(&mut self) -> Result<Value, QemuError> {
        loop {
            let st = self.execute("query-migrate", json!({}))?;
            match st["status"].as_str() {
                Some("completed") => return Ok(st),
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(QemuError::Migration {
                        state: s.to_string(),
                        desc: st["error-desc"].as_str().unwrap_or("no reason given").to_string(),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

/// Guest ops per second of `spec` (without ops) under QEMU without
/// snapshots: the ops of a run over its wall time less that of a run of one
/// op (QEMU's start, boot and exit), so that a run sized from it lasts at
/// least as long under QEMU. Starts with `guess_ops`, ten times more while
/// the work lasts under a second.
pub fn calibrate(ctx: &Ctx, spec: &str, guess_ops: u64, deadline: Duration) -> Result<f64, QemuError> {
    let wall = |ops: u64| -> Result<f64, QemuError> {
        let mut rec = Record::default();
        let spec = format!("{spec},ops={ops}");
        run_inner(ctx, &spec, Mode::QemuNone, None, deadline, &mut rec)?;
        Ok(rec.wall_s)
    };
    let overhead = wall(1)?;
    let mut ops = guess_ops.max(1);
    for _ in 0..4 {
        let busy = wall(ops)? - overhead;
        if busy >= 1.0 {
            return Ok(ops as f64 / busy);
        }
        tracing::info!(spec, ops, busy, "QEMU calibration run too short, trying more ops");
        ops = ops.saturating_mul(10);
    }
    Err(QemuError::Calibration {
        spec: spec.to_string(),
        ops,
    })
}

/// Run `spec` in QEMU in `mode` at `interval` and fill `rec`; then restore
/// the newest snapshot and run it to the end.
pub fn run(ctx: &Ctx, spec: &str, mode: Mode, interval: Option<Duration>, deadline: Duration, rec: &mut Record) {
    if let Err(e) = run_inner(ctx, spec, mode, interval, deadline, rec) {
        rec.error = Some(e.to_string());
    }
}

fn run_inner(
    ctx: &Ctx,
    spec: &str,
    mode: Mode,
    interval: Option<Duration>,
    deadline: Duration,
    rec: &mut Record,
) -> Result<(), QemuError> {
    let qmp_path = ctx.scratch.join("qmp.sock");
    let console = ctx.scratch.join("qemu-console.txt");
    let _ = std::fs::remove_file(&qmp_path);
    let started = Instant::now();
    let mut child = proc::spawn(
        &mut ctx.command(spec, &qmp_path, &console),
        &ctx.scratch.join("qemu.out"),
        &ctx.scratch.join("qemu.err"),
    )?;
    let result = drive(ctx, &mut child, &qmp_path, mode, interval, started, deadline, rec);
    let ended = proc::wait(&mut child, started, deadline, None);
    let newest = result?;
    let ended = ended?;
    rec.wall_s = ended.wall.as_secs_f64();
    // isa-debug-exit: QEMU exits with 2 × code + 1.
    if ended.status.code() != Some(1) {
        return Err(QemuError::Exited {
            who: "QEMU",
            status: ended.status,
            stderr: proc::tail(&ctx.scratch.join("qemu.err"), 3),
        });
    }
    rec.checksum = Some(checksum(&console)?);
    if let Some(file) = newest {
        rec.store_bytes = std::fs::metadata(&file).ok().map(|m| m.len());
        // QEMU's migration stream holds no disk: restoring it onto the disk
        // as the run left it is no restore of the snapshot, so it is not tried.
        if disk_bytes(spec).is_none() {
            restore(ctx, spec, &file, deadline, rec)?;
        }
    }
    clean(&ctx.scratch);
    Ok(())
}

fn clean(scratch: &Path) {
    for f in ["snap-0", "snap-1", "qemu-disk.img"] {
        let _ = std::fs::remove_file(scratch.join(f));
    }
}

/// Take snapshots until the guest powers off; the newest complete file.
#[allow(clippy::too_many_arguments)]
fn drive(
    ctx: &Ctx,
    child: &mut Child,
    qmp_path: &Path,
    mode: Mode,
    interval: Option<Duration>,
    started: Instant,
    deadline: Duration,
    rec: &mut Record,
) -> Result<Option<PathBuf>, QemuError> {
    let Some(interval) = interval.filter(|_| mode.snapshots()) else {
        return Ok(None);
    };
    let mut q = Qmp::connect(qmp_path, child)?;
    if mode == Mode::QemuBackground {
        q.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
        )?;
    }
    let (mut pauses, mut bytes, mut newest) = (Vec::new(), Vec::new(), None);
    // Why the last snapshot was cut short by QEMU exiting, if it was.
    let mut cut = None;
    let mut due = Instant::now() + interval;
    loop {
        while Instant::now() < due {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5).min(due.saturating_duration_since(Instant::now())));
        }
        if child.try_wait().ok().flatten().is_some() || started.elapsed() > deadline {
            break;
        }
        let file = ctx.scratch.join(format!("snap-{}", pauses.len() % 2));
        let _ = std::fs::remove_file(&file);
        let t0 = Instant::now();
        let uri = json!({ "uri": format!("file:{}", file.display()) });
        let step = |q: &mut Qmp| -> Result<Value, QemuError> {
            if mode == Mode::QemuStopCopy {
                q.execute("stop", json!({}))?;
            }
            q.execute("migrate", uri.clone())?;
            let st = q.wait_migration()?;
            if mode == Mode::QemuStopCopy {
                q.execute("cont", json!({}))?;
            }
            Ok(st)
        };
        match step(&mut q) {
            Ok(st) => {
                let pause_us = match mode {
                    Mode::QemuStopCopy => t0.elapsed().as_secs_f64() * 1e6,
                    _ => st["downtime"].as_f64().unwrap_or(f64::NAN) * 1e3,
                };
                pauses.push(pause_us);
                bytes.push(std::fs::metadata(&file).map_or(0, |m| m.len()) as f64);
                newest = Some(file);
            }
            // The guest finished while a snapshot was taken: QEMU closes
            // the socket as it exits. An answer from QEMU (a refused
            // command, a failed migration) is never taken for that.
            Err(e) if closed(&e) && exits_soon(child) => {
                cut = Some(Box::new(e));
                break;
            }
            Err(e) => {
                return Err(QemuError::Snapshot {
                    source: Box::new(e),
                    stderr: proc::tail(&ctx.scratch.join("qemu.err"), 3),
                });
            }
        }
        let now = Instant::now();
        let next = due + interval;
        if now + YANK_GAP > next {
            rec.delayed += 1;
        }
        due = next.max(now + YANK_GAP);
    }
    rec.snapshots = pauses.len() as u64;
    if pauses.is_empty() {
        return Err(QemuError::NoSnapshot {
            ran: started.elapsed(),
            interval,
            last: cut,
        });
    }
    rec.pause = Some(percentiles(&mut pauses));
    rec.bytes_p50 = Some(percentiles(&mut bytes).p50_us);
    Ok(newest)
}

/// Whether `e` is QMP going away (as it does when QEMU exits), not an
/// answer from QEMU.
fn closed(e: &QemuError) -> bool {
    matches!(
        e,
        QemuError::Closed | QemuError::Io(_) | QemuError::Send { .. } | QemuError::BadReply { .. }
    )
}

/// Whether `child` exits within a few seconds.
fn exits_soon(child: &mut Child) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        if child.try_wait().ok().flatten().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// p50 / p99 / max (nearest rank) of `xs`, in the unit of `xs`.
fn percentiles(xs: &mut [f64]) -> Pause {
    xs.sort_by(f64::total_cmp);
    let at = |p: f64| xs[((p * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
    Pause {
        p50_us: at(0.5),
        p99_us: at(0.99),
        max_us: xs[xs.len() - 1],
    }
}

/// Restore `file` in a new QEMU (`-incoming`), time until it runs, and
/// check that it finishes with the same checksum.
fn restore(ctx: &Ctx, spec: &str, file: &Path, deadline: Duration, rec: &mut Record) -> Result<(), QemuError> {
    let qmp_path = ctx.scratch.join("qmp-in.sock");
    let console = ctx.scratch.join("qemu-in-console.txt");
    let _ = std::fs::remove_file(&qmp_path);
    let mut cmd = ctx.command(spec, &qmp_path, &console);
    cmd.args(["-incoming", "defer"]);
    let started = Instant::now();
    let mut child = proc::spawn(
        &mut cmd,
        &ctx.scratch.join("qemu-in.out"),
        &ctx.scratch.join("qemu-in.err"),
    )?;
    let load = (|| -> Result<f64, QemuError> {
        let mut q = Qmp::connect(&qmp_path, &mut child)?;
        q.execute("migrate-incoming", json!({ "uri": format!("file:{}", file.display()) }))?;
        let limit = deadline.min(Duration::from_secs(60));
        loop {
            let st = q.execute("query-status", json!({}))?;
            match st["status"].as_str() {
                Some("running") => return Ok(started.elapsed().as_secs_f64()),
                // A stop-and-copy snapshot was taken of a stopped VM, and
                // the run state travels with it: start it once loaded.
                Some("paused" | "postmigrate")
                    if q.execute("query-migrate", json!({}))?["status"].as_str() == Some("completed") =>
                {
                    q.execute("cont", json!({}))?;
                }
                _ => {}
            }
            if started.elapsed() > limit {
                return Err(QemuError::NeverRan {
                    status: st["status"].clone(),
                    stderr: proc::tail(&ctx.scratch.join("qemu-in.err"), 3),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })();
    let ended = proc::wait(&mut child, started, deadline, None);
    rec.restore_s = Some(load?);
    let ended = ended?;
    if ended.status.code() != Some(1) {
        return Err(QemuError::Exited {
            who: "restored QEMU",
            status: ended.status,
            stderr: proc::tail(&ctx.scratch.join("qemu-in.err"), 3),
        });
    }
    rec.restore_ok = Some(checksum(&console)? == rec.checksum.clone().unwrap_or_default());
    Ok(())
}

/// The checksum the guest printed on its console.
fn checksum(console: &Path) -> Result<String, QemuError> {
    let text = std::fs::read_to_string(console).map_err(|source| QemuError::Console {
        path: console.to_path_buf(),
        source,
    })?;
    text.lines()
        .filter(|l| l.contains("consnap-guest: done"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("checksum=")))
        .map(str::to_string)
        .ok_or_else(|| QemuError::NoChecksum {
            path: console.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut xs: Vec<f64> = (1..=200).map(f64::from).collect();
        let p = percentiles(&mut xs);
        assert_eq!((p.p50_us, p.p99_us, p.max_us), (100.0, 198.0, 200.0));
        let p = percentiles(&mut [5.0]);
        assert_eq!((p.p50_us, p.p99_us, p.max_us), (5.0, 5.0, 5.0));
    }
}
