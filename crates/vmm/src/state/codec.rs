//! Binary encoding of [`MachineState`] (docs/FORMAT.md, "Machine state records").
//!
//! A flat sequence of records, each `tag: u16, index: u16, len: u32`
//! followed by `len` payload bytes and zero padding to 8 bytes, ending with
//! an END record. KVM structures are stored as their exact Linux x86-64 UAPI
//! bytes, whose layout the kernel keeps stable; everything else is spelled
//! out field by field, little-endian.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use vm_superio::serial::SerialState;

use super::records::{Enc, Reader};
use super::{DeviceStates, MachineConfig, MachineState, StateError, VcpuState, VmState};

const CONFIG: u16 = 0x0001;
const PIC_MASTER: u16 = 0x0101;
const PIC_SLAVE: u16 = 0x0102;
const IOAPIC: u16 = 0x0103;
const PIT2: u16 = 0x0104;
const CLOCK: u16 = 0x0105;
const SERIAL: u16 = 0x0201;
const MP_STATE: u16 = 0x0301;
const REGS: u16 = 0x0302;
const SREGS: u16 = 0x0303;
const XSAVE: u16 = 0x0304;
const XCRS: u16 = 0x0305;
const DEBUGREGS: u16 = 0x0306;
const LAPIC: u16 = 0x0307;
const TSC_KHZ: u16 = 0x0308;
const CPUID: u16 = 0x0309;
const MSRS: u16 = 0x030a;
const EVENTS: u16 = 0x030b;
const END: u16 = 0xffff;

/// Plain-old-data KVM UAPI structures.
///
/// # Safety
/// Implementors are `repr(C)`, contain no pointers or references, have
/// explicit padding fields (no implicit padding), and every bit pattern is a
/// valid value.
unsafe trait Pod: Copy + Default {}

// SAFETY: all of these are bindgen-generated repr(C) UAPI structs made of
// integers and integer arrays, with padding spelled out as fields.
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_pit_state2 {}
// SAFETY: as above (the union member is a byte array of the full size).
unsafe impl Pod for kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_clock_data {}
// SAFETY: as above.
unsafe impl Pod for kvm_cpuid_entry2 {}

fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no implicit padding, so all size_of::<T>() bytes are initialized.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn pod_from<T: Pod>(b: &[u8], what: &str) -> Result<T, StateError> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(StateError::Corrupt(format!(
            "{what} record has {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        )));
    }
    let mut v = T::default();
    // SAFETY: sizes match and every bit pattern is a valid `T`.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len()) };
    Ok(v)
}

fn put_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
}

/// Encode a machine state.
pub fn encode(st: &MachineState) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(16 << 10));
    let mut cfg = Vec::new();
    cfg.extend_from_slice(&st.config.mem_size.to_le_bytes());
    cfg.push(st.config.vcpus);
    cfg.extend_from_slice(&[0; 7]);
    put_str(&mut cfg, Some(&st.config.kernel));
    put_str(&mut cfg, st.config.cmdline.as_deref());
    e.rec(CONFIG, 0, &cfg);
    e.rec(PIC_MASTER, 0, pod_bytes(&st.vm.pic_master));
    e.rec(PIC_SLAVE, 0, pod_bytes(&st.vm.pic_slave));
    e.rec(IOAPIC, 0, pod_bytes(&st.vm.ioapic));
    e.rec(PIT2, 0, pod_bytes(&st.vm.pit));
    e.rec(CLOCK, 0, pod_bytes(&st.vm.clock));
    let s = &st.devices.serial;
    let mut ser = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    ser.extend_from_slice(&(s.in_buffer.len() as u32).to_le_bytes());
    ser.extend_from_slice(&s.in_buffer);
    e.rec(SERIAL, 0, &ser);
    super::virtio_codec::encode(&mut e, &st.devices.virtio);
    for v in &st.vcpus {
        let i = u16::from(v.id);
        e.rec(MP_STATE, i, pod_bytes(&v.mp_state));
        e.rec(REGS, i, pod_bytes(&v.regs));
        e.rec(SREGS, i, pod_bytes(&v.sregs));
        let xs: Vec<u8> = v.xsave.iter().flat_map(|w| w.to_le_bytes()).collect();
        e.rec(XSAVE, i, &xs);
        e.rec(XCRS, i, pod_bytes(&v.xcrs));
        e.rec(DEBUGREGS, i, pod_bytes(&v.debugregs));
        e.rec(LAPIC, i, pod_bytes(&v.lapic));
        if let Some(khz) = v.tsc_khz {
            e.rec(TSC_KHZ, i, &khz.to_le_bytes());
        }
        let cpuid: Vec<u8> = v.cpuid.iter().flat_map(|c| pod_bytes(c).to_vec()).collect();
        e.rec(CPUID, i, &cpuid);
        let mut msrs = Vec::with_capacity(v.msrs.len() * 16);
        for (idx, val) in &v.msrs {
            msrs.extend_from_slice(&idx.to_le_bytes());
            msrs.extend_from_slice(&[0; 4]);
            msrs.extend_from_slice(&val.to_le_bytes());
        }
        e.rec(MSRS, i, &msrs);
        e.rec(EVENTS, i, pod_bytes(&v.events));
    }
    e.rec(END, 0, &[]);
    e.0
}

