//! A kv client over UDP (the wire format of `workload::kv`): requests go
//! out up to a window at a time, each resent until its reply (matched by
//! sequence number) comes back: after 100 ms, then twice as long each time
//! up to 2 s (as TCP backs off), so that replies held for a long epoch are
//! not asked for over and over.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use thiserror::Error;
use workload::kv::{Op, Reply, Request};

use super::ns::{self, GUEST_IP, HOST_IP, NetnsError};

/// Why the peer stopped.
#[derive(Debug, Error)]
pub enum PeerError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("UDP socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the guest stopped answering: {open} requests unanswered at the deadline")]
    Deadline { open: usize },
}

/// A request the peer sends: what, under which key, which value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub op: Op,
    pub key: u64,
    pub value: u64,
}

/// A request and its answer, with the time from its first send.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub ask: Ask,
    pub reply: Reply,
    pub rtt: Duration,
}

/// The peer's socket, in the namespace it was made in.
#[derive(Debug)]
pub struct Peer {
    sock: UdpSocket,
    guest: SocketAddr,
    seq: u64,
}

/// First and longest resend timeouts.
const RESEND: Duration = Duration::from_millis(100);
const RESEND_MAX: Duration = Duration::from_secs(2);

struct Open {
    ask: Ask,
    first: Instant,
    last: Instant,
    wait: Duration,
}

impl Peer {
    /// A peer in namespace `netns` (the calling thread moves there).
    pub fn new(netns: &str) -> Result<Peer, PeerError> {
        ns::enter(netns)?;
        let sock = UdpSocket::bind((HOST_IP, 0)).map_err(PeerError::Socket)?;
        // Room for a burst of the guest's datagrams (kv's send): 16 MiB,
        // past the system's limit where root may (a failure leaves the
        // default, and the count of what arrived says so).
        let size: libc::c_int = 16 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt on our socket with an int of the size given.
            let r = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
        sock.set_read_timeout(Some(Duration::from_millis(5)))
            .map_err(PeerError::Socket)?;
        Ok(Peer {
            sock,
            guest: SocketAddr::new(GUEST_IP.parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()), 7000),
            seq: 0,
        })
    }

    fn send(&self, seq: u64, a: &Ask) {
        let r = Request {
            seq,
            op: a.op,
            key: a.key,
            value: a.value,
        };
        // A lost send is resent like a lost frame.
        let _ = self.sock.send_to(&r.to_bytes(), self.guest);
    }

    /// Send what `next` gives, at most `window` unanswered at a time,
    /// until it gives nothing and all are answered; `answered` sees each
    /// answer. Fails at `deadline` with requests still open.
    pub fn run(
        &mut self,
        window: usize,
        mut next: impl FnMut() -> Option<Ask>,
        mut answered: impl FnMut(Answer),
        deadline: Instant,
    ) -> Result<(), PeerError> {
        // In sequence order, so that resends go out in the order of the first sends.
        let mut open: BTreeMap<u64, Open> = BTreeMap::new();
        let mut more = true;
        let mut buf = [0u8; 64];
        loop {
            while more && open.len() < window.max(1) {
                let Some(ask) = next() else {
                    more = false;
                    break;
                };
                self.seq += 1;
                self.send(self.seq, &ask);
                let now = Instant::now();
                open.insert(
                    self.seq,
                    Open {
                        ask,
                        first: now,
                        last: now,
                        wait: RESEND,
                    },
                );
            }
            if !more && open.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PeerError::Deadline { open: open.len() });
            }
            if let Ok((n, _)) = self.sock.recv_from(&mut buf)
                && let Some(reply) = Reply::parse(&buf[..n])
                && let Some(o) = open.remove(&reply.seq)
            {
                answered(Answer {
                    ask: o.ask,
                    reply,
                    rtt: o.first.elapsed(),
                });
            }
            for (seq, o) in &mut open {
                if o.last.elapsed() > o.wait {
                    self.send(*seq, &o.ask);
                    o.last = Instant::now();
                    o.wait = (o.wait * 2).min(RESEND_MAX);
                }
            }
        }
    }

    /// One request, answered (or the deadline error).
    pub fn call(&mut self, ask: Ask, deadline: Instant) -> Result<Answer, PeerError> {
        let mut once = Some(ask);
        let mut got = None;
        self.run(1, || once.take(), |a| got = Some(a), deadline)?;
        got.ok_or(PeerError::Deadline { open: 1 })
    }
}

impl Peer {
    /// Ask the guest for `count` datagrams of `payload` bytes (kv's send)
    /// and take them; returns the payload bytes received and the seconds
    /// from the request to the last one (datagrams the host drops are
    /// missing from the bytes, not waited for: 300 ms of silence ends it).
    pub fn take_stream(&mut self, count: u64, payload: usize) -> Result<(u64, f64), PeerError> {
        self.seq += 1;
        let seq = self.seq;
        let ask = Ask {
            op: Op::Send,
            key: count,
            value: payload as u64,
        };
        let start = Instant::now();
        self.send(seq, &ask);
        let mut buf = vec![0u8; 2048];
        let (mut bytes, mut got, mut last) = (0u64, 0u64, None);
        let mut quiet = Instant::now();
        while got < count && quiet.elapsed() < Duration::from_millis(300) {
            let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            if Reply::parse(&buf[..24.min(n)]).is_some_and(|r| r.seq == seq) {
                bytes += n as u64;
                got += 1;
                last = Some(start.elapsed());
                quiet = Instant::now();
            }
        }
        match last {
            Some(t) => Ok((bytes, t.as_secs_f64())),
            None => Err(PeerError::Deadline { open: 1 }),
        }
    }

    /// Send `count` datagrams of `payload` bytes into the guest (kv's
    /// sink) as fast as the host takes them; returns the payload bytes the
    /// guest counted meanwhile and the seconds until it said so.
    pub fn fill_sink(&mut self, count: u64, payload: usize, deadline: Instant) -> Result<(u64, f64), PeerError> {
        let report = Ask {
            op: Op::Sink,
            key: 0,
            value: 1,
        };
        let before = self.call(report, deadline)?.reply.value;
        let start = Instant::now();
        let mut dgram = vec![0u8; payload.max(workload::kv::REQUEST_LEN)];
        for _ in 0..count {
            self.seq += 1;
            let r = Request {
                seq: self.seq,
                op: Op::Sink,
                key: 0,
                value: 0,
            };
            dgram[..workload::kv::REQUEST_LEN].copy_from_slice(&r.to_bytes());
            // A full socket buffer: let it drain a moment.
            while self.sock.send_to(&dgram, self.guest).is_err() {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        let after = self.call(report, deadline)?.reply.value;
        Ok((after.saturating_sub(before), start.elapsed().as_secs_f64()))
    }
}
