//! Engine threads: each starts with a ready handshake, ends when told to
//! stop, and reports a panic instead of dying silently, so that the run can
//! stop with an error (a dead saver or fault handler would otherwise leave
//! the guest waiting on a write-protected page forever).
//!
//! The writer thread runs one epoch job at a time, in submission order, and
//! reports each result; the controller collects results without blocking.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::capture::error::{EpochFailure, SnapshotError};
use crate::capture::job::{Committed, JobFn};
use crate::panic_message;

/// How long a thread may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared record of an engine thread's death.
#[derive(Debug, Default)]
pub(crate) struct Health {
    failed: Mutex<Option<(&'static str, String)>>,
}

impl Health {
    /// Record that `thread` died with `message` (the first death wins).
    pub(crate) fn fail(&self, thread: &'static str, message: String) {
        tracing::error!(thread, %message, "snapshot engine thread failed");
        let mut g = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert((thread, message));
    }

    /// The failure, if a thread died.
    pub(crate) fn check(&self) -> Option<EpochFailure> {
        let g = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|(thread, message)| EpochFailure::Panicked {
            thread,
            message: message.clone(),
        })
    }
}

/// Scheduling niceness of the writer (and saver) thread: it yields to the
/// vCPUs, so that saving an epoch in the background seldom takes a core a
/// vCPU wants (measured here: with the writer at the vCPUs' priority, the
/// vCPU of a build guest waited 0.9–2.8 s for a core over a 6–8 s run with
/// 10 ms epochs; at nice 19, 0.35 s, as without snapshots). Not 19: other
/// processes on a shared host would then starve it, and epochs would stall
/// for seconds. The interval stretches when the guest leaves no room.
pub(crate) const WRITER_NICE: i32 = 10;
/// Niceness of the fault handler: a vCPU waiting on a fault waits for it,
/// and its copies ahead of the saver spare the vCPUs faults.
pub(crate) const HANDLER_NICE: i32 = 0;

/// Start thread `name` at niceness `nice`: `body` gets a `ready` callback
/// to call once it is set up. Returns once it called it; a panic anywhere
/// in `body` is recorded in `health`.
pub(crate) fn spawn<F>(
    name: &'static str,
    nice: i32,
    health: Arc<Health>,
    body: F,
) -> Result<JoinHandle<()>, SnapshotError>
where
    F: FnOnce(&dyn Fn()) + Send + 'static,
{
    let (tx, rx) = sync_channel::<()>(1);
    let h = health.clone();
    let handle = std::thread::Builder::new()
        .name(format!("snap-{name}"))
        .spawn(move || {
            // SAFETY: setpriority on the calling thread (who = 0 is this
            // thread's id under Linux's per-thread niceness); failure only
            // leaves the default priority.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
            let ready = move || {
                let _ = tx.try_send(());
            };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| body(&ready))) {
                h.fail(name, panic_message(p.as_ref()));
            }
        })
        .map_err(|source| SnapshotError::Thread { thread: name, source })?;
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(()) => Ok(handle),
        Err(_) => {
            if let Some(f) = health.check() {
                tracing::error!("{f}");
            }
            Err(SnapshotError::NotReady(name))
        }
    }
}

/// A finished epoch job.
pub(crate) struct Done {
    /// The epoch.
    pub id: u64,
    /// What happened.
    pub result: Result<Committed, EpochFailure>,
    /// When it finished.
    pub finished: Instant,
}

/// The writer thread.
pub(crate) struct Writer {
    jobs: Option<Sender<(u64, u64, JobFn)>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// The thread's kernel id, for its niceness.
    tid: Arc<AtomicI32>,
    urgent: bool,
    /// Raising the writer's priority was refused (no CAP_SYS_NICE): not tried again.
    urgent_denied: bool,
}

