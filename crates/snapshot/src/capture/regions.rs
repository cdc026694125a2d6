//! The regions of an epoch besides guest RAM: each disk's units (4 KiB
//! blocks), captured at the same pause as memory.
//!
//! At the pause (devices quiesced) each region's units for the epoch are
//! taken (the units written since the last epoch, or for a full epoch the
//! units that may hold data) and *frozen*: from then on the device copies a
//! frozen unit aside before it overwrites it. The units are then read as
//! they were at the pause, from the image or from the copy aside, and
//! written after RAM's pages, in unit-address order (docs/FORMAT.md,
//! regions): while paused for `stop-copy-full`, copied into memory while
//! paused and written afterwards for `stop-copy`, read and written in the
//! background for `cow`. Whatever happens to the epoch, its regions are
//! thawed when it is done; the engine hands a failed epoch's units back.

use std::sync::Arc;

use store::format::{RegionDesc, region_kind, unit_addr};
use store::{EpochInfo, EpochWriter};
use vmm::dirty::PageBits;
use vmm::region::{Region, RegionKind, UNIT};

use crate::capture::error::EpochFailure;
use crate::pages::is_zero;

/// Units read at a time.
const CHUNK_UNITS: u64 = 256;

/// How the store describes `r`.
pub(crate) fn describe(r: &dyn Region) -> RegionDesc {
    let info = r.info();
    RegionDesc {
        kind: match info.kind {
            RegionKind::Disk => region_kind::DISK,
        },
        readonly: info.readonly,
        bytes: info.bytes,
    }
}

struct Part {
    region: Arc<dyn Region>,
    /// The units this epoch holds (frozen).
    units: PageBits,
}

/// One epoch's regions (see the module documentation).
#[derive(Default)]
pub(crate) struct RegionCapture {
    parts: Vec<Part>,
    /// A full epoch lists every unit; those not taken are zero.
    full: bool,
    /// Units read while paused (`stop-copy`): each part's data, unit by unit.
    staged: Option<Vec<Vec<u8>>>,
    /// Already written to the epoch.
    written: bool,
}

impl RegionCapture {
    /// While paused: take each region's units for this epoch and freeze
    /// them. Returns the capture and the units taken (what a failed epoch
    /// hands back).
    pub(crate) fn take(
        regions: &[Arc<dyn Region>],
        full: bool,
    ) -> Result<(RegionCapture, Vec<PageBits>), EpochFailure> {
        let mut parts = Vec::with_capacity(regions.len());
        for r in regions {
            let dirty = r.take_dirty();
            let units = if full {
                r.populated().map_err(|source| EpochFailure::Region {
                    region: r.info().name,
                    source,
                })?
            } else {
                dirty
            };
            parts.push(Part {
                region: r.clone(),
                units,
            });
        }
        let taken = parts.iter().map(|p| p.units.clone()).collect();
        for p in &parts {
            p.region.freeze(p.units.clone());
        }
        Ok((
            RegionCapture {
                parts,
                full,
                staged: None,
                written: false,
            },
            taken,
        ))
    }

    /// `stop-copy`: read every frozen unit now, while paused.
    pub(crate) fn stage(&mut self) -> Result<(), EpochFailure> {
        let mut staged = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            let mut buf = vec![0u8; (p.units.count() * UNIT) as usize];
            let mut at = 0;
            for (first, n) in p.units.runs() {
                let len = (n * UNIT) as usize;
                p.region
                    .read_frozen(first, &mut buf[at..at + len])
                    .map_err(|source| EpochFailure::Region {
                        region: p.region.info().name,
                        source,
                    })?;
                at += len;
            }
            staged.push(buf);
        }
        self.staged = Some(staged);
        Ok(())
    }

    /// Write every region's units to the epoch (after RAM's pages).
    pub(crate) fn write(&mut self, w: &mut EpochWriter) -> Result<(), EpochFailure> {
        if self.written {
            return Ok(());
        }
        let mut buf = vec![0u8; (CHUNK_UNITS * UNIT) as usize];
        for (i, p) in self.parts.iter().enumerate() {
            let region = i + 1;
            let staged = self.staged.as_ref().map(|s| &s[i][..]);
            let mut at = 0usize;
            let mut next = 0u64;
            for (first, n) in p.units.runs() {
                if self.full && first > next {
                    w.zero_pages(unit_addr(region, next), first - next)?;
                }
                let mut u = first;
                while u < first + n {
                    let k = (first + n - u).min(CHUNK_UNITS);
                    let len = (k * UNIT) as usize;
                    let data = match staged {
                        Some(s) => &s[at..at + len],
                        None => {
                            p.region
                                .read_frozen(u, &mut buf[..len])
                                .map_err(|source| EpochFailure::Region {
                                    region: p.region.info().name,
                                    source,
                                })?;
                            &buf[..len]
                        }
                    };
                    write_units(w, unit_addr(region, u), data)?;
                    at += len;
                    u += k;
                }
                next = first + n;
            }
            if self.full && p.units.pages() > next {
                w.zero_pages(unit_addr(region, next), p.units.pages() - next)?;
            }
        }
        self.written = true;
        Ok(())
    }

    /// Write what is left of the regions and commit the epoch.
    pub(crate) fn commit(mut self, mut w: EpochWriter, pause_ns: u64) -> Result<EpochInfo, EpochFailure> {
        self.write(&mut w)?;
        Ok(w.commit(pause_ns)?)
    }
}

impl Drop for RegionCapture {
    fn drop(&mut self) {
        for p in &self.parts {
            p.region.thaw();
        }
    }
}

/// Write the units of `data` from unit address `addr`: runs of data units
/// as data, all-zero units as zero extents.
fn write_units(w: &mut EpochWriter, addr: u64, data: &[u8]) -> Result<(), EpochFailure> {
    let unit = UNIT as usize;
    let n = data.len() / unit;
    let zero = |i: usize| is_zero(&data[i * unit..(i + 1) * unit]);
    let mut i = 0;
    while i < n {
        let kind = zero(i);
        let mut end = i + 1;
        while end < n && zero(end) == kind {
            end += 1;
        }
        if kind {
            w.zero_pages(addr + i as u64, (end - i) as u64)?;
        } else {
            w.data_pages(addr + i as u64, &data[i * unit..end * unit])?;
        }
        i = end;
    }
    Ok(())
}
