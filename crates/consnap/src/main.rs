//! `consnap`: run a VM under KVM with continuous snapshots.

mod args;
mod report;
mod run_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Boot a VM and run it until the guest powers off.
    Run(run_cmd::RunArgs),
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

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run_cmd::run(a),
        Command::Guest {
            command: GuestCommand::Export { path },
        } => std::fs::write(&path, guest::GUEST_ELF)
            .map(|()| 0)
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(msg) => {
            eprintln!("consnap: error: {msg}");
            ExitCode::from(1)
        }
    }
}
