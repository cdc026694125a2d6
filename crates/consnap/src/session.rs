//! Running a machine to its end with probes, sampling and snapshots, and
//! reporting on it. Shared by `run` and `restore`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use snapshot::{CowOptions, Mode, SnapshotConfig, SnapshotEngine};
use thiserror::Error;
use vmm::devices::{Devices, GuestStop};
use vmm::machine::{Machine, MachineError};
use vmm::run::{PauseProbe, ProgressSampler, RunEnd, Task};

use crate::api::VmState;
use crate::api::board::{Board, BoardCell};
use crate::api::server::{self, ApiServer};
use crate::args;
use crate::control::Control;
use crate::live::Live;
use crate::remote_args::{RemoteArgsError, remote_client};
use crate::report::{EngineFigures, Percentiles, Report, ReportError, ReportTarget, RestoredFrom, SCHEMA, Snapshots};

/// Why a run or a restored machine cannot be started or run; each names
/// the option or the file at fault.
#[derive(Debug, Error)]
pub enum SessionError {
    /// `--interval 0`.
    #[error("--interval must be longer than 0")]
    ZeroInterval,
    /// A pause-copy budget that fills the whole interval.
    #[error("--cow-pause-copy {pause_copy:?} must be shorter than --interval {interval:?}")]
    PauseCopy {
        /// `--cow-pause-copy`.
        pause_copy: Duration,
        /// `--interval`.
        interval: Duration,
    },
    /// `CONSNAP_COW_HOT` that does not parse.
    #[error("CONSNAP_COW_HOT='{0}' is not 'off' or STREAK,PAGES,PROBE")]
    HotPolicy(String),
    /// The snapshot mode cannot run on this host, or the engine cannot be
    /// set up on the machine.
    #[error(transparent)]
    Engine(#[from] snapshot::SnapshotError),
    /// `--replicate` names no object store, or replication cannot start.
    #[error("--replicate: {0}")]
    Replicate(#[source] remote::RemoteError),
    /// The object store of `--replicate` cannot be reached as given.
    #[error("--replicate: {0}")]
    ReplicateClient(#[source] RemoteArgsError),
    /// The `--encrypt-key` file cannot be used.
    #[error(transparent)]
    EncryptKey(#[from] remote::SealError),
    /// The `--report` file cannot be written.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// The `--api-sock` socket cannot be served.
    #[error(transparent)]
    Api(#[from] server::ServerError),
    /// Another process writes the snapshot directory (the engine's message).
    #[error("{0}")]
    StoreInUse(String),
    /// `--on-snapshot-error stop` and the engine failed before the run (its message).
    #[error("stopping on snapshot failure: {0}")]
    SnapshotFailed(String),
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// Snapshot modes on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Pause, capture state and write-protect the pages dirtied since the last epoch, resume;
    /// save them while the VM runs, copying a page aside before the guest writes it.
    Cow,
    /// Pause, write all memory and state, resume.
    StopCopyFull,
    /// Pause, copy the pages dirtied since the last epoch, resume, write (the first epoch is full).
    StopCopy,
}

impl ModeArg {
    /// The store's mode.
    pub fn mode(self) -> Mode {
        match self {
            ModeArg::Cow => Mode::Cow,
            ModeArg::StopCopyFull => Mode::StopCopyFull,
            ModeArg::StopCopy => Mode::StopCopy,
        }
    }
}

/// How epoch files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotIo {
    /// O_DIRECT: bypass the page cache (its writeback steals CPU from the guest).
    Direct,
    /// Through the page cache.
    Buffered,
}

/// How `cow` finds the pages written since the last epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CowTracker {
    /// Write protection stays armed between epochs; a written block is
    /// compared page by page with its hashes at the last epoch.
    Uffd,
    /// KVM's dirty log (pages written in most epochs stay unprotected).
    DirtyLog,
}

/// Protection block sizes for `cow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CowBlock {
    /// 4 KiB: protect and release single pages.
    #[value(name = "4K")]
    Small,
    /// 2 MiB: protect and release whole huge pages (they stay huge).
    #[value(name = "2M")]
    Huge,
}

/// What to do when a snapshot fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    /// Report it and keep the VM running.
    Continue,
    /// Stop the VM and exit non-zero.
    Stop,
}

/// Options shared by `run` and `restore`.
#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Write a JSON report here when the run ends.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Pause and resume all vCPUs this often to measure pause latency (0 = never).
    #[arg(long, default_value = "200ms", value_parser = args::duration)]
    pub pause_probe: Duration,
    /// Sample the guest's progress counter this often (0 = never).
    #[arg(long, default_value = "100ms", value_parser = args::duration)]
    pub sample_interval: Duration,
    /// Take snapshots into this directory (created 0700 if missing).
    #[arg(long)]
    pub snapshot_dir: Option<PathBuf>,
    /// How snapshots capture memory.
    #[arg(long, value_enum, default_value = "cow", requires = "snapshot_dir")]
    pub mode: ModeArg,
    /// A snapshot later than this (the one before it still being saved)
    /// makes the saver run at the vCPUs' priority until it catches up,
    /// instead of below them; `never` keeps it below them (needs
    /// CAP_SYS_NICE, which root has).
    #[arg(long, default_value = "1s", value_parser = args::max_lag, requires = "snapshot_dir")]
    pub max_lag: args::MaxLag,
    /// How page data is written: O_DIRECT or through the page cache.
    #[arg(long, value_enum, default_value = "direct", requires = "snapshot_dir")]
    pub snapshot_io: SnapshotIo,
    /// cow: how pages written since the last epoch are found.
    #[arg(long, value_enum, default_value = "uffd", requires = "snapshot_dir")]
    pub cow_tracker: CowTracker,
    /// cow: granularity of write protection.
    #[arg(long, value_enum, default_value = "2M", requires = "snapshot_dir")]
    pub cow_block: CowBlock,
    /// cow: memory for pages copied aside before the guest writes them; when
    /// it is full, a writing vCPU waits for the saver.
    #[arg(long, default_value = "256M", value_parser = args::size, requires = "snapshot_dir")]
    pub cow_buffer: u64,
    /// cow: time the pause may spend copying the blocks written in the
    /// last epochs (hot) instead of write-protecting them. Each block
    /// copied spares the guest a write-protect fault later and lengthens
    /// the pause; the default, 0, keeps the pause under a millisecond
    /// (measured in docs/COW.md: build at 10 ms loses a few points more
    /// without it).
    #[arg(long, default_value = "0ms", value_parser = args::duration, requires = "snapshot_dir")]
    pub cow_pause_copy: Duration,
    /// Time between snapshots.
    #[arg(long, default_value = "1s", value_parser = args::duration, requires = "snapshot_dir")]
    pub interval: Duration,
    /// When a snapshot fails: keep running, or stop with a non-zero exit.
    #[arg(long, value_enum, default_value = "continue")]
    pub on_snapshot_error: OnError,
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket, created
    /// 0600; see docs/openapi.yaml and `consnap ctl`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// No live status line on stderr while snapshots are taken.
    #[arg(long)]
    pub quiet: bool,
    /// How often the live status line is shown (default: every second on a
    /// terminal, redrawn in place; every 5s otherwise).
    #[arg(long, value_parser = args::duration, value_name = "DURATION")]
    pub status_interval: Option<Duration>,
    /// Compression of page data in new epochs (and in rewrites).
    #[arg(long, value_enum, default_value = "none", requires = "snapshot_dir")]
    pub compress: crate::store_args::CompressArg,
    /// Retention and reclamation (the reclaimer runs while the VM runs).
    #[command(flatten)]
    pub reclaim: crate::store_args::ReclaimArgs,
    /// Ship every committed epoch to this object store (s3://BUCKET/PREFIX)
    /// and keep it a mirror of the snapshot directory. Endpoint, region and
    /// credentials come from AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long, value_name = "URL", requires = "snapshot_dir")]
    pub replicate: Option<String>,
    /// Encrypt epochs on the object store with the key in FILE (32 bytes,
    /// or 64 hex digits: `openssl rand -hex 32 > FILE`), XChaCha20-Poly1305;
    /// `restore` from an object store needs the same key.
    #[arg(long, value_name = "FILE")]
    pub encrypt_key: Option<PathBuf>,
    /// How far replication may fall behind: bytes committed locally and
    /// not yet off-host.
    #[arg(long, default_value = "1G", value_parser = args::size, requires = "replicate")]
    pub replicate_backlog: u64,
    /// What happens beyond --replicate-backlog: `continue` (snapshots go on
    /// locally; the report says for how long the limit was exceeded) or
    /// `throttle` (snapshots wait until replication catches up).
    #[arg(long, value_enum, default_value = "continue", requires = "replicate")]
    pub replicate_overflow: Overflow,
}

