//! What `consnap bench` measures: workloads, modes and intervals, and the
//! plan that fits them into the time budget.

use std::time::Duration;

use crate::error::{BenchError, Result};

/// How a run takes its snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// consnap without snapshots: the baseline of every loss.
    None,
    /// consnap, every epoch a full copy in the pause.
    StopCopyFull,
    /// consnap, dirty pages copied in the pause (the paper's baseline).
    StopCopy,
    /// consnap copy-on-write (the paper's idea).
    Cow,
    /// QEMU without snapshots: the baseline of QEMU's losses.
    QemuNone,
    /// QEMU `migrate` to a file with the background-snapshot capability.
    QemuBackground,
    /// QEMU `stop`, `migrate` to a file, `cont`.
    QemuStopCopy,
}

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::None,
        Mode::StopCopyFull,
        Mode::StopCopy,
        Mode::Cow,
        Mode::QemuNone,
        Mode::QemuBackground,
        Mode::QemuStopCopy,
    ];

    /// The name used on the command line, in records and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::StopCopyFull => "stop-copy-full",
            Mode::StopCopy => "stop-copy",
            Mode::Cow => "cow",
            Mode::QemuNone => "qemu-none",
            Mode::QemuBackground => "qemu-background",
            Mode::QemuStopCopy => "qemu-stop-copy",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }

    pub fn is_qemu(self) -> bool {
        matches!(self, Mode::QemuNone | Mode::QemuBackground | Mode::QemuStopCopy)
    }

    /// The baseline a run of this mode is compared with.
    pub fn baseline(self) -> Mode {
        if self.is_qemu() { Mode::QemuNone } else { Mode::None }
    }

    /// Whether the mode takes snapshots (and so runs once per interval).
    pub fn snapshots(self) -> bool {
        !matches!(self, Mode::None | Mode::QemuNone)
    }
}

/// Whether the workload spec `spec` is paced (a `rate=` other than 0 or
/// max): it idles ahead of its rate, so its wall time hides its loss.
pub fn spec_is_paced(spec: &str) -> bool {
    spec.split(',')
        .any(|w| w.strip_prefix("rate=").is_some_and(|r| r != "0" && r != "max"))
}

/// A workload of the matrix: a name and a `consnap run --workload` spec
/// without `ops` (the bench sizes the work).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub spec: String,
}

impl Workload {
    /// The matrix's workloads: the paper's two (`build`; `ftp` at 100
    /// Mbit/s, 1 Gbit/s and all-out) and memstress at three dirty rates.
    pub fn presets() -> Vec<Workload> {
        [
            ("build", "build,wss=128M"),
            ("ftp-100M", "ftp,wss=256M,rate=12500000"),
            ("ftp-1G", "ftp,wss=256M,rate=125000000"),
            ("ftp", "ftp,wss=256M"),
            ("memstress-low", "memstress,wss=256M,rate=2500"),
            ("memstress-moderate", "memstress,wss=256M,rate=25000"),
            ("memstress", "memstress,wss=256M"),
            ("ftp-100M-disk", "ftp,wss=256M,rate=12500000,disk=on,dsize=256M"),
            ("build-disk", "build,wss=128M,disk=on"),
            ("dblog", "dblog,wss=4M,dsize=64M,rate=5000"),
        ]
        .into_iter()
        .map(|(name, spec)| Workload {
            name: name.to_string(),
            spec: spec.to_string(),
        })
        .collect()
    }

