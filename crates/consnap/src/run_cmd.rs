//! `consnap run`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use vmm::boot::{BootConfig, KernelSource};
use vmm::devices::{Devices, GuestStop};
use vmm::machine::Machine;
use vmm::run::{PauseProbe, ProgressSampler, RunEnd, Task};

use crate::args;
use crate::report::{Percentiles, Report, SCHEMA};

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
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Guest RAM, e.g. 512M or 2G (default 256M, or the workload's wss plus 64M).
    #[arg(long, value_parser = args::size)]
    pub mem: Option<u64>,
    /// Number of vCPUs (1 to 4).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Write a JSON report here when the run ends.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Pause and resume all vCPUs this often to measure pause latency (0 = never).
    #[arg(long, default_value = "200ms", value_parser = args::duration)]
    pub pause_probe: Duration,
    /// Sample the guest's progress counter this often (0 = never).
    #[arg(long, default_value = "100ms", value_parser = args::duration)]
    pub sample_interval: Duration,
}

struct Plan {
    boot: BootConfig,
    mem: u64,
    workload: Option<(String, workload::Spec)>,
}

fn plan(a: &RunArgs) -> Result<Plan, String> {
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
    let need = spec.wss + GUEST_OVERHEAD;
    let mem = a
        .mem
        .unwrap_or_else(|| DEFAULT_MEM.max((spec.wss + (64 << 20)).next_multiple_of(2 << 20)));
    let usable = mem.min(vmm::memory::MMIO_HOLE_START);
    if need > usable {
        return Err(format!(
            "--workload wss={} MiB does not fit in --mem {} MiB: the workload guest needs wss + {} MiB below 3 GiB",
            spec.wss >> 20,
            mem >> 20,
            GUEST_OVERHEAD >> 20
        ));
    }
    Ok(Plan {
        boot: BootConfig {
            kernel: KernelSource::Bytes {
                name: "embedded workload guest".into(),
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

/// Feed terminal input to the guest's serial port.
fn spawn_stdin(devices: Arc<Devices>) {
    let _ = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                return;
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let k = devices.serial.enqueue_input(rest);
                rest = &rest[k..];
                if k == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
}

/// Run a VM to its end; returns consnap's exit status.
pub fn run(a: RunArgs) -> Result<i32, String> {
    let plan = plan(&a)?;
    let started = Instant::now();
    let mut machine = Machine::boot(
        plan.mem,
        &plan.boot,
        plan.workload.as_ref().map(|w| w.0.clone()),
        Box::new(std::io::stdout()),
    )
    .map_err(|e| e.to_string())?;
    let mut probe = PauseProbe::new(a.pause_probe);
    let mut sampler = ProgressSampler::new(a.sample_interval);
    vmm::run::install_stop_signals();
    spawn_stdin(machine.devices().clone());
    let end = {
        let mut tasks: [&mut dyn Task; 2] = [&mut probe, &mut sampler];
        vmm::run::run(&mut machine, &mut tasks).map_err(|e| e.to_string())?
    };
    machine.stop();
    let _ = std::io::stdout().flush();
    let report = build_report("run", &machine, &end, started, &probe.pauses, sampler.samples);
    if let Some(path) = &a.report {
        report
            .write(path)
            .map_err(|e| format!("cannot write report {}: {e}", path.display()))?;
    }
    summarize(&report);
    Ok(report.exit_code)
}

fn build_report(
    command: &'static str,
    machine: &Machine,
    end: &RunEnd,
    started: Instant,
    pauses: &[Duration],
    progress: Vec<(u64, u64)>,
) -> Report {
    let (status, exit_code, guest_exit_code, error) = match end {
        RunEnd::Guest(GuestStop::PowerOff { code }) => ("poweroff", (*code).min(255) as i32, Some(*code), None),
        RunEnd::Guest(GuestStop::Reset) => ("reset", 0, None, None),
        RunEnd::Guest(GuestStop::Shutdown) => ("shutdown", 0, None, None),
        RunEnd::Signal(sig) => ("signal", 128 + sig, None, None),
        RunEnd::Error(e) => ("error", 1, None, Some(e.to_string())),
        RunEnd::Task(why) => ("error", 1, None, Some(why.clone())),
    };
    let cfg = machine.config();
    let status_page = vmm::guest_status::read(machine.ram());
    let done = status_page.filter(|s| s.done());
    let spec = cfg.workload.as_deref().and_then(|w| workload::Spec::parse(w).ok());
    Report {
        schema: SCHEMA,
        command,
        status: status.to_string(),
        error,
        exit_code,
        guest_exit_code,
        workload: spec.map(|s| s.kind.name().to_string()),
        workload_spec: cfg.workload.clone(),
        ops: done.map(|s| s.ops).or(status_page.map(|s| s.ops_done)),
        checksum: done.map(|s| format!("{:#018x}", s.checksum)),
        workload_errors: done.map(|s| s.errors),
        wall_time_s: started.elapsed().as_secs_f64(),
        vcpus: cfg.vcpus,
        mem_bytes: cfg.mem_size,
        pause: Percentiles::of(pauses),
        progress,
    }
}

fn summarize(r: &Report) {
    let mut line = format!("consnap: {} after {:.2}s", r.status, r.wall_time_s);
    if let Some(code) = r.guest_exit_code {
        line += &format!(", guest exit code {code}");
    }
    if let (Some(w), Some(ops), Some(sum)) = (&r.workload, r.ops, &r.checksum) {
        line += &format!("; {w} ops={ops} checksum={sum}");
    }
    if r.pause.count > 0 {
        line += &format!(
            "; pause p50={:.0}us p99={:.0}us max={:.0}us (n={})",
            r.pause.p50_us, r.pause.p99_us, r.pause.max_us, r.pause.count
        );
    }
    if let Some(e) = &r.error {
        line += &format!("; error: {e}");
    }
    eprintln!("{line}");
}
