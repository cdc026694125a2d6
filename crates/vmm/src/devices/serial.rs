//! COM1: a 16550A UART (vm-superio) on ports 0x3f8-0x3ff, IRQ 4.

use std::io::Write;
use std::sync::Mutex;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, DeviceError, IoOutcome};
use crate::state::Persist;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Legacy IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// The serial console.
pub struct SerialDevice {
    uart: Mutex<Uart>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART in reset state whose output goes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Mutex::new(Serial::new(IrqTrigger(irq), out)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Guest reads register `offset`.
    pub fn read(&self, offset: u8) -> u8 {
        self.lock().read(offset)
    }

    /// Guest writes register `offset`.
    pub fn write(&self, offset: u8, value: u8) {
        if let Err(e) = self.lock().write(offset, value) {
            tracing::warn!("serial write failed: {e:?}");
        }
    }

    /// Queue terminal input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        self.lock().enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flush guest output.
    pub fn flush(&self) {
        let _ = self.lock().writer_mut().flush();
    }
}

/// One-byte accesses to the eight registers; anything wider reads all
/// ones and is ignored.
impl BusDevice for SerialDevice {
    fn name(&self) -> String {
        "COM1".into()
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        match data {
            [b] => *b = SerialDevice::read(self, offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> IoOutcome {
        if let [b] = data {
            SerialDevice::write(self, offset as u8, *b);
        }
        IoOutcome::Done
    }
}

/// COM1's registers and pending input; its output writer and interrupt fd are
/// the restore arguments.
impl Persist for SerialDevice {
    type State = SerialState;
    type Args = (EventFd, Box<dyn Write + Send>);
    type Error = DeviceError;

    fn save(&self) -> Result<SerialState, DeviceError> {
        Ok(self.lock().state())
    }

    fn restore((irq, out): Self::Args, state: &SerialState) -> Result<Self, DeviceError> {
        let uart = Serial::from_state(state, IrqTrigger(irq), NoEvents, out).map_err(|e| DeviceError::State {
            device: "COM1".into(),
            why: format!("{e:?}"),
        })?;
        Ok(Self { uart: Mutex::new(uart) })
    }
}
