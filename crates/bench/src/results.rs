//! The results folder: one JSON line per run (`runs.jsonl`), the work
//! sizes chosen for each workload (`calibration.json`), and the machine
//! they were measured on.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};

/// Schema of a run record.
pub const SCHEMA: &str = "consnap.bench/1";

/// Percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Pause {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// One run: a cell of the matrix in one repeat, or a baseline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Record {
    pub schema: String,
    /// Identifies the run for resuming: workload, work, mode, interval,
    /// repeat, memory and vCPUs.
    pub key: String,
    pub workload: String,
    /// The `--workload` spec, with `ops`.
    pub spec: String,
    pub mode: String,
    /// 0 for a baseline.
    pub interval_ms: u64,
    pub rep: u32,
    pub mem: String,
    pub vcpus: u32,
    /// Wall time of the fixed work, seconds (VM start to power-off). For a
    /// run stopped at its cap (`stopped_s`), the time to the stop: a lower
    /// bound.
    pub wall_s: f64,
    /// The guest's own run, seconds: its vCPUs' time from their start to
    /// their end (consnap's `vcpu_run_s` over the vCPUs), without the VM's
    /// set-up, the engine's arming before it and the last epoch's save
    /// after it. Losses are taken on it where a run and its baseline both
    /// have it (consnap runs since it was recorded), else on `wall_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_s: Option<f64>,
    /// The run lost so much that it was stopped at this many seconds (the
    /// matrix's cap, a multiple of the run's length without snapshots)
    /// before its work was done; its `wall_s` and `busy_s` are lower bounds
    /// and it has no checksum of its own (its restore is checked against the
    /// baseline's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_s: Option<f64>,
    /// vCPU time not spent idling at the guest's request, seconds: for a
    /// paced guest, what it used (work plus what snapshots cost it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_s: Option<f64>,
    /// The guest's checksum at the end (`0x…`).
    #[serde(default)]
    pub checksum: Option<String>,
    /// Snapshots committed, and how many were due while one was in flight.
    #[serde(default)]
    pub snapshots: u64,
    #[serde(default)]
    pub delayed: u64,
    /// Guest downtime per snapshot.
    #[serde(default)]
    pub pause: Option<Pause>,
    /// Pause request to durable, p50, milliseconds.
    #[serde(default)]
    pub durable_p50_ms: Option<f64>,
    /// File bytes per snapshot, median.
    #[serde(default)]
    pub bytes_p50: Option<f64>,
    /// Write-protect faults per snapshot, median (cow).
    #[serde(default)]
    pub faults_p50: Option<f64>,
    /// Saver speed, MB/s (consnap).
    #[serde(default)]
    pub save_mb_s: Option<f64>,
    /// Snapshot store (or QEMU's newest snapshot file) at the end, bytes.
    #[serde(default)]
    pub store_bytes: Option<u64>,
    /// Restore of the newest snapshot: time until the VM runs, and whether
    /// it then finished with the checksum of the run without snapshots.
    #[serde(default)]
    pub restore_s: Option<f64>,
    #[serde(default)]
    pub restore_ok: Option<bool>,
    /// The run failed: why. Its figures are not used.
    #[serde(default)]
    pub error: Option<String>,
    pub machine: Machine,
}

/// Where and when a run was made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Machine {
    pub host: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: u32,
    pub mem_gib: f64,
    /// UTC, RFC 3339.
    pub date: String,
    pub commit: String,
    #[serde(default)]
    pub qemu: Option<String>,
}

impl Machine {
    /// This machine, now.
    pub fn here(commit: &str, qemu: Option<String>) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim())
            })
            .unwrap_or("unknown")
            .to_string();
        let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count() as u32;
        let mem_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            host: read("/proc/sys/kernel/hostname").trim().to_string(),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            cpus,
            mem_gib: (mem_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            date: now_rfc3339(),
            commit: commit.to_string(),
            qemu,
        }
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = store::civil::from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The results folder.
pub struct Results {
    dir: PathBuf,
}

