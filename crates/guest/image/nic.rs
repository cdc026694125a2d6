//! virtio-net over virtio-mmio (virtio 1.x), driven from ring 3 by polling,
//! and the `kv` workload served on it.
//!
//! Queue 0 (RX) keeps [`RX_BUFS`] 2 KiB buffers posted, each a whole frame
//! with its 12-byte `virtio_net_hdr` (no offloads, no merged buffers are
//! negotiated); a buffer is posted again once its frame is handled. Queue 1
//! (TX) sends from 32 rotating buffers, up to all of them in flight (a
//! reply does not wait for the device; a stop does). Notifications the
//! device says it does not need are skipped. A ticket lock serializes the vCPUs: whichever
//! holds it takes the next received frame, lets the key-value server
//! ([`workload::kv::KvServer`]) answer it, and sends the reply. Waiting for
//! frames spins, then sleeps in the VMM in short steps ([`Backoff`]).

use core::sync::atomic::{AtomicBool, Ordering::*, fence};

use workload::abi::exit;
use workload::kv::{Action, KvServer};
use workload::{Disk, Spec};

use crate::virtio::{self, CONFIG, D_WRITE, QUEUE_NOTIFY, Rings, read32, write32};
use crate::{Backoff, STATUS, Ticket, WAIT_TICKS, fail, ticks};

const DEVICE_NET: u32 = 1;
const F_NET_MAC: u64 = 1 << 5;
const F_NET_STATUS: u64 = 1 << 16;
/// `virtio_net_hdr` with VERSION_1.
const HDR: usize = 12;
/// One buffer: the largest Ethernet frame (1514 bytes) and its header fit.
const BUF: usize = 2048;
/// RX buffers kept posted.
const RX_BUFS: usize = 64;
/// TX buffers: a reply goes out from the first and is waited for; a
/// stream (kv's send) keeps up to all of them in flight.
const TX_BUFS: usize = 32;
const RXQ: u32 = 0;
const TXQ: u32 = 1;

/// Frame buffers, shared with the device (guest-physical = virtual).
#[repr(C, align(4096))]
struct Buffers {
    rx: [[u8; BUF]; RX_BUFS],
    tx: [[u8; BUF]; TX_BUFS],
}

static RX: Rings = Rings::new();
static TX: Rings = Rings::new();

/// The driver's side of the device.
struct Nic {
    base: u64,
    rx_size: u16,
    tx_size: u16,
    rx_avail: u16,
    rx_used: u16,
    tx_avail: u16,
    /// The TX buffer the next frame goes out from (they rotate).
    tx_next: usize,
    mac: [u8; 6],
}

/// The device and the server it feeds.
struct Net {
    nic: Nic,
    server: Option<KvServer<'static>>,
}

/// Only taken while holding [`NET`] (zero-initialized, so it costs the
/// image nothing).
static BUFS: Ticket<Buffers> = Ticket::new(Buffers {
    rx: [[0; BUF]; RX_BUFS],
    tx: [[0; BUF]; TX_BUFS],
});

static NET: Ticket<Net> = Ticket::new(Net {
    nic: Nic {
        base: 0,
        rx_size: 0,
        tx_size: 0,
        rx_avail: 0,
        rx_used: 0,
        tx_avail: 0,
        tx_next: 0,
        mac: [0; 6],
    },
    server: None,
});

/// Set once the server was told to stop: every CPU leaves its loop.
static STOPPED: AtomicBool = AtomicBool::new(false);

impl Nic {
    /// Tell the device about new buffers on queue `q`, unless it said it
    /// needs no notification (VRING_USED_F_NO_NOTIFY: it is serving the
    /// queue and will look again before it stops), which saves an exit a
    /// frame while it is busy.
    fn notify(&self, q: u32) {
        // The ring entries and index before the flag is read.
        fence(SeqCst);
        let rings = if q == RXQ { &RX } else { &TX };
        if rings.used.flags.load(Acquire) & 1 == 0 {
            write32(self.base + QUEUE_NOTIFY, q);
        }
    }

    /// Hand RX buffer `id` (back) to the device.
    fn post(&mut self, id: u16) {
        RX.avail_ring[usize::from(self.rx_avail % self.rx_size)].store(id, Relaxed);
        self.rx_avail = self.rx_avail.wrapping_add(1);
        RX.avail_idx.store(self.rx_avail, Release);
    }

