//! A snapshot directory: the STORE file, the epochs, and the lock.
//!
//! ```text
//! DIR/                     0700
//!   STORE                  0600  identity of the store (magic, version, uuid)
//!   epochs/                0700
//!     00000000000000000001.epoch   0600, one file per committed epoch
//!     .tmp-...                     an epoch being written (never read)
//! ```

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError, io};
use crate::format::{self, Header, STORE_MAGIC, STORE_SIZE, VERSION, checksum, le32};
use crate::reader::{EpochReader, read_header};
use crate::writer::{EpochMeta, EpochWriter};

const EPOCHS: &str = "epochs";
const STORE_FILE: &str = "STORE";
const SUFFIX: &str = ".epoch";
const TMP_PREFIX: &str = ".tmp-";

/// A committed epoch as listed.
#[derive(Debug, Clone)]
pub struct EpochInfo {
    /// Its header.
    pub header: Header,
    /// Size of its file.
    pub file_bytes: u64,
    /// Its file.
    pub path: PathBuf,
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
    _lock: Option<File>,
}

/// Guest memory holds secrets: directories are 0700.
fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir, "create directory"))
}

/// Guest memory holds secrets: files are created 0600 (read-write, truncated).
fn private_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path, "create"))
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync directory"))
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
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[16..32].copy_from_slice(uuid);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    b[32..40].copy_from_slice(&now.to_le_bytes());
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
    if version != VERSION {
        return Err(StoreError::Version {
            path,
            found: version,
            supported: VERSION,
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
    pub fn open_or_create(dir: &Path) -> Result<Store> {
        if !dir.join(STORE_FILE).exists() {
            let nonempty = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
            if nonempty {
                return Err(StoreError::NotAStore {
                    path: dir.to_path_buf(),
                    why: "the directory exists, is not empty, and has no STORE file".into(),
                });
            }
            private_dir(dir)?;
            private_dir(&dir.join(EPOCHS))?;
            let tmp = dir.join(".STORE.tmp");
            let mut f = private_file(&tmp)?;
            std::io::Write::write_all(&mut f, &encode_store_file(&random_uuid())).map_err(io(&tmp, "write"))?;
            f.sync_all().map_err(io(&tmp, "fsync"))?;
            std::fs::rename(&tmp, dir.join(STORE_FILE)).map_err(io(dir.join(STORE_FILE), "rename"))?;
            fsync_dir(dir)?;
        }
        let store = Store::open(dir, Access::Write)?;
        store.remove_tmp();
        Ok(store)
    }

    /// Open an existing store.
    pub fn open(dir: &Path, access: Access) -> Result<Store> {
        let path = dir.join(STORE_FILE);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore {
                    path: dir.to_path_buf(),
                    why: if dir.exists() {
                        "no STORE file".into()
                    } else {
                        "it does not exist".into()
                    },
                });
            }
            Err(e) => return Err(io(&path, "open")(e)),
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
        Ok(Store {
            dir: dir.to_path_buf(),
            epochs: dir.join(EPOCHS),
            uuid,
            _lock: lock_file,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's identity.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// File of epoch `id`.
    pub fn epoch_path(&self, id: u64) -> PathBuf {
        self.epochs.join(format!("{id:020}{SUFFIX}"))
    }

    fn remove_tmp(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.epochs) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    tracing::info!("removing unfinished epoch {}", e.path().display());
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Ids of the committed epoch files, ascending.
    pub fn ids(&self) -> Result<Vec<u64>> {
        let rd = std::fs::read_dir(&self.epochs).map_err(io(&self.epochs, "list"))?;
        let mut ids: Vec<u64> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(SUFFIX)?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every committed epoch, ascending, each with its header or the reason it cannot be read.
    pub fn list(&self) -> Result<Vec<(u64, Result<EpochInfo>)>> {
        Ok(self
            .ids()?
            .into_iter()
            .map(|id| {
                let path = self.epoch_path(id);
                let info = read_header(&path).and_then(|(header, file_bytes)| {
                    self.check_member(&header, id, &path)?;
                    Ok(EpochInfo {
                        header,
                        file_bytes,
                        path: path.clone(),
                    })
                });
                (id, info)
            })
            .collect())
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
    pub fn chain(&self, id: u64) -> Result<Vec<EpochReader>> {
        let mut chain: Vec<EpochReader> = vec![self.open_epoch(id)?];
        loop {
            let last = &chain[chain.len() - 1];
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
            let p = match self.open_epoch(parent) {
                Ok(p) => p,
                Err(StoreError::NoEpoch { .. }) => {
                    return Err(StoreError::MissingParent {
                        dir: self.dir.clone(),
                        id: h.id,
                        parent,
                    });
                }
                Err(e) => return Err(e),
            };
            let ph = p.header();
            if ph.mem_size != h.mem_size || ph.vcpus != h.vcpus {
                return Err(StoreError::Mismatch {
                    path: p.path().to_path_buf(),
                    why: format!(
                        "epoch {} has {} bytes of RAM and {} vCPUs but its parent epoch {} has {} bytes and {}: a chain describes one machine",
                        h.id, h.mem_size, h.vcpus, ph.id, ph.mem_size, ph.vcpus
                    ),
                });
            }
            chain.push(p);
        }
    }

    /// Start writing a new epoch (file created 0600 under a temporary name).
    pub fn writer(&self, meta: EpochMeta) -> Result<EpochWriter> {
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
        let tmp = self.epochs.join(format!("{TMP_PREFIX}{:020}", meta.id));
        let dest = self.epoch_path(meta.id);
        if dest.exists() {
            return Err(StoreError::Usage("epoch id already committed"));
        }
        let file = private_file(&tmp)?;
        Ok(EpochWriter::new(self.epochs.clone(), tmp, dest, file, meta, self.uuid))
    }
}
