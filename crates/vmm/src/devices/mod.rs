//! Port-I/O devices emulated by the VMM (everything else is in-kernel KVM).
//!
//! | ports        | device                                         |
//! |--------------|------------------------------------------------|
//! | 0x3f8-0x3ff  | COM1 16550A (guest console)                    |
//! | 0x501        | debug exit: a write powers the VM off with that code (QEMU isa-debug-exit) |
//! | 0x60, 0x64   | i8042 stub: reads 0, command 0xfe resets the VM |
//! | 0x600, 0x601 | ACPI sleep control/status: SLP_EN powers the VM off (guest `poweroff`) |
//!
//! Reads of any other port return all ones; writes are ignored. The
//! debug-exit and i8042 stubs hold no state; COM1's state is saved through
//! [`crate::state::Persist`].

pub mod serial;

use thiserror::Error;

pub use serial::SerialDevice;

/// Debug-exit port.
pub const DEBUG_EXIT_PORT: u16 = workload::abi::DEBUG_EXIT_PORT;
/// The idle port (see [`workload::abi::IDLE_PORT`]); writes are handled by
/// the vCPU thread itself, which sleeps.
pub const IDLE_PORT: u16 = workload::abi::IDLE_PORT;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Device errors.
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
    #[error("invalid device state: {0}")]
    State(String),
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

/// The VMM's port-I/O devices.
#[derive(Debug)]
pub struct Devices {
    /// COM1.
    pub serial: SerialDevice,
}

impl Devices {
    /// Dispatch a guest IN.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (serial::COM1_BASE..serial::COM1_BASE + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.read((p - serial::COM1_BASE) as u8);
            }
            IDLE_PORT if data.len() == 2 => data.copy_from_slice(&workload::abi::IDLE_MAGIC.to_le_bytes()),
            I8042_DATA | I8042_CMD => data.fill(0),
            crate::boot::acpi::SLEEP_CONTROL_PORT | crate::boot::acpi::SLEEP_STATUS_PORT => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// Dispatch a guest OUT; returns a stop request if the guest asked for one.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestStop> {
        match port {
            p if (serial::COM1_BASE..serial::COM1_BASE + 8).contains(&p) && data.len() == 1 => {
                self.serial.write((p - serial::COM1_BASE) as u8, data[0]);
                None
            }
            DEBUG_EXIT_PORT => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                self.serial.flush();
                Some(GuestStop::PowerOff {
                    code: u32::from_le_bytes(v),
                })
            }
            p if p == crate::boot::acpi::SLEEP_CONTROL_PORT
                && data.first().is_some_and(|v| v & crate::boot::acpi::SLP_EN != 0) =>
            {
                self.serial.flush();
                Some(GuestStop::Shutdown)
            }
            I8042_CMD if data.first() == Some(&I8042_RESET) => {
                self.serial.flush();
                Some(GuestStop::Reset)
            }
            _ => None,
        }
    }
}
