//! Encoding of virtio device state (docs/FORMAT.md, "Machine state
//! records"): a VIRTIO_MMIO record per slot (the transport's registers and
//! every queue) and one record of the device's own state (BLOCK or NET),
//! both indexed by the slot, field by field, little-endian.

use virtio_queue::QueueState;

use super::records::{Enc, Reader};
use super::{StateError, VirtioDeviceState, VirtioState};
use crate::devices::virtio::block::BlockState;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::net::NetState;

pub(super) const VIRTIO_MMIO: u16 = 0x0202;
pub(super) const BLOCK: u16 = 0x0203;
pub(super) const NET: u16 = 0x0204;

/// Bytes of one queue in a VIRTIO_MMIO record.
const QUEUE_BYTES: usize = 40;
/// Flags of a queue.
const READY: u32 = 1;
const EVENT_IDX: u32 = 2;
/// Flags of a transport.
const ACTIVATED: u32 = 1;
/// Flags of a block device.
const READONLY: u32 = 1;
/// Most slots a state may hold.
const MAX_SLOTS: usize = crate::devices::virtio::MAX_DEVICES;

fn transport(t: &TransportState) -> Vec<u8> {
    let mut p = Vec::with_capacity(48 + t.queues.len() * QUEUE_BYTES);
    for v in [
        t.device_type,
        t.status,
        t.device_features_sel,
        t.driver_features_sel,
        t.queue_sel,
        t.interrupt_status,
        t.config_generation,
        if t.activated { ACTIVATED } else { 0 },
    ] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(&t.driver_features.to_le_bytes());
    p.extend_from_slice(&(t.queues.len() as u32).to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    for q in &t.queues {
        p.extend_from_slice(&q.max_size.to_le_bytes());
        p.extend_from_slice(&q.size.to_le_bytes());
        p.extend_from_slice(&q.next_avail.to_le_bytes());
        p.extend_from_slice(&q.next_used.to_le_bytes());
        let flags = if q.ready { READY } else { 0 } | if q.event_idx_enabled { EVENT_IDX } else { 0 };
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        for a in [q.desc_table, q.avail_ring, q.used_ring] {
            p.extend_from_slice(&a.to_le_bytes());
        }
    }
    p
}

fn u16_of(r: &mut Reader<'_>) -> Result<u16, StateError> {
    let b = r.take(2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn decode_transport(p: &[u8]) -> Result<TransportState, StateError> {
    let mut r = Reader {
        b: p,
        what: "VIRTIO_MMIO",
    };
    let mut w = [0u32; 8];
    for v in &mut w {
        *v = r.u32()?;
    }
    let driver_features = r.u64()?;
    let n = r.u32()? as usize;
    r.u32()?;
    if r.b.len() != n * QUEUE_BYTES {
        return Err(StateError::Corrupt(format!(
            "VIRTIO_MMIO record says {n} queues but holds {} bytes of queues",
            r.b.len()
        )));
    }
    let mut queues = Vec::with_capacity(n);
    for _ in 0..n {
        let max_size = u16_of(&mut r)?;
        let size = u16_of(&mut r)?;
        let next_avail = u16_of(&mut r)?;
        let next_used = u16_of(&mut r)?;
        let flags = r.u32()?;
        r.u32()?;
        queues.push(QueueState {
            max_size,
            size,
            next_avail,
            next_used,
            ready: flags & READY != 0,
            event_idx_enabled: flags & EVENT_IDX != 0,
            desc_table: r.u64()?,
            avail_ring: r.u64()?,
            used_ring: r.u64()?,
        });
    }
    Ok(TransportState {
        device_type: w[0],
        status: w[1],
        device_features_sel: w[2],
        driver_features_sel: w[3],
        queue_sel: w[4],
        interrupt_status: w[5],
        config_generation: w[6],
        activated: w[7] & ACTIVATED != 0,
        driver_features,
        queues,
    })
}

fn block(b: &BlockState) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&b.bytes.to_le_bytes());
    p.extend_from_slice(&(if b.readonly { READONLY } else { 0 }).to_le_bytes());
    p.extend_from_slice(&b.id);
    p
}

fn decode_block(p: &[u8]) -> Result<BlockState, StateError> {
    let mut r = Reader { b: p, what: "BLOCK" };
    let bytes = r.u64()?;
    let flags = r.u32()?;
    let id = r.take(20)?;
    if !r.b.is_empty() {
        return Err(StateError::Corrupt(format!(
            "BLOCK record has {} bytes, expected 32",
            p.len()
        )));
    }
    let mut b = BlockState {
        bytes,
        readonly: flags & READONLY != 0,
        id: [0; 20],
    };
    b.id.copy_from_slice(id);
    Ok(b)
}

fn net(n: &NetState) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + n.tap.len());
    p.extend_from_slice(&n.mac);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&(n.tap.len() as u32).to_le_bytes());
    p.extend_from_slice(n.tap.as_bytes());
    p
}

fn decode_net(p: &[u8]) -> Result<NetState, StateError> {
    let mut r = Reader { b: p, what: "NET" };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(r.take(6)?);
    r.take(2)?;
    let tap = r
        .string()?
        .filter(|t| crate::devices::virtio::tap::valid_name(t))
        .ok_or_else(|| StateError::Corrupt("NET record holds no valid TAP name".into()))?;
    if !r.b.is_empty() {
        return Err(StateError::Corrupt(format!(
            "NET record has {} bytes too many",
            r.b.len()
        )));
    }
    Ok(NetState { mac, tap })
}

