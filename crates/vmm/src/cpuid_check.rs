//! Whether this host can run a saved vCPU: every CPU feature its CPUID
//! claims must be one a vCPU of this host presents (as a machine booted
//! here gets it, [`crate::cpuid`]), and its XSAVE area may hold only state
//! components this host has. A state saved on another host (a store
//! copied or replicated) is refused before any vCPU is created, naming
//! what differs, instead of a guest that faults on its first AVX2 or
//! XSAVES instruction.

use kvm_bindings::kvm_cpuid_entry2;
use thiserror::Error;

use crate::state::VcpuState;

/// (leaf, subleaf, register 0..4 = EAX, EBX, ECX, EDX) whose bits are
/// features: leaf 1, leaf 7.0, the XSAVE leaf 0xd (0: user state
/// components; 1: XSAVEOPT/XSAVEC/XSAVES and supervisor components) and
/// 0x80000001.
const CHECKED: [(u32, u32, usize); 12] = [
    (1, 0, 2),
    (1, 0, 3),
    (7, 0, 1),
    (7, 0, 2),
    (7, 0, 3),
    (0xd, 0, 0),
    (0xd, 0, 3),
    (0xd, 1, 0),
    (0xd, 1, 2),
    (0xd, 1, 3),
    (0x8000_0001, 0, 2),
    (0x8000_0001, 0, 3),
];

/// Bits that are not features of the host: set per vCPU or by KVM from the
/// guest's own state. (leaf, subleaf, register, mask)
const NOT_HOST: [(u32, u32, usize, u32); 3] = [
    // OSXSAVE (27, mirrors CR4), hypervisor (31, ours).
    (1, 0, 2, (1 << 27) | (1 << 31)),
    // APIC (9, mirrors the APIC base MSR), HTT (28, set with > 1 vCPU).
    (1, 0, 3, (1 << 9) | (1 << 28)),
    // OSPKE (4, mirrors CR4).
    (7, 0, 2, 1 << 4),
];

/// XSAVE components every XSAVE area has: x87 and SSE (the legacy region).
const LEGACY_COMPONENTS: u64 = 0b11;

const REG_NAMES: [&str; 4] = ["EAX", "EBX", "ECX", "EDX"];

/// Names of the commonest feature bits, for messages: (leaf, subleaf, register, bit, name).
const NAMES: &[(u32, u32, usize, u32, &str)] = &[
    (1, 0, 2, 0, "SSE3"),
    (1, 0, 2, 1, "PCLMULQDQ"),
    (1, 0, 2, 9, "SSSE3"),
    (1, 0, 2, 12, "FMA"),
    (1, 0, 2, 13, "CMPXCHG16B"),
    (1, 0, 2, 19, "SSE4.1"),
    (1, 0, 2, 20, "SSE4.2"),
    (1, 0, 2, 22, "MOVBE"),
    (1, 0, 2, 23, "POPCNT"),
    (1, 0, 2, 25, "AES"),
    (1, 0, 2, 26, "XSAVE"),
    (1, 0, 2, 28, "AVX"),
    (1, 0, 2, 29, "F16C"),
    (1, 0, 2, 30, "RDRAND"),
    (1, 0, 3, 25, "SSE"),
    (1, 0, 3, 26, "SSE2"),
    (7, 0, 1, 0, "FSGSBASE"),
    (7, 0, 1, 3, "BMI1"),
    (7, 0, 1, 5, "AVX2"),
    (7, 0, 1, 8, "BMI2"),
    (7, 0, 1, 9, "ERMS"),
    (7, 0, 1, 16, "AVX512F"),
    (7, 0, 1, 18, "RDSEED"),
    (7, 0, 1, 19, "ADX"),
    (7, 0, 1, 29, "SHA"),
    (7, 0, 2, 3, "PKU"),
    (7, 0, 2, 8, "GFNI"),
    (7, 0, 2, 9, "VAES"),
    (7, 0, 2, 10, "VPCLMULQDQ"),
    (7, 0, 2, 22, "RDPID"),
    (7, 0, 3, 4, "FSRM"),
    (7, 0, 3, 24, "AMX-TILE"),
    (0xd, 0, 0, 2, "AVX state"),
    (0xd, 0, 0, 5, "AVX-512 opmask state"),
    (0xd, 0, 0, 6, "AVX-512 ZMM_Hi256 state"),
    (0xd, 0, 0, 7, "AVX-512 Hi16_ZMM state"),
    (0xd, 0, 0, 9, "PKRU state"),
    (0xd, 0, 0, 17, "AMX TILECFG state"),
    (0xd, 0, 0, 18, "AMX TILEDATA state"),
    (0xd, 1, 0, 0, "XSAVEOPT"),
    (0xd, 1, 0, 1, "XSAVEC"),
    (0xd, 1, 0, 3, "XSAVES"),
    (0x8000_0001, 0, 2, 0, "LAHF/SAHF"),
    (0x8000_0001, 0, 2, 5, "LZCNT"),
    (0x8000_0001, 0, 2, 8, "PREFETCHW"),
    (0x8000_0001, 0, 3, 20, "NX"),
    (0x8000_0001, 0, 3, 26, "1 GiB pages"),
    (0x8000_0001, 0, 3, 27, "RDTSCP"),
    (0x8000_0001, 0, 3, 29, "LM"),
];

