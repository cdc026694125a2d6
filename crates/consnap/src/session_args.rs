//! The options `run` and `restore` share (`SessionArgs`) and the value
//! types of those options.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use store::Mode;

use crate::args;

/// Snapshot modes on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Pause, capture state and write-protect the pages dirtied since the last epoch, resume;
    /// save them while the VM runs, copying a page aside before the guest writes it.
    Cow,
    /// Pause, write all memory and state, resume.
    StopCopyFull,
    /// Pause, copy the pages dirtied since the last epoch, resume, write (the first epoch is full).
    StopCopy,
}

impl ModeArg {
    /// The store's mode.
    pub fn mode(self) -> Mode {
        match self {
            ModeArg::Cow => Mode::Cow,
            ModeArg::StopCopyFull => Mode::StopCopyFull,
            ModeArg::StopCopy => Mode::StopCopy,
        }
    }
}

/// How epoch files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotIo {
    /// O_DIRECT: bypass the page cache (its writeback steals CPU from the guest).
    Direct,
    /// Through the page cache.
    Buffered,
}

/// How `cow` finds the pages written since the last epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CowTracker {
    /// Either of the two, chosen and changed as the guest runs by a cost
    /// model of what each would cost it (docs/COW.md, "Adaptive").
    Auto,
    /// Write protection stays armed between epochs; a written block is
    /// compared page by page with its hashes at the last epoch.
    Uffd,
    /// KVM's dirty log (pages written in most epochs stay unprotected).
    DirtyLog,
}

/// Protection block sizes for `cow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CowBlock {
    /// 4 KiB: protect and release single pages.
    #[value(name = "4K")]
    Small,
    /// 2 MiB: protect and release whole huge pages (they stay huge).
    #[value(name = "2M")]
    Huge,
}

pub use crate::args::OnError;

