//! Machine state at the `vmm` level, without the store, in the style of
//! kvm-ioctls' tests (a few bytes of 32-bit guest code in a PVH ELF):
//! KVM's dirty log reports exactly the pages the guest wrote; a machine
//! saved, torn down and restored continues where it stopped; every
//! component's `Persist` round trip gives back what it saved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::boot::{BootConfig, KernelSource};
use vmm::devices::{GuestStop, SerialDevice};
use vmm::machine::{Attach, Machine};
use vmm::memory::GuestRam;
use vmm::state::{MachineState, Persist};
use vmm::testing::kvm_ready;
use vmm::vcpu::{PauseAction, VcpuEvent};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 32 << 20;

fn machine(code: &[u8], vcpus: u8) -> Machine {
    let boot = BootConfig {
        kernel: KernelSource::Bytes {
            name: "tiny".into(),
            image: vmm::testing::pvh_elf(code),
        },
        initrd: None,
        cmdline: String::new(),
        vcpus,
    };
    Machine::boot(MEM, &boot, Attach::console(Box::new(std::io::sink()))).unwrap()
}

/// `mov dword [addr], value` in 32-bit code.
fn store32(addr: u32, value: u32) -> Vec<u8> {
    let mut v = vec![0xc7, 0x05];
    v.extend_from_slice(&addr.to_le_bytes());
    v.extend_from_slice(&value.to_le_bytes());
    v
}

/// Spin until `dword [addr]` is non-zero.
fn wait_nonzero(addr: u32) -> Vec<u8> {
    let mut v = vec![0x83, 0x3d];
    v.extend_from_slice(&addr.to_le_bytes());
    v.extend_from_slice(&[0x00, 0x74, 0xf7]); // cmp ..., 0; je back to the cmp
    v
}

