//! `DIR/RECLAIM`: the retention settings of a store and what reclamation
//! has done to it, in all (docs/FORMAT.md). Replaced atomically before a
//! pass with new settings rewrites anything, and after each pass; a crash
//! may lose the figures of the last pass, never the epochs or the
//! settings that chose them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{Result, StoreError, io};
use crate::format::{checksum, le32, le64};

/// Name of the file in the store directory.
pub const LEDGER_FILE: &str = "RECLAIM";
/// Temporary name prefix while it is replaced.
pub(crate) const LEDGER_TMP: &str = ".RECLAIM.tmp";
const MAGIC: [u8; 8] = *b"CSNPRECL";
const SIZE: usize = 512;
const POLICY_AT: usize = 96;
const POLICY_MAX: usize = 400;

/// Reclamation settings and totals of a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// The retention policy (`--retain`) last used.
    pub policy: String,
    /// `--max-chain` last used.
    pub max_chain: u32,
    /// Reclamation passes that changed something.
    pub passes: u64,
    /// Epochs removed after merging them into a retained epoch.
    pub merged: u64,
    /// Epochs removed that no retained epoch needed (ends of abandoned branches).
    pub dropped: u64,
    /// Epochs rewritten to shorten their chain (folding).
    pub folds: u64,
    /// Epoch files rewritten in all (merges and folds).
    pub rewrites: u64,
    /// Bytes of files removed or replaced.
    pub bytes_freed: u64,
    /// Bytes of files written by rewrites.
    pub bytes_written: u64,
    /// Bytes read by rewrites.
    pub bytes_read: u64,
    /// Time spent reclaiming, ns.
    pub time_ns: u64,
    /// Epochs the policy keeps that went to keep the store under
    /// `--max-store` (a pass's figure: RECLAIM does not record it).
    pub evicted: u64,
}

impl Ledger {
    /// Net bytes reclaimed: freed minus written; negative when folds
    /// (copies of pages still needed elsewhere) wrote more than merges and
    /// drops freed.
    pub fn reclaimed(&self) -> i64 {
        self.bytes_freed as i64 - self.bytes_written as i64
    }

    /// Add one pass's figures.
    pub fn add(&mut self, o: &Ledger) {
        self.passes += o.passes;
        self.merged += o.merged;
        self.dropped += o.dropped;
        self.folds += o.folds;
        self.rewrites += o.rewrites;
        self.bytes_freed += o.bytes_freed;
        self.bytes_written += o.bytes_written;
        self.bytes_read += o.bytes_read;
        self.time_ns += o.time_ns;
        self.evicted += o.evicted;
    }

    /// Serialize to the file's 512 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SIZE];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, &MAGIC);
        put(8, &2u32.to_le_bytes());
        put(12, &self.max_chain.to_le_bytes());
        let fields = [
            self.passes,
            self.merged,
            self.dropped,
            self.folds,
            self.rewrites,
            self.bytes_freed,
            self.bytes_written,
            self.bytes_read,
            self.time_ns,
        ];
        for (i, v) in fields.iter().enumerate() {
            put(16 + i * 8, &v.to_le_bytes());
        }
        let policy = &self.policy.as_bytes()[..self.policy.len().min(POLICY_MAX)];
        put(92, &(policy.len() as u32).to_le_bytes());
        put(POLICY_AT, policy);
        let sum = checksum(&b[..SIZE - 8]);
        b[SIZE - 8..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parse the file's bytes; `path` names it in errors.
    pub fn decode(b: &[u8], path: &Path) -> Result<Ledger> {
        let corrupt = |why: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        if b.len() != SIZE {
            return Err(corrupt(format!("is {} bytes long, not {SIZE}", b.len())));
        }
        if b[..8] != MAGIC {
            return Err(corrupt("does not start with \"CSNPRECL\"".into()));
        }
        if checksum(&b[..SIZE - 8]) != le64(b, SIZE - 8) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let version = le32(b, 8);
        if version != 2 {
            return Err(StoreError::Version {
                path: path.to_path_buf(),
                found: version,
                supported: 2,
            });
        }
        let len = le32(b, 92) as usize;
        if len > POLICY_MAX || b[POLICY_AT + len..SIZE - 8].iter().any(|&x| x != 0) {
            return Err(corrupt(format!("policy text of {len} bytes is malformed")));
        }
        let policy = std::str::from_utf8(&b[POLICY_AT..POLICY_AT + len])
            .map_err(|_| corrupt("policy text is not UTF-8".into()))?
            .to_string();
        let f = |i: usize| le64(b, 16 + i * 8);
        Ok(Ledger {
            policy,
            max_chain: le32(b, 12),
            passes: f(0),
            merged: f(1),
            dropped: f(2),
            folds: f(3),
            rewrites: f(4),
            bytes_freed: f(5),
            bytes_written: f(6),
            bytes_read: f(7),
            time_ns: f(8),
            evicted: 0,
        })
    }

    /// Read `dir/RECLAIM`; `None` when the store has none.
    pub fn load(dir: &Path) -> Result<Option<Ledger>> {
        let path = dir.join(LEDGER_FILE);
        let file = match crate::reader::open_regular(&path) {
            Ok(f) => f,
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&file, SIZE as u64 + 1), &mut b)
            .map_err(io(&path, "read"))?;
        Ledger::decode(&b, &path).map(Some)
    }

    /// Replace `dir/RECLAIM` atomically (temporary file, fsync, rename, fsync DIR).
    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(LEDGER_FILE);
        let tmp = dir.join(format!("{LEDGER_TMP}-{}", std::process::id()));
        let r = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
                .map_err(io(&tmp, "create"))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io(&tmp, "chmod"))?;
            f.write_all(&self.encode()).map_err(io(&tmp, "write"))?;
            f.sync_all().map_err(io(&tmp, "fsync"))?;
            std::fs::rename(&tmp, &path).map_err(io(&path, "rename into place"))
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r?;
        crate::durable::fsync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let l = Ledger {
            policy: "10s:all,1m:1s".into(),
            max_chain: 64,
            passes: 3,
            merged: 100,
            bytes_freed: 1 << 30,
            ..Ledger::default()
        };
        let b = l.encode();
        let p = Path::new("RECLAIM");
        assert_eq!(Ledger::decode(&b, p).unwrap(), l);
        for at in [0, 9, 20, 100, 300, 505] {
            let mut bad = b.clone();
            bad[at] ^= 4;
            assert!(Ledger::decode(&bad, p).is_err(), "flip at {at}");
        }
        assert!(Ledger::decode(&b[..100], p).is_err());
    }
}
