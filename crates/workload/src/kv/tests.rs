//! Host tests of the kv server, through whole Ethernet/IPv4/UDP frames.

use std::vec::Vec;

use super::wire::le64;
use super::*;
use crate::disk::MemDisk;
use crate::net::{ARP_FRAME_LEN, ARP_REQUEST, Arp, BROADCAST, ETH_LEN};
use crate::rng::Rng;

const SERVER_MAC: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const SERVER: Endpoint = Endpoint {
    ip: [10, 0, 2, 15],
    port: 7000,
};

/// A test client: builds request frames, checks and parses reply frames.
#[derive(Clone, Copy)]
struct Client {
    mac: Mac,
    me: Endpoint,
    to: Endpoint,
}

const CLIENT: Client = Client {
    mac: [0x52, 0x55, 10, 0, 2, 2],
    me: Endpoint {
        ip: [10, 0, 2, 2],
        port: 40_000,
    },
    to: SERVER,
};

impl Client {
    fn frame(&self, seq: u64, op: Op, key: u64, value: u64) -> Vec<u8> {
        let req = Request { seq, op, key, value };
        self.raw(&req.to_bytes())
    }

    fn raw(&self, payload: &[u8]) -> Vec<u8> {
        let mut buf = std::vec![0u8; 1500];
        let n = net::write_udp_frame(&mut buf, (self.mac, SERVER_MAC), self.me, self.to, payload).unwrap();
        buf.truncate(n);
        buf
    }

    /// Send a frame; the action and, for a reply, the parsed reply.
    fn send_frame(&self, kv: &mut KvServer, frame: &[u8]) -> (Action, Option<Reply>) {
        let mut out = [0u8; 128];
        let action = kv.handle(frame, &mut out);
        let reply = match action {
            Action::Reply(n) | Action::Stop(n) => Some(self.parse_reply(&out[..n])),
            Action::Ignore | Action::Stream(_) => None,
        };
        (action, reply)
    }

    fn send(&self, kv: &mut KvServer, seq: u64, op: Op, key: u64, value: u64) -> Reply {
        let (action, reply) = self.send_frame(kv, &self.frame(seq, op, key, value));
        let reply = reply.unwrap_or_else(|| panic!("no reply to {op:?} seq {seq}"));
        let n = REPLY_FRAME_LEN;
        let want = if op == Op::Stop {
            Action::Stop(n)
        } else {
            Action::Reply(n)
        };
        assert_eq!(action, want);
        assert_eq!(reply.seq, seq);
        reply
    }

    fn parse_reply(&self, frame: &[u8]) -> Reply {
        let (eth, packet) = net::parse_eth(frame).unwrap();
        assert_eq!(
            (eth.dst, eth.src, eth.ethertype),
            (self.mac, SERVER_MAC, net::ETHERTYPE_IPV4)
        );
        let d = net::parse_ipv4_udp(packet).unwrap();
        assert_eq!((d.src, d.dst), (SERVER, self.me));
        Reply::parse(d.payload).unwrap()
    }
}

fn server(table: &mut [u64]) -> KvServer<'_> {
    KvServer::new(SERVER_MAC, SERVER.ip, SERVER.port, table)
}

fn reply(seq: u64, value: u64, applied: u64) -> Reply {
    Reply { seq, value, applied }
}