/// `out` of `code` to the debug-exit port, then `hlt`.
fn exit(code: u8) -> Vec<u8> {
    vec![0x66, 0xba, 0x01, 0x05, 0xb0, code, 0xee, 0xf4]
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_stop(m: &Machine) -> GuestStop {
    match m.next_event(Duration::from_secs(30)) {
        Some(VcpuEvent::Stop { how, .. }) => how,
        other => panic!("expected the guest to stop, got {other:?}"),
    }
}

fn frames(d: &vmm::dirty::DirtySet) -> Vec<u64> {
    d.ranges[0].iter().collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dirty_log_reports_exactly_the_pages_written() {
    if !kvm_ready() {
        return;
    }
    let mut code = Vec::new();
    code.extend(store32(0x20_0000, 1));
    code.extend(store32(0x20_1008, 2));
    code.extend(store32(0x30_5ff0, 3));
    code.extend(wait_nonzero(0x40_0000));
    code.extend(store32(0x20_0000, 4));
    code.extend(store32(0x7f_f000, 5));
    code.extend(exit(0));
    let mut m = machine(&code, 1);
    m.set_dirty_logging(true).unwrap();
    // The loader's own writes (kernel image, boot tables) are VMM writes: forget them.
    drop(m.take_dirty().unwrap());
    m.start().unwrap();
    wait_for("the first three stores", || m.ram().read_u32(0x30_5ff0) == Some(3));
    assert_eq!(frames(&m.take_dirty().unwrap()), vec![0x200, 0x201, 0x305]);
    // Nothing was written since: the log was cleared and re-armed.
    assert_eq!(frames(&m.take_dirty().unwrap()), Vec::<u64>::new());
    // A VMM write (through vm-memory) shows up as well as the guest's.
    m.ram().memory().write_obj(1u32, GuestAddress(0x40_0000)).unwrap();
    assert!(matches!(wait_stop(&m), GuestStop::PowerOff { code: 0 }));
    assert_eq!(frames(&m.take_dirty().unwrap()), vec![0x200, 0x400, 0x7ff]);
    // A page handed back is reported once more.
    let mut back = vmm::dirty::DirtySet::empty(m.ram().ranges());
    back.ranges[0].set(0x123);
    m.mark_dirty(&back);
    assert_eq!(frames(&m.take_dirty().unwrap()), vec![0x123]);
    assert_eq!(frames(&m.take_dirty().unwrap()), Vec::<u64>::new());
    m.stop();
}

/// A guest that counts in ECX and in memory, and records how often it
/// started: `inc dword [0x300000]` once, then loop `inc ecx; mov [0x200000], ecx;
/// cmp ecx, N; jne loop`, then exits with code 7.
fn counter_guest(n: u32) -> Vec<u8> {
    let mut code = vec![0xff, 0x05, 0x00, 0x00, 0x30, 0x00]; // inc dword [0x300000]
    code.extend_from_slice(&[0x31, 0xc9]); // xor ecx, ecx
    let top = code.len();
    code.push(0x41); // inc ecx
    code.extend_from_slice(&[0x89, 0x0d, 0x00, 0x00, 0x20, 0x00]); // mov [0x200000], ecx
    code.push(0x81);
    code.push(0xf9); // cmp ecx, imm32
    code.extend_from_slice(&n.to_le_bytes());
    let back = (top as i64 - (code.len() as i64 + 2)) as i8;
    code.extend_from_slice(&[0x75, back as u8]); // jne top
    code.extend(exit(7));
    code
}

fn copy_ram(ram: &GuestRam) -> Vec<u8> {
    let mut v = vec![0u8; ram.size() as usize];
    ram.read_to(0, &mut v).unwrap();
    v
}

fn restore(st: &MachineState, image: &[u8]) -> Machine {
    let ram = GuestRam::new(st.config.mem_size).unwrap();
    ram.write_from(0, image).unwrap();
    Machine::restore(st, ram, Attach::console(Box::new(std::io::sink()))).unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn save_restore_continue_without_the_store() {
    if !kvm_ready() {
        return;
    }
    // Ring-0 guest code is emulated on kvm_pvm (about 1 µs an instruction)
    // and native elsewhere: size the loop to last about a second either way.
    let n: u32 = if vmm::cpuid::kvm_pvm() { 200_000 } else { 2_000_000_000 };
    let mut a = machine(&counter_guest(n), 1);
    a.start().unwrap();
    wait_for("the counter to run", || a.ram().read_u32(0x20_0000).unwrap_or(0) > 1000);
    let paused = a.pause(PauseAction::SaveState).unwrap();
    let ecx = paused.states[0].regs.rcx;
    let st = a.save_state(paused).unwrap();
    let image = copy_ram(a.ram());
    a.stop();
    drop(a);
    assert!(ecx > 1000 && ecx < u64::from(n), "saved mid-run: ecx={ecx}");
    // Through the state encoding, as a snapshot would store it.
    let st = vmm::state::decode(&vmm::state::encode(&st)).unwrap();
    let mut b = restore(&st, &image);
    b.start().unwrap();
    assert!(matches!(wait_stop(&b), GuestStop::PowerOff { code: 7 }));
    assert_eq!(b.ram().read_u32(0x20_0000), Some(n), "the loop ran to its end");
    assert_eq!(
        b.ram().read_u32(0x30_0000),
        Some(1),
        "the guest continued; it did not start over"
    );
    b.stop();
}

#[test]
fn serial_persist_round_trip() {
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let a = SerialDevice::new(evt(), Box::new(std::io::sink()));
    for (off, v) in [
        (3, 0x83),
        (0, 0x0c),
        (1, 0x00),
        (3, 0x1b),
        (1, 0x05),
        (7, 0x5a),
        (4, 0x0b),
    ] {
        a.write(off, v);
    }
    assert_eq!(a.enqueue_input(b"hello"), 5);
    assert_eq!(a.read(0), b'h');
    let saved = a.save().unwrap();
    let b = SerialDevice::restore((evt(), Box::new(std::io::sink())), &saved).unwrap();
    assert_eq!(b.save().unwrap(), saved);
    assert_eq!(b.read(7), 0x5a, "scratch register");
    assert_eq!(b.read(3), 0x1b, "line control");
    assert_eq!(b.read(0), b'e', "pending input survives");
}

/// The raw bytes of a KVM UAPI struct.
fn bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: reading size_of::<T>() bytes of a plain C struct from KVM's UAPI,
    // which has no padding the kernel leaves uninitialised (KVM zeroes it).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()).to_vec() }
}

/// MSRs that move on their own (time) and are compared elsewhere.
fn steady(msrs: &[(u32, u64)]) -> Vec<(u32, u64)> {
    const MOVING: [u32; 4] = [0x10, 0x6e0, 0x3b, 0x4b56_4d02];
    msrs.iter().copied().filter(|(i, _)| !MOVING.contains(i)).collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn vcpu_and_in_kernel_devices_persist_round_trip() {
    if !kvm_ready() {
        return;
    }
    // Set registers and an MSR, then halt with interrupts off (KVM keeps the
    // vCPU in the kernel; pausing kicks it out).
    let mut code = vec![
        0xbe, 0x78, 0x56, 0x34, 0x12, // mov esi, 0x12345678
        0xbf, 0xef, 0xbe, 0xad, 0xde, // mov edi, 0xdeadbeef
        0xb9, 0x74, 0x01, 0x00, 0x00, // mov ecx, 0x174 (SYSENTER_CS)
        0xb8, 0x10, 0x00, 0x00, 0x00, // mov eax, 0x10
        0x31, 0xd2, // xor edx, edx
        0x0f, 0x30, // wrmsr
    ];
    code.extend(store32(0x20_0000, 1));
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfc]); // cli; hlt; jmp back to hlt
    let mut a = machine(&code, 2);
    a.start().unwrap();
    wait_for("the guest to reach hlt", || a.ram().read_u32(0x20_0000) == Some(1));
    let s1 = a.save_state(a.pause(PauseAction::SaveState).unwrap()).unwrap();
    let image = copy_ram(a.ram());
    a.stop();
    let mut b = restore(&s1, &image);
    b.start().unwrap();
    let s2 = b.save_state(b.pause(PauseAction::SaveState).unwrap()).unwrap();
    b.stop();

    assert_eq!(s1.vcpus.len(), 2);
    for (v1, v2) in s1.vcpus.iter().zip(&s2.vcpus) {
        assert_eq!(v1.regs, v2.regs, "vCPU {} registers", v1.id);
        assert_eq!(bytes(&v1.sregs), bytes(&v2.sregs), "vCPU {} special registers", v1.id);
        assert_eq!(v1.mp_state.mp_state, v2.mp_state.mp_state, "vCPU {} MP state", v1.id);
        assert_eq!(v1.xsave, v2.xsave, "vCPU {} XSAVE", v1.id);
        assert_eq!(bytes(&v1.xcrs), bytes(&v2.xcrs), "vCPU {} XCRs", v1.id);
        assert_eq!(
            bytes(&v1.debugregs),
            bytes(&v2.debugregs),
            "vCPU {} debug registers",
            v1.id
        );
        assert_eq!(v1.cpuid.len(), v2.cpuid.len(), "vCPU {} CPUID", v1.id);
        assert_eq!(steady(&v1.msrs), steady(&v2.msrs), "vCPU {} MSRs", v1.id);
        // LAPIC: everything but the timer's current count (0x390).
        let (l1, l2) = (bytes(&v1.lapic), bytes(&v2.lapic));
        assert_eq!(l1[..0x390], l2[..0x390], "vCPU {} LAPIC", v1.id);
        assert_eq!(l1[0x3a0..], l2[0x3a0..], "vCPU {} LAPIC", v1.id);
    }
    assert_eq!(s1.vcpus[0].regs.rsi, 0x1234_5678);
    assert!(s1.vcpus[0].msrs.contains(&(0x174, 0x10)), "the guest's wrmsr was saved");
    assert_eq!(bytes(&s1.vm.pic_master), bytes(&s2.vm.pic_master), "PIC master");
    assert_eq!(bytes(&s1.vm.pic_slave), bytes(&s2.vm.pic_slave), "PIC slave");
    assert_eq!(bytes(&s1.vm.ioapic), bytes(&s2.vm.ioapic), "IOAPIC");
    for (c1, c2) in s1.vm.pit.channels.iter().zip(&s2.vm.pit.channels) {
        assert_eq!(
            (c1.count, c1.mode, c1.rw_mode, c1.gate),
            (c2.count, c2.mode, c2.rw_mode, c2.gate),
            "PIT"
        );
    }
    // kvmclock continues from the saved value: it does not jump by the time
    // the machine spent torn down, nor go backwards.
    let d = s2.vm.clock.clock.wrapping_sub(s1.vm.clock.clock) as i64;
    assert!(
        (0..2_000_000_000).contains(&d),
        "kvmclock moved by {d} ns across the restore"
    );
    assert_eq!(s1.devices, s2.devices, "VMM devices");
}

/// A bit that `cpuid` leaves clear in CPUID 7.0 EBX/EDX or 1 ECX, none of
/// which KVM sets from guest state: (leaf, register index, bit).
fn a_clear_feature_bit(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> (u32, usize, u32) {
    for (leaf, r, skip) in [(7u32, 1usize, 0u32), (7, 3, 0), (1, 2, (1 << 27) | (1 << 31))] {
        let Some(e) = cpuid.iter().find(|e| e.function == leaf && e.index == 0) else {
            continue;
        };
        let v = [e.eax, e.ebx, e.ecx, e.edx][r];
        if let Some(bit) = (0..32).find(|b| (v | skip) & (1 << b) == 0) {
            return (leaf, r, bit);
        }
    }
    panic!("no clear feature bit in leaves 1 and 7");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_state_claiming_a_feature_this_host_lacks_is_refused() {
    if !kvm_ready() {
        return;
    }
    let mut a = machine(&[0xfa, 0xf4, 0xeb, 0xfc], 1); // cli; hlt; jmp back
    a.start().unwrap();
    let mut st = a.save_state(a.pause(PauseAction::SaveState).unwrap()).unwrap();
    let image = copy_ram(a.ram());
    a.stop();
    // As if saved on a host with one more feature than this one offers.
    let (leaf, r, bit) = a_clear_feature_bit(&st.vcpus[0].cpuid);
    let e = st.vcpus[0]
        .cpuid
        .iter_mut()
        .find(|e| e.function == leaf && e.index == 0)
        .unwrap();
    *[&mut e.eax, &mut e.ebx, &mut e.ecx, &mut e.edx][r] |= 1 << bit;
    let ram = GuestRam::new(st.config.mem_size).unwrap();
    ram.write_from(0, &image).unwrap();
    let err = Machine::restore(&st, ram, Attach::console(Box::new(std::io::sink()))).unwrap_err();
    let want = format!("CPUID {leaf:#x}.0 {}[{bit}]", ["EAX", "EBX", "ECX", "EDX"][r]);
    assert!(
        matches!(err, vmm::machine::MachineError::Cpu(_)) && err.to_string().contains(&want),
        "{err}"
    );
}
