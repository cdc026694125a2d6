//! virtio-net against virtio-queue's mock driver, on a real TAP device the
//! test creates (root only: ignored where the build found no TAP, the
//! `no_tap` cfg, unless `CONSNAP_REQUIRE_TAP=1`): frames both ways,
//! output commit holding TX frames until their epoch is released, the cap
//! pushing back on the guest's queue, and chains the guest gets wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::output::OutputGate;
use vmm::devices::virtio::VirtioDevice;
use vmm::devices::virtio::net::{HDR, Net};
use vmm::devices::virtio::tap::Tap;
use vmm::memory::GuestRam;

const RXQ: u64 = 0x1000;
const TXQ: u64 = 0x8000;
const DATA: u64 = 0x10_0000;
/// A local experimental EtherType: nothing else on the link sends it.
const ETHERTYPE: u16 = 0x88b5;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

/// A TAP of our own and a packet socket on its host side. Always `Some`:
/// the tests are ignored under the `no_tap` cfg, and one that runs fails
/// where this process may not make a TAP.
fn rig(gate: Arc<OutputGate>) -> Option<(Net, Host, GuestRam)> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("csnt{}-{n}", std::process::id() % 100_000);
    let tap = match Tap::open(&name) {
        Ok(t) => t,
        Err(e) => vmm::testing::missing("a TAP", e),
    };
    assert!(tap.created());
    let host = Host::on(&name);
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let net = Net::new(tap, mac, gate).unwrap();
    Some((net, host, GuestRam::with_huge_pages(16 << 20, false).unwrap()))
}

/// The host's end: an AF_PACKET socket bound to the TAP.
struct Host {
    fd: OwnedFd,
    ifindex: i32,
}

impl Host {
    fn on(name: &str) -> Host {
        let proto = u16::to_be(ETHERTYPE);
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh socket.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        assert!(ifindex > 0);
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex;
        // SAFETY: `sa` is a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        Host { fd, ifindex }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        // SAFETY: `frame` and `sa` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(n, frame.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    }

    /// Frames of our EtherType that arrive within `wait` (to show that
    /// none does).
    fn recv_all(&self, wait: Duration) -> Vec<Vec<u8>> {
        self.recv_until(usize::MAX, wait)
    }

    /// The first `n` frames of our EtherType (failing after 10 s), and any
    /// that follow within 50 ms (so that one too many shows).
    fn recv(&self, n: usize) -> Vec<Vec<u8>> {
        let mut out = self.recv_until(n, Duration::from_secs(10));
        assert_eq!(out.len(), n, "frames expected within 10 s");
        out.extend(self.recv_all(Duration::from_millis(50)));
        out
    }

    fn recv_until(&self, n: usize, wait: Duration) -> Vec<Vec<u8>> {
        let until = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while out.len() < n && Instant::now() < until {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                out.push(buf[..n as usize].to_vec());
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        out
    }
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f
}

/// The guest's TX queue with `frames` made available (each as a header
/// buffer and a frame buffer); returns the mock and a queue over it.
fn tx_queue<'m>(ram: &'m GuestRam, frames: &[Vec<u8>]) -> (MockSplitQueue<'m, vmm::memory::GuestMemory>, Queue) {
    let mem = ram.memory();
    let mq = MockSplitQueue::create(mem, GuestAddress(TXQ), 64);
    let mut raw = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let at = DATA + i as u64 * 0x1_0000;
        mem.write_slice(&[0u8; HDR], GuestAddress(at)).unwrap();
        mem.write_slice(f, GuestAddress(at + 0x100)).unwrap();
        let d = 2 * i as u16;
        raw.push(RawDescriptor::from(Descriptor::new(at, HDR as u32, N, d + 1)));
        raw.push(RawDescriptor::from(Descriptor::new(at + 0x100, f.len() as u32, 0, 0)));
    }
    let chains: Vec<_> = raw.chunks(2).collect();
    for (i, c) in chains.iter().enumerate() {
        mq.add_desc_chains(c, 2 * i as u16).unwrap();
    }
    let q = mq.create_queue().unwrap();
    (mq, q)
}

fn used_idx(ram: &GuestRam, mq: &MockSplitQueue<'_, vmm::memory::GuestMemory>) -> u16 {
    ram.memory().read_obj(GuestAddress(mq.used_addr().0 + 2)).unwrap()
}

fn ours(frames: Vec<Vec<u8>>) -> Vec<u8> {
    frames.iter().map(|f| f[14]).collect()
}

