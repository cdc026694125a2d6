//! A disk image: a raw file the guest reads and writes through virtio-blk,
//! locked against a second VMM, and captured in every epoch as a
//! [`Region`] (see `crate::region`): the image tracks the units the guest
//! writes and copies a frozen unit aside before overwriting it.
//!
//! A lazily restored disk starts as an empty image of the right size whose
//! units arrive from a [`UnitSource`] (the snapshot store): a unit the
//! guest reads, or writes only in part, is fetched and written into the
//! image first, and a fill thread ([`DiskImage::fill`]) brings in the rest;
//! once every unit is in, the image is an ordinary one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

use crate::dirty::PageBits;
use crate::region::{Region, RegionInfo, RegionKind, UNIT};

/// Sector size of virtio-blk.
pub const SECTOR: u64 = 512;
/// Smallest image consnap attaches.
pub const MIN_BYTES: u64 = UNIT;

/// Errors opening a disk image; each names the file.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The file cannot be opened.
    #[error("cannot open disk image {path}{hint}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// What the user can do.
        hint: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// Not a regular file.
    #[error("disk image {0} is not a regular file")]
    NotAFile(PathBuf),
    /// Size unusable.
    #[error("disk image {path} is {bytes} bytes: it must be a multiple of {SECTOR} bytes and at least {MIN_BYTES}")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Another process holds the image.
    #[error("disk image {0} is in use by another process (it holds the image's lock)")]
    Busy(PathBuf),
    /// The image changed size under the VM.
    #[error("disk image {path} changed size from {was} to {now} bytes while the VM ran: another process writes it")]
    Resized {
        /// The image.
        path: PathBuf,
        /// Size when attached.
        was: u64,
        /// Size now.
        now: u64,
    },
    /// Another I/O call failed.
    #[error("disk image {path}: {op}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        source: io::Error,
    },
}

/// Where the units of a lazily restored disk come from.
pub trait UnitSource: Send + Sync {
    /// Units `[first, first + buf.len() / 4096)`, verified (bytes past the
    /// image's end are zero).
    fn read_units(&self, first: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A disk still filling from its source.
struct Lazy {
    source: std::sync::Arc<dyn UnitSource>,
    /// Units already in the image.
    filled: PageBits,
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy").field("filled", &self.filled.count()).finish()
    }
}

/// The epoch being saved: which units are still to be read as they were
/// at the pause, and the ones the guest overwrote since, copied aside.
#[derive(Debug)]
struct Frozen {
    pending: PageBits,
    aside: BTreeMap<u64, Box<[u8]>>,
}

#[derive(Debug)]
struct Track {
    /// Units written since the last `take_dirty`.
    dirty: PageBits,
    frozen: Option<Frozen>,
    /// Units still to arrive from the store (a lazy restore).
    lazy: Option<Lazy>,
}

/// A raw disk image attached to the VM.
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    file: File,
    readonly: bool,
    bytes: u64,
    track: Mutex<Track>,
    /// Test hook (mutation checks): overwrite frozen units without
    /// copying them aside first.
    #[cfg(feature = "testing")]
    skip_copy: std::sync::atomic::AtomicBool,
    /// Test hook: fail some writes or flushes (`CONSNAP_TEST_DISK_FAULT`).
    #[cfg(feature = "testing")]
    faults: Faults,
}

/// Test hook (feature `testing`): `CONSNAP_TEST_DISK_FAULT=write:N` or
/// `flush:N` makes the Nth write or flush of every image fail with EIO, as
/// a failing host disk would.
#[cfg(feature = "testing")]
#[derive(Debug, Default)]
struct Faults {
    write_at: Option<u64>,
    flush_at: Option<u64>,
    writes: std::sync::atomic::AtomicU64,
    flushes: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "testing")]
