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
//!
//! After the device used buffers the thread polls its queues for a short
//! while (the device's `poll_window`: the network's, not the disk's) with
//! the driver's notifications off, yielding the CPU to anything runnable: a driver that
//! honours VRING_USED_F_NO_NOTIFY then adds requests (and frames) without
//! a VM exit each, and the next one is served without a thread wake-up
//! (QEMU's virtio-net batches TX in a bottom half to the same end). Then
//! it serves every queue once with notifications on again and sleeps.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::mmio::MmioTransport;
use super::pause::Want;
use crate::devices::DeviceError;

/// The wake-up eventfd's token in the epoll set (queues use their index).
const WAKE: u64 = u64::MAX;
/// Tokens of the device's backend events: this plus their position.
const BACKEND: u64 = 1 << 32;

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
    let backend = t.device.backend_events();
    for (k, (fd, _)) in backend.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            *fd,
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, BACKEND + k as u64),
        )?;
    }
    let all = || (0..t.queue_evts.len()).collect::<Vec<_>>();
    // Serve every queue once at the start: after a restore, requests made
    // available before the snapshot wait in the rings.
    let mut pending = all();
    let mut events = vec![EpollEvent::default(); t.queue_evts.len() + backend.len() + 1];
    let window = t.device.poll_window();
    let mut busy_until: Option<std::time::Instant> = None;
    loop {
        let mut resumed = false;
        if !t.pauser.checkpoint(&mut resumed) {
            return Ok(());
        }
        if resumed {
            pending = all();
            busy_until = None;
        }
        let quiet = busy_until.is_some_and(|u| std::time::Instant::now() < u);
        let mut worked = false;
        for i in pending.drain(..) {
            if t.pauser.pausing() {
                break;
            }
            worked |= t.serve(i, quiet);
        }
        if worked && !window.is_zero() {
            busy_until = Some(std::time::Instant::now() + window);
        }
        let timeout = match busy_until {
            Some(u) if std::time::Instant::now() < u => 0,
            Some(_) => {
                // The window is over: every queue once more with the
                // driver's notifications on, then sleep.
                busy_until = None;
                pending = all();
                continue;
            }
            None => -1,
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 && timeout == 0 {
            // Polling: the queues whose rings got new chains.
            std::thread::yield_now();
            pending = (0..t.queue_evts.len()).filter(|&i| t.has_new(i)).collect();
            continue;
        }
        for ev in &events[..n] {
            match ev.data() {
                WAKE => {
                    let _ = t.pauser.wake.read();
                    // A kick (activation) serves everything.
                    pending = all();
                }
                token => {
                    let q = if token >= BACKEND {
                        // The device drains its own backend.
                        match backend.get((token - BACKEND) as usize) {
                            Some(&(_, q)) => q,
                            None => continue,
                        }
                    } else {
                        let i = token as usize;
                        let _ = t.queue_evts[i].read();
                        i
                    };
                    if !pending.contains(&q) {
                        pending.push(q);
                    }
                }
            }
        }
    }
}