/// What happens when replication falls behind by more than its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Overflow {
    Continue,
    Throttle,
}

/// Feed terminal input to the guest's serial port.
fn spawn_stdin(devices: Arc<Devices>) {
    let _ = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                return;
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let k = devices.serial.enqueue_input(rest);
                rest = &rest[k..];
                if k == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
}

/// The hot-region policy, from `CONSNAP_COW_HOT` (`off`, or
/// `STREAK,PAGES,PROBE`), a tuning knob for measurements.
fn hot_policy() -> Result<Option<snapshot::HotPolicy>, SessionError> {
    let Ok(v) = std::env::var("CONSNAP_COW_HOT") else {
        return Ok(Some(snapshot::HotPolicy::default()));
    };
    if v == "off" {
        return Ok(None);
    }
    let n: Vec<u64> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    match n[..] {
        [streak, pages, probe] => Ok(Some(snapshot::HotPolicy {
            min_streak: streak.min(255) as u8,
            min_pages: pages.min(64) as u32,
            probe_every: probe,
        })),
        _ => Err(SessionError::HotPolicy(v)),
    }
}

/// `--interval` and `--cow-pause-copy` together.
fn check_times(a: &SessionArgs) -> Result<(), SessionError> {
    if a.interval.is_zero() {
        return Err(SessionError::ZeroInterval);
    }
    if a.cow_pause_copy >= a.interval {
        return Err(SessionError::PauseCopy {
            pause_copy: a.cow_pause_copy,
            interval: a.interval,
        });
    }
    Ok(())
}

