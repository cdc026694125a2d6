//! What the commands that reach an object store share: a client for
//! `s3://BUCKET/PREFIX` with the key of `--encrypt-key`, where a remote
//! store is copied (`--cache`, or the restore cache), and the refusal of
//! those options for a local store. Used by `run` and `restore`
//! (`--replicate`, restoring from an object store), `ls` and `verify`; it
//! uses no other module of the CLI but the restore cache, so that none of
//! them depends on another through it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::remote_cache::{self, CacheError, InUse};

/// Why an object store cannot be reached as given.
#[derive(Debug, Error)]
pub enum RemoteArgsError {
    /// The URL is not an object store's, or the client cannot be set up.
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    /// The `--encrypt-key` file cannot be used.
    #[error(transparent)]
    Key(#[from] remote::SealError),
    /// The restore cache cannot be used.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// An option for object stores given with a local store.
    #[error(
        "{flag}: {dir} is a local snapshot directory; {flag} is for a store in an object store (s3://BUCKET/PREFIX): drop it"
    )]
    LocalStore {
        /// The option.
        flag: &'static str,
        /// The directory.
        dir: PathBuf,
    },
}

/// A client for the object store `url`, with the key in `key` if given.
pub fn remote_client(url: &str, key: Option<&Path>) -> Result<remote::Client, RemoteArgsError> {
    let u = remote::RemoteUrl::parse(url)?;
    let key = key.map(remote::SealKey::load).transpose()?;
    Ok(remote::Client::from_env(&u)?.with_key(key))
}

/// Refuse `flag` (given when `given`) for the local store `dir`.
pub fn remote_only(dir: &Path, flag: &'static str, given: bool) -> Result<(), RemoteArgsError> {
    if given {
        return Err(RemoteArgsError::LocalStore {
            flag,
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Where a remote store is copied: `--cache DIR`, or its entry in the
/// restore cache (held in use while the copy lives).
#[derive(Debug)]
pub struct Copy {
    /// The local store.
    pub dir: PathBuf,
    /// The restore cache's entry, when it is one.
    pub entry: Option<InUse>,
}

impl Copy {
    /// `cache` if given, else the restore cache's entry for the store
    /// `m` describes.
    pub fn new(cache: Option<&Path>, client: &remote::Client, m: &remote::Manifest) -> Result<Copy, RemoteArgsError> {
        if let Some(c) = cache {
            return Ok(Copy {
                dir: c.to_path_buf(),
                entry: None,
            });
        }
        // A bad limit is refused before anything is fetched.
        remote_cache::max_size()?;
        let entry = remote_cache::open(client, m)?;
        Ok(Copy {
            dir: entry.store(),
            entry: Some(entry),
        })
    }

    /// After the fetch: keep the restore cache within its limit (never
    /// removing this copy).
    pub fn bound(&self) -> Result<(), RemoteArgsError> {
        if let (Some(e), Some(max)) = (&self.entry, remote_cache::max_size()?) {
            remote_cache::enforce(e, max)?;
        }
        Ok(())
    }
}
