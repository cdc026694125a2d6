//! `consnap bench-saver`: how fast the cow saver writes against what the
//! disk takes, on the same directory, back to back. Each repeat runs
//! `dd if=/dev/zero of=DIR/… bs=4M oflag=direct` and then a `consnap run`
//! whose guest rewrites most of its RAM every epoch (memstress sweeping
//! 768 MiB, snapshots every second, so that every epoch is large and the
//! saver, not the guest, sets its pace), and prints both rates and their
//! ratio. The saver's rate is page bytes over the saver's time (resume to
//! commit: copying, comparing, checksumming and writing, with the guest
//! running and faulting beside it), per incremental epoch, median.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Args;

use crate::bench_child::{BenchChildError as SaverBenchError, consnap_report, scratch_dir};

/// Options of `consnap bench-saver`.
#[derive(Debug, Args)]
pub struct SaverArgs {
    /// Where both write (the directory a store would be in). Default: a
    /// new directory under $TMPDIR.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Repeats of the pair.
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// Bytes dd writes each time.
    #[arg(long, default_value = "1G", value_parser = crate::args::size)]
    pub dd_bytes: u64,
    /// The guest's work: sweeps most of its RAM every epoch.
    #[arg(long, default_value = "memstress,wss=768M,pattern=seq,ops=40000000")]
    pub workload: String,
}

/// Run the benchmark; exit status 0.
pub fn bench_saver(a: SaverArgs) -> Result<i32, SaverBenchError> {
    let (dir, scratch) = scratch_dir(a.dir.as_deref(), "consnap-bench-saver")?;
    println!("saver against dd oflag=direct bs=4M on {}", dir.display());
    println!("| repeat | dd MB/s | saver MB/s (median epoch) | saver / dd | epochs |");
    println!("|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for rep in 1..=a.repeats.max(1) {
        let dd = dd_rate(&dir, a.dd_bytes)?;
        let (saver, epochs) = saver_rate(&dir, &a.workload)?;
        let ratio = saver / dd;
        ratios.push(ratio);
        println!("| {rep} | {dd:.0} | {saver:.0} | {ratio:.2} | {epochs} |");
    }
    ratios.sort_by(f64::total_cmp);
    println!("median saver / dd: {:.2}", ratios[ratios.len() / 2]);
    if scratch {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

/// dd's rate writing `bytes` with O_DIRECT in 4 MiB blocks, MB/s.
fn dd_rate(dir: &Path, bytes: u64) -> Result<f64, SaverBenchError> {
    let file = dir.join(".dd-probe");
    let count = bytes.div_ceil(4 << 20).max(1);
    let t = Instant::now();
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=4M", &format!("count={count}"), "oflag=direct"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| SaverBenchError::Spawn { what: "dd", source })?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        return Err(SaverBenchError::Failed {
            what: "dd".into(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok((count * (4 << 20)) as f64 / secs / 1e6)
}

/// The saver's median rate over the incremental epochs of one run, MB/s,
/// and how many epochs that is.
fn saver_rate(dir: &Path, workload: &str) -> Result<(f64, usize), SaverBenchError> {
    let store = dir.join(".saver-probe");
    let report = dir.join(".saver-probe.json");
    let _ = std::fs::remove_dir_all(&store);
    let st = store.display().to_string();
    let args = [
        "run",
        "--workload",
        workload,
        "--mem",
        "1G",
        "--pause-probe",
        "0",
        "--mode",
        "cow",
        "--interval",
        "1s",
        "--snapshot-dir",
        &st,
    ];
    let v = consnap_report(&args, "the protected run".into(), &report);
    let _ = std::fs::remove_dir_all(&store);
    let v = v?;
    let failed = |why: String| SaverBenchError::Failed {
        what: "the protected run".into(),
        why,
    };
    let mut rates: Vec<f64> = v["snapshots"]["epochs"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["full"] == false)
                .filter_map(|e| {
                    let bytes = e["pages"].as_f64()? * 4096.0;
                    let ms = e["save_ms"].as_f64().filter(|ms| *ms > 0.0)?;
                    Some(bytes / ms / 1e3)
                })
                .collect()
        })
        .unwrap_or_default();
    if rates.is_empty() {
        return Err(failed("no incremental epoch in its report".into()));
    }
    rates.sort_by(f64::total_cmp);
    Ok((rates[rates.len() / 2], rates.len()))
}