/// Recompute the IPv4 header checksum of a frame after editing the header.
fn fix_ip_sum(frame: &mut [u8]) {
    let h = &mut frame[ETH_LEN..ETH_LEN + net::IPV4_LEN];
    h[10..12].fill(0);
    let sum = net::internet_checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn put_get_and_stop_round_trip() {
    let mut table = [0u64; 3 * 64];
    let mut kv = server(&mut table);
    let c = CLIENT;
    assert_eq!(c.send(&mut kv, 1, Op::Put, 5, 50), reply(1, 50, 1));
    assert_eq!(c.send(&mut kv, 2, Op::Get, 5, 999), reply(2, 50, 1));
    assert_eq!(c.send(&mut kv, 3, Op::Get, 6, 0), reply(3, 0, 1), "no value: 0");
    assert_eq!(c.send(&mut kv, 4, Op::Put, 0, 0), reply(4, 0, 2), "key 0, value 0");
    assert_eq!(c.send(&mut kv, 5, Op::Put, u64::MAX, 7), reply(5, 7, 3));
    assert_eq!((kv.get(0), kv.get(6), kv.get(u64::MAX)), (Some(0), None, Some(7)));
    assert_eq!(kv.len(), 3);
    let sum = kv.checksum();
    assert_eq!(c.send(&mut kv, 6, Op::Stop, 0, 0), reply(6, sum, 3));
    let counters = *kv.counters();
    assert_eq!((counters.frames, counters.requests), (6, 6));
    assert_eq!(
        counters.other + counters.malformed + counters.refused + counters.repeats,
        0
    );
}

#[test]
fn a_repeat_is_answered_again_and_puts_are_idempotent() {
    let mut table = [0u64; 3 * 64];
    let mut kv = server(&mut table);
    let c = CLIENT;
    let put = c.frame(1, Op::Put, 9, 90);
    let (_, first) = c.send_frame(&mut kv, &put);
    assert_eq!(first, Some(reply(1, 90, 1)));
    // Retransmitted: the same reply, nothing executed.
    let (_, again) = c.send_frame(&mut kv, &put);
    assert_eq!(again, first);
    assert_eq!((kv.counters().requests, kv.counters().repeats, kv.applied()), (1, 1, 1));
    // The same put under a new seq changes nothing and is not counted.
    assert_eq!(c.send(&mut kv, 2, Op::Put, 9, 90), reply(2, 90, 1));
    assert_eq!(c.send(&mut kv, 3, Op::Put, 9, 91), reply(3, 91, 2));
    let get = c.frame(4, Op::Get, 9, 0);
    assert_eq!(c.send_frame(&mut kv, &get).1, Some(reply(4, 91, 2)));
    assert_eq!(c.send_frame(&mut kv, &get).1, Some(reply(4, 91, 2)));
    // Only the last request is remembered: after another client's put,
    // the get runs again and sees that put.
    let mut other = CLIENT;
    other.me.port = 40_001;
    assert_eq!(other.send(&mut kv, 10, Op::Put, 9, 92), reply(10, 92, 3));
    assert_eq!(c.send_frame(&mut kv, &get).1, Some(reply(4, 92, 3)));
    // And an older put runs again.
    assert_eq!(c.send_frame(&mut kv, &put).1, Some(reply(1, 90, 4)));
    // Another client with the same seq and request is executed, not a repeat.
    assert_eq!(other.send(&mut kv, 1, Op::Put, 9, 90), reply(1, 90, 4));
    assert_eq!((kv.counters().repeats, kv.counters().requests), (2, 8));
    // A repeated stop is a stop again, with the same reply.
    let stop = c.frame(11, Op::Stop, 0, 0);
    let first = c.send_frame(&mut kv, &stop);
    assert_eq!(first.0, Action::Stop(REPLY_FRAME_LEN));
    assert_eq!(c.send_frame(&mut kv, &stop), first);
}

#[test]
fn arp_is_answered_for_our_address_only() {
    let mut table = [0u64; 30];
    let mut kv = server(&mut table);
    let req = |tpa, dst| {
        let arp = Arp {
            oper: ARP_REQUEST,
            sha: CLIENT.mac,
            spa: CLIENT.me.ip,
            tha: [0; 6],
            tpa,
        };
        let mut f = [0u8; 60];
        net::write_arp_frame(&mut f, dst, &arp).unwrap();
        (f, arp)
    };
    let mut out = [0u8; REPLY_FRAME_LEN];
    for dst in [BROADCAST, SERVER_MAC] {
        let (frame, arp) = req(SERVER.ip, dst);
        assert_eq!(kv.handle(&frame, &mut out), Action::Reply(ARP_FRAME_LEN));
        let (eth, p) = net::parse_eth(&out[..ARP_FRAME_LEN]).unwrap();
        assert_eq!((eth.dst, eth.src), (CLIENT.mac, SERVER_MAC));
        assert_eq!(net::parse_arp(p), Some(arp.reply(SERVER_MAC, SERVER.ip)));
    }
    assert_eq!(kv.counters().arp, 2);
    let (other_ip, _) = req([10, 0, 2, 16], BROADCAST);
    let (other_mac, _) = req(SERVER.ip, [2, 0, 0, 0, 0, 9]);
    for frame in [other_ip, other_mac] {
        assert_eq!(kv.handle(&frame, &mut out), Action::Ignore);
    }
    // Our own reply (an ARP reply, not a request) is not answered either.
    let (frame, _) = req(SERVER.ip, BROADCAST);
    kv.handle(&frame, &mut out);
    let mut reply = [0u8; ARP_FRAME_LEN];
    reply.copy_from_slice(&out[..ARP_FRAME_LEN]);
    assert_eq!(kv.handle(&reply, &mut out), Action::Ignore);
    assert_eq!((kv.counters().other, kv.counters().arp), (3, 3));
}

#[test]
fn frames_for_others_and_malformed_frames_are_ignored_and_counted() {
    let mut table = [0u64; 3 * 64];
    let mut kv = server(&mut table);
    let c = CLIENT;
    let mut out = [0u8; 128];
    let to = |port: u16, ip: Ipv4| Client {
        to: Endpoint { ip, port },
        ..c
    };
    let mut others = std::vec![
        to(7001, SERVER.ip).frame(1, Op::Put, 1, 1),
        to(7000, [10, 0, 2, 16]).frame(1, Op::Put, 1, 1),
    ];
    let mut ipv6 = c.frame(1, Op::Put, 1, 1);
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let mut other_mac = c.frame(1, Op::Put, 1, 1);
    other_mac[0] = 0x56;
    let mut tcp = c.frame(1, Op::Put, 1, 1);
    tcp[ETH_LEN + 9] = 6;
    fix_ip_sum(&mut tcp);
    others.extend([ipv6, other_mac, tcp]);
    for f in &others {
        assert_eq!(kv.handle(f, &mut out), Action::Ignore);
    }
    assert_eq!(kv.counters().other, others.len() as u64);
    let mut bad_sum = c.frame(1, Op::Put, 1, 1);
    let last = bad_sum.len() - 1;
    bad_sum[last] ^= 1;
    let mut bad_op = Request {
        seq: 1,
        op: Op::Put,
        key: 1,
        value: 1,
    }
    .to_bytes();
    bad_op[8] = 4;
    let mut fragment = c.frame(1, Op::Put, 1, 1);
    fragment[ETH_LEN + 6] |= 0x20; // more fragments
    fix_ip_sum(&mut fragment);
    let from = |ip: Ipv4, port: u16| Client {
        me: Endpoint { ip, port },
        ..c
    };
    let malformed = [
        bad_sum,
        fragment,
        c.raw(&bad_op),
        c.raw(&[0u8; REQUEST_LEN - 1]),
        c.raw(&[0u8; REQUEST_LEN + 1]),
        from([255, 255, 255, 255], 1).frame(1, Op::Put, 1, 1),
        from([0, 0, 0, 0], 1).frame(1, Op::Put, 1, 1),
        from(c.me.ip, 0).frame(1, Op::Put, 1, 1),
        Client { mac: BROADCAST, ..c }.frame(1, Op::Put, 1, 1),
        std::vec![0u8; 13],
    ];
    for f in &malformed {
        assert_eq!(kv.handle(f, &mut out), Action::Ignore);
    }
    assert_eq!(kv.counters().malformed, malformed.len() as u64);
    assert_eq!((kv.applied(), kv.counters().requests, kv.len()), (0, 0, 0));
    // Too small an output buffer: counted, not executed.
    assert_eq!(kv.handle(&c.frame(1, Op::Put, 1, 1), &mut out[..65]), Action::Ignore);
    assert_eq!((kv.counters().no_room, kv.applied()), (1, 0));
    assert_eq!(kv.counters().frames, (others.len() + malformed.len() + 1) as u64);
}

#[test]
fn a_full_table_refuses_new_keys_but_takes_updates() {
    let mut table = [0u64; 3 * 16];
    let mut kv = server(&mut table);
    let c = CLIENT;
    assert_eq!((kv.slots(), kv.capacity()), (16, 14));
    for k in 0..14 {
        assert_eq!(c.send(&mut kv, k, Op::Put, k * 1000, k), reply(k, k, k + 1));
    }
    let before = kv.checksum();
    assert_eq!(c.send(&mut kv, 100, Op::Put, 777, 1), reply(100, REFUSED, 14));
    assert_eq!((kv.counters().refused, kv.len(), kv.checksum()), (1, 14, before));
    assert_eq!(c.send(&mut kv, 101, Op::Get, 777, 0), reply(101, 0, 14));
    assert_eq!(c.send(&mut kv, 102, Op::Put, 13_000, 5), reply(102, 5, 15), "an update");
    // Degenerate tables: one slot, and none at all.
    let mut one = [0u64; 5];
    let mut kv = server(&mut one);
    assert_eq!(c.send(&mut kv, 1, Op::Put, 1, 1), reply(1, 1, 1));
    assert_eq!(c.send(&mut kv, 2, Op::Put, 2, 2), reply(2, REFUSED, 1));
    assert_eq!(c.send(&mut kv, 3, Op::Get, 2, 2), reply(3, 0, 1));
    let mut none: [u64; 2] = [0; 2];
    let mut kv = server(&mut none);
    assert_eq!(c.send(&mut kv, 1, Op::Put, 1, 1), reply(1, REFUSED, 0));
    assert_eq!(c.send(&mut kv, 2, Op::Get, 1, 0), reply(2, 0, 0));
}

#[test]
fn the_checksum_ignores_order_and_table_size_but_not_content() {
    let pairs: Vec<(u64, u64)> = (0..200u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i ^ 0x55))
        .collect();
    let sum_of = |order: &mut dyn Iterator<Item = &(u64, u64)>, slots: usize| {
        let mut table = std::vec![0u64; slots * SLOT_WORDS];
        let mut kv = server(&mut table);
        for (seq, (k, v)) in order.enumerate() {
            let r = kv.execute(&Request {
                seq: seq as u64,
                op: Op::Put,
                key: *k,
                value: *v,
            });
            assert_ne!(r.value, REFUSED);
        }
        kv.checksum()
    };
    let forward = sum_of(&mut pairs.iter(), 256);
    assert_eq!(forward, sum_of(&mut pairs.iter().rev(), 256));
    assert_eq!(
        forward,
        sum_of(
            &mut pairs.iter().step_by(2).chain(pairs.iter().skip(1).step_by(2)),
            1000
        )
    );
    assert_ne!(forward, sum_of(&mut pairs.iter().take(199), 256));
    let mut changed = pairs.clone();
    changed[7].1 += 1;
    assert_ne!(forward, sum_of(&mut changed.iter(), 256));
    let swapped: Vec<(u64, u64)> = pairs.iter().map(|(k, v)| (*v, *k)).collect();
    assert_ne!(forward, sum_of(&mut swapped.iter(), 256));
    // The same table reached through more applied puts differs.
    assert_ne!(forward, sum_of(&mut [(pairs[0].0, 1)].iter().chain(pairs.iter()), 256));
    let (mut a, mut b) = ([0u64; 0], [0u64; 30]);
    assert_eq!(server(&mut a).checksum(), server(&mut b).checksum());
}

