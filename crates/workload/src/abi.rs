//! The contract between the workload guest and the VMM.
//!
//! The guest publishes its progress and result in a status page at a fixed
//! guest-physical address. The VMM samples it from its own mapping of guest
//! RAM, so watching throughput costs the guest no VM exit. All fields are
//! little-endian and naturally aligned; the guest writes them with plain
//! (atomic, relaxed) stores.

/// Guest-physical address of the status page.
pub const STATUS_GPA: u64 = 0x0010_0000;

/// `magic` once the guest has initialised the page: "CSNPGST1".
pub const STATUS_MAGIC: u64 = u64::from_le_bytes(*b"CSNPGST1");

/// Version of this layout.
pub const STATUS_ABI_VERSION: u32 = 1;

/// Most vCPUs the guest drives.
pub const MAX_CPUS: usize = 8;

/// Byte offsets of the fields in the status page.
pub mod off {
    /// u64 [`super::STATUS_MAGIC`].
    pub const MAGIC: u64 = 0;
    /// u32 [`super::STATUS_ABI_VERSION`].
    pub const VERSION: u64 = 8;
    /// u32 one of [`super::state`].
    pub const STATE: u64 = 12;
    /// u32 number of vCPUs running the workload.
    pub const NCPUS: u64 = 16;
    /// u32 exit code the guest will report.
    pub const EXIT_CODE: u64 = 20;
    /// u64 total ops, valid once `state` is DONE.
    pub const OPS: u64 = 24;
    /// u64 combined checksum, valid once `state` is DONE.
    pub const CHECKSUM: u64 = 32;
    /// u64 integrity errors found by the workload itself.
    pub const ERRORS: u64 = 40;
    /// u64 guest-physical address of the working set (vCPU i's share starts
    /// `i * Share::bytes` after it); 0 until the guest has placed it.
    pub const ARENA: u64 = 48;
    /// [u64; MAX_CPUS] ops done so far per vCPU, updated live.
    pub const OPS_DONE: u64 = 64;
}

/// Values of the `state` field.
pub mod state {
    /// Page not initialised yet.
    pub const EMPTY: u32 = 0;
    /// Kernel part done, workload parameters being read.
    pub const BOOTING: u32 = 1;
    /// The workload is running.
    pub const RUNNING: u32 = 2;
    /// Finished; ops and checksum are final.
    pub const DONE: u32 = 3;
    /// The guest hit an error and will exit non-zero.
    pub const FAILED: u32 = 4;
}

/// Exit codes the guest writes to the debug-exit port.
pub mod exit {
    /// Workload finished and verified.
    pub const OK: u32 = 0;
    /// Workload finished but found integrity errors.
    pub const INTEGRITY: u32 = 1;
    /// Bad command line.
    pub const BAD_CMDLINE: u32 = 2;
    /// Not enough memory, CPUs, or other resources for the request.
    pub const RESOURCES: u32 = 3;
    /// Unexpected CPU exception.
    pub const FAULT: u32 = 4;
}

/// I/O port of the debug-exit device (QEMU's isa-debug-exit default).
pub const DEBUG_EXIT_PORT: u16 = 0x501;

/// consnap's idle port (16-bit). A ring-3 guest cannot HLT, so a workload
/// that is ahead of its rate writes the microseconds it would otherwise
/// spin to this port, and the vCPU thread sleeps that long (at most
/// [`IDLE_MAX_US`], and less when the VMM pauses it), leaving the host CPU
/// to others as an idle VM in HLT would. A 16-bit read returns
/// [`IDLE_MAGIC`] where the port exists; elsewhere (QEMU) the guest spins.
pub const IDLE_PORT: u16 = 0x502;

/// What a read of [`IDLE_PORT`] returns under consnap.
pub const IDLE_MAGIC: u16 = 0x1d1e;

/// The longest single sleep the idle port grants.
pub const IDLE_MAX_US: u16 = 5_000;
