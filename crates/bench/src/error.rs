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
    /// `consnap guest export`, which the QEMU runs need, failed.
    #[error("consnap guest export: exited with {status}")]
    GuestExport { status: std::process::ExitStatus },
    /// The calibration of a workload failed.
    #[error("calibrating {workload}: {source}")]
    Calibrate {
        workload: String,
        #[source]
        source: crate::ConsnapRunError,
    },
    /// A disk throughput run failed.
    #[error(transparent)]
    DiskIo(#[from] crate::disk_io::DiskIoError),
    /// A network run failed.
    #[error(transparent)]
    Net(#[from] crate::net::NetBenchError),
    /// A plot of the report could not be drawn.
    #[error("{file}: {source}")]
    Plot {
        file: String,
        #[source]
        source: crate::PlotError,
    },
}

impl BenchError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BenchError {
        let path = path.into();
        move |source| BenchError::Io { path, source }
    }
}

pub type Result<T> = std::result::Result<T, BenchError>;
