//! `consnap demo`: the idea in under a minute. The workload guest runs
//! with continuous snapshots; the VMM process is killed with SIGKILL
//! part-way; the epochs are listed; the latest and an earlier one are
//! restored and run to the end; their checksums are printed beside the
//! checksum of the same workload run without interruption. Exits 0 only if
//! every checksum matches.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use snapshot::{Mode, SnapshotEngine};
use thiserror::Error;

use crate::api::{VmInfo, client};
use crate::ls_cmd::{self, LsError, Row};
use crate::report::Percentiles;

/// Why the demo stopped before its end.
#[derive(Debug, Error)]
pub enum DemoError {
    /// The `--keep` directory cannot be read or created.
    #[error("--keep {dir}: {source}")]
    Keep {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The `--keep` directory holds files.
    #[error("--keep {dir}: not empty; give an empty or new directory")]
    KeepNotEmpty {
        /// The directory.
        dir: PathBuf,
    },
    /// A directory or console file cannot be created.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file for a child's stderr cannot be created.
    #[error("{source}")]
    Stderr {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The consnap binary to run cannot be found.
    #[error("cannot find the consnap binary: {0}")]
    Exe(#[source] std::io::Error),
    /// A child consnap did not start.
    #[error("cannot start {what}: {source}")]
    Start {
        /// Which run.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// A child consnap ran past [`DEADLINE`].
    #[error("{what} did not finish within {secs}s")]
    Deadline {
        /// Which run.
        what: String,
        /// The deadline, seconds.
        secs: u64,
    },
    /// A child consnap cannot be waited for.
    #[error("cannot wait for {what}: {source}")]
    Wait {
        /// Which run.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A child consnap failed.
    #[error("{what} failed ({status})")]
    Failed {
        /// Which run.
        what: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// A run left no report.
    #[error("no report {path}: {source}")]
    NoReport {
        /// The report.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A report that is not JSON.
    #[error("{path}: {source}")]
    BadReport {
        /// The report.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A run that ended without the workload's checksum.
    #[error("a run ended without a checksum")]
    NoChecksum,
    /// The protected run ended before it could be killed.
    #[error("the protected run ended before it could be killed")]
    EndedEarly,
    /// The protected run committed no epoch that can be restored.
    #[error("no restorable epoch was committed")]
    NoEpoch,
    /// The epochs cannot be listed.
    #[error(transparent)]
    Ls(#[from] LsError),
}

/// Options of `consnap demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's files (snapshots, reports, consoles) in DIR, which
    /// must be empty or absent; by default they go to a temporary
    /// directory that is removed at the end.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
}

/// The workload: 64 MiB, 25,000 random 64-byte writes a second for 8 s.
const OPS: u64 = 200_000;
const SPEC: &str = "memstress,wss=64M,ops=200000,seed=2014,rate=25000";
const INTERVAL: &str = "20ms";
/// Longest any one VM of the demo may run.
const DEADLINE: Duration = Duration::from_secs(120);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The demo's directory: removed at the end unless kept.
struct Workdir {
    path: PathBuf,
    keep: bool,
}

impl Workdir {
    fn new(keep: Option<&Path>) -> Result<Workdir, DemoError> {
        if let Some(dir) = keep {
            let keep_err = |source| DemoError::Keep {
                dir: dir.to_path_buf(),
                source,
            };
            let empty = match std::fs::read_dir(dir) {
                Ok(mut d) => d.next().is_none(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(keep_err(e)),
            };
            if !empty {
                return Err(DemoError::KeepNotEmpty { dir: dir.to_path_buf() });
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(keep_err)?;
            return Ok(Workdir {
                path: dir.to_path_buf(),
                keep: true,
            });
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("consnap-demo-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| DemoError::Create {
                path: path.clone(),
                source,
            })?;
        Ok(Workdir { path, keep: false })
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A child consnap with a deadline.
struct Vm {
    child: Child,
    started: Instant,
    what: String,
}

impl Vm {
    fn start(args: &[&str], console: &Path, stderr: Stdio, what: &str) -> Result<Vm, DemoError> {
        let exe = std::env::current_exe().map_err(DemoError::Exe)?;
        let out = std::fs::File::create(console).map_err(|source| DemoError::Create {
            path: console.to_path_buf(),
            source,
        })?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(stderr)
            .spawn()
            .map_err(|source| DemoError::Start {
                what: what.to_string(),
                source,
            })?;
        Ok(Vm {
            child,
            started: Instant::now(),
            what: what.to_string(),
        })
    }

    fn running(&mut self) -> Result<bool, DemoError> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted);
        }
        if self.started.elapsed() > DEADLINE {
            return Err(DemoError::Deadline {
                what: self.what.clone(),
                secs: DEADLINE.as_secs(),
            });
        }
        match self.child.try_wait() {
            Ok(None) => Ok(true),
            Ok(Some(_)) => Ok(false),
            Err(source) => Err(self.wait_failed(source)),
        }
    }

    fn wait_failed(&self, source: std::io::Error) -> DemoError {
        DemoError::Wait {
            what: self.what.clone(),
            source,
        }
    }

    /// Wait for the end; Err if it failed.
    fn finish(mut self) -> Result<Duration, DemoError> {
        while self.running()? {
            std::thread::sleep(Duration::from_millis(20));
        }
        match self.child.wait() {
            Ok(s) if s.success() => Ok(self.started.elapsed()),
            Ok(status) => Err(DemoError::Failed {
                what: self.what.clone(),
                status,
            }),
            Err(source) => Err(self.wait_failed(source)),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// The checksum and ops a finished run reported.
fn outcome(report: &Path) -> Result<(String, u64), DemoError> {
    let text = std::fs::read_to_string(report).map_err(|source| DemoError::NoReport {
        path: report.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| DemoError::BadReport {
        path: report.to_path_buf(),
        source,
    })?;
    let sum = v["checksum"].as_str().ok_or(DemoError::NoChecksum)?.to_string();
    Ok((sum, v["ops"].as_u64().unwrap_or(0)))
}

fn us(v: f64) -> String {
    format!("{:.2}ms", v / 1e3)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn row_line(r: &Row) -> String {
    format!(
        "    epoch {:>4}  {:<4}  {:>6} pages  {:>9}  pause {:>7}  guest ops {:>7}",
        r.id.unwrap_or(0),
        if r.full { "full" } else { "incr" },
        r.pages,
        mib(r.bytes),
        us(r.pause_us),
        r.guest_ops.map_or("-".to_string(), |o| o.to_string())
    )
}

/// Run the demo; returns the exit status (0: every checksum matches).
pub fn demo(a: DemoArgs) -> Result<i32, DemoError> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
    }
    let work = Workdir::new(a.keep.as_deref())?;
    let result = steps(&work.path, work.keep);
    if work.keep {
        say(&format!("The demo's files are in {}.", work.path.display()));
    }
    result
}

/// A file for a child's stderr.
fn stderr_file(path: PathBuf) -> Result<Stdio, DemoError> {
    match std::fs::File::create(&path) {
        Ok(f) => Ok(Stdio::from(f)),
        Err(source) => Err(DemoError::Stderr { path, source }),
    }
}

/// The run `vm` ended by itself before it could be killed: the exit
/// status of a failed one (its error is on stderr already, and is the only
/// one printed), or [`DemoError::EndedEarly`].
fn ended_early(vm: &mut Vm) -> Result<i32, DemoError> {
    match vm.child.wait() {
        Ok(s) if !s.success() => Ok(s.code().filter(|c| *c != 0).unwrap_or(1)),
        Ok(_) => Err(DemoError::EndedEarly),
        Err(source) => Err(vm.wait_failed(source)),
    }
}

fn steps(dir: &Path, keep: bool) -> Result<i32, DemoError> {
    let snaps = dir.join("snapshots");
    let mut sock = dir.join("api.sock");
    if sock.as_os_str().len() > 100 {
        sock = std::env::temp_dir().join(format!("consnap-demo-{}.sock", std::process::id()));
    }
    let (mode, why) = match SnapshotEngine::check_host(Mode::Cow) {
        Ok(()) => (
            "cow",
            "copy-on-write: a pause only write-protects the pages written since the last epoch,\n      which are saved while the guest runs",
        ),
        Err(_) => (
            "stop-copy",
            "this host has no kernel-mode userfaultfd for cow; stop-copy: a pause copies the pages\n      written since the last epoch, which are written to disk while the guest runs",
        ),
    };
    let snaps_s = snaps.display().to_string();
    let sock_s = sock.display().to_string();
    say(
        "consnap demo: a VM protected by continuous snapshots is killed, and restored runs finish with the checksum of a run that never stopped.",
    );
    say(&format!(
        "  workload: the embedded guest's memstress, {OPS} random 64-byte writes over 64 MiB at 25,000 a second (8 s), then a checksum of its memory"
    ));
    say(&format!("  files: {}", dir.display()));
    say("");
    say(&format!(
        "[1/5] Run it with a snapshot every {INTERVAL} in mode {mode}:"
    ));
    say(&format!("      {why}. Live status:"));
    let started = Instant::now();
    let mut vm = Vm::start(
        &[
            "run",
            "--workload",
            SPEC,
            "--pause-probe",
            "0",
            "--snapshot-dir",
            &snaps_s,
            "--mode",
            mode,
            "--interval",
            INTERVAL,
            "--api-sock",
            &sock_s,
            "--status-interval",
            "1s",
        ],
        &dir.join("protected.console"),
        Stdio::inherit(),
        "the protected run",
    )?;
    // Kill it part-way: once the guest has done about half its work.
    let at = loop {
        if !vm.running()? {
            return ended_early(&mut vm);
        }
        if let Ok(ans) = client::call(&sock, "GET", "/vm", None, Duration::from_secs(5))
            && let Ok(info) = serde_json::from_slice::<VmInfo>(&ans.body)
            && let Some(ops) = info.ops.filter(|o| *o >= OPS / 2)
        {
            break ops;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = vm.child.kill();
    let _ = vm.child.wait();
    if std::io::stderr().is_terminal() {
        // End the status line the killed run left.
        let _ = writeln!(std::io::stderr());
    }
    say(&format!(
        "[2/5] SIGKILL after {:.1}s, at guest op ~{at} of {OPS}: the VMM process is gone, as in a crash.",
        started.elapsed().as_secs_f64()
    ));

    let rows: Vec<Row> = ls_cmd::rows(&snaps, store::Depth::Pages)?;
    let good: Vec<&Row> = rows.iter().filter(|r| r.restorable).collect();
    let (Some(latest), Some(first)) = (good.last(), good.first()) else {
        return Err(DemoError::NoEpoch);
    };
    let earlier = good[good.len() / 3];
    let bytes: u64 = rows.iter().map(|r| r.bytes).sum();
    // Only a command that will work: the directory goes at the end
    // unless kept.
    let listing = if keep {
        format!("`consnap ls {}` lists them all", snaps.display())
    } else {
        "removed at the end; `consnap demo --keep DIR` keeps them for `consnap ls`".into()
    };
    say(&format!(
        "[3/5] {} epochs were committed ({} on disk; {listing}):",
        good.len(),
        mib(bytes),
    ));
    for r in good.iter().take(2) {
        say(&row_line(r));
    }
    say("    ...");
    for r in good.iter().skip(good.len().saturating_sub(3).max(2)) {
        say(&row_line(r));
    }
    let pauses: Vec<Duration> = good
        .iter()
        .map(|r| Duration::from_secs_f64(r.pause_us.max(0.0) / 1e6))
        .collect();
    let p = Percentiles::of(&pauses);

    let (latest_id, earlier_id) = (latest.id.unwrap_or(0), earlier.id.unwrap_or(0));
    say(&format!(
        "[4/5] Restore the latest epoch ({latest_id}, guest op {}) and an earlier one ({earlier_id}, guest op {}), and run each to the end:",
        latest.guest_ops.unwrap_or(0),
        earlier.guest_ops.unwrap_or(0)
    ));
    let mut sums = Vec::new();
    for id in [latest_id, earlier_id] {
        let report = dir.join(format!("restore-{id}.json"));
        let id_s = id.to_string();
        let report_s = report.display().to_string();
        let err = stderr_file(dir.join(format!("restore-{id}.stderr")))?;
        let took = Vm::start(
            &[
                "restore",
                &snaps_s,
                "--at",
                &id_s,
                "--pause-probe",
                "0",
                "--report",
                &report_s,
            ],
            &dir.join(format!("restore-{id}.console")),
            err,
            &format!("the restore of epoch {id}"),
        )?
        .finish()?;
        let (sum, ops) = outcome(&report)?;
        say(&format!(
            "    epoch {id:>4}: ran to op {ops} in {:.1}s, checksum {sum}",
            took.as_secs_f64()
        ));
        sums.push((format!("restored from epoch {id}"), sum));
    }

    say("[5/5] The same workload run once without interruption, for comparison:");
    let report = dir.join("uninterrupted.json");
    let report_s = report.display().to_string();
    let err = stderr_file(dir.join("uninterrupted.stderr"))?;
    let took = Vm::start(
        &["run", "--workload", SPEC, "--pause-probe", "0", "--report", &report_s],
        &dir.join("uninterrupted.console"),
        err,
        "the uninterrupted run",
    )?
    .finish()?;
    let (want, _) = outcome(&report)?;
    say(&format!("    ran in {:.1}s", took.as_secs_f64()));
    say("");
    say(&format!("    {:<26} {want}", "uninterrupted run"));
    let mut all = true;
    for (what, sum) in &sums {
        let same = *sum == want;
        all &= same;
        say(&format!(
            "    {what:<26} {sum}  {}",
            if same { "same" } else { "DIFFERENT" }
        ));
    }
    say(&format!(
        "    guest downtime per snapshot over {} epochs ({mode}, every {INTERVAL}): p50 {} p99 {} max {}",
        p.count,
        us(p.p50_us),
        us(p.p99_us),
        us(p.max_us)
    ));
    say(&format!(
        "    (epoch {} is full; each later one holds only the pages written since its parent)",
        first.id.unwrap_or(0)
    ));
    say("");
    if all {
        say(&format!(
            "consnap demo: every checksum matches ({:.0}s).",
            started.elapsed().as_secs_f64()
        ));
        Ok(0)
    } else {
        say("consnap demo: a checksum differs: a restored VM did not continue exactly.");
        Ok(1)
    }
}
