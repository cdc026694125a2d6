//! The restore cache: where `restore` and `verify` copy a store from an
//! object store when no `--cache` is given. Under
//! `$HOME/.cache/consnap/remote/` each entry is a directory of its own,
//! named after the endpoint, the bucket, the prefix and the store's UUID
//! (so that the same URL through another endpoint, or a store recreated
//! under the same prefix, never meets a copy of another store):
//!
//! ```text
//! NAME/ORIGIN   0600  JSON: URL, endpoint, store UUID, last use
//! NAME/LOCK     0600  held shared while a command uses the entry
//! NAME/store/   0700  the store itself
//! ```
//!
//! The cache is bounded: after each fetch into it, the least recently used
//! entries go until it holds at most `CONSNAP_CACHE_MAX` (default 4 GiB);
//! an entry in use (its LOCK held) is never removed. `consnap cache`
//! lists and prunes it (cache_cmd.rs).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The cache's size limit unless `CONSNAP_CACHE_MAX` gives another.
pub const DEFAULT_MAX: u64 = 4 << 30;
/// The variable that sets the limit (a size, or `none`).
pub const MAX_VAR: &str = "CONSNAP_CACHE_MAX";
const ORIGIN: &str = "ORIGIN";
const LOCK: &str = "LOCK";
const STORE: &str = "store";
/// Longest readable part of an entry's name (the rest is a hash and the
/// UUID, well under the 255 bytes a name may have).
const READABLE: usize = 120;

/// Why the cache cannot be used.
#[derive(Debug, Error)]
pub enum CacheError {
    /// No HOME to put the cache under.
    #[error(
        "no HOME: the restore cache lives in $HOME/.cache/consnap/remote; set HOME, or give restore or verify --cache DIR"
    )]
    NoHome,
    /// `CONSNAP_CACHE_MAX` is not a size.
    #[error("{MAX_VAR}={0:?}: not a size (such as 4G or 500M) or `none`")]
    BadMax(String),
    /// A file or directory of the cache cannot be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + use<> {
    let path = path.to_path_buf();
    move |source| CacheError::Io { what, path, source }
}

/// Where an entry came from, and when it was last used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Origin {
    /// `s3://BUCKET/PREFIX`.
    pub url: String,
    /// The endpoint it was fetched through (`default` for the S3 client's).
    pub endpoint: String,
    /// The store's UUID, 32 hex digits.
    pub store: String,
    /// Last use, Unix ns.
    pub last_used_ns: u64,
}

/// One entry of the cache.
#[derive(Debug)]
pub struct Entry {
    /// Its directory.
    pub dir: PathBuf,
    /// Its ORIGIN; `None` for a directory an older consnap left
    /// (`BUCKET/PREFIX`) or one that is being created.
    pub origin: Option<Origin>,
    /// Disk space it takes.
    pub bytes: u64,
    /// Last use, Unix ns (ORIGIN's, else the directory's mtime).
    pub last_used_ns: u64,
}

impl Entry {
    /// The store directory inside it.
    pub fn store(&self) -> PathBuf {
        self.dir.join(STORE)
    }
}

/// An entry in use: its LOCK is held shared until this is dropped.
#[derive(Debug)]
pub struct InUse {
    /// The entry's directory.
    pub dir: PathBuf,
    _lock: File,
}

impl InUse {
    /// The store directory to fetch into.
    pub fn store(&self) -> PathBuf {
        self.dir.join(STORE)
    }
}

/// `$HOME/.cache/consnap/remote`.
pub fn root() -> Result<PathBuf, CacheError> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(CacheError::NoHome)?;
    Ok(PathBuf::from(home).join(".cache/consnap/remote"))
}

/// The limit `CONSNAP_CACHE_MAX` sets (`None`: no limit).
pub fn max_size() -> Result<Option<u64>, CacheError> {
    match std::env::var(MAX_VAR) {
        Err(_) => Ok(Some(DEFAULT_MAX)),
        Ok(v) if v == "none" => Ok(None),
        Ok(v) => crate::args::size(&v).map(Some).map_err(|_| CacheError::BadMax(v)),
    }
}

/// `s` with every byte but ASCII letters, digits, `.`, `_` and `-` turned into
/// `-`, and no leading `.`: a part of one file name, never a path.
fn sanitize(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    out.trim_start_matches('.').to_string()
}

