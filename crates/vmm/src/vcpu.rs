//! vCPU threads: the run loop, exits, and fast pause/resume.
//!
//! Each vCPU runs `KVM_RUN` on its own thread. To pause, the controller
//! raises a flag and sends every vCPU thread a real-time signal; the handler
//! sets `kvm_run.immediate_exit`, so a vCPU leaves the guest whether it was
//! inside `KVM_RUN` or just about to enter it. A paused vCPU first re-enters
//! `KVM_RUN` once with `immediate_exit` set, which completes any port or MMIO
//! access in flight (the KVM API requires this before state is read), then
//! optionally saves its own state on its own thread, and parks.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;

use crate::devices::{Devices, GuestStop, IoOutcome};
use crate::memory::GuestRam;
use crate::state::{self, Persist, VcpuState};

mod ctrl;
use ctrl::{Ctrl, Want};

/// The longest one idle request may keep a vCPU thread asleep.
pub const MAX_IDLE: Duration = Duration::from_millis(5);

/// vCPU errors; each names the vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u8,
        /// The operation.
        op: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// The in-kernel instruction emulator could not run an instruction.
    #[error("vCPU {vcpu}: KVM could not emulate the instruction at RIP {rip:#x} (bytes: {bytes}){hint}")]
    Emulation {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP.
        rip: u64,
        /// Instruction bytes in hex, or why they could not be read.
        bytes: String,
        /// What the user can do about it, if known.
        hint: &'static str,
    },
    /// Some other KVM internal error.
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror}, RIP {rip:#x}")]
    Internal {
        /// vCPU index.
        vcpu: u8,
        /// KVM suberror code.
        suberror: u32,
        /// Guest RIP.
        rip: u64,
    },
    /// Triple fault.
    #[error("vCPU {vcpu}: guest triple-faulted (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}")]
    TripleFault {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP.
        rip: u64,
    },
    /// VM entry failed.
    #[error("vCPU {vcpu}: VM entry failed, hardware reason {reason:#x}")]
    FailEntry {
        /// vCPU index.
        vcpu: u8,
        /// Hardware reason.
        reason: u64,
    },
    /// An exit consnap does not handle.
    #[error("vCPU {vcpu}: unexpected exit {what}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u8,
        /// Description.
        what: String,
    },
    /// Thread creation failed.
    #[error("cannot start the thread of vCPU {vcpu}: {source}")]
    Spawn {
        /// vCPU index.
        vcpu: u8,
        /// Cause.
        source: std::io::Error,
    },
    /// The vCPU did not reach the pause point in time.
    #[error("vCPU(s) did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// Saving or restoring vCPU state failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// A vCPU has already stopped (the guest is shutting down), so there is no state to save.
    #[error("the VM is shutting down")]
    Stopping,
    /// The kick signal could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// On kvm_pvm (nested virtualization without VMX) KVM emulates all guest
/// kernel code, and its emulator lacks instructions stock kernels use.
fn emulation_hint() -> &'static str {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        ". This host's KVM (kvm_pvm) emulates guest kernel code and lacks some instructions; \
         kernels such as Linux need a host with hardware virtualization (VMX or SVM)"
    } else {
        ""
    }
}

/// What a vCPU thread tells the controller.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest asked to stop.
    Stop {
        /// vCPU index.
        vcpu: u8,
        /// How.
        how: GuestStop,
    },
    /// The vCPU failed and its thread ended.
    Error(VcpuError),
    /// Not from a vCPU: a [`crate::machine::Waker`] asks the controller
    /// loop to look at its tasks now. [`crate::machine::Machine::next_event`]
    /// never returns it.
    Wake,
}

/// What paused vCPUs do before parking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseAction {
    /// Just stop running.
    Hold,
    /// Save the vCPU's complete state (on its own thread).
    SaveState,
}

