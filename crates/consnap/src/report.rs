//! The JSON run report (schema in docs/REPORT.md).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// Report schema identifier; bump when fields change meaning.
pub const SCHEMA: &str = "consnap.report/1";

/// Percentiles of a set of durations, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Maximum.
    pub max_us: f64,
}

impl Percentiles {
    /// Compute from samples (nearest-rank).
    pub fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            count: v.len(),
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: v[v.len() - 1],
        }
    }
}

/// The report of one `consnap run` or `consnap restore`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// "run" or "restore".
    pub command: &'static str,
    /// How the run ended: poweroff, reset, shutdown, signal, error.
    pub status: String,
    /// Error message when status is "error".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// consnap's own exit status.
    pub exit_code: i32,
    /// Code the guest wrote to the debug-exit port.
    pub guest_exit_code: Option<u32>,
    /// Workload name (workload guest only).
    pub workload: Option<String>,
    /// Workload parameters as guest command-line words.
    pub workload_spec: Option<String>,
    /// Ops the guest completed (final if it finished, else last published).
    pub ops: Option<u64>,
    /// Workload checksum, hex (only once the guest finished).
    pub checksum: Option<String>,
    /// Integrity errors the workload found.
    pub workload_errors: Option<u64>,
    /// Seconds from VM creation to the end.
    pub wall_time_s: f64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Pause latency of all-vCPU pauses (probes and snapshots).
    pub pause: Percentiles,
    /// Guest progress over time: [milliseconds, ops].
    pub progress: Vec<(u64, u64)>,
}

impl Report {
    /// Write the report atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let p = Percentiles::of(&s);
        assert_eq!((p.count, p.p50_us, p.p99_us, p.max_us), (100, 50.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&[]).count, 0);
    }
}