/// What [`preflight`] checked and opened.
#[derive(Debug)]
pub struct Preflight {
    /// Where the report goes, if anywhere.
    pub report: Option<ReportTarget>,
    /// The control API's socket, bound.
    pub api: Option<server::Listener>,
}

/// Check the session options before any VM exists: the snapshot mode must
/// be able to run on this host, the report path must be writable, and the
/// API socket is created.
pub fn preflight(a: &SessionArgs) -> Result<Preflight, SessionError> {
    check_times(a)?;
    if a.snapshot_dir.is_some() {
        SnapshotEngine::check_host(a.mode.mode())?;
    }
    if let Some(u) = &a.replicate {
        remote::RemoteUrl::parse(u).map_err(SessionError::Replicate)?;
    }
    if let Some(k) = &a.encrypt_key {
        remote::SealKey::load(k)?;
    }
    let report = a.report.as_deref().map(ReportTarget::open).transpose()?;
    let api = a.api_sock.as_deref().map(server::bind).transpose()?;
    Ok(Preflight { report, api })
}

/// How long the end of a run waits for replication to ship what is left.
const REPLICATION_GRACE: Duration = Duration::from_secs(120);

/// Start replicating the snapshot directory `dir` to `url`, looking for
/// new epochs once an interval (at least every 100 ms, at most every second).
fn start_replication(
    url: &str,
    dir: &std::path::Path,
    interval: Duration,
    key: Option<&std::path::Path>,
    limit: remote::BacklogLimit,
    policy: store::Policy,
) -> Result<remote::Replicator, SessionError> {
    let client = remote_client(url, key).map_err(SessionError::ReplicateClient)?;
    let poll = interval.clamp(Duration::from_millis(100), Duration::from_secs(1));
    remote::Replicator::start(dir, client, poll, limit, policy).map_err(SessionError::Replicate)
}

/// What a restored machine gets attached: the console on stdout, and for
/// the workload guest its idle port and ops counter.
pub fn attach(cfg: &vmm::state::MachineConfig) -> vmm::machine::Attach {
    let stdout = Box::new(std::io::stdout());
    match guest::host::workload_of(cfg) {
        Some(_) => guest::host::attach(stdout),
        None => vmm::machine::Attach::console(stdout),
    }
}

/// Where a restored machine came from.
pub struct Origin {
    /// For the report.
    pub from: RestoredFrom,
    /// The restored epoch, when snapshots go to the directory it came from
    /// (the first new epoch continues its chain).
    pub parent: Option<u64>,
    /// The pager of a lazy restore, kept until guest memory is read no more.
    pub pager: Option<snapshot::LazyPager>,
}

