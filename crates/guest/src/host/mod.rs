//! What the host knows of the workload guest: its status page (ops done,
//! checksum), the check of its memory against the host's own computation,
//! and the idle port it uses instead of `hlt` (it runs in ring 3). The VMM
//! knows none of it: [`attach`] hands the idle port and the progress
//! counter to a machine through [`vmm::machine::Attach`].

pub mod check;
pub mod status;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use vmm::devices::{BusDevice, IoOutcome};
use vmm::machine::{Attach, PortDevice, ProgressCounter};
use vmm::memory::GuestRam;
use vmm::state::MachineConfig;
use workload::abi;

/// The name the machine records for the embedded image (its `kernel`).
pub const KERNEL_NAME: &str = "embedded workload guest";

/// The paravirtual idle port (`workload::abi::IDLE_PORT`): a 16-bit read
/// returns [`abi::IDLE_MAGIC`] (the guest's test for it), a 16-bit write
/// of N makes the vCPU idle for N µs (at most [`abi::IDLE_MAX_US`]).
#[derive(Debug)]
pub struct IdlePort;

impl BusDevice for IdlePort {
    fn name(&self) -> String {
        "workload guest idle port".into()
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        match data {
            [lo, hi] if offset == 0 => [*lo, *hi] = abi::IDLE_MAGIC.to_le_bytes(),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> IoOutcome {
        match data {
            [lo, hi] if offset == 0 => {
                let us = u16::from_le_bytes([*lo, *hi]).min(abi::IDLE_MAX_US);
                IoOutcome::Idle(Duration::from_micros(u64::from(us)))
            }
            _ => IoOutcome::Done,
        }
    }
}

/// The ops the guest has done, summed over its vCPUs, from its status page.
#[derive(Debug)]
pub struct OpsDone;

impl ProgressCounter for OpsDone {
    fn read(&self, ram: &GuestRam) -> Option<u64> {
        status::read(ram).map(|s| s.ops_done)
    }
}

/// What a machine running the workload guest needs attached: the console,
/// the idle port and the ops counter.
pub fn attach(serial_out: Box<dyn Write + Send>) -> Attach {
    Attach {
        ports: vec![PortDevice {
            base: abi::IDLE_PORT,
            len: 2,
            device: Arc::new(IdlePort),
        }],
        progress: Some(Arc::new(OpsDone)),
        ..Attach::console(serial_out)
    }
}

/// The workload spec of a machine that runs the workload guest (its
/// command line without the words that announce devices), `None` for any
/// other kernel.
pub fn workload_of(cfg: &MachineConfig) -> Option<String> {
    let cmdline = cfg.cmdline.as_deref().filter(|_| cfg.kernel == KERNEL_NAME)?;
    let words: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("virtio_mmio."))
        .collect();
    Some(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_port_answers_its_magic_and_caps_its_wait() {
        let mut b = [0u8; 2];
        IdlePort.read(0, &mut b);
        assert_eq!(u16::from_le_bytes(b), abi::IDLE_MAGIC);
        let mut one = [0u8; 1];
        IdlePort.read(0, &mut one);
        assert_eq!(one, [0xff]);
        assert_eq!(
            IdlePort.write(0, &60_000u16.to_le_bytes()),
            IoOutcome::Idle(Duration::from_micros(u64::from(abi::IDLE_MAX_US)))
        );
        assert_eq!(IdlePort.write(0, &[1]), IoOutcome::Done);
    }
}
