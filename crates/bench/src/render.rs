//! docs/BENCHMARKS.md and its plots, generated from the results alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use crate::error::{BenchError, Result};
use crate::matrix::Mode;
use crate::results::Record;
use crate::{Options, goal, plot};

/// The paper's figures (ConSnap, ICPADS 2014, abstract): performance loss
/// of stop-and-copy incremental snapshots and of ConSnap, intervals 1-60 s.
const PAPER: [(&str, &str, f64, f64); 2] = [("build", "Compilation", 71.1, 10.2), ("ftp", "Ftp", 14.5, 4.7)];

/// The newest record of each key.
fn latest(records: &[Record]) -> Vec<&Record> {
    let mut by_key: BTreeMap<&str, &Record> = BTreeMap::new();
    for r in records {
        by_key.insert(&r.key, r);
    }
    let mut out: Vec<&Record> = by_key.into_values().collect();
    out.sort_by_key(|r| (r.workload.clone(), r.interval_ms, r.mode.clone(), r.rep));
    out
}

/// The run without snapshots that `r` is compared with.
fn baseline<'a>(all: &[&'a Record], r: &Record) -> Option<&'a Record> {
    let base = Mode::parse(&r.mode)?.baseline().name();
    all.iter().copied().find(|b| {
        b.spec == r.spec
            && b.mode == base
            && b.rep == r.rep
            && b.mem == r.mem
            && b.vcpus == r.vcpus
            && b.error.is_none()
    })
}

/// Runs whose checksum (or whose restore's) is not the uninterrupted one.
pub fn wrong_checksums(records: &[Record]) -> Vec<&Record> {
    let all = latest(records);
    all.iter()
        .copied()
        .filter(|r| r.error.is_none())
        .filter(|r| {
            // A run stopped at its cap has no checksum of its own; its
            // restore is checked against the baseline's.
            let own = r.stopped_s.is_none()
                && baseline(&all, r).is_some_and(|b| b.checksum.is_some() && b.checksum != r.checksum);
            own || r.restore_ok == Some(false)
        })
        .collect()
}

/// One cell: a workload, an interval and a mode, over its repeats.
#[derive(Default)]
pub(crate) struct Cell<'a> {
    pub runs: Vec<&'a Record>,
    /// Extra wall time against the baseline of the same repeat, %.
    pub loss: Vec<f64>,
    /// Extra busy vCPU time against the baseline (paced workloads), %.
    pub cpu: Vec<f64>,
    pub base_wall: Vec<f64>,
    pub base_busy: Vec<f64>,
    /// Runs stopped at the cap, whose loss is a lower bound.
    pub stopped: usize,
}

impl Cell<'_> {
    /// The loss, median and range; `> ` when a run was stopped at the cap
    /// (its loss is a lower bound, so the median is one too).
    fn loss_text(&self) -> String {
        let bound = if self.stopped > 0 { "> " } else { "" };
        format!("{bound}{}", pct(&self.loss))
    }
}

/// The smallest noise [`noise`] assumes for a workload, %.
const NOISE_FLOOR: f64 = 5.0;

/// The noise of `workload`'s timings on this machine, %: the widest spread
/// (max − min over the median) of one cell's baseline runs, over the
/// workload's cells with two or more repeats, and at least [`NOISE_FLOOR`].
fn noise(cells: &Cells, workload: &str) -> f64 {
    cells
        .iter()
        .filter(|((w, _, _), c)| w == workload && c.base_wall.len() >= 2)
        .filter_map(|(_, c)| {
            let m = median(&c.base_wall).filter(|m| *m > 0.0)?;
            let lo = c.base_wall.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = c.base_wall.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Some((hi - lo) / m * 100.0)
        })
        .fold(NOISE_FLOOR, f64::max)
}

