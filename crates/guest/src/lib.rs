//! The consnap workload guest: the image, embedded, and what the host
//! knows of it ([`host`]).
//!
//! `build.rs` compiles `image/` (ring-0 assembly plus `#![no_std]` ring-3
//! Rust that links the `workload` crate) with the host toolchain into a
//! static ELF with a PVH entry note.

pub mod host;

/// The guest ELF image. It boots through its PVH note in consnap and in
/// `qemu-system-x86_64 -kernel`.
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/consnap-guest.elf"));

#[cfg(test)]
mod tests {
    #[test]
    fn image_is_an_elf64_with_a_pvh_note() {
        let elf = super::GUEST_ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELF64");
        // The PVH note: name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
        let needle = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
        assert!(elf.windows(needle.len()).any(|w| w == needle));
    }
}
