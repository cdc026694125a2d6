//! The kv wire format: requests and replies as UDP payloads, all integers
//! little-endian (see the [parent module](super)).

/// Bytes of a request's UDP payload.
pub const REQUEST_LEN: usize = 25;

/// Bytes of a reply's UDP payload.
pub const REPLY_LEN: usize = 24;

/// The reply value of a put that was not applied.
pub const REFUSED: u64 = u64::MAX;

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Store `value` under `key`.
    Put = 1,
    /// Read the value under `key`.
    Get = 2,
    /// Flush, answer with the checksum and let the guest power off.
    Stop = 3,
    /// Throughput out of the guest: answer with `key` datagrams (at most
    /// [`MAX_STREAM`]) of `value` payload bytes each ([`REPLY_LEN`] to
    /// [`MAX_PAYLOAD`]), each starting with a reply whose `value` is its
    /// index. Changes nothing.
    Send = 4,
    /// Throughput into the guest: a request of [`REQUEST_LEN`] to
    /// [`MAX_PAYLOAD`] bytes, whose bytes are counted; answered only when
    /// `value` is 1, with the bytes counted so far. Changes nothing.
    Sink = 5,
}

/// Most datagrams one send request asks for.
pub const MAX_STREAM: u64 = 1 << 20;
/// Largest UDP payload in one Ethernet frame (1500 − 20 − 8).
pub const MAX_PAYLOAD: usize = 1472;

impl Op {
    /// The op with this wire code.
    pub fn from_code(code: u8) -> Option<Op> {
        match code {
            1 => Some(Op::Put),
            2 => Some(Op::Get),
            3 => Some(Op::Stop),
            4 => Some(Op::Send),
            5 => Some(Op::Sink),
            _ => None,
        }
    }
}

/// A little-endian u64 of `b` at `at`.
pub(super) fn le64(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    bytes.try_into().ok().map(u64::from_le_bytes)
}

/// A request, as a client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the client; echoed in the reply.
    pub seq: u64,
    /// What to do.
    pub op: Op,
    /// The key (any value, 0 included).
    pub key: u64,
    /// The value to put (ignored by get and stop).
    pub value: u64,
}

impl Request {
    /// Parse a UDP payload: exactly [`REQUEST_LEN`] bytes and a known op
    /// (a sink request may be longer, up to [`MAX_PAYLOAD`]).
    pub fn parse(payload: &[u8]) -> Option<Request> {
        if payload.len() < REQUEST_LEN || payload.len() > MAX_PAYLOAD {
            return None;
        }
        let r = Request {
            seq: le64(payload, 0)?,
            op: Op::from_code(*payload.get(8)?)?,
            key: le64(payload, 9)?,
            value: le64(payload, 17)?,
        };
        (payload.len() == REQUEST_LEN || r.op == Op::Sink).then_some(r)
    }

    /// The payload that carries this request.
    pub fn to_bytes(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8] = self.op as u8;
        b[9..17].copy_from_slice(&self.key.to_le_bytes());
        b[17..].copy_from_slice(&self.value.to_le_bytes());
        b
    }
}

/// A reply, as the server sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The request's `seq`.
    pub seq: u64,
    /// See the [module documentation](super): the stored value, [`REFUSED`],
    /// or the checksum.
    pub value: u64,
    /// Puts applied so far.
    pub applied: u64,
}

impl Reply {
    /// Parse a UDP payload of exactly [`REPLY_LEN`] bytes.
    pub fn parse(payload: &[u8]) -> Option<Reply> {
        if payload.len() != REPLY_LEN {
            return None;
        }
        Some(Reply {
            seq: le64(payload, 0)?,
            value: le64(payload, 8)?,
            applied: le64(payload, 16)?,
        })
    }

    /// The payload that carries this reply.
    pub fn to_bytes(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.value.to_le_bytes());
        b[16..].copy_from_slice(&self.applied.to_le_bytes());
        b
    }
}