#[derive(Default)]
struct PartialVcpu {
    mp_state: Option<kvm_mp_state>,
    regs: Option<kvm_regs>,
    sregs: Option<kvm_sregs>,
    xsave: Option<Vec<u32>>,
    xcrs: Option<kvm_xcrs>,
    debugregs: Option<kvm_debugregs>,
    lapic: Option<kvm_lapic_state>,
    tsc_khz: Option<u32>,
    cpuid: Option<Vec<kvm_cpuid_entry2>>,
    msrs: Option<Vec<(u32, u64)>>,
    events: Option<kvm_vcpu_events>,
}

fn need<T>(v: Option<T>, what: &str) -> Result<T, StateError> {
    v.ok_or_else(|| StateError::Corrupt(format!("missing {what} record")))
}

/// Decode a machine state, checking every record.
pub fn decode(mut b: &[u8]) -> Result<MachineState, StateError> {
    let mut config = None;
    let (mut pm, mut ps, mut io, mut pit, mut clock, mut serial) = (None, None, None, None, None, None);
    let mut vcpus: Vec<PartialVcpu> = Vec::new();
    let mut virtio = super::virtio_codec::Slots::default();
    let mut ended = false;
    while !b.is_empty() {
        if b.len() < 8 {
            return Err(StateError::Corrupt("record header is truncated".into()));
        }
        let tag = u16::from_le_bytes([b[0], b[1]]);
        let index = u16::from_le_bytes([b[2], b[3]]) as usize;
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let padded = 8 + len.div_ceil(8) * 8;
        if b.len() < 8 + len {
            return Err(StateError::Corrupt(format!("record {tag:#06x} is truncated")));
        }
        let p = &b[8..8 + len];
        b = &b[padded.min(b.len())..];
        if tag == END {
            ended = true;
            break;
        }
        if (MP_STATE..=EVENTS).contains(&tag) {
            if index >= 255 {
                return Err(StateError::Corrupt(format!("vCPU index {index} out of range")));
            }
            if vcpus.len() <= index {
                vcpus.resize_with(index + 1, PartialVcpu::default);
            }
            let v = &mut vcpus[index];
            match tag {
                MP_STATE => v.mp_state = Some(pod_from(p, "MP_STATE")?),
                REGS => v.regs = Some(pod_from(p, "REGS")?),
                SREGS => v.sregs = Some(pod_from(p, "SREGS")?),
                XSAVE => {
                    if !p.len().is_multiple_of(4) || p.len() < 4096 {
                        return Err(StateError::Corrupt(format!("XSAVE record has {} bytes", p.len())));
                    }
                    v.xsave = Some(
                        p.chunks_exact(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    );
                }
                XCRS => v.xcrs = Some(pod_from(p, "XCRS")?),
                DEBUGREGS => v.debugregs = Some(pod_from(p, "DEBUGREGS")?),
                LAPIC => v.lapic = Some(pod_from(p, "LAPIC")?),
                TSC_KHZ => v.tsc_khz = Some(Reader { b: p, what: "TSC_KHZ" }.u32()?),
                CPUID => {
                    let sz = std::mem::size_of::<kvm_cpuid_entry2>();
                    if !p.len().is_multiple_of(sz) {
                        return Err(StateError::Corrupt("CPUID record size".into()));
                    }
                    v.cpuid = Some(
                        p.chunks_exact(sz)
                            .map(|c| pod_from(c, "CPUID"))
                            .collect::<Result<_, _>>()?,
                    );
                }
                MSRS => {
                    if !p.len().is_multiple_of(16) {
                        return Err(StateError::Corrupt("MSRS record size".into()));
                    }
                    let mut r = Reader { b: p, what: "MSRS" };
                    let mut m = Vec::with_capacity(p.len() / 16);
                    while !r.b.is_empty() {
                        let idx = r.u32()?;
                        r.u32()?;
                        m.push((idx, r.u64()?));
                    }
                    v.msrs = Some(m);
                }
                _ => v.events = Some(pod_from(p, "VCPU_EVENTS")?),
            }
            continue;
        }
        match tag {
            CONFIG => {
                let mut r = Reader { b: p, what: "CONFIG" };
                let mem_size = r.u64()?;
                let vcpus = r.take(8)?[0];
                let kernel = r.string()?.unwrap_or_default();
                let cmdline = r.string()?;
                config = Some(MachineConfig {
                    mem_size,
                    vcpus,
                    cmdline,
                    kernel,
                });
            }
            PIC_MASTER => pm = Some(pod_from(p, "PIC master")?),
            PIC_SLAVE => ps = Some(pod_from(p, "PIC slave")?),
            IOAPIC => io = Some(pod_from(p, "IOAPIC")?),
            PIT2 => pit = Some(pod_from(p, "PIT")?),
            CLOCK => clock = Some(pod_from(p, "CLOCK")?),
            SERIAL => {
                let mut r = Reader { b: p, what: "SERIAL" };
                let regs = r.take(9)?;
                let n = r.u32()? as usize;
                let in_buffer = r.take(n)?.to_vec();
                serial = Some(SerialState {
                    baud_divisor_low: regs[0],
                    baud_divisor_high: regs[1],
                    interrupt_enable: regs[2],
                    interrupt_identification: regs[3],
                    line_control: regs[4],
                    line_status: regs[5],
                    modem_control: regs[6],
                    modem_status: regs[7],
                    scratch: regs[8],
                    in_buffer,
                });
            }
            t if virtio.takes(t) => virtio.record(t, index, p)?,
            other => {
                return Err(StateError::Corrupt(format!("unknown record tag {other:#06x}")));
            }
        }
    }
    if !ended {
        return Err(StateError::Corrupt("END record missing (truncated state)".into()));
    }
    let config = need(config, "CONFIG")?;
    if vcpus.len() != usize::from(config.vcpus) || config.vcpus == 0 {
        return Err(StateError::Corrupt(format!(
            "state has {} vCPUs, configuration says {}",
            vcpus.len(),
            config.vcpus
        )));
    }
    let vcpus = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            Ok(VcpuState {
                id: i as u8,
                mp_state: need(v.mp_state, "MP_STATE")?,
                regs: need(v.regs, "REGS")?,
                sregs: need(v.sregs, "SREGS")?,
                xsave: need(v.xsave, "XSAVE")?,
                xcrs: need(v.xcrs, "XCRS")?,
                debugregs: need(v.debugregs, "DEBUGREGS")?,
                lapic: need(v.lapic, "LAPIC")?,
                tsc_khz: v.tsc_khz,
                cpuid: need(v.cpuid, "CPUID")?,
                msrs: need(v.msrs, "MSRS")?,
                events: need(v.events, "VCPU_EVENTS")?,
            })
        })
        .collect::<Result<Vec<_>, StateError>>()?;
    Ok(MachineState {
        config,
        vm: VmState {
            pic_master: need(pm, "PIC master")?,
            pic_slave: need(ps, "PIC slave")?,
            ioapic: need(io, "IOAPIC")?,
            pit: need(pit, "PIT")?,
            clock: need(clock, "CLOCK")?,
        },
        vcpus,
        devices: DeviceStates {
            serial: need(serial, "SERIAL")?,
            virtio: virtio.finish()?,
        },
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn sample() -> MachineState {
        let regs = kvm_regs {
            rip: 0x1234,
            ..Default::default()
        };
        let vcpu = |id| VcpuState {
            id,
            mp_state: kvm_mp_state { mp_state: 3 },
            regs,
            sregs: kvm_sregs::default(),
            xsave: vec![7; 1024],
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            tsc_khz: Some(2_000_000),
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 9,
                ..Default::default()
            }],
            msrs: vec![(0x10, 99), (0x6e0, 5)],
            events: kvm_vcpu_events::default(),
        };
        MachineState {
            config: MachineConfig {
                mem_size: 64 << 20,
                vcpus: 2,
                cmdline: Some("console=ttyS0 reboot=k".into()),
                kernel: "embedded".into(),
            },
            vm: VmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data {
                    clock: 42,
                    ..Default::default()
                },
            },
            vcpus: vec![vcpu(0), vcpu(1)],
            devices: DeviceStates {
                virtio: Vec::new(),
                serial: SerialState {
                    in_buffer: vec![1, 2, 3],
                    ..Default::default()
                },
            },
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let st = sample();
        let bytes = encode(&st);
        assert_eq!(bytes.len() % 8, 0);
        let back = decode(&bytes).unwrap();
        assert_eq!(encode(&back), bytes);
        assert_eq!(back.config, st.config);
        assert_eq!(back.vcpus[1].regs.rip, 0x1234);
        assert_eq!(back.vcpus[0].msrs, vec![(0x10, 99), (0x6e0, 5)]);
        assert_eq!(back.devices.serial.in_buffer, vec![1, 2, 3]);
    }

    #[test]
    fn truncation_and_garbage_are_rejected() {
        let bytes = encode(&sample());
        for cut in [0, 7, 8, 100, bytes.len() - 8, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        let mut bad = bytes.clone();
        bad[0] = 0x77;
        assert!(decode(&bad).is_err());
    }
}
