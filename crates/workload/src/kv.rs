//! kv: a UDP key-value server, the protocol core of the `kv` workload.
//!
//! The guest's network driver hands every received Ethernet frame to
//! [`KvServer::handle`] and sends what it writes back; the server answers
//! ARP requests for its address and key-value requests on its UDP port.
//!
//! # Wire format
//!
//! All integers little-endian. A request is a UDP payload of exactly
//! [`REQUEST_LEN`] = 25 bytes: `seq` u64, `op` u8 ([`Op`]: 1 put, 2 get,
//! 3 stop), `key` u64, `value` u64 (ignored by get and stop). The reply
//! goes to the request's source MAC, IP and port, from the server's port:
//! [`REPLY_LEN`] = 24 bytes, `seq` u64 (the request's), `value` u64,
//! `applied` u64 (puts applied so far, after this request). `value` is:
//!
//! - put: the value now stored under the key, or [`REFUSED`] (`u64::MAX`)
//!   if the put was not applied because the table or the disk log is full,
//!   or the log write failed. A put of `u64::MAX` itself that succeeds
//!   also answers `u64::MAX`: a client that stores that value tells the two
//!   apart by [`KvServer::get`]-ing the key, or by `applied`.
//! - get: the stored value, 0 if the key has none.
//! - stop: the state checksum ([`KvServer::checksum`]), after the disk log
//!   is flushed. [`Action::Stop`] tells the driver to send the reply, print
//!   the checksum and power off.
//!
//! Any key is allowed, 0 included.
//!
//! # Repeats and idempotence
//!
//! The server remembers the last request it executed and the reply it
//! sent. The same request again (same client IP and port, and the same
//! `seq`, `op`, `key` and `value`) is not executed but answered with that
//! very reply, as a client that lost the reply retransmits it. An older
//! request arriving again is executed again, and a put is idempotent: a put
//! of the value the key already has changes nothing. `applied` counts the
//! puts that changed the table: that stored a key not there before, or a
//! value different from the key's current one. A put of the same value, a
//! refused put, gets and stops do not count.
//!
//! # Table
//!
//! The table lives in caller memory, a `&mut [u64]` that must be zero at
//! start: an open-addressing hash table with linear probing of
//! [`SLOT_WORDS`] = 3-word slots `[tag, key, value]`, tag 0 for an empty
//! slot and 1 for a used one (so key 0 needs no special case). Keys are
//! never removed. At most [`KvServer::capacity`] = 7/8 of the slots are
//! used, which keeps probe sequences short; a put of a new key beyond that
//! is refused.
//!
//! # Disk log
//!
//! With a disk ([`KvServer::with_log`], or `disk=on` in [`KvServer::from_spec`])
//! every applied put appends a [`RECORD_BYTES`] = 16-byte record
//! `[key u64, value u64]` to a log that starts at sector 0: record `i` at
//! byte `16 * i`, so 32 records per sector, unused bytes zero. The server
//! keeps the log's last sector in memory and writes that whole sector for
//! every record (no read-modify-write); it FLUSHes only on stop
//! ([`KvServer::flush`]). The log holds min(`dsize`, disk) / 16 records; a
//! put needing a record beyond that, or whose write fails, is refused and
//! not applied, so the log holds exactly the applied puts, in order.

use core::fmt;

use crate::disk::{Disk, DiskError, SECTOR, SECTOR_WORDS};
use crate::hash::{Hasher, hash_words, mix64};
use crate::net::{self, Endpoint, Eth, IpError, Ipv4, Mac};
use crate::spec::{Kind, Spec};

mod wire;
pub use wire::{MAX_PAYLOAD, MAX_STREAM, Op, REFUSED, REPLY_LEN, REQUEST_LEN, Reply, Request};

/// Bytes of a whole reply frame; [`KvServer::handle`] needs an output
/// buffer at least this long (an ARP reply is shorter).
pub const REPLY_FRAME_LEN: usize = net::UDP_HEADERS_LEN + REPLY_LEN;

