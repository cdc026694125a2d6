//! `consnap bench-space`: does the store stay within its bounds while a
//! VM runs with snapshots every few milliseconds on a loaded host? Runs
//! `consnap run` for a while beside busy processes, then prints the
//! store's size and longest chain, sampled every second by the reclaimer
//! (the report's `reclaim.usage`), against `--max-store` and `--max-chain`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use thiserror::Error;

use crate::args;
use crate::bench_child::{BenchChildError, scratch_dir};
use crate::ls_cmd::human;

/// Why the space benchmark cannot run or read its result.
#[derive(Debug, Error)]
pub enum SpaceError {
    /// A program cannot be started, or the scratch directory made.
    #[error(transparent)]
    Child(#[from] BenchChildError),
    /// The run ended before its time, or wrote no usable report.
    #[error("the protected run failed ({status}); its report {report}: {why}")]
    Run {
        /// How it ended.
        status: String,
        /// The report file.
        report: PathBuf,
        /// What is wrong with the report.
        why: String,
    },
}

/// Options of `consnap bench-space`.
#[derive(Debug, Args)]
pub struct SpaceArgs {
    /// How long the VM runs.
    #[arg(long, default_value = "10m", value_parser = args::duration)]
    pub duration: Duration,
    /// Snapshot interval.
    #[arg(long, default_value = "20ms", value_parser = args::duration)]
    pub interval: Duration,
    /// The guest's work (memstress with no end of its own: it runs until
    /// the benchmark stops it).
    #[arg(long, default_value = "memstress,wss=64M,rate=30000")]
    pub workload: String,
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// Busy processes beside the VM (each spins a core).
    #[arg(long, default_value_t = 2)]
    pub busy: u32,
    /// Retention policy of the run.
    #[arg(long, default_value = store::DEFAULT_POLICY)]
    pub retain: String,
    /// `--max-chain` of the run.
    #[arg(long, default_value_t = store::DEFAULT_MAX_CHAIN)]
    pub max_chain: usize,
    /// `--max-store` of the run (0: none).
    #[arg(long, default_value = "0")]
    pub max_store: String,
    /// Snapshot directory (default: a new one under $TMPDIR, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print a row every this many seconds of the curve.
    #[arg(long, default_value_t = 10)]
    pub every: u32,
}

/// Busy processes: `sh -c 'while :; do :; done'`, killed on drop.
struct Busy(Vec<Child>);

impl Drop for Busy {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run the benchmark and print the curve; exit status 0 when the store
/// stayed within both bounds at every sample, 1 otherwise.
pub fn bench_space(a: SpaceArgs) -> Result<i32, SpaceError> {
    // The report, and the store unless --dir names one.
    let (scratch, _) = scratch_dir(None, "consnap-space")?;
    let dir = a.dir.clone().unwrap_or_else(|| scratch.join("snaps"));
    let report = scratch.join("report.json");
    let exe = std::env::current_exe().map_err(|source| BenchChildError::Spawn {
        what: "consnap",
        source,
    })?;
    let mut busy = Busy(Vec::new());
    for _ in 0..a.busy {
        let c = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .map_err(|source| BenchChildError::Spawn {
                what: "a busy process",
                source,
            })?;
        busy.0.push(c);
    }
    let mut run = Command::new(exe);
    run.args([
        "run",
        "--quiet",
        "--pause-probe",
        "0",
        "--on-snapshot-error",
        "continue",
    ])
    .arg("--workload")
    .arg(format!("{},ops=1000000000000", a.workload))
    .args(["--mem", &a.mem, "--retain", &a.retain, "--max-store", &a.max_store])
    .arg("--interval")
    .arg(args::show_duration(a.interval))
    .arg("--max-chain")
    .arg(a.max_chain.to_string())
    .arg("--snapshot-dir")
    .arg(&dir)
    .arg("--report")
    .arg(&report)
    .stdout(Stdio::null());
    // The run ends with this process, however it ends.
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
    // only the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut run, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = run.spawn().map_err(|source| BenchChildError::Spawn {
        what: "consnap run",
        source,
    })?;
    let started = Instant::now();
    let mut early = None;
    while started.elapsed() < a.duration {
        if let Ok(Some(status)) = child.try_wait() {
            early = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = match early {
        Some(s) => s,
        None => {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            child.wait().map_err(|source| BenchChildError::Spawn {
                what: "consnap run",
                source,
            })?
        }
    };
    drop(busy);
    let parsed = std::fs::read(&report)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string()));
    let fail = |why: String| SpaceError::Run {
        status: status.to_string(),
        report: report.clone(),
        why,
    };
    let r = parsed.map_err(fail)?;
    if early.is_some() {
        return Err(fail(format!("it ended after {:.1}s", started.elapsed().as_secs_f64())));
    }
    let code = print_curve(&a, &r);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(code)
}

/// Print the curve and the verdict; 0 when within bounds.
fn print_curve(a: &SpaceArgs, r: &serde_json::Value) -> i32 {
    let rec = &r["reclaim"];
    let samples = rec["usage"].as_array().cloned().unwrap_or_default();
    let cap = rec["max_store"].as_u64();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:>7} {:>12} {:>8} {:>6}   (every {}s of {}; interval {}, {} busy processes)",
        "t (s)",
        "store",
        "epochs",
        "chain",
        a.every,
        crate::args::counted(samples.len() as u64, "sample"),
        args::show_duration(a.interval),
        a.busy
    );
    let (mut max_bytes, mut max_chain, mut over) = (0u64, 0u64, 0usize);
    let mut next_row = 0.0;
    for s in &samples {
        let t = s["t_s"].as_f64().unwrap_or(0.0);
        let bytes = s["bytes"].as_u64().unwrap_or(0);
        let chain = s["longest_chain"].as_u64().unwrap_or(0);
        max_bytes = max_bytes.max(bytes);
        max_chain = max_chain.max(chain);
        if cap.is_some_and(|c| bytes > c) || (a.max_chain > 0 && chain > a.max_chain as u64) {
            over += 1;
        }
        if t >= next_row {
            let _ = writeln!(
                out,
                "{t:>7.0} {:>12} {:>8} {chain:>6}",
                human(bytes),
                s["epochs"].as_u64().unwrap_or(0)
            );
            next_row = t + f64::from(a.every.max(1));
        }
    }
    let snaps = &r["snapshots"];
    let _ = writeln!(
        out,
        "largest store {} (bound {}), longest chain {} (--max-chain {}); {} of {} samples over a bound; {} snapshots committed ({:.1}/s), {} failed; reclaimer: {} passes, {} urgent, {} epochs evicted for --max-store",
        human(max_bytes),
        cap.map_or("none".to_string(), human),
        max_chain,
        a.max_chain,
        over,
        samples.len(),
        snaps["count"].as_u64().unwrap_or(0),
        snaps["count"].as_f64().unwrap_or(0.0) / r["wall_time_s"].as_f64().unwrap_or(1.0).max(1e-9),
        snaps["failed"].as_u64().unwrap_or(0),
        rec["passes"].as_u64().unwrap_or(0),
        rec["urgent_passes"].as_u64().unwrap_or(0),
        rec["epochs_evicted"].as_u64().unwrap_or(0),
    );
    i32::from(over > 0 || samples.is_empty())
}
