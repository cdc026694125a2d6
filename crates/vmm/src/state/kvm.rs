//! Capturing and applying KVM state, in the order KVM needs.
//!
//! vCPU save order (each on the vCPU's own thread, vCPU paused with no I/O
//! in flight): MP_STATE first, then REGS, SREGS, XSAVE, XCRS, DEBUGREGS,
//! LAPIC, TSC_KHZ, CPUID, MSRs, and VCPU_EVENTS last, so that events
//! reflect everything read before them.
//!
//! vCPU restore order: CPUID first (MSR and XSAVE checks depend on it), then
//! MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC *before* MSRs (the
//! TSC-deadline MSR is only accepted once the LAPIC timer is in deadline
//! mode), MSRs with IA32_TSC first (guest TSC resumes at the saved value,
//! so guest time never goes backwards, where KVM honours the TSC offset;
//! kvm_pvm ignores it and the guest reads the host's TSC) and TSC_DEADLINE
//! last, VCPU_EVENTS, and finally KVM_KVMCLOCK_CTRL to tell a paravirtual
//! guest it was paused. The saved MSRs include MSR_KVM_SYSTEM_TIME_NEW, so a
//! guest's kvmclock registration survives, and the VM-wide KVM_SET_CLOCK
//! makes that kvmclock continue from the capture instant.
//!
//! VM-wide state (PIC, IOAPIC, PIT, kvmclock) is captured after the devices
//! and after the vCPUs are parked, and restored before any vCPU runs.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_irqchip, kvm_msr_entry,
    kvm_xsave,
};
use kvm_ioctls::{Kvm, VmFd};

use super::{StateError, VcpuState, VmState};
use crate::vcpu::Vcpu;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs outside KVM_GET_MSR_INDEX_LIST that guests rely on (MTRRs).
const EXTRA_MSRS: [u32; 13] = [
    0x2ff, 0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, 0x1b,
];
/// MSRs that are state of no guest consequence or are rebuilt elsewhere.
const SKIP_MSRS: [u32; 2] = [
    0x8b, // microcode revision (read-only view)
    0x34, // SMI count
];
const MSR_CHUNK: usize = 64;

fn kvm_err(vcpu: u8, op: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { vcpu, op, source }
}

/// The MSRs to save: KVM's index list plus MTRRs, minus ones that cannot
/// be read back on this host (probed on `probe`).
pub fn saveable_msrs(kvm: &Kvm, probe: &Vcpu) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err(probe.id, "KVM_GET_MSR_INDEX_LIST"))?;
    let mut idx: Vec<u32> = list.as_slice().iter().copied().chain(EXTRA_MSRS).collect();
    idx.retain(|m| !SKIP_MSRS.contains(m));
    idx.sort_unstable();
    idx.dedup();
    let readable: Vec<u32> = idx.into_iter().filter(|&m| read_msrs(probe, &[m]).is_ok()).collect();
    Ok(readable)
}

fn read_msrs(vcpu: &Vcpu, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Invalid("MSR list too long".into()))?;
        let n = vcpu.fd.get_msrs(&mut msrs).map_err(kvm_err(vcpu.id, "KVM_GET_MSRS"))?;
        if n != chunk.len() {
            return Err(StateError::Msr {
                vcpu: vcpu.id,
                index: chunk[n.min(chunk.len() - 1)],
                op: "read",
            });
        }
        out.extend(msrs.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(out)
}

/// Capture one vCPU. Call on the vCPU's thread while it is parked.
pub fn save_vcpu(vcpu: &Vcpu) -> Result<VcpuState, StateError> {
    let e = |op| kvm_err(vcpu.id, op);
    let mp_state = vcpu.fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let regs = vcpu.fd.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = vcpu.fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = save_xsave(vcpu)?;
    let xcrs = vcpu.fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let debugregs = vcpu.fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let tsc_khz = vcpu.fd.get_tsc_khz().ok();
    let cpuid = vcpu
        .fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(vcpu, &vcpu.msr_list)?;
    let events = vcpu.fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id: vcpu.id,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        tsc_khz,
        cpuid,
        msrs,
        events,
    })
}

