//! `consnap bench --net`: the kv guest on consnap's virtio-net against
//! QEMU's (the same ELF on the same TAP, no snapshots), and what output
//! commit costs a client at 20 ms, 100 ms and 1 s intervals.
//!
//! Every run is in a network namespace of its own ([`ns`]) with a peer
//! ([`peer`]) that times each request from its first send to its answer.
//! Cells:
//! - round trip, one request at a time (p50 / p99);
//! - requests per second with 16 in flight for a few seconds;
//! - with snapshots (`cow`) and output commit: the round trip with 16 in
//!   flight, against the interval, and the output gate's own release
//!   latency (frame made available to frame on the TAP) from the report.

pub mod ns;
pub mod peer;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use thiserror::Error;
use workload::kv::Op;

use crate::proc::{self, ProcError};
use ns::{GUEST_IP, GUEST_MAC, Netns, NetnsError, TAP};
use peer::{Ask, Peer, PeerError};

/// Why a network run failed (`what`: consnap or qemu).
#[derive(Debug, Error)]
pub enum NetBenchError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Proc {
        what: &'static str,
        #[source]
        source: ProcError,
    },
    #[error("{what}: {source} (its output: {tail})")]
    Peer {
        what: &'static str,
        #[source]
        source: PeerError,
        tail: String,
    },
    #[error("{what} ended with {status} (its output: {tail})")]
    Failed {
        what: &'static str,
        status: std::process::ExitStatus,
        tail: String,
    },
}

/// Keys the measuring puts cycle through.
const KEYS: u64 = 1024;
/// Datagrams of the throughput cells (full-size: 1472 bytes of payload).
const STREAM: u64 = 50_000;
/// Requests in flight for the rate and output-commit cells.
pub const WINDOW: usize = 16;

/// Which VMM serves: consnap (with snapshots every `interval`, output
/// commit on) or QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Consnap(Option<Duration>),
    Qemu,
}

impl Vmm {
    fn what(self) -> &'static str {
        match self {
            Vmm::Consnap(_) => "consnap",
            Vmm::Qemu => "qemu",
        }
    }
}

/// Where the runs happen.
#[derive(Debug)]
pub struct Ctx {
    /// consnap itself.
    pub exe: PathBuf,
    /// The exported guest, for QEMU (`None`: QEMU's cells are skipped).
    pub elf: Option<PathBuf>,
    pub scratch: PathBuf,
}

/// A VMM serving kv in its namespace.
struct Served {
    ns: Netns,
    child: Child,
    what: &'static str,
    out: PathBuf,
    report: PathBuf,
}

impl Ctx {
    fn start(&self, vmm: Vmm) -> Result<Served, NetBenchError> {
        let ns = Netns::new("bench")?;
        let spec = format!("kv,ip={GUEST_IP},wss=8M");
        let report = self.scratch.join("net-report.json");
        let program = match vmm {
            Vmm::Qemu => {
                let elf = self.elf.as_deref().unwrap_or(Path::new("guest.elf"));
                let mut c = crate::microvm::command(elf, &crate::words::guest_words(&spec), "256M", 1);
                c.args(["-serial", "stdio"]);
                crate::microvm::net(&mut c, TAP, GUEST_MAC);
                c
            }
            Vmm::Consnap(iv) => {
                let mut c = Command::new(&self.exe);
                c.args(["run", "--workload", &spec, "--pause-probe", "0", "--net"])
                    .arg(format!("tap={TAP},mac={GUEST_MAC}"))
                    .arg("--report")
                    .arg(&report);
                if let Some(iv) = iv {
                    let snaps = self.scratch.join("net-snaps");
                    let _ = std::fs::remove_dir_all(&snaps);
                    c.arg("--snapshot-dir")
                        .arg(&snaps)
                        .args(["--mode", "cow", "--interval"])
                        .arg(format!("{}ms", iv.as_millis()));
                }
                c
            }
        };
        let what = vmm.what();
        let (out, err) = (self.scratch.join("net.out"), self.scratch.join("net.err"));
        let child = proc::spawn(&mut ns.command(&program), &out, &err)
            .map_err(|source| NetBenchError::Proc { what, source })?;
        Ok(Served {
            ns,
            child,
            what,
            out,
            report,
        })
    }
}

impl Served {
    fn peer_failed(&self, source: PeerError) -> NetBenchError {
        NetBenchError::Peer {
            what: self.what,
            source,
            tail: proc::tail(&self.out, 3),
        }
    }

    /// A peer in the namespace, once the guest answers.
    fn peer(&self) -> Result<Peer, NetBenchError> {
        let mut p = Peer::new(self.ns.name()).map_err(|e| self.peer_failed(e))?;
        let ask = Ask {
            op: Op::Get,
            key: 0,
            value: 0,
        };
        p.call(ask, Instant::now() + Duration::from_secs(60))
            .map_err(|e| self.peer_failed(e))?;
        Ok(p)
    }