/// cow's median loss over stop-copy's, as a bound where one of them was
/// stopped at the cap; no ratio where stop-copy's loss is within `noise`
/// (a ratio to a loss the machine's noise can make or unmake means nothing).
/// `paced`: the losses compared are the busy-CPU ones (wall time hides a
/// paced workload's loss).
fn ratio(sc: Option<&Cell>, cow: Option<&Cell>, noise: f64, paced: bool) -> String {
    let (Some(a), Some(b)) = (sc, cow) else {
        return "—".into();
    };
    let loss = |c: &Cell| median(if paced && !c.cpu.is_empty() { &c.cpu } else { &c.loss });
    match (loss(a), loss(b)) {
        (Some(x), _) if a.stopped == 0 && x < noise => "within noise".into(),
        (Some(x), Some(y)) => match (a.stopped > 0, b.stopped > 0) {
            (false, false) => format!("{:.2}", y / x),
            (true, false) => format!("< {:.2}", y / x),
            (false, true) => format!("> {:.2}", y / x),
            (true, true) => "—".into(),
        },
        _ => "—".into(),
    }
}

pub(crate) fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn pct(xs: &[f64]) -> String {
    let Some(m) = median(xs) else {
        return "—".into();
    };
    if xs.len() == 1 {
        return format!("{m:+.1}%");
    }
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:+.1}% ({lo:+.0}…{hi:+.0}, n={})", xs.len())
}

fn size(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

pub(crate) fn interval(ms: u64) -> String {
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

pub(crate) type Cells<'a> = BTreeMap<(String, u64, Mode), Cell<'a>>;

fn cells<'a>(all: &[&'a Record]) -> Cells<'a> {
    let mut out: Cells<'a> = BTreeMap::new();
    for &r in all.iter().filter(|r| r.error.is_none()) {
        let Some(mode) = Mode::parse(&r.mode) else { continue };
        let c = out.entry((r.workload.clone(), r.interval_ms, mode)).or_default();
        c.runs.push(r);
        c.stopped += usize::from(r.stopped_s.is_some());
        if let Some(b) = baseline(all, r).filter(|_| mode.snapshots()) {
            // The guest's own run where both have it, else the command's.
            let (t, tb) = match (r.run_s, b.run_s) {
                (Some(t), Some(tb)) if tb > 0.0 => (t, tb),
                _ => (r.wall_s, b.wall_s),
            };
            c.loss.push((t / tb - 1.0) * 100.0);
            c.base_wall.push(tb);
            if let (Some(x), Some(y)) = (r.busy_s, b.busy_s) {
                c.cpu.push((x / y - 1.0) * 100.0);
                c.base_busy.push(y);
            }
        }
    }
    out
}

