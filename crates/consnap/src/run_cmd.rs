//! `consnap run`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use thiserror::Error;
use vmm::boot::{BootConfig, KernelSource};
use vmm::machine::{Machine, MachineError};

use crate::args::{self, ArgError};
use crate::session::{self, SessionArgs, SessionError};

/// Room the workload guest needs besides its working set (image, stacks,
/// 2 MiB alignment of the arena).
const GUEST_OVERHEAD: u64 = 8 << 20;
const DEFAULT_MEM: u64 = 256 << 20;
const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Options of `consnap run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an ELF with a PVH note (e.g. vmlinux) or a bzImage.
    #[arg(long, conflicts_with = "workload")]
    pub kernel: Option<PathBuf>,
    /// Run the embedded workload guest: NAME[,key=value...] with NAME one of
    /// memstress, build, ftp (the default is memstress with its defaults).
    #[arg(long)]
    pub workload: Option<String>,
    /// Initial ramdisk for --kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM, e.g. 512M or 2G (default 256M, or the workload's wss plus 64M).
    #[arg(long, value_parser = args::size)]
    pub mem: Option<u64>,
    /// Number of vCPUs (1 to 4).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Attach a raw disk image as a virtio-blk device (repeatable, in
    /// order; `,readonly` for one the guest may only read). The image is
    /// locked while the VM runs and captured in every snapshot with memory.
    #[arg(long, value_name = "PATH[,readonly]", value_parser = args::disk)]
    pub disk: Vec<vmm::machine::DiskAttach>,
    /// Attach a virtio-net device on the TAP device NAME (repeatable),
    /// opened, or created and brought up when absent (then removed when
    /// consnap exits). With snapshots, what the guest sends waits until
    /// its epoch is durable (--net-commit).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = args::net)]
    pub net: Vec<vmm::machine::NetAttach>,
    /// Reporting and snapshot options.
    #[command(flatten)]
    pub session: SessionArgs,
}

/// Why `consnap run` cannot run its VM.
#[derive(Debug, Error)]
pub enum RunError {
    /// `--initrd` for the workload guest.
    #[error("--initrd {initrd} needs --kernel: the workload guest takes no initial ramdisk")]
    InitrdNeedsKernel {
        /// The `--initrd` given.
        initrd: PathBuf,
    },
    /// `--cmdline` for the workload guest.
    #[error("--cmdline needs --kernel: the workload guest's command line comes from --workload")]
    CmdlineNeedsKernel,
    /// A `--workload` spec that does not parse.
    #[error(transparent)]
    Workload(#[from] ArgError),
    /// A working set too large for `--mem`.
    #[error(
        "--workload wss={} does not fit in --mem {}: the workload guest needs wss + {} below 3 GiB",
        args::show_size(*.wss),
        args::show_size(*.mem),
        args::show_size(GUEST_OVERHEAD)
    )]
    DoesNotFit {
        /// The workload's working set, bytes.
        wss: u64,
        /// Guest RAM, bytes.
        mem: u64,
    },
    /// The session's options, or the run itself.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The VM cannot be built.
    #[error(transparent)]
    Boot(#[from] MachineError),
}

struct Plan {
    boot: BootConfig,
    mem: u64,
    workload: Option<(String, workload::Spec)>,
}

fn plan(a: &RunArgs) -> Result<Plan, RunError> {
    // Checked here rather than with clap's `requires`, which misses the
    // --workload case and prints several lines.
    if a.kernel.is_none() {
        if let Some(initrd) = &a.initrd {
            return Err(RunError::InitrdNeedsKernel { initrd: initrd.clone() });
        }
        if a.cmdline.is_some() {
            return Err(RunError::CmdlineNeedsKernel);
        }
    }
    if let Some(kernel) = &a.kernel {
        return Ok(Plan {
            boot: BootConfig {
                kernel: KernelSource::File(kernel.clone()),
                initrd: a.initrd.clone(),
                cmdline: a.cmdline.clone().unwrap_or_else(|| DEFAULT_LINUX_CMDLINE.to_string()),
                vcpus: a.vcpus,
            },
            mem: a.mem.unwrap_or(512 << 20),
            workload: None,
        });
    }
    let (cmdline, spec) = args::workload_cmdline(a.workload.as_deref().unwrap_or("memstress"))?;
    let need = spec.wss.saturating_add(GUEST_OVERHEAD);
    let mem = a.mem.unwrap_or_else(|| {
        DEFAULT_MEM.max(
            spec.wss
                .saturating_add(64 << 20)
                .checked_next_multiple_of(2 << 20)
                .unwrap_or(u64::MAX),
        )
    });
    let usable = mem.min(vmm::memory::MMIO_HOLE_START);
    if need > usable {
        return Err(RunError::DoesNotFit { wss: spec.wss, mem });
    }
    Ok(Plan {
        boot: BootConfig {
            kernel: KernelSource::Bytes {
                name: guest::host::KERNEL_NAME.into(),
                image: guest::GUEST_ELF,
            },
            initrd: None,
            cmdline: cmdline.clone(),
            vcpus: a.vcpus,
        },
        mem,
        workload: Some((cmdline, spec)),
    })
}

/// Run a VM to its end; returns consnap's exit status.
pub fn run(a: RunArgs) -> Result<i32, RunError> {
    let plan = plan(&a)?;
    let pre = session::preflight(&a.session)?;
    let started = Instant::now();
    let stdout = Box::new(std::io::stdout());
    let mut attach = match plan.workload {
        Some(_) => guest::host::attach(stdout),
        None => vmm::machine::Attach::console(stdout),
    };
    attach.disks = a.disk;
    attach.nets = a.net;
    pre.output.apply(&mut attach);
    let machine = Machine::boot(plan.mem, &plan.boot, attach)?;
    Ok(session::execute(machine, "run", &a.session, pre, None, started)?)
}