/// Words per table slot: tag, key, value.
pub const SLOT_WORDS: usize = 3;

/// Bytes per disk log record: key, value.
pub const RECORD_BYTES: u64 = 16;

/// Tag of an empty slot (a used slot has any other tag; the server writes 1).
const EMPTY: u64 = 0;
const USED: u64 = 1;

/// Salts of the slot hash and the checksum.
const HOME_SALT: u64 = 0x6b76_5f68_6f6d_6521;
const PAIR_SEED: u64 = 0x6b76_5f70_6169_7221;
const SUM_SEED: u64 = 0x6b76_5f73_756d_2121;

/// Log records per sector.
const RECORDS_PER_SECTOR: u64 = SECTOR / RECORD_BYTES;

/// What the driver does after [`KvServer::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to send (see [`KvServer::counters`] for why).
    Ignore,
    /// Send the first this many bytes of the output buffer: an ARP reply or
    /// a kv reply.
    Reply(usize),
    /// Send the first this many bytes of the output buffer (the reply to a
    /// stop), then report the checksum and power off.
    Stop(usize),
    /// Send this many datagrams, each written by [`KvServer::stream_frame`].
    Stream(u64),
}

/// What the server has seen, frame by frame: every frame counts once in
/// `frames` and in at most one of the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Frames handled.
    pub frames: u64,
    /// ARP requests for our address, answered.
    pub arp: u64,
    /// kv requests executed.
    pub requests: u64,
    /// Repeats of the last request, answered with its reply again.
    pub repeats: u64,
    /// Well-formed frames not for us: another ethertype, MAC, IP address,
    /// IP protocol or UDP port, or ARP other than a request for our address.
    pub other: u64,
    /// Malformed frames, dropped: truncated, bad lengths or checksums, IP
    /// fragments, a payload that is not a request, or a source one cannot
    /// answer (group MAC, non-unicast IP, port 0).
    pub malformed: u64,
    /// Requests not executed because the output buffer was too short.
    pub no_room: u64,
    /// Puts refused (counted in `requests` too): table or log full, or the
    /// log write failed.
    pub refused: u64,
    /// Failed disk writes and flushes.
    pub disk_errors: u64,
    /// UDP payload bytes of sink requests.
    pub sink_bytes: u64,
    /// Datagrams sent for send requests.
    pub streamed: u64,
}

/// Why [`KvServer::from_spec`] cannot serve a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupError {
    /// The spec is for this other workload.
    NotKv(Kind),
    /// The spec says `disk=on` but no disk was given.
    NoDisk,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::NotKv(k) => write!(f, "workload {} is not kv", k.name()),
            SetupError::NoDisk => write!(f, "kv with disk=on needs a disk"),
        }
    }
}

/// Why a log append failed.
enum LogError {
    Full,
    Disk,
}

/// The disk log: where the next record goes and its sector in memory.
struct Log<'a> {
    disk: &'a mut dyn Disk,
    /// Records the log can hold.
    capacity: u64,
    /// Records written.
    records: u64,
    /// The sector of record `records` (the one being filled).
    sector: [u64; SECTOR_WORDS],
}

impl Log<'_> {
    fn append(&mut self, key: u64, value: u64) -> Result<(), LogError> {
        if self.records >= self.capacity {
            return Err(LogError::Full);
        }
        let i = (self.records % RECORDS_PER_SECTOR) as usize;
        if i == 0 {
            self.sector.fill(0);
        }
        self.sector[2 * i] = key;
        self.sector[2 * i + 1] = value;
        if self
            .disk
            .write(self.records / RECORDS_PER_SECTOR, &self.sector)
            .is_err()
        {
            self.sector[2 * i..2 * i + 2].fill(0);
            return Err(LogError::Disk);
        }
        self.records += 1;
        Ok(())
    }
}

/// The last request executed and its reply.
#[derive(Debug, Clone, Copy)]
struct Answered {
    client: Endpoint,
    request: Request,
    reply: Reply,
}

