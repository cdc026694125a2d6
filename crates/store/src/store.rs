//! A snapshot directory: the STORE file, the epochs, and the lock.
//!
//! ```text
//! DIR/                     0700
//!   STORE                  0600  identity of the store (magic, version, uuid)
//!   epochs/                0700
//!     00000000000000000001.epoch   0600, one file per committed epoch
//!     .tmp-...                     an epoch being written (never read)
//! ```

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::codec::Codec;
use crate::durable::fsync_dir;
use crate::error::{Result, StoreError, io};
use crate::format::{self, Header, OLDEST_VERSION, STORE_MAGIC, STORE_SIZE, STORE_VERSION, checksum, le32};
use crate::reader::{EpochReader, open_regular, read_header};
use crate::writer::{EpochInfo, EpochMeta, EpochWriter};

const EPOCHS: &str = "epochs";
const STORE_FILE: &str = "STORE";
const SUFFIX: &str = ".epoch";
const TMP_PREFIX: &str = ".tmp-";
/// STORE being written during creation (`.STORE.tmp-PID-RANDOM`; older
/// consnap wrote `.STORE.tmp`).
const STORE_TMP_PREFIX: &str = ".STORE.tmp";
/// Digits of an epoch id in a file name.
const ID_DIGITS: usize = 20;
/// Guest memory holds secrets: directories are 0700, files 0600, whatever the umask.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// A file in `epochs/` that is neither a committed epoch nor an epoch being
/// written: consnap never reads it.
#[derive(Debug, Clone)]
pub struct Stray {
    /// The file, by its real name.
    pub path: PathBuf,
    /// Why it is not read.
    pub why: String,
}

/// How a store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read committed epochs; no lock (commits are atomic renames).
    Read,
    /// Add epochs; holds an exclusive lock for as long as the Store lives.
    Write,
}

/// An open snapshot directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    epochs: PathBuf,
    uuid: [u8; 16],
    /// Compression of new epochs ([`Codec::code`]).
    codec: std::sync::atomic::AtomicU32,
    _lock: Option<File>,
    /// Headers [`Store::list_cached`] read, by id, with the file's
    /// (inode, size, mtime s, mtime ns) when read.
    heads: Mutex<HashMap<u64, (FileKey, EpochInfo)>>,
}

/// (inode, size, mtime seconds, mtime nanoseconds) of an epoch file.
type FileKey = (u64, u64, i64, i64);

/// The id in a committed epoch's file name: exactly 20 decimal digits, then `.epoch`.
pub fn epoch_id_of(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != ID_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The file name of epoch `id`.
pub fn epoch_file_name(id: u64) -> String {
    format!("{id:020}{SUFFIX}")
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(mode)).map_err(io(path, "chmod"))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Create `dir`, and any missing parent, with mode 0700 set explicitly (the
/// umask does not apply). An existing directory is left as it is.
fn private_dir_all(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(StoreError::NotAStore {
                path: dir.to_path_buf(),
                why: "it exists and is not a directory".into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(dir, "stat")(e)),
    }
    if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        private_dir_all(p)?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {
            set_mode(dir, DIR_MODE)?;
            fsync_dir(parent_of(dir))
        }
        // Created meanwhile by another process.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io(dir, "create directory")(e)),
    }
}

/// Create (or truncate) `path` for reading and writing, mode 0600 set explicitly.
fn private_file(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path, "create"))?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))
        .map_err(io(path, "chmod"))?;
    Ok(f)
}

/// Give `path` exactly `mode`; the mode it had when that was open to
/// other users (the caller warns). The mode is set through a descriptor
/// opened without following a symbolic link (never on what a link
/// planted in the store points to); a link is left alone.
fn make_private(path: &Path, mode: u32) -> Result<Option<u32>> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            tracing::warn!("{} is a symbolic link; its mode is left as it is", path.display());
            return Ok(None);
        }
        Err(e) => return Err(io(path, "open")(e)),
    };
    let had = f.metadata().map_err(io(path, "stat"))?.permissions().mode() & 0o7777;
    if had == mode {
        return Ok(None);
    }
    f.set_permissions(Permissions::from_mode(mode))
        .map_err(io(path, "chmod"))?;
    tracing::debug!("{}: mode {had:04o} set to {mode:04o}", path.display());
    Ok(Some(had).filter(|h| h & 0o077 != 0))
}

