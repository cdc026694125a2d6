//! `consnap bench`: the paper's evaluation, beside stop-and-copy and QEMU.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use thiserror::Error;

use crate::args::{self, ArgError};

/// Why `consnap bench` cannot run or finish.
#[derive(Debug, Error)]
pub enum BenchCmdError {
    /// `--modes` names no mode.
    #[error("--modes: no mode {0:?}")]
    NoMode(String),
    /// `--intervals` with a zero interval.
    #[error("--intervals: {0:?} is not an interval")]
    ZeroInterval(Duration),
    /// `--repeats 0`.
    #[error("--repeats: must be at least 1")]
    NoRepeats,
    /// `--min-seconds` out of range.
    #[error("--min-seconds: {0} is not between 1 and 3600")]
    MinSeconds(f64),
    /// `--cap` out of range.
    #[error("--cap: {0} is neither 0 nor a multiple between 1.5 and 1000")]
    Cap(f64),
    /// `--vcpus 0`.
    #[error("--vcpus: must be at least 1")]
    NoVcpus,
    /// The consnap binary to run cannot be found.
    #[error("cannot find the consnap binary: {0}")]
    Exe(#[source] std::io::Error),
    /// A workload that does not parse, or the bench itself failed.
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A subset that finishes in a few minutes (a first look; CI's smoke test).
    #[arg(long)]
    pub quick: bool,
    /// Results folder: one JSON line per run; a rerun skips the runs already there.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// The report to write (plots go to plots/ beside it). Default: RESULTS/BENCHMARKS.md.
    #[arg(long)]
    pub doc: Option<PathBuf>,
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = mem)]
    pub mem: String,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Workloads, comma-separated: build, ftp-100M, ftp-1G, ftp,
    /// memstress-low, memstress-moderate, memstress, or NAME=SPEC (repeat
    /// the flag for specs, which contain commas).
    #[arg(long)]
    pub workloads: Vec<String>,
    /// Modes, comma-separated: none, stop-copy-full, stop-copy, cow,
    /// qemu-none, qemu-background, qemu-stop-copy.
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Snapshot intervals, comma-separated (e.g. 20ms,1s,60s).
    #[arg(long, value_delimiter = ',', value_parser = args::duration)]
    pub intervals: Vec<Duration>,
    /// Repeats of each cell (below the long intervals).
    #[arg(long)]
    pub repeats: Option<u32>,
    /// Shortest run, seconds of guest work without snapshots (the default
    /// is just long enough for three snapshots at 1 s; longer runs weigh
    /// boot and the first full epoch less).
    #[arg(long)]
    pub min_seconds: Option<f64>,
    /// Stop a snapshot run still going after this many times its length
    /// without snapshots; its loss is then reported as a lower bound
    /// (default 3; 0 = let every run finish).
    #[arg(long)]
    pub cap: Option<f64>,
    /// Only write the report again from the results.
    #[arg(long)]
    pub render_only: bool,
    /// Instead of the matrix: the guest's disk throughput on consnap's
    /// virtio-blk against QEMU's (sequential 1 MiB and random 4 KiB, read
    /// and write, no snapshots), each --repeats times (default 3); prints a
    /// Markdown table and writes it to RESULTS/DISK-IO.md.
    #[arg(long)]
    pub disk_io: bool,
    /// Instead of the matrix: the kv guest's round trip and request rate
    /// on consnap's virtio-net against QEMU's (no snapshots), and the round
    /// trip with output commit at 20 ms, 100 ms and 1 s, each --repeats
    /// times (default 3), in network namespaces of their own (root only);
    /// prints a Markdown table and writes it to RESULTS/NET.md.
    #[arg(long, conflicts_with = "disk_io")]
    pub net: bool,
}

fn mem(s: &str) -> Result<String, ArgError> {
    args::size(s).map(|_| s.to_string())
}

