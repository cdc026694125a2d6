//! A small userfaultfd wrapper: the handful of ioctls consnap needs for
//! copy-on-write snapshots (write-protect mode) and lazy restore
//! (missing-page mode), written against the kernel UAPI
//! (`include/uapi/linux/userfaultfd.h`) over `libc`, so that building needs
//! no bindgen or libclang.
//!
//! The descriptor is never created user-mode-only: KVM touches guest memory
//! from kernel mode (`KVM_RUN` faulting pages in, kvmclock updates), and a
//! user-mode-only userfaultfd would fail those accesses with `EFAULT`.
//! Creating it therefore needs `CAP_SYS_PTRACE` (root has it), read-write
//! access to `/dev/userfaultfd`, or `vm.unprivileged_userfaultfd = 1`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// `UFFD_API`.
const API: u64 = 0xaa;
const IOC_TYPE: u64 = 0xaa;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (IOC_TYPE << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (IOC_TYPE << 8) | nr
}

const UFFDIO_API: u64 = iowr(0x3f, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (`_IO(0xAA, 0x00)`).
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;

/// Feature bits of `struct uffdio_api`.
pub mod feature {
    /// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// The faulting thread's id is reported.
    pub const THREAD_ID: u64 = 1 << 8;
    /// Write-protect also applies to pages that were never populated.
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    /// Asynchronous write-protect (not used: it cannot copy before a write).
    pub const WP_ASYNC: u64 = 1 << 15;
}

/// How a range is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Faults on pages that are not present (`UFFDIO_REGISTER_MODE_MISSING`).
    Missing,
    /// Writes to write-protected pages (`UFFDIO_REGISTER_MODE_WP`).
    WriteProtect,
    /// Both.
    MissingAndWriteProtect,
}

impl Mode {
    fn bits(self) -> u64 {
        match self {
            Mode::Missing => 1,
            Mode::WriteProtect => 2,
            Mode::MissingAndWriteProtect => 3,
        }
    }
}

/// userfaultfd errors. Each names the operation and, where it helps, what to change.
#[derive(Debug, Error)]
pub enum UffdError {
    /// The descriptor could not be created with kernel-mode fault handling.
    #[error(
        "cannot create a userfaultfd that handles kernel-mode faults ({source}): run as root \
         (CAP_SYS_PTRACE), give this user read-write access to /dev/userfaultfd, or set \
         sysctl vm.unprivileged_userfaultfd=1"
    )]
    Permission {
        /// The last error seen.
        source: io::Error,
    },
    /// The kernel lacks a feature.
    #[error("this kernel's userfaultfd lacks {0}")]
    Missing(&'static str),
    /// An ioctl or read failed.
    #[error("userfaultfd {op} on [{start:#x}, +{len:#x}) failed: {source}")]
    Op {
        /// The operation.
        op: &'static str,
        /// Start address.
        start: u64,
        /// Length.
        len: u64,
        /// errno.
        source: io::Error,
    },
}