/// Write the report and its plots.
pub fn write(opts: &Options, records: &[Record]) -> Result<()> {
    let all = latest(records);
    let cells = cells(&all);
    // BENCHMARKS.md's plots in plots/, another report's in plots/<its
    // name>/: two reports beside each other share workload names.
    let sub = match opts.doc.file_stem().and_then(|s| s.to_str()) {
        Some("BENCHMARKS") | None => String::new(),
        Some(stem) => format!("{}/", stem.to_lowercase()),
    };
    let plots_dir = opts.doc.parent().unwrap_or(Path::new(".")).join("plots").join(&sub);
    std::fs::create_dir_all(&plots_dir).map_err(BenchError::io(&plots_dir))?;
    let workloads: Vec<String> = {
        let mut seen = Vec::new();
        for w in opts
            .matrix
            .workloads
            .iter()
            .map(|w| w.name.clone())
            .chain(all.iter().map(|r| r.workload.clone()))
        {
            if !seen.contains(&w) {
                seen.push(w);
            }
        }
        seen
    };
    let mut d = String::new();
    let _ = writeln!(d, "# consnap benchmarks\n");
    let _ = writeln!(
        d,
        "Generated by `consnap bench` from {} runs in `{}`; do not edit by hand (rerun `consnap bench --render-only` instead).\n",
        all.len(),
        opts.results.display()
    );
    machines(&mut d, &all);
    // The disk workloads, the disk throughput and the network have pages
    // of their own.
    if opts.doc.with_file_name("BENCHMARKS-DISK.md").exists() && !opts.doc.ends_with("BENCHMARKS-DISK.md") {
        let _ = writeln!(
            d,
            "The loss with a disk in every epoch (ftp storing its chunks on a disk, a database log) is in [BENCHMARKS-DISK.md](BENCHMARKS-DISK.md) (`consnap bench --workloads ftp-100M,ftp-100M-disk,dblog --modes cow,stop-copy,stop-copy-full --intervals 20ms,100ms,1s,10s --repeats 2 --results bench-results/disk --doc docs/BENCHMARKS-DISK.md`).\n"
        );
    }
    if opts.doc.with_file_name("DISK-IO.md").exists() {
        let _ = writeln!(
            d,
            "The guest's disk throughput on consnap's virtio-blk against QEMU's is in [DISK-IO.md](DISK-IO.md) (`consnap bench --disk-io --doc docs/DISK-IO.md`).\n"
        );
    }
    if opts.doc.with_file_name("NET.md").exists() {
        let _ = writeln!(
            d,
            "The network (the kv guest's round trip and request rate against QEMU's, and the round trip under output commit) is in [NET.md](NET.md) (`consnap bench --net --doc docs/NET.md`).\n"
        );
    }
    method(&mut d, opts, &all);
    headline(&mut d, &cells);
    let judged: Vec<(String, bool)> = workloads
        .iter()
        .map(|w| (w.clone(), paced(&spec_of(&all, w))))
        .collect();
    goal::section(&mut d, &cells, &judged, &|w, paced| {
        if paced {
            goal::cpu_noise(&cells, w, NOISE_FLOOR)
        } else {
            noise(&cells, w)
        }
    });
    let _ = writeln!(d, "## Loss per workload\n");
    for w in &workloads {
        loss_table(&mut d, w, &cells, &all, &plots_dir)?;
    }
    let _ = writeln!(d, "## Pauses, snapshots, restore\n");
    for w in &workloads {
        pause_table(&mut d, w, &cells, &plots_dir)?;
    }
    let bad = wrong_checksums(records);
    let failed: Vec<&&Record> = all.iter().filter(|r| r.error.is_some()).collect();
    let _ = writeln!(d, "## Failures\n");
    if bad.is_empty() && failed.is_empty() {
        let _ = writeln!(
            d,
            "None: every run finished, and every restore of a newest snapshot ran to the checksum of the run without snapshots.\n"
        );
    }
    for r in bad {
        let _ = writeln!(
            d,
            "- wrong checksum: {} {} at {} (repeat {})",
            r.workload,
            r.mode,
            interval(r.interval_ms),
            r.rep
        );
    }
    for r in failed {
        let _ = writeln!(
            d,
            "- failed: {} {} at {} (repeat {}): {}",
            r.workload,
            r.mode,
            interval(r.interval_ms),
            r.rep,
            r.error.as_deref().unwrap_or("")
        );
    }
    std::fs::write(&opts.doc, d).map_err(BenchError::io(&opts.doc))
}

fn machines(d: &mut String, all: &[&Record]) {
    let set: BTreeSet<String> = all
        .iter()
        .map(|r| {
            let m = &r.machine;
            format!(
                "{} ({} CPUs, {} GiB), Linux {}, host `{}`, consnap commit `{}`{}",
                m.cpu,
                m.cpus,
                m.mem_gib,
                m.kernel,
                m.host,
                m.commit,
                m.qemu.as_deref().map(|q| format!(", {q}")).unwrap_or_default()
            )
        })
        .collect();
    let dates: Vec<&str> = all.iter().map(|r| r.machine.date.as_str()).collect();
    let _ = writeln!(d, "## Machine and date\n");
    for m in set {
        let _ = writeln!(d, "- {m}");
    }
    if let (Some(a), Some(b)) = (dates.iter().min(), dates.iter().max()) {
        let _ = writeln!(d, "- runs made from {a} to {b}");
    }
    let _ = writeln!(d);
}

/// Which consnap workloads' losses are taken on the command's wall time
/// (runs recorded before `run_s` was), as a sentence.
fn timed_by_wall(all: &[&Record]) -> String {
    let old: BTreeSet<&str> = all
        .iter()
        .filter(|r| !r.mode.starts_with("qemu") && r.run_s.is_none() && r.error.is_none())
        .map(|r| r.workload.as_str())
        .collect();
    if old.is_empty() {
        return "Every consnap run here has its guest's own run time.\n".into();
    }
    format!(
        "Runs recorded before the guest's own run time was ({}) are compared on the whole command's wall time, set-up, \
         arming and the last save included; a paced workload's CPU figure is still the vCPUs' own.\n",
        old.into_iter().collect::<Vec<_>>().join(", ")
    )
}