impl Faults {
    fn from_env() -> Faults {
        let v = std::env::var("CONSNAP_TEST_DISK_FAULT").unwrap_or_default();
        let at = |what: &str| v.strip_prefix(what).and_then(|n| n.parse().ok());
        Faults {
            write_at: at("write:"),
            flush_at: at("flush:"),
            ..Faults::default()
        }
    }

    /// Count one more operation; whether it is the one to fail.
    fn hit(count: &std::sync::atomic::AtomicU64, at: Option<u64>) -> io::Result<()> {
        let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if at == Some(n) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl DiskImage {
    /// Open `path` for the guest (read-only when `readonly`), and lock it:
    /// exclusively for writing, shared for reading, so that two VMs never
    /// write one image.
    pub fn open(path: &Path, readonly: bool) -> Result<DiskImage, DiskError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EISDIR) => DiskError::NotAFile(path.to_path_buf()),
                _ => DiskError::Open {
                    path: path.to_path_buf(),
                    hint: match source.raw_os_error() {
                        Some(libc::EACCES | libc::EROFS | libc::EPERM) if !readonly => {
                            " for writing (attach it with `,readonly` if the guest only reads it)"
                        }
                        _ => "",
                    },
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| DiskError::Io {
            path: path.to_path_buf(),
            op: "stat",
            source,
        })?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        }
        let bytes = meta.len();
        if bytes < MIN_BYTES || !bytes.is_multiple_of(SECTOR) {
            return Err(DiskError::Size {
                path: path.to_path_buf(),
                bytes,
            });
        }
        let op = if readonly { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let source = io::Error::last_os_error();
            return Err(if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Busy(path.to_path_buf())
            } else {
                DiskError::Io {
                    path: path.to_path_buf(),
                    op: "lock",
                    source,
                }
            });
        }
        let units = bytes.div_ceil(UNIT);
        Ok(DiskImage {
            path: path.to_path_buf(),
            file,
            readonly,
            bytes,
            track: Mutex::new(Track {
                dirty: PageBits::new(units),
                frozen: None,
                lazy: None,
            }),
            #[cfg(feature = "testing")]
            skip_copy: std::sync::atomic::AtomicBool::new(false),
            #[cfg(feature = "testing")]
            faults: Faults::from_env(),
        })
    }

    /// Test hook (mutation checks): from now on, overwrite frozen units
    /// without copying them aside (an epoch then saves what the guest wrote
    /// after its pause).
    #[cfg(feature = "testing")]
    pub fn test_skip_copy_aside(&self, on: bool) {
        self.skip_copy.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn copies_aside(&self) -> bool {
        #[cfg(feature = "testing")]
        return !self.skip_copy.load(std::sync::atomic::Ordering::Relaxed);
        #[cfg(not(feature = "testing"))]
        true
    }

    /// [`DiskImage::open`] an image whose units are to come from `source`
    /// (an empty image of the restored disk's size, made by the restore).
    pub fn open_lazy(
        path: &Path,
        readonly: bool,
        source: std::sync::Arc<dyn UnitSource>,
    ) -> Result<DiskImage, DiskError> {
        let d = DiskImage::open(path, readonly)?;
        let units = d.bytes.div_ceil(UNIT);
        d.lock().lazy = Some(Lazy {
            source,
            filled: PageBits::new(units),
        });
        Ok(d)
    }

    /// Units still to arrive from the store (0 once the disk is whole).
    pub fn missing(&self) -> u64 {
        self.lock()
            .lazy
            .as_ref()
            .map_or(0, |l| l.filled.pages() - l.filled.count())
    }

    /// Fetch the missing units of `units` that `whole` does not cover
    /// entirely (those are about to be overwritten whole) into the image;
    /// mark all of `units` filled.
    fn ensure(&self, t: &mut Track, units: std::ops::Range<u64>, whole: std::ops::Range<u64>) -> io::Result<()> {
        let Some(l) = &mut t.lazy else {
            return Ok(());
        };
        let mut buf = [0u8; UNIT as usize];
        for u in units {
            if l.filled.get(u) {
                continue;
            }
            if !whole.contains(&u) {
                l.source.read_units(u, &mut buf)?;
                let at = u * UNIT;
                let n = (self.bytes - at).min(UNIT) as usize;
                self.file.write_all_at(&buf[..n], at)?;
            }
            l.filled.set(u);
        }
        if l.filled.count() == l.filled.pages() {
            tracing::info!(disk = %self.path.display(), "lazily restored disk is whole");
            t.lazy = None;
        }
        Ok(())
    }

    /// Bring in up to `max` missing units (the fill thread calls this until
    /// it returns false: the disk is whole).
    pub fn fill(&self, max: u64) -> io::Result<bool> {
        let mut t = self.lock();
        let Some(l) = &t.lazy else {
            return Ok(false);
        };
        let first = l.filled.next_clear(0);
        let end = (first + max).min(l.filled.pages());
        let mut buf = vec![0u8; ((end - first) * UNIT) as usize];
        l.source.read_units(first, &mut buf)?;
        for u in first..end {
            if !l.filled.get(u) {
                let i = ((u - first) * UNIT) as usize;
                let at = u * UNIT;
                let n = (self.bytes - at).min(UNIT) as usize;
                self.file.write_all_at(&buf[i..i + n], at)?;
            }
        }
        self.ensure(&mut t, first..end, first..end)?;
        Ok(t.lazy.is_some())
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size in bytes, as attached.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Attached read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    fn lock(&self) -> MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The units `[offset, offset + len)` touches.
    fn units(offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / UNIT..(offset + len).div_ceil(UNIT)
    }

    /// Read `buf.len()` bytes at `offset` (inside the image).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the one iovec covers `buf`, which this call borrows mutably.
        unsafe { self.read_vectored_at(&iov, offset) }
    }

    /// Read into the buffers `iov` (in order) from `offset`, inside the image.
    ///
    /// # Safety
    /// Every iovec must point at memory writable for its whole length for
    /// the duration of the call, that no Rust reference aliases (guest
    /// memory, which only the kernel and volatile accesses touch, or a
    /// buffer the caller lends).
    pub unsafe fn read_vectored_at(&self, iov: &[libc::iovec], offset: u64) -> io::Result<()> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        {
            let mut t = self.lock();
            if t.lazy.is_some() {
                self.ensure(&mut t, Self::units(offset, len as u64), 0..0)?;
            }
        }
        // SAFETY: the caller's contract.
        unsafe { vectored(self.file.as_raw_fd(), iov, offset, len, false) }
    }

    /// Write `data` at `offset` (inside the image): frozen units it
    /// touches are copied aside first, and its units become dirty.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let iov = [libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        }];
        // SAFETY: the one iovec covers `data`, which this call borrows and
        // only reads.
        unsafe { self.write_vectored_at(&iov, offset) }
    }

    /// [`DiskImage::write_at`] of the buffers `iov`, in order.
    ///
    /// # Safety
    /// Every iovec must point at memory readable for its whole length for
    /// the duration of the call.
    pub unsafe fn write_vectored_at(&self, iov: &[libc::iovec], offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        self.before_write(offset, len as u64)?;
        #[cfg(feature = "testing")]
        Faults::hit(&self.faults.writes, self.faults.write_at)?;
        // SAFETY: the caller's contract; pwritev only reads the buffers.
        unsafe { vectored(self.file.as_raw_fd(), iov, offset, len, true) }
    }

    /// Before `len` bytes at `offset` are overwritten: fetch what a lazy
    /// disk still lacks, copy frozen units aside, and mark the units dirty.
    fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        let units = Self::units(offset, len);
        {
            let mut t = self.lock();
            // Units the write covers entirely need not arrive first,
            // unless an epoch being saved may want their old contents.
            let end = offset + len;
            let whole = match t.frozen {
                Some(_) => 0..0,
                None if end == self.bytes => offset.div_ceil(UNIT)..units.end,
                None => offset.div_ceil(UNIT)..end / UNIT,
            };
            self.ensure(&mut t, units.clone(), whole)?;
            if let Some(f) = t.frozen.as_mut().filter(|_| self.copies_aside()) {
                for u in units.clone() {
                    if f.pending.get(u) {
                        let mut unit = vec![0u8; UNIT as usize].into_boxed_slice();
                        self.read_unit(u, &mut unit)?;
                        f.aside.insert(u, unit);
                        f.pending.unset(u);
                    }
                }
            }
            t.dirty.set_span(units.start, units.end);
        }
        Ok(())
    }

    /// Make every completed write durable on the host.
    pub fn flush(&self) -> io::Result<()> {
        #[cfg(feature = "testing")]
        Faults::hit(&self.faults.flushes, self.faults.flush_at)?;
        self.file.sync_data()
    }

    /// Unit `u` of the file as it is now; bytes past the image's end are zero.
    fn read_unit(&self, u: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = u * UNIT;
        let n = (self.bytes - at).min(UNIT) as usize;
        self.file.read_exact_at(&mut buf[..n], at)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Check that the image still has the size it had when attached.
    pub fn check_size(&self) -> Result<(), DiskError> {
        let now = self
            .file
            .metadata()
            .map_err(|source| DiskError::Io {
                path: self.path.clone(),
                op: "stat",
                source,
            })?
            .len();
        if now != self.bytes {
            return Err(DiskError::Resized {
                path: self.path.clone(),
                was: self.bytes,
                now,
            });
        }
        Ok(())
    }

    /// Units holding data according to the file system (`SEEK_DATA` /
    /// `SEEK_HOLE`); every unit where it cannot tell.
    fn data_units(&self) -> io::Result<PageBits> {
        let units = self.bytes.div_ceil(UNIT);
        let mut bits = PageBits::new(units);
        let fd = self.file.as_raw_fd();
        let mut at: i64 = 0;
        let end = self.bytes as i64;
        while at < end {
            // SAFETY: lseek on a descriptor this image owns; no memory is passed.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    // No data after `at`.
                    Some(libc::ENXIO) => Ok(bits),
                    // The file system cannot tell: assume data everywhere.
                    Some(libc::EINVAL) => Ok(PageBits::full(units)),
                    _ => Err(e),
                };
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end } else { hole.min(end) };
            let r = Self::units(data as u64, (hole - data) as u64);
            bits.set_span(r.start, r.end.min(units));
            at = hole.max(data + 1);
        }
        Ok(bits)
    }
}