/// What one vCPU thread used, read when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuTimes {
    /// vCPU index.
    pub vcpu: u8,
    /// CPU time of the thread (guest and host work on its behalf), ns.
    pub cpu_ns: u64,
    /// Time it was runnable but waited for a CPU, ns (from schedstat).
    pub wait_ns: u64,
    /// Time the guest asked to idle ([`IoOutcome::Idle`]) and the thread
    /// slept, ns: a paced guest's slack.
    pub idle_ns: u64,
    /// Time from the vCPUs' start (all of them had their state) to this
    /// vCPU's end, ns: the guest's run, without the VM's set-up before it
    /// or anything the VMM does after it.
    pub run_ns: u64,
}

impl VcpuTimes {
    /// The calling thread's CPU time and run-queue wait.
    fn of_this_thread(vcpu: u8) -> VcpuTimes {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec into `ts`.
        let cpu_ns = if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        } else {
            0
        };
        // /proc/thread-self/schedstat: run time, run-queue wait, time slices.
        let wait_ns = std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|w| w.parse().ok()))
            .unwrap_or(0);
        VcpuTimes {
            vcpu,
            cpu_ns,
            wait_ns,
            idle_ns: 0,
            run_ns: 0,
        }
    }
}

/// State shared by the controller and the vCPU threads.
#[derive(Debug)]
struct Control {
    requested: AtomicBool,
    m: Mutex<Ctrl>,
    cv: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Ctrl> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait on `cv` while `more(&ctrl)` holds, until `deadline`. Returns
    /// the guard and whether the wait ended by the deadline.
    fn wait_while<'a>(
        &'a self,
        mut g: MutexGuard<'a, Ctrl>,
        deadline: Instant,
        more: impl Fn(&Ctrl) -> bool,
    ) -> (MutexGuard<'a, Ctrl>, bool) {
        while more(&g) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (g, true);
            }
            g = self.cv.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        (g, false)
    }
}

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU on this thread (null elsewhere).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer targets the kvm_run mapping of the vCPU owned by
        // this thread; it is set after the mapping exists and cleared before
        // the vCPU is dropped. A volatile byte store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal);
    });
    res
}

/// One vCPU before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    /// Index (also the APIC ID).
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// MSRs saved and restored with this vCPU.
    pub msr_list: Arc<Vec<u32>>,
    /// Bytes of XSAVE state KVM reports (KVM_CAP_XSAVE2, at least 4096).
    pub xsave_size: usize,
}

/// A vCPU's state; restoring applies it to a fresh vCPU, which must happen
/// on the thread that will run it, before its first `KVM_RUN`.
impl Persist for Vcpu {
    type State = VcpuState;
    type Args = Vcpu;
    type Error = state::StateError;

    fn save(&self) -> Result<VcpuState, state::StateError> {
        state::save_vcpu(self)
    }

    fn restore(vcpu: Vcpu, st: &VcpuState) -> Result<Vcpu, state::StateError> {
        state::restore_vcpu(&vcpu, st)?;
        Ok(vcpu)
    }
}

impl Vcpu {
    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Build the error for KVM_EXIT_INTERNAL_ERROR, reading the instruction
    /// bytes at RIP from guest memory.
    fn internal_error(&mut self, ram: &GuestRam) -> VcpuError {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live union member.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        let rip = self.rip();
        if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return VcpuError::Internal {
                vcpu: self.id,
                suberror,
                rip,
            };
        }
        let bytes = match self.fd.get_sregs() {
            Ok(sregs) => match ram.translate(&sregs, sregs.cs.base.wrapping_add(rip)) {
                Some(gpa) => {
                    let bytes: Vec<String> = (0..15u64)
                        .map_while(|i| ram.read_u8(gpa + i))
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    bytes.join(" ")
                }
                None => "unmapped".to_string(),
            },
            Err(e) => format!("unreadable: {e}"),
        };
        VcpuError::Emulation {
            vcpu: self.id,
            rip,
            bytes,
            hint: emulation_hint(),
        }
    }
}

/// Holds vCPU threads until all `n` have arrived, or until opened.
struct StartBarrier {
    m: Mutex<(usize, bool)>,
    cv: Condvar,
    n: usize,
}