/// Run `machine` to its end; `origin` for a restored machine.
pub fn execute(
    mut machine: Machine,
    command: &'static str,
    a: &SessionArgs,
    pre: Preflight,
    origin: Option<Origin>,
    started: Instant,
) -> Result<i32, SessionError> {
    let (restored, parent, pager) = match origin {
        Some(o) => (Some(o.from), o.parent, o.pager),
        None => (None, None, None),
    };
    check_times(a)?;
    let engine = match &a.snapshot_dir {
        Some(dir) => {
            let cfg = SnapshotConfig {
                dir: dir.clone(),
                mode: a.mode.mode(),
                interval: a.interval,
                stop_on_error: a.on_snapshot_error == OnError::Stop,
                cow: CowOptions {
                    tracker: match a.cow_tracker {
                        CowTracker::Uffd => snapshot::Tracker::Uffd,
                        CowTracker::DirtyLog => snapshot::Tracker::DirtyLog,
                    },
                    block_pages: match a.cow_block {
                        CowBlock::Small => 1,
                        CowBlock::Huge => 512,
                    },
                    aside_bytes: usize::try_from(a.cow_buffer).unwrap_or(usize::MAX),
                    hot: hot_policy()?,
                    pause_copy_budget: a.cow_pause_copy,
                    lazy: pager.as_ref().and_then(snapshot::LazyPager::cow_link),
                    ..CowOptions::default()
                },
                direct_io: a.snapshot_io == SnapshotIo::Direct,
                max_lag: a.max_lag.0,
            };
            let mut e = SnapshotEngine::new(cfg, parent);
            // Another process writes this store: refuse before the guest
            // runs (retrying would only fail the same way, quietly).
            if e.store_in_use() {
                return Err(SessionError::StoreInUse(e.errors.first().cloned().unwrap_or_default()));
            }
            if let (OnError::Stop, Some(why)) = (a.on_snapshot_error, e.errors.first()) {
                return Err(SessionError::SnapshotFailed(why.clone()));
            }
            e.prepare(&mut machine)?;
            Some(e)
        }
        None => None,
    };
    let reclaimer = engine.as_ref().and_then(|e| e.store()).map(|store| {
        store.set_compression(a.compress.codec());
        let opts = store::ReclaimOptions {
            codec: Some(a.compress.codec()),
            batch_merges: true,
            ..a.reclaim.options()
        };
        crate::reclaimer::Reclaimer::start(store, opts, parent)
    });
    let replicator = match (&a.replicate, &a.snapshot_dir) {
        (Some(url), Some(dir)) => {
            let limit = remote::BacklogLimit {
                bytes: a.replicate_backlog,
                throttle: a.replicate_overflow == Overflow::Throttle,
            };
            Some(start_replication(
                url,
                dir,
                a.interval,
                a.encrypt_key.as_deref(),
                limit,
                a.reclaim.retain.clone(),
            )?)
        }
        _ => None,
    };
    let cell = Arc::new(BoardCell::new(Board {
        state: VmState::Running,
        vcpus: machine.config().vcpus,
        mem_bytes: machine.config().mem_size,
        started,
        workload: guest::host::workload_of(machine.config())
            .and_then(|w| workload::Spec::parse(&w).ok())
            .map(|s| s.kind.name().to_string()),
        ops: None,
        ops_per_s: None,
        probe: Vec::new(),
        snap: engine.as_ref().map(EngineFigures::new),
        replica: replicator.as_ref().map(remote::Replicator::watch),
    }));
    let (api, commands) = match pre.api {
        Some(listener) => {
            let (tx, rx) = mpsc::sync_channel(server::QUEUE);
            let waker = machine.waker();
            let wake: server::Wake = Arc::new(move || waker.wake());
            (Some(ApiServer::start(listener, cell.clone(), tx, wake)?), Some(rx))
        }
        None => (None, None),
    };
    let live = if engine.is_some() && !a.quiet {
        Live::start(cell.clone(), a.status_interval.filter(|d| !d.is_zero()))
    } else {
        None
    };
    let probe = PauseProbe::new(a.pause_probe);
    let sampled_from_s = started.elapsed().as_secs_f64();
    let sampler = ProgressSampler::new(a.sample_interval);
    let mut control = Control::new(engine, probe, sampler, cell, commands);
    vmm::run::install_stop_signals();
    spawn_stdin(machine.devices().clone());
    let mut watch = crate::lazy_watch::Watch::new(pager.as_ref());
    let end = vmm::run::run(&mut machine, &mut [&mut control as &mut dyn Task, &mut watch]);
    control.stopping(&machine);
    // A vCPU may wait in the kernel for a page the pager refused (it
    // failed its checksum): once every vCPU is told to stop, zero pages
    // release it, and it stops without running guest code again.
    machine.stop_then(&mut || {
        if let Some(p) = &pager {
            p.release_refused();
        }
    });
    control.finish(&mut machine);
    if let Some(l) = live {
        l.stop();
    }
    let end = end?;
    let _ = std::io::stdout().flush();
    let done = control.into_finished();
    let mut pauses = done.probe_pauses;
    if let Some(e) = &done.engine {
        pauses.extend(e.records.iter().map(|r| r.vcpu_pause));
    }
    // A page that failed its checksum is never installed: do not read
    // guest memory for the report then (it could be that page).
    let failed = pager.as_ref().is_some_and(|p| p.failure().is_some());
    let mut report = build_report(command, &machine, &end, started, &pauses, done.samples, !failed);
    report.snapshots = done.engine.as_ref().map(Snapshots::from_engine);
    report.restored_from = restored.map(|mut r| {
        r.first_op_s = crate::lazy_watch::first_op_s(&report.progress, sampled_from_s);
        r.lazy = pager.as_ref().map(|p| crate::lazy_watch::figures(&p.stats()));
        r
    });
    report.reclaim = reclaimer.map(crate::reclaimer::Reclaimer::finish);
    // After the last epoch and the last reclamation: ship what is left.
    report.replication = replicator.map(|r| {
        let s = r.finish(REPLICATION_GRACE);
        crate::report::Replication::from_status(&s, store::now_ns())
    });
    if let Some(target) = pre.report {
        target.write(&report)?;
    }
    if let Some(api) = api {
        api.stop();
    }
    summarize(&report);
    // Guest memory is read no more: the pager may stop.
    drop(pager);
    Ok(report.exit_code)
}

