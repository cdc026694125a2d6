//! virtio-net over a [`Tap`]: queue 0 receives (RX), queue 1 transmits
//! (TX); MAC address and link status in the configuration space; no
//! offloads, so every frame is whole and carries the 12-byte
//! `virtio_net_hdr` of virtio 1.x, all zero but `num_buffers` (1).
//!
//! TX frames go to the machine's [`OutputGate`]: with output commit they
//! wait there until the epoch that produced them is durable. When the gate
//! is full the device stops taking TX buffers (the guest sees its ring
//! fill up) until the gate wakes it. RX frames are delivered at once. A TX
//! chain the guest gets wrong (shorter than a header and an Ethernet
//! header, longer than a header and 64 KiB, device-writable, outside RAM)
//! is completed unsent and counted; an RX frame larger than the buffers
//! offered is dropped and counted, as a NIC drops it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Seg, gather, scatter};
use super::tap::Tap;
use super::{Step, VirtioDevice, serve_chains};
use crate::devices::DeviceError;
use crate::devices::output::{OutputGate, Sink};
use crate::memory::GuestMemory;

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio_net_hdr with VERSION_1.
pub const HDR: usize = 12;
/// Largest frame either way (without the header).
pub const MAX_FRAME: usize = 65535;
/// Smallest frame: an Ethernet header.
const MIN_FRAME: usize = 14;
/// How long the device's thread polls after it moved frames.
const POLL_WINDOW: std::time::Duration = std::time::Duration::from_micros(200);
const RX: usize = 0;
const TX: usize = 1;

/// What a network device did, for reports and the API.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Received frames larger than the buffers the guest offered.
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX chains completed unsent because they were malformed.
    pub tx_bad: AtomicU64,
}

/// The network device's saved state besides its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetState {
    pub mac: [u8; 6],
    /// The TAP it was attached to (a restore reattaches to it by default).
    pub tap: String,
}

/// A virtio-net device.
pub struct Net {
    tap: Arc<TapSink>,
    mac: [u8; 6],
    gate: Arc<OutputGate>,
    sink: usize,
    /// Signalled by the gate when space frees after it was full.
    wake: Arc<EventFd>,
    counters: NetCounters,
    queues: [u16; 2],
    /// One frame's worth of buffer, reused.
    buf: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.0.name())
            .finish_non_exhaustive()
    }
}

struct TapSink(Tap);

impl Sink for TapSink {
    fn name(&self) -> String {
        format!("TAP {}", self.0.name())
    }
    fn send(&self, data: &[u8]) -> std::io::Result<()> {
        self.0.write_frame(data)
    }
}

/// A locally administered unicast MAC address, random but for its first byte.
pub fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    // SAFETY: getrandom writes at most `m.len()` bytes into `m`.
    let n = unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), 0) };
    if n != m.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        m.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    m[0] = 0x52;
    m
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && m[0] & 1 == 0).then_some(m)
}

/// `52:54:...` form of `mac`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Net {
    /// A device on `tap` with address `mac`, its output through `gate`.
    pub fn new(tap: Tap, mac: [u8; 6], gate: Arc<OutputGate>) -> Result<Net, DeviceError> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            what: "virtio-net output wake-up",
            source,
        })?);
        let tap = Arc::new(TapSink(tap));
        let sink = gate.add_sink(tap.clone(), Some(wake.clone()));
        Ok(Net {
            tap,
            mac,
            gate,
            sink,
            wake,
            counters: NetCounters::default(),
            queues: [QUEUE_SIZE; 2],
            buf: Mutex::new(vec![0; HDR + MAX_FRAME]),
        })
    }

    /// State to save (the transport saves the queues).
    pub fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            tap: self.tap.0.name().to_string(),
        }
    }

    /// Its MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What it did so far.
    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }

    /// The TAP it is attached to.
    pub fn tap(&self) -> &Tap {
        &self.tap.0
    }

    /// Deliver waiting frames from the TAP into the guest's RX buffers.
    fn receive(
        &self,
        queue: &mut Queue,
        mem: &GuestMemory,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, virtio_queue::Error> {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        serve_chains(queue, mem, stop, |chain| {
            let n = match self.tap.0.read_frame(&mut buf[HDR..]) {
                Ok(n) => n,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!(tap = %self.tap.0.name(), "read: {e}");
                    }
                    return Step::Wait;
                }
            };
            buf[..HDR].fill(0);
            buf[HDR - 2] = 1; // num_buffers
            let writable: Vec<Seg> = chain
                .filter(|d| d.is_write_only())
                .map(|d| Seg {
                    addr: d.addr().0,
                    len: u64::from(d.len()),
                })
                .collect();
            let room: u64 = writable.iter().map(|s| s.len).sum();
            let len = HDR + n;
            if room < len as u64 || scatter(mem, &writable, 0, &buf[..len]).is_err() {
                // The frame is lost; the buffers stay the guest's.
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return Step::Again;
            }
            self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            self.counters.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            Step::Used(len as u32)
        })
    }

    /// Take the guest's TX frames and hand them to the gate.
    fn transmit(
        &self,
        queue: &mut Queue,
        mem: &GuestMemory,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, virtio_queue::Error> {
        let _ = self.wake.read();
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        serve_chains(queue, mem, stop, |chain| {
            let mut readable = Vec::new();
            let mut bad = false;
            for d in chain {
                bad |= d.is_write_only();
                readable.push(Seg {
                    addr: d.addr().0,
                    len: u64::from(d.len()),
                });
            }
            let total: u64 = readable.iter().map(|s| s.len).sum();
            bad |= total < (HDR + MIN_FRAME) as u64 || total > (HDR + MAX_FRAME) as u64;
            let len = total as usize;
            if !bad && gather(mem, &readable, 0, &mut buf[..len]).is_err() {
                bad = true;
            }
            if bad {
                self.counters.tx_bad.fetch_add(1, Ordering::Relaxed);
            } else if self.gate.submit(self.sink, &buf[HDR..len]).is_err() {
                // Full: the chain waits in the ring until the gate has
                // room and wakes this device.
                return Step::Wait;
            } else {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters.tx_bytes.fetch_add((len - HDR) as u64, Ordering::Relaxed);
            }
            Step::Used(0)
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> String {
        format!("virtio-net {}", self.tap.0.name())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queues
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn process(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, virtio_queue::Error> {
        match index {
            RX => self.receive(queue, mem, stop),
            TX => self.transmit(queue, mem, stop),
            _ => Ok(false),
        }
    }

    /// Frames come in bursts (a request, its reply, the next request):
    /// polling a little saves the guest an exit and the device a wake-up
    /// for each.
    fn poll_window(&self) -> std::time::Duration {
        POLL_WINDOW
    }

    fn backend_events(&self) -> Vec<(RawFd, usize)> {
        vec![(self.tap.0.as_raw_fd(), RX), (self.wake.as_raw_fd(), TX)]
    }
}