/// Scratch space under `results`, consnap itself, and the exported guest
/// when QEMU is installed (for the QEMU cells).
fn side_bench_setup(
    a: &BenchArgs,
    default: &str,
) -> Result<(PathBuf, PathBuf, PathBuf, Option<PathBuf>), BenchCmdError> {
    let results = a.results.clone().unwrap_or_else(|| PathBuf::from(default));
    let scratch = results.join("scratch");
    std::fs::create_dir_all(&scratch).map_err(|e| bench::BenchError::Io {
        path: scratch.clone(),
        source: e,
    })?;
    let exe = std::env::current_exe().map_err(BenchCmdError::Exe)?;
    let elf = scratch.join("guest.elf");
    let qemu = std::process::Command::new(bench::microvm::QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if qemu {
        std::fs::write(&elf, guest::GUEST_ELF).map_err(|e| bench::BenchError::Io {
            path: elf.clone(),
            source: e,
        })?;
    }
    Ok((results, scratch, exe, qemu.then_some(elf)))
}

/// Print `table`, write it to --doc or RESULTS/`name`, drop the scratch space.
fn side_bench_done(
    a: &BenchArgs,
    results: &std::path::Path,
    scratch: &std::path::Path,
    name: &str,
    table: &str,
) -> Result<i32, BenchCmdError> {
    print!("{table}");
    let doc = a.doc.clone().unwrap_or_else(|| results.join(name));
    std::fs::write(&doc, table).map_err(|e| bench::BenchError::Io { path: doc, source: e })?;
    let _ = std::fs::remove_dir_all(scratch);
    Ok(0)
}

/// `--disk-io`: the throughput table.
fn disk_io(a: &BenchArgs) -> Result<i32, BenchCmdError> {
    let (results, scratch, exe, elf) = side_bench_setup(a, "bench-results/disk-io")?;
    let repeats = a.repeats.unwrap_or(3).max(1);
    let rows = bench::disk_io::measure(&exe, elf.as_deref(), &scratch, repeats).map_err(bench::BenchError::from)?;
    let table = bench::disk_io::table(&rows, repeats);
    side_bench_done(a, &results, &scratch, "DISK-IO.md", &table)
}

/// `--net`: the network table.
fn net(a: &BenchArgs) -> Result<i32, BenchCmdError> {
    let (results, scratch, exe, elf) = side_bench_setup(a, "bench-results/net")?;
    let repeats = a.repeats.unwrap_or(3).max(1);
    let ctx = bench::net::Ctx {
        exe,
        elf,
        scratch: scratch.clone(),
    };
    let table = bench::net::bench(&ctx, repeats).map_err(bench::BenchError::from)?;
    side_bench_done(a, &results, &scratch, "NET.md", &table)
}

pub fn bench(a: BenchArgs) -> Result<i32, BenchCmdError> {
    if a.disk_io {
        return disk_io(&a);
    }
    if a.net {
        return net(&a);
    }
    let mut matrix = if a.quick {
        bench::Matrix::quick()
    } else {
        bench::Matrix::full()
    };
    let label = if a.quick { "quick" } else { "full" };
    if !a.workloads.is_empty() {
        let mut ws = Vec::new();
        for w in &a.workloads {
            // A NAME=SPEC holds commas of its own; otherwise a list.
            let parts: Vec<&str> = if w.contains('=') {
                vec![w.as_str()]
            } else {
                w.split(',').collect()
            };
            for p in parts {
                ws.push(bench::Workload::parse(p)?);
            }
        }
        // Chosen workloads run at every interval.
        matrix.long_workloads = ws.iter().map(|w| w.name.clone()).collect();
        matrix.qemu_workloads = matrix.long_workloads.clone();
        matrix.workloads = ws;
    }
    if !a.modes.is_empty() {
        matrix.modes = a
            .modes
            .iter()
            .map(|m| bench::Mode::parse(m).ok_or_else(|| BenchCmdError::NoMode(m.clone())))
            .collect::<Result<_, _>>()?;
        if !matrix.modes.contains(&bench::Mode::None) {
            matrix.modes.insert(0, bench::Mode::None);
        }
        if matrix.modes.iter().any(|m| m.is_qemu()) && !matrix.modes.contains(&bench::Mode::QemuNone) {
            matrix.modes.push(bench::Mode::QemuNone);
        }
        matrix.long_modes = matrix.modes.clone();
    }
    if !a.intervals.is_empty() {
        if let Some(z) = a.intervals.iter().find(|d| d.is_zero()) {
            return Err(BenchCmdError::ZeroInterval(*z));
        }
        matrix.intervals = a.intervals.clone();
    }
    if let Some(r) = a.repeats {
        if r == 0 {
            return Err(BenchCmdError::NoRepeats);
        }
        matrix.repeats = r;
    }
    if let Some(s) = a.min_seconds {
        if !(s.is_finite() && (1.0..=3600.0).contains(&s)) {
            return Err(BenchCmdError::MinSeconds(s));
        }
        matrix.base_seconds = s;
    }
    if let Some(c) = a.cap {
        if !(c == 0.0 || c.is_finite() && (1.5..=1000.0).contains(&c)) {
            return Err(BenchCmdError::Cap(c));
        }
        matrix.cap = c;
    }
    if a.vcpus == 0 {
        return Err(BenchCmdError::NoVcpus);
    }
    let results = a
        .results
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench-results/{label}")));
    let doc = a.doc.clone().unwrap_or_else(|| results.join("BENCHMARKS.md"));
    let exe = std::env::current_exe().map_err(BenchCmdError::Exe)?;
    let opts = bench::Options {
        matrix,
        exe,
        results,
        doc,
        mem: a.mem.clone(),
        vcpus: a.vcpus,
        render_only: a.render_only,
        label: label.into(),
    };
    let s = bench::run(&opts)?;
    println!(
        "consnap bench: {} runs made, {} already in the results, {} failed, {} wrong checksums; report {}",
        s.ran,
        s.skipped_done,
        s.failed,
        s.wrong_checksums,
        s.doc.display()
    );
    Ok(if s.failed > 0 || s.wrong_checksums > 0 { 1 } else { 0 })
}