/// One feature bit a saved vCPU has that this host does not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingFeature {
    /// CPUID leaf.
    pub leaf: u32,
    /// Subleaf.
    pub sub: u32,
    /// Register: 0..4 = EAX, EBX, ECX, EDX.
    pub reg: usize,
    /// Bit.
    pub bit: u32,
}

impl std::fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reg = REG_NAMES.get(self.reg).copied().unwrap_or("?");
        write!(f, "CPUID {:#x}.{} {reg}[{}]", self.leaf, self.sub, self.bit)?;
        let name = NAMES
            .iter()
            .find(|n| (n.0, n.1, n.2, n.3) == (self.leaf, self.sub, self.reg, self.bit));
        match name {
            Some(n) => write!(f, " ({})", n.4),
            None => Ok(()),
        }
    }
}

fn list(m: &[MissingFeature]) -> String {
    m.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Why a saved vCPU cannot run on this host.
#[derive(Debug, Error)]
pub enum CpuidError {
    /// Its CPUID claims features this host's KVM does not offer.
    #[error(
        "vCPU {vcpu} was saved on a CPU with features this host cannot provide: {}; \
         restore it on a host that has them",
        list(.missing)
    )]
    Unsupported {
        /// vCPU index.
        vcpu: u8,
        /// What is missing.
        missing: Vec<MissingFeature>,
    },
    /// Its XSAVE area holds state components this host does not offer.
    #[error(
        "vCPU {vcpu}'s saved XSAVE area holds state components this host cannot provide: {}",
        list(.missing)
    )]
    XsaveComponents {
        /// vCPU index.
        vcpu: u8,
        /// The components, as bits of CPUID 0xd.0 (EAX: 0-31, EDX: 32-63).
        missing: Vec<MissingFeature>,
    },
}

fn reg(e: &kvm_cpuid_entry2, i: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][i.min(3)]
}

/// The value of (leaf, sub, register) in `table`, 0 when the leaf is absent.
fn lookup(table: &[kvm_cpuid_entry2], leaf: u32, sub: u32, r: usize) -> u32 {
    table
        .iter()
        .find(|e| e.function == leaf && e.index == sub)
        .map_or(0, |e| reg(e, r))
}

fn bits_of(leaf: u32, sub: u32, reg: usize, mut bits: u32, out: &mut Vec<MissingFeature>) {
    while bits != 0 {
        let bit = bits.trailing_zeros();
        out.push(MissingFeature { leaf, sub, reg, bit });
        bits &= bits - 1;
    }
}

/// The feature bits `saved` claims that `offered` lacks.
pub fn missing_features(saved: &[kvm_cpuid_entry2], offered: &[kvm_cpuid_entry2]) -> Vec<MissingFeature> {
    let mut out = Vec::new();
    for &(leaf, sub, r) in &CHECKED {
        let ignore = NOT_HOST
            .iter()
            .filter(|n| (n.0, n.1, n.2) == (leaf, sub, r))
            .fold(0, |m, n| m | n.3);
        let extra = lookup(saved, leaf, sub, r) & !lookup(offered, leaf, sub, r) & !ignore;
        bits_of(leaf, sub, r, extra, &mut out);
    }
    out
}

