//! What `consnap bench-saver`, `bench-ram` and `bench-space` share: running this
//! consnap binary (or another program) as a child and reading the report
//! it wrote.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

/// Why a benchmark command cannot run or read its result.
#[derive(Debug, Error)]
pub enum BenchChildError {
    /// A program cannot be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The scratch directory cannot be made.
    #[error("{path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A run failed or its report lacks what is measured.
    #[error("{what} failed: {why}")]
    Failed {
        /// Which run.
        what: String,
        /// Why.
        why: String,
    },
}

/// `dir`, or a new directory under $TMPDIR named after `name` (to remove
/// afterwards: the flag says so), created.
pub fn scratch_dir(dir: Option<&Path>, name: &str) -> Result<(PathBuf, bool), BenchChildError> {
    let (dir, scratch) = match dir {
        Some(d) => (d.to_path_buf(), false),
        None => (
            std::env::temp_dir().join(format!("{name}-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).map_err(|source| BenchChildError::Dir {
        path: dir.clone(),
        source,
    })?;
    Ok((dir, scratch))
}

/// Run `consnap ARGS --report REPORT` (`what` names it in errors) and
/// return the report; the report file is removed.
pub fn consnap_report(args: &[&str], what: String, report: &Path) -> Result<serde_json::Value, BenchChildError> {
    let exe = std::env::current_exe().map_err(|source| BenchChildError::Spawn {
        what: "consnap",
        source,
    })?;
    let out = Command::new(exe)
        .args(args)
        .arg("--report")
        .arg(report)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| BenchChildError::Spawn {
            what: "consnap",
            source,
        })?;
    let text = std::fs::read(report);
    let _ = std::fs::remove_file(report);
    let failed = |why: String| BenchChildError::Failed {
        what: what.clone(),
        why,
    };
    if !out.status.success() {
        return Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    text.map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(failed)
}