fn save_xsave(vcpu: &Vcpu) -> Result<Vec<u32>, StateError> {
    if vcpu.xsave_size <= std::mem::size_of::<kvm_xsave>() {
        let x = vcpu.fd.get_xsave().map_err(kvm_err(vcpu.id, "KVM_GET_XSAVE"))?;
        return Ok(x.region.to_vec());
    }
    let extra = (vcpu.xsave_size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
    let mut x = kvm_bindings::Xsave::new(extra).map_err(|_| StateError::Invalid("XSAVE area size".into()))?;
    // SAFETY: `x` has room for the xsave_size bytes KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reported.
    unsafe { vcpu.fd.get_xsave2(&mut x) }.map_err(kvm_err(vcpu.id, "KVM_GET_XSAVE2"))?;
    let mut v = x.as_fam_struct_ref().xsave.region.to_vec();
    v.extend_from_slice(x.as_slice());
    Ok(v)
}

/// The saved XSAVE area `words` laid out for a vCPU whose KVM area is
/// `host_bytes` long (KVM_CAP_XSAVE2, at least 4096): KVM_SET_XSAVE reads
/// that many bytes from the buffer it is given, whatever the buffer's
/// length. A shorter area (saved where the area was smaller) is padded
/// with zeros, which hold no component (XSTATE_BV in the header says which
/// components the area holds; KVM refuses ones it cannot take). A longer
/// one holds state this host's vCPUs have no room for and is refused.
fn fit_xsave(vcpu: u8, words: &[u32], host_bytes: usize) -> Result<Vec<u32>, StateError> {
    let saved = words.len() * 4;
    let host = host_bytes.max(std::mem::size_of::<kvm_xsave>()).next_multiple_of(4);
    if saved < std::mem::size_of::<kvm_xsave>() {
        return Err(StateError::Invalid(format!(
            "vCPU {vcpu}: XSAVE area of {saved} bytes is smaller than 4096"
        )));
    }
    if saved > host {
        return Err(StateError::XsaveSize { vcpu, saved, host });
    }
    let mut v = words.to_vec();
    v.resize(host / 4, 0);
    Ok(v)
}

fn restore_xsave(vcpu: &Vcpu, words: &[u32]) -> Result<(), StateError> {
    let base = std::mem::size_of::<kvm_xsave>() / 4;
    let words = fit_xsave(vcpu.id, words, vcpu.xsave_size)?;
    if words.len() == base {
        let mut x = kvm_xsave::default();
        x.region.copy_from_slice(&words);
        // SAFETY: this vCPU's area is 4096 bytes (`fit_xsave`: xsave_size
        // is at most the `words` length, 4096), the size of `x`, so the
        // kernel reads within `x`.
        return unsafe { vcpu.fd.set_xsave(&x) }.map_err(kvm_err(vcpu.id, "KVM_SET_XSAVE"));
    }
    let mut x =
        kvm_bindings::Xsave::from_entries(&words[base..]).map_err(|_| StateError::Invalid("XSAVE area size".into()))?;
    // SAFETY: `as_mut_fam_struct` gives the fixed header; we copy 1024 words into its region.
    unsafe { x.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(&words[..base]);
    // SAFETY: `x` holds `words.len() * 4` bytes, which `fit_xsave` made at
    // least this vCPU's xsave_size (KVM_CAP_XSAVE2), all the kernel reads.
    unsafe { vcpu.fd.set_xsave2(&x) }.map_err(kvm_err(vcpu.id, "KVM_SET_XSAVE2"))
}

/// Apply a saved state to a fresh vCPU, on its own thread, before it runs.
pub fn restore_vcpu(vcpu: &Vcpu, st: &VcpuState) -> Result<(), StateError> {
    let e = |op| kvm_err(vcpu.id, op);
    let cpuid = CpuId::from_entries(&st.cpuid).map_err(|_| StateError::Invalid("CPUID list too long".into()))?;
    vcpu.fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    vcpu.fd.set_mp_state(st.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    vcpu.fd.set_regs(&st.regs).map_err(e("KVM_SET_REGS"))?;
    vcpu.fd.set_sregs(&st.sregs).map_err(e("KVM_SET_SREGS"))?;
    restore_xsave(vcpu, &st.xsave)?;
    vcpu.fd.set_xcrs(&st.xcrs).map_err(e("KVM_SET_XCRS"))?;
    vcpu.fd.set_debug_regs(&st.debugregs).map_err(e("KVM_SET_DEBUGREGS"))?;
    vcpu.fd.set_lapic(&st.lapic).map_err(e("KVM_SET_LAPIC"))?;
    if let Some(khz) = st.tsc_khz {
        restore_tsc_khz(vcpu, khz);
    }
    let mut msrs = st.msrs.clone();
    msrs.sort_by_key(|(i, _)| match *i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    for chunk in msrs.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|_| StateError::Invalid("MSR list too long".into()))?;
        let n = vcpu.fd.set_msrs(&list).map_err(e("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(StateError::Msr {
                vcpu: vcpu.id,
                index: chunk[n.min(chunk.len() - 1)].0,
                op: "restore",
            });
        }
    }
    vcpu.fd.set_vcpu_events(&st.events).map_err(e("KVM_SET_VCPU_EVENTS"))?;
    // Only meaningful for guests using kvmclock; EINVAL otherwise.
    let _ = vcpu.fd.kvmclock_ctrl();
    Ok(())
}

/// Give the vCPU the saved TSC frequency if KVM allows it. A failed
/// KVM_SET_TSC_KHZ may still have changed the frequency (KVM_GET_TSC_KHZ
/// then reports the refused value, as seen on kvm_pvm), so the previous one
/// is put back and the vCPU keeps the frequency it was created with.
/// Returns whether the vCPU now runs at `khz`.
fn restore_tsc_khz(vcpu: &Vcpu, khz: u32) -> bool {
    let before = vcpu.fd.get_tsc_khz().ok();
    if before == Some(khz) || vcpu.fd.set_tsc_khz(khz).is_ok() {
        return true;
    }
    let now = vcpu.fd.get_tsc_khz().ok();
    let kept = match before {
        Some(prev) if now != Some(prev) => vcpu.fd.set_tsc_khz(prev).is_ok(),
        _ => true,
    };
    let show = |k: Option<u32>| k.map_or_else(|| "an unknown frequency".to_string(), |k| format!("{k} kHz"));
    if kept {
        tracing::warn!(
            vcpu = vcpu.id,
            "TSC frequency {khz} kHz cannot be set here; the vCPU keeps {} and guest time may drift",
            show(before)
        );
    } else {
        tracing::warn!(
            vcpu = vcpu.id,
            "TSC frequency {khz} kHz cannot be set here, nor {} put back (KVM reports {}); guest time may drift",
            show(before),
            show(now)
        );
    }
    false
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm_err(0, "KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Capture PIC, IOAPIC, PIT and kvmclock. Call with all vCPUs parked.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    let mut clock = vm.get_clock().map_err(kvm_err(0, "KVM_GET_CLOCK"))?;
    // Only the clock value is restored; the host-specific fields are not.
    clock.flags = 0;
    clock.realtime = 0;
    clock.host_tsc = 0;
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err(0, "KVM_GET_PIT2"))?,
        clock,
    })
}