    /// The next received frame's buffer and length (header included).
    fn received(&mut self) -> Option<(usize, usize)> {
        if RX.used.idx.load(Acquire) == self.rx_used {
            return None;
        }
        // The used element and the data only after the index.
        fence(Acquire);
        let e = &RX.used.ring[usize::from(self.rx_used % self.rx_size)];
        let (id, len) = (e.id.load(Relaxed) as usize, e.len.load(Relaxed) as usize);
        self.rx_used = self.rx_used.wrapping_add(1);
        Some((id, len))
    }

    /// Put `len` bytes of TX buffer `tx` (header included) on the TX ring
    /// and notify the device.
    fn post_tx(&mut self, tx: &[u8; BUF], len: usize) {
        let slot = usize::from(self.tx_avail % self.tx_size);
        let d = &TX.desc[slot];
        d.addr.store(tx.as_ptr() as u64, Relaxed);
        d.len.store(len as u32, Relaxed);
        d.flags.store(0, Relaxed);
        d.next.store(0, Relaxed);
        virtio::dma_barrier(tx.as_ptr());
        TX.avail_ring[slot].store(slot as u16, Relaxed);
        self.tx_avail = self.tx_avail.wrapping_add(1);
        TX.avail_idx.store(self.tx_avail, Release);
        self.notify(TXQ);
    }

    /// The TX buffer for the next frame, once the device took the frame
    /// that last went out from it (at most [`TX_BUFS`] in flight).
    fn tx_slot(&mut self, cpu: usize) -> usize {
        let depth = TX_BUFS.min(usize::from(self.tx_size)).max(1);
        self.wait_tx(cpu, depth as u16 - 1);
        let k = self.tx_next % depth;
        self.tx_next = self.tx_next.wrapping_add(1);
        k
    }

    /// Wait until at most `left` posted frames are not yet taken by the
    /// device (it may hold them back while its output waits for an epoch:
    /// backpressure).
    fn wait_tx(&self, cpu: usize, left: u16) {
        let start = ticks(cpu);
        let mut backoff = Backoff::new();
        while self.tx_avail.wrapping_sub(TX.used.idx.load(Acquire)) > left {
            backoff.wait();
            if ticks(cpu).saturating_sub(start) > WAIT_TICKS {
                fail(exit::RESOURCES, format_args!("virtio-net: a frame was not sent in time"));
            }
        }
    }
}

/// Find the network device and bring it up with its RX buffers posted;
/// the kv server answers on it, its table in `table`, its log on `disk`.
pub fn init(cmdline: &str, spec: &Spec, table: &'static mut [u64], disk: Option<&'static mut dyn Disk>) {
    let found = match virtio::find(cmdline, DEVICE_NET) {
        Ok(d) => d,
        Err(seen) => fail(
            exit::RESOURCES,
            format_args!(
                "the kv workload needs a virtio-net device (virtio-mmio version 2) named by a \
                 virtio_mmio.device= word below 4 GiB; {}",
                seen.why()
            ),
        ),
    };
    let base = found.base;
    let (_, accepted) = virtio::negotiate("virtio-net", base, F_NET_MAC | F_NET_STATUS);
    if accepted & F_NET_MAC == 0 {
        virtio::device_failed("virtio-net", base, format_args!("the device offers no MAC address"));
    }
    let rx_size = virtio::setup_queue("virtio-net", base, RXQ, &RX, false);
    let tx_size = virtio::setup_queue("virtio-net", base, TXQ, &TX, false);
    let (low, high) = (read32(base + CONFIG), read32(base + CONFIG + 4));
    let mac: [u8; 6] = core::array::from_fn(|i| if i < 4 { (low >> (8 * i)) as u8 } else { (high >> (8 * (i - 4))) as u8 });
    let server = match KvServer::from_spec(spec, mac, table, disk) {
        Ok(s) => s,
        Err(e) => fail(exit::BAD_CMDLINE, format_args!("kv: {e:?}")),
    };
    NET.with(|n| {
        n.nic = Nic {
            base,
            rx_size,
            tx_size,
            rx_avail: 0,
            rx_used: 0,
            tx_avail: 0,
            tx_next: 0,
            mac,
        };
        let posted = RX_BUFS.min(usize::from(rx_size));
        let rx_at = BUFS.with(|b| b.rx.as_ptr() as u64);
        for i in 0..posted {
            let d = &RX.desc[i];
            d.addr.store(rx_at + (i * BUF) as u64, Relaxed);
            d.len.store(BUF as u32, Relaxed);
            d.flags.store(D_WRITE, Relaxed);
            d.next.store(0, Relaxed);
            n.nic.post(i as u16);
        }
        virtio::driver_ok(base);
        n.nic.notify(RXQ);
        n.server = Some(server);
        let [a, b, c, d] = spec.ip;
        say!(
            "virtio-net at {base:#x} irq {}: mac {}, queues {rx_size}/{tx_size}, polling; kv on {a}.{b}.{c}.{d}:{}",
            found.irq,
            Mac(&n.nic.mac),
            spec.port
        );
    });
}