/// `host:port` of an endpoint URL (`http://127.0.0.1:3900/` gives
/// `127.0.0.1:3900`); `default` for none.
pub fn endpoint_label(endpoint: Option<&str>) -> String {
    let Some(e) = endpoint else {
        return "default".into();
    };
    let rest = e.split_once("://").map_or(e, |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Credentials in the URL are not part of the name.
    host.rsplit_once('@').map_or(host, |(_, h)| h).to_string()
}

/// The name of the entry for the store `uuid` at `url` through
/// `endpoint`: a readable part (endpoint, bucket, prefix), a hash of the
/// exact endpoint, bucket and prefix (the readable part is lossy), and
/// the UUID. Always one file name: no `/`, never `.` or `..`.
pub fn entry_name(endpoint: Option<&str>, url: &remote::RemoteUrl, uuid: &[u8; 16]) -> String {
    let label = endpoint_label(endpoint);
    let mut readable = sanitize(&format!("{label}_{}_{}", url.bucket, url.prefix.replace('/', "_")));
    readable = readable.trim_end_matches(['-', '_']).to_string();
    if readable.len() > READABLE {
        readable.truncate(READABLE);
    }
    let exact = format!("{}\0{}\0{}", endpoint.unwrap_or(""), url.bucket, url.prefix);
    let hash = xxhash_rust::xxh3::xxh3_64(exact.as_bytes());
    format!("{readable}_{hash:016x}_{}", remote::uuid_hex(uuid))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn private_dir(p: &Path) -> Result<(), CacheError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(io("create", p))
}

fn flock(f: &File, op: libc::c_int) -> bool {
    // SAFETY: flock on a descriptor this File owns.
    unsafe { libc::flock(f.as_raw_fd(), op) == 0 }
}

/// The entry for the store the manifest `m` of `client` describes, taken
/// for use (shared lock) and marked as used now.
pub fn open(client: &remote::Client, m: &remote::Manifest) -> Result<InUse, CacheError> {
    let root = root()?;
    private_dir(&root)?;
    let dir = root.join(entry_name(client.endpoint(), client.url(), &m.store_uuid));
    let lock = loop {
        private_dir(&dir)?;
        let path = dir.join(LOCK);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path);
        let f = match f {
            Ok(f) => f,
            // A prune removed the entry just now: make it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("create", &path)(e)),
        };
        if !flock(&f, libc::LOCK_SH) {
            return Err(io("lock", &path)(std::io::Error::last_os_error()));
        }
        // A prune may have removed the entry while we waited: lock again
        // what is there now.
        let held = f.metadata().map_err(io("stat", &path))?;
        match std::fs::metadata(&path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => break f,
            _ => continue,
        }
    };
    let origin = Origin {
        url: client.url().to_string(),
        endpoint: endpoint_label(client.endpoint()),
        store: remote::uuid_hex(&m.store_uuid),
        last_used_ns: now_ns(),
    };
    write_origin(&dir, &origin)?;
    Ok(InUse { dir, _lock: lock })
}

fn write_origin(dir: &Path, origin: &Origin) -> Result<(), CacheError> {
    let path = dir.join(ORIGIN);
    let tmp = dir.join(".ORIGIN.tmp");
    let text = serde_json::to_string_pretty(origin).unwrap_or_default() + "\n";
    {
        use std::io::Write;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))
}

/// Disk space under `p` (blocks allocated, not following links).
fn disk_usage(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let Ok(rd) = std::fs::read_dir(p) else {
        return own;
    };
    own + rd.flatten().map(|e| disk_usage(&e.path())).sum::<u64>()
}

/// Every entry under `root`, least recently used first.
pub fn list(root: &Path) -> Result<Vec<Entry>, CacheError> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list", root)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io("list", root))?;
        let dir = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let origin: Option<Origin> = std::fs::read(dir.join(ORIGIN))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mtime_ns = (meta.mtime().max(0) as u64) * 1_000_000_000 + meta.mtime_nsec().max(0) as u64;
        out.push(Entry {
            last_used_ns: origin.as_ref().map_or(mtime_ns, |o| o.last_used_ns),
            bytes: disk_usage(&dir),
            origin,
            dir,
        });
    }
    out.sort_by_key(|e| e.last_used_ns);
    Ok(out)
}

