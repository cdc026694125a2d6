//! `consnap`: run a VM under KVM with continuous snapshots.

mod api;
mod args;
mod at;
mod bench_child;
mod bench_cmd;
mod cache_cmd;
mod compact_cmd;
mod control;
mod ctl_cmd;
mod demo_cmd;
mod export_cmd;
mod inspect_cmd;
mod lazy_watch;
mod live;
mod ls_cmd;
mod progress;
mod ram_cmd;
mod reclaimer;
mod remote_args;
mod remote_cache;
mod report;
mod restore_cmd;
mod run_cmd;
mod saver_cmd;
mod session;
mod session_args;
mod space_cmd;
mod store_args;
mod verify_cmd;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thiserror::Error;

/// consnap: a KVM virtual machine monitor that protects a running VM with
/// continuous snapshots.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the idea in under a minute: a protected VM is killed, and
    /// restored runs finish with the checksum of one that never stopped.
    Demo(demo_cmd::DemoArgs),
    /// Boot a VM and run it until the guest powers off, optionally taking snapshots.
    Run(run_cmd::RunArgs),
    /// Rebuild a VM from a snapshot and run it on until the guest powers off.
    Restore(restore_cmd::RestoreArgs),
    /// List the snapshots in a snapshot directory.
    Ls(ls_cmd::LsArgs),
    /// Drive a running consnap through its control API (--api-sock).
    Ctl(ctl_cmd::CtlArgs),
    /// Show one snapshot in detail: its chain, files, pages and machine.
    Inspect(inspect_cmd::InspectArgs),
    /// Check every checksum and index of a snapshot directory.
    Verify(verify_cmd::VerifyArgs),
    /// Write the disks of a snapshot into new images, without running the VM.
    Export(export_cmd::ExportArgs),
    /// Reclaim space in a snapshot directory no process is writing.
    Compact(compact_cmd::CompactArgs),
    /// List and prune the restore cache: the stores `restore` and `verify`
    /// copied from object stores (under $HOME/.cache/consnap/remote).
    Cache(cache_cmd::CacheArgs),
    /// Measure the capture modes against runs without snapshots and against
    /// QEMU, and write docs/BENCHMARKS.md-style reports.
    Bench(bench_cmd::BenchArgs),
    /// Run a VM with snapshots beside busy processes and print its store's
    /// size and longest chain, every second, against its bounds.
    BenchSpace(space_cmd::SpaceArgs),
    /// Time the cow saver's writes against `dd oflag=direct` on the same
    /// directory, back to back.
    BenchSaver(saver_cmd::SaverArgs),
    /// Pause, arming and lazy restore's first instruction at several guest
    /// RAM sizes and chain lengths, in one table.
    BenchRam(ram_cmd::RamArgs),
    /// Operations on the embedded workload guest.
    Guest {
        #[command(subcommand)]
        command: GuestCommand,
    },
}

#[derive(Debug, Subcommand)]
enum GuestCommand {
    /// Write the embedded workload-guest ELF (boots in QEMU with -kernel).
    Export {
        /// Where to write the ELF.
        path: PathBuf,
    },
}

/// What any command can fail with: its own error, which `main` prints as
/// `consnap: error: MESSAGE` before exiting with status 1.
#[derive(Debug, Error)]
enum CliError {
    #[error(transparent)]
    Demo(#[from] demo_cmd::DemoError),
    #[error(transparent)]
    Run(#[from] run_cmd::RunError),
    #[error(transparent)]
    Restore(#[from] restore_cmd::RestoreCmdError),
    #[error(transparent)]
    Ls(#[from] ls_cmd::LsError),
    #[error(transparent)]
    Ctl(#[from] ctl_cmd::CtlError),
    #[error(transparent)]
    Inspect(#[from] inspect_cmd::InspectError),
    #[error(transparent)]
    Verify(#[from] verify_cmd::VerifyError),
    #[error(transparent)]
    Compact(#[from] compact_cmd::CompactError),
    #[error(transparent)]
    Bench(#[from] bench_cmd::BenchCmdError),
    #[error(transparent)]
    Space(#[from] space_cmd::SpaceError),
    #[error(transparent)]
    BenchChild(#[from] bench_child::BenchChildError),
    #[error(transparent)]
    Cache(#[from] cache_cmd::CacheCmdError),
    #[error(transparent)]
    ExportDisks(#[from] export_cmd::ExportError),
    /// `guest export` cannot write the ELF.
    #[error("cannot write {path}: {source}")]
    Export {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Run the command `cli` names; its exit status.
fn dispatch(cli: Cli) -> Result<i32, CliError> {
    Ok(match cli.command {
        Command::Demo(a) => demo_cmd::demo(a)?,
        Command::Run(a) => run_cmd::run(a)?,
        Command::Restore(a) => restore_cmd::restore(a)?,
        Command::Ls(a) => ls_cmd::ls(a)?,
        Command::Ctl(a) => ctl_cmd::ctl(a)?,
        Command::Inspect(a) => inspect_cmd::inspect(a)?,
        Command::Verify(a) => verify_cmd::verify(a)?,
        Command::Export(a) => export_cmd::export(a)?,
        Command::Compact(a) => compact_cmd::compact(a)?,
        Command::Cache(a) => cache_cmd::cache(a)?,
        Command::Bench(a) => bench_cmd::bench(a)?,
        Command::BenchSpace(a) => space_cmd::bench_space(a)?,
        Command::BenchSaver(a) => saver_cmd::bench_saver(a)?,
        Command::BenchRam(a) => ram_cmd::bench_ram(a)?,
        Command::Guest {
            command: GuestCommand::Export { path },
        } => match std::fs::write(&path, guest::GUEST_ELF) {
            Ok(()) => 0,
            Err(source) => return Err(CliError::Export { path, source }),
        },
    })
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    // A file-size limit must turn into a write error (EFBIG) that the
    // snapshot engine reports, not kill the VM.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    match dispatch(Cli::parse()) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "consnap: error: {e}");
            ExitCode::from(1)
        }
    }
}
