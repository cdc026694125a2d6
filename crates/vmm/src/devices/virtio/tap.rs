//! A TAP device: the host end of a virtio-net device.
//!
//! `Tap::open(NAME)` attaches to the TAP of that name (made with `ip tuntap
//! add`, and kept), or creates it when absent; one consnap creates lives as
//! long as consnap holds it and vanishes when consnap exits (also on kill
//! -9: the kernel removes a TAP that is not persistent when its last file
//! closes). Frames go through without a virtio-net header (no offloads are
//! offered to the guest) and without packet information.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Errors of a TAP device, naming it.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?}: give 1 to 15 bytes of letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("TAP {name}: cannot open /dev/net/tun: {source} (consnap needs CAP_NET_ADMIN to create a TAP)")]
    Open { name: String, source: std::io::Error },
    #[error("TAP {name}: TUNSETIFF failed: {source} (is it a TUN device, or held by another process?)")]
    Attach { name: String, source: std::io::Error },
    #[error("TAP {name}: cannot bring the link up: {source}")]
    Up { name: String, source: std::io::Error },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;

/// `struct ifreq` with the flags member of its union (40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

/// Whether `name` can name a network interface.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Tap {
    /// Attach to the TAP `name`, creating it (and bringing its link up) when
    /// absent.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::Name(name.to_string()));
        }
        let existed = std::path::Path::new("/sys/class/net").join(name).exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq::new(name);
        req.flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
        // lays out (40 bytes, name then flags); the fd is /dev/net/tun.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        if !existed {
            link_up(name).map_err(|source| TapError::Up {
                name: name.to_string(),
                source,
            })?;
        }
        Ok(Tap {
            file,
            name: name.to_string(),
            created: !existed,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether consnap created it (it goes when consnap exits).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Read one frame into `buf`; `WouldBlock` when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Write one frame. A full host queue is waited out briefly; a frame
    /// the host still cannot take is lost, as on a wire.
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        for _ in 0..100 {
            match (&self.file).write(frame) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::ErrorKind::WouldBlock.into())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Set IFF_UP on interface `name`.
fn link_up(name: &str) -> std::io::Result<()> {
    // SAFETY: a plain socket(2) call; the fd is owned by the File below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let sock = unsafe { File::from_raw_fd(fd) };
    let mut req = IfReq::new(name);
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write a `struct ifreq`
    // laid out by `req`; `sock` is a socket.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as i16;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut IfReq) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("tap0"));
        assert!(valid_name("cs-net_1.2"));
        for bad in ["", ".", "..", "a/b", "a b", "0123456789abcdef", "tap\n"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(matches!(Tap::open("a/b"), Err(TapError::Name(_))));
    }

    #[test]
    fn the_ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