    /// Stop the guest and wait for its VMM; the consnap report, if any.
    fn stop(mut self, peer: &mut Peer) -> Result<Option<serde_json::Value>, NetBenchError> {
        let ask = Ask {
            op: Op::Stop,
            key: 0,
            value: 0,
        };
        peer.call(ask, Instant::now() + Duration::from_secs(60))
            .map_err(|e| self.peer_failed(e))?;
        let what = self.what;
        let ended = proc::wait(&mut self.child, Instant::now(), Duration::from_secs(60), None)
            .map_err(|source| NetBenchError::Proc { what, source })?;
        // QEMU's isa-debug-exit makes exit code 0 into 1.
        let ok = ended.status.success() || (what == "qemu" && ended.status.code() == Some(1));
        if !ok {
            return Err(NetBenchError::Failed {
                what,
                status: ended.status,
                tail: proc::tail(&self.out, 3),
            });
        }
        Ok(std::fs::read(&self.report)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }
}

/// Puts cycling through [`KEYS`] keys.
fn puts() -> impl FnMut() -> Option<Ask> {
    let mut i = 0u64;
    move || {
        i += 1;
        Some(Ask {
            op: Op::Put,
            key: i % KEYS,
            value: i,
        })
    }
}

/// `n` puts, `window` in flight; their round trips.
fn round_trips(p: &mut Peer, n: usize, window: usize) -> Result<Vec<Duration>, PeerError> {
    let mut rtts = Vec::with_capacity(n);
    let mut next = puts();
    let mut left = n;
    p.run(
        window,
        || {
            left = left.checked_sub(1)?;
            next()
        },
        |a| rtts.push(a.rtt),
        Instant::now() + Duration::from_secs(600),
    )?;
    rtts.sort_unstable();
    Ok(rtts)
}

/// Requests per second with `window` in flight, over `secs`.
fn rate(p: &mut Peer, window: usize, secs: f64) -> Result<f64, PeerError> {
    let start = Instant::now();
    let mut next = puts();
    let mut done = 0u64;
    p.run(
        window,
        || (start.elapsed().as_secs_f64() < secs).then(&mut next).flatten(),
        |_| done += 1,
        Instant::now() + Duration::from_secs(600),
    )?;
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn pct(v: &[Duration], q: f64) -> f64 {
    v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Round trip one at a time, ms: p50, p99.
    pub rtt1: [f64; 2],
    /// Requests per second, [`WINDOW`] in flight.
    pub rate: f64,
    /// The guest's TX and RX throughput, MB/s of UDP payload.
    pub tx_mbs: f64,
    pub rx_mbs: f64,
    /// With output commit: round trip with [`WINDOW`] in flight, ms: p50,
    /// p99, max; and the gate's release latency, ms: p50, p99, max.
    pub commit_rtt: [f64; 3],
    pub release: [f64; 3],
}

/// One run of `vmm`: without snapshots the one-at-a-time and rate cells,
/// with them the output-commit cell.
pub fn measure(ctx: &Ctx, vmm: Vmm) -> Result<Figures, NetBenchError> {
    let served = ctx.start(vmm)?;
    let mut p = served.peer()?;
    let mut f = Figures::default();
    let run = |p: &mut Peer, f: &mut Figures| -> Result<(), PeerError> {
        match vmm {
            Vmm::Consnap(Some(iv)) => {
                // About ten intervals' worth, at least 3 s.
                let n = ((10.0f64.max(3.0 / iv.as_secs_f64())) * WINDOW as f64) as usize;
                let r = round_trips(p, n.min(4000), WINDOW)?;
                f.commit_rtt = [pct(&r, 0.5), pct(&r, 0.99), pct(&r, 1.0)];
            }
            _ => {
                round_trips(p, 200, 1)?;
                let r = round_trips(p, 2000, 1)?;
                f.rtt1 = [pct(&r, 0.5), pct(&r, 0.99)];
                f.rate = rate(p, WINDOW, 3.0)?;
                let (bytes, secs) = p.take_stream(STREAM, workload::kv::MAX_PAYLOAD)?;
                f.tx_mbs = bytes as f64 / secs / 1e6;
                let (bytes, secs) = p.fill_sink(
                    STREAM,
                    workload::kv::MAX_PAYLOAD,
                    Instant::now() + Duration::from_secs(60),
                )?;
                f.rx_mbs = bytes as f64 / secs / 1e6;
            }
        }
        Ok(())
    };
    if let Err(e) = run(&mut p, &mut f) {
        return Err(served.peer_failed(e));
    }
    let report = served.stop(&mut p)?;
    if let Some(r) = report
        .as_ref()
        .and_then(|r| r["output"]["release_ms"].as_object().cloned())
    {
        let g = |k: &str| r.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        f.release = [g("p50"), g("p99"), g("max")];
    }
    Ok(f)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The intervals of the output-commit cells.
pub const INTERVALS: [Duration; 3] = [
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_secs(1),
];

/// Every cell, `repeats` times, consnap and QEMU back to back; the
/// Markdown table.
pub fn bench(ctx: &Ctx, repeats: u32) -> Result<String, NetBenchError> {
    std::fs::create_dir_all(&ctx.scratch).map_err(|source| NetBenchError::Io {
        path: ctx.scratch.clone(),
        source,
    })?;
    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    let mut commit: Vec<Vec<Figures>> = vec![Vec::new(); INTERVALS.len()];
    for rep in 0..repeats {
        ours.push(measure(ctx, Vmm::Consnap(None))?);
        if ctx.elf.is_some() {
            qemu.push(measure(ctx, Vmm::Qemu)?);
        }
        for (i, iv) in INTERVALS.iter().enumerate() {
            commit[i].push(measure(ctx, Vmm::Consnap(Some(*iv)))?);
        }
        eprintln!("net: repeat {} of {repeats} done", rep + 1);
    }
    Ok(table(&ours, &qemu, &commit, repeats))
}

fn table(ours: &[Figures], qemu: &[Figures], commit: &[Vec<Figures>], repeats: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Network\n\nGenerated by `consnap bench --net`: the workload guest's `kv` server (UDP on IPv4, its ring-3 virtio-net driver polling), one vCPU, 8 MiB table, the same ELF on consnap's virtio-net and on QEMU's (`-M microvm`, `virtio-net-device`, TAP backend), each in a network namespace of its own with a peer on the TAP's host side. Throughput: the guest sends 50,000 datagrams of 1,472 bytes (kv's `send`, up to 32 frames in flight) or the host sends it as many (kv's `sink`), counted where they arrive. Medians of {repeats} runs.\n"
    );
    let m = |v: &[Figures], f: &dyn Fn(&Figures) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "-".into() };
    let q = |v: f64| {
        if qemu.is_empty() {
            "-".to_string()
        } else {
            format!("{v:.3}")
        }
    };
    let _ = writeln!(
        s,
        "## Without snapshots\n\n| | consnap | QEMU | consnap / QEMU |\n|---|---|---|---|"
    );
    for (name, f) in [
        (
            "round trip p50, 1 in flight (ms)",
            &(|f: &Figures| f.rtt1[0]) as &dyn Fn(&Figures) -> f64,
        ),
        ("round trip p99, 1 in flight (ms)", &|f: &Figures| f.rtt1[1]),
    ] {
        let (a, b) = (m(ours, f), m(qemu, f));
        let _ = writeln!(s, "| {name} | {a:.3} | {} | {} |", q(b), ratio(a, b));
    }
    for (name, f) in [
        (
            format!("requests/s, {WINDOW} in flight"),
            &(|f: &Figures| f.rate) as &dyn Fn(&Figures) -> f64,
        ),
        ("guest TX, MB/s of UDP payload".to_string(), &|f: &Figures| f.tx_mbs),
        ("guest RX, MB/s of UDP payload".to_string(), &|f: &Figures| f.rx_mbs),
    ] {
        let (a, b) = (m(ours, f), m(qemu, f));
        let _ = writeln!(
            s,
            "| {name} | {a:.0} | {} | {} |",
            if qemu.is_empty() { "-".into() } else { format!("{b:.0}") },
            ratio(a, b)
        );
    }
    let _ = writeln!(
        s,
        "\n## With output commit (`--mode cow`, `--net-commit epoch`)\n\nEvery reply waits until the epoch of the request's handling is durable. Round trip with {WINDOW} requests in flight; release: the output gate's own latency from frame made available to frame written to the TAP (the report's `output.release_ms`), over every reply frame, including the guest's answers to the peer's resends (after 100 ms, then 200, 400...), which wait less.\n\n| interval | round trip p50 (ms) | p99 (ms) | max (ms) | p99 / interval | release p50 (ms) | release p99 (ms) |\n|---|---|---|---|---|---|---|"
    );
    for (iv, runs) in INTERVALS.iter().zip(commit) {
        let ms = iv.as_secs_f64() * 1e3;
        let (p50, p99, max) = (
            m(runs, &|f| f.commit_rtt[0]),
            m(runs, &|f| f.commit_rtt[1]),
            m(runs, &|f| f.commit_rtt[2]),
        );
        let _ = writeln!(
            s,
            "| {ms:.0} ms | {p50:.1} | {p99:.1} | {max:.1} | {:.2} | {:.1} | {:.1} |",
            p99 / ms,
            m(runs, &|f| f.release[0]),
            m(runs, &|f| f.release[1])
        );
    }
    s
}
