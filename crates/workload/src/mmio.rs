//! virtio-mmio devices named on the guest command line.
//!
//! A VMM tells the guest where its virtio-mmio transports are with Linux's
//! words `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`: consnap writes
//! e.g. `virtio_mmio.device=4K@0xd0000000:5`, QEMU's `microvm` machine with
//! `acpi=off` appends `virtio_mmio.device=512@0xfeb00e00:12` for each of its
//! transports. The syntax follows Linux (drivers/virtio/virtio_mmio.c):
//! `size` as `memparse` reads it (decimal, `0x` hex or `0` octal, with an
//! optional K, M, G, T, P or E suffix in either case), `base` as `%lli`
//! (decimal, `0x` hex or `0` octal, no suffix), `irq` and `id` decimal.

/// The key of the words.
pub const KEY: &str = "virtio_mmio.device";

/// One `virtio_mmio.device=` word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Bytes of the register window (at least 0x100 plus the device config).
    pub size: u64,
    /// Guest-physical address of the registers.
    pub base: u64,
    /// The interrupt line (an IOAPIC pin on x86).
    pub irq: u32,
    /// Linux's platform-device id, if given.
    pub id: Option<u32>,
}

/// An unsigned integer as C's `strtoull(s, _, 0)` reads it: `0x`/`0X` hex,
/// a leading `0` octal, else decimal. Returns the value and the rest of `s`.
fn c_number(s: &str) -> Option<(u64, &str)> {
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') && s.as_bytes()[1].is_ascii_digit() {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let len = digits.bytes().take_while(|b| char::from(*b).is_digit(radix)).count();
    if len == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for b in digits[..len].bytes() {
        let d = char::from(b).to_digit(radix)?;
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some((n, &digits[len..]))
}

/// A size as Linux's `memparse` reads it: [`c_number`] and an optional
/// binary suffix.
fn memparse(s: &str) -> Option<(u64, &str)> {
    let (n, rest) = c_number(s)?;
    let shift = match rest.bytes().next() {
        Some(b'k' | b'K') => 10,
        Some(b'm' | b'M') => 20,
        Some(b'g' | b'G') => 30,
        Some(b't' | b'T') => 40,
        Some(b'p' | b'P') => 50,
        Some(b'e' | b'E') => 60,
        _ => return Some((n, rest)),
    };
    let v = n.checked_mul(1u64.checked_shl(shift)?)?;
    (v >> shift == n).then_some((v, &rest[1..]))
}

fn decimal_u32(s: &str) -> Option<(u32, &str)> {
    let len = s.bytes().take_while(u8::is_ascii_digit).count();
    if len == 0 {
        return None;
    }
    let v = s[..len].parse().ok()?;
    Some((v, &s[len..]))
}

/// Parse the value of a `virtio_mmio.device=` word: `SIZE@BASE:IRQ[:ID]`.
pub fn parse_device(value: &str) -> Option<MmioDevice> {
    let (size, rest) = memparse(value)?;
    let rest = rest.strip_prefix('@')?;
    let (base, rest) = c_number(rest)?;
    let rest = rest.strip_prefix(':')?;
    let (irq, rest) = decimal_u32(rest)?;
    let id = match rest.strip_prefix(':') {
        None if rest.is_empty() => None,
        None => return None,
        Some(r) => match decimal_u32(r)? {
            (id, "") => Some(id),
            _ => return None,
        },
    };
    if size == 0 || base.checked_add(size).is_none() {
        return None;
    }
    Some(MmioDevice { size, base, irq, id })
}

/// The devices named on `cmdline`, in order. Words whose value does not
/// parse are left out ([`crate::Spec::parse`] rejects them).
pub fn devices(cmdline: &str) -> impl Iterator<Item = MmioDevice> + '_ {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == KEY)
        .filter_map(|(_, v)| parse_device(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(size: u64, base: u64, irq: u32, id: Option<u32>) -> Option<MmioDevice> {
        Some(MmioDevice { size, base, irq, id })
    }

    #[test]
    fn parses_what_consnap_and_qemu_write() {
        assert_eq!(parse_device("4K@0xd0000000:5"), dev(4096, 0xd000_0000, 5, None));
        assert_eq!(parse_device("512@0xfeb00e00:12"), dev(512, 0xfeb0_0e00, 12, None));
        assert_eq!(parse_device("0x200@0xFEB00000:5:3"), dev(512, 0xfeb0_0000, 5, Some(3)));
        assert_eq!(parse_device("1m@4096:10"), dev(1 << 20, 4096, 10, None));
        assert_eq!(
            parse_device("4k@010:7"),
            dev(4096, 8, 7, None),
            "leading 0 is octal, as in C"
        );
        assert_eq!(parse_device("0x1K@0x0:0"), dev(1024, 0, 0, None));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "4K",
            "4K@",
            "4K@0xd0000000",
            "4K@0xd0000000:",
            "4K@0xd0000000:x",
            "4K@0xd0000000:5:",
            "4K@0xd0000000:5:1:2",
            "4K@0xd0000000:5 ",
            "4K@0xd0000000K:5",
            "0@0xd0000000:5",
            "4Q@0xd0000000:5",
            "@0xd0000000:5",
            "4K@0x:5",
            "4K@0xd0000000:-5",
            "4K@0xd0000000:99999999999",
            "16E@0x1:5",
            "4K@0xffffffffffffffff:5",
            "4K@99999999999999999999:5",
        ] {
            assert_eq!(parse_device(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn collects_every_device_word_in_order() {
        let line = "virtio_mmio.device=512@0xfeb00000:5 workload=ftp disk=on virtio_mmio.device=4K@0xd0000000:6:1";
        let all: [Option<MmioDevice>; 3] = {
            let mut it = devices(line);
            [it.next(), it.next(), it.next()]
        };
        assert_eq!(
            all,
            [dev(512, 0xfeb0_0000, 5, None), dev(4096, 0xd000_0000, 6, Some(1)), None]
        );
        assert_eq!(devices("workload=ftp").count(), 0);
    }
}