/// A disk that fails its `fail_write`-th write (from 1) and counts flushes.
struct Flaky {
    inner: MemDisk,
    writes: u64,
    fail_write: u64,
    flushes: u64,
}

fn flaky(fail_write: u64) -> Flaky {
    Flaky {
        inner: MemDisk::new(4096),
        writes: 0,
        fail_write,
        flushes: 0,
    }
}

impl Disk for Flaky {
    fn sectors(&self) -> u64 {
        self.inner.sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u64]) -> Result<(), DiskError> {
        self.inner.read(sector, buf)
    }
    fn write(&mut self, sector: u64, buf: &[u64]) -> Result<(), DiskError> {
        self.writes += 1;
        if self.writes == self.fail_write {
            return Err(DiskError::Device(1));
        }
        self.inner.write(sector, buf)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.flushes += 1;
        Ok(())
    }
}

fn record(image: &[u8], i: usize) -> (u64, u64) {
    let at = i * RECORD_BYTES as usize;
    (le64(image, at).unwrap(), le64(image, at + 8).unwrap())
}

/// Puts until a log of 64 records is full, an update it refuses, then a stop.
fn log_puts(kv: &mut KvServer, c: Client) {
    for i in 0..40u64 {
        assert_eq!(c.send(kv, i, Op::Put, i + 100, i * 3).applied, i + 1);
    }
    c.send(kv, 40, Op::Put, 100, 0); // the same value: no record
    c.send(kv, 41, Op::Get, 100, 0);
    assert_eq!(kv.logged(), Some(40));
    // The log holds 1024 / 16 = 64 records.
    for i in 40..70u64 {
        let want = if i < 64 { i * 3 } else { REFUSED };
        assert_eq!(c.send(kv, 1000 + i, Op::Put, i + 100, i * 3).value, want, "put {i}");
    }
    assert_eq!((kv.logged(), kv.applied(), kv.counters().refused), (Some(64), 64, 6));
    // An update of a key is a record too, but the log is full.
    assert_eq!(c.send(kv, 2000, Op::Put, 100, 1).value, REFUSED);
    assert_eq!(c.send(kv, 2001, Op::Stop, 0, 0).applied, 64);
}

