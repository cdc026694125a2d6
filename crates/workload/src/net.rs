//! Ethernet II, ARP and IPv4/UDP frames, as the guest's network workloads
//! receive and send them.
//!
//! Everything works on caller-provided byte slices: parsers borrow the
//! frame and return `None` or an error for anything malformed (they never
//! panic, whatever the bytes), builders write into a caller buffer and
//! return the length written, or `None` if it does not fit. Frames carry no
//! FCS and are not padded to Ethernet's 60-byte minimum (virtio-net and
//! tap take them as they are); received frames may be padded, and bytes
//! after the IPv4 total length or the 28 ARP bytes are ignored.
//!
//! Only what a UDP server needs is here: no VLAN tags, no IP fragments
//! (they are dropped), no IP options on send (accepted and skipped on
//! receive).

use core::fmt;

/// A MAC address.
pub type Mac = [u8; 6];

/// An IPv4 address, in network order (`10.0.2.15` is `[10, 0, 2, 15]`).
pub type Ipv4 = [u8; 4];

/// The Ethernet broadcast address.
pub const BROADCAST: Mac = [0xff; 6];

/// Bytes of an Ethernet II header.
pub const ETH_LEN: usize = 14;

/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;

/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// Bytes of an ARP packet for IPv4 over Ethernet.
pub const ARP_LEN: usize = 28;

/// Bytes of an ARP frame: Ethernet header and ARP packet.
pub const ARP_FRAME_LEN: usize = ETH_LEN + ARP_LEN;

/// ARP operation: request.
pub const ARP_REQUEST: u16 = 1;

/// ARP operation: reply.
pub const ARP_REPLY: u16 = 2;

/// Bytes of an IPv4 header without options.
pub const IPV4_LEN: usize = 20;

/// Bytes of a UDP header.
pub const UDP_LEN: usize = 8;

/// Bytes of the headers of a UDP frame that [`write_udp_frame`] builds:
/// Ethernet, IPv4 (no options) and UDP.
pub const UDP_HEADERS_LEN: usize = ETH_LEN + IPV4_LEN + UDP_LEN;

/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// TTL of the packets [`write_ipv4_udp`] builds.
pub const TTL: u8 = 64;

/// Whether a MAC address is a group (multicast or broadcast) address.
pub fn is_group_mac(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// Whether `ip` can be the source of a datagram one answers: not 0.0.0.0,
/// not multicast (224/4), not reserved (240/4) or broadcast.
pub fn is_unicast_ipv4(ip: &Ipv4) -> bool {
    *ip != [0; 4] && ip[0] < 224
}

/// `N` bytes of `b` from `at`, if there are that many.
fn bytes<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// A big-endian u16 of `b` at `at`.
fn be16(b: &[u8], at: usize) -> Option<u16> {
    bytes(b, at).map(u16::from_be_bytes)
}

/// An Ethernet II header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eth {
    /// Destination.
    pub dst: Mac,
    /// Source.
    pub src: Mac,
    /// What the payload is ([`ETHERTYPE_IPV4`], [`ETHERTYPE_ARP`], ...).
    pub ethertype: u16,
}

/// Split a frame into its Ethernet II header and payload. `None` if it is
/// shorter than a header or its type field is an 802.3 length (< 0x600).
pub fn parse_eth(frame: &[u8]) -> Option<(Eth, &[u8])> {
    let eth = Eth {
        dst: bytes(frame, 0)?,
        src: bytes(frame, 6)?,
        ethertype: be16(frame, 12)?,
    };
    if eth.ethertype < 0x600 {
        return None;
    }
    Some((eth, frame.get(ETH_LEN..)?))
}

/// Write an Ethernet II header at the start of `out`; returns [`ETH_LEN`].
pub fn write_eth(out: &mut [u8], eth: &Eth) -> Option<usize> {
    let h = out.get_mut(..ETH_LEN)?;
    h[..6].copy_from_slice(&eth.dst);
    h[6..12].copy_from_slice(&eth.src);
    h[12..].copy_from_slice(&eth.ethertype.to_be_bytes());
    Some(ETH_LEN)
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// Operation: [`ARP_REQUEST`] or [`ARP_REPLY`] (others parse too).
    pub oper: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: Ipv4,
    /// Target hardware address (zero in a request).
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: Ipv4,
}

/// The fixed start of an IPv4-over-Ethernet ARP packet: hardware type 1,
/// protocol 0x0800, address lengths 6 and 4.
const ARP_PREFIX: [u8; 6] = [0, 1, 8, 0, 6, 4];

impl Arp {
    /// Whether this asks who has `ip`.
    pub fn is_request_for(&self, ip: &Ipv4) -> bool {
        self.oper == ARP_REQUEST && self.tpa == *ip
    }

    /// The answer of the host at `mac`, `ip` to this request.
    pub fn reply(&self, mac: Mac, ip: Ipv4) -> Arp {
        Arp {
            oper: ARP_REPLY,
            sha: mac,
            spa: ip,
            tha: self.sha,
            tpa: self.spa,
        }
    }
}