struct Mac<'a>(&'a [u8; 6]);

impl core::fmt::Display for Mac<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Take one received frame, if any, and answer it. `None`: nothing came.
fn serve_one(cpu: usize) -> Option<Action> {
    NET.with(|n| {
        let (id, len) = n.nic.received()?;
        let server = n.server.as_mut()?;
        let action = BUFS.with(|b| {
            let mut action = Action::Ignore;
            let (rx, tx) = (&b.rx, &mut b.tx);
            // A reply goes out from the next TX buffer, without waiting
            // for the device to take it (up to TX_BUFS in flight).
            let k = n.nic.tx_slot(cpu);
            if id < RX_BUFS && (HDR..=BUF).contains(&len) {
                let frame = &rx[id];
                virtio::dma_barrier(frame.as_ptr());
                tx[k][..HDR].fill(0);
                action = server.handle(&frame[HDR..len], &mut tx[k][HDR..]);
            }
            // The reply first: the device's thread takes it at once,
            // and only then the buffer back (one wake-up less before the
            // reply leaves).
            match action {
                Action::Reply(out) => n.nic.post_tx(&tx[k], HDR + out),
                Action::Stop(out) => {
                    n.nic.post_tx(&tx[k], HDR + out);
                    n.nic.wait_tx(cpu, 0);
                }
                Action::Stream(count) => stream(cpu, &mut n.nic, server, tx, count),
                Action::Ignore => {}
            }
            n.nic.post(id as u16);
            n.nic.notify(RXQ);
            action
        });
        STATUS.ops_done[0].store(server.applied(), Relaxed);
        Some(action)
    })
}

/// Answer a send request: `count` datagrams, up to [`TX_BUFS`] (and the
/// ring) in flight.
fn stream(cpu: usize, nic: &mut Nic, server: &mut KvServer<'static>, tx: &mut [[u8; BUF]; TX_BUFS], count: u64) {
    for i in 0..count {
        let buf = &mut tx[nic.tx_slot(cpu)];
        buf[..HDR].fill(0);
        let Some(len) = server.stream_frame(i, &mut buf[HDR..]) else {
            break;
        };
        nic.post_tx(buf, HDR + len);
    }
}

/// Serve requests on CPU `cpu` until one says stop.
pub fn serve(cpu: usize) {
    let mut backoff = Backoff::new();
    while !STOPPED.load(Acquire) {
        match serve_one(cpu) {
            Some(Action::Stop(_)) => STOPPED.store(true, Release),
            Some(_) => backoff = Backoff::new(),
            None => backoff.wait(),
        }
    }
}

/// The server's puts applied and state checksum (after its log is flushed).
pub fn outcome() -> (u64, u64) {
    NET.with(|n| match n.server.as_mut() {
        Some(s) => {
            if let Err(e) = s.flush() {
                say!("kv: flushing the log failed: {e}");
            }
            let c = s.counters();
            say!(
                "kv: {} frames, {} requests ({} repeated), {} ARP, {} malformed, {} refused",
                c.frames,
                c.requests,
                c.repeats,
                c.arp,
                c.malformed,
                c.refused
            );
            (s.applied(), s.checksum())
        }
        None => (0, 0),
    })
}