/// Apply VM-wide state to a fresh VM (irqchip and PIT created) before vCPUs run.
pub fn restore_vm(vm: &VmFd, st: &VmState) -> Result<(), StateError> {
    let e = |op| kvm_err(0, op);
    vm.set_pit2(&st.pit).map_err(e("KVM_SET_PIT2"))?;
    vm.set_irqchip(&st.pic_master)
        .map_err(e("KVM_SET_IRQCHIP (PIC master)"))?;
    vm.set_irqchip(&st.pic_slave)
        .map_err(e("KVM_SET_IRQCHIP (PIC slave)"))?;
    vm.set_irqchip(&st.ioapic).map_err(e("KVM_SET_IRQCHIP (IOAPIC)"))?;
    vm.set_clock(&st.clock).map_err(e("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn an_xsave_area_is_fitted_to_the_vcpu_or_refused() {
        let area = |bytes: usize| (0..bytes / 4).map(|w| w as u32 + 1).collect::<Vec<u32>>();
        // Same size: unchanged.
        assert_eq!(fit_xsave(0, &area(4096), 4096).unwrap(), area(4096));
        // Saved where the area was smaller: padded with zeros to this host's.
        let fitted = fit_xsave(0, &area(4096), 4200).unwrap();
        assert_eq!(fitted.len(), 1050);
        assert_eq!(&fitted[..1024], &area(4096)[..]);
        assert!(fitted[1024..].iter().all(|w| *w == 0));
        // Larger than this host's vCPUs take: refused, naming both sizes.
        let e = fit_xsave(1, &area(11008), 4096).unwrap_err();
        assert!(
            matches!(
                e,
                StateError::XsaveSize {
                    vcpu: 1,
                    saved: 11008,
                    host: 4096
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("11008") && e.to_string().contains("4096"), "{e}");
        // Shorter than the architectural 4096 bytes: not an XSAVE area.
        assert!(matches!(fit_xsave(0, &area(512), 4096), Err(StateError::Invalid(_))));
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn a_larger_xsave_area_is_refused_before_kvm_sees_it() {
        if !crate::testing::kvm_ready() {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let xsave_size = (kvm.check_extension_int(kvm_ioctls::Cap::Xsave2).max(0) as usize).max(4096);
        let vcpu = Vcpu {
            id: 0,
            fd: vm.create_vcpu(0).unwrap(),
            msr_list: Arc::new(Vec::new()),
            xsave_size,
        };
        let mut words = save_xsave(&vcpu).unwrap();
        restore_xsave(&vcpu, &words).unwrap();
        words.resize(words.len() + 1024, 0);
        let e = restore_xsave(&vcpu, &words).unwrap_err();
        assert!(
            matches!(e, StateError::XsaveSize { saved, host, .. } if saved == host + 4096),
            "{e}"
        );
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn a_refused_tsc_frequency_leaves_the_previous_one() {
        if !crate::testing::kvm_ready() {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let Ok(khz) = fd.get_tsc_khz() else {
            return;
        };
        let vcpu = Vcpu {
            id: 0,
            fd,
            msr_list: Arc::new(Vec::new()),
            xsave_size: 4096,
        };
        // 1 MHz slower: kvm_pvm refuses it yet used to keep it.
        let wanted = khz - 1000;
        let applied = restore_tsc_khz(&vcpu, wanted);
        let now = vcpu.fd.get_tsc_khz().unwrap();
        assert_eq!(now, if applied { wanted } else { khz }, "applied: {applied}");
    }
}
