//! Restoring from a remote store: its manifest, and a local copy of the
//! chain of one epoch (a store directory of its own, which the ordinary
//! restore then reads and verifies page by page).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use store::format::{HEADER_SIZE, Header};

use crate::client::Client;
use crate::error::{RemoteError, Result, io};
use crate::manifest::{Entry, Manifest};

/// Ranged GETs in flight at once per object.
const PARALLEL_GETS: usize = 8;

/// What [`fetch_chain`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    /// The local store holding the chain.
    pub dir: PathBuf,
    /// Epochs of the chain, and how many were downloaded (the others were
    /// there already).
    pub chain: usize,
    pub downloaded: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// The remote store's manifest.
pub fn manifest(client: &Client) -> Result<Manifest> {
    let url = client.url().to_string();
    let text = client
        .get("MANIFEST")?
        .ok_or(RemoteError::NoStore { url: url.clone() })?;
    Manifest::decode(&text).map_err(|source| RemoteError::DamagedManifest { url, source })
}

/// Whether `client` holds the key the remote store's epochs are
/// encrypted with (or none when they are not).
pub fn check_key(client: &Client, m: &Manifest) -> Result<()> {
    let url = client.url().to_string();
    let why = match (m.key_id, client.key().map(crate::SealKey::id)) {
        (None, None) => return Ok(()),
        (Some(r), Some(l)) if r == l => return Ok(()),
        (Some(r), None) => format!("its epochs are encrypted (key {}): give --encrypt-key FILE", hex(&r)),
        (Some(r), Some(l)) => format!(
            "its epochs are encrypted with key {}, and --encrypt-key gives key {}",
            hex(&r),
            hex(&l)
        ),
        (None, Some(_)) => "its epochs are not encrypted, and --encrypt-key was given: use another prefix for encrypted epochs, or drop --encrypt-key".into(),
    };
    Err(RemoteError::Key { url, why })
}

/// The tag in an object name `epochs/ID-TAG.epoch`.
pub(crate) fn tag_of(object: &str) -> Option<u64> {
    let stem = object.strip_suffix(".epoch")?;
    let (_, tag) = stem.rsplit_once('-')?;
    u64::from_str_radix(tag, 16).ok()
}

/// The tag of a local epoch file: the XXH3 of its header.
fn local_tag(path: &Path) -> Option<(u64, u64)> {
    let f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = vec![0u8; HEADER_SIZE];
    f.read_exact_at(&mut head, 0).ok()?;
    Some((xxhash_rust::xxh3::xxh3_64(&head), len))
}

/// A store's UUID as 32 hex digits.
pub fn hex(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|x| format!("{x:02x}")).collect()
}

fn private_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(io("create", p))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).map_err(io("set the mode of", p))
}

/// Make `into` a local store for the chain of epoch `id` of the remote
/// store: its STORE, and every epoch of the chain that is not there yet
/// in the same version, each downloaded with parallel ranged GETs under a
/// temporary name, checked (size, and header against the tag of its
/// object name) and renamed into place. `into` may hold an earlier copy
/// of the same store (a cache); another store there is refused.
pub fn fetch_chain(client: &Client, m: &Manifest, id: u64, into: &Path) -> Result<Fetched> {
    let chain = m.chain(id).ok_or_else(|| RemoteError::BadManifest {
        url: client.url().to_string(),
        why: format!("epoch {id} has no whole chain in it"),
    })?;
    fetch_entries(client, m, &chain, into)
}

/// Like [`fetch_chain`], for every epoch of the remote store (to verify
/// all of it).
pub fn fetch_all(client: &Client, m: &Manifest, into: &Path) -> Result<Fetched> {
    let all: Vec<&Entry> = m.epochs.iter().collect();
    fetch_entries(client, m, &all, into)
}

/// The headers of every epoch of the remote store (one ranged GET each,
/// checked against the tag of the object's name), for listing.
pub fn headers(client: &Client, m: &Manifest) -> Result<Vec<(Entry, Result<Header>)>> {
    check_key(client, m)?;
    Ok(m.epochs.iter().map(|e| (e.clone(), header(client, e))).collect())
}