#[test]
#[cfg_attr(no_tap, ignore = "needs TUN/TAP")]
fn tx_frames_wait_for_their_epoch_then_leave_in_order() {
    let gate = OutputGate::committed(1 << 20, false).unwrap();
    let Some((net, host, ram)) = rig(gate.clone()) else {
        return;
    };
    let (mq, mut q) = tx_queue(&ram, &[frame(1, 60), frame(2, 100)]);
    assert!(net.process(1, &mut q, ram.memory(), &|| false).unwrap());
    assert_eq!(used_idx(&ram, &mq), 2, "the guest gets its buffers back at once");
    assert!(
        host.recv_all(Duration::from_millis(100)).is_empty(),
        "nothing leaves before its epoch is durable"
    );
    let sealed = gate.seal();
    assert!(host.recv_all(Duration::from_millis(50)).is_empty());
    gate.release(sealed);
    assert_eq!(ours(host.recv(2)), [1, 2]);
    gate.shut();
    assert_eq!(net.counters().tx_frames.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
#[cfg_attr(no_tap, ignore = "needs TUN/TAP")]
fn without_commit_frames_leave_at_once_and_rx_reaches_the_guest() {
    let Some((net, host, ram)) = rig(OutputGate::passthrough()) else {
        return;
    };
    let (_mq, mut q) = tx_queue(&ram, &[frame(7, 64)]);
    net.process(1, &mut q, ram.memory(), &|| false).unwrap();
    assert_eq!(ours(host.recv(1)), [7]);
    // RX: eight 2 KiB device-writable buffers (the kernel may send frames
    // of its own, IPv6 neighbour discovery, before ours).
    let mem = ram.memory();
    let mq = MockSplitQueue::create(mem, GuestAddress(RXQ), 64);
    for i in 0..8u16 {
        let at = DATA + u64::from(i) * 0x1000;
        mq.add_desc_chains(&[RawDescriptor::from(Descriptor::new(at, 2048, W, 0))], i)
            .unwrap();
    }
    let mut rq: Queue = mq.create_queue().unwrap();
    let ranges: Vec<_> = ram.ranges().to_vec();
    drop(ram.take_vmm_dirty(&ranges[0]));
    let sent = frame(9, 90);
    host.send(&sent);
    let until = Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    let found = loop {
        net.process(0, &mut rq, mem, &|| false).unwrap();
        let used = used_idx(&ram, &mq);
        let hit = (seen..used).find_map(|k| {
            let e = mq.used_addr().0 + 4 + 8 * u64::from(k);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(DATA + u64::from(id) * 0x1000))
                .unwrap();
            (got.get(HDR + 12..HDR + 14) == Some(&ETHERTYPE.to_be_bytes()[..])).then_some((id, got))
        });
        seen = used;
        if let Some(h) = hit {
            break h;
        }
        assert!(Instant::now() < until && used < 8, "the frame never reached the guest");
        std::thread::sleep(Duration::from_millis(5));
    };
    let (id, got) = found;
    assert_eq!(&got[HDR..], &sent[..]);
    assert_eq!(got[HDR - 2], 1, "num_buffers");
    let page = (DATA + u64::from(id) * 0x1000) / 4096;
    let dirty = vmm::dirty::PageBits::from_words(ram.take_vmm_dirty(&ranges[0]), ranges[0].pages());
    assert!(dirty.get(page), "the page the device wrote is dirty");
}

#[test]
#[cfg_attr(no_tap, ignore = "needs TUN/TAP")]
fn the_cap_leaves_frames_in_the_guests_ring() {
    let gate = OutputGate::committed(150, false).unwrap();
    let Some((net, host, ram)) = rig(gate.clone()) else {
        return;
    };
    let (mq, mut q) = tx_queue(&ram, &[frame(1, 100), frame(2, 100)]);
    net.process(1, &mut q, ram.memory(), &|| false).unwrap();
    assert_eq!(used_idx(&ram, &mq), 1, "the second frame waits in the ring");
    assert_eq!(gate.stats().at_cap, 1);
    let g = gate.seal();
    gate.release(g);
    assert_eq!(ours(host.recv(1)), [1]);
    net.process(1, &mut q, ram.memory(), &|| false).unwrap();
    assert_eq!(used_idx(&ram, &mq), 2, "taken once space freed");
    gate.release_all();
    assert_eq!(ours(host.recv(1)), [2]);
    gate.shut();
}

#[test]
#[cfg_attr(no_tap, ignore = "needs TUN/TAP")]
fn malformed_tx_chains_complete_unsent_and_are_counted() {
    let Some((net, host, ram)) = rig(OutputGate::passthrough()) else {
        return;
    };
    let mem = ram.memory();
    let mq = MockSplitQueue::create(mem, GuestAddress(TXQ), 64);
    let chains = [
        // Shorter than a header and an Ethernet header.
        vec![RawDescriptor::from(Descriptor::new(DATA, 20, 0, 0))],
        // Device-writable.
        vec![RawDescriptor::from(Descriptor::new(DATA, 200, W, 0))],
        // Outside RAM.
        vec![RawDescriptor::from(Descriptor::new(1 << 40, 200, 0, 0))],
    ];
    for (i, c) in chains.iter().enumerate() {
        mq.add_desc_chains(c, i as u16).unwrap();
    }
    let mut q: Queue = mq.create_queue().unwrap();
    net.process(1, &mut q, mem, &|| false).unwrap();
    assert_eq!(used_idx(&ram, &mq), 3);
    assert_eq!(net.counters().tx_bad.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert!(host.recv_all(Duration::from_millis(100)).is_empty());
}