fn method(d: &mut String, opts: &Options, all: &[&Record]) {
    let stopped = all.iter().filter(|r| r.stopped_s.is_some()).count();
    let m = &opts.matrix;
    let _ = writeln!(
        d,
        "## How it was measured\n\n\
         Matrix: {}. Guest: {} of RAM, {} vCPU(s), the embedded workload guest (for QEMU the same ELF, `consnap guest export`, \
         booted with `-kernel` and qboot). **Loss** is the extra time a fixed amount of guest work takes, (T − T_none) / T_none, \
         against a run without snapshots of the same repeat, made just before (consnap modes against consnap `none`, QEMU modes \
         against QEMU without snapshots). For consnap T is the guest's own run, its vCPUs' time from their start to their end \
         (`vcpu_run_s` in the run report): the VM's set-up and the engine's arming before it (reported apart, by `consnap \
         bench-ram`) and the save of the last epoch after the guest's end are not in it, snapshot pauses and everything the \
         snapshots cost the running guest are. For QEMU T is the QEMU process's wall time, its start and exit included, in its \
         runs with snapshots and without alike. Figures are medians over the repeats, with the range and n. A paced workload (`rate=`) \
         catches up after each snapshot, so its wall time hides the loss; for those the *CPU* figure is the growth of the vCPU time \
         from the vCPUs' start to their end not spent idling at the guest's request (`vcpu_run_s` − `vcpu_idle_s` in the run \
         report: snapshot pauses and faults included, the VM's set-up, the engine's arming and the last epoch's save after the \
         guest's end not), against the baseline. **cow / stop-copy** is \
         the ratio of the median losses (for a paced workload, of the CPU figures), given only where stop-copy's loss is above the workload's *noise* (the widest spread \
         of one cell's baseline runs, at least {NOISE_FLOOR}%, shown with each workload); elsewhere the cell says *within noise*. Each run at interval I \
         lasts at least {} s and 3.3 × I + 1 s, so that it holds at least three snapshots. After every run with snapshots the newest \
         snapshot is restored (`consnap restore --at latest`, or QEMU `-incoming`) and run to the end, and its checksum must be \
         the uninterrupted one.\n",
        opts.label, opts.mem, opts.vcpus, m.base_seconds
    );
    let _ = writeln!(d, "{}", timed_by_wall(all));
    let _ = writeln!(
        d,
        "Budget: at intervals of {} s and more only {} run, modes {}, {} time(s); QEMU runs once per cell, for {}, at \
         intervals from {} s to {} s (its snapshots copy all of RAM every time). Everything else runs {} times.\n",
        m.long_from.as_secs(),
        m.long_workloads.join(", "),
        m.long_modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        m.long_repeats,
        m.qemu_workloads.join(", "),
        m.qemu_min_interval.as_secs_f64(),
        m.qemu_max_interval.as_secs_f64(),
        m.repeats
    );
    if m.cap > 1.0 {
        let _ = writeln!(
            d,
            "Cap: a consnap run with snapshots still going at {} × its run's length without snapshots (a loss over {:.0}%) \
             is stopped there (SIGTERM: a clean end, its report written). Its work was not done by then, so its loss is at \
             least the time it ran against the baseline's: such cells show `> ` and their median is a lower bound (a ratio \
             with one, an upper or lower bound). The newest snapshot of a stopped run is restored and run to the end like any \
             other, and must reach the baseline's checksum. Run to the end, full copies of 1 GiB every 20 ms would take 30 × \
             their work, and those cells alone most of the budget. Runs stopped at the cap in these results: {stopped}.\n",
            m.cap,
            (m.cap - 1.0) * 100.0
        );
    }
}

