//! Stateless port devices a PC guest expects: QEMU's debug exit, the
//! i8042's reset command and the ACPI sleep registers.

use std::sync::Arc;

use super::{Bus, BusDevice, DeviceError, GuestStop, IoOutcome};
use crate::boot::acpi::{SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, SLP_EN};

/// Port of the debug-exit device (QEMU's `isa-debug-exit`).
pub const DEBUG_EXIT_PORT: u16 = 0x501;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// A write powers the VM off with the value written as its exit code.
#[derive(Debug)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn name(&self) -> String {
        "debug exit".into()
    }
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&self, _offset: u64, data: &[u8]) -> IoOutcome {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        IoOutcome::Stop(GuestStop::PowerOff {
            code: u32::from_le_bytes(v),
        })
    }
}

/// The i8042 keyboard controller, as far as a reset goes: reads 0, and
/// command 0xfe resets the VM.
#[derive(Debug)]
pub struct I8042 {
    command_port: bool,
}

impl BusDevice for I8042 {
    fn name(&self) -> String {
        "i8042".into()
    }
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, data: &[u8]) -> IoOutcome {
        if self.command_port && data.first() == Some(&I8042_RESET) {
            IoOutcome::Stop(GuestStop::Reset)
        } else {
            IoOutcome::Done
        }
    }
}

/// The ACPI sleep control and status registers of the FADT: SLP_EN
/// written to control powers the VM off.
#[derive(Debug)]
pub struct AcpiSleep;

impl BusDevice for AcpiSleep {
    fn name(&self) -> String {
        "ACPI sleep registers".into()
    }
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, offset: u64, data: &[u8]) -> IoOutcome {
        if offset == 0 && data.first().is_some_and(|v| v & SLP_EN != 0) {
            IoOutcome::Stop(GuestStop::Shutdown)
        } else {
            IoOutcome::Done
        }
    }
}

/// Put every legacy device on the port bus.
pub(super) fn insert_all(pio: &mut Bus) -> Result<(), DeviceError> {
    pio.insert(u64::from(DEBUG_EXIT_PORT), 1, Arc::new(DebugExit))?;
    pio.insert(u64::from(I8042_DATA), 1, Arc::new(I8042 { command_port: false }))?;
    pio.insert(u64::from(I8042_CMD), 1, Arc::new(I8042 { command_port: true }))?;
    debug_assert_eq!(SLEEP_STATUS_PORT, SLEEP_CONTROL_PORT + 1);
    pio.insert(u64::from(SLEEP_CONTROL_PORT), 2, Arc::new(AcpiSleep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_bus_routes_to_the_legacy_devices() {
        let mut pio = Bus::new("port");
        insert_all(&mut pio).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pio.write(0x501, &[7]), IoOutcome::Stop(GuestStop::PowerOff { code: 7 }));
        assert_eq!(pio.write(0x64, &[0xfe]), IoOutcome::Stop(GuestStop::Reset));
        assert_eq!(pio.write(0x60, &[0xfe]), IoOutcome::Done);
        assert_eq!(pio.write(0x600, &[SLP_EN]), IoOutcome::Stop(GuestStop::Shutdown));
        assert_eq!(pio.write(0x601, &[SLP_EN]), IoOutcome::Done);
        let mut b = [1u8; 1];
        pio.read(0x64, &mut b);
        assert_eq!(b, [0]);
        // Nothing there, or an access that runs past a window: all ones.
        let mut w = [0u8; 2];
        pio.read(0x700, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        pio.read(0x501, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        assert_eq!(pio.write(0x700, &[1]), IoOutcome::Done);
    }

    #[test]
    fn overlapping_windows_are_refused() {
        let mut pio = Bus::new("port");
        insert_all(&mut pio).unwrap_or_else(|e| panic!("{e}"));
        let e = pio.insert(0x600, 4, Arc::new(DebugExit)).err();
        assert!(
            matches!(&e, Some(DeviceError::Overlap { old, .. }) if old == "ACPI sleep registers"),
            "{e:?}"
        );
        pio.insert(0x602, 2, Arc::new(DebugExit))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