    /// A preset by name, or `NAME=SPEC` for another workload.
    pub fn parse(s: &str) -> Result<Workload> {
        if let Some((name, spec)) = s.split_once('=') {
            if name.is_empty() || spec.contains("ops=") || !spec.contains(',') && spec.contains('=') {
                return Err(BenchError::BadFlag {
                    flag: "--workloads",
                    why: format!("{s:?}: expected NAME=SPEC with a spec such as memstress,wss=64M and no ops"),
                });
            }
            return Ok(Workload {
                name: name.to_string(),
                spec: spec.to_string(),
            });
        }
        Workload::presets()
            .into_iter()
            .find(|w| w.name == s)
            .ok_or_else(|| BenchError::BadFlag {
                flag: "--workloads",
                why: format!(
                    "no workload {s:?}: one of {}, or NAME=SPEC",
                    Workload::presets()
                        .iter()
                        .map(|w| w.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// Whether the spec paces the guest (`rate=`): such a guest catches up
    /// after a snapshot, so its extra wall time understates the loss.
    /// Whether it uses a disk (`disk=on`, dblog, diskio): each run gets a
    /// fresh image (QEMU on its microvm machine, whose snapshots hold no
    /// disk and are therefore not restored).
    pub fn disk(&self) -> bool {
        workload::Spec::parse(&guest_words(&self.spec)).is_ok_and(|s| s.uses_disk())
    }

    pub fn paced(&self) -> bool {
        spec_is_paced(&self.spec)
    }

    /// The spec with `ops` set.
    pub fn with_ops(&self, ops: u64) -> String {
        format!("{},ops={ops}", self.spec)
    }
}

pub use crate::words::guest_words;

/// The length of a run at `interval`: at least `base`, and long enough for
/// three snapshots (the first is due one interval after the start), with a
/// second to spare for boot and a late snapshot.
pub fn run_seconds(interval: Duration, base: f64) -> f64 {
    base.max(3.3 * interval.as_secs_f64() + 1.0)
}

/// Which cells the bench runs and how often.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub workloads: Vec<Workload>,
    pub modes: Vec<Mode>,
    pub intervals: Vec<Duration>,
    pub repeats: u32,
    /// Intervals at or above this run only `long_workloads` in
    /// `long_modes`, `long_repeats` times: at 60 s a run lasts over three
    /// minutes.
    pub long_from: Duration,
    pub long_workloads: Vec<String>,
    pub long_modes: Vec<Mode>,
    pub long_repeats: u32,
    /// Length of a run at short intervals, seconds.
    pub base_seconds: f64,
    /// QEMU snapshots are full copies of RAM: below this interval they
    /// cannot keep up, and the cell says so instead of running.
    pub qemu_min_interval: Duration,
    /// QEMU runs only up to this interval, for these workloads, in the
    /// first repeat (the budget).
    pub qemu_max_interval: Duration,
    pub qemu_workloads: Vec<String>,
    /// A consnap snapshot run still going after this multiple of its
    /// group's length is stopped there; its loss is then a lower bound
    /// (0: never). Some cells lose 30× (full copies of 1 GiB every
    /// 20 ms): run out, they alone would take most of the budget.
    pub cap: f64,
}

impl Matrix {
    /// The full matrix of the issue, fitted to about 90 minutes here. The
    /// disk workloads' presets are left out of its budget: name them with
    /// `--workloads` (README, Usage).
    pub fn full() -> Matrix {
        let ms = Duration::from_millis;
        Matrix {
            workloads: Workload::presets().into_iter().filter(|w| !w.disk()).collect(),
            modes: Mode::ALL.to_vec(),
            intervals: [20, 100, 1000, 5000, 10_000, 30_000, 60_000]
                .into_iter()
                .map(ms)
                .collect(),
            repeats: 3,
            long_from: ms(10_000),
            long_workloads: vec!["build".into(), "ftp".into()],
            long_modes: vec![
                Mode::None,
                Mode::StopCopy,
                Mode::Cow,
                Mode::QemuNone,
                Mode::QemuBackground,
                Mode::QemuStopCopy,
            ],
            long_repeats: 1,
            // Three snapshots at 1 s and a second to spare: one group for
            // 20 ms to 1 s.
            base_seconds: 4.3,
            qemu_min_interval: ms(1000),
            qemu_max_interval: ms(10_000),
            qemu_workloads: vec!["build".into(), "ftp".into(), "memstress-moderate".into()],
            cap: 3.0,
        }
    }

    /// `--quick`: a first look in a few minutes (and CI's smoke test).
    pub fn quick() -> Matrix {
        let ms = Duration::from_millis;
        let pick = |names: &[&str]| {
            Workload::presets()
                .into_iter()
                .filter(|w| names.contains(&w.name.as_str()))
                .collect()
        };
        Matrix {
            workloads: pick(&["build", "memstress-moderate"]),
            modes: Mode::ALL.to_vec(),
            intervals: vec![ms(100), ms(1000)],
            repeats: 1,
            long_from: ms(30_000),
            long_workloads: Vec::new(),
            long_modes: Vec::new(),
            long_repeats: 1,
            // Long enough for three snapshots at 1 s: one group, one baseline.
            base_seconds: 4.3,
            qemu_min_interval: ms(1000),
            qemu_max_interval: ms(1000),
            qemu_workloads: vec!["build".into()],
            cap: 3.0,
        }
    }

    /// The groups of runs: one per workload and run length. The runs of a
    /// group do the same work, so one baseline run per repeat serves all
    /// its intervals and modes.
    pub fn groups(&self) -> Vec<Group> {
        let mut out: Vec<Group> = Vec::new();
        for w in &self.workloads {
            for &iv in &self.intervals {
                let long = iv >= self.long_from;
                if long && !self.long_workloads.contains(&w.name) {
                    continue;
                }
                let seconds = run_seconds(iv, self.base_seconds);
                let repeats = if long { self.long_repeats } else { self.repeats };
                match out
                    .iter_mut()
                    .find(|g| g.workload == *w && g.seconds == seconds && g.repeats == repeats)
                {
                    Some(g) => g.intervals.push(iv),
                    None => out.push(Group {
                        workload: w.clone(),
                        seconds,
                        repeats,
                        intervals: vec![iv],
                    }),
                }
            }
        }
        out
    }

    /// Whether `mode` runs at `interval` (`None`: a baseline) for `g`'s
    /// workload in repeat `rep`, or why not.
    pub fn skip(&self, g: &Group, mode: Mode, interval: Option<Duration>, rep: u32) -> Option<String> {
        if !self.modes.contains(&mode) {
            return Some("mode not selected".into());
        }
        let long = g.intervals.iter().all(|&iv| iv >= self.long_from);
        if long && !self.long_modes.contains(&mode) {
            return Some(format!(
                "not run at intervals of {} s and more (budget)",
                self.long_from.as_secs()
            ));
        }
        if mode.is_qemu() {
            if rep > 0 || !self.qemu_workloads.contains(&g.workload.name) {
                return Some("QEMU runs once, for some workloads (budget)".into());
            }
            let ivs = || g.intervals.iter().copied();
            let wanted = |iv: Duration| iv >= self.qemu_min_interval && iv <= self.qemu_max_interval;
            match interval {
                None if !ivs().any(wanted) => return Some("no QEMU interval in this group".into()),
                Some(iv) if iv < self.qemu_min_interval => {
                    return Some(format!(
                        "beyond QEMU: its snapshots copy all of RAM, too slow below {} s",
                        self.qemu_min_interval.as_secs_f64()
                    ));
                }
                Some(iv) if iv > self.qemu_max_interval => {
                    return Some(format!(
                        "QEMU not run above {} s (budget)",
                        self.qemu_max_interval.as_secs()
                    ));
                }
                _ => {}
            }
        }
        None
    }

    /// The runs of repeat `rep` of `g`, in the order they run: the
    /// baselines first, then each interval's modes back to back.
    pub fn runs(&self, g: &Group, rep: u32) -> Vec<(Mode, Option<Duration>)> {
        let mut out: Vec<(Mode, Option<Duration>)> = [Mode::None, Mode::QemuNone].map(|m| (m, None)).to_vec();
        for &iv in &g.intervals {
            out.extend(Mode::ALL.iter().filter(|m| m.snapshots()).map(|&m| (m, Some(iv))));
        }
        out.retain(|&(m, iv)| self.skip(g, m, iv, rep).is_none());
        out
    }

    /// Estimated time of the whole matrix, seconds, if no run lost time
    /// (each restore check adds about a second).
    pub fn estimate(&self) -> f64 {
        self.groups()
            .iter()
            .map(|g| {
                (0..g.repeats)
                    .map(|rep| {
                        let runs = self.runs(g, rep);
                        let snaps = runs.iter().filter(|(m, _)| m.snapshots()).count() as f64;
                        runs.len() as f64 * (g.seconds + 0.5) + snaps
                    })
                    .sum::<f64>()
            })
            .sum()
    }
}

/// Runs of one workload that do the same work.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub workload: Workload,
    /// Intended length of a run without snapshots, seconds.
    pub seconds: f64,
    pub repeats: u32,
    pub intervals: Vec<Duration>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_full_matrix_shares_baselines_and_thins_long_intervals() {
        let m = Matrix::full();
        let groups = m.groups();
        // build: one group for 20 ms..1 s, then 5 s, 10 s, 30 s, 60 s.
        let build: Vec<_> = groups.iter().filter(|g| g.workload.name == "build").collect();
        assert_eq!(build.len(), 5);
        assert_eq!(build[0].intervals.len(), 3);
        assert_eq!(build[0].repeats, 3);
        assert_eq!(build[4].repeats, 1);
        assert!(build[4].seconds >= 3.0 * 60.0);
        // memstress has no runs at 10 s and above.
        let mem: Vec<_> = groups.iter().filter(|g| g.workload.name == "memstress").collect();
        assert!(mem.iter().all(|g| g.intervals.iter().all(|&iv| iv < m.long_from)));
        // QEMU only at 1 s and above, with its own baseline, in the first repeat.
        let runs = m.runs(build[0], 0);
        assert_eq!(runs[0], (Mode::None, None));
        assert!(runs.contains(&(Mode::QemuNone, None)));
        assert!(
            !runs
                .iter()
                .any(|(md, iv)| md.is_qemu() && iv.is_some_and(|iv| iv < m.qemu_min_interval))
        );
        assert!(runs.contains(&(Mode::QemuBackground, Some(Duration::from_secs(1)))));
        assert!(!m.runs(build[0], 1).iter().any(|(md, _)| md.is_qemu()));
        assert!(
            m.skip(build[0], Mode::QemuStopCopy, Some(Duration::from_millis(20)), 0)
                .is_some()
        );
        // No stop-copy-full at 60 s.
        assert!(!m.runs(build[4], 0).iter().any(|(md, _)| *md == Mode::StopCopyFull));
        // The plan fits the budget (about 90 minutes) before losses.
        let est = m.estimate();
        assert!(est < 95.0 * 60.0, "{est} s");
        assert!(Matrix::quick().estimate() < 4.0 * 60.0);
    }

    #[test]
    fn workloads_parse_by_name_or_spec() {
        assert_eq!(Workload::parse("ftp-100M").unwrap().spec, "ftp,wss=256M,rate=12500000");
        assert!(Workload::parse("ftp-100M").unwrap().paced());
        assert!(!Workload::parse("build").unwrap().paced());
        let w = Workload::parse("mine=memstress,wss=8M,rate=max").unwrap();
        assert_eq!((w.name.as_str(), w.paced()), ("mine", false));
        assert!(Workload::parse("nope").is_err());
        assert!(Workload::parse("x=memstress,ops=5").is_err());
        assert_eq!(Mode::parse("qemu-background"), Some(Mode::QemuBackground));
        assert_eq!(Mode::parse("cow").map(Mode::baseline), Some(Mode::None));
    }
}
