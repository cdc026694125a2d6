//! Checking a whole store: every checksum, every index, every chain
//! (`consnap verify`), and which epochs restore ([`assess`]: the one answer
//! of `ls`, `verify`, `inspect` and `restore`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::codec::{Codec, Decompressor};
use crate::error::{Result, StoreError};
use crate::format::PAGE;
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
    /// Problems, in file order, then the epochs that do not restore.
    pub problems: Vec<Problem>,
    /// Epochs that restore.
    pub restorable: u64,
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

/// Check every page of `r`, reading DATA in order: the data pages whose
/// checksum fails (ascending) go to `bad`, the first few to `problems`.
/// Returns the bytes read.
fn check_pages(r: &EpochReader, problems: &mut Vec<Problem>, bad_pages: &mut Vec<u64>) -> Result<u64> {
    let h = r.header();
    let data_at = h.sections[3].offset;
    let mut bad = 0usize;
    let mut note = |e: StoreError, first: u64, count: u64, problems: &mut Vec<Problem>| {
        bad += 1;
        bad_pages.extend(first..first + count);
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
                    note(e, page + i as u64, 1, problems);
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
                            note(e, first + i as u64, 1, problems);
                        }
                    }
                }
                Err(e @ StoreError::Corrupt { .. }) => note(e, first, u64::from(f.pages), problems),
                Err(e) => return Err(e),
            }
            first += u64::from(f.pages);
        }
    }
    if bad > MAX_PAGE_PROBLEMS {
        problems.push(Problem {
            path: r.path().to_path_buf(),
            what: format!("{} more damaged pages or frames", bad - MAX_PAGE_PROBLEMS),
        });
    }
    Ok(h.sections[3].len)
}

/// Check every byte of the store at `dir`: STORE, RECLAIM, each epoch's
/// header, padding, sections, frames and pages, and which epochs restore
/// ([`assess`]: each problem of a file, then each epoch that does not
/// restore, and why). `progress` gets epochs done and the total. Fails only
/// when `dir` is not a store at all.
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
    let health = assess(&store, Depth::Pages, progress)?;
    v.restorable = health.restorable().count() as u64;
    v.epochs = health.files;
    v.bytes = health.bytes;
    v.problems.extend(health.problems);
    for (id, verdict) in &health.epochs {
        if let Verdict::Fails(why) = verdict {
            v.problems.push(Problem {
                path: store.epoch_path(*id),
                what: format!("epoch {id} does not restore: {why}"),
            });
        }
    }
    Ok(v)
}

/// How much of a store [`assess`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Headers, indexes, the machine state and the chains: what a listing
    /// can afford; whether pages are intact stays unknown.
    Structure,
    /// All that and every page (as `verify` does).
    Pages,
}

/// Whether an epoch restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It restores: its chain has this many files, and everything a restore
    /// reads was checked (with [`Depth::Pages`]) or all but the pages
    /// (with [`Depth::Structure`]).
    Restores {
        /// Files a restore reads.
        chain: usize,
    },
    /// It does not, and why.
    Fails(String),
}

/// Which epochs of a store restore, as [`assess`] found.
#[derive(Debug, Default)]
pub struct Health {
    /// Epoch files opened.
    pub files: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Problems of single files, in file order.
    pub problems: Vec<Problem>,
    /// Every epoch's verdict.
    pub epochs: BTreeMap<u64, Verdict>,
    /// Whether pages were read.
    pub depth: Option<Depth>,
}

impl Health {
    /// The epochs that restore, oldest first.
    pub fn restorable(&self) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.epochs
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Restores { .. }))
            .map(|(id, _)| *id)
    }
}

/// What reading one epoch file found.
struct FileCheck {
    reader: EpochReader,
    state_ok: bool,
    /// Data pages whose checksum fails, ascending (with [`Depth::Pages`]).
    bad_pages: Vec<u64>,
}

/// Which epochs of `store` restore: the one answer `ls`, `verify`,
/// `inspect` and `restore` give. An epoch restores when its chain is
/// complete and consistent ([`Store::chain`]'s checks), its machine state
/// is intact, and (with [`Depth::Pages`]) every page its restore takes,
/// each from the newest epoch of the chain that has it, passes its
/// checksum: damage in an ancestor's page that a newer epoch replaced does
/// not matter, damage in one it still takes does. `progress` gets files
/// read and the total.
pub fn assess(store: &Store, depth: Depth, progress: &mut dyn FnMut(u64, u64)) -> Result<Health> {
    assess_ids(store, &store.ids()?, depth, progress)
}

/// [`assess`] for epoch `id` alone, reading only its chain's files.
pub fn assess_epoch(store: &Store, id: u64, depth: Depth) -> Result<Verdict> {
    let mut ids = vec![id];
    let mut at = id;
    // Parents are older (the walk checks it); a bad link ends the list and
    // the verdict names it.
    while let Ok(info) = store.info(at) {
        let h = &info.header;
        if h.is_full() || h.parent == 0 || h.parent >= at {
            break;
        }
        at = h.parent;
        ids.push(at);
    }
    ids.reverse();
    let health = assess_ids(store, &ids, depth, &mut |_, _| {})?;
    Ok(health
        .epochs
        .get(&id)
        .cloned()
        .unwrap_or(Verdict::Fails(format!("epoch {id} is not in the store"))))
}

