//! Errors of `consnap bench`.

use std::path::PathBuf;

/// What went wrong while benchmarking. A failed *run* is not an error of
/// the bench: it is recorded in the results with its message, and the
/// matrix goes on; these stop the bench.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or directory of the results could not be used.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A results line that is not a record of this bench.
    #[error("{path}, line {line}: not a bench record ({why})")]
    BadRecord { path: PathBuf, line: usize, why: String },
    /// A flag value that cannot be used.
    #[error("{flag}: {why}")]
    BadFlag { flag: &'static str, why: String },
    /// A run the whole matrix depends on failed (the calibration of a workload).
    #[error("{what}: {why}")]
    Run { what: String, why: String },
}

impl BenchError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BenchError {
        let path = path.into();
        move |source| BenchError::Io { path, source }
    }
}

pub type Result<T> = std::result::Result<T, BenchError>;
