//! The controller loop: wait for the guest to stop while periodic tasks
//! (snapshots, pause probes, progress sampling) run at their deadlines.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::devices::GuestStop;
use crate::machine::{Machine, MachineError};
use crate::vcpu::{PauseAction, VcpuError, VcpuEvent};

/// What a task wants after running.
#[derive(Debug)]
pub enum TaskFlow {
    /// Keep going.
    Continue,
    /// Stop the VM; the reason goes into the run's result.
    Stop(String),
}

/// Work done on the controller thread at a deadline.
pub trait Task {
    /// When the task next wants to run (`None` = never again).
    fn due(&self) -> Option<Instant>;
    /// Run it.
    fn run(&mut self, machine: &mut Machine) -> TaskFlow;
}

/// Why a run ended.
#[derive(Debug)]
pub enum RunEnd {
    /// The guest stopped itself.
    Guest(GuestStop),
    /// SIGINT or SIGTERM arrived (the signal number).
    Signal(i32),
    /// A vCPU failed.
    Error(VcpuError),
    /// A task asked to stop.
    Task(String),
}

/// Signal number caught by the handler installed with [`install_stop_signals`] (0 = none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Catch SIGINT and SIGTERM so that a run ends cleanly.
pub fn install_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Longest the loop sleeps between checks of signals.
const TICK: Duration = Duration::from_millis(20);

/// Run until the guest stops, a vCPU fails, a signal arrives or a task says stop.
pub fn run(machine: &mut Machine, tasks: &mut [&mut dyn Task]) -> Result<RunEnd, MachineError> {
    machine.start()?;
    loop {
        let sig = STOP_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            return Ok(RunEnd::Signal(sig));
        }
        let now = Instant::now();
        let next = tasks.iter().filter_map(|t| t.due()).min();
        let wait = next.map_or(TICK, |d| d.saturating_duration_since(now).min(TICK));
        match machine.next_event(wait) {
            Some(VcpuEvent::Stop { how, .. }) => return Ok(RunEnd::Guest(how)),
            Some(VcpuEvent::Error(e)) => return Ok(RunEnd::Error(e)),
            Some(VcpuEvent::Wake) | None => {}
        }
        let now = Instant::now();
        for t in tasks.iter_mut() {
            if t.due().is_some_and(|d| d <= now)
                && let TaskFlow::Stop(why) = t.run(machine)
            {
                return Ok(RunEnd::Task(why));
            }
        }
    }
}

/// Measures how long pausing and resuming all vCPUs takes, every `interval`.
#[derive(Debug)]
pub struct PauseProbe {
    interval: Duration,
    next: Instant,
    /// Pause latencies observed.
    pub pauses: Vec<Duration>,
    /// Errors observed (a pause that timed out).
    pub errors: u64,
}

impl PauseProbe {
    /// Probe every `interval`, starting one interval from now.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            next: Instant::now() + interval,
            pauses: Vec::new(),
            errors: 0,
        }
    }
}

impl Task for PauseProbe {
    fn due(&self) -> Option<Instant> {
        (!self.interval.is_zero()).then_some(self.next)
    }

    fn run(&mut self, machine: &mut Machine) -> TaskFlow {
        match machine.pause(PauseAction::Hold) {
            Ok(p) => {
                self.pauses.push(p.latency);
                let _ = machine.resume();
            }
            Err(e) => {
                tracing::warn!("pause probe failed: {e}");
                self.errors += 1;
            }
        }
        self.next = Instant::now() + self.interval;
        TaskFlow::Continue
    }
}

/// Samples the machine's progress counter ([`Machine::progress`]; no VM
/// exit involved).
#[derive(Debug)]
pub struct ProgressSampler {
    interval: Duration,
    start: Instant,
    next: Instant,
    /// (milliseconds since start, counter).
    pub samples: Vec<(u64, u64)>,
}

impl ProgressSampler {
    /// Sample every `interval`.
    pub fn new(interval: Duration) -> Self {
        let now = Instant::now();
        Self {
            interval,
            start: now,
            next: now + interval,
            samples: Vec::new(),
        }
    }
}

impl Task for ProgressSampler {
    fn due(&self) -> Option<Instant> {
        (!self.interval.is_zero()).then_some(self.next)
    }

    fn run(&mut self, machine: &mut Machine) -> TaskFlow {
        if let Some(n) = machine.progress() {
            self.samples.push((self.start.elapsed().as_millis() as u64, n));
        }
        self.next += self.interval;
        if self.next < Instant::now() {
            self.next = Instant::now() + self.interval;
        }
        TaskFlow::Continue
    }
}
