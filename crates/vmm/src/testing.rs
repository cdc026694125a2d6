//! Support for tests of consnap's crates: whether KVM tests may run, and a
//! minimal PVH kernel around a few bytes of 32-bit guest code, in the style
//! of kvm-ioctls' tests.

/// True when KVM tests can run. Under `CONSNAP_REQUIRE_KVM=1` a missing or
/// unusable /dev/kvm panics (fails the test) instead of skipping it.
pub fn kvm_ready() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) if std::env::var("CONSNAP_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("CONSNAP_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}")
        }
        Err(e) => {
            eprintln!("skipping: /dev/kvm unusable ({e})");
            false
        }
    }
}

/// Where [`pvh_elf`] loads its code and enters.
pub const LOAD: u64 = 0x10_0000;

/// A minimal ELF64 whose only segment is `code` at 1 MiB, entered through a
/// PVH note in 32-bit protected mode.
pub fn pvh_elf(code: &[u8]) -> &'static [u8] {
    let mut f = vec![0u8; 0x1000];
    f[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let put = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &0x3eu16.to_le_bytes()); // x86-64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &LOAD.to_le_bytes()); // e_entry
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
    // PT_LOAD
    let ph = 64;
    put(&mut f, ph, &1u32.to_le_bytes());
    put(&mut f, ph + 4, &7u32.to_le_bytes());
    put(&mut f, ph + 8, &0x1000u64.to_le_bytes());
    put(&mut f, ph + 16, &LOAD.to_le_bytes());
    put(&mut f, ph + 24, &LOAD.to_le_bytes());
    put(&mut f, ph + 32, &(code.len() as u64).to_le_bytes());
    put(&mut f, ph + 40, &(code.len() as u64).to_le_bytes());
    put(&mut f, ph + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE
    let ph = 64 + 56;
    put(&mut f, ph, &4u32.to_le_bytes());
    put(&mut f, ph + 4, &4u32.to_le_bytes());
    put(&mut f, ph + 8, &0x200u64.to_le_bytes());
    put(&mut f, ph + 32, &20u64.to_le_bytes());
    put(&mut f, ph + 40, &20u64.to_le_bytes());
    put(&mut f, ph + 48, &4u64.to_le_bytes());
    // The note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY, desc = entry.
    put(
        &mut f,
        0x200,
        &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0],
    );
    put(&mut f, 0x210, &(LOAD as u32).to_le_bytes());
    f.extend_from_slice(code);
    Box::leak(f.into_boxed_slice())
}