/// `preadv` or `pwritev` (`write`) of all `len` bytes of `iov` at
/// `offset`, going on after short transfers.
///
/// # Safety
/// As for [`DiskImage::read_vectored_at`] (reads) and
/// [`DiskImage::write_vectored_at`] (writes).
unsafe fn vectored(fd: i32, iov: &[libc::iovec], offset: u64, len: usize, write: bool) -> io::Result<()> {
    let mut v: Vec<libc::iovec> = iov.to_vec();
    let (mut first, mut done) = (0usize, 0usize);
    while done < len {
        let n = (v.len() - first).min(1024) as libc::c_int;
        let at = (offset + done as u64) as libc::off_t;
        // SAFETY: the iovecs from `first` on describe memory the caller
        // vouches for (see the function's contract).
        let r = unsafe {
            if write {
                libc::pwritev(fd, v[first..].as_ptr(), n, at)
            } else {
                libc::preadv(fd, v[first..].as_ptr(), n, at)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            // Past the end of the file (truncated under the VM).
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut r = r as usize;
        done += r;
        while first < v.len() && r >= v[first].iov_len {
            r -= v[first].iov_len;
            first += 1;
        }
        if r > 0 {
            let cur = &mut v[first];
            // SAFETY: r < iov_len, so the new base stays inside the same buffer.
            cur.iov_base = unsafe { cur.iov_base.cast::<u8>().add(r) }.cast();
            cur.iov_len -= r;
        }
    }
    Ok(())
}

impl Region for DiskImage {
    fn info(&self) -> RegionInfo {
        RegionInfo {
            kind: RegionKind::Disk,
            bytes: self.bytes,
            readonly: self.readonly,
            name: format!("disk {}", self.path.display()),
        }
    }

    fn take_dirty(&self) -> PageBits {
        let mut t = self.lock();
        let units = t.dirty.pages();
        std::mem::replace(&mut t.dirty, PageBits::new(units))
    }

    fn mark_dirty(&self, units: &PageBits) {
        self.lock().dirty.or(units);
    }

    fn populated(&self) -> io::Result<PageBits> {
        let t = self.lock();
        if let Some(l) = &t.lazy {
            // Units still in the store may hold data: read them all.
            return Ok(PageBits::full(l.filled.pages()));
        }
        drop(t);
        self.data_units()
    }

    fn freeze(&self, units: PageBits) {
        self.lock().frozen = Some(Frozen {
            pending: units,
            aside: BTreeMap::new(),
        });
    }

    fn read_frozen(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut t = self.lock();
        let Some(f) = &mut t.frozen else {
            return Err(io::Error::other("no epoch is frozen"));
        };
        let n = (buf.len() as u64).div_ceil(UNIT);
        let pending_any = (first..first + n).any(|u| f.pending.get(u));
        if pending_any && t.lazy.is_some() {
            self.ensure(&mut t, first..first + n, 0..0)?;
        }
        let Some(f) = &mut t.frozen else {
            return Err(io::Error::other("no epoch is frozen"));
        };
        for (i, unit) in buf.chunks_mut(UNIT as usize).enumerate() {
            let u = first + i as u64;
            if f.pending.get(u) {
                self.read_unit(u, unit)?;
                f.pending.unset(u);
            } else if let Some(copy) = f.aside.remove(&u) {
                unit.copy_from_slice(&copy[..unit.len()]);
            } else {
                return Err(io::Error::other(format!(
                    "unit {u} of {} is not part of the frozen epoch",
                    self.path.display()
                )));
            }
        }
        Ok(())
    }

    fn thaw(&self) {
        self.lock().frozen = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDir;

    fn image(dir: &TestDir, name: &str, bytes: u64) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
        p
    }

    #[test]
    fn frozen_units_read_as_at_the_freeze_whatever_the_guest_writes() {
        let dir = TestDir::new(std::env::temp_dir(), "disk-freeze");
        let d = DiskImage::open(&image(&dir, "d.img", 64 << 10), false).unwrap();
        d.write_at(&[1u8; 8192], 0).unwrap();
        assert_eq!(d.take_dirty().iter().collect::<Vec<_>>(), vec![0, 1]);
        let mut units = PageBits::new(16);
        units.set_span(0, 3);
        d.freeze(units);
        // The guest overwrites unit 1 and half of unit 2 after the pause.
        d.write_at(&[2u8; 6144], 4096).unwrap();
        let mut got = vec![0u8; 3 * 4096];
        d.read_frozen(0, &mut got).unwrap();
        assert!(got[..8192].iter().all(|&b| b == 1));
        assert!(got[8192..].iter().all(|&b| b == 0));
        // Read once: a unit no longer frozen is refused.
        assert!(d.read_frozen(1, &mut [0u8; 4096]).is_err());
        d.thaw();
        assert_eq!(d.take_dirty().iter().collect::<Vec<_>>(), vec![1, 2]);
        let mut now = [0u8; 4096];
        d.read_at(&mut now, 4096).unwrap();
        assert!(now.iter().all(|&b| b == 2));
    }

    #[test]
    fn bad_images_are_refused_with_their_name() {
        let dir = TestDir::new(std::env::temp_dir(), "disk-bad");
        let missing = dir.path().join("none.img");
        let e = DiskImage::open(&missing, false).unwrap_err();
        assert!(e.to_string().contains("none.img"), "{e}");
        let small = image(&dir, "small.img", 512);
        assert!(matches!(
            DiskImage::open(&small, false),
            Err(DiskError::Size { bytes: 512, .. })
        ));
        let odd = image(&dir, "odd.img", 8192 + 100);
        assert!(matches!(DiskImage::open(&odd, false), Err(DiskError::Size { .. })));
        assert!(matches!(DiskImage::open(dir.path(), true), Err(DiskError::NotAFile(_))));
        let ok = image(&dir, "ok.img", 1 << 20);
        let held = DiskImage::open(&ok, false).unwrap();
        assert!(matches!(DiskImage::open(&ok, false), Err(DiskError::Busy(_))));
        assert!(matches!(DiskImage::open(&ok, true), Err(DiskError::Busy(_))));
        drop(held);
        let ro = DiskImage::open(&ok, true).unwrap();
        let _ro2 = DiskImage::open(&ok, true).unwrap();
        assert!(ro.write_at(&[0u8; 512], 0).is_err());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&ok)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        assert!(matches!(ro.check_size(), Err(DiskError::Resized { now, .. }) if now == 2 << 20));
    }

    /// A source whose unit u is all (u + 1), counting what it is asked for.
    struct Counting(std::sync::atomic::AtomicU64);

    impl UnitSource for Counting {
        fn read_units(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
            for (i, unit) in buf.chunks_mut(UNIT as usize).enumerate() {
                unit.fill(first as u8 + i as u8 + 1);
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        }
    }

    #[test]
    fn a_lazy_disk_fetches_what_is_read_or_partly_written_and_fills_the_rest() {
        let dir = TestDir::new(std::env::temp_dir(), "disk-lazy");
        let p = image(&dir, "lazy.img", 8 * UNIT);
        let src = std::sync::Arc::new(Counting(std::sync::atomic::AtomicU64::new(0)));
        let d = DiskImage::open_lazy(&p, false, src.clone()).unwrap();
        let asked = || src.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(d.missing(), 8);
        let mut b = [0u8; 512];
        d.read_at(&mut b, 2 * UNIT + 512).unwrap();
        assert!(b.iter().all(|&x| x == 3));
        assert_eq!(asked(), 1);
        // A write covering unit 4 whole and unit 5 in part fetches unit 5 only.
        d.write_at(&[9u8; 4096 + 100], 4 * UNIT).unwrap();
        assert_eq!(asked(), 2);
        d.read_at(&mut b, 5 * UNIT).unwrap();
        assert!(b[..100].iter().all(|&x| x == 9) && b[100..].iter().all(|&x| x == 6));
        // A frozen unit not in the image yet reads as the source has it.
        let mut units = PageBits::new(8);
        units.set(6);
        d.freeze(units);
        let mut u6 = vec![0u8; UNIT as usize];
        d.read_frozen(6, &mut u6).unwrap();
        assert!(u6.iter().all(|&x| x == 7));
        d.thaw();
        while d.fill(3).unwrap() {}
        assert_eq!(d.missing(), 0);
        let all = std::fs::read(&p).unwrap();
        for u in 0..8usize {
            let want = match u {
                4 => 9,
                _ => u as u8 + 1,
            };
            assert_eq!(all[u * 4096 + 200], want, "unit {u}");
        }
        assert!(all[5 * 4096..5 * 4096 + 100].iter().all(|&x| x == 9));
    }

    #[test]
    fn holes_are_not_populated() {
        let dir = TestDir::new(std::env::temp_dir(), "disk-holes");
        let p = image(&dir, "sparse.img", 16 << 20);
        let d = DiskImage::open(&p, false).unwrap();
        d.write_at(&[7u8; 4096], 5 << 20).unwrap();
        d.flush().unwrap();
        let pop = d.populated().unwrap();
        assert!(pop.get((5 << 20) / UNIT));
        // File systems allocate in their own blocks: a few units around the
        // write at most, never the whole image.
        assert!(pop.count() < 64, "{} units", pop.count());
    }
}
