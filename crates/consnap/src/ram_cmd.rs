//! `consnap bench-ram`: does what a snapshot costs grow with guest RAM?
//! For each `--mem`, one `consnap run` of the same small workload (the
//! guest touches little of its RAM) with cow snapshots every 100 ms gives
//! the pause and the arming time; then the epochs whose chains are 1, 8
//! and 64 epochs long are each restored lazily, from a cold page cache
//! where this process may drop it (root), and the time to the guest's
//! first instruction is read from the restore's report. One table.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Args;

use crate::bench_child::{BenchChildError as RamBenchError, consnap_report as consnap, scratch_dir};

/// Options of `consnap bench-ram`.
#[derive(Debug, Args)]
pub struct RamArgs {
    /// Guest RAM sizes, comma-separated.
    #[arg(long, default_value = "1G,4G,16G", value_delimiter = ',')]
    pub mem: Vec<String>,
    /// Chain lengths to restore, comma-separated.
    #[arg(long, default_value = "1,8,64", value_delimiter = ',')]
    pub chains: Vec<usize>,
    /// The guest's work (enough for 64 epochs at 100 ms).
    #[arg(long, default_value = "memstress,wss=64M,rate=20000,ops=160000")]
    pub workload: String,
    /// Lazy restores of each epoch (the table gives the median).
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// Where the stores go (default: a new directory under $TMPDIR, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Run the benchmark; exit status 0.
pub fn bench_ram(a: RamArgs) -> Result<i32, RamBenchError> {
    let (dir, scratch) = scratch_dir(a.dir.as_deref(), "consnap-bench-ram")?;
    let cold = drop_caches();
    println!(
        "`{}`, cow every 100 ms; lazy restores {}, median of {}",
        a.workload,
        if cold {
            "from a cold page cache"
        } else {
            "warm (cannot drop the page cache: not root)"
        },
        a.repeats
    );
    let chains: Vec<String> = a
        .chains
        .iter()
        .map(|c| format!("first instruction, chain {c} (ms)"))
        .collect();
    println!(
        "| RAM | pause p50 / p99 (ms) | arming (ms) | epochs | {} |",
        chains.join(" | ")
    );
    println!("|---|---|---|---|{}", "---|".repeat(chains.len()));
    for mem in &a.mem {
        let store = dir.join(format!("store-{mem}"));
        let _ = std::fs::remove_dir_all(&store);
        let run = protected_run(&store, mem, &a.workload)?;
        let s = &run["snapshots"];
        let p = |k: &str| s["pause"][k].as_f64().unwrap_or(f64::NAN) / 1e3;
        let mut row = format!(
            "| {mem} | {:.2} / {:.2} | {:.1} | {} |",
            p("p50_us"),
            p("p99_us"),
            s["arm_ms"].as_f64().unwrap_or(f64::NAN),
            s["count"]
        );
        for &c in &a.chains {
            row += &match epoch_with_chain(&store, c)? {
                Some(id) => {
                    let mut ms = Vec::new();
                    for _ in 0..a.repeats.max(1) {
                        drop_caches();
                        ms.push(lazy_first_instruction(&store, id)?);
                    }
                    ms.sort_by(f64::total_cmp);
                    format!(" {:.1} (epoch {id}) |", ms[ms.len() / 2])
                }
                None => " no such chain |".into(),
            };
        }
        println!("{row}");
        let _ = std::fs::remove_dir_all(&store);
    }
    if scratch {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

/// Drop the page cache (root only); whether it was dropped.
fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// The protected run at `mem`: its report.
fn protected_run(store: &Path, mem: &str, workload: &str) -> Result<serde_json::Value, RamBenchError> {
    let report = store.with_extension("run.json");
    let s = store.display().to_string();
    let args = [
        "run",
        "--workload",
        workload,
        "--mem",
        mem,
        "--pause-probe",
        "0",
        "--mode",
        "cow",
        "--interval",
        "100ms",
        "--retain",
        "1h:all",
        "--max-chain",
        "100",
        "--snapshot-dir",
        &s,
    ];
    consnap(&args, format!("the run with --mem {mem}"), &report)
}

/// An epoch of `store` whose chain is `chain` epochs long.
fn epoch_with_chain(store: &Path, chain: usize) -> Result<Option<u64>, RamBenchError> {
    let exe = std::env::current_exe().map_err(|source| RamBenchError::Spawn {
        what: "consnap",
        source,
    })?;
    let out = Command::new(exe)
        .args(["ls", "--quick", "--json"])
        .arg(store)
        .stderr(Stdio::null())
        .output()
        .map_err(|source| RamBenchError::Spawn {
            what: "consnap ls",
            source,
        })?;
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| RamBenchError::Failed {
        what: format!("consnap ls {}", store.display()),
        why: e.to_string(),
    })?;
    Ok(rows.as_array().and_then(|rows| {
        rows.iter()
            .find(|r| r["chain"].as_u64() == Some(chain as u64) && r["restorable"] == true)
            .and_then(|r| r["id"].as_u64())
    }))
}

/// A lazy restore of epoch `id`, run to the guest's end: milliseconds to
/// its first instruction.
fn lazy_first_instruction(store: &Path, id: u64) -> Result<f64, RamBenchError> {
    let report = store.with_extension("restore.json");
    let s = store.display().to_string();
    let at = id.to_string();
    let r = consnap(
        &["restore", &s, "--at", &at, "--lazy"],
        format!("the lazy restore of epoch {id}"),
        &report,
    )?;
    r["restored_from"]["restore_s"]
        .as_f64()
        .map(|s| s * 1e3)
        .ok_or_else(|| RamBenchError::Failed {
            what: format!("the lazy restore of epoch {id}"),
            why: "no restored_from.restore_s in its report".into(),
        })
}
