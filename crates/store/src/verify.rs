//! Checking a whole store: every checksum, every index, every chain
//! (`consnap verify`), and checking that one epoch restores (everything a
//! restore reads, without building a machine).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::codec::{Codec, Decompressor};
use crate::cursor::PageCursor;
use crate::error::{Result, StoreError};
use crate::format::{Header, PAGE};
use crate::ledger::Ledger;
use crate::plan::{Source, plan};
use crate::reader::EpochReader;
use crate::store::{Access, Store};

/// One thing wrong with a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with the byte offsets concerned.
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)
    }
}

/// What [`verify`] found.
#[derive(Debug, Default)]
pub struct Verified {
    /// Epoch files checked.
    pub epochs: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Problems, in file order.
    pub problems: Vec<Problem>,
    /// Leftovers of writers (temporary files): not problems, the next
    /// writer removes them.
    pub notes: Vec<String>,
}

/// Most damaged pages listed per file.
const MAX_PAGE_PROBLEMS: usize = 16;

fn problem(e: &StoreError, path: &Path) -> Problem {
    // Messages of Corrupt and Mismatch already start with the path.
    let text = e.to_string();
    let prefix = format!("{}: ", path.display());
    Problem {
        path: path.to_path_buf(),
        what: text.strip_prefix(&prefix).unwrap_or(&text).to_string(),
    }
}

/// Check every page of `r`, reading DATA in order; returns bytes read.
fn check_pages(r: &EpochReader, problems: &mut Vec<Problem>) -> Result<u64> {
    let h = r.header();
    let data_at = h.sections[3].offset;
    let mut bad = 0usize;
    let mut note = |e: StoreError, problems: &mut Vec<Problem>| {
        bad += 1;
        if bad <= MAX_PAGE_PROBLEMS {
            problems.push(problem(&e, r.path()));
        }
    };
    if h.codec == Codec::None {
        let chunk = 2048u64;
        let mut buf = vec![0u8; chunk as usize * PAGE];
        let mut page = 0;
        while page < h.pages_data {
            let n = chunk.min(h.pages_data - page);
            let b = &mut buf[..n as usize * PAGE];
            r.read_raw(b, data_at + page * PAGE as u64)?;
            for (i, p) in b.chunks_exact(PAGE).enumerate() {
                if let Err(e) = r.verify(page + i as u64, p) {
                    note(e, problems);
                }
            }
            page += n;
        }
    } else {
        let mut raw = Vec::new();
        let mut out = Vec::new();
        let mut dec = Decompressor::default();
        let mut first = 0u64;
        for (fi, f) in r.frames().iter().enumerate() {
            out.resize(f.pages as usize * PAGE, 0);
            match r.read_frame(fi, &mut raw, &mut out, &mut dec) {
                Ok(()) => {
                    for (i, p) in out.chunks_exact(PAGE).enumerate() {
                        if let Err(e) = r.verify(first + i as u64, p) {
                            note(e, problems);
                        }
                    }
                }
                Err(e @ StoreError::Corrupt { .. }) => note(e, problems),
                Err(e) => return Err(e),
            }
            first += u64::from(f.pages);
        }
    }
    if bad > MAX_PAGE_PROBLEMS {
        problems.push(Problem {
            path: r.path().to_path_buf(),
            what: format!("{} more damaged pages", bad - MAX_PAGE_PROBLEMS),
        });
    }
    Ok(h.sections[3].len)
}

/// Check every byte of the store at `dir`: STORE, RECLAIM, each epoch's
/// header, padding, sections, frames and pages, and each chain (parents
/// present and describing the same machine). `progress` gets epochs done
/// and the total. Fails only when `dir` is not a store at all.
pub fn verify(dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Verified> {
    let store = Store::open(dir, Access::Read)?;
    let mut v = Verified::default();
    if let Err(e) = Ledger::load(dir) {
        let path = dir.join(crate::ledger::LEDGER_FILE);
        v.problems.push(problem(&e, &path));
    }
    for s in store.strays()? {
        v.problems.push(Problem {
            path: s.path,
            what: s.why,
        });
    }
    let epochs_dir = dir.join("epochs");
    if let Ok(rd) = std::fs::read_dir(&epochs_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                v.notes.push(format!(
                    "{}: an epoch being written, or left by a crash (the next writer removes it)",
                    e.path().display()
                ));
            }
        }
    }
    let ids = store.ids()?;
    let mut heads: BTreeMap<u64, Option<Header>> = BTreeMap::new();
    for (n, id) in ids.iter().enumerate() {
        progress(n as u64, ids.len() as u64);
        let path = store.epoch_path(*id);
        let r = match store.open_epoch(*id) {
            Ok(r) => r,
            // Removed by a reclaiming writer since the listing: not a problem.
            Err(StoreError::NoEpoch { .. }) => continue,
            Err(e) => {
                v.problems.push(problem(&e, &path));
                heads.insert(*id, None);
                continue;
            }
        };
        v.epochs += 1;
        let before = v.problems.len();
        if let Err(e) = r.state() {
            v.problems.push(problem(&e, &path));
        }
        match check_pages(&r, &mut v.problems) {
            Ok(b) => v.bytes += b + r.file_len() - r.header().sections[3].len,
            Err(e) => v.problems.push(problem(&e, &path)),
        }
        let ok = v.problems.len() == before;
        heads.insert(*id, ok.then(|| r.header().clone()));
    }
    progress(ids.len() as u64, ids.len() as u64);
    for (id, h) in &heads {
        let Some(h) = h else { continue };
        if h.is_full() {
            continue;
        }
        let path = store.epoch_path(*id);
        let what = match heads.get(&h.parent) {
            None if store.epoch_path(*id).exists() => format!("its parent epoch {} is missing", h.parent),
            None => continue,
            Some(None) => format!("its parent epoch {} is damaged", h.parent),
            Some(Some(p)) if h.parent_mismatch(p).is_some() => format!(
                "its parent epoch {} describes another machine ({} bytes of RAM, {} vCPUs and {}, not {}, {} and {})",
                h.parent,
                p.mem_size,
                p.vcpus,
                crate::format::describe_regions(&p.regions),
                h.mem_size,
                h.vcpus,
                crate::format::describe_regions(&h.regions)
            ),
            Some(Some(_)) => continue,
        };
        v.problems.push(Problem { path, what });
    }
    Ok(v)
}

/// Read and check everything a restore of epoch `id` reads: the chain's
/// headers, padding, indexes, the state, and every page the plan takes
/// (each from the newest epoch that has it). Returns the chain length.
pub fn check_restore(store: &Store, id: u64) -> Result<usize> {
    let chain = store.chain(id)?;
    chain[0].state()?;
    let runs = plan(&chain)?;
    let mut cursors: Vec<PageCursor<'_>> = chain.iter().map(|e| PageCursor::new(e, 256)).collect();
    for run in runs {
        if let Source::Data { epoch, page } = run.source {
            let mut done = 0;
            while done < run.count {
                let n = (run.count - done).min(256);
                cursors[epoch].pages(page + done, n)?;
                done += n;
            }
        }
    }
    Ok(chain.len())
}
