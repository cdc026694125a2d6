//! Errors of the remote store.

use thiserror::Error;

/// What went wrong with a remote store.
#[derive(Debug, Error)]
pub enum RemoteError {
    /// A `--replicate` or restore URL that is not `s3://BUCKET[/PREFIX]`.
    #[error("{url:?} is not an object store URL: {why} (expected s3://BUCKET/PREFIX)")]
    Url { url: String, why: &'static str },
    /// The client could not be set up (endpoint, region, credentials).
    #[error("cannot reach the object store for {url}: {why}")]
    Setup { url: String, why: String },
    /// A request failed (`why`: the client's error on one line; servers
    /// put XML with line breaks in theirs).
    #[error("{op} {key} in {url}: {why}")]
    Request {
        op: &'static str,
        key: String,
        url: String,
        why: String,
    },
    /// The remote store holds nothing consnap wrote.
    #[error(
        "{url} holds no consnap store (no MANIFEST object): nothing was replicated there yet, or the prefix is wrong"
    )]
    NoStore { url: String },
    /// MANIFEST names what the remote store does not hold, or belongs
    /// to another store.
    #[error("the MANIFEST of {url} is damaged: {why}")]
    BadManifest { url: String, why: String },
    /// MANIFEST does not decode.
    #[error("the MANIFEST of {url} is damaged: {source}")]
    DamagedManifest {
        url: String,
        #[source]
        source: crate::manifest::ManifestError,
    },
    /// An object does not hold what MANIFEST says.
    #[error("object {key} of {url} is damaged: {why}")]
    BadObject { url: String, key: String, why: String },
    /// An encrypted object that does not open with the key given.
    #[error("object {key} of {url} is damaged: {source}")]
    SealedObject {
        url: String,
        key: String,
        #[source]
        source: crate::seal::SealError,
    },
    /// No nonce for a new encrypted object.
    #[error("cannot reach the object store for {url}: {source}")]
    Nonce {
        url: String,
        #[source]
        source: crate::seal::SealError,
    },
    /// The key given does not open the remote store's epochs.
    #[error("{url}: {why}")]
    Key { url: String, why: String },
    /// `--at` names no epoch of the remote store.
    #[error("{url} has no epoch {what}")]
    NoEpoch { url: String, what: String },
    /// The local copy to fetch into holds another store.
    #[error(
        "refusing to fetch into {dir}: it holds {have}, and {url} is store {want} (a local copy holds one store): give --cache a new or empty directory, or remove {dir}"
    )]
    OtherStore {
        dir: std::path::PathBuf,
        have: String,
        url: String,
        want: String,
    },
    /// A local file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The local store could not be read.
    #[error(transparent)]
    Store(#[from] Box<store::StoreError>),
}

/// Result of the remote store.
pub type Result<T> = std::result::Result<T, RemoteError>;

/// An I/O error on `path`.
pub(crate) fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RemoteError + use<> {
    let path = path.to_path_buf();
    move |source| RemoteError::Io { what, path, source }
}

/// `e` on one line, whitespace runs folded into single spaces.
pub(crate) fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}