/// Options shared by `run` and `restore`.
#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Write a JSON report here when the run ends.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Pause and resume all vCPUs this often to measure pause latency (0 = never).
    #[arg(long, default_value = "200ms", value_parser = args::duration)]
    pub pause_probe: Duration,
    /// Sample the guest's progress counter this often (0 = never).
    #[arg(long, default_value = "100ms", value_parser = args::duration)]
    pub sample_interval: Duration,
    /// Take snapshots into this directory (created 0700 if missing).
    #[arg(long)]
    pub snapshot_dir: Option<PathBuf>,
    /// How snapshots capture memory.
    #[arg(long, value_enum, default_value = "cow", requires = "snapshot_dir")]
    pub mode: ModeArg,
    /// A snapshot later than this (the one before it still being saved)
    /// makes the saver run at the vCPUs' priority until it catches up,
    /// instead of below them; `never` keeps it below them (needs
    /// CAP_SYS_NICE, which root has).
    #[arg(long, default_value = "1s", value_parser = args::max_lag, requires = "snapshot_dir")]
    pub max_lag: args::MaxLag,
    /// How page data is written: O_DIRECT or through the page cache.
    #[arg(long, value_enum, default_value = "direct", requires = "snapshot_dir")]
    pub snapshot_io: SnapshotIo,
    /// cow: how pages written since the last epoch are found.
    #[arg(long, value_enum, default_value = "auto", requires = "snapshot_dir")]
    pub cow_tracker: CowTracker,
    /// cow: granularity of write protection.
    #[arg(long, value_enum, default_value = "2M", requires = "snapshot_dir")]
    pub cow_block: CowBlock,
    /// cow: memory for pages copied aside before the guest writes them; when
    /// it is full, a writing vCPU waits for the saver.
    #[arg(long, default_value = "256M", value_parser = args::size, requires = "snapshot_dir")]
    pub cow_buffer: u64,
    /// cow: time the pause may spend copying the blocks written in the
    /// last epochs (hot) instead of write-protecting them. Each block
    /// copied spares the guest a write-protect fault later and lengthens
    /// the pause; the default, 0, keeps the pause under a millisecond
    /// (measured in docs/COW.md: build at 10 ms loses a few points more
    /// without it).
    #[arg(long, default_value = "0ms", value_parser = args::duration, requires = "snapshot_dir")]
    pub cow_pause_copy: Duration,
    /// Time between snapshots.
    #[arg(long, default_value = "1s", value_parser = args::duration, requires = "snapshot_dir")]
    pub interval: Duration,
    /// When snapshots fail: `stop` the VM at the first failure,
    /// `stop-after=N` failures in a row (a committed snapshot starts the
    /// count again), or `continue` running unprotected for as long as they
    /// fail. Any failed snapshot makes the exit status 3 (see README).
    #[arg(long, default_value = "stop-after=10", value_parser = args::on_snapshot_error, value_name = "POLICY")]
    pub on_snapshot_error: OnError,
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket, created
    /// 0600; see docs/openapi.yaml and `consnap ctl`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// No live status line on stderr while snapshots are taken.
    #[arg(long)]
    pub quiet: bool,
    /// How often the live status line is shown (default: every second on a
    /// terminal, redrawn in place; every 5s otherwise).
    #[arg(long, value_parser = args::duration, value_name = "DURATION")]
    pub status_interval: Option<Duration>,
    /// Compression of page data in new epochs (and in rewrites).
    #[arg(long, value_enum, default_value = "none", requires = "snapshot_dir")]
    pub compress: crate::store_args::CompressArg,
    /// Retention and reclamation (the reclaimer runs while the VM runs).
    #[command(flatten)]
    pub reclaim: crate::store_args::ReclaimArgs,
    /// Ship every committed epoch to this object store (s3://BUCKET/PREFIX)
    /// and keep it a mirror of the snapshot directory. Endpoint, region and
    /// credentials come from AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long, value_name = "URL", requires = "snapshot_dir")]
    pub replicate: Option<String>,
    /// Encrypt epochs on the object store with the key in FILE (32 bytes,
    /// or 64 hex digits: `openssl rand -hex 32 > FILE`), XChaCha20-Poly1305;
    /// `restore` from an object store needs the same key.
    #[arg(long, value_name = "FILE")]
    pub encrypt_key: Option<PathBuf>,
    /// How far replication may fall behind: bytes committed locally and
    /// not yet off-host.
    #[arg(long, default_value = "1G", value_parser = args::size, requires = "replicate")]
    pub replicate_backlog: u64,
    /// What happens beyond --replicate-backlog: `continue` (snapshots go on
    /// locally; the report says for how long the limit was exceeded) or
    /// `throttle` (snapshots wait until replication catches up).
    #[arg(long, value_enum, default_value = "continue", requires = "replicate")]
    pub replicate_overflow: Overflow,
    /// Output commit for the networks: `epoch` (the default with
    /// snapshots) holds every frame the guest sends until the epoch it
    /// belongs to is durable, so that no client ever sees a state a crash
    /// and restore could undo; `remote` (with --replicate) until it is on
    /// the object store, so that losing this host undoes nothing a client
    /// saw either (the console follows it under --console-commit epoch);
    /// `none` sends at once (the default without snapshots).
    #[arg(long, value_enum)]
    pub net_commit: Option<CommitArg>,
    /// Output commit for the console (serial port) too: `epoch` holds its
    /// bytes like frames; the default `none` writes them at once.
    #[arg(long, value_enum, default_value = "none")]
    pub console_commit: CommitArg,
    /// Most output held at once for its epoch. A network whose frames do
    /// not fit stops taking the guest's frames until some are released
    /// (the guest sees its queue full); console bytes over it are dropped
    /// and counted.
    #[arg(long, default_value = "64M", value_parser = args::size)]
    pub output_hold: u64,
}

/// `--net-commit`, `--console-commit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CommitArg {
    Epoch,
    Remote,
    None,
}

/// What happens when replication falls behind by more than its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Overflow {
    Continue,
    Throttle,
}
