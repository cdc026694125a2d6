//! `consnap bench --disk-io`: the guest's disk throughput on consnap's
//! virtio-blk against QEMU's, with the same workload guest ELF, without
//! snapshots: sequential 1 MiB and random 4 KiB blocks, read and written
//! (the `diskio` workload; the guest times its I/O phase with its own clock
//! and prints the rate). Each cell runs consnap and QEMU back to back,
//! `repeats` times, on images of the same size and contents in the same
//! directory; the table gives the medians and their ratio.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use thiserror::Error;

use crate::proc::{self, ProcError};
use crate::words::guest_words;

/// Why a disk throughput run failed (`what`: consnap or qemu).
#[derive(Debug, Error)]
pub enum DiskIoError {
    /// It could not be started or waited for.
    #[error("{what}: {source}")]
    Proc {
        what: &'static str,
        #[source]
        source: ProcError,
    },
    /// A file of the run could not be used.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// It printed no rate (the guest failed).
    #[error("{what}: no diskio rate in its output (last line: {last:?})")]
    NoRate { what: &'static str, last: String },
}

type Result<T> = std::result::Result<T, DiskIoError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskIoError + '_ {
    move |source| DiskIoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The disk area the workload uses, and the image (a MiB more).
const DSIZE: u64 = 256 << 20;

/// One cell: what the guest does.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    /// `write` or `read`.
    pub io: &'static str,
    /// `seq` or `random`.
    pub pattern: &'static str,
    /// Block size in bytes.
    pub chunk: u64,
    /// Blocks per run.
    pub ops: u64,
}

/// The cells the issue asks for.
pub const CELLS: [Cell; 4] = [
    Cell {
        io: "write",
        pattern: "seq",
        chunk: 1 << 20,
        ops: 1024,
    },
    Cell {
        io: "read",
        pattern: "seq",
        chunk: 1 << 20,
        ops: 1024,
    },
    Cell {
        io: "write",
        pattern: "random",
        chunk: 4096,
        ops: 40_000,
    },
    Cell {
        io: "read",
        pattern: "random",
        chunk: 4096,
        ops: 40_000,
    },
];

impl Cell {
    fn spec(&self) -> String {
        format!(
            "diskio,io={},pattern={},chunk={},ops={},wss={},dsize={}",
            self.io,
            self.pattern,
            self.chunk,
            self.ops,
            self.chunk.max(1 << 20),
            DSIZE
        )
    }

    fn name(&self) -> String {
        let size = if self.chunk >= 1 << 20 {
            format!("{} MiB", self.chunk >> 20)
        } else {
            format!("{} KiB", self.chunk >> 10)
        };
        format!(
            "{} {} {size}",
            if self.pattern == "seq" { "sequential" } else { "random" },
            self.io
        )
    }
}

/// The measured rates of one cell, MB/s.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    pub consnap: Vec<f64>,
    pub qemu: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// The rate the guest printed (`diskio ...: N bytes in T us, R MB/s`).
fn rate_of(stdout: &str) -> Option<f64> {
    let line = stdout.lines().find(|l| l.contains("consnap-guest: diskio "))?;
    let (bytes, rest) = line.rsplit_once(": ")?.1.split_once(" bytes in ")?;
    let us: f64 = rest.split_once(" us")?.0.parse().ok()?;
    let bytes: f64 = bytes.parse().ok()?;
    (us > 0.0).then(|| bytes / us)
}

/// A fresh image of the size the cells use, every block non-zero (a read
/// reads data, not holes).
fn image(path: &Path) -> Result<()> {
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let mut data = Vec::with_capacity((DSIZE + (1 << 20)) as usize);
    while (data.len() as u64) < DSIZE + (1 << 20) {
        data.extend_from_slice(&block);
    }
    std::fs::write(path, &data).map_err(io(path))
}

fn run_consnap(exe: &Path, cell: &Cell, img: &Path, scratch: &Path) -> Result<f64> {
    let out = scratch.join("diskio-consnap.out");
    let err = scratch.join("diskio-consnap.err");
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--workload", &cell.spec(), "--pause-probe", "0", "--disk"])
        .arg(img);
    finish(&mut cmd, &out, &err, "consnap")
}