/// Encode every virtio device, slot by slot.
pub(super) fn encode(e: &mut Enc, devices: &[VirtioState]) {
    for (i, d) in devices.iter().enumerate() {
        let i = i as u16;
        e.rec(VIRTIO_MMIO, i, &transport(&d.transport));
        match &d.device {
            VirtioDeviceState::Block(b) => e.rec(BLOCK, i, &block(b)),
            VirtioDeviceState::Net(n) => e.rec(NET, i, &net(n)),
        }
    }
}

/// The virtio records of a state being decoded.
#[derive(Default)]
pub(super) struct Slots {
    transports: Vec<Option<TransportState>>,
    devices: Vec<Option<VirtioDeviceState>>,
}

impl Slots {
    /// Whether `tag` is a virtio record.
    pub(super) fn takes(&self, tag: u16) -> bool {
        matches!(tag, VIRTIO_MMIO | BLOCK | NET)
    }

    /// Take a virtio record for slot `index`.
    pub(super) fn record(&mut self, tag: u16, index: usize, p: &[u8]) -> Result<(), StateError> {
        if index >= MAX_SLOTS {
            return Err(StateError::Corrupt(format!("virtio slot {index} out of range")));
        }
        let grow = index + 1;
        if self.transports.len() < grow {
            self.transports.resize(grow, None);
            self.devices.resize(grow, None);
        }
        let twice = || StateError::Corrupt(format!("two records of tag {tag:#06x} for virtio slot {index}"));
        match tag {
            VIRTIO_MMIO => {
                if self.transports[index].replace(decode_transport(p)?).is_some() {
                    return Err(twice());
                }
            }
            _ => {
                let d = if tag == NET {
                    VirtioDeviceState::Net(decode_net(p)?)
                } else {
                    VirtioDeviceState::Block(decode_block(p)?)
                };
                if self.devices[index].replace(d).is_some() {
                    return Err(twice());
                }
            }
        }
        Ok(())
    }

    /// Every slot, each with its transport and its device.
    pub(super) fn finish(self) -> Result<Vec<VirtioState>, StateError> {
        self.transports
            .into_iter()
            .zip(self.devices)
            .enumerate()
            .map(|(i, (t, d))| match (t, d) {
                (Some(transport), Some(device)) => Ok(VirtioState { transport, device }),
                _ => Err(StateError::Corrupt(format!(
                    "virtio slot {i} lacks its VIRTIO_MMIO or device record"
                ))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{decode, encode as encode_state};

    fn slot() -> VirtioState {
        VirtioState {
            transport: TransportState {
                device_type: 2,
                status: 15,
                device_features_sel: 1,
                driver_features: (1 << 32) | (1 << 9),
                driver_features_sel: 1,
                queue_sel: 0,
                interrupt_status: 1,
                config_generation: 3,
                activated: true,
                queues: vec![QueueState {
                    max_size: 256,
                    size: 128,
                    next_avail: 77,
                    next_used: 76,
                    ready: true,
                    event_idx_enabled: false,
                    desc_table: 0x20_0000,
                    avail_ring: 0x20_1000,
                    used_ring: 0x20_2000,
                }],
            },
            device: VirtioDeviceState::Block(BlockState {
                bytes: 64 << 20,
                readonly: true,
                id: *b"consnap-disk-0\0\0\0\0\0\0",
            }),
        }
    }

    #[test]
    fn virtio_devices_round_trip_exactly() {
        let mut st = crate::state::codec::tests::sample();
        let mut net = slot();
        net.transport.device_type = 1;
        net.device = VirtioDeviceState::Net(NetState {
            mac: [0x52, 1, 2, 3, 4, 5],
            tap: "cs-tap0".into(),
        });
        st.devices.virtio = vec![slot(), slot(), net];
        st.devices.virtio[1].transport.queues[0].next_avail = 9;
        let back = decode(&encode_state(&st)).unwrap();
        assert_eq!(back.devices, st.devices);
    }

    #[test]
    fn damaged_virtio_records_are_refused() {
        let mut e = Enc(Vec::new());
        e.rec(VIRTIO_MMIO, 0, &transport(&slot().transport));
        // A transport without its device.
        let mut s = Slots::default();
        s.record(VIRTIO_MMIO, 0, &e.0[8..]).unwrap();
        assert!(s.finish().is_err());
        // A queue count that does not match the bytes.
        let mut p = transport(&slot().transport);
        p[40] = 3;
        assert!(decode_transport(&p).is_err());
        assert!(decode_block(&[0; 31]).is_err());
        let good = net(&NetState {
            mac: [0x52, 0, 0, 0, 0, 1],
            tap: "tap0".into(),
        });
        assert!(decode_net(&good).is_ok());
        assert!(decode_net(&good[..good.len() - 1]).is_err());
        let mut slash = good.clone();
        *slash.last_mut().unwrap() = b'/';
        assert!(decode_net(&slash).is_err(), "a TAP name with '/' is refused");
        assert!(decode_net(&[good.clone(), vec![0]].concat()).is_err());
        let mut s = Slots::default();
        assert!(
            s.record(
                BLOCK,
                MAX_SLOTS,
                &block(&BlockState {
                    bytes: 1,
                    readonly: false,
                    id: [0; 20]
                })
            )
            .is_err()
        );
    }
}