/// The header of epoch `e` (one ranged GET, checked against the tag of
/// the object's name).
pub fn header(client: &Client, e: &Entry) -> Result<Header> {
    let head = client.get_start(&e.object, e.bytes, HEADER_SIZE as u64)?;
    let bad = |why: String| RemoteError::BadObject {
        url: client.url().to_string(),
        key: client.url().key(&e.object),
        why,
    };
    if Some(xxhash_rust::xxh3::xxh3_64(&head)) != tag_of(&e.object) {
        return Err(bad("its header does not match its name".into()));
    }
    Header::decode(&head, Path::new(&e.object)).map_err(|err| bad(err.to_string()))
}

fn fetch_entries(client: &Client, m: &Manifest, chain: &[&Entry], into: &Path) -> Result<Fetched> {
    check_key(client, m)?;
    let t0 = Instant::now();
    let url = client.url().to_string();
    let remote_store = client.get("STORE")?.ok_or_else(|| RemoteError::BadObject {
        url: url.clone(),
        key: client.url().key("STORE"),
        why: "missing".into(),
    })?;
    private_dir(into)?;
    let epochs = into.join("epochs");
    private_dir(&epochs)?;
    let store_path = into.join("STORE");
    match std::fs::read(&store_path) {
        Ok(b) if b == remote_store => {}
        Ok(_) => {
            let have = store::Store::open(into, store::Access::Read).map_or_else(
                |_| "an unreadable STORE file".into(),
                |s| format!("store {}", hex(&s.uuid())),
            );
            return Err(RemoteError::OtherStore {
                dir: into.to_path_buf(),
                have,
                url,
                want: hex(&m.store_uuid),
            });
        }
        Err(_) => {
            let tmp = into.join(".STORE.tmp-fetch");
            write_private(&tmp, &remote_store)?;
            std::fs::rename(&tmp, &store_path).map_err(io("rename", &tmp))?;
        }
    }
    // The copy must be the store the manifest describes.
    let local = store::Store::open(into, store::Access::Read).map_err(Box::new)?;
    if local.uuid() != m.store_uuid {
        return Err(RemoteError::BadObject {
            url,
            key: client.url().key("STORE"),
            why: "its UUID is not the manifest's".into(),
        });
    }
    drop(local);
    let (mut downloaded, mut bytes) = (0, 0);
    for e in chain {
        let tag = tag_of(&e.object).ok_or_else(|| RemoteError::BadManifest {
            url: url.clone(),
            why: format!("object name {:?}", e.object),
        })?;
        let path = epochs.join(store::epoch_file_name(e.id));
        if local_tag(&path) == Some((tag, e.bytes)) {
            continue;
        }
        let tmp = epochs.join(format!(".tmp-fetch-{:020}", e.id));
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        client.get_to_file(&e.object, e.bytes, &f, &tmp, PARALLEL_GETS)?;
        f.sync_all().map_err(io("sync", &tmp))?;
        drop(f);
        if local_tag(&tmp) != Some((tag, e.bytes)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(RemoteError::BadObject {
                url: url.clone(),
                key: client.url().key(&e.object),
                why: format!("it is not {} bytes with a header matching its name", e.bytes),
            });
        }
        std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
        downloaded += 1;
        bytes += e.bytes;
    }
    File::open(&epochs)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", &epochs))?;
    Ok(Fetched {
        dir: into.to_path_buf(),
        chain: chain.len(),
        downloaded,
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all_at(data, 0).map_err(io("write", path))?;
    f.sync_all().map_err(io("sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_come_back_out_of_object_names() {
        let name = crate::manifest::object_name(42, 0xfeed_beef);
        assert_eq!(tag_of(&name), Some(0xfeed_beef));
        assert_eq!(tag_of("epochs/x.epoch"), None);
    }
}
