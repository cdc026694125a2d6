//! CPUID for the guest: KVM's supported list, filtered to what this host
//! runs, with per-vCPU topology.
//!
//! KVM reports what it can virtualize; on nested or paravirtual hosts that
//! list can include bits the host CPU itself lacks. Feature leaves are
//! intersected with the host's own CPUID so the guest never sees a feature
//! it cannot use, and on kvm_pvm the instructions its emulator lacks are
//! removed too (kvm_pvm passes several other host bits through whatever
//! KVM_SET_CPUID2 says; CX16 it does honour). Then each vCPU gets its APIC ID
//! and the hypervisor bit.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// (leaf, subleaf, register index 0..4 = eax, ebx, ecx, edx) whose bits are features.
const FEATURE_REGS: [(u32, u32, usize); 6] = [
    (1, 0, 2),
    (1, 0, 3),
    (7, 0, 1),
    (7, 0, 2),
    (7, 0, 3),
    (0x8000_0001, 0, 2),
];
/// Leaf 0x80000001 EDX also carries features (NX, LM, SYSCALL, RDTSCP...).
const EXT_EDX: (u32, u32, usize) = (0x8000_0001, 0, 3);

fn host_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn reg_mut(e: &mut kvm_cpuid_entry2, i: usize) -> &mut u32 {
    match i {
        0 => &mut e.eax,
        1 => &mut e.ebx,
        2 => &mut e.ecx,
        _ => &mut e.edx,
    }
}

/// Intersect feature leaves with the host's CPUID.
pub fn filter_to_host(cpuid: &mut CpuId) {
    let host_max = host_cpuid(0, 0)[0];
    let host_ext_max = host_cpuid(0x8000_0000, 0)[0];
    for e in cpuid.as_mut_slice() {
        for &(leaf, sub, reg) in FEATURE_REGS.iter().chain(std::iter::once(&EXT_EDX)) {
            if e.function != leaf || e.index != sub {
                continue;
            }
            let max = if leaf >= 0x8000_0000 { host_ext_max } else { host_max };
            let host = if leaf <= max { host_cpuid(leaf, sub)[reg] } else { 0 };
            let mask = match (leaf, reg) {
                // Leaf 1 ECX bit 31 (hypervisor) is ours to set; keep it.
                (1, 2) => host | (1 << 31),
                // Leaf 1 EDX bit 9 (APIC) and leaf 7 bits KVM emulates fully in software.
                (1, 3) => host | (1 << 9),
                _ => host,
            };
            *reg_mut(e, reg) &= mask;
        }
    }
}

/// True on kvm_pvm, whose KVM emulates guest kernel code one instruction at
/// a time with an emulator that lacks some instructions.
pub fn kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Leaf 1 ECX bits of instructions kvm_pvm's emulator cannot run in guest
/// kernel mode: CMPXCHG16B (13) and the XSAVE family (26 XSAVE, 27 OSXSAVE,
/// 28 AVX, whose state needs XSAVE). Guest kernels that see them use them.
const PVM_UNRUNNABLE_LEAF1_ECX: u32 = (1 << 13) | (1 << 26) | (1 << 27) | (1 << 28);

/// Remove what this host cannot run even though KVM lists it.
pub fn filter_host_quirks(cpuid: &mut CpuId) {
    if !kvm_pvm() {
        return;
    }
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx &= !PVM_UNRUNNABLE_LEAF1_ECX;
        }
    }
}

/// Per-vCPU fix-ups: APIC IDs, logical-processor count, hypervisor bit.
pub fn for_vcpu(base: &CpuId, id: u8, vcpus: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(vcpus) << 16);
                e.ecx |= 1 << 31;
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                }
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
            }
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_fixups_set_apic_id_and_hypervisor_bit() {
        let base = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ebx: 0xdead_0800,
            ..Default::default()
        }])
        .unwrap();
        let c = for_vcpu(&base, 3, 4);
        let e = c.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & (1 << 31), 0);
    }

    #[test]
    fn host_filter_never_adds_bits() {
        let mut c = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 7,
            index: 0,
            ebx: u32::MAX,
            ..Default::default()
        }])
        .unwrap();
        filter_to_host(&mut c);
        assert_eq!(c.as_slice()[0].ebx & !host_cpuid(7, 0)[1], 0);
    }
}
