//! Tests of the frame parsers and builders.

use super::*;
use crate::rng::Rng;

const A: Endpoint = Endpoint {
    ip: [192, 168, 0, 1],
    port: 5353,
};
const B: Endpoint = Endpoint {
    ip: [192, 168, 0, 199],
    port: 7000,
};
const MAC_A: Mac = [2, 0, 0, 0, 0, 1];
const MAC_B: Mac = [2, 0, 0, 0, 0, 2];

fn frame(payload: &[u8], buf: &mut [u8; 256]) -> usize {
    write_udp_frame(buf, (MAC_A, MAC_B), A, B, payload).unwrap()
}

#[test]
fn internet_checksum_known_answers() {
    // The IPv4 header of RFC 1071's usual worked example (Wikipedia's
    // "IPv4 header checksum"), checksum field zero: 0xb861.
    let mut h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];
    assert_eq!(internet_checksum(&h), 0xb861);
    h[10..12].copy_from_slice(&[0xb8, 0x61]);
    assert_eq!(internet_checksum(&h), 0);
    // RFC 1071 section 3's example bytes: sum 0xddf2, checksum 0x220d.
    assert_eq!(
        internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
        0x220d
    );
    // An odd length pads with a zero byte.
    assert_eq!(internet_checksum(&[0x12]), internet_checksum(&[0x12, 0x00]));
}

#[test]
fn udp_frames_round_trip_with_the_header_fields_required() {
    let mut buf = [0u8; 256];
    let n = frame(b"hello", &mut buf);
    assert_eq!(n, UDP_HEADERS_LEN + 5);
    let (eth, ip) = parse_eth(&buf[..n]).unwrap();
    assert_eq!((eth.dst, eth.src, eth.ethertype), (MAC_B, MAC_A, ETHERTYPE_IPV4));
    // Version/IHL, total length, ID 0, DF, TTL 64, UDP, both checksums.
    assert_eq!(&ip[..10], &[0x45, 0, 0, 33, 0, 0, 0x40, 0, 64, 17]);
    assert_eq!(internet_checksum(&ip[..20]), 0);
    assert_ne!(&ip[26..28], &[0, 0]);
    let d = parse_ipv4_udp(ip).unwrap();
    assert_eq!((d.src, d.dst, d.payload), (A, B, &b"hello"[..]));
    // Ethernet padding after the datagram is ignored.
    let padded = parse_ipv4_udp(&buf[ETH_LEN..n + 20]).unwrap();
    assert_eq!(padded.payload, b"hello");
    // Too small an output buffer is refused, not overrun.
    assert_eq!(write_udp_frame(&mut buf[..n - 1], (MAC_A, MAC_B), A, B, b"hello"), None);
    assert_eq!(write_udp_frame(&mut buf[..3], (MAC_A, MAC_B), A, B, b""), None);
}

#[test]
fn udp_checksum_known_answer_and_zero_means_none() {
    // 10.0.0.1:1234 -> 10.0.0.2:7000, payload "ab"; checksum worked by
    // hand: pseudo-header 0a00+0001+0a00+0002+0011+000a, header
    // 04d2+1b58+000a, data 6162 sum to 0x95b4, complement 0x6a4b.
    let mut buf = [0u8; 64];
    let src = Endpoint {
        ip: [10, 0, 0, 1],
        port: 1234,
    };
    let dst = Endpoint {
        ip: [10, 0, 0, 2],
        port: 7000,
    };
    let n = write_ipv4_udp(&mut buf, src, dst, b"ab").unwrap();
    assert_eq!(&buf[26..28], &[0x6a, 0x4b]);
    buf[26..28].copy_from_slice(&[0, 0]);
    assert!(parse_ipv4_udp(&buf[..n]).is_ok(), "checksum 0: not checked");
    buf[26..28].copy_from_slice(&[0x6a, 0x4c]);
    assert_eq!(parse_ipv4_udp(&buf[..n]), Err(IpError::UdpChecksum));
}