fn headline(d: &mut String, cells: &Cells) {
    // A matrix without the paper's workloads (the disk report) has nothing to set beside it.
    if !PAPER.iter().any(|(w, ..)| cells.keys().any(|k| k.0 == *w)) {
        return;
    }
    let _ = writeln!(d, "## Headline: loss of stop-copy and cow, beside the paper\n");
    let _ = writeln!(
        d,
        "| workload | interval | stop-copy | cow | cow / stop-copy | paper: stop-copy → ConSnap (1-60 s) |\n|---|---|---|---|---|---|"
    );
    for (w, paper_name, sc, cs) in PAPER {
        for ms in [1000, 60_000] {
            let get = |m: Mode| cells.get(&(w.to_string(), ms, m));
            let (Some(a), Some(b)) = (get(Mode::StopCopy), get(Mode::Cow)) else {
                continue;
            };
            let _ = writeln!(
                d,
                "| {w} | {} | {} | {} | {} | {paper_name}: {sc}% → {cs}% |",
                interval(ms),
                a.loss_text(),
                b.loss_text(),
                ratio(Some(a), Some(b), noise(cells, w), false)
            );
        }
    }
    let _ = writeln!(
        d,
        "\nThe paper's abstract says ConSnap \"reduces the performance loss by 71.1% ~ 10.2% under Compilation workload, and \
         14.5% ~ 4.7% for the Ftp workload, when the interval varies from 1s to 60s\"; the table reads it as the issue does \
         (stop-and-copy's loss against ConSnap's). It can also be read as the reduction itself spanning those values from 1 s to \
         60 s.\n"
    );
}

/// The workload spec `w`'s runs ran.
fn spec_of(all: &[&Record], w: &str) -> String {
    all.iter()
        .find(|r| r.workload == w)
        .map(|r| r.spec.clone())
        .unwrap_or_default()
}

/// Whether `spec` is a paced workload (a rate): its wall time hides its loss.
fn paced(spec: &str) -> bool {
    spec.split(',')
        .any(|x| x.starts_with("rate=") && x != "rate=max" && x != "rate=0")
}

/// The part of a plot's link after `plots/`: its report's own folder.
fn plot_sub(plots: &Path) -> String {
    match plots.file_name().and_then(|n| n.to_str()) {
        Some(n) if n != "plots" => format!("{n}/"),
        _ => String::new(),
    }
}

fn loss_table(d: &mut String, w: &str, cells: &Cells, all: &[&Record], plots: &Path) -> Result<()> {
    let ivs: BTreeSet<u64> = cells.keys().filter(|k| k.0 == w && k.1 > 0).map(|k| k.1).collect();
    if ivs.is_empty() {
        return Ok(());
    }
    let spec = spec_of(all, w);
    let paced = paced(&spec);
    let noise = noise(cells, w);
    let _ = writeln!(d, "### {w}\n");
    let _ = writeln!(
        d,
        "Work: `{}` (the work grows with the interval so that each run holds three snapshots; `ops` shown for the shortest). \
         Noise: {:.0}%.{}\n",
        spec,
        noise,
        if paced {
            " Paced: the CPU column is the loss that matters."
        } else {
            ""
        }
    );
    if let Some((_, name, sc, cs)) = PAPER.iter().find(|p| p.0 == w) {
        let _ = writeln!(d, "Paper ({name}, intervals 1-60 s): stop-copy {sc}%, ConSnap {cs}%.\n");
    }
    let modes = [
        Mode::StopCopyFull,
        Mode::StopCopy,
        Mode::Cow,
        Mode::QemuBackground,
        Mode::QemuStopCopy,
    ];
    let mut head = "| interval | none (s) |".to_string();
    for m in modes {
        head += &format!(" {} |", m.name());
    }
    head += " cow / stop-copy |";
    let _ = writeln!(d, "{head}\n|{}", "---|".repeat(modes.len() + 3));
    for &ms in &ivs {
        let get = |m: Mode| cells.get(&(w.to_string(), ms, m));
        let base = modes.iter().find_map(|&m| get(m).and_then(|c| median(&c.base_wall)));
        let mut row = format!(
            "| {} | {} |",
            interval(ms),
            base.map_or("—".into(), |b| format!("{b:.2}"))
        );
        for m in modes {
            row += &match get(m) {
                Some(c) if paced && !c.cpu.is_empty() => format!(" {} · CPU {} |", c.loss_text(), pct(&c.cpu)),
                Some(c) => format!(" {} |", c.loss_text()),
                None => " — |".into(),
            };
        }
        let ratio = ratio(get(Mode::StopCopy), get(Mode::Cow), noise, paced);
        let _ = writeln!(d, "{row} {ratio} |");
    }
    // A paced workload's wall time hides its loss: plot the busy vCPU
    // time's growth, the figure its table's ratio uses.
    let y_desc = if paced {
        "busy vCPU growth (%, symlog)"
    } else {
        "loss (%, symlog)"
    };
    let series: Vec<plot::Series> = modes
        .iter()
        .map(|&m| {
            let pts = ivs
                .iter()
                .filter_map(|&ms| {
                    let c = cells.get(&(w.to_string(), ms, m))?;
                    let v = if paced && !c.cpu.is_empty() { &c.cpu } else { &c.loss };
                    Some((ms as f64 / 1e3, median(v)?))
                })
                .collect::<Vec<_>>();
            (m.name().to_string(), pts)
        })
        .filter(|s| !s.1.is_empty())
        .collect();
    let file = format!("loss-{w}.svg");
    plot::by_interval(
        &plots.join(&file),
        &format!("{w}: loss against interval"),
        y_desc,
        &series,
        plot::YAxis::SymLogPercent,
    )
    .map_err(|source| BenchError::Plot {
        file: file.clone(),
        source,
    })?;
    let _ = writeln!(d, "\n![loss of {w}](plots/{}{file})\n", plot_sub(plots));
    Ok(())
}

