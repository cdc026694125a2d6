//! How a snapshot's pause stops a virtio device's worker thread: a flag
//! the device checks between two requests, a wake-up for the thread, and a
//! wait until the thread is parked outside any request (see `worker`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::DeviceError;

/// How long a pause waits for the device to finish the request it serves.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
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
    pub(crate) wake: EventFd,
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

    pub(crate) fn set(&self, want: Want) {
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
    pub(crate) fn checkpoint(&self, resumed: &mut bool) -> bool {
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

    pub(crate) fn gone(&self) {
        self.lock().gone = true;
        self.cv.notify_all();
    }
}
