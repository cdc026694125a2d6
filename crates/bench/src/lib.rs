//! `consnap bench`: the ConSnap paper's evaluation reproduced on consnap,
//! each capture mode beside a run without snapshots made back to back with
//! it, and beside QEMU's background snapshots and stop-and-copy saves on
//! the same workload guest.
//!
//! The bench drives the `consnap` binary (and QEMU) as child processes, so
//! that it measures exactly what a user runs. Each run appends one JSON
//! line to the results folder; a rerun skips what is there, so an
//! interrupted matrix resumes. The report (docs/BENCHMARKS.md) and the SVG
//! plots are generated from those lines alone.

mod cells;
mod consnap_run;
pub mod disk_io;
pub mod error;
mod goal;
pub mod matrix;
pub mod microvm;
pub mod net;
mod plot;
mod proc;
mod qemu;
mod render;
pub mod results;
mod words;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use consnap_run::ConsnapRunError;
pub use error::{BenchError, Result};
pub use matrix::{Matrix, Mode, Workload};
pub use plot::PlotError;
pub use proc::ProcError;
pub use qemu::QemuError;
use results::{Machine, Record, Results, SCHEMA};

/// What to run and where.
#[derive(Debug, Clone)]
pub struct Options {
    pub matrix: Matrix,
    /// The consnap binary to measure.
    pub exe: PathBuf,
    /// The results folder (runs.jsonl, calibration.json, progress.log).
    pub results: PathBuf,
    /// The report to write; its plots go to `plots/` beside it.
    pub doc: PathBuf,
    /// Guest RAM (`--mem`) and vCPUs.
    pub mem: String,
    pub vcpus: u32,
    /// Only regenerate the report from the results.
    pub render_only: bool,
    /// Title line of the matrix, for the report (`quick` or `full`).
    pub label: String,
}

/// What a bench run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub ran: usize,
    pub skipped_done: usize,
    pub failed: usize,
    /// Restores that did not finish with the uninterrupted checksum, and
    /// runs whose own checksum differed from their baseline's.
    pub wrong_checksums: usize,
    pub doc: PathBuf,
}

/// Run the matrix (what is not in the results yet), then write the report.
pub fn run(opts: &Options) -> Result<Summary> {
    let res = Results::open(&opts.results)?;
    let mut summary = Summary {
        doc: opts.doc.clone(),
        ..Summary::default()
    };
    if !opts.render_only {
        measure(opts, &res, &mut summary)?;
    }
    let records = res.load()?;
    summary.wrong_checksums = cells::wrong_checksums(&records).len();
    render::write(opts, &records)?;
    Ok(summary)
}