impl StartBarrier {
    fn new(n: usize) -> StartBarrier {
        StartBarrier {
            m: Mutex::new((0, false)),
            cv: Condvar::new(),
            n,
        }
    }

    fn arrive_and_wait(&self) {
        let mut g = self.m.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        self.cv.notify_all();
        while g.0 < self.n && !g.1 {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self) {
        self.m.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.cv.notify_all();
    }
}

/// Handles to the running vCPU threads.
#[derive(Debug)]
pub struct Vcpus {
    control: Arc<Control>,
    threads: Vec<(u8, JoinHandle<()>)>,
}

/// Result of a pause.
#[derive(Debug)]
pub struct Paused {
    /// From the request to the last vCPU parked.
    pub latency: Duration,
    /// Saved states, by vCPU index, when [`PauseAction::SaveState`] was asked.
    pub states: Vec<VcpuState>,
}

impl Vcpus {
    /// Start one thread per vCPU. Each applies `restore` (if any) on its own
    /// thread before it first runs.
    pub fn start(
        vcpus: Vec<Vcpu>,
        restore: Option<Vec<VcpuState>>,
        ram: Arc<GuestRam>,
        devices: Arc<Devices>,
        events: Sender<VcpuEvent>,
    ) -> Result<Vcpus, VcpuError> {
        install_kick_handler()?;
        let n = vcpus.len();
        let control = Arc::new(Control {
            requested: AtomicBool::new(false),
            m: Mutex::new(Ctrl::new(n)),
            cv: Condvar::new(),
        });
        let mut restore = restore.map(|v| v.into_iter().map(Some).collect::<Vec<_>>());
        // No vCPU runs guest code before every vCPU has its state: a
        // restored BSP could otherwise send an IPI (an AP's SIPI, say) that
        // the AP's own KVM_SET_MP_STATE/LAPIC/VCPU_EVENTS then overwrites,
        // and the AP never starts (seen on 2-vCPU restores of epochs taken
        // during SMP bring-up).
        let ready = Arc::new(StartBarrier::new(n));
        let mut threads = Vec::with_capacity(n);
        for vcpu in vcpus {
            let id = vcpu.id;
            let st = restore
                .as_mut()
                .and_then(|r| r.get_mut(id as usize).and_then(Option::take));
            let (control, ram, devices, events) = (control.clone(), ram.clone(), devices.clone(), events.clone());
            let gate = ready.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let vcpu = match st {
                        Some(st) => Vcpu::restore(vcpu, &st),
                        None => Ok(vcpu),
                    };
                    gate.arrive_and_wait();
                    match vcpu {
                        Ok(vcpu) => Worker {
                            vcpu,
                            control,
                            ram,
                            devices,
                            events,
                            idle_ns: 0,
                            began: Instant::now(),
                        }
                        .run(),
                        Err(e) => {
                            let _ = events.send(VcpuEvent::Error(e.into()));
                            control.lock().finished += 1;
                            control.cv.notify_all();
                        }
                    }
                })
                .map_err(|source| {
                    // The threads already started must not wait forever.
                    ready.open();
                    VcpuError::Spawn { vcpu: id, source }
                })?;
            threads.push((id, handle));
        }
        Ok(Vcpus { control, threads })
    }

    fn kick_all(&self) {
        for (_, t) in &self.threads {
            // SAFETY: pthread_kill with a handle of a thread we spawned and have
            // not joined; the signal has a handler installed.
            unsafe {
                libc::pthread_kill(std::os::unix::thread::JoinHandleExt::as_pthread_t(t), kick_signal());
            }
        }
    }

    /// Pause every vCPU; returns once all are parked (or have finished).
    pub fn pause(&self, action: PauseAction, timeout: Duration) -> Result<Paused, VcpuError> {
        let start = Instant::now();
        let n = self.threads.len();
        {
            self.control.lock().begin_pause(action);
        }
        self.control.requested.store(true, Ordering::SeqCst);
        // Taking the lock orders the store before any idle vCPU's wait.
        drop(self.control.lock());
        // vCPUs parked by an earlier pause (one the user asked for) wake,
        // see the new generation and park again, doing this pause's action.
        self.control.cv.notify_all();
        self.kick_all();
        let (mut g, timed_out) = self
            .control
            .wait_while(self.control.lock(), start + timeout, |c| c.parked() + c.finished < n);
        if timed_out {
            drop(g);
            self.resume();
            return Err(VcpuError::PauseTimeout(timeout));
        }
        let latency = start.elapsed();
        let mut states = Vec::new();
        if action == PauseAction::SaveState && g.finished > 0 {
            drop(g);
            self.resume();
            return Err(VcpuError::Stopping);
        }
        if action == PauseAction::SaveState {
            for saved in g.take_saved() {
                match saved {
                    Ok(s) => states.push(s),
                    Err(e) => {
                        drop(g);
                        self.resume();
                        return Err(e);
                    }
                }
            }
        }
        Ok(Paused { latency, states })
    }

    /// Let paused vCPUs run again.
    pub fn resume(&self) {
        let mut g = self.control.lock();
        g.want = Want::Run;
        self.control.requested.store(false, Ordering::SeqCst);
        drop(g);
        self.control.cv.notify_all();
    }

    /// Stop and join every vCPU thread; returns what each used.
    pub fn stop(self) -> Vec<VcpuTimes> {
        self.stop_then(&mut || {})
    }

    /// [`Vcpus::stop`], calling `between` after every vCPU was told to stop
    /// and kicked, before waiting for them: to release a vCPU blocked in the
    /// kernel on something only the caller can end (a page a lazy restore
    /// must not install while the guest could still run on it).
    pub fn stop_then(self, between: &mut dyn FnMut()) -> Vec<VcpuTimes> {
        {
            let mut g = self.control.lock();
            g.generation += 1;
            g.want = Want::Stop;
        }
        self.control.requested.store(true, Ordering::SeqCst);
        drop(self.control.lock());
        self.control.cv.notify_all();
        self.kick_all();
        between();
        for (id, t) in self.threads {
            if t.join().is_err() {
                tracing::error!("vCPU {id} thread panicked");
            }
        }
        let mut times = std::mem::take(&mut self.control.lock().times);
        times.sort_by_key(|t| t.vcpu);
        times
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// True when there are no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

struct Worker {
    vcpu: Vcpu,
    control: Arc<Control>,
    ram: Arc<GuestRam>,
    devices: Arc<Devices>,
    events: Sender<VcpuEvent>,
    /// Time slept on the guest's idle requests, ns.
    idle_ns: u64,
    /// When the vCPUs were let go.
    began: Instant,
}

impl Worker {
    fn run(mut self) {
        let exit_ptr: *mut u8 = &mut self.vcpu.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(exit_ptr));
        self.run_loop();
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        let times = VcpuTimes {
            idle_ns: self.idle_ns,
            run_ns: self.began.elapsed().as_nanos() as u64,
            ..VcpuTimes::of_this_thread(self.vcpu.id)
        };
        let mut g = self.control.lock();
        g.finished += 1;
        g.times.push(times);
        drop(g);
        self.control.cv.notify_all();
    }

    fn run_loop(&mut self) {
        loop {
            if self.control.requested.load(Ordering::SeqCst) {
                if !self.park() {
                    return;
                }
                // Woken by a new pause rather than a resume: park again
                // without running guest code.
                continue;
            }
            let flow = match self.vcpu.fd.run() {
                Ok(exit) => handle_exit(self.vcpu.id, exit, &self.devices),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.fd.set_kvm_immediate_exit(0);
                    Ok(IoOutcome::Done)
                }
                Err(source) => Err(ExitError::Kvm(source)),
            };
            match flow {
                Ok(IoOutcome::Done) => {}
                Ok(IoOutcome::Idle(d)) => self.idle(d.min(MAX_IDLE)),
                Ok(IoOutcome::Stop(how)) => {
                    self.devices.serial.flush();
                    let _ = self.events.send(VcpuEvent::Stop {
                        vcpu: self.vcpu.id,
                        how,
                    });
                    return;
                }
                Err(e) => {
                    let err = self.describe(e);
                    let _ = self.events.send(VcpuEvent::Error(err));
                    return;
                }
            }
        }
    }

    /// Sleep for the guest's idle request, or until a pause or stop is
    /// requested (`pause` and `stop` notify under the lock, so the request
    /// cannot slip between the check and the wait).
    fn idle(&mut self, d: Duration) {
        let requested = &self.control.requested;
        let start = Instant::now();
        let _ = self
            .control
            .wait_while(self.control.lock(), start + d, |_| !requested.load(Ordering::SeqCst));
        self.idle_ns += start.elapsed().as_nanos() as u64;
    }

    fn describe(&mut self, e: ExitError) -> VcpuError {
        let vcpu = self.vcpu.id;
        match e {
            ExitError::Kvm(source) => VcpuError::Kvm {
                vcpu,
                op: "KVM_RUN",
                source,
            },
            ExitError::Internal => self.vcpu.internal_error(&self.ram),
            ExitError::Shutdown => VcpuError::TripleFault {
                vcpu,
                rip: self.vcpu.rip(),
            },
            ExitError::FailEntry(reason) => VcpuError::FailEntry { vcpu, reason },
            ExitError::Unexpected(what) => VcpuError::UnexpectedExit { vcpu, what },
        }
    }

    /// Park until resumed. Returns false when the vCPU should stop.
    fn park(&mut self) -> bool {
        // Complete an in-flight I/O exit so the registers are consistent.
        self.vcpu.fd.set_kvm_immediate_exit(1);
        let _ = self.vcpu.fd.run();
        self.vcpu.fd.set_kvm_immediate_exit(0);
        let mut g = self.control.lock();
        let generation = g.generation;
        let saved = match g.want {
            Want::Stop => return false,
            Want::Run => return true,
            Want::Pause(PauseAction::SaveState) => {
                drop(g);
                let saved = self.vcpu.save().map_err(VcpuError::from);
                g = self.control.lock();
                Some(saved)
            }
            Want::Pause(PauseAction::Hold) => None,
        };
        if !g.park(self.vcpu.id as usize, generation, saved) {
            // That pause is over (it timed out, or a new one began while
            // this vCPU saved): do what is wanted now.
            return g.want != Want::Stop;
        }
        self.control.cv.notify_all();
        while g.generation == generation && matches!(g.want, Want::Pause(_)) {
            g = self.control.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.want != Want::Stop
    }
}