fn run_qemu(elf: &Path, cell: &Cell, img: &Path, scratch: &Path) -> Result<f64> {
    let out = scratch.join("diskio-qemu.out");
    let err = scratch.join("diskio-qemu.err");
    let mut cmd = crate::microvm::command(elf, &guest_words(&cell.spec()), "512M", 1);
    cmd.args(["-serial", "stdio"]);
    crate::microvm::disk(&mut cmd, img, Some("writeback"));
    finish(&mut cmd, &out, &err, "qemu")
}

fn finish(cmd: &mut Command, out: &Path, err: &Path, what: &'static str) -> Result<f64> {
    let failed = |source| DiskIoError::Proc { what, source };
    let mut child = proc::spawn(cmd, out, err).map_err(failed)?;
    proc::wait(&mut child, std::time::Instant::now(), Duration::from_secs(600), None).map_err(failed)?;
    let stdout = std::fs::read_to_string(out).map_err(io(out))?;
    rate_of(&stdout).ok_or_else(|| DiskIoError::NoRate {
        what,
        last: stdout.lines().last().unwrap_or("").to_string(),
    })
}

/// Run every cell `repeats` times on consnap (`exe`) and on QEMU (with
/// `elf`, the exported guest; `None` without QEMU), alternating.
pub fn measure(exe: &Path, elf: Option<&Path>, scratch: &Path, repeats: u32) -> Result<Vec<(Cell, Rates)>> {
    std::fs::create_dir_all(scratch).map_err(io(scratch))?;
    let img: PathBuf = scratch.join("diskio.img");
    let mut out = Vec::new();
    for cell in CELLS {
        let mut rates = Rates::default();
        for _ in 0..repeats {
            image(&img)?;
            rates.consnap.push(run_consnap(exe, &cell, &img, scratch)?);
            if let Some(elf) = elf {
                image(&img)?;
                rates.qemu.push(run_qemu(elf, &cell, &img, scratch)?);
            }
            eprintln!(
                "diskio {}: consnap {:.0} MB/s, QEMU {}",
                cell.name(),
                rates.consnap.last().copied().unwrap_or(0.0),
                rates.qemu.last().map_or("absent".into(), |r| format!("{r:.0} MB/s"))
            );
        }
        out.push((cell, rates));
    }
    let _ = std::fs::remove_file(&img);
    Ok(out)
}

/// The table, in Markdown.
pub fn table(rows: &[(Cell, Rates)], repeats: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Disk throughput\n\nGenerated by `consnap bench --disk-io`: the workload guest's `diskio` workload, the same ELF on consnap's virtio-blk and on QEMU's (`-M microvm`, `virtio-blk-device`, `cache=writeback`), one vCPU, no snapshots, each on a fresh non-sparse image in the same directory; the guest times its I/O phase with its own clock. Requests are at most 128 KiB (the guest driver splits larger blocks) and one at a time.\n"
    );
    let _ = writeln!(
        s,
        "| guest I/O ({} MiB area, queue depth 1) | consnap MB/s | QEMU MB/s | consnap / QEMU |",
        DSIZE >> 20
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for (cell, r) in rows {
        let (c, q) = (median(&r.consnap), median(&r.qemu));
        let all = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            s,
            "| {} | {c:.0} ({}) | {} | {} |",
            cell.name(),
            all(&r.consnap),
            if r.qemu.is_empty() {
                "-".into()
            } else {
                format!("{q:.0} ({})", all(&r.qemu))
            },
            if q > 0.0 { format!("{:.2}", c / q) } else { "-".into() }
        );
    }
    let _ = writeln!(
        s,
        "\nMedians of {repeats} runs each (all runs in parentheses), consnap and QEMU back to back."
    );
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_rate_is_read_from_the_guest_line() {
        let out = "consnap-guest: virtio-blk: 8 requests\nconsnap-guest: diskio write seq chunk=1048576: 2000000 bytes in 1000 us, 2000 MB/s\n";
        assert_eq!(super::rate_of(out), Some(2000.0));
        assert_eq!(super::rate_of("consnap-guest: done"), None);
    }
}
