//! virtio-blk over a raw [`DiskImage`]: requests IN, OUT, FLUSH and
//! GET_ID. A request the guest gets wrong (short header, data not a whole
//! number of sectors, sectors past the end, buffers outside RAM, a chain
//! that loops or ends early) completes with an error status whenever the
//! chain has a byte to put it in, and never stops the device or the VMM.
//!
//! Data moves between the image and the guest's buffers with no copy
//! (preadv and pwritev on guest memory); the pages a read fills are marked
//! in guest memory's dirty bitmap, so they are in the machine's dirty set. FLUSH completes once the image's written data is durable on the
//! host (`fdatasync`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress};

use super::VirtioDevice;
use super::chain::{Seg, gather, guest_slices, locate, scatter};
use super::disk::{DiskImage, SECTOR};
use crate::devices::DeviceError;
use crate::memory::GuestMemory;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
const HEADER: u64 = 16;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What a block device did, for reports.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Bytes read from the image into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written to the image.
    pub written_bytes: AtomicU64,
    /// FLUSH requests.
    pub flushes: AtomicU64,
    /// Requests completed with an error status (I/O errors and requests
    /// the guest got wrong).
    pub errors: AtomicU64,
    /// Chains so malformed that no status could be written.
    pub dropped: AtomicU64,
}

/// The block device's saved state besides its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    /// Image size in bytes when saved.
    pub bytes: u64,
    /// Attached read-only.
    pub readonly: bool,
    /// What GET_ID answers.
    pub id: [u8; ID_BYTES],
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<DiskImage>,
    id: [u8; ID_BYTES],
    counters: BlockCounters,
    queues: [u16; 1],
}

/// Why a request fails.
enum Fail {
    /// Complete it with this status.
    Status(u8),
}

impl Block {
    /// A device over `disk`, answering GET_ID with `id` (truncated to 20 bytes).
    pub fn new(disk: Arc<DiskImage>, id: &str) -> Block {
        let mut b = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        b[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            disk,
            id: b,
            counters: BlockCounters::default(),
            queues: [QUEUE_SIZE],
        }
    }

    /// Rebuild from `state` over `disk`, which must have the saved size.
    pub fn restore(disk: Arc<DiskImage>, state: &BlockState) -> Result<Block, DeviceError> {
        if disk.bytes() != state.bytes {
            return Err(DeviceError::State {
                device: format!("disk {}", disk.path().display()),
                why: format!(
                    "the epoch's disk had {} bytes, this image has {}",
                    state.bytes,
                    disk.bytes()
                ),
            });
        }
        let mut b = Block::new(disk, "");
        b.id = state.id;
        Ok(b)
    }

    /// State to save (the transport saves the queues).
    pub fn save(&self) -> BlockState {
        BlockState {
            bytes: self.disk.bytes(),
            readonly: self.disk.readonly(),
            id: self.id,
        }
    }

    /// The image.
    pub fn disk(&self) -> &Arc<DiskImage> {
        &self.disk
    }

    /// What it did so far.
    pub fn counters(&self) -> &BlockCounters {
        &self.counters
    }