fn build_report(
    command: &'static str,
    machine: &Machine,
    end: &RunEnd,
    started: Instant,
    pauses: &[Duration],
    progress: Vec<(u64, u64)>,
    read_guest: bool,
) -> Report {
    let (status, exit_code, guest_exit_code, error) = match end {
        RunEnd::Guest(GuestStop::PowerOff { code }) => ("poweroff", (*code).min(255) as i32, Some(*code), None),
        RunEnd::Guest(GuestStop::Reset) => ("reset", 0, None, None),
        RunEnd::Guest(GuestStop::Shutdown) => ("shutdown", 0, None, None),
        RunEnd::Signal(sig) => ("signal", 128 + sig, None, None),
        RunEnd::Error(e) => ("error", 1, None, Some(e.to_string())),
        RunEnd::Task(why) => ("error", 1, None, Some(why.clone())),
    };
    let cfg = machine.config();
    let spec_words = guest::host::workload_of(cfg);
    let status_page = spec_words
        .as_ref()
        .filter(|_| read_guest)
        .and_then(|_| guest::host::status::read(machine.ram()));
    let done = status_page.filter(|s| s.done());
    let spec = spec_words.as_deref().and_then(|w| workload::Spec::parse(w).ok());
    Report {
        schema: SCHEMA,
        command,
        status: status.to_string(),
        error,
        exit_code,
        guest_exit_code,
        workload: spec.map(|s| s.kind.name().to_string()),
        workload_spec: spec_words.clone(),
        ops: done.map(|s| s.ops).or(status_page.map(|s| s.ops_done)),
        checksum: done.map(|s| format!("{:#018x}", s.checksum)),
        workload_errors: done.map(|s| s.errors),
        wall_time_s: started.elapsed().as_secs_f64(),
        vcpus: cfg.vcpus,
        mem_bytes: cfg.mem_size,
        anon_huge_bytes: machine.ram().anon_huge_bytes(),
        vcpu_cpu_s: machine.vcpu_times().iter().map(|t| t.cpu_ns as f64 / 1e9).sum(),
        vcpu_wait_s: machine.vcpu_times().iter().map(|t| t.wait_ns as f64 / 1e9).sum(),
        vcpu_idle_s: machine.vcpu_times().iter().map(|t| t.idle_ns as f64 / 1e9).sum(),
        pause: Percentiles::of(pauses),
        progress,
        snapshots: None,
        restored_from: None,
        reclaim: None,
        replication: None,
    }
}

fn summarize(r: &Report) {
    let mut line = format!("consnap: {} after {:.2}s", r.status, r.wall_time_s);
    if let Some(code) = r.guest_exit_code {
        line += &format!(", guest exit code {code}");
    }
    if let (Some(w), Some(ops), Some(sum)) = (&r.workload, r.ops, &r.checksum) {
        line += &format!("; {w} ops={ops} checksum={sum}");
    }
    if r.pause.count > 0 {
        line += &format!(
            "; vCPU pause p50={:.0}us p99={:.0}us max={:.0}us (n={})",
            r.pause.p50_us, r.pause.p99_us, r.pause.max_us, r.pause.count
        );
    }
    if let Some(s) = &r.snapshots {
        line += &format!(
            "; {} snapshots ({} failed), downtime p50={:.0}us p99={:.0}us max={:.0}us",
            s.count, s.failed, s.pause.p50_us, s.pause.p99_us, s.pause.max_us
        );
    }
    if let Some(e) = &r.error {
        line += &format!("; error: {e}");
    }
    let _ = writeln!(std::io::stderr(), "{line}");
}