/// Warn that `path` was mode `had`, open to other users, and is `mode` now.
fn warn_opened(path: &Path, had: u32, mode: u32) {
    tracing::warn!(
        "{} was mode {had:04o}, open to other users; set it to {mode:04o} (guest memory holds secrets)",
        path.display()
    );
}

/// Whether `dir`, which has no STORE file, is a store whose creation was
/// interrupted and may resume: it holds nothing but `epochs/` (itself
/// holding no committed epoch) and temporary STORE files.
fn check_resumable(dir: &Path) -> Result<()> {
    let not = |why: String| StoreError::NotAStore {
        path: dir.to_path_buf(),
        why,
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir, "list"))? {
        let entry = entry.map_err(io(dir, "list"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(STORE_TMP_PREFIX) || name == STORE_FILE {
            continue;
        }
        if name == EPOCHS && entry.path().is_dir() {
            let epochs = entry.path();
            for e in std::fs::read_dir(&epochs).map_err(io(&epochs, "list"))? {
                let e = e.map_err(io(&epochs, "list"))?;
                if !e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    return Err(not(format!("it has no STORE file but {} exists", e.path().display())));
                }
            }
            continue;
        }
        return Err(not(format!(
            "the directory exists, is not empty ({name} is in it), and has no STORE file"
        )));
    }
    Ok(())
}

/// Write a new STORE file under a temporary name and link it into place.
/// `link` fails if STORE exists, so of two processes creating the same
/// store one wins and the other uses the winner's STORE.
fn create_store_file(dir: &Path) -> Result<()> {
    let store = dir.join(STORE_FILE);
    let nonce = u64::from_le_bytes(random_uuid()[..8].try_into().unwrap_or_default());
    let tmp = dir.join(format!("{STORE_TMP_PREFIX}-{}-{nonce:016x}", std::process::id()));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(io(&tmp, "create"))?;
        f.set_permissions(Permissions::from_mode(FILE_MODE))
            .map_err(io(&tmp, "chmod"))?;
        f.write_all(&encode_store_file(&random_uuid()))
            .map_err(io(&tmp, "write"))?;
        f.sync_all().map_err(io(&tmp, "fsync"))
    })();
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, &store) {
        Ok(()) => Ok(true),
        // Another process created STORE first (and may already have removed
        // our temporary file as a leftover): use its STORE.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotFound
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(io(&store, "create (link)")(e)),
    });
    let _ = std::fs::remove_file(&tmp);
    if linked? {
        fsync_dir(dir)?;
    }
    Ok(())
}

fn random_uuid() -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to time and pid; uniqueness only guards against mixing stores.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    b
}

fn encode_store_file(uuid: &[u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; STORE_SIZE];
    b[..8].copy_from_slice(&STORE_MAGIC);
    b[8..12].copy_from_slice(&STORE_VERSION.to_le_bytes());
    b[16..32].copy_from_slice(uuid);
    b[32..40].copy_from_slice(&crate::now_ns().to_le_bytes());
    let sum = checksum(&b[..STORE_SIZE - 8]);
    b[STORE_SIZE - 8..].copy_from_slice(&sum.to_le_bytes());
    b
}

fn decode_store_file(b: &[u8], dir: &Path) -> Result<[u8; 16]> {
    let path = dir.join(STORE_FILE);
    let not = |why: &str| StoreError::NotAStore {
        path: dir.to_path_buf(),
        why: why.to_string(),
    };
    if b.len() != STORE_SIZE {
        let got = if b.len() > STORE_SIZE {
            format!("longer than {STORE_SIZE} bytes")
        } else {
            format!("{} bytes long", b.len())
        };
        return Err(not(&format!("{} is {got}, not {STORE_SIZE}", path.display())));
    }
    if b[..8] != STORE_MAGIC {
        return Err(not(&format!("{} does not start with {:?}", path.display(), "CSNPSTOR")));
    }
    let version = le32(b, 8);
    if !(OLDEST_VERSION..=STORE_VERSION).contains(&version) {
        return Err(StoreError::Version {
            path,
            found: version,
            supported: STORE_VERSION,
        });
    }
    if checksum(&b[..STORE_SIZE - 8]) != format::le64(b, STORE_SIZE - 8) {
        return Err(StoreError::Corrupt {
            path,
            why: "STORE checksum mismatch".into(),
        });
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[16..32]);
    Ok(uuid)
}

fn lock(file: &File, dir: &Path) -> Result<()> {
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            StoreError::Busy(dir.to_path_buf())
        } else {
            StoreError::Io {
                path: dir.join(STORE_FILE),
                op: "lock",
                source: e,
            }
        });
    }
    Ok(())
}