impl Results {
    /// Open (creating) a results folder.
    pub fn open(dir: &Path) -> Result<Results> {
        std::fs::create_dir_all(dir).map_err(BenchError::io(dir))?;
        Ok(Results { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn runs_path(&self) -> PathBuf {
        self.dir.join("runs.jsonl")
    }

    /// Every record so far, oldest first. A last line cut short by a kill
    /// is ignored; any other bad line is an error naming it.
    pub fn load(&self) -> Result<Vec<Record>> {
        let path = self.runs_path();
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(BenchError::Io { path, source: e }),
        };
        let lines: Vec<String> = BufReader::new(f)
            .lines()
            .collect::<std::io::Result<_>>()
            .map_err(BenchError::io(&path))?;
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Record>(line) {
                Ok(r) if r.schema == SCHEMA => out.push(r),
                Ok(r) => {
                    return Err(BenchError::BadRecord {
                        path,
                        line: i + 1,
                        why: format!("schema {:?}, expected {SCHEMA:?}", r.schema),
                    });
                }
                Err(_) if i + 1 == lines.len() => {} // torn by a kill
                Err(e) => {
                    return Err(BenchError::BadRecord {
                        path,
                        line: i + 1,
                        why: e.to_string(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Append one record (one line, flushed and synced).
    pub fn append(&self, r: &Record) -> Result<()> {
        let path = self.runs_path();
        let mut line = serde_json::to_string(r).map_err(|e| BenchError::BadRecord {
            path: path.clone(),
            line: 0,
            why: e.to_string(),
        })?;
        line.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(BenchError::io(&path))?;
        f.write_all(line.as_bytes()).map_err(BenchError::io(&path))?;
        f.sync_data().map_err(BenchError::io(&path))
    }

    /// Work sizes (ops) chosen so far, by `workload|seconds`.
    pub fn calibration(&self) -> Result<BTreeMap<String, u64>> {
        let path = self.dir.join("calibration.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| BenchError::BadRecord {
                path,
                line: 1,
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(BenchError::Io { path, source: e }),
        }
    }

    pub fn save_calibration(&self, c: &BTreeMap<String, u64>) -> Result<()> {
        let path = self.dir.join("calibration.json");
        let tmp = self.dir.join("calibration.json.tmp");
        let body = serde_json::to_vec_pretty(c).map_err(|e| BenchError::BadRecord {
            path: path.clone(),
            line: 0,
            why: e.to_string(),
        })?;
        std::fs::write(&tmp, body).map_err(BenchError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(BenchError::io(&path))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_last_line_is_ignored() {
        let dir = std::env::temp_dir().join(format!("bench-results-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let res = Results::open(&dir).unwrap();
        let r = Record {
            schema: SCHEMA.into(),
            key: "k1".into(),
            workload: "build".into(),
            mode: "cow".into(),
            wall_s: 4.5,
            pause: Some(Pause {
                p50_us: 300.0,
                p99_us: 900.0,
                max_us: 1500.0,
            }),
            ..Record::default()
        };
        res.append(&r).unwrap();
        res.append(&Record {
            key: "k2".into(),
            ..r.clone()
        })
        .unwrap();
        assert_eq!(
            res.load().unwrap(),
            vec![
                r.clone(),
                Record {
                    key: "k2".into(),
                    ..r.clone()
                }
            ]
        );
        // A kill in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(dir.join("runs.jsonl")).unwrap();
        f.write_all(b"{\"schema\":\"consnap.be").unwrap();
        assert_eq!(res.load().unwrap().len(), 2);
        // Damage before the end is reported with its line.
        std::fs::write(dir.join("runs.jsonl"), "garbage\n{}\n").unwrap();
        let e = res.load().unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dates_are_civil() {
        let d = now_rfc3339();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'), "{d}");
    }
}