#[test]
fn applied_puts_are_logged_in_order() {
    let mut disk = flaky(0);
    let mut table = [0u64; 3 * 256];
    let c = CLIENT;
    {
        let mut kv = server(&mut table).with_log(&mut disk, 1024);
        log_puts(&mut kv, c);
    }
    assert_eq!(disk.flushes, 1, "stop flushes the log");
    let image = disk.inner.to_bytes();
    for i in 0..64 {
        assert_eq!(record(&image, i), (i as u64 + 100, i as u64 * 3), "record {i}");
    }
    assert!(image[1024..].iter().all(|b| *b == 0));
}

#[test]
fn a_failed_log_write_refuses_the_put_and_leaves_the_log_whole() {
    let mut disk = flaky(2);
    let c = CLIENT;
    let mut table = [0u64; 3 * 16];
    {
        let mut kv = server(&mut table).with_log(&mut disk, 4096);
        assert_eq!(c.send(&mut kv, 1, Op::Put, 1, 10).value, 10);
        assert_eq!(c.send(&mut kv, 2, Op::Put, 2, 20), reply(2, REFUSED, 1));
        assert_eq!((kv.counters().disk_errors, kv.get(2), kv.logged()), (1, None, Some(1)));
        assert_eq!(c.send(&mut kv, 3, Op::Put, 3, 30), reply(3, 30, 2));
    }
    let image = disk.inner.to_bytes();
    assert_eq!((record(&image, 0), record(&image, 1)), ((1, 10), (3, 30)));
    assert_eq!(record(&image, 2), (0, 0));
}