impl Store {
    /// Open `dir` for writing, creating the store if it does not exist.
    ///
    /// Creation makes DIR (and missing parents) and `DIR/epochs` 0700, then
    /// writes STORE under a temporary name and links it into place, so that
    /// STORE is either absent or complete. A directory left by an
    /// interrupted creation (only `epochs/` without epochs and temporary
    /// STORE files) is completed.
    pub fn open_or_create(dir: &Path) -> Result<Store> {
        private_dir_all(dir)?;
        let store_path = dir.join(STORE_FILE);
        let exists = |p: &Path| match std::fs::symlink_metadata(p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(p, "stat")(e)),
        };
        if !exists(&store_path)? {
            if let Err(e) = check_resumable(dir) {
                // Unless another process has just created the store.
                if !exists(&store_path)? {
                    return Err(e);
                }
            }
            private_dir_all(&dir.join(EPOCHS))?;
            create_store_file(dir)?;
        }
        Store::open(dir, Access::Write)
    }

    /// Open an existing store. Opening it for writing takes the lock, then
    /// sets the modes of the directory, `epochs/` (0700), STORE and the
    /// epoch files (0600), warning when one was open to other users.
    pub fn open(dir: &Path, access: Access) -> Result<Store> {
        let path = dir.join(STORE_FILE);
        let mut f = match open_regular(&path) {
            Ok(f) => f,
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore {
                    path: dir.to_path_buf(),
                    why: if dir.exists() {
                        "no STORE file".into()
                    } else {
                        "it does not exist".into()
                    },
                });
            }
            Err(e) => return Err(e),
        };
        let mut b = Vec::new();
        Read::by_ref(&mut f)
            .take(STORE_SIZE as u64 + 1)
            .read_to_end(&mut b)
            .map_err(io(&path, "read"))?;
        let uuid = decode_store_file(&b, dir)?;
        let lock_file = if access == Access::Write {
            lock(&f, dir)?;
            Some(f)
        } else {
            None
        };
        let store = Store {
            dir: dir.to_path_buf(),
            epochs: dir.join(EPOCHS),
            uuid,
            codec: std::sync::atomic::AtomicU32::new(0),
            _lock: lock_file,
            heads: Mutex::default(),
        };
        if access == Access::Write {
            store.make_private()?;
            store.remove_leftovers();
        }
        Ok(store)
    }

    fn make_private(&self) -> Result<()> {
        // DIR itself may be a link the user gave: follow it.
        let dir = self.dir.canonicalize().map_err(io(&self.dir, "resolve"))?;
        let store_file = self.dir.join(STORE_FILE);
        for (path, mode) in [(&dir, DIR_MODE), (&self.epochs, DIR_MODE), (&store_file, FILE_MODE)] {
            if let Some(had) = make_private(path, mode)? {
                warn_opened(path, had, mode);
            }
        }
        // One line for the epoch files, however many there are.
        let (mut opened, mut first) = (0u64, None);
        for id in self.ids().unwrap_or_default() {
            let path = self.epoch_path(id);
            if let Some(had) = make_private(&path, FILE_MODE)? {
                opened += 1;
                first.get_or_insert((path, had));
            }
        }
        match (opened, first) {
            (1, Some((path, had))) => warn_opened(&path, had, FILE_MODE),
            (n, Some((path, had))) => tracing::warn!(
                "{n} epoch files in {} were open to other users ({} was mode {had:04o}); set them to {FILE_MODE:04o} (guest memory holds secrets)",
                self.epochs.display(),
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
            _ => {}
        }
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's identity.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// True when this handle holds the store's lock (opened for writing).
    pub fn is_writer(&self) -> bool {
        self._lock.is_some()
    }

    /// Compress the page data of epochs written from now on (by
    /// [`Store::writer`]) with `codec`.
    pub fn set_compression(&self, codec: Codec) {
        self.codec.store(codec.code(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The compression of new epochs.
    pub fn compression(&self) -> Codec {
        Codec::from_code(self.codec.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or_default()
    }

    /// File of epoch `id`.
    pub fn epoch_path(&self, id: u64) -> PathBuf {
        self.epochs.join(epoch_file_name(id))
    }

    /// Remove what crashed writers left: unfinished epochs and rewrites,
    /// temporary STORE and RECLAIM files.
    fn remove_leftovers(&self) {
        for (dir, prefix, what) in [
            (&self.epochs, TMP_PREFIX, "unfinished epoch or rewrite"),
            (&self.dir, STORE_TMP_PREFIX, "unfinished STORE file"),
            (&self.dir, crate::ledger::LEDGER_TMP, "unfinished RECLAIM file"),
        ] {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(prefix) {
                        tracing::info!("removing {what} {}", e.path().display());
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }

    /// Ids of the committed epoch files (canonical names only), ascending.
    pub fn ids(&self) -> Result<Vec<u64>> {
        let rd = std::fs::read_dir(&self.epochs).map_err(io(&self.epochs, "list"))?;
        let mut ids: Vec<u64> = rd
            .flatten()
            .filter_map(|e| epoch_id_of(&e.file_name().to_string_lossy()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Entries of `epochs/` that are neither committed epochs (canonical
    /// names) nor epochs being written (`.tmp-*`), by name. consnap never
    /// reads them; `1.epoch` is not epoch 1.
    pub fn strays(&self) -> Result<Vec<Stray>> {
        let rd = std::fs::read_dir(&self.epochs).map_err(io(&self.epochs, "list"))?;
        let mut strays: Vec<Stray> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if epoch_id_of(&name).is_some() || name.starts_with(TMP_PREFIX) {
                    return None;
                }
                let id = name
                    .strip_suffix(SUFFIX)
                    .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse::<u64>().ok());
                let why = match id {
                    Some(id) => format!(
                        "not a canonical epoch file name (epoch {id} would be {}); consnap does not read it",
                        epoch_file_name(id)
                    ),
                    None => "not an epoch file (epochs are named by 20-digit id, e.g. 00000000000000000001.epoch); consnap does not read it".into(),
                };
                Some(Stray { path: e.path(), why })
            })
            .collect();
        strays.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(strays)
    }

    /// Every committed epoch, ascending, each with its header or the reason it cannot be read.
    pub fn list(&self) -> Result<Vec<(u64, Result<EpochInfo>)>> {
        Ok(self.ids()?.into_iter().map(|id| (id, self.info(id))).collect())
    }

    /// [`Store::list`], reusing the headers an earlier call read for files
    /// that have not changed since (same inode, size and modification
    /// time; a rewrite is a new inode): the background reclaimer lists the
    /// store twice a second, and with thousands of epochs reading every
    /// header each time cost it a third of a core.
    pub fn list_cached(&self) -> Result<Vec<(u64, Result<EpochInfo>)>> {
        use std::os::unix::fs::MetadataExt;
        let mut cache = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        let ids = self.ids()?;
        let mut fresh = HashMap::with_capacity(ids.len());
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let key = std::fs::metadata(self.epoch_path(id))
                .ok()
                .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
            let info = match (key, cache.remove(&id)) {
                (Some(k), Some((old, info))) if k == old => Ok(info),
                _ => self.info(id),
            };
            if let (Some(k), Ok(i)) = (key, &info) {
                fresh.insert(id, (k, i.clone()));
            }
            out.push((id, info));
        }
        *cache = fresh;
        Ok(out)
    }

    /// Epoch `id`'s header, read now (checked, but nothing else of the
    /// file is read).
    pub fn info(&self, id: u64) -> Result<EpochInfo> {
        let path = self.epoch_path(id);
        read_header(&path).and_then(|(header, file_bytes)| {
            self.check_member(&header, id, &path)?;
            Ok(EpochInfo {
                header,
                file_bytes,
                path: path.clone(),
            })
        })
    }

    fn check_member(&self, h: &Header, id: u64, path: &Path) -> Result<()> {
        if h.id != id {
            return Err(StoreError::Mismatch {
                path: path.to_path_buf(),
                why: format!("file name says epoch {id}, header says {}", h.id),
            });
        }
        if h.store_uuid != self.uuid {
            return Err(StoreError::Mismatch {
                path: path.to_path_buf(),
                why: format!("epoch belongs to another store than {}", self.dir.display()),
            });
        }
        Ok(())
    }

    /// The id the next epoch gets.
    pub fn next_id(&self) -> Result<u64> {
        Ok(self.ids()?.last().map_or(1, |l| l + 1))
    }

    /// The newest committed epoch.
    pub fn latest(&self) -> Result<u64> {
        self.ids()?
            .last()
            .copied()
            .ok_or_else(|| StoreError::Empty(self.dir.clone()))
    }

    /// Open and verify epoch `id`.
    pub fn open_epoch(&self, id: u64) -> Result<EpochReader> {
        let path = self.epoch_path(id);
        if !path.exists() {
            return Err(StoreError::NoEpoch {
                dir: self.dir.clone(),
                id,
            });
        }
        let r = EpochReader::open(&path)?;
        self.check_member(r.header(), id, &path)?;
        Ok(r)
    }

    /// Epoch `id` and its ancestors down to a full epoch, newest first.
    ///
    /// Another process may be reclaiming the store meanwhile: it rewrites an
    /// epoch so that it restores to the same state (its parent may change)
    /// before it removes that epoch's old ancestors. Open files stay
    /// readable after a rename or removal, so a chain opened from files of
    /// either version is consistent; when a parent has just been removed,
    /// the walk starts again from `id`.
    pub fn chain(&self, id: u64) -> Result<Vec<EpochReader>> {
        let mut tries = 0;
        loop {
            match self.chain_once(id) {
                Err(StoreError::MissingParent { .. }) if tries < 8 && self.epoch_path(id).exists() => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                r => return r,
            }
        }
    }

    fn chain_once(&self, id: u64) -> Result<Vec<EpochReader>> {
        let mut opened = self.prefetch_chain(id);
        self.walk_chain(id, |i| opened.remove(&i).unwrap_or_else(|| self.open_epoch(i)))
    }

    /// Open, several at a time, the epochs the chain of `id` holds: their
    /// headers are read [`HEADER_BATCH`] files at a time to follow the
    /// parent links, then the members are opened whole, [`PREFETCH`] at a
    /// time.
    /// Each cold read is a round trip to the disk, and a lazy restore opens
    /// every epoch of its chain before the guest's first instruction: one
    /// after the other, a chain of 64 took 50-70 ms. Nothing is decided
    /// here: [`Store::walk_chain`] checks the chain from what this opened,
    /// and opens (and reports) what this could not.
    fn prefetch_chain(&self, id: u64) -> HashMap<u64, Result<EpochReader>> {
        let Ok(ids) = self.ids() else {
            return HashMap::new();
        };
        let below: Vec<u64> = ids.into_iter().filter(|&i| i <= id).rev().collect();
        let mut parents: HashMap<u64, u64> = HashMap::new();
        let mut members = Vec::new();
        let mut cur = id;
        while members.len() <= below.len() {
            if let Some(&p) = parents.get(&cur) {
                members.push(cur);
                if p == 0 || p >= cur {
                    break;
                }
                cur = p;
                continue;
            }
            let start = below.partition_point(|&i| i > cur);
            let batch: Vec<u64> = below[start..]
                .iter()
                .copied()
                .filter(|i| !parents.contains_key(i))
                .take(HEADER_BATCH)
                .collect();
            if batch.first() != Some(&cur) {
                break;
            }
            let heads = in_parallel(&batch, |i| {
                read_header(&self.epoch_path(i))
                    .ok()
                    .map(|(h, _)| if h.is_full() { 0 } else { h.parent })
            });
            for (i, p) in batch.iter().zip(heads) {
                if let Some(p) = p {
                    parents.insert(*i, p);
                }
            }
            if !parents.contains_key(&cur) {
                break;
            }
        }
        let readers = in_parallel(&members, |i| self.open_epoch(i));
        members.into_iter().zip(readers).collect()
    }

    /// Epoch `id` and its ancestors, newest first, as `open` gives them,
    /// with the checks every chain gets: it ends at a full epoch, parents
    /// are older and exist, and every link describes the same machine.
    /// (`open` may hand out readers opened once for many chains.)
    pub(crate) fn walk_chain<R: Borrow<EpochReader>>(
        &self,
        id: u64,
        mut open: impl FnMut(u64) -> Result<R>,
    ) -> Result<Vec<R>> {
        let mut chain: Vec<R> = vec![open(id)?];
        loop {
            let last = chain[chain.len() - 1].borrow();
            let h = last.header();
            if h.is_full() {
                return Ok(chain);
            }
            let parent = h.parent;
            if parent == 0 || parent >= h.id {
                return Err(StoreError::Corrupt {
                    path: last.path().to_path_buf(),
                    why: format!("incremental epoch with invalid parent {parent}"),
                });
            }
            let p = match open(parent) {
                Ok(p) => p,
                Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::EMFILE) => {
                    return Err(StoreError::ChainTooLong {
                        dir: self.dir.clone(),
                        id,
                        files: chain.len(),
                        limit: open_file_limit(),
                    });
                }
                Err(StoreError::NoEpoch { .. }) => {
                    return Err(StoreError::MissingParent {
                        dir: self.dir.clone(),
                        id: h.id,
                        parent,
                    });
                }
                Err(e) => return Err(e),
            };
            if let Some(why) = h.parent_mismatch(p.borrow().header()) {
                return Err(StoreError::Mismatch {
                    path: p.borrow().path().to_path_buf(),
                    why,
                });
            }
            chain.push(p);
        }
    }

    /// Start writing a new epoch (file created 0600 under a temporary name),
    /// compressed as [`Store::set_compression`] asked.
    pub fn writer(&self, meta: EpochMeta) -> Result<EpochWriter> {
        let dest = self.epoch_path(meta.id);
        if dest.exists() {
            return Err(StoreError::Usage("epoch id already committed"));
        }
        let tmp = self.epochs.join(format!("{TMP_PREFIX}{:020}", meta.id));
        self.open_writer(meta, tmp)
    }

    /// Start writing a new version of committed epoch `meta.id`, which its
    /// commit replaces atomically (reclamation). Only the store's writer
    /// may do this.
    pub fn rewriter(&self, meta: EpochMeta) -> Result<EpochWriter> {
        if !self.is_writer() {
            return Err(StoreError::Usage("rewriting an epoch needs the store's lock"));
        }
        let tmp = self.epochs.join(format!("{TMP_PREFIX}rewrite-{:020}", meta.id));
        self.open_writer(meta, tmp)
    }

    /// Start writing a version of epoch `meta.id` that is not for this
    /// store's directory (a merged epoch to ship to a remote store): under
    /// a temporary name of its own, finished with
    /// [`EpochWriter::finish_detached`], which takes it out of the
    /// directory. Needs no lock: it changes nothing of the store.
    pub fn detached_writer(&self, meta: EpochMeta) -> Result<EpochWriter> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = self.epochs.join(format!(
            "{TMP_PREFIX}ship-{:020}-{}-{nonce:08x}",
            meta.id,
            std::process::id()
        ));
        self.open_writer(meta, tmp)
    }

    fn open_writer(&self, meta: EpochMeta, tmp: PathBuf) -> Result<EpochWriter> {
        // Never write what a reader refuses.
        let related = match (meta.full, meta.parent) {
            (true, None) => true,
            (false, Some(p)) => p >= 1 && p < meta.id,
            _ => false,
        };
        if meta.id == 0 || !related {
            return Err(StoreError::Usage(
                "epoch ids start at 1; a full epoch has no parent, an incremental one an older parent",
            ));
        }
        if meta.vcpus == 0 || meta.vcpus > format::MAX_VCPUS {
            return Err(StoreError::Usage("vCPU count outside 1..=255"));
        }
        if meta.mem_size == 0 || !meta.mem_size.is_multiple_of(format::PAGE as u64) || meta.mem_size > format::MAX_RAM {
            return Err(StoreError::Usage(
                "guest RAM size not a non-zero multiple of 4096 up to 1 TiB",
            ));
        }
        if meta.regions.len() > format::MAX_REGIONS
            || meta
                .regions
                .iter()
                .any(|r| r.kind != format::region_kind::DISK || r.bytes == 0 || r.bytes > format::MAX_REGION_BYTES)
        {
            return Err(StoreError::Usage("regions: at most 64 disks of 1 byte to 2^60 bytes"));
        }
        let dest = self.epoch_path(meta.id);
        let file = private_file(&tmp)?;
        let mut w = EpochWriter::new(self.epochs.clone(), tmp, dest, file, meta, self.uuid);
        w.compress(self.compression())?;
        Ok(w)
    }
}

/// The soft limit on open files of this process.
fn open_file_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_cur
    } else {
        0
    }
}

/// Files a chain walk reads at once.
const PREFETCH: usize = 16;
/// Headers read ahead at a time while following parent links (a chain
/// without reclamation is consecutive ids; a folded one skips some).
const HEADER_BATCH: usize = 32;

/// `f` of every item, up to [`PREFETCH`] at a time, in the items' order.
fn in_parallel<T: Send>(items: &[u64], f: impl Fn(u64) -> T + Sync) -> Vec<T> {
    if items.len() <= 1 {
        return items.iter().map(|&i| f(i)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<T>>> = items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..PREFETCH.min(items.len()) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = items.get(k) else { break };
                    let v = f(i);
                    *slots[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .map(|v| v.unwrap_or_else(|| unreachable!("every item was handled")))
        .collect()
}