impl Writer {
    /// Start the writer thread.
    pub(crate) fn start(health: Arc<Health>) -> Result<Writer, SnapshotError> {
        let (jobs, rx) = channel::<(u64, u64, JobFn)>();
        let (tx, done) = channel::<Done>();
        let tid = Arc::new(AtomicI32::new(0));
        let my_tid = tid.clone();
        let thread = spawn("writer", WRITER_NICE, health, move |ready| {
            // SAFETY: gettid has no preconditions.
            my_tid.store(unsafe { libc::gettid() }, Ordering::Release);
            ready();
            for (id, pause_ns, job) in rx {
                let result = match catch_unwind(AssertUnwindSafe(|| job(pause_ns))) {
                    Ok(r) => r,
                    Err(p) => {
                        let message = panic_message(p.as_ref());
                        let _ = tx.send(Done {
                            id,
                            result: Err(EpochFailure::Panicked {
                                thread: "writer",
                                message: message.clone(),
                            }),
                            finished: Instant::now(),
                        });
                        // Let the health record stop the run too.
                        std::panic::resume_unwind(Box::new(message));
                    }
                };
                if tx
                    .send(Done {
                        id,
                        result,
                        finished: Instant::now(),
                    })
                    .is_err()
                {
                    return;
                }
            }
        })?;
        Ok(Writer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            tid,
            urgent: false,
            urgent_denied: false,
        })
    }

    /// Run the writer at the vCPUs' priority (`urgent`, nice 0) or back
    /// below them. The engine makes it urgent while an epoch is late by
    /// more than `SnapshotConfig::max_lag`, so that a host kept busy by
    /// other work (which starves a nice-10 thread: epochs took seconds to
    /// save beside other busy vCPUs) delays snapshots by about that much,
    /// not without bound. Lowering a niceness needs CAP_SYS_NICE (root has
    /// it); without it the writer stays at [`WRITER_NICE`]. True when it
    /// became urgent just now.
    pub(crate) fn set_urgent(&mut self, urgent: bool) -> bool {
        if urgent == self.urgent || urgent && self.urgent_denied {
            return false;
        }
        let tid = self.tid.load(Ordering::Acquire);
        let nice = if urgent { 0 } else { WRITER_NICE };
        // SAFETY: setpriority on a thread of this process; failure leaves
        // its niceness as it was.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if urgent {
                tracing::info!(
                    "the snapshot writer cannot run at the vCPUs' priority ({e}): late epochs wait for idle CPU"
                );
                self.urgent_denied = true;
            } else {
                tracing::warn!("the snapshot writer stays at the vCPUs' priority: {e}");
            }
            return false;
        }
        self.urgent = urgent;
        urgent
    }

    /// Queue a job for epoch `id`; false if the thread is gone.
    pub(crate) fn submit(&self, id: u64, pause_ns: u64, job: JobFn) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send((id, pause_ns, job)).is_ok())
    }

    /// A finished job: waits up to `wait` (zero = only if one is ready).
    /// `Err(())` when the thread is gone and nothing is left to collect.
    pub(crate) fn done(&self, wait: Duration) -> Result<Option<Done>, ()> {
        let r = if wait.is_zero() {
            self.done
                .try_recv()
                .map_err(|e| matches!(e, std::sync::mpsc::TryRecvError::Disconnected))
        } else {
            self.done
                .recv_timeout(wait)
                .map_err(|e| matches!(e, std::sync::mpsc::RecvTimeoutError::Disconnected))
        };
        match r {
            Ok(d) => Ok(Some(d)),
            Err(true) => Err(()),
            Err(false) => Ok(None),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of(tid: i32) -> i32 {
        // SAFETY: getpriority on a thread of this process. It may return
        // -1 as a valid niceness; the tests never set that.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
    }

    #[test]
    fn an_urgent_writer_runs_at_the_vcpus_priority_then_goes_back() {
        let mut w = Writer::start(Arc::default()).expect("start the writer");
        let tid = w.tid.load(Ordering::Acquire);
        assert_ne!(tid, 0);
        assert_eq!(nice_of(tid), WRITER_NICE);
        let may = vmm::testing::may_lower_niceness();
        assert_eq!(w.set_urgent(true), may, "only a privileged process may raise it");
        assert_eq!(nice_of(tid), if may { 0 } else { WRITER_NICE });
        assert!(!w.set_urgent(true), "already urgent, or refused once: not again");
        assert!(!w.set_urgent(false));
        assert_eq!(nice_of(tid), WRITER_NICE);
    }
}