/// The XSAVE state components (XSTATE_BV, bytes 512..520 of the area)
/// that `xsave` holds and `offered` (CPUID 0xd.0) lacks.
pub fn missing_components(xsave: &[u32], offered: &[kvm_cpuid_entry2]) -> Vec<MissingFeature> {
    let (Some(&lo), Some(&hi)) = (xsave.get(128), xsave.get(129)) else {
        return Vec::new();
    };
    let held = u64::from(lo) | u64::from(hi) << 32;
    let host = u64::from(lookup(offered, 0xd, 0, 0)) | u64::from(lookup(offered, 0xd, 0, 3)) << 32;
    let extra = held & !(host | LEGACY_COMPONENTS);
    let mut out = Vec::new();
    bits_of(0xd, 0, 0, extra as u32, &mut out);
    bits_of(0xd, 0, 3, (extra >> 32) as u32, &mut out);
    out
}

/// Refuse a saved vCPU that needs more than `offered`, the CPUID a vCPU
/// of this host presents.
pub fn check_vcpu(saved: &VcpuState, offered: &[kvm_cpuid_entry2]) -> Result<(), CpuidError> {
    let vcpu = saved.id;
    let missing = missing_features(&saved.cpuid, offered);
    if !missing.is_empty() {
        return Err(CpuidError::Unsupported { vcpu, missing });
    }
    let missing = missing_components(&saved.xsave, offered);
    if !missing.is_empty() {
        return Err(CpuidError::XsaveComponents { vcpu, missing });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(1, 0, [0, 0, 1 << 0, 1 << 25]),
            entry(7, 0, [0, 1 << 3, 0, 0]),
            entry(0xd, 0, [0b111, 0, 0, 0]),
        ]
    }

    #[test]
    fn the_same_features_pass() {
        assert!(missing_features(&host(), &host()).is_empty());
        // Fewer pass too.
        assert!(missing_features(&[entry(1, 0, [0, 0, 1, 0])], &host()).is_empty());
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let mut saved = host();
        saved[1].ebx |= 1 << 5; // AVX2
        saved.push(entry(0x8000_0001, 0, [0, 0, 0, 1 << 27])); // RDTSCP
        let m = missing_features(&saved, &host());
        assert_eq!(
            m,
            [
                MissingFeature {
                    leaf: 7,
                    sub: 0,
                    reg: 1,
                    bit: 5
                },
                MissingFeature {
                    leaf: 0x8000_0001,
                    sub: 0,
                    reg: 3,
                    bit: 27
                },
            ]
        );
        let e = CpuidError::Unsupported { vcpu: 1, missing: m }.to_string();
        assert!(
            e.contains("CPUID 0x7.0 EBX[5] (AVX2)") && e.contains("RDTSCP") && e.contains("vCPU 1"),
            "{e}"
        );
    }

    #[test]
    fn bits_set_from_guest_state_are_not_features() {
        let mut saved = host();
        saved[0].ecx |= (1 << 27) | (1 << 31); // OSXSAVE, hypervisor
        saved[0].edx |= (1 << 9) | (1 << 28); // APIC, HTT
        assert!(missing_features(&saved, &host()).is_empty());
    }

    #[test]
    fn xsave_components_the_host_lacks_are_named() {
        let mut area = vec![0u32; 1024];
        area[128] = 0b111; // x87, SSE, AVX: offered
        assert!(missing_components(&area, &host()).is_empty());
        area[129] = 1 << 1; // component 33, in EDX
        area[128] |= 1 << 17; // AMX TILECFG
        let m = missing_components(&area, &host());
        assert_eq!(
            m,
            [
                MissingFeature {
                    leaf: 0xd,
                    sub: 0,
                    reg: 0,
                    bit: 17
                },
                MissingFeature {
                    leaf: 0xd,
                    sub: 0,
                    reg: 3,
                    bit: 1
                },
            ]
        );
        assert!(m[0].to_string().contains("AMX TILECFG"), "{}", m[0]);
    }
}