/// Parse the payload of an ARP frame; `None` unless it is IPv4 over
/// Ethernet and at least [`ARP_LEN`] bytes.
pub fn parse_arp(payload: &[u8]) -> Option<Arp> {
    if bytes::<6>(payload, 0)? != ARP_PREFIX {
        return None;
    }
    Some(Arp {
        oper: be16(payload, 6)?,
        sha: bytes(payload, 8)?,
        spa: bytes(payload, 14)?,
        tha: bytes(payload, 18)?,
        tpa: bytes(payload, 24)?,
    })
}

/// Write a whole ARP frame from `arp.sha` to `dst`; returns [`ARP_FRAME_LEN`].
pub fn write_arp_frame(out: &mut [u8], dst: Mac, arp: &Arp) -> Option<usize> {
    let f = out.get_mut(..ARP_FRAME_LEN)?;
    let eth = Eth {
        dst,
        src: arp.sha,
        ethertype: ETHERTYPE_ARP,
    };
    write_eth(f, &eth)?;
    let p = &mut f[ETH_LEN..];
    p[..6].copy_from_slice(&ARP_PREFIX);
    p[6..8].copy_from_slice(&arp.oper.to_be_bytes());
    p[8..14].copy_from_slice(&arp.sha);
    p[14..18].copy_from_slice(&arp.spa);
    p[18..24].copy_from_slice(&arp.tha);
    p[24..28].copy_from_slice(&arp.tpa);
    Some(ARP_FRAME_LEN)
}

/// If `frame` is an ARP request for `ip`, write the reply of the host at
/// `mac`, `ip` into `out` (to the requester, unicast) and return its length.
/// `None` if the frame is anything else or `out` is too short.
pub fn arp_reply(frame: &[u8], mac: Mac, ip: Ipv4, out: &mut [u8]) -> Option<usize> {
    let (eth, payload) = parse_eth(frame)?;
    if eth.ethertype != ETHERTYPE_ARP {
        return None;
    }
    let req = parse_arp(payload)?;
    if !req.is_request_for(&ip) {
        return None;
    }
    write_arp_frame(out, req.sha, &req.reply(mac, ip))
}

/// One end of a UDP conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// IPv4 address.
    pub ip: Ipv4,
    /// UDP port.
    pub port: u16,
}

/// A received UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// Sender.
    pub src: Endpoint,
    /// Receiver.
    pub dst: Endpoint,
    /// The UDP payload.
    pub payload: &'a [u8],
}

/// Why an IPv4 packet is not an acceptable UDP datagram. Carries the
/// offending field where there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpError {
    /// Shorter than the headers it announces.
    Truncated,
    /// IP version other than 4.
    Version(u8),
    /// Header length (IHL, in 32-bit words) below 5.
    HeaderLength(u8),
    /// Total length shorter than the header or longer than the frame.
    TotalLength(u16),
    /// The header checksum does not verify.
    HeaderChecksum,
    /// Not UDP: this IP protocol number.
    Protocol(u8),
    /// A fragment (more-fragments flag or an offset): fragments are dropped.
    Fragment,
    /// UDP length field not equal to the IP payload length.
    UdpLength(u16),
    /// A non-zero UDP checksum that does not verify.
    UdpChecksum,
}

impl fmt::Display for IpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpError::Truncated => write!(f, "packet shorter than its headers"),
            IpError::Version(v) => write!(f, "IP version {v}, not 4"),
            IpError::HeaderLength(h) => write!(f, "IPv4 header length {h} words, below 5"),
            IpError::TotalLength(t) => write!(f, "IPv4 total length {t} does not fit header and frame"),
            IpError::HeaderChecksum => write!(f, "bad IPv4 header checksum"),
            IpError::Protocol(p) => write!(f, "IP protocol {p}, not UDP"),
            IpError::Fragment => write!(f, "IPv4 fragment (dropped)"),
            IpError::UdpLength(l) => write!(f, "UDP length {l} does not match the IP payload"),
            IpError::UdpChecksum => write!(f, "bad UDP checksum"),
        }
    }
}

/// Add `data` as big-endian 16-bit words (an odd last byte padded with
/// zero) to a ones'-complement sum kept unfolded in `acc`.
fn sum16(acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut acc = acc;
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Fold an unfolded sum to 16 bits (end-around carry).
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum (RFC 1071) of `data`: the ones' complement of the
/// ones'-complement sum of its 16-bit words. Over data that contains its
/// own correct checksum it is 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum16(0, data))
}

/// The unfolded sum of the UDP pseudo-header and `segment` (UDP header
/// and payload).
fn udp_sum(src: &Ipv4, dst: &Ipv4, segment: &[u8]) -> u64 {
    let mut acc = sum16(0, src);
    acc = sum16(acc, dst);
    acc += u64::from(PROTO_UDP) + segment.len() as u64;
    sum16(acc, segment)
}

