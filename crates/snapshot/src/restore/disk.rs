//! Disks of a restored epoch: each region of the chain is written, block
//! by block from the newest epoch that has it (every block verified
//! against its checksum), into a new image file. An image is written under
//! a temporary name beside it and linked into place only once it is
//! complete and durable, so a failed restore leaves no half-written disk;
//! an existing file is never overwritten, and the image the VM was first
//! started on is never touched.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use store::format::{RegionDesc, region_of, unit_addr};
use store::{EpochReader, Run, Source, StoreError};

use super::RestoreError;
use crate::pages::PAGE;

/// Blocks read at a time.
const CHUNK: u64 = 256;

/// Removes the temporary image unless it was put in place.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> RestoreError + 'a {
    move |source| {
        RestoreError::Store(StoreError::Io {
            path: path.to_path_buf(),
            op,
            source,
        })
    }
}

/// The runs of region `region` (1-based), from a chain's restore plan.
pub(crate) fn region_runs(runs: &[Run], region: usize) -> impl Iterator<Item = &Run> {
    runs.iter().filter(move |r| region_of(r.gfn) == region)
}

/// Write region `region` (1-based; `desc` describes it) of the epoch whose
/// chain and plan these are into a new image at `path`. Returns the bytes
/// of block data read; `on_read` receives them as they are.
pub(crate) fn materialize(
    chain: &[EpochReader],
    runs: &[Run],
    region: usize,
    desc: &RegionDesc,
    path: &Path,
    on_read: &mut dyn FnMut(u64),
) -> Result<u64, RestoreError> {
    if path.symlink_metadata().is_ok() {
        return Err(RestoreError::Disk {
            path: path.to_path_buf(),
            why: "exists: a restore writes a new image and never changes one; give a path that does not exist".into(),
        });
    }
    let name = path
        .file_name()
        .map_or("disk".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.consnap-restore-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp, "create"))?;
    let mut partial = Partial(Some(tmp.clone()));
    file.set_len(desc.bytes).map_err(io(&tmp, "set length"))?;
    let read = write_blocks(chain, runs, region, desc.bytes, &file, &tmp, on_read)?;
    file.sync_all().map_err(io(&tmp, "fsync"))?;
    // link() fails if the name exists: a file that appeared meanwhile is
    // never replaced.
    std::fs::hard_link(&tmp, path).map_err(io(path, "link the restored image into place"))?;
    drop(partial.0.take());
    std::fs::remove_file(&tmp).map_err(io(&tmp, "remove"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir, "fsync directory"))?;
    }
    Ok(read)
}

fn write_blocks(
    chain: &[EpochReader],
    runs: &[Run],
    region: usize,
    bytes: u64,
    file: &File,
    tmp: &Path,
    on_read: &mut dyn FnMut(u64),
) -> Result<u64, RestoreError> {
    let base = unit_addr(region, 0);
    let mut buf = vec![0u8; CHUNK as usize * PAGE];
    let mut read = 0;
    for run in region_runs(runs, region) {
        // Zero runs: the new file reads as zeros already.
        let Source::Data { epoch, page } = run.source else {
            continue;
        };
        let r = &chain[epoch];
        let mut done = 0;
        while done < run.count {
            let n = (run.count - done).min(CHUNK);
            let len = n as usize * PAGE;
            r.read_pages(page + done, &mut buf[..len])?;
            let at = (run.gfn - base + done) * PAGE as u64;
            // The last block may reach past the image's end.
            let keep = (bytes.saturating_sub(at)).min(len as u64) as usize;
            file.write_all_at(&buf[..keep], at).map_err(io(tmp, "write"))?;
            read += len as u64;
            on_read(len as u64);
            done += n;
        }
    }
    Ok(read)
}

/// A region of a chain, read unit by unit: the source of a lazily
/// restored disk.
pub(crate) struct ChainUnits {
    chain: Arc<Vec<EpochReader>>,
    /// This region's runs, ascending.
    runs: Vec<Run>,
    region: usize,
}

impl vmm::devices::virtio::disk::UnitSource for ChainUnits {
    fn read_units(&self, first: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let n = (buf.len() / PAGE) as u64;
        let mut u = unit_addr(self.region, first);
        let end = u + n;
        while u < end {
            let i = self.runs.partition_point(|r| r.gfn + r.count <= u);
            let at = ((u - unit_addr(self.region, first)) as usize) * PAGE;
            let Some(run) = self.runs.get(i).filter(|r| r.gfn <= u) else {
                // Listed by no epoch: cannot be (a chain ends at a full epoch).
                return Err(std::io::Error::other(format!(
                    "disk block {} is in no epoch of the chain",
                    u & ((1 << 48) - 1)
                )));
            };
            let k = (run.gfn + run.count).min(end) - u;
            let dst = &mut buf[at..at + k as usize * PAGE];
            match run.source {
                Source::Zero => dst.fill(0),
                Source::Data { epoch, page } => self.chain[epoch]
                    .read_pages(page + (u - run.gfn), dst)
                    .map_err(std::io::Error::other)?,
            }
            u += k;
        }
        Ok(())
    }
}

/// For a lazy restore: create each disk's image, empty and of its size,
/// at the path `disks` give, and make the chain its source.
pub(crate) fn lazy_disks(
    id: u64,
    regions: &[RegionDesc],
    chain: &Arc<Vec<EpochReader>>,
    runs: Vec<Run>,
    disks: &mut [vmm::machine::DiskAttach],
) -> Result<(), RestoreError> {
    if disks.len() != regions.len() {
        return Err(RestoreError::Disks {
            id,
            has: regions.len(),
            given: disks.len(),
        });
    }
    for (i, (desc, d)) in regions.iter().zip(disks.iter_mut()).enumerate() {
        let region = i + 1;
        if d.path.symlink_metadata().is_ok() {
            return Err(RestoreError::Disk {
                path: d.path.clone(),
                why: "exists: a restore writes a new image and never changes one; give a path that does not exist"
                    .into(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&d.path)
            .map_err(io(&d.path, "create"))?;
        file.set_len(desc.bytes).map_err(io(&d.path, "set length"))?;
        d.source = Some(Arc::new(ChainUnits {
            chain: chain.clone(),
            runs: region_runs(&runs, region).copied().collect(),
            region,
        }));
    }
    Ok(())
}