enum ExitError {
    Kvm(kvm_ioctls::Error),
    Internal,
    Shutdown,
    FailEntry(u64),
    Unexpected(String),
}

fn handle_exit(vcpu: u8, exit: VcpuExit<'_>, devices: &Devices) -> Result<IoOutcome, ExitError> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            devices.pio.read(u64::from(port), data);
            Ok(IoOutcome::Done)
        }
        VcpuExit::IoOut(port, data) => Ok(devices.pio.write(u64::from(port), data)),
        VcpuExit::MmioRead(addr, data) => {
            devices.mmio.read(addr, data);
            Ok(IoOutcome::Done)
        }
        VcpuExit::MmioWrite(addr, data) => Ok(devices.mmio.write(addr, data)),
        VcpuExit::Hlt => Ok(IoOutcome::Stop(GuestStop::Shutdown)),
        VcpuExit::Shutdown => Err(ExitError::Shutdown),
        VcpuExit::InternalError => Err(ExitError::Internal),
        VcpuExit::FailEntry(reason, _) => Err(ExitError::FailEntry(reason)),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(IoOutcome::Stop(GuestStop::Reset)),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Ok(IoOutcome::Stop(GuestStop::Shutdown)),
            other => Err(ExitError::Unexpected(format!("system event {other}"))),
        },
        VcpuExit::Intr => Ok(IoOutcome::Done),
        other => {
            tracing::debug!(vcpu, "unexpected exit {other:?}");
            Err(ExitError::Unexpected(format!("{other:?}")))
        }
    }
}
