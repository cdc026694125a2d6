//! The devices the VMM emulates (everything else is in-kernel KVM), on two
//! buses that the vCPU threads dispatch guest accesses through.
//!
//! Every device implements [`BusDevice`] (reads and writes at an offset
//! into its window) and sits on the port bus or the MMIO bus of
//! [`Devices`]. A device that works outside the vCPU threads or keeps
//! requests in flight also implements [`Quiesce`]: at a snapshot's pause
//! the machine quiesces it (it completes or records what is in flight and
//! stops touching guest memory) before its state is saved, and resumes it
//! with the vCPUs. Each device with state saves it through
//! [`crate::state::Persist`], next to its code.
//!
//! | ports        | device                                         |
//! |--------------|------------------------------------------------|
//! | 0x3f8-0x3ff  | COM1 16550A (guest console)                    |
//! | 0x501        | debug exit: a write powers the VM off with that code (QEMU isa-debug-exit) |
//! | 0x60, 0x64   | i8042 stub: reads 0, command 0xfe resets the VM |
//! | 0x600, 0x601 | ACPI sleep control/status: SLP_EN powers the VM off (guest `poweroff`) |
//!
//! The program embedding the VMM may add port devices of its own
//! ([`crate::machine::Attach`]). Reads of any other port or address return
//! all ones; writes are ignored.

pub mod legacy;
pub mod output;
pub mod serial;
pub mod virtio;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

pub use serial::SerialDevice;

/// Device errors; each names the device.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// Creating an event fd failed.
    #[error("cannot create the {what} event fd: {source}")]
    EventFd {
        /// Which device.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Saved device state could not be applied.
    #[error("invalid state of {device}: {why}")]
    State {
        /// Which device.
        device: String,
        /// What is wrong.
        why: String,
    },
    /// Two devices claim overlapping windows.
    #[error("{bus} bus: {new} at {base:#x} (+{len:#x}) overlaps {old}")]
    Overlap {
        /// "port" or "MMIO".
        bus: &'static str,
        /// The device being added.
        new: String,
        /// Its base.
        base: u64,
        /// Its length.
        len: u64,
        /// The device already there.
        old: String,
    },
    /// Wiring a device to KVM failed.
    #[error("{device}: {op} failed: {source}")]
    Kvm {
        /// Which device.
        device: String,
        /// The ioctl.
        op: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// A disk image.
    #[error(transparent)]
    Disk(#[from] virtio::disk::DiskError),
    /// A network's TAP device.
    #[error(transparent)]
    Tap(#[from] virtio::tap::TapError),
    /// The devices given to a restore do not fit the saved machine.
    #[error("{0}")]
    Mismatch(String),
    /// A device could not finish its in-flight work at a pause.
    #[error("{device} could not quiesce: {why}")]
    Quiesce {
        /// Which device.
        device: String,
        /// Why.
        why: String,
    },
}

/// How the guest asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStop {
    /// A write of `code` to the debug-exit port.
    PowerOff {
        /// The value written.
        code: u32,
    },
    /// An i8042 reset or a KVM system-reset event.
    Reset,
    /// A KVM system-shutdown event (e.g. ACPI power-off).
    Shutdown,
}

/// What a guest write asks of the vCPU that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOutcome {
    /// Nothing: the vCPU runs on.
    Done,
    /// The guest asked the VM to stop.
    Stop(GuestStop),
    /// The guest has nothing to do for up to this long: the vCPU thread
    /// sleeps (less when the VMM pauses or stops the vCPU).
    Idle(Duration),
}

/// A device on a bus: the guest reads and writes at offsets into its window.
pub trait BusDevice: Send + Sync {
    /// A name for messages.
    fn name(&self) -> String;
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> IoOutcome;
}

/// A device with work of its own beside the vCPUs (requests served on a
/// thread of its own, requests in flight): the snapshot pause must reach it.
pub trait Quiesce: Send + Sync {
    /// With every vCPU parked, before the device's state is saved:
    /// complete (or record, to resubmit after a restore) every request in
    /// flight, then stop touching guest memory and the device's backing
    /// files until [`Quiesce::resume`]. Pages the device wrote into guest
    /// memory were written through vm-memory, whose bitmap the machine's
    /// dirty set includes.
    fn quiesce(&self) -> Result<(), DeviceError>;
    /// After the pause: serve requests again.
    fn resume(&self);
}

struct Slot {
    base: u64,
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// An address space of devices (the port bus or the MMIO bus).
pub struct Bus {
    name: &'static str,
    /// Sorted by base; windows never overlap.
    slots: Vec<Slot>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for s in &self.slots {
            l.entry(&format_args!("{:#x}+{:#x} {}", s.base, s.len, s.device.name()));
        }
        l.finish()
    }
}

impl Bus {
    /// An empty bus called `name` in messages.
    pub fn new(name: &'static str) -> Bus {
        Bus {
            name,
            slots: Vec::new(),
        }
    }

    /// Put `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), DeviceError> {
        let end = base.saturating_add(len);
        if let Some(s) = self.slots.iter().find(|s| base < s.base + s.len && s.base < end) {
            return Err(DeviceError::Overlap {
                bus: self.name,
                new: device.name(),
                base,
                len,
                old: s.device.name(),
            });
        }
        let at = self.slots.partition_point(|s| s.base < base);
        self.slots.insert(at, Slot { base, len, device });
        Ok(())
    }

    /// The device whose window holds the whole access `[addr, addr + len)`,
    /// and the offset of `addr` in it.
    fn find(&self, addr: u64, len: usize) -> Option<(&dyn BusDevice, u64)> {
        let i = self.slots.partition_point(|s| s.base <= addr).checked_sub(1)?;
        let s = &self.slots[i];
        let off = addr - s.base;
        (off.checked_add(len as u64)? <= s.len).then_some((&*s.device, off))
    }

    /// A guest read at `addr`; all ones where no device answers.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((d, off)) => d.read(off, data),
            None => {
                tracing::trace!(bus = self.name, "read of unbacked address {addr:#x}");
                data.fill(0xff);
            }
        }
    }

    /// A guest write at `addr`; ignored where no device answers.
    pub fn write(&self, addr: u64, data: &[u8]) -> IoOutcome {
        match self.find(addr, data.len()) {
            Some((d, off)) => d.write(off, data),
            None => {
                tracing::trace!(bus = self.name, "write to unbacked address {addr:#x}");
                IoOutcome::Done
            }
        }
    }
}