/// A kv server at one MAC, IPv4 address and UDP port, over a table in
/// caller memory and optionally a disk log (see the module documentation).
pub struct KvServer<'a> {
    mac: Mac,
    me: Endpoint,
    table: &'a mut [u64],
    /// Slots in use.
    used: u64,
    applied: u64,
    log: Option<Log<'a>>,
    last: Option<Answered>,
    counters: Counters,
    /// The send request being answered: to whom, its sequence number, and
    /// the payload bytes of each datagram.
    stream: Option<Stream>,
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    to: (Mac, Endpoint),
    seq: u64,
    payload: usize,
}

impl fmt::Debug for KvServer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvServer")
            .field("mac", &self.mac)
            .field("me", &self.me)
            .field("slots", &self.slots())
            .field("used", &self.used)
            .field("applied", &self.applied)
            .field("logged", &self.logged())
            .field("counters", &self.counters)
            .finish()
    }
}

impl<'a> KvServer<'a> {
    /// A server at `mac`, `ip`, `port` whose table is `table` (which must
    /// be zero; `table.len() / 3` slots), without a disk log.
    pub fn new(mac: Mac, ip: Ipv4, port: u16, table: &'a mut [u64]) -> KvServer<'a> {
        KvServer {
            mac,
            me: Endpoint { ip, port },
            table,
            used: 0,
            applied: 0,
            log: None,
            last: None,
            counters: Counters::default(),
            stream: None,
        }
    }

    /// Log every applied put to `disk`, in its first `bytes` (the log
    /// starts at sector 0, whose area must be zero). Call before any put.
    pub fn with_log(self, disk: &'a mut dyn Disk, bytes: u64) -> KvServer<'a> {
        let capacity = bytes.min(disk.sectors().saturating_mul(SECTOR)) / RECORD_BYTES;
        KvServer {
            log: Some(Log {
                disk,
                capacity,
                records: 0,
                sector: [0; SECTOR_WORDS],
            }),
            ..self
        }
    }

    /// The server a kv spec describes, at `mac`: `ip=`, `port=` and, with
    /// `disk=on`, a log of `dsize` bytes on `disk` (otherwise `disk` is
    /// not touched).
    pub fn from_spec(
        spec: &Spec,
        mac: Mac,
        table: &'a mut [u64],
        disk: Option<&'a mut dyn Disk>,
    ) -> Result<KvServer<'a>, SetupError> {
        if spec.kind != Kind::Kv {
            return Err(SetupError::NotKv(spec.kind));
        }
        let server = KvServer::new(mac, spec.ip, spec.port, table);
        match disk {
            _ if !spec.uses_disk() => Ok(server),
            Some(d) => Ok(server.with_log(d, spec.dsize)),
            None => Err(SetupError::NoDisk),
        }
    }

    /// Handle one received Ethernet frame (without FCS); a reply, if any,
    /// is written to the start of `out`, which needs [`REPLY_FRAME_LEN`]
    /// bytes. Anything not for us, and anything malformed, is ignored and
    /// counted. A request that finds `out` too short is not executed.
    pub fn handle(&mut self, frame: &[u8], out: &mut [u8]) -> Action {
        self.counters.frames += 1;
        let Some((eth, payload)) = net::parse_eth(frame) else {
            return self.malformed();
        };
        match eth.ethertype {
            net::ETHERTYPE_ARP => self.handle_arp(&eth, payload, out),
            net::ETHERTYPE_IPV4 => self.handle_ipv4(&eth, payload, out),
            _ => self.other(),
        }
    }

    fn handle_arp(&mut self, eth: &Eth, payload: &[u8], out: &mut [u8]) -> Action {
        if eth.dst != self.mac && eth.dst != net::BROADCAST {
            return self.other();
        }
        let Some(req) = net::parse_arp(payload) else {
            return self.malformed();
        };
        if !req.is_request_for(&self.me.ip) {
            return self.other();
        }
        if net::is_group_mac(&req.sha) {
            return self.malformed();
        }
        match net::write_arp_frame(out, req.sha, &req.reply(self.mac, self.me.ip)) {
            Some(n) => {
                self.counters.arp += 1;
                Action::Reply(n)
            }
            None => self.no_room(),
        }
    }

    fn handle_ipv4(&mut self, eth: &Eth, packet: &[u8], out: &mut [u8]) -> Action {
        if eth.dst != self.mac {
            return self.other();
        }
        let d = match net::parse_ipv4_udp(packet) {
            Ok(d) => d,
            Err(IpError::Protocol(_)) => return self.other(),
            Err(_) => return self.malformed(),
        };
        if d.dst != self.me {
            return self.other();
        }
        let answerable = !net::is_group_mac(&eth.src) && net::is_unicast_ipv4(&d.src.ip) && d.src.port != 0;
        let Some(req) = Request::parse(d.payload).filter(|_| answerable) else {
            return self.malformed();
        };
        if out.len() < REPLY_FRAME_LEN {
            return self.no_room();
        }
        match req.op {
            Op::Sink => {
                self.counters.sink_bytes += d.payload.len() as u64;
                if req.value != 1 {
                    return Action::Ignore;
                }
            }
            Op::Send => return self.start_stream(eth.src, d.src, &req),
            _ => {}
        }
        let reply = self.answer(d.src, &req).to_bytes();
        match net::write_udp_frame(out, (self.mac, eth.src), self.me, d.src, &reply) {
            Some(n) if req.op == Op::Stop => Action::Stop(n),
            Some(n) => Action::Reply(n),
            None => self.no_room(),
        }
    }

    fn start_stream(&mut self, mac: Mac, client: Endpoint, req: &Request) -> Action {
        let payload = usize::try_from(req.value).unwrap_or(usize::MAX);
        if req.key == 0 || req.key > MAX_STREAM || !(REPLY_LEN..=MAX_PAYLOAD).contains(&payload) {
            return self.malformed();
        }
        self.counters.requests += 1;
        self.stream = Some(Stream {
            to: (mac, client),
            seq: req.seq,
            payload,
        });
        Action::Stream(req.key)
    }

    /// Datagram `index` of the send request being answered, into `out`
    /// (which needs the headers and the payload); its length, or `None`
    /// without such a request or room.
    pub fn stream_frame(&mut self, index: u64, out: &mut [u8]) -> Option<usize> {
        let s = self.stream?;
        let header = Reply {
            seq: s.seq,
            value: index,
            applied: self.applied,
        }
        .to_bytes();
        let mut payload = [0u8; MAX_PAYLOAD];
        payload[..REPLY_LEN].copy_from_slice(&header);
        let n = net::write_udp_frame(out, (self.mac, s.to.0), self.me, s.to.1, &payload[..s.payload])?;
        self.counters.streamed += 1;
        Some(n)
    }

    fn other(&mut self) -> Action {
        self.counters.other += 1;
        Action::Ignore
    }

    fn malformed(&mut self) -> Action {
        self.counters.malformed += 1;
        Action::Ignore
    }

    fn no_room(&mut self) -> Action {
        self.counters.no_room += 1;
        Action::Ignore
    }

    /// The reply to `req` from `client`: the last reply again for a
    /// repeat, else what executing it gives.
    fn answer(&mut self, client: Endpoint, req: &Request) -> Reply {
        if let Some(last) = self.last.filter(|l| l.client == client && l.request == *req) {
            self.counters.repeats += 1;
            return last.reply;
        }
        self.counters.requests += 1;
        let reply = self.execute(req);
        self.last = Some(Answered {
            client,
            request: *req,
            reply,
        });
        reply
    }

    /// Execute a request (no repeat detection: that is [`KvServer::handle`]'s)
    /// and return its reply. A host computes what a guest's server holds by
    /// executing the same requests.
    pub fn execute(&mut self, req: &Request) -> Reply {
        let value = match req.op {
            Op::Put => self.put(req.key, req.value),
            Op::Get => self.get(req.key).unwrap_or(0),
            Op::Stop => {
                // A failure is counted; the checksum is still the state's.
                let _ = self.flush();
                self.checksum()
            }
            Op::Sink => self.counters.sink_bytes,
            Op::Send => 0,
        };
        Reply {
            seq: req.seq,
            value,
            applied: self.applied,
        }
    }

    /// Store `value` under `key`; returns the value now stored or [`REFUSED`].
    fn put(&mut self, key: u64, value: u64) -> u64 {
        let Some((slot, found)) = self.find(key) else {
            return self.refuse();
        };
        let at = slot * SLOT_WORDS;
        if found && self.table[at + 2] == value {
            return value;
        }
        if !found && self.used >= self.capacity() {
            return self.refuse();
        }
        if let Some(log) = self.log.as_mut() {
            match log.append(key, value) {
                Ok(()) => {}
                Err(LogError::Full) => return self.refuse(),
                Err(LogError::Disk) => {
                    self.counters.disk_errors += 1;
                    return self.refuse();
                }
            }
        }
        self.table[at..at + SLOT_WORDS].copy_from_slice(&[USED, key, value]);
        self.used += u64::from(!found);
        self.applied += 1;
        value
    }

    fn refuse(&mut self) -> u64 {
        self.counters.refused += 1;
        REFUSED
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: u64) -> Option<u64> {
        match self.find(key)? {
            (slot, true) => Some(self.table[slot * SLOT_WORDS + 2]),
            (_, false) => None,
        }
    }

    /// The slot holding `key` (`true`), or the empty slot where it would go
    /// (`false`); `None` if the table has neither.
    fn find(&self, key: u64) -> Option<(usize, bool)> {
        let n = self.slots();
        if n == 0 {
            return None;
        }
        let mut i = ((u128::from(mix64(key ^ HOME_SALT)) * n as u128) >> 64) as usize;
        for _ in 0..n {
            let slot = &self.table[i * SLOT_WORDS..(i + 1) * SLOT_WORDS];
            if slot[0] == EMPTY {
                return Some((i, false));
            }
            if slot[1] == key {
                return Some((i, true));
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        None
    }

    /// FLUSH the disk log, if there is one (a failure is counted too).
    pub fn flush(&mut self) -> Result<(), DiskError> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        let r = log.disk.flush();
        if r.is_err() {
            self.counters.disk_errors += 1;
        }
        r
    }

    /// The state checksum: over the set of (key, value) pairs in the table,
    /// however and in whatever order they got there and whatever the table
    /// size, and the `applied` count. Reads the whole table.
    pub fn checksum(&self) -> u64 {
        let (mut sum, mut keys) = (0u64, 0u64);
        for slot in self.table.chunks_exact(SLOT_WORDS) {
            if slot[0] != EMPTY {
                sum = sum.wrapping_add(hash_words(PAIR_SEED, &slot[1..]));
                keys += 1;
            }
        }
        let mut h = Hasher::new(SUM_SEED);
        h.words(&[sum, keys, self.applied]);
        h.finish()
    }

    /// Puts applied so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Keys stored.
    pub fn len(&self) -> u64 {
        self.used
    }

    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Slots of the table.
    pub fn slots(&self) -> usize {
        self.table.len() / SLOT_WORDS
    }

    /// Keys the table takes: 7/8 of its slots (all of fewer than 8).
    pub fn capacity(&self) -> u64 {
        let n = self.slots() as u64;
        n - n / 8
    }

    /// Records in the disk log, `None` without one.
    pub fn logged(&self) -> Option<u64> {
        self.log.as_ref().map(|l| l.records)
    }

    /// What the server has seen so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The server's address and port.
    pub fn endpoint(&self) -> Endpoint {
        self.me
    }

    /// The server's MAC address.
    pub fn mac(&self) -> Mac {
        self.mac
    }
}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests;
