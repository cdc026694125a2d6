//! The virtio-mmio transport, version 2: the registers the driver reads and
//! writes, the device's queues, and their saved state.
//!
//! Registers are 32-bit; the driver negotiates features, sets up each
//! queue (size and ring addresses, then ready) and sets DRIVER_OK, which
//! activates the device: its worker thread then serves the queues. A write
//! of 0 to the status register resets everything. Configuration space
//! (from 0x100) belongs to the device.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::pause::Pauser;
use super::{INT_USED, Interrupt, VirtioDevice};
use crate::devices::{BusDevice, DeviceError, IoOutcome};
use crate::memory::GuestRam;

const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// "CSNP", little-endian.
const VENDOR: u32 = 0x504e_5343;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the queue-notify register, where the ioeventfds listen.
pub const NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// The transport's registers and queues, as saved in every epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportState {
    /// The device behind it (virtio device id).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Device-features select.
    pub device_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Driver-features select.
    pub driver_features_sel: u32,
    /// Queue select.
    pub queue_sel: u32,
    /// Interrupt status register.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// The driver set DRIVER_OK and the device serves its queues.
    pub activated: bool,
    /// Every queue.
    pub queues: Vec<QueueState>,
}

#[derive(Debug)]
pub(super) struct Regs {
    status: u32,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    config_generation: u32,
    pub(super) activated: bool,
    pub(super) queues: Vec<Queue>,
}

/// A virtio device on the MMIO bus (see the module documentation).
pub struct MmioTransport {
    slot: usize,
    pub(super) device: Arc<dyn VirtioDevice>,
    regs: Mutex<Regs>,
    pub(super) interrupt: Interrupt,
    pub(super) ram: Arc<GuestRam>,
    /// One per queue; KVM signals them on a notify (ioeventfd).
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) pauser: Pauser,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("slot", &self.slot)
            .field("device", &self.device.name())
            .finish_non_exhaustive()
    }
}

fn new_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, DeviceError> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| {
            Queue::new(max).map_err(|e| DeviceError::State {
                device: device.name(),
                why: format!("queue of {max} entries: {e:?}"),
            })
        })
        .collect()
}

impl MmioTransport {
    /// A transport in reset state for `device` in slot `slot`, raising
    /// interrupts through `irqfd`.
    pub fn new(
        slot: usize,
        device: Arc<dyn VirtioDevice>,
        ram: Arc<GuestRam>,
        irqfd: EventFd,
    ) -> Result<MmioTransport, DeviceError> {
        let queues = new_queues(&*device)?;
        Self::assemble(
            slot,
            device,
            ram,
            Interrupt::new(irqfd, 0),
            Regs {
                status: 0,
                device_features_sel: 0,
                driver_features: 0,
                driver_features_sel: 0,
                queue_sel: 0,
                config_generation: 0,
                activated: false,
                queues,
            },
        )
    }

    fn assemble(
        slot: usize,
        device: Arc<dyn VirtioDevice>,
        ram: Arc<GuestRam>,
        interrupt: Interrupt,
        regs: Regs,
    ) -> Result<MmioTransport, DeviceError> {
        let queue_evts = (0..regs.queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DeviceError::EventFd {
                what: "virtio queue",
                source,
            })?;
        Ok(MmioTransport {
            slot,
            device,
            regs: Mutex::new(regs),
            interrupt,
            ram,
            queue_evts,
            pauser: Pauser::new()?,
        })
    }