#[test]
fn from_spec_takes_the_address_port_and_disk() {
    let spec = Spec::parse("workload=kv ip=192.168.7.1 port=9000 disk=on dsize=4K").unwrap();
    let mut table = [0u64; 48];
    let mut disk = MemDisk::new(1 << 20);
    let kv = KvServer::from_spec(&spec, SERVER_MAC, &mut table, Some(&mut disk)).unwrap();
    assert_eq!(
        kv.endpoint(),
        Endpoint {
            ip: [192, 168, 7, 1],
            port: 9000
        }
    );
    assert_eq!((kv.mac(), kv.logged()), (SERVER_MAC, Some(0)));
    let no_disk = KvServer::from_spec(&spec, SERVER_MAC, &mut table, None);
    assert_eq!(no_disk.err(), Some(SetupError::NoDisk));
    let plain = Spec::parse("workload=kv ip=192.168.7.1").unwrap();
    let kv = KvServer::from_spec(&plain, SERVER_MAC, &mut table, Some(&mut disk)).unwrap();
    assert_eq!((kv.endpoint().port, kv.logged()), (7000, None));
    let other = Spec::defaults(Kind::Ftp);
    let err = KvServer::from_spec(&other, SERVER_MAC, &mut table, None).err();
    assert_eq!(err, Some(SetupError::NotKv(Kind::Ftp)));
}

/// Truncated, changed and random frames: no panic, and a frame derived from
/// an executed put by one changed byte is never executed as something else.
#[test]
fn handle_survives_truncated_changed_and_random_frames() {
    let mut table = [0u64; 3 * 64];
    let mut kv = server(&mut table);
    let c = CLIENT;
    let put = c.frame(1, Op::Put, 5, 50);
    c.send_frame(&mut kv, &put);
    let sum = kv.checksum();
    let mut out = [0u8; 128];
    for len in 0..put.len() {
        assert_eq!(kv.handle(&put[..len], &mut out), Action::Ignore, "truncated to {len}");
    }
    for i in 0..put.len() {
        for x in [1u8, 0x10, 0xff] {
            let mut f = put.clone();
            f[i] ^= x;
            match kv.handle(&f, &mut out) {
                Action::Ignore => {}
                Action::Reply(n) => {
                    // Only the source MAC (or the UDP checksum, to 0: none)
                    // may change and still be answered, as a repeat.
                    let no_sum = f[40..42] == [0, 0];
                    assert!((6..12).contains(&i) || no_sum, "byte {i} ^ {x:#x} answered");
                    assert_eq!(&out[..6], &f[6..12]);
                    assert_eq!(n, REPLY_FRAME_LEN);
                }
                Action::Stop(_) => panic!("byte {i} ^ {x:#x} stopped the server"),
                Action::Stream(_) => panic!("byte {i} ^ {x:#x} started a stream"),
            }
        }
    }
    assert_eq!((kv.checksum(), kv.applied(), kv.counters().requests), (sum, 1, 1));
    let mut rng = Rng::new(7);
    let mut f = [0u8; 128];
    for round in 0..20_000u64 {
        let len = rng.below(f.len() as u64 + 1) as usize;
        for b in f[..len].iter_mut() {
            *b = rng.next_u64() as u8;
        }
        if round % 2 == 1 && len >= put.len() {
            // The valid headers with random bytes after some point.
            let keep = rng.below(put.len() as u64) as usize;
            f[..keep].copy_from_slice(&put[..keep]);
        }
        let _ = kv.handle(&f[..len], &mut out);
        let _ = kv.handle(&f[..len], &mut out[..rng.below(80) as usize]);
    }
    assert!(kv.counters().frames > 40_000);
}