/// The VMM's devices: the console, both buses, the virtio devices, and
/// the devices that take part in the snapshot pause.
pub struct Devices {
    /// COM1 (also on the port bus).
    pub serial: Arc<SerialDevice>,
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
    /// virtio devices, by slot (also on the MMIO bus).
    pub virtio: Vec<virtio::VirtioSlot>,
    /// Devices quiesced at a snapshot's pause, in this order.
    quiesce: Vec<Arc<dyn Quiesce>>,
    /// Where the devices' output waits for its epoch.
    pub output: Arc<output::OutputGate>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .finish_non_exhaustive()
    }
}

impl Devices {
    /// COM1 and the legacy stubs on the port bus (see the module table).
    pub fn new(serial: SerialDevice) -> Result<Devices, DeviceError> {
        let serial = Arc::new(serial);
        let mut pio = Bus::new("port");
        pio.insert(u64::from(serial::COM1_BASE), 8, serial.clone())?;
        legacy::insert_all(&mut pio)?;
        Ok(Devices {
            serial,
            pio,
            mmio: Bus::new("MMIO"),
            virtio: Vec::new(),
            quiesce: Vec::new(),
            output: output::OutputGate::passthrough(),
        })
    }

    /// Add a device that takes part in the snapshot pause.
    pub fn add_quiesce(&mut self, d: Arc<dyn Quiesce>) {
        self.quiesce.push(d);
    }

    /// Quiesce every device (see [`Quiesce`]); on failure the ones already
    /// quiesced are resumed.
    pub fn quiesce(&self) -> Result<(), DeviceError> {
        for (i, d) in self.quiesce.iter().enumerate() {
            if let Err(e) = d.quiesce() {
                self.quiesce[..i].iter().for_each(|d| d.resume());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Resume every device after [`Devices::quiesce`] (harmless otherwise).
    pub fn resume(&self) {
        self.quiesce.iter().for_each(|d| d.resume());
    }

    /// Add a virtio device in the next slot: on the MMIO bus, quiesced at
    /// pauses, served by its thread from now on.
    pub fn add_virtio(&mut self, slot: virtio::VirtioSlot) -> Result<(), DeviceError> {
        let t = slot.transport.clone();
        self.mmio
            .insert(virtio::slot_base(t.slot()), virtio::MMIO_WINDOW, t.clone())?;
        self.quiesce.push(t);
        self.virtio.push(slot);
        Ok(())
    }

    /// Stop the threads of the virtio devices (the vCPUs have stopped).
    pub fn stop_workers(&self) {
        self.virtio.iter().for_each(virtio::VirtioSlot::stop);
    }
}