    /// Serve one chain; returns the bytes written into its device-writable
    /// buffers.
    fn execute(&self, chain: virtio_queue::DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        let mut bad_order = false;
        for d in chain {
            let seg = Seg {
                addr: d.addr().0,
                len: u64::from(d.len()),
            };
            if d.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                // A device-readable buffer after a writable one.
                bad_order = true;
            }
        }
        let wlen: u64 = writable.iter().map(|s| s.len).sum();
        let Some(status_at) = locate(&writable, wlen.wrapping_sub(1)).filter(|_| wlen > 0) else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let (status, written) = match self.request(&readable, &writable, wlen - 1, mem, bad_order) {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(Fail::Status(s)) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                (s, 0)
            }
        };
        if mem.write_obj(status, GuestAddress(status_at)).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        (written + 1).min(u64::from(u32::MAX)) as u32
    }

    /// Run the request; returns the bytes of data written into the guest.
    fn request(
        &self,
        readable: &[Seg],
        writable: &[Seg],
        data_in: u64,
        mem: &GuestMemory,
        bad_order: bool,
    ) -> Result<u64, Fail> {
        let ioerr = Fail::Status(VIRTIO_BLK_S_IOERR as u8);
        let rlen: u64 = readable.iter().map(|s| s.len).sum();
        if rlen < HEADER || bad_order {
            return Err(ioerr);
        }
        let mut header = [0u8; HEADER as usize];
        gather(mem, readable, 0, &mut header).map_err(|_| Fail::Status(VIRTIO_BLK_S_IOERR as u8))?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let data_out = rlen - HEADER;
        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = self
                    .range(sector, data_in)
                    .ok_or(Fail::Status(VIRTIO_BLK_S_IOERR as u8))?;
                if data_out != 0 {
                    return Err(ioerr);
                }
                self.read(mem, writable, offset, data_in)?;
                self.counters.read_bytes.fetch_add(data_in, Ordering::Relaxed);
                Ok(data_in)
            }
            VIRTIO_BLK_T_OUT => {
                let offset = self
                    .range(sector, data_out)
                    .ok_or(Fail::Status(VIRTIO_BLK_S_IOERR as u8))?;
                if self.disk.readonly() {
                    return Err(ioerr);
                }
                self.write(mem, readable, offset, data_out)?;
                self.counters.written_bytes.fetch_add(data_out, Ordering::Relaxed);
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                self.disk.flush().map_err(|e| {
                    tracing::warn!(disk = %self.disk.path().display(), "flush failed: {e}");
                    ioerr
                })?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_in.min(ID_BYTES as u64) as usize;
                scatter(mem, writable, 0, &self.id[..n]).map_err(|_| Fail::Status(VIRTIO_BLK_S_IOERR as u8))?;
                Ok(n as u64)
            }
            _ => Err(Fail::Status(VIRTIO_BLK_S_UNSUPP as u8)),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole
    /// sectors inside the image.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        (len.is_multiple_of(SECTOR) && offset.checked_add(len)? <= self.disk.bytes()).then_some(offset)
    }

    /// IN: read straight from the image into the guest's buffers (no
    /// copy), then mark those pages dirty (the kernel wrote them, not
    /// vm-memory).
    fn read(&self, mem: &GuestMemory, writable: &[Seg], offset: u64, len: u64) -> Result<(), Fail> {
        let ioerr = Fail::Status(VIRTIO_BLK_S_IOERR as u8);
        let slices = guest_slices(mem, writable, 0, len).ok_or(Fail::Status(VIRTIO_BLK_S_IOERR as u8))?;
        let iov: Vec<libc::iovec> = slices
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        // SAFETY: each iovec is a slice of guest RAM, mapped for as long as
        // the machine lives (longer than this call) and only ever touched
        // by volatile accesses and the kernel; a guest that reads its own
        // buffer meanwhile sees it change, as with real DMA.
        let r = unsafe { self.disk.read_vectored_at(&iov, offset) };
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        r.map_err(|e| {
            tracing::warn!(disk = %self.disk.path().display(), "read at {offset}: {e}");
            ioerr
        })
    }

    /// OUT: write the guest's buffers straight to the image (no copy).
    fn write(&self, mem: &GuestMemory, readable: &[Seg], offset: u64, len: u64) -> Result<(), Fail> {
        let slices = guest_slices(mem, readable, HEADER, len).ok_or(Fail::Status(VIRTIO_BLK_S_IOERR as u8))?;
        let iov: Vec<libc::iovec> = slices
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: s.len(),
            })
            .collect();
        // SAFETY: as in `read`; pwritev only reads guest memory.
        unsafe { self.disk.write_vectored_at(&iov, offset) }.map_err(|e| {
            tracing::warn!(disk = %self.disk.path().display(), "write at {offset}: {e}");
            Fail::Status(VIRTIO_BLK_S_IOERR as u8)
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> String {
        format!("virtio-blk {}", self.disk.path().display())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queues
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.readonly() { 1 << VIRTIO_BLK_F_RO } else { 0 };
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64 sectors) first; the rest
        // belongs to features not offered and reads as zero.
        super::read_config_bytes(&(self.disk.bytes() / SECTOR).to_le_bytes(), offset, data);
    }

    fn check(&self) -> Result<(), DeviceError> {
        self.disk.check_size().map_err(|e| DeviceError::Quiesce {
            device: self.name(),
            why: e.to_string(),
        })
    }

    fn process(
        &self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, virtio_queue::Error> {
        super::serve_chains(queue, mem, stop, |chain| super::Step::Used(self.execute(chain, mem)))
    }
}