#[repr(C)]
#[derive(Default)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct WriteProtectArg {
    range: Range,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct ZeroPageArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`, 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    arg: [u64; 3],
}

const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const WP_MODE_WP: u64 = 1 << 0;
const WP_MODE_DONTWAKE: u64 = 1 << 1;
const COPY_MODE_WP: u64 = 1 << 1;

/// One event read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (page aligned unless the exact-address feature is on).
    Fault {
        /// Faulting address.
        addr: u64,
        /// A write access.
        write: bool,
        /// The page was write-protected (otherwise it was missing).
        wp: bool,
    },
    /// An event consnap does not subscribe to (fork, remap, remove, unmap).
    Other(u8),
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    /// Tests only: the next `UFFDIO_COPY` stops after this many bytes (0: off).
    #[cfg(test)]
    cut: std::sync::atomic::AtomicU64,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl Uffd {
    /// Create a non-blocking, close-on-exec userfaultfd that handles
    /// kernel-mode faults, asking for `features` (all of which must be
    /// granted). Tries the `userfaultfd` system call, then `/dev/userfaultfd`.
    pub fn new(features: u64) -> Result<Uffd, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd system call takes one integer flag word and
        // returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if raw >= 0 {
            // SAFETY: the kernel just returned this descriptor; we own it.
            unsafe { OwnedFd::from_raw_fd(raw as RawFd) }
        } else {
            let sys_err = last_err();
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/userfaultfd")
                .map_err(|_| UffdError::Permission { source: sys_err })?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as
            // its integer argument and returns the descriptor.
            let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if raw < 0 {
                return Err(UffdError::Permission { source: last_err() });
            }
            // SAFETY: as above, a descriptor the kernel just returned.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        let mut api = ApiArg {
            api: API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one struct uffdio_api, which `api` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            let e = last_err();
            // EINVAL: a requested feature is unknown to this kernel.
            return Err(if e.raw_os_error() == Some(libc::EINVAL) {
                UffdError::Missing(feature_names(features))
            } else {
                UffdError::Op {
                    op: "UFFDIO_API",
                    start: 0,
                    len: 0,
                    source: e,
                }
            });
        }
        if api.features & features != features {
            return Err(UffdError::Missing(feature_names(features & !api.features)));
        }
        Ok(Uffd {
            fd,
            features: api.features,
            #[cfg(test)]
            cut: Default::default(),
        })
    }

    /// Features the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// One ioctl: Ok, or its errno.
    fn call<T>(&self, req: u64, arg: &mut T) -> Result<(), io::Error> {
        // SAFETY: every caller passes the struct that `req` is defined on,
        // and the kernel only reads and writes within it.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if r == 0 { Ok(()) } else { Err(last_err()) }
    }

    /// An ioctl that can be repeated unchanged: `EAGAIN` (the range is being
    /// remapped) and `EINTR` are retried. Not for the fill ioctls, which
    /// report partial progress (see [`Uffd::fill`]).
    fn ioctl<T>(&self, op: &'static str, req: u64, arg: &mut T, start: u64, len: u64) -> Result<(), UffdError> {
        loop {
            let e = match self.call(req, arg) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EINTR) {
                std::hint::spin_loop();
                continue;
            }
            return Err(UffdError::Op {
                op,
                start,
                len,
                source: e,
            });
        }
    }

    /// Fill `[dst, dst + len)` with a fill ioctl (`UFFDIO_COPY`,
    /// `UFFDIO_ZEROPAGE`). `once(offset, remaining)` makes one call over
    /// `[dst + offset, dst + len)` and returns its errno (None: all of it
    /// done) and the progress field the kernel wrote: bytes installed when
    /// positive. The kernel stops at the first page it cannot fill; after
    /// installing some it reports them with `EAGAIN`, so the next call
    /// starts past them. A page already present (`EEXIST`) is left as it
    /// is (the first installation wins), its waiters are woken, and the
    /// fill goes on after it.
    fn fill(
        &self,
        op: &'static str,
        dst: u64,
        len: u64,
        mut once: impl FnMut(u64, u64) -> (Option<io::Error>, i64),
    ) -> Result<(), UffdError> {
        let page = page_size();
        let mut at = 0;
        while at < len {
            let (err, progress) = once(at, len - at);
            let Some(e) = err else {
                return Ok(());
            };
            if progress > 0 {
                at += (progress as u64).min(len - at);
                continue;
            }
            match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    let n = page.min(len - at);
                    self.wake(dst + at, n)?;
                    at += n;
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) => std::hint::spin_loop(),
                _ => {
                    return Err(UffdError::Op {
                        op,
                        start: dst + at,
                        len: len - at,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Register `[start, start + len)` (page aligned) in `mode`.
    pub fn register(&self, start: u64, len: u64, mode: Mode) -> Result<(), UffdError> {
        let mut arg = RegisterArg {
            range: Range { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", UFFDIO_REGISTER, &mut arg, start, len)
    }

    /// Unregister a range; any write protection on it is dropped.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = Range { start, len };
        self.ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, &mut arg, start, len)
    }

    /// Write-protect `[start, start + len)`.
    pub fn protect(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = WriteProtectArg {
            range: Range { start, len },
            mode: WP_MODE_WP,
        };
        self.ioctl("UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT, &mut arg, start, len)
    }

    /// Lift write protection from `[start, start + len)` and wake the
    /// threads waiting on it (unless `wake` is false).
    pub fn unprotect(&self, start: u64, len: u64, wake: bool) -> Result<(), UffdError> {
        let mut arg = WriteProtectArg {
            range: Range { start, len },
            mode: if wake { 0 } else { WP_MODE_DONTWAKE },
        };
        self.ioctl("UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT, &mut arg, start, len)
    }

    /// Wake threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = Range { start, len };
        self.ioctl("UFFDIO_WAKE", UFFDIO_WAKE, &mut arg, start, len)
    }

    /// Install `len` bytes from `src` at the missing pages `[dst, dst + len)`
    /// and wake the faulting threads; with `wp` the pages arrive
    /// write-protected. Pages already present (`EEXIST`) are left as they
    /// are, page by page: the first installation wins, and every other
    /// page of the range is installed.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64, wp: bool) -> Result<(), UffdError> {
        let mode = if wp { COPY_MODE_WP } else { 0 };
        self.fill("UFFDIO_COPY", dst, len, |at, rest| {
            let mut arg = CopyArg {
                dst: dst + at,
                src: src as u64 + at,
                len: rest,
                mode,
                copy: 0,
            };
            let r = self.copy_once(&mut arg);
            (r.err(), arg.copy)
        })
    }

    /// One `UFFDIO_COPY` call.
    #[cfg(not(test))]
    fn copy_once(&self, arg: &mut CopyArg) -> Result<(), io::Error> {
        self.call(UFFDIO_COPY, arg)
    }

    /// Install zero pages at the missing pages `[dst, dst + len)` and wake;
    /// pages already present are left as they are, as in [`Uffd::copy`].
    pub fn zeropage(&self, dst: u64, len: u64) -> Result<(), UffdError> {
        self.fill("UFFDIO_ZEROPAGE", dst, len, |at, rest| {
            let mut arg = ZeroPageArg {
                range: Range {
                    start: dst + at,
                    len: rest,
                },
                mode: 0,
                zeropage: 0,
            };
            let r = self.call(UFFDIO_ZEROPAGE, &mut arg);
            (r.err(), arg.zeropage)
        })
    }

    /// Read pending events without blocking; returns how many were stored.
    pub fn read_events(&self, out: &mut [Event]) -> Result<usize, UffdError> {
        let mut raw = [RawMsg::default(); 32];
        let want = raw.len().min(out.len());
        // SAFETY: reading at most `want` uffd_msg structs into a buffer that holds them.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                raw.as_mut_ptr().cast(),
                want * std::mem::size_of::<RawMsg>(),
            )
        };
        if n < 0 {
            let e = last_err();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(UffdError::Op {
                op: "read",
                start: 0,
                len: 0,
                source: e,
            });
        }
        let count = n as usize / std::mem::size_of::<RawMsg>();
        for (o, m) in out.iter_mut().zip(&raw[..count]) {
            *o = if m.event == EVENT_PAGEFAULT {
                Event::Fault {
                    addr: m.arg[1],
                    write: m.arg[0] & PAGEFAULT_FLAG_WRITE != 0,
                    wp: m.arg[0] & PAGEFAULT_FLAG_WP != 0,
                }
            } else {
                Event::Other(m.event)
            };
        }
        Ok(count)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The base page size: the unit the fill ioctls install in on anonymous memory.
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

fn feature_names(bits: u64) -> &'static str {
    if bits & feature::WP_UNPOPULATED != 0 {
        "UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4 or later)"
    } else if bits & feature::PAGEFAULT_FLAG_WP != 0 {
        "write-protect support (UFFD_FEATURE_PAGEFAULT_FLAG_WP, Linux 5.7 or later)"
    } else {
        "a requested feature"
    }
}

/// Wait until one of `fds` is readable, or `timeout_ms` passes (-1 =
/// forever); `ready[i]` tells whether `fds[i]` is. An interrupted wait
/// returns with nothing ready.
pub fn poll_fds<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: poll reads and writes the N pollfd entries of `p`.
    let r = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = last_err();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(p.map(|x| x.revents != 0))
}

/// Wait until `fd` or `stop` is readable, or `timeout_ms` passes (-1 = forever).
/// Returns (fd readable, stop readable).
pub fn poll2(fd: RawFd, stop: RawFd, timeout_ms: i32) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll reads and writes the two pollfd entries of `fds`.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if r < 0 {
        let e = last_err();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(e);
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}

/// Test seam: copies cut short as the kernel cuts them.
#[cfg(test)]
impl Uffd {
    /// Make the next `UFFDIO_COPY` stop after `bytes` (a whole number of pages).
    fn cut_next_copy(&self, bytes: u64) {
        self.cut.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// One `UFFDIO_COPY` call; a pending cut installs only its first bytes
    /// and reports them as the kernel reports a copy it stopped part way:
    /// the count in `copy`, `EAGAIN`.
    fn copy_once(&self, arg: &mut CopyArg) -> Result<(), io::Error> {
        let cut = self.cut.swap(0, std::sync::atomic::Ordering::Relaxed);
        if cut == 0 || cut >= arg.len {
            return self.call(UFFDIO_COPY, arg);
        }
        let full = arg.len;
        arg.len = cut;
        let r = self.call(UFFDIO_COPY, arg);
        arg.len = full;
        r.and(Err(io::Error::from_raw_os_error(libc::EAGAIN)))
    }
}

#[cfg(test)]
mod tests;