fn pause_table(d: &mut String, w: &str, cells: &Cells, plots: &Path) -> Result<()> {
    let keys: Vec<&(String, u64, Mode)> = cells.keys().filter(|k| k.0 == w && k.2.snapshots()).collect();
    if keys.is_empty() {
        return Ok(());
    }
    let _ = writeln!(d, "### {w}\n");
    let _ = writeln!(
        d,
        "| interval | mode | pause p50 / p99 / max (ms) | durable p50 (ms) | snapshots (late) | bytes / snapshot | faults / snapshot | saver MB/s | store at end | restore newest (s) | restored checksum |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for k in &keys {
        let c = &cells[*k];
        let m = |f: &dyn Fn(&Record) -> Option<f64>| median(&c.runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>());
        let num = |x: Option<f64>, digits: usize| x.map_or("—".into(), |v| format!("{v:.digits$}"));
        let pmax = c
            .runs
            .iter()
            .filter_map(|r| r.pause.map(|p| p.max_us))
            .fold(f64::NAN, f64::max);
        let ok = c.runs.iter().filter(|r| r.restore_ok == Some(true)).count();
        let checked = c.runs.iter().filter(|r| r.restore_ok.is_some()).count();
        let _ = writeln!(
            d,
            "| {} | {} | {} / {} / {:.2} | {} | {} ({}) | {} | {} | {} | {} | {} | {ok}/{checked} ok |",
            interval(k.1),
            k.2.name(),
            num(m(&|r| r.pause.map(|p| p.p50_us / 1e3)), 2),
            num(m(&|r| r.pause.map(|p| p.p99_us / 1e3)), 2),
            pmax / 1e3,
            num(m(&|r| r.durable_p50_ms), 1),
            num(m(&|r| Some(r.snapshots as f64)), 0),
            num(m(&|r| Some(r.delayed as f64)), 0),
            m(&|r| r.bytes_p50).map_or("—".into(), size),
            num(m(&|r| r.faults_p50), 0),
            num(m(&|r| r.save_mb_s), 0),
            m(&|r| r.store_bytes.map(|b| b as f64)).map_or("—".into(), size),
            num(m(&|r| r.restore_s), 3),
        );
    }
    let modes: BTreeSet<Mode> = keys.iter().map(|k| k.2).collect();
    let series: Vec<plot::Series> = modes
        .iter()
        .map(|&mode| {
            let pts = keys
                .iter()
                .filter(|k| k.2 == mode)
                .filter_map(|k| {
                    let p99s: Vec<f64> = cells[*k]
                        .runs
                        .iter()
                        .filter_map(|r| r.pause.map(|p| p.p99_us / 1e3))
                        .collect();
                    Some((k.1 as f64 / 1e3, median(&p99s)?))
                })
                .collect();
            (mode.name().to_string(), pts)
        })
        .collect();
    let file = format!("pause-{w}.svg");
    plot::by_interval(
        &plots.join(&file),
        &format!("{w}: snapshot pause p99"),
        "pause p99 (ms)",
        &series,
        plot::YAxis::Log,
    )
    .map_err(|source| BenchError::Plot {
        file: file.clone(),
        source,
    })?;
    let _ = writeln!(d, "\n![pause p99 of {w}](plots/{}{file})\n", plot_sub(plots));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::results::{Pause, SCHEMA};

    fn rec(mode: &str, iv: u64, rep: u32, wall: f64) -> Record {
        Record {
            schema: SCHEMA.into(),
            key: format!("build|{mode}|{iv}|{rep}"),
            workload: "build".into(),
            spec: "build,wss=128M,ops=100".into(),
            mode: mode.into(),
            interval_ms: iv,
            rep,
            mem: "1G".into(),
            vcpus: 1,
            wall_s: wall,
            checksum: Some("0x1".into()),
            pause: (iv > 0).then_some(Pause {
                p50_us: 300.0,
                p99_us: 900.0,
                max_us: 1000.0,
            }),
            restore_ok: (iv > 0).then_some(true),
            ..Record::default()
        }
    }

    #[test]
    fn losses_are_taken_against_the_baseline_of_the_same_repeat() {
        let recs = vec![
            rec("none", 0, 0, 10.0),
            rec("stop-copy", 1000, 0, 15.0),
            rec("cow", 1000, 0, 11.0),
            rec("none", 0, 1, 20.0),
            rec("stop-copy", 1000, 1, 30.0),
            rec("cow", 1000, 1, 22.0),
        ];
        let all = latest(&recs);
        let c = cells(&all);
        let sc = &c[&("build".to_string(), 1000, Mode::StopCopy)];
        let cow = &c[&("build".to_string(), 1000, Mode::Cow)];
        assert_eq!(median(&sc.loss).map(|x| x.round()), Some(50.0));
        assert_eq!(median(&cow.loss).map(|x| x.round()), Some(10.0));
        assert!(wrong_checksums(&recs).is_empty());
        // A restore that did not reach the checksum, and a run whose own
        // checksum differs from its baseline's, are both reported.
        let mut bad = recs.clone();
        bad[2].restore_ok = Some(false);
        bad[4].checksum = Some("0x2".into());
        assert_eq!(wrong_checksums(&bad).len(), 2);
        // The guest's own run, where a run and its baseline both have it:
        // the command's time around it (arming, the last save) is no loss.
        let run = |r: Record, t: f64| Record { run_s: Some(t), ..r };
        let timed = [run(rec("none", 0, 0, 10.5), 10.0), run(rec("cow", 1000, 0, 12.0), 11.0)];
        let all = latest(&timed);
        let c = cells(&all);
        let cow = &c[&("build".to_string(), 1000, Mode::Cow)];
        assert_eq!(median(&cow.loss).map(|x| x.round()), Some(10.0));
        let mixed = [rec("none", 0, 0, 10.5), run(rec("cow", 1000, 0, 12.6), 11.0)];
        let all = latest(&mixed);
        let c = cells(&all);
        let cow = &c[&("build".to_string(), 1000, Mode::Cow)];
        assert_eq!(median(&cow.loss).map(|x| x.round()), Some(20.0));
        // A rerun of a key replaces the older record.
        let mut again = recs.clone();
        again.push(rec("cow", 1000, 0, 12.0));
        let all = latest(&again);
        assert_eq!(all.len(), 6);
    }

    #[test]
    fn no_ratio_is_taken_to_a_loss_within_the_noise() {
        // Baselines 10 and 12 s: the workload's noise is 18 %.
        let recs = vec![
            rec("none", 0, 0, 10.0),
            rec("stop-copy", 1000, 0, 11.0),
            rec("cow", 1000, 0, 10.2),
            rec("stop-copy", 60_000, 0, 15.0),
            rec("cow", 60_000, 0, 10.5),
            rec("none", 0, 1, 12.0),
            rec("stop-copy", 1000, 1, 13.2),
            rec("cow", 1000, 1, 12.24),
            rec("stop-copy", 60_000, 1, 18.0),
            rec("cow", 60_000, 1, 12.6),
            rec("stop-copy", 5000, 0, 9.5),
            rec("cow", 5000, 0, 10.0),
        ];
        let all = latest(&recs);
        let c = cells(&all);
        assert_eq!(noise(&c, "build").round(), 18.0);
        assert_eq!(noise(&c, "ftp"), NOISE_FLOOR);
        let get = |ms: u64, m: Mode| c.get(&("build".to_string(), ms, m));
        let n = noise(&c, "build");
        // stop-copy +10 %: within the noise, so no ratio.
        assert_eq!(
            ratio(get(1000, Mode::StopCopy), get(1000, Mode::Cow), n, false),
            "within noise"
        );
        // stop-copy +50 %, cow +5 %.
        assert_eq!(
            ratio(get(60_000, Mode::StopCopy), get(60_000, Mode::Cow), n, false),
            "0.10"
        );
        // A stop-copy faster than its baseline never gives a ratio.
        assert_eq!(
            ratio(get(5000, Mode::StopCopy), get(5000, Mode::Cow), NOISE_FLOOR, false),
            "within noise"
        );
        // Paced: the busy-CPU losses are compared, not the wall times.
        let busy = |r: Record, b: f64| Record { busy_s: Some(b), ..r };
        let paced = [
            busy(rec("none", 0, 0, 10.0), 4.0),
            busy(rec("stop-copy", 1000, 0, 10.1), 6.0),
            busy(rec("cow", 1000, 0, 10.0), 4.4),
        ];
        let all = latest(&paced);
        let c = cells(&all);
        let get = |m: Mode| c.get(&("build".to_string(), 1000, m));
        assert_eq!(ratio(get(Mode::StopCopy), get(Mode::Cow), NOISE_FLOOR, true), "0.20");
        assert_eq!(
            ratio(get(Mode::StopCopy), get(Mode::Cow), NOISE_FLOOR, false),
            "within noise"
        );
    }

    #[test]
    fn the_report_is_written_with_its_plots() {
        let dir = std::env::temp_dir().join(format!("bench-render-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let opts = Options {
            matrix: crate::Matrix::quick(),
            exe: "consnap".into(),
            results: dir.clone(),
            doc: dir.join("BENCHMARKS.md"),
            mem: "1G".into(),
            vcpus: 1,
            render_only: true,
            label: "test".into(),
        };
        let recs = vec![
            rec("none", 0, 0, 10.0),
            rec("stop-copy", 100, 0, 15.0),
            rec("cow", 100, 0, 11.0),
            rec("stop-copy", 1000, 0, 12.0),
            rec("cow", 1000, 0, 10.5),
            // Stopped at its cap (3 × 10 s) with the work not done.
            Record {
                stopped_s: Some(30.0),
                checksum: None,
                ..rec("stop-copy-full", 100, 0, 30.0)
            },
        ];
        assert!(wrong_checksums(&recs).is_empty());
        write(&opts, &recs).unwrap();
        let doc = std::fs::read_to_string(dir.join("BENCHMARKS.md")).unwrap();
        assert!(
            doc.contains("| build | 1 s | +20.0% | +5.0% | 0.25 | Compilation: 71.1% → 10.2% |"),
            "{doc}"
        );
        assert!(
            doc.contains("| 100 ms | 10.00 | > +200.0% | +50.0% | +10.0% |"),
            "{doc}"
        );
        // cow against the better baseline: stop-copy at 100 ms (full copies
        // stopped at the cap lost more), 0.3 × 50 % allowed.
        assert!(doc.contains("**2 of 2 cells meet the goal.**"), "{doc}");
        assert!(
            doc.contains("| build | 100 ms | stop-copy | +50.0% | +10.0% | 0.20 | ≤ 0.3 |"),
            "{doc}"
        );
        assert!(doc.contains("plots/loss-build.svg"));
        let svg = std::fs::read_to_string(dir.join("plots/loss-build.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("stop-copy"), "{svg}");
        assert!(dir.join("plots/pause-build.svg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