fn assess_ids(store: &Store, ids: &[u64], depth: Depth, progress: &mut dyn FnMut(u64, u64)) -> Result<Health> {
    let mut health = Health {
        depth: Some(depth),
        ..Health::default()
    };
    let mut files: BTreeMap<u64, std::result::Result<FileCheck, String>> = BTreeMap::new();
    for (n, id) in ids.iter().enumerate() {
        progress(n as u64, ids.len() as u64);
        let path = store.epoch_path(*id);
        let reader = match store.open_epoch(*id) {
            Ok(r) => r,
            // Removed by a reclaiming writer since the listing: not a problem.
            Err(StoreError::NoEpoch { .. }) => continue,
            Err(e) => {
                health.problems.push(problem(&e, &path));
                files.insert(*id, Err(e.to_string()));
                continue;
            }
        };
        health.files += 1;
        let state_ok = match reader.state() {
            Ok(_) => true,
            Err(e) => {
                health.problems.push(problem(&e, &path));
                false
            }
        };
        let mut bad_pages = Vec::new();
        let rest = reader.file_len() - reader.header().sections[3].len;
        if depth == Depth::Pages {
            match check_pages(&reader, &mut health.problems, &mut bad_pages) {
                Ok(b) => health.bytes += b + rest,
                Err(e) => {
                    health.problems.push(problem(&e, &path));
                    bad_pages.extend(0..reader.header().pages_data);
                }
            }
        } else {
            health.bytes += rest;
        }
        files.insert(
            *id,
            Ok(FileCheck {
                reader,
                state_ok,
                bad_pages,
            }),
        );
    }
    progress(ids.len() as u64, ids.len() as u64);
    for id in files.keys() {
        health.epochs.insert(*id, verdict(store, *id, &files));
    }
    Ok(health)
}

/// `its parent epoch P` or `its ancestor (the parent of epoch C) epoch P`,
/// for the verdict on epoch `id`.
fn link_name(id: u64, child: u64, parent: u64) -> String {
    if child == id {
        format!("its parent epoch {parent}")
    } else {
        format!("its ancestor (the parent of epoch {child}) epoch {parent}")
    }
}

/// Whether epoch `id` restores, from what reading the files found.
fn verdict(store: &Store, id: u64, files: &BTreeMap<u64, std::result::Result<FileCheck, String>>) -> Verdict {
    // The link being opened: (child, parent); the first open has no child.
    let mut link = (id, id);
    let open = |i: u64| {
        link = (link.1, i);
        match files.get(&i) {
            Some(Ok(f)) => Ok(&f.reader),
            Some(Err(why)) => Err(StoreError::Corrupt {
                path: store.epoch_path(i),
                why: why.clone(),
            }),
            None => Err(StoreError::NoEpoch {
                dir: store.dir().to_path_buf(),
                id: i,
            }),
        }
    };
    let readers = store.walk_chain(id, open);
    let (child, parent) = link;
    let chain: Vec<&FileCheck> = match readers {
        Ok(readers) => readers
            .iter()
            .filter_map(|r| files.get(&r.header().id).and_then(|f| f.as_ref().ok()))
            .collect(),
        Err(StoreError::Corrupt { .. }) if parent != id => {
            return Verdict::Fails(format!("{} is damaged", link_name(id, child, parent)));
        }
        Err(StoreError::MissingParent { id: c, parent: p, .. }) => {
            return Verdict::Fails(format!("{} is missing", link_name(id, c, p)));
        }
        Err(StoreError::Mismatch { why, .. }) if parent != id => {
            return Verdict::Fails(format!(
                "{} describes another machine: {why}",
                link_name(id, child, parent)
            ));
        }
        Err(e) => return Verdict::Fails(e.to_string()),
    };
    if !chain[0].state_ok {
        return Verdict::Fails("its machine state is damaged".into());
    }
    let readers: Vec<&EpochReader> = chain.iter().map(|f| &f.reader).collect();
    let runs = match plan(&readers) {
        Ok(r) => r,
        Err(e) => return Verdict::Fails(e.to_string()),
    };
    for run in runs {
        let Source::Data { epoch, page } = run.source else {
            continue;
        };
        let bad = &chain[epoch].bad_pages;
        let first_bad = bad.partition_point(|b| *b < page);
        if let Some(b) = bad.get(first_bad).filter(|b| **b < page + run.count) {
            let from = chain[epoch].reader.header().id;
            return Verdict::Fails(format!(
                "it takes data page {b}{} of epoch {from}, which fails its checksum",
                chain[epoch].reader.describe_page(*b)
            ));
        }
    }
    Verdict::Restores { chain: chain.len() }
}
