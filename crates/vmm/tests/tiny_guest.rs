//! kvm-ioctls-style tests: a few bytes of guest code in a minimal PVH ELF,
//! run through the real loader, vCPU threads and devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use vmm::boot::{BootConfig, KernelSource};
use vmm::devices::GuestStop;
use vmm::machine::{Attach, Machine};
use vmm::run::RunEnd;
use vmm::testing::{Capture, kvm_ready};
use vmm::vcpu::{PauseAction, VcpuError};

const LOAD: u64 = vmm::testing::LOAD;

fn machine(code: &[u8], vcpus: u8, out: Capture) -> Machine {
    let boot = BootConfig {
        kernel: KernelSource::Bytes {
            name: "tiny".into(),
            image: vmm::testing::pvh_elf(code),
        },
        initrd: None,
        cmdline: String::new(),
        vcpus,
    };
    Machine::boot(32 << 20, &boot, Attach::console(Box::new(out))).unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn serial_output_and_debug_exit() {
    if !kvm_ready() {
        return;
    }
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov $0x3f8, %dx
        0xb0, b'h', 0xee, // mov $'h', %al; out %al, (%dx)
        0xb0, b'i', 0xee, // mov $'i', %al; out
        0x66, 0xba, 0x01, 0x05, // mov $0x501, %dx
        0xb0, 42, 0xee, // mov $42, %al; out
        0xf4, 0xeb, 0xfd, // hlt; jmp .-1
    ];
    let out = Capture::default();
    let mut m = machine(&code, 1, out.clone());
    let end = vmm::run::run(&mut m, &mut []).unwrap();
    assert!(
        matches!(end, RunEnd::Guest(GuestStop::PowerOff { code: 42 })),
        "{end:?}"
    );
    assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn pause_kicks_a_spinning_vcpu_and_saves_its_registers() {
    if !kvm_ready() {
        return;
    }
    // loop: inc %eax; jmp loop
    let code = [0x40, 0xeb, 0xfd];
    let mut m = machine(&code, 2, Capture::default());
    m.start().unwrap();
    let p1 = m.pause(PauseAction::SaveState).unwrap();
    let a = p1.states[0].regs.rax;
    let st = m.save_state(p1).unwrap();
    assert_eq!(st.vcpus.len(), 2);
    assert!(!st.vcpus[0].msrs.is_empty());
    // The encoded state decodes to the same bytes.
    let bytes = vmm::state::encode(&st);
    assert_eq!(vmm::state::encode(&vmm::state::decode(&bytes).unwrap()), bytes);
    m.resume().unwrap();
    // Pause again until the guest has run on: every pause must stop the
    // spinning vCPU (a kick), however long the host takes to schedule it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let p2 = loop {
        std::thread::sleep(Duration::from_millis(1));
        let p = m.pause(PauseAction::SaveState).unwrap();
        // A kick takes microseconds; only a very loaded host needs more.
        assert!(p.latency < Duration::from_secs(5), "pause took {:?}", p.latency);
        if p.states[0].regs.rax != a {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not advance after resume (rax {a:#x})"
        );
        m.resume().unwrap();
    };
    let b = p2.states[0].regs.rax;
    assert!(b > a, "guest went backwards between pauses ({a} -> {b})");
    // The application processor never got a SIPI: it stays in wait-for-SIPI.
    assert_eq!(p2.states[1].mp_state.mp_state, kvm_bindings::KVM_MP_STATE_UNINITIALIZED);
    m.resume().unwrap();
    m.stop();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn triple_fault_is_reported_with_rip() {
    if !kvm_ready() {
        return;
    }
    // ud2 with no IDT: #UD cannot be delivered, then #DF, then shutdown.
    let code = [0x90, 0x0f, 0x0b];
    let mut m = machine(&code, 1, Capture::default());
    match vmm::run::run(&mut m, &mut []).unwrap() {
        RunEnd::Error(VcpuError::TripleFault { vcpu: 0, rip }) => assert_eq!(rip, LOAD + 1),
        other => panic!("expected a triple fault, got {other:?}"),
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn guest_cpuid_has_topology_and_hides_what_the_host_cannot_run() {
    if !kvm_ready() {
        return;
    }
    // mov $1,%eax; cpuid; then print EBX and ECX on COM1, byte by byte; exit.
    let mut code = vec![0xb8, 1, 0, 0, 0, 0x0f, 0xa2, 0x66, 0xba, 0xf8, 0x03];
    for reg_to_eax in [[0x89, 0xd8], [0x89, 0xc8]] {
        code.extend_from_slice(&reg_to_eax); // mov %ebx/%ecx, %eax
        for _ in 0..4 {
            code.extend_from_slice(&[0xee, 0xc1, 0xe8, 0x08]); // out %al,(%dx); shr $8,%eax
        }
    }
    code.extend_from_slice(&[0x66, 0xba, 0x01, 0x05, 0xb0, 0, 0xee, 0xf4]);
    let out = Capture::default();
    let mut m = machine(&code, 2, out.clone());
    let end = vmm::run::run(&mut m, &mut []).unwrap();
    assert!(matches!(end, RunEnd::Guest(GuestStop::PowerOff { code: 0 })), "{end:?}");
    let b = out.0.lock().unwrap().clone();
    assert_eq!(b.len(), 8);
    let ebx = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let ecx = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    assert_eq!(ebx >> 24, 0, "APIC ID of vCPU 0");
    assert_eq!((ebx >> 16) & 0xff, 2, "logical processor count");
    assert_ne!(ecx & (1 << 31), 0, "hypervisor bit");
    if vmm::cpuid::kvm_pvm() {
        assert_eq!(ecx & (1 << 13), 0, "CMPXCHG16B must be hidden on kvm_pvm");
    }
}
