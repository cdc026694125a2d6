//! The thread that serves one virtio device's queues, and how a snapshot's
//! pause stops it.
//!
//! The thread waits (epoll) on its queues' ioeventfds and on a wake-up
//! eventfd. A pause ([`Pauser::pause`]) sets a flag the device checks
//! between two requests, wakes the thread and waits until it is parked
//! outside any request: every request it started is complete and in the
//! used ring, and it touches neither guest memory nor the disk until
//! [`Pauser::resume`]. Requests the guest made available but the device
//! had not started stay in the available ring; after a resume (and when
//! the thread starts, which covers a restore) every queue is served once,
//! so none waits for another notification.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use crate::devices::DeviceError;

/// How long a pause waits for the device to finish the request it serves.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    parked: bool,
    /// The thread has ended (stopped, or failed to start its loop).
    gone: bool,
}

/// The pause and stop protocol between the machine and a device thread.
#[derive(Debug)]
pub(crate) struct Pauser {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// Checked by the device between requests.
    pausing: AtomicBool,
    wake: EventFd,
}

impl Pauser {
    pub(crate) fn new() -> Result<Pauser, DeviceError> {
        Ok(Pauser {
            ctl: Mutex::new(Ctl {
                want: Want::Run,
                parked: false,
                gone: false,
            }),
            cv: Condvar::new(),
            pausing: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
                what: "virtio worker wake-up",
                source,
            })?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while a pause or stop is asked for: the device stops between requests.
    pub(crate) fn pausing(&self) -> bool {
        self.pausing.load(Ordering::Acquire)
    }

    /// Wake the thread so that it serves every queue (after activation).
    pub(crate) fn kick(&self) {
        let _ = self.wake.write(1);
    }

    fn set(&self, want: Want) {
        let mut c = self.lock();
        c.want = want;
        self.pausing.store(want != Want::Run, Ordering::Release);
        drop(c);
        self.cv.notify_all();
        self.kick();
    }

    /// Stop the thread between requests and wait until it is parked.
    pub(crate) fn pause(&self, name: &str) -> Result<(), DeviceError> {
        self.set(Want::Pause);
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        let mut c = self.lock();
        while !c.parked && !c.gone {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(c);
                self.resume();
                return Err(DeviceError::Quiesce {
                    device: name.to_string(),
                    why: format!("its request in flight did not complete within {QUIESCE_TIMEOUT:?}"),
                });
            }
            c = self.cv.wait_timeout(c, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(())
    }

    /// Let the thread run again.
    pub(crate) fn resume(&self) {
        if self.lock().want == Want::Pause {
            self.set(Want::Run);
        }
    }

    /// Called by the thread between batches: parks while paused. Returns
    /// false when the thread must end, and sets `resumed` after a pause.
    fn checkpoint(&self, resumed: &mut bool) -> bool {
        let mut c = self.lock();
        loop {
            match c.want {
                Want::Run => return true,
                Want::Stop => return false,
                Want::Pause => {
                    c.parked = true;
                    self.cv.notify_all();
                    while c.want == Want::Pause {
                        c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                    c.parked = false;
                    *resumed = true;
                }
            }
        }
    }

    fn gone(&self) {
        self.lock().gone = true;
        self.cv.notify_all();
    }
}

/// The wake-up eventfd's token in the epoll set (queues use their index).
const WAKE: u64 = u64::MAX;

/// Start the thread serving `t`'s queues.
pub(crate) fn spawn(t: Arc<MmioTransport>) -> Result<JoinHandle<()>, DeviceError> {
    let name = format!("virtio{}", t.slot());
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if let Err(e) = serve_loop(&t) {
                tracing::error!(device = %t.device.name(), "virtio worker ended: {e}");
            }
            t.pauser.gone();
        })
        .map_err(|source| DeviceError::Quiesce {
            device: "virtio worker".into(),
            why: format!("cannot start its thread: {source}"),
        })
}

/// Stop the thread of `t` and wait for it.
pub(crate) fn stop(t: &MmioTransport, thread: JoinHandle<()>) {
    t.pauser.set(Want::Stop);
    if thread.join().is_err() {
        tracing::error!(device = %t.device.name(), "virtio worker panicked");
    }
}

fn serve_loop(t: &MmioTransport) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        t.pauser.wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, WAKE),
    )?;
    for (i, e) in t.queue_evts.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            e.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    let all = || (0..t.queue_evts.len()).collect::<Vec<_>>();
    // Serve every queue once at the start: after a restore, requests made
    // available before the snapshot wait in the rings.
    let mut pending = all();
    let mut events = vec![EpollEvent::default(); t.queue_evts.len() + 1];
    loop {
        let mut resumed = false;
        if !t.pauser.checkpoint(&mut resumed) {
            return Ok(());
        }
        if resumed {
            pending = all();
        }
        for i in pending.drain(..) {
            if t.pauser.pausing() {
                break;
            }
            t.serve(i);
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                WAKE => {
                    let _ = t.pauser.wake.read();
                    // A kick (activation) serves everything.
                    pending = all();
                }
                i => {
                    let _ = t.queue_evts[i as usize].read();
                    if !pending.contains(&(i as usize)) {
                        pending.push(i as usize);
                    }
                }
            }
        }
    }
}