    /// Rebuild a transport for `device` from `state`.
    pub fn restore(
        slot: usize,
        device: Arc<dyn VirtioDevice>,
        ram: Arc<GuestRam>,
        irqfd: EventFd,
        state: &TransportState,
    ) -> Result<MmioTransport, DeviceError> {
        let bad = |why: String| DeviceError::State {
            device: device.name(),
            why,
        };
        if state.device_type != device.device_type() {
            return Err(bad(format!(
                "saved as virtio device type {}, restored as type {}",
                state.device_type,
                device.device_type()
            )));
        }
        let max = device.queue_max_sizes();
        if state.queues.len() != max.len() {
            return Err(bad(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                max.len()
            )));
        }
        let mut queues = Vec::with_capacity(max.len());
        for (i, (q, &m)) in state.queues.iter().zip(max).enumerate() {
            if q.max_size != m {
                return Err(bad(format!(
                    "queue {i}: saved with {} entries at most, the device has {m}",
                    q.max_size
                )));
            }
            queues.push(Queue::try_from(*q).map_err(|e| bad(format!("queue {i}: {e:?}")))?);
        }
        Self::assemble(
            slot,
            device,
            ram,
            Interrupt::new(irqfd, state.interrupt_status),
            Regs {
                status: state.status,
                device_features_sel: state.device_features_sel,
                driver_features: state.driver_features,
                driver_features_sel: state.driver_features_sel,
                queue_sel: state.queue_sel,
                config_generation: state.config_generation,
                activated: state.activated,
                queues,
            },
        )
    }

    /// The registers and queues now (call with the worker paused).
    pub fn save(&self) -> TransportState {
        let r = self.regs();
        TransportState {
            device_type: self.device.device_type(),
            status: r.status,
            device_features_sel: r.device_features_sel,
            driver_features: r.driver_features,
            driver_features_sel: r.driver_features_sel,
            queue_sel: r.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: r.config_generation,
            activated: r.activated,
            queues: r.queues.iter().map(Queue::state).collect(),
        }
    }

    /// The slot it occupies.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The device behind it.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    pub(super) fn regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve queue `i` if the device is active; interrupt the driver if
    /// buffers were used and it wants to know. `quiet`: leave the driver's
    /// notifications off afterwards (the worker polls the queue a while).
    /// Returns whether buffers were used.
    pub(super) fn serve(&self, i: usize, quiet: bool) -> bool {
        let mut r = self.regs();
        if !r.activated || r.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return false;
        }
        let Some(q) = r.queues.get_mut(i).filter(|q| q.ready()) else {
            return false;
        };
        let mem = self.ram.memory();
        let stop = || self.pauser.pausing();
        let mut used = false;
        let result = self.device.process(i, q, mem, &stop).and_then(|u| {
            used = u;
            if quiet {
                q.disable_notification(mem)?;
            }
            if u { q.needs_notification(mem) } else { Ok(false) }
        });
        match result {
            Ok(true) => self.interrupt.raise(INT_USED),
            Ok(false) => {}
            Err(e) => {
                // The rings themselves are unusable (not a bad request,
                // which completes with an error status): stop serving
                // until the driver resets the device.
                tracing::warn!(device = %self.device.name(), "virtio queue {i} failed: {e:?}; the device needs a reset");
                r.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                r.config_generation = r.config_generation.wrapping_add(1);
                self.interrupt.raise(super::INT_CONFIG);
            }
        }
        used
    }

    /// Whether queue `i` holds chains the device has not taken yet (read
    /// from the ring: no notification needed).
    pub(super) fn has_new(&self, i: usize) -> bool {
        let r = self.regs();
        if !r.activated {
            return false;
        }
        let mem = self.ram.memory();
        r.queues.get(i).filter(|q| q.ready()).is_some_and(|q| {
            q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != q.next_avail())
        })
    }

    fn reset(&self, r: &mut Regs) {
        match new_queues(&*self.device) {
            Ok(q) => r.queues = q,
            Err(e) => tracing::warn!("{e}"),
        }
        r.status = 0;
        r.device_features_sel = 0;
        r.driver_features = 0;
        r.driver_features_sel = 0;
        r.queue_sel = 0;
        r.activated = false;
        self.interrupt.clear();
    }

    /// The driver writes the status register.
    fn set_status(&self, r: &mut Regs, v: u32) {
        if v == 0 {
            self.reset(r);
            return;
        }
        let mut v = v;
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && r.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            // Features are OK only as a subset of the device's, with VERSION_1.
            let offered = self.device.features();
            if r.driver_features & !offered != 0 || r.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !r.activated {
            if v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                v |= VIRTIO_CONFIG_S_FAILED;
            } else if self.activate(r) {
                r.activated = true;
                self.pauser.kick();
            } else {
                v |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        r.status = v;
    }

    /// Check the ready queues and switch on what the driver negotiated.
    fn activate(&self, r: &mut Regs) -> bool {
        let mem = self.ram.memory();
        let event_idx = r.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (i, q) in r.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(mem) {
                tracing::warn!(device = %self.device.name(), "queue {i} lies outside guest RAM or is misaligned");
                return false;
            }
        }
        true
    }

    fn selected(r: &mut Regs) -> Option<&mut Queue> {
        let i = r.queue_sel as usize;
        r.queues.get_mut(i)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let mut r = self.regs();
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match r.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => Self::selected(&mut r).map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => Self::selected(&mut r).map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => r.status,
            reg::CONFIG_GENERATION => r.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&self, offset: u64, v: u32) {
        let mut r = self.regs();
        let setting_up =
            |r: &Regs| r.status & VIRTIO_CONFIG_S_DRIVER != 0 && r.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => r.device_features_sel = v,
            reg::DRIVER_FEATURES if setting_up(&r) => match r.driver_features_sel {
                0 => r.driver_features = (r.driver_features & !0xffff_ffff) | u64::from(v),
                1 => r.driver_features = (r.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            reg::DRIVER_FEATURES_SEL => r.driver_features_sel = v,
            reg::QUEUE_SEL => r.queue_sel = v,
            reg::QUEUE_NOTIFY => {
                // Only when the ioeventfd did not take it (another width or value).
                if let Some(e) = self.queue_evts.get(v as usize)
                    && let Err(e) = e.write(1)
                {
                    tracing::warn!("virtio notify lost: {e}");
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(&mut r, v),
            _ if r.activated => {
                tracing::debug!(device = %self.device.name(), "write to {offset:#x} after DRIVER_OK ignored");
            }
            reg::QUEUE_NUM | reg::QUEUE_READY | reg::QUEUE_DESC_LOW..=reg::QUEUE_USED_HIGH => {
                if let Some(q) = Self::selected(&mut r) {
                    Self::write_queue(q, offset, v);
                }
            }
            _ => tracing::debug!(device = %self.device.name(), "write to {offset:#x} ignored"),
        }
    }

    fn write_queue(q: &mut Queue, offset: u64, v: u32) {
        if offset == reg::QUEUE_READY {
            q.set_ready(v == 1);
            return;
        }
        if q.ready() {
            return;
        }
        let (lo, hi) = (Some(v), None);
        match offset {
            reg::QUEUE_NUM => q.set_size(v as u16),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
            reg::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_USED_LOW => q.set_used_ring_address(lo, hi),
            reg::QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    /// Where each queue's rings are, for tests and messages.
    pub fn queue_addresses(&self, i: usize) -> Option<(GuestAddress, GuestAddress, GuestAddress)> {
        let r = self.regs();
        r.queues.get(i).map(|q| {
            (
                GuestAddress(q.desc_table()),
                GuestAddress(q.avail_ring()),
                GuestAddress(q.used_ring()),
            )
        })
    }
}

impl BusDevice for MmioTransport {
    fn name(&self) -> String {
        format!("virtio-mmio slot {} ({})", self.slot, self.device.name())
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(b) if offset.is_multiple_of(4) => *b = self.read_reg(offset).to_le_bytes(),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> IoOutcome {
        match <[u8; 4]>::try_from(data) {
            Ok(b) if offset < reg::CONFIG && offset.is_multiple_of(4) => self.write_reg(offset, u32::from_le_bytes(b)),
            _ => tracing::debug!(device = %self.device.name(), "{}-byte write to {offset:#x} ignored", data.len()),
        }
        IoOutcome::Done
    }
}