fn measure(opts: &Options, res: &Results, summary: &mut Summary) -> Result<()> {
    let m = &opts.matrix;
    let scratch = res.dir().join("scratch");
    std::fs::create_dir_all(&scratch).map_err(BenchError::io(&scratch))?;
    let qemu_version = if m.modes.iter().any(|m| m.is_qemu()) {
        qemu::version()
    } else {
        None
    };
    let machine = Machine::here(&commit(), qemu_version.clone());
    let ctx = consnap_run::Ctx {
        exe: opts.exe.clone(),
        scratch: scratch.clone(),
        mem: opts.mem.clone(),
        vcpus: opts.vcpus,
    };
    let elf = scratch.join("guest.elf");
    if qemu_version.is_some() {
        let st = std::process::Command::new(&opts.exe)
            .args(["guest", "export"])
            .arg(&elf)
            .status()
            .map_err(BenchError::io(&opts.exe))?;
        if !st.success() {
            return Err(BenchError::GuestExport { status: st });
        }
    }
    let qctx = qemu::Ctx {
        elf,
        scratch: scratch.clone(),
        mem: opts.mem.clone(),
        vcpus: opts.vcpus,
    };
    let loaded = res.load()?;
    // Checksums of the baselines by (work, repeat): a run stopped at its
    // cap has none of its own, and its restore must reach this one.
    let mut base_sums: BTreeMap<(String, u32), String> = loaded
        .iter()
        .filter(|r| r.error.is_none() && r.mode == Mode::None.name())
        .filter_map(|r| Some(((r.spec.clone(), r.rep), r.checksum.clone()?)))
        .collect();
    let done: BTreeSet<String> = loaded
        .into_iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.key)
        .collect();
    let mut calib = res.calibration()?;
    let mut rates: BTreeMap<String, f64> = BTreeMap::new();
    let groups = m.groups();
    let total: usize = groups
        .iter()
        .map(|g| (0..g.repeats).map(|rep| m.runs(g, rep).len()).sum::<usize>())
        .sum();
    let mut log = progress_log(res)?;
    let start = Instant::now();
    let mut n = 0;
    say(
        &mut log,
        &format!(
            "consnap bench ({}): {total} runs planned, about {:.0} min if no run lost time; results in {}{}",
            opts.label,
            m.estimate() / 60.0,
            res.dir().display(),
            if qemu_version.is_none() && m.modes.iter().any(|m| m.is_qemu()) {
                "; QEMU is absent: its cells are skipped"
            } else {
                ""
            }
        ),
    );
    for g in &groups {
        let ckey = format!("{}|{}s|{}|{}", g.workload.name, g.seconds, opts.mem, opts.vcpus);
        let ops = match calib.get(&ckey) {
            Some(&ops) => ops,
            None => {
                let rate = match rates
                    .get(&g.workload.name)
                    .copied()
                    .or_else(|| paced_rate(&g.workload.spec, opts.vcpus))
                {
                    Some(r) => r,
                    None => {
                        let guess = guess_ops(&g.workload.spec);
                        let r = consnap_run::calibrate(&ctx, &g.workload.spec, guess).map_err(|source| {
                            BenchError::Calibrate {
                                workload: g.workload.name.clone(),
                                source,
                            }
                        })?;
                        say(
                            &mut log,
                            &format!("{}: {r:.0} ops/s without snapshots", g.workload.name),
                        );
                        // Sized for the faster of consnap and QEMU, a run
                        // lasts its length in both: QEMU's snapshots come
                        // before its guest ends.
                        let runs_qemu = qemu_version.is_some() && m.runs(g, 0).iter().any(|(m, _)| m.is_qemu());
                        let r = if runs_qemu {
                            let deadline = Duration::from_secs(120);
                            // About 1.5 s of work at consnap's rate.
                            let ops = (r * 1.5).ceil() as u64;
                            match qemu::calibrate(&qctx, &g.workload.spec, ops, deadline) {
                                Ok(q) => {
                                    say(&mut log, &format!("{}: {q:.0} ops/s under QEMU", g.workload.name));
                                    r.max(q)
                                }
                                Err(e) => {
                                    say(
                                        &mut log,
                                        &format!(
                                            "{}: QEMU calibration failed ({e}): sized from consnap's rate",
                                            g.workload.name
                                        ),
                                    );
                                    r
                                }
                            }
                        } else {
                            r
                        };
                        rates.insert(g.workload.name.clone(), r);
                        r
                    }
                };
                let ops = ((rate * g.seconds).ceil() as u64).max(1);
                calib.insert(ckey, ops);
                res.save_calibration(&calib)?;
                ops
            }
        };
        let spec = g.workload.with_ops(ops);
        let deadline = Duration::from_secs_f64(g.seconds * 30.0 + 120.0);
        let limits = consnap_run::Limits {
            deadline,
            cap: (m.cap > 1.0).then(|| Duration::from_secs_f64(g.seconds * m.cap)),
        };
        for rep in 0..g.repeats {
            for (mode, iv) in m.runs(g, rep) {
                n += 1;
                if mode.is_qemu() && qemu_version.is_none() {
                    continue;
                }
                let mut rec = Record {
                    schema: SCHEMA.into(),
                    key: String::new(),
                    workload: g.workload.name.clone(),
                    spec: spec.clone(),
                    mode: mode.name().into(),
                    interval_ms: iv.map_or(0, |d| d.as_millis() as u64),
                    rep,
                    mem: opts.mem.clone(),
                    vcpus: opts.vcpus,
                    machine: machine.clone(),
                    ..Record::default()
                };
                rec.key = format!(
                    "{}|{}|{}|{}|{}|{}|{}",
                    rec.workload, rec.spec, rec.mode, rec.interval_ms, rep, rec.mem, rec.vcpus
                );
                if done.contains(&rec.key) {
                    summary.skipped_done += 1;
                    continue;
                }
                rec.machine.date = results::now_rfc3339();
                if mode.is_qemu() {
                    qemu::run(&qctx, &spec, mode, iv, deadline, &mut rec);
                } else {
                    let expect = base_sums.get(&(spec.clone(), rep)).map(String::as_str);
                    consnap_run::run(&ctx, &spec, mode, iv, limits, expect, &mut rec);
                }
                if let (Mode::None, None, Some(sum)) = (mode, &rec.error, &rec.checksum) {
                    base_sums.insert((spec.clone(), rep), sum.clone());
                }
                res.append(&rec)?;
                summary.ran += 1;
                if rec.error.is_some() {
                    summary.failed += 1;
                }
                say(
                    &mut log,
                    &format!(
                        "[{n}/{total} {:.0} min] {}",
                        start.elapsed().as_secs_f64() / 60.0,
                        line(&rec)
                    ),
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// One line about a finished run.
fn line(r: &Record) -> String {
    let iv = if r.interval_ms > 0 {
        format!(" @{}ms", r.interval_ms)
    } else {
        String::new()
    };
    if let Some(e) = &r.error {
        return format!("{} {}{iv} rep {}: FAILED: {e}", r.workload, r.mode, r.rep);
    }
    let mut s = format!("{} {}{iv} rep {}: {:.2} s", r.workload, r.mode, r.rep, r.wall_s);
    if let Some(at) = r.stopped_s {
        s += &format!(" (stopped at its cap, {at:.1} s: a lower bound)");
    }
    if let Some(p) = r.pause {
        s += &format!(
            ", {} snapshots, pause p50 {:.2} ms p99 {:.2} ms",
            r.snapshots,
            p.p50_us / 1e3,
            p.p99_us / 1e3
        );
    }
    if let (Some(t), Some(ok)) = (r.restore_s, r.restore_ok) {
        s += &format!(
            ", restore {t:.2} s {}",
            if ok { "checksum ok" } else { "WRONG CHECKSUM" }
        );
    }
    s
}

fn progress_log(res: &Results) -> Result<std::fs::File> {
    let path = res.dir().join("progress.log");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(BenchError::io(&path))
}

/// Print a progress line and keep it in progress.log (for a bench running
/// in the background: `tail -f RESULTS/progress.log`).
fn say(log: &mut std::fs::File, msg: &str) {
    eprintln!("{msg}");
    let _ = writeln!(log, "{} {msg}", results::now_rfc3339());
}

/// The op rate a paced workload (`rate=`) keeps by construction, over
/// `vcpus` vCPUs; `None` for one that runs flat out. A paced workload is
/// sized from it rather than from a calibration run: beside other busy
/// work, a short calibration run measured a fraction of it (its first
/// hundreds of milliseconds fault its working set in), and the matrix's runs
/// then ended before their first snapshot at 1 s.
fn paced_rate(spec: &str, vcpus: u32) -> Option<f64> {
    let s = workload::Spec::parse(&matrix::guest_words(spec)).ok()?;
    let per_vcpu = match s.kind {
        workload::Kind::Ftp => s.rate / s.chunk.max(1),
        _ => s.rate,
    };
    (per_vcpu > 0).then(|| per_vcpu as f64 * f64::from(vcpus.max(1)))
}

/// A first guess of ops for a calibration run of about a second.
fn guess_ops(spec: &str) -> u64 {
    let words = matrix::guest_words(spec);
    let Ok(s) = workload::Spec::parse(&words) else {
        return 1000;
    };
    let per_s = match (s.kind, s.rate) {
        (workload::Kind::Ftp, r) if r > 0 => r / s.chunk.max(1),
        (_, r) if r > 0 => r,
        (workload::Kind::Build, _) => 400,
        (workload::Kind::Ftp, _) => 15_000,
        (workload::Kind::Memstress, _) => 2_000_000,
        (workload::Kind::Dblog, _) => 20_000,
        (workload::Kind::Diskio, _) => 2_000,
        // Served over the network, not calibrated by ops.
        (workload::Kind::Kv, _) => 1,
    };
    per_s.max(1) * 3 / 2
}

/// The commit measured: `git rev-parse` in the current directory.
fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn paced_workloads_are_sized_by_their_rate() {
        assert_eq!(super::paced_rate("memstress,wss=256M,rate=25000", 1), Some(25_000.0));
        assert_eq!(super::paced_rate("memstress,wss=256M,rate=25000", 2), Some(50_000.0));
        assert_eq!(super::paced_rate("ftp,wss=256M,rate=100M", 1), Some(1600.0));
        assert_eq!(super::paced_rate("memstress,wss=256M", 1), None);
        assert_eq!(super::paced_rate("build", 1), None);
    }
}