#[test]
fn ipv4_errors_name_the_field() {
    let mut good = [0u8; 256];
    let n = frame(b"payload!", &mut good);
    let ip = &good[ETH_LEN..n];
    let check = |edit: &dyn Fn(&mut [u8]), want: IpError| {
        let mut p = [0u8; 256];
        let p = &mut p[..ip.len()];
        p.copy_from_slice(ip);
        edit(p);
        if !matches!(want, IpError::HeaderChecksum) {
            // Keep the header checksum right so the intended check fires.
            p[10..12].copy_from_slice(&[0, 0]);
            let sum = internet_checksum(&p[..20]);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        assert_eq!(parse_ipv4_udp(p), Err(want));
    };
    check(&|p| p[0] = 0x65, IpError::Version(6));
    check(&|p| p[0] = 0x44, IpError::HeaderLength(4));
    check(
        &|p| p[2..4].copy_from_slice(&500u16.to_be_bytes()),
        IpError::TotalLength(500),
    );
    check(
        &|p| p[2..4].copy_from_slice(&19u16.to_be_bytes()),
        IpError::TotalLength(19),
    );
    check(&|p| p[8] = 63, IpError::HeaderChecksum);
    check(&|p| p[9] = 6, IpError::Protocol(6));
    check(&|p| p[6] = 0x60, IpError::Fragment); // DF and MF
    check(&|p| p[7] = 1, IpError::Fragment); // an offset
    check(
        &|p| p[24..26].copy_from_slice(&9u16.to_be_bytes()),
        IpError::UdpLength(9),
    );
    check(&|p| p[30] ^= 1, IpError::UdpChecksum);
    check(&|p| p[2..4].copy_from_slice(&24u16.to_be_bytes()), IpError::Truncated);
    assert_eq!(parse_ipv4_udp(&[]), Err(IpError::Truncated));
    assert_eq!(parse_ipv4_udp(&ip[..19]), Err(IpError::Truncated));
    assert_eq!(parse_ipv4_udp(&ip[..ip.len() - 1]), Err(IpError::TotalLength(36)));
}

#[test]
fn arp_requests_for_our_address_only_are_answered() {
    let me: Ipv4 = [10, 0, 2, 15];
    let req = Arp {
        oper: ARP_REQUEST,
        sha: MAC_A,
        spa: [10, 0, 2, 2],
        tha: [0; 6],
        tpa: me,
    };
    let mut f = [0u8; 60]; // padded to the Ethernet minimum
    assert_eq!(write_arp_frame(&mut f, BROADCAST, &req), Some(ARP_FRAME_LEN));
    let mut out = [0u8; 64];
    let n = arp_reply(&f, MAC_B, me, &mut out).unwrap();
    let (eth, p) = parse_eth(&out[..n]).unwrap();
    assert_eq!((eth.dst, eth.src, eth.ethertype), (MAC_A, MAC_B, ETHERTYPE_ARP));
    let rep = parse_arp(p).unwrap();
    assert_eq!(rep, req.reply(MAC_B, me));
    assert_eq!(
        (rep.oper, rep.tha, rep.tpa, rep.sha, rep.spa),
        (2, MAC_A, [10, 0, 2, 2], MAC_B, me)
    );
    assert_eq!(arp_reply(&f, MAC_B, [10, 0, 2, 16], &mut out), None, "not our address");
    assert_eq!(
        arp_reply(&out[..n], MAC_A, [10, 0, 2, 2], &mut out.clone()),
        None,
        "a reply"
    );
    assert_eq!(arp_reply(&f, MAC_B, me, &mut out[..41]), None, "no room");
    let mut ipv6 = f;
    ipv6[ETH_LEN + 2] = 0x86;
    assert_eq!(arp_reply(&ipv6, MAC_B, me, &mut out), None, "not IPv4");
    assert_eq!(parse_eth(&[0u8; 20]), None, "802.3 length, not a type");
}

/// Frames derived from valid ones: every truncation, every single-byte
/// change, and random bytes. No parser may panic; a parser may accept
/// a changed frame only if what it returns lies within the frame.
#[test]
fn parsers_survive_truncated_changed_and_random_bytes() {
    let mut udp = [0u8; 256];
    let n = frame(b"0123456789abcdef0123456789", &mut udp);
    let mut arp = [0u8; 64];
    let req = Arp {
        oper: ARP_REQUEST,
        sha: MAC_A,
        spa: A.ip,
        tha: [0; 6],
        tpa: B.ip,
    };
    let m = write_arp_frame(&mut arp, BROADCAST, &req).unwrap();
    let parse_all = |f: &[u8]| {
        if let Some((_, p)) = parse_eth(f) {
            let _ = parse_arp(p);
            if let Ok(d) = parse_ipv4_udp(p) {
                assert!(d.payload.len() + UDP_HEADERS_LEN <= f.len());
            }
        }
        let _ = parse_arp(f);
        let _ = parse_ipv4_udp(f);
        let _ = arp_reply(f, MAC_B, B.ip, &mut [0u8; 64]);
    };
    for valid in [&udp[..n], &arp[..m]] {
        for len in 0..=valid.len() {
            parse_all(&valid[..len]);
        }
        for i in 0..valid.len() {
            for x in [1u8, 0x80, 0xff] {
                let mut f = [0u8; 256];
                let f = &mut f[..valid.len()];
                f.copy_from_slice(valid);
                f[i] ^= x;
                parse_all(f);
                // A single changed byte of the IP packet never passes
                // (unless it zeroes the UDP checksum: none sent).
                let no_udp_sum = f[40..42] == [0, 0];
                if valid.len() == n && i >= ETH_LEN && !no_udp_sum {
                    assert!(parse_ipv4_udp(&f[ETH_LEN..]).is_err(), "byte {i} ^ {x:#x}");
                }
            }
        }
    }
    let mut rng = Rng::new(99);
    let mut f = [0u8; 128];
    for round in 0..20_000 {
        let len = rng.below(f.len() as u64 + 1) as usize;
        for b in f[..len].iter_mut() {
            *b = rng.next_u64() as u8;
        }
        if round % 2 == 1 && len > 24 {
            // Plausible headers, so the random bytes reach deeper checks.
            f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            f[14] = 0x45;
        }
        parse_all(&f[..len]);
    }
}
