//! What the commands that reach an object store share: a client for
//! `s3://BUCKET/PREFIX` with the key of `--encrypt-key`, and where a remote
//! store is copied by default. Used by `run` and `restore` (`--replicate`,
//! restoring from an object store), `ls` and `verify`; it uses no other
//! module of the CLI, so that none of them depends on another through it.

use std::path::{Path, PathBuf};

/// A client for the object store `url`, with the key in `key` if given.
pub fn remote_client(url: &str, key: Option<&Path>) -> Result<remote::Client, String> {
    let u = remote::RemoteUrl::parse(url).map_err(|e| e.to_string())?;
    let key = key.map(remote::SealKey::load).transpose().map_err(|e| e.to_string())?;
    Ok(remote::Client::from_env(&u).map_err(|e| e.to_string())?.with_key(key))
}

/// Where a remote store is copied by default:
/// `$HOME/.cache/consnap/remote/BUCKET/PREFIX`.
pub fn default_cache(u: &remote::RemoteUrl) -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME").ok_or("--cache: no HOME to put the default cache under")?;
    let mut p = PathBuf::from(home).join(".cache/consnap/remote").join(&u.bucket);
    if !u.prefix.is_empty() {
        p = p.join(&u.prefix);
    }
    Ok(p)
}