#[test]
fn requests_and_replies_have_the_documented_layout() {
    let r = Request {
        seq: 0x0102_0304_0506_0708,
        op: Op::Get,
        key: 0x1112_1314_1516_1718,
        value: 0x2122_2324_2526_2728,
    };
    let b = r.to_bytes();
    assert_eq!(&b[..9], &[8, 7, 6, 5, 4, 3, 2, 1, 2]);
    assert_eq!((b[9], b[16], b[17], b[24]), (0x18, 0x11, 0x28, 0x21));
    assert_eq!(Request::parse(&b), Some(r));
    for op in [0u8, 6, 255] {
        let mut bad = b;
        bad[8] = op;
        assert_eq!(Request::parse(&bad), None, "op {op}");
    }
    assert_eq!(Request::parse(&b[..24]), None);
    let rep = reply(1, 2, 3);
    let bytes = rep.to_bytes();
    assert_eq!((bytes[0], bytes[8], bytes[16]), (1, 2, 3));
    assert_eq!(Reply::parse(&bytes), Some(rep));
    assert_eq!(Reply::parse(&bytes[..23]), None);
}

#[test]
fn send_streams_datagrams_and_sink_counts_bytes_without_changing_state() {
    let mut table = std::vec![0u64; 3 * 64];
    let mut kv = server(&mut table);
    CLIENT.send(&mut kv, 1, Op::Put, 5, 50);
    let sum = kv.checksum();
    // Send: 3 datagrams of 100 bytes, each a reply carrying its index.
    let (action, _) = CLIENT.send_frame(&mut kv, &CLIENT.frame(2, Op::Send, 3, 100));
    assert_eq!(action, Action::Stream(3));
    for i in 0..3 {
        let mut out = [0u8; 1600];
        let n = kv.stream_frame(i, &mut out).unwrap();
        let (_, packet) = net::parse_eth(&out[..n]).unwrap();
        let d = net::parse_ipv4_udp(packet).unwrap();
        assert_eq!((d.dst, d.payload.len()), (CLIENT.me, 100));
        assert_eq!(Reply::parse(&d.payload[..REPLY_LEN]).unwrap(), reply(2, i, 1));
    }
    // Bad sizes are refused.
    for (count, bytes) in [(0, 100), (MAX_STREAM + 1, 100), (1, 10), (1, MAX_PAYLOAD as u64 + 1)] {
        let (action, _) = CLIENT.send_frame(&mut kv, &CLIENT.frame(3, Op::Send, count, bytes));
        assert_eq!(action, Action::Ignore, "{count} x {bytes}");
    }
    // Sink: long requests are counted silently; value 1 asks for the count.
    let mut long = Request {
        seq: 4,
        op: Op::Sink,
        key: 0,
        value: 0,
    }
    .to_bytes()
    .to_vec();
    long.resize(1000, 7);
    for _ in 0..2 {
        assert_eq!(CLIENT.send_frame(&mut kv, &CLIENT.raw(&long)).0, Action::Ignore);
    }
    assert_eq!(CLIENT.send(&mut kv, 5, Op::Sink, 0, 1).value, 2000 + REQUEST_LEN as u64);
    // A long request of another op is malformed.
    long[8] = Op::Put as u8;
    let before = kv.counters().malformed;
    assert_eq!(CLIENT.send_frame(&mut kv, &CLIENT.raw(&long)).0, Action::Ignore);
    assert_eq!(kv.counters().malformed, before + 1);
    assert_eq!(kv.checksum(), sum, "send and sink change nothing");
}
