//! Running a machine to its end with probes, sampling and snapshots, and
//! reporting on it. Shared by `run` and `restore`.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use snapshot::{CowOptions, HotPolicy, LazyLink, LazyPager, SnapshotConfig, SnapshotEngine};
use thiserror::Error;
use vmm::devices::{Devices, GuestStop};
use vmm::machine::{Machine, MachineError};
use vmm::run::{PauseProbe, ProgressSampler, RunEnd, Task};

use crate::api::VmState;
use crate::api::board::{Board, BoardCell, Envelope};
use crate::api::server::{self, ApiServer};
use crate::control::{Control, Finished};
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
    /// `--net-commit epoch` or `--console-commit epoch` without snapshots.
    #[error("{0} epoch or remote needs --snapshot-dir: output waits for epochs, and there would be none")]
    CommitWithoutSnapshots(&'static str),
    /// `--net-commit remote` without `--replicate`.
    #[error("--net-commit remote needs --replicate: output waits for the object store")]
    RemoteWithoutReplication,
    /// `--console-commit remote`.
    #[error(
        "--console-commit takes epoch or none; with --net-commit remote the console waits for the object store too"
    )]
    ConsoleRemote,
    /// The output gate's thread cannot start.
    #[error("cannot start the output commit thread: {0}")]
    OutputThread(#[source] std::io::Error),
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
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

pub use crate::session_args::*;

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

/// The hot-region policy `CONSNAP_COW_HOT` (`var`) asks for: `off`, or
/// `STREAK,PAGES,PROBE` (a tuning knob for measurements); unset, the
/// engine's default.
fn hot_policy(var: Option<&str>) -> Result<Option<HotPolicy>, SessionError> {
    let Some(v) = var else {
        return Ok(Some(HotPolicy::default()));
    };
    if v == "off" {
        return Ok(None);
    }
    let n: Vec<u64> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    match n[..] {
        [streak, pages, probe] => Ok(Some(HotPolicy {
            min_streak: streak.min(255) as u8,
            min_pages: pages.min(64) as u32,
            probe_every: probe,
        })),
        _ => Err(SessionError::HotPolicy(v.to_string())),
    }
}

/// What [`preflight`] checked and opened. Only [`preflight`] makes one,
/// and [`execute`] takes one: the options are checked there, once.
#[derive(Debug)]
pub struct Preflight {
    /// Where the report goes, if anywhere.
    pub report: Option<ReportTarget>,
    /// The control API's socket, bound.
    pub api: Option<server::Listener>,
    /// `cow`'s hot-region policy (from `CONSNAP_COW_HOT`), when snapshots are on.
    hot: Option<HotPolicy>,
    /// Where the machine's output goes (output commit).
    pub output: Output,
}

/// The machine's output gate, and whether the console goes through it.
#[derive(Debug, Clone)]
pub struct Output {
    gate: Arc<vmm::devices::output::OutputGate>,
    console: bool,
}

impl Output {
    /// From the session options (checked by [`preflight`]).
    fn new(a: &SessionArgs) -> Result<Output, SessionError> {
        let snapshots = a.snapshot_dir.is_some();
        let net = a
            .net_commit
            .unwrap_or(if snapshots { CommitArg::Epoch } else { CommitArg::None });
        for (flag, c) in [("--net-commit", net), ("--console-commit", a.console_commit)] {
            if c != CommitArg::None && !snapshots {
                return Err(SessionError::CommitWithoutSnapshots(flag));
            }
        }
        if a.console_commit == CommitArg::Remote {
            return Err(SessionError::ConsoleRemote);
        }
        if net == CommitArg::Remote && a.replicate.is_none() {
            return Err(SessionError::RemoteWithoutReplication);
        }
        let console = a.console_commit == CommitArg::Epoch;
        let gate = if net != CommitArg::None || console {
            vmm::devices::output::OutputGate::committed(a.output_hold, net == CommitArg::Remote)
                .map_err(SessionError::OutputThread)?
        } else {
            vmm::devices::output::OutputGate::passthrough()
        };
        Ok(Output { gate, console })
    }

    /// Put the gate (and the console behind it, if asked) into `attach`.
    pub fn apply(&self, attach: &mut vmm::machine::Attach) {
        attach.output = self.gate.clone();
        if self.console {
            let out = std::mem::replace(&mut attach.serial_out, Box::new(std::io::sink()));
            attach.serial_out = Box::new(vmm::devices::output::GatedWriter::new(self.gate.clone(), out));
        }
    }
}

/// Check the session options before any VM exists: the intervals must fit
/// together, the snapshot mode must be able to run on this host, the
/// object store URL and key must be usable, the report path must be
/// writable, and the API socket is created.
pub fn preflight(a: &SessionArgs) -> Result<Preflight, SessionError> {
    if a.interval.is_zero() {
        return Err(SessionError::ZeroInterval);
    }
    if a.cow_pause_copy >= a.interval {
        return Err(SessionError::PauseCopy {
            pause_copy: a.cow_pause_copy,
            interval: a.interval,
        });
    }
    let hot = match a.snapshot_dir {
        Some(_) => {
            SnapshotEngine::check_host(a.mode.mode())?;
            hot_policy(std::env::var("CONSNAP_COW_HOT").ok().as_deref())?
        }
        None => None,
    };
    if let Some(u) = &a.replicate {
        remote::RemoteUrl::parse(u).map_err(SessionError::Replicate)?;
    }
    if let Some(k) = &a.encrypt_key {
        remote::SealKey::load(k)?;
    }
    let report = a.report.as_deref().map(ReportTarget::open).transpose()?;
    let output = Output::new(a)?;
    let api = a.api_sock.as_deref().map(server::bind).transpose()?;
    Ok(Preflight {
        report,
        api,
        hot,
        output,
    })
}

/// `cow`'s options from the command line, with the hot-region policy
/// `hot` and, after a lazy restore, the pager's `lazy` link. What the
/// command line does not set is the engine's default, and its own
/// defaults are the engine's too (a test checks it).
fn cow_options(a: &SessionArgs, hot: Option<HotPolicy>, lazy: Option<LazyLink>) -> CowOptions {
    CowOptions {
        tracker: match a.cow_tracker {
            CowTracker::Auto | CowTracker::Uffd => snapshot::Tracker::Uffd,
            CowTracker::DirtyLog => snapshot::Tracker::DirtyLog,
        },
        adapt: (a.cow_tracker == CowTracker::Auto).then(snapshot::AdaptPolicy::default),
        block_pages: match a.cow_block {
            CowBlock::Small => 1,
            CowBlock::Huge => 512,
        },
        aside_bytes: usize::try_from(a.cow_buffer).unwrap_or(usize::MAX),
        hot,
        pause_copy_budget: a.cow_pause_copy,
        lazy,
        ..CowOptions::default()
    }
}

/// The engine's configuration: snapshots into `dir`, `cow` tuned by `cow`.
fn snapshot_config(a: &SessionArgs, dir: &Path, cow: CowOptions) -> SnapshotConfig {
    SnapshotConfig {
        dir: dir.to_path_buf(),
        mode: a.mode.mode(),
        interval: a.interval,
        stop_after: a.on_snapshot_error.stop_after(),
        cow,
        direct_io: a.snapshot_io == SnapshotIo::Direct,
        max_lag: a.max_lag.0,
        max_store: (a.reclaim.max_store > 0).then_some(a.reclaim.max_store),
        max_chain: a.reclaim.max_chain,
    }
}

/// The snapshot engine, when snapshots are on, prepared on `machine`;
/// `parent`: the epoch the first new one continues, `pager`: the pager of
/// a lazy restore.
fn start_engine(
    machine: &mut Machine,
    a: &SessionArgs,
    hot: Option<HotPolicy>,
    parent: Option<u64>,
    pager: Option<&LazyPager>,
) -> Result<Option<SnapshotEngine>, SessionError> {
    let Some(dir) = &a.snapshot_dir else {
        return Ok(None);
    };
    let cow = cow_options(a, hot, pager.and_then(LazyPager::cow_link));
    let mut e = SnapshotEngine::new(snapshot_config(a, dir, cow), parent)?;
    e.prepare(machine)?;
    Ok(Some(e))
}

/// How long the end of a run waits for replication to ship what is left.
const REPLICATION_GRACE: Duration = Duration::from_secs(120);

/// What works on the snapshot directory beside the VM: the reclaimer,
/// and the replicator with `--replicate`.
struct Background {
    reclaimer: Option<crate::reclaimer::Reclaimer>,
    replicator: Option<remote::Replicator>,
    /// With `--net-commit remote`: what lets output out once the object
    /// store holds its epoch.
    remote_release: Option<RemoteRelease>,
}

/// A thread that tells the output gate which epochs the object store
/// holds, and the replicator when epochs wait for it.
struct RemoteRelease {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// How often the remote-release thread looks.
const REMOTE_RELEASE_POLL: Duration = Duration::from_millis(2);

impl RemoteRelease {
    fn start(
        gate: Arc<vmm::devices::output::OutputGate>,
        watch: remote::ReplicaWatch,
    ) -> Result<RemoteRelease, SessionError> {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("remote-release".into())
            .spawn(move || {
                let mut asked = None;
                while !s.load(Ordering::Relaxed) {
                    let waiting = gate.newest_pending();
                    if waiting.is_some() && waiting != asked {
                        watch.notify();
                        asked = waiting;
                    }
                    if let Some(id) = watch.newest() {
                        gate.durable_remotely(id);
                    }
                    std::thread::sleep(REMOTE_RELEASE_POLL);
                }
            })
            .map_err(SessionError::OutputThread)?;
        Ok(RemoteRelease { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

impl Background {
    /// Start what the options ask for on `engine`'s store; `parent`: the
    /// restored epoch the new ones continue (the reclaimer keeps it).
    fn start(
        a: &SessionArgs,
        engine: Option<&SnapshotEngine>,
        parent: Option<u64>,
        gate: &Arc<vmm::devices::output::OutputGate>,
    ) -> Result<Background, SessionError> {
        let reclaimer = engine.map(SnapshotEngine::store).map(|store| {
            store.set_compression(a.compress.codec());
            let opts = store::ReclaimOptions {
                codec: Some(a.compress.codec()),
                batch_merges: true,
                ..a.reclaim.options()
            };
            crate::reclaimer::Reclaimer::start(store, opts, parent)
        });
        let replicator = match (&a.replicate, &a.snapshot_dir) {
            (Some(url), Some(dir)) => Some(start_replication(url, dir, a)?),
            _ => None,
        };
        let remote_release = match &replicator {
            Some(r) if gate.remote() => Some(RemoteRelease::start(gate.clone(), r.watch())?),
            _ => None,
        };
        Ok(Background {
            reclaimer,
            replicator,
            remote_release,
        })
    }

    /// After the last epoch: the last reclamation, then ship what is left.
    fn finish(
        self,
    ) -> (
        Option<crate::reclaimer::ReclaimReport>,
        Option<crate::report::Replication>,
    ) {
        if let Some(r) = self.remote_release {
            r.stop();
        }
        let reclaim = self.reclaimer.map(crate::reclaimer::Reclaimer::finish);
        let replication = self.replicator.map(|r| {
            let s = r.finish(REPLICATION_GRACE);
            crate::report::Replication::from_status(&s, store::now_ns())
        });
        (reclaim, replication)
    }
}

/// Start replicating the snapshot directory `dir` to `url`, looking for
/// new epochs once an interval (at least every 100 ms, at most every second).
fn start_replication(url: &str, dir: &Path, a: &SessionArgs) -> Result<remote::Replicator, SessionError> {
    let client = remote_client(url, a.encrypt_key.as_deref()).map_err(SessionError::ReplicateClient)?;
    let poll = a.interval.clamp(Duration::from_millis(100), Duration::from_secs(1));
    let limit = remote::BacklogLimit {
        bytes: a.replicate_backlog,
        throttle: a.replicate_overflow == Overflow::Throttle,
    };
    remote::Replicator::start(dir, client, poll, limit, a.reclaim.retain.clone()).map_err(SessionError::Replicate)
}

/// The board of `machine`, about to run.
fn board(
    machine: &Machine,
    started: Instant,
    engine: Option<&SnapshotEngine>,
    replicator: Option<&remote::Replicator>,
) -> Board {
    Board {
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
        snap: engine.map(EngineFigures::new),
        replica: replicator.map(remote::Replicator::watch),
        output: shown_output(machine),
        nets: machine.nets(),
    }
}

/// The machine's output gate, where it has something to show: output
/// commit is on, or the machine has a network.
fn shown_output(machine: &Machine) -> Option<Arc<vmm::devices::output::OutputGate>> {
    Some(machine.output().clone()).filter(|g| g.commits() || !machine.nets().is_empty())
}

/// Serve the control API on `listener`, if one was bound: the server, and
/// the queue its commands come through to the controller.
fn serve_api(
    listener: Option<server::Listener>,
    machine: &Machine,
    cell: &Arc<BoardCell>,
) -> Result<Option<(ApiServer, mpsc::Receiver<Envelope>)>, SessionError> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let (tx, rx) = mpsc::sync_channel(server::QUEUE);
    let waker = machine.waker();
    let wake: server::Wake = Arc::new(move || waker.wake());
    Ok(Some((ApiServer::start(listener, cell.clone(), tx, wake)?, rx)))
}

/// What a restored machine gets attached: the console on stdout, for the
/// workload guest its idle port and ops counter, the new images its disks
/// are restored into, its networks (each on the TAP it had, or on those of
/// `nets`) and the output gate.
pub fn attach(
    cfg: &vmm::state::MachineConfig,
    disks: &[std::path::PathBuf],
    nets: &[vmm::machine::NetAttach],
    output: &Output,
) -> vmm::machine::Attach {
    let stdout = Box::new(std::io::stdout());
    let mut a = match guest::host::workload_of(cfg) {
        Some(_) => guest::host::attach(stdout),
        None => vmm::machine::Attach::console(stdout),
    };
    a.disks = disks.iter().cloned().map(vmm::machine::DiskAttach::new).collect();
    a.nets = nets.to_vec();
    output.apply(&mut a);
    a
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

/// Run `machine` with `control` (and a lazy restore's watch) until it
/// ends; then stop every vCPU and let the controller finish.
fn run_machine(
    machine: &mut Machine,
    control: &mut Control,
    pager: Option<&LazyPager>,
) -> Result<RunEnd, MachineError> {
    vmm::run::install_stop_signals();
    spawn_stdin(machine.devices().clone());
    let mut watch = crate::lazy_watch::Watch::new(pager);
    let end = vmm::run::run(machine, &mut [control as &mut dyn Task, &mut watch]);
    control.stopping(machine);
    // A vCPU may wait in the kernel for a page the pager refused (it
    // failed its checksum): once every vCPU is told to stop, zero pages
    // release it, and it stops without running guest code again.
    machine.stop_then(&mut || {
        if let Some(p) = pager {
            p.release_refused();
        }
    });
    control.finish(machine);
    end
}

/// Run `machine` to its end; `origin` for a restored machine. `pre` is
/// what [`preflight`] checked and opened for the same options `a`.
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
    let engine = start_engine(&mut machine, a, pre.hot, parent, pager.as_ref())?;
    let background = Background::start(a, engine.as_ref(), parent, machine.output())?;
    let cell = Arc::new(BoardCell::new(board(
        &machine,
        started,
        engine.as_ref(),
        background.replicator.as_ref(),
    )));
    let (api, commands) = serve_api(pre.api, &machine, &cell)?.unzip();
    let live = match (&engine, a.quiet) {
        (Some(_), false) => Live::start(cell.clone(), a.status_interval.filter(|d| !d.is_zero())),
        _ => None,
    };
    let probe = PauseProbe::new(a.pause_probe);
    let sampled_from_s = started.elapsed().as_secs_f64();
    let sampler = ProgressSampler::new(a.sample_interval);
    let mut control = Control::new(engine, probe, sampler, cell, commands);
    let end = run_machine(&mut machine, &mut control, pager.as_ref());
    // A guest that ended by itself is rolled back by nothing: what it said
    // last may leave. Any other end drops what no durable epoch covers.
    if matches!(end, Ok(RunEnd::Guest(_))) {
        machine.output().release_all();
    }
    machine.output().shut();
    if let Some(l) = live {
        l.stop();
    }
    let end = end?;
    let _ = std::io::stdout().flush();
    // A page that failed its checksum is never installed: do not read
    // guest memory for the report then (it could be that page).
    let read_guest = pager.as_ref().is_none_or(|p| p.failure().is_none());
    let mut report = build_report(command, &machine, &end, started, control.into_finished(), read_guest);
    report.restored_from = restored.map(|mut r| {
        r.first_op_s = crate::lazy_watch::first_op_s(&report.progress, sampled_from_s);
        r.lazy = pager.as_ref().map(|p| crate::lazy_watch::figures(&p.stats()));
        r
    });
    (report.reclaim, report.replication) = background.finish();
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

/// The exit status of a run that had failed snapshots (it ran unprotected
/// for a while) and would otherwise have exited 0, or that stopped
/// because snapshots failed.
pub const UNPROTECTED_EXIT: i32 = 3;

/// The report of `machine`'s run, which ended with `end`; `measured`:
/// what the controller measured. `read_guest`: whether guest memory may be read
/// (the workload guest's status page).
fn build_report(
    command: &'static str,
    machine: &Machine,
    end: &RunEnd,
    started: Instant,
    measured: Finished,
    read_guest: bool,
) -> Report {
    let mut pauses = measured.probe_pauses;
    if let Some(e) = &measured.engine {
        pauses.extend(e.records.iter().map(|r| r.vcpu_pause));
    }
    let (status, exit_code, guest_exit_code, error) = match end {
        RunEnd::Guest(GuestStop::PowerOff { code }) => ("poweroff", (*code).min(255) as i32, Some(*code), None),
        RunEnd::Guest(GuestStop::Reset) => ("reset", 0, None, None),
        RunEnd::Guest(GuestStop::Shutdown) => ("shutdown", 0, None, None),
        RunEnd::Signal(sig) => ("signal", 128 + sig, None, None),
        RunEnd::Error(e) => ("error", 1, None, Some(e.to_string())),
        RunEnd::Task(why) => ("error", 1, None, Some(why.clone())),
    };
    // A run with failed snapshots was not protected the whole time: its
    // exit status says so unless it already reports a failure of its own.
    let failed_snapshots = measured.engine.as_ref().is_some_and(|e| !e.errors.is_empty());
    let exit_code = match end {
        RunEnd::Guest(_) if failed_snapshots && exit_code == 0 => UNPROTECTED_EXIT,
        RunEnd::Task(_) if failed_snapshots => UNPROTECTED_EXIT,
        _ => exit_code,
    };
    let cfg = machine.config();
    let spec_words = guest::host::workload_of(cfg);
    let status_page = spec_words
        .as_ref()
        .filter(|_| read_guest)
        .and_then(|_| guest::host::status::read(machine.ram()));
    let done = status_page.filter(|s| s.done());
    let spec = spec_words.as_deref().and_then(|w| workload::Spec::parse(w).ok());
    let nets: Vec<_> = machine
        .nets()
        .iter()
        .map(|n| crate::report::NetFigures::of(n))
        .collect();
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
        vcpu_run_s: machine.vcpu_times().iter().map(|t| t.run_ns as f64 / 1e9).sum(),
        pause: Percentiles::of(&pauses),
        progress: measured.samples,
        snapshots: measured.engine.as_ref().map(Snapshots::from_engine),
        restored_from: None,
        reclaim: None,
        replication: None,
        output: shown_output(machine).map(|g| crate::report::OutputFigures::of(&g.stats())),
        nets,
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
    let mut err = std::io::stderr();
    let _ = writeln!(err, "{line}");
    if let Some(s) = &r.snapshots {
        if s.failed > 0 {
            let _ = writeln!(
                err,
                "consnap: warning: the run was not protected the whole time: {} failed (exit status {})",
                crate::args::counted(s.failed as u64, "snapshot"),
                r.exit_code
            );
        } else if s.count == 0 {
            let _ = writeln!(
                err,
                "consnap: warning: the run ended before its first snapshot was due: nothing of it was saved"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The options `run` and `restore` share, as clap parses them there.
    #[derive(Debug, Parser)]
    struct Session {
        #[command(flatten)]
        session: SessionArgs,
    }

    /// The session options of `consnap run OPTIONS...`.
    fn run_options(options: &[&str]) -> SessionArgs {
        let words = std::iter::once("consnap run").chain(options.iter().copied());
        Session::try_parse_from(words).unwrap().session
    }

    #[test]
    fn the_cli_and_the_engine_share_one_set_of_defaults() {
        let a = run_options(&["--snapshot-dir", "snaps"]);
        let cli = cow_options(&a, hot_policy(None).unwrap(), None);
        let engine = CowOptions::default();
        assert_eq!(cli.tracker, engine.tracker);
        assert_eq!(cli.adapt, engine.adapt);
        assert_eq!(cli.block_pages, engine.block_pages);
        assert_eq!(cli.aside_bytes, engine.aside_bytes);
        assert_eq!(cli.chunk_pages, engine.chunk_pages);
        assert_eq!(cli.merge_gap_pages, engine.merge_gap_pages);
        assert_eq!(cli.hot, engine.hot);
        assert_eq!(cli.capture_ahead, engine.capture_ahead);
        assert_eq!(cli.pause_copy_budget, engine.pause_copy_budget);
        assert!(cli.lazy.is_none());
    }

    #[test]
    fn the_options_take_effect() {
        let a = run_options(&[
            "--snapshot-dir",
            "snaps",
            "--cow-tracker",
            "dirty-log",
            "--cow-block",
            "4K",
            "--cow-buffer",
            "64M",
            "--cow-pause-copy",
            "2ms",
            "--interval",
            "20ms",
            "--snapshot-io",
            "buffered",
            "--max-lag",
            "never",
        ]);
        let cow = cow_options(&a, None, None);
        assert_eq!((cow.tracker, cow.adapt), (snapshot::Tracker::DirtyLog, None));
        assert_eq!((cow.block_pages, cow.aside_bytes), (1, 64 << 20));
        assert_eq!(cow.pause_copy_budget, Duration::from_millis(2));
        assert_eq!(cow.hot, None);
        let cfg = snapshot_config(&a, Path::new("snaps"), cow);
        assert_eq!((cfg.mode, cfg.interval), (store::Mode::Cow, Duration::from_millis(20)));
        assert!(!cfg.direct_io && cfg.max_lag.is_none());
        assert_eq!(
            cfg.stop_after,
            Some(10),
            "the default policy stops after 10 failures in a row"
        );
    }

    #[test]
    fn preflight_refuses_intervals_that_do_not_fit() {
        let zero = run_options(&["--snapshot-dir", "snaps", "--interval", "0"]);
        assert_eq!(
            preflight(&zero).unwrap_err().to_string(),
            "--interval must be longer than 0"
        );
        let full = run_options(&[
            "--snapshot-dir",
            "snaps",
            "--interval",
            "10ms",
            "--cow-pause-copy",
            "10ms",
        ]);
        assert_eq!(
            preflight(&full).unwrap_err().to_string(),
            "--cow-pause-copy 10ms must be shorter than --interval 10ms"
        );
    }

    #[test]
    fn the_hot_policy_is_off_or_three_numbers() {
        assert_eq!(hot_policy(Some("off")).unwrap(), None);
        assert_eq!(
            hot_policy(Some("3, 8,4")).unwrap(),
            Some(HotPolicy {
                min_streak: 3,
                min_pages: 8,
                probe_every: 4,
            })
        );
        assert_eq!(
            hot_policy(Some("3,8")).unwrap_err().to_string(),
            "CONSNAP_COW_HOT='3,8' is not 'off' or STREAK,PAGES,PROBE"
        );
    }
}
