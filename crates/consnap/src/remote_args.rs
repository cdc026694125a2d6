//! What the commands that reach an object store share: a client for
//! `s3://BUCKET/PREFIX` with the key of `--encrypt-key`, and where a remote
//! store is copied by default. Used by `run` and `restore` (`--replicate`,
//! restoring from an object store), `ls` and `verify`; it uses no other
//! module of the CLI, so that none of them depends on another through it.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why an object store cannot be reached as given.
#[derive(Debug, Error)]
pub enum RemoteArgsError {
    /// The URL is not an object store's, or the client cannot be set up.
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    /// The `--encrypt-key` file cannot be used.
    #[error(transparent)]
    Key(#[from] remote::SealError),
    /// No `--cache` and nowhere to put the default one.
    #[error("--cache: no HOME to put the default cache under")]
    NoHome,
}

/// A client for the object store `url`, with the key in `key` if given.
pub fn remote_client(url: &str, key: Option<&Path>) -> Result<remote::Client, RemoteArgsError> {
    let u = remote::RemoteUrl::parse(url)?;
    let key = key.map(remote::SealKey::load).transpose()?;
    Ok(remote::Client::from_env(&u)?.with_key(key))
}

/// Where a remote store is copied by default:
/// `$HOME/.cache/consnap/remote/BUCKET/PREFIX`.
pub fn default_cache(u: &remote::RemoteUrl) -> Result<PathBuf, RemoteArgsError> {
    let home = std::env::var_os("HOME").ok_or(RemoteArgsError::NoHome)?;
    let mut p = PathBuf::from(home).join(".cache/consnap/remote").join(&u.bucket);
    if !u.prefix.is_empty() {
        p = p.join(&u.prefix);
    }
    Ok(p)
}
