//! Helpers of the store tests: restored-memory digests and what a
//! restore of an epoch reads.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use store::{Access, Codec, Source, Store};

/// A digest of the guest RAM and machine configuration epoch `id`
/// restores to, through the real restore path (without a VM).
pub fn digest(snaps: &Path, id: u64) -> Result<u64, String> {
    let store = Store::open(snaps, Access::Read).map_err(|e| e.to_string())?;
    let r = snapshot::restore_ram(&store, id, &mut |_, _| {}).map_err(|e| e.to_string())?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (r.state.config.mem_size, r.state.config.vcpus).hash(&mut h);
    let mut buf = vec![0u8; 1 << 20];
    for range in r.ram.ranges() {
        let mut at = 0;
        while at < range.len {
            let n = (range.len - at).min(buf.len() as u64) as usize;
            r.ram.read_to(range.gpa + at, &mut buf[..n]).unwrap();
            buf[..n].hash(&mut h);
            at += n as u64;
        }
    }
    Ok(h.finish())
}

/// Epoch ids in the store.
pub fn ids(snaps: &Path) -> Vec<u64> {
    Store::open(snaps, Access::Read).unwrap().ids().unwrap()
}

/// The committed epochs: (id, capture time ns), by id.
pub fn times(snaps: &Path) -> Vec<(u64, u64)> {
    let s = Store::open(snaps, Access::Read).unwrap();
    s.ids()
        .unwrap()
        .into_iter()
        .map(|id| (id, s.info(id).unwrap().header.created_ns))
        .collect()
}

/// Every file of the store (STORE, RECLAIM, epochs), sorted.
pub fn files(snaps: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(snaps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.extend(
        std::fs::read_dir(snaps.join("epochs"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file()),
    );
    v.sort();
    v
}

/// The byte ranges of each file that a restore of epoch `id` reads and
/// checks: every byte of each chain file but the page data it does not
/// take (superseded pages, and compressed frames without a page it takes).
pub fn needed(snaps: &Path, id: u64) -> BTreeMap<PathBuf, Vec<(u64, u64)>> {
    let store = Store::open(snaps, Access::Read).unwrap();
    let chain = store.chain(id).unwrap();
    let runs = store::plan(&chain).unwrap();
    let mut out: BTreeMap<PathBuf, Vec<(u64, u64)>> = BTreeMap::new();
    for (i, e) in chain.iter().enumerate() {
        let h = e.header();
        let data = h.sections[3];
        let v = out.entry(e.path().to_path_buf()).or_default();
        // Only the restored epoch's own state is read.
        let state = h.sections[0];
        if i == 0 || state.len == 0 {
            v.push((0, data.offset));
        } else {
            v.push((0, state.offset));
            v.push((state.end(), data.offset));
        }
        v.push((data.end(), e.file_len()));
    }
    for run in runs {
        let Source::Data { epoch, page } = run.source else {
            continue;
        };
        let e = &chain[epoch];
        let h = e.header();
        let data = h.sections[3].offset;
        let v = out.get_mut(e.path()).unwrap();
        if h.codec == Codec::None {
            v.push((data + page * 4096, data + (page + run.count) * 4096));
        } else {
            let mut p = page;
            while p < page + run.count {
                let (fi, f0) = e.frame_of(p).unwrap();
                let f = e.frames()[fi];
                v.push((data + f.offset, data + f.offset + u64::from(f.len)));
                p = f0 + u64::from(f.pages);
            }
        }
    }
    out
}

/// True when `(file, offset)` is inside `needed`.
pub fn is_needed(needed: &BTreeMap<PathBuf, Vec<(u64, u64)>>, file: &Path, offset: u64) -> bool {
    needed
        .get(file)
        .is_some_and(|v| v.iter().any(|&(a, b)| a <= offset && offset < b))
}