/// Parse the payload of an IPv4 frame as a UDP datagram, checking
/// everything: version 4, IHL >= 5, total length within `packet`, header
/// checksum, protocol 17, no fragment, UDP length equal to the IP payload
/// length, and the UDP checksum unless it is zero (none sent). Options are
/// skipped; bytes after the total length (Ethernet padding) ignored.
pub fn parse_ipv4_udp(packet: &[u8]) -> Result<Datagram<'_>, IpError> {
    let first = *packet.first().ok_or(IpError::Truncated)?;
    if first >> 4 != 4 {
        return Err(IpError::Version(first >> 4));
    }
    let ihl = first & 0xf;
    if ihl < 5 {
        return Err(IpError::HeaderLength(ihl));
    }
    let hlen = usize::from(ihl) * 4;
    let header = packet.get(..hlen).ok_or(IpError::Truncated)?;
    let total = be16(header, 2).ok_or(IpError::Truncated)?;
    if usize::from(total) < hlen || usize::from(total) > packet.len() {
        return Err(IpError::TotalLength(total));
    }
    if internet_checksum(header) != 0 {
        return Err(IpError::HeaderChecksum);
    }
    if header[9] != PROTO_UDP {
        return Err(IpError::Protocol(header[9]));
    }
    // More fragments (0x2000) or a fragment offset (0x1fff).
    if be16(header, 6).ok_or(IpError::Truncated)? & 0x3fff != 0 {
        return Err(IpError::Fragment);
    }
    let src_ip: Ipv4 = bytes(header, 12).ok_or(IpError::Truncated)?;
    let dst_ip: Ipv4 = bytes(header, 16).ok_or(IpError::Truncated)?;
    let segment = packet.get(hlen..usize::from(total)).ok_or(IpError::Truncated)?;
    let udp = segment.get(..UDP_LEN).ok_or(IpError::Truncated)?;
    let ulen = be16(udp, 4).ok_or(IpError::Truncated)?;
    if usize::from(ulen) != segment.len() {
        return Err(IpError::UdpLength(ulen));
    }
    let sum = be16(udp, 6).ok_or(IpError::Truncated)?;
    if sum != 0 && !fold(udp_sum(&src_ip, &dst_ip, segment)) != 0 {
        return Err(IpError::UdpChecksum);
    }
    let port = |at| be16(udp, at).ok_or(IpError::Truncated);
    Ok(Datagram {
        src: Endpoint {
            ip: src_ip,
            port: port(0)?,
        },
        dst: Endpoint {
            ip: dst_ip,
            port: port(2)?,
        },
        payload: segment.get(UDP_LEN..).ok_or(IpError::Truncated)?,
    })
}

/// Write an IPv4 packet (no options, TTL 64, DF set, ID 0) carrying a UDP
/// datagram from `src` to `dst` with `payload`, with both checksums; returns
/// its length. `None` if `out` is too short or the payload too long for an
/// IPv4 packet.
pub fn write_ipv4_udp(out: &mut [u8], src: Endpoint, dst: Endpoint, payload: &[u8]) -> Option<usize> {
    let total = IPV4_LEN + UDP_LEN + payload.len();
    let total16 = u16::try_from(total).ok()?;
    let p = out.get_mut(..total)?;
    let (ip, segment) = p.split_at_mut(IPV4_LEN);
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&total16.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = TTL;
    ip[9] = PROTO_UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&src.ip);
    ip[16..20].copy_from_slice(&dst.ip);
    let sum = internet_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let ulen = total16 - IPV4_LEN as u16;
    segment[0..2].copy_from_slice(&src.port.to_be_bytes());
    segment[2..4].copy_from_slice(&dst.port.to_be_bytes());
    segment[4..6].copy_from_slice(&ulen.to_be_bytes());
    segment[6..8].copy_from_slice(&[0, 0]);
    segment[UDP_LEN..].copy_from_slice(payload);
    // A computed 0 is sent as 0xffff: 0 means "no checksum".
    let sum = match !fold(udp_sum(&src.ip, &dst.ip, segment)) {
        0 => 0xffff,
        s => s,
    };
    segment[6..8].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

/// Write a whole Ethernet frame carrying a UDP datagram (see
/// [`write_ipv4_udp`]); returns its length, [`UDP_HEADERS_LEN`] plus the
/// payload's.
pub fn write_udp_frame(out: &mut [u8], eth: (Mac, Mac), src: Endpoint, dst: Endpoint, payload: &[u8]) -> Option<usize> {
    let (src_mac, dst_mac) = eth;
    let header = Eth {
        dst: dst_mac,
        src: src_mac,
        ethertype: ETHERTYPE_IPV4,
    };
    if out.len() < ETH_LEN {
        return None;
    }
    let (h, rest) = out.split_at_mut(ETH_LEN);
    let n = write_ipv4_udp(rest, src, dst, payload)?;
    write_eth(h, &header)?;
    Some(ETH_LEN + n)
}

#[cfg(test)]
mod tests;