/// Whether a command is using `e` (its LOCK is held; an older
/// consnap's entries, `BUCKET/PREFIX`, have none).
pub fn in_use(e: &Entry) -> bool {
    File::open(e.dir.join(LOCK)).is_ok_and(|f| !flock(&f, libc::LOCK_EX | libc::LOCK_NB))
}

/// Remove `e` unless a command is using it; whether it was removed.
pub fn remove(e: &Entry) -> Result<bool, CacheError> {
    // Held until the entry is gone: a command that opens it meanwhile
    // waits, then finds its LOCK removed and makes the entry again.
    let lock = File::open(e.dir.join(LOCK)).ok();
    if lock.as_ref().is_some_and(|f| !flock(f, libc::LOCK_EX | libc::LOCK_NB)) {
        return Ok(false);
    }
    std::fs::remove_dir_all(&e.dir).map_err(io("remove", &e.dir))?;
    Ok(true)
}

/// After a fetch into `keep`: remove the least recently used entries
/// until the cache holds at most `max` (never `keep`, nor an entry in
/// use). Returns the entries removed.
pub fn enforce(keep: &InUse, max: u64) -> Result<Vec<Entry>, CacheError> {
    let root = keep.dir.parent().map(Path::to_path_buf).unwrap_or_default();
    let entries = list(&root)?;
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut removed = Vec::new();
    for e in entries {
        if total <= max {
            break;
        }
        if e.dir == keep.dir || !remove(&e)? {
            continue;
        }
        total -= e.bytes;
        tracing::info!(
            "restore cache over {}: removed {} ({}, last used {})",
            crate::args::human(max),
            e.dir.display(),
            crate::args::human(e.bytes),
            crate::args::utc(e.last_used_ns)
        );
        removed.push(e);
    }
    if total > max {
        tracing::warn!(
            "the restore cache {} holds {}, over its limit of {} ({MAX_VAR}): what is left is in use",
            root.display(),
            crate::args::human(total),
            crate::args::human(max)
        );
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> remote::RemoteUrl {
        remote::RemoteUrl::parse(s).unwrap()
    }

    #[test]
    fn endpoints_give_host_and_port() {
        assert_eq!(endpoint_label(Some("http://127.0.0.1:3900")), "127.0.0.1:3900");
        assert_eq!(endpoint_label(Some("https://u:p@s3.example.com/x?y")), "s3.example.com");
        assert_eq!(endpoint_label(None), "default");
    }

    #[test]
    fn entry_names_are_one_file_name_whatever_the_text() {
        let uuid = [0xab; 16];
        for (endpoint, u) in [
            (Some("http://../../etc:80/"), "s3://bucket/a/b"),
            (Some("/../../x"), "s3://..bucket/x"),
            (Some("http://h/\0\n"), "s3://b.b/..x/y..z/%2e%2e"),
            (None, "s3://bucket"),
            (Some(&*"a".repeat(400)), &format!("s3://bucket/{}", "p/".repeat(300))),
        ] {
            let name = entry_name(endpoint, &url(u), &uuid);
            assert!(!name.contains('/') && !name.contains('\0'), "{name}");
            assert!(!name.starts_with('.'), "{name}");
            assert!(name.len() < 255, "{name}");
            assert!(name.ends_with(&remote::uuid_hex(&uuid)), "{name}");
            let p = Path::new("/cache").join(&name);
            assert_eq!(p.parent(), Some(Path::new("/cache")), "{name}");
            assert_eq!(p.components().count(), 3, "{name}");
        }
    }

    #[test]
    fn entry_names_differ_by_endpoint_url_and_store() {
        let (a, b) = ([1; 16], [2; 16]);
        let u = url("s3://bucket/vm1");
        let g1 = Some("http://127.0.0.1:3900");
        let g2 = Some("http://127.0.0.1:3901");
        let names = [
            entry_name(g1, &u, &a),
            entry_name(g2, &u, &a),
            entry_name(g1, &u, &b),
            entry_name(g1, &url("s3://bucket/vm1/x"), &a),
            // The readable parts of these are the same.
            entry_name(g1, &url("s3://bucket/a/b"), &a),
            entry_name(g1, &url("s3://bucket/a_b"), &a),
        ];
        for (i, x) in names.iter().enumerate() {
            for y in &names[i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert!(names[0].starts_with("127.0.0.1-3900_bucket_vm1_"), "{}", names[0]);
    }
}
