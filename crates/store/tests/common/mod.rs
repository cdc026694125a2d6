//! Helpers shared by the store's integration tests: a scratch directory per
//! test, and a small store of three epochs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use store::{EpochMeta, Mode, PAGE, Source, Store, plan};

// The test helpers of vmm (std and libc only), without depending on vmm.
#[path = "../../../vmm/src/testing.rs"]
mod testing;

// Not every test file uses both.
#[allow(unused_imports)]
pub use testing::{Rng, TestDir};

/// A private directory for one test under Cargo's scratch directory
/// (removed when the test passes, kept and named when it fails), and a
/// path inside it for a store that does not exist yet.
pub fn tempdir(name: &str) -> (TestDir, PathBuf) {
    let t = TestDir::new(env!("CARGO_TARGET_TMPDIR"), name);
    let store = t.join("store");
    (t, store)
}

pub fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE]
}

/// Epoch `id` of an 8-page guest: full without a parent, incremental with one.
pub fn meta(id: u64, parent: Option<u64>) -> EpochMeta {
    EpochMeta {
        id,
        parent,
        mode: if parent.is_some() {
            Mode::StopCopy
        } else {
            Mode::StopCopyFull
        },
        full: parent.is_none(),
        created_ns: id * 1000,
        vcpus: 1,
        mem_size: 8 * PAGE as u64,
        progress: Some(id),
        regions: Vec::new(),
    }
}

/// A store at `dir` with three epochs of an 8-page guest.
/// Epoch 1: full, pages 0..8 = [1,1,0,0,2,2,2,0] (data 0..2, zero 2..4,
/// data 4..7, zero 7). Epoch 2 (parent 1): page 1 = 9, page 4 = zero.
/// Epoch 3 (parent 2): pages 2,3 = 7.
pub fn three_epochs(dir: &Path) -> Store {
    let s = Store::open_or_create(dir).expect("create the test store");
    let mut w = s.writer(meta(1, None)).expect("epoch 1");
    w.write_state(b"state-1").expect("state 1");
    w.data_pages(0, &[page(1), page(1)].concat()).expect("epoch 1 data");
    w.zero_pages(2, 2).expect("epoch 1 zero");
    w.data_pages(4, &[page(2), page(2), page(2)].concat())
        .expect("epoch 1 data");
    w.zero_pages(7, 1).expect("epoch 1 zero");
    w.commit(10).expect("commit epoch 1");
    let mut w = s.writer(meta(2, Some(1))).expect("epoch 2");
    w.write_state(b"state-2").expect("state 2");
    w.scattered_pages(&[1], &page(9)).expect("epoch 2 data");
    w.zero_pages(4, 1).expect("epoch 2 zero");
    w.commit(20).expect("commit epoch 2");
    let mut w = s.writer(meta(3, Some(2))).expect("epoch 3");
    w.write_state(b"state-3").expect("state 3");
    w.scattered_pages(&[2, 3], &[page(7), page(7)].concat())
        .expect("epoch 3 data");
    w.commit(30).expect("commit epoch 3");
    s
}

/// The state and the memory image (`pages` pages) that restoring epoch
/// `id` of `s` gives, read through the restore plan. Bytes no epoch
/// covers stay 0xee.
pub fn image(s: &Store, id: u64, pages: usize) -> (Vec<u8>, Vec<u8>) {
    let chain = s.chain(id).expect("open the chain");
    let mut mem = vec![0xeeu8; pages * PAGE];
    for run in plan(&chain).expect("plan the restore") {
        let dst = &mut mem[run.gfn as usize * PAGE..(run.gfn + run.count) as usize * PAGE];
        match run.source {
            Source::Zero => dst.fill(0),
            Source::Data { epoch, page } => chain[epoch].read_pages(page, dst).expect("read pages"),
        }
    }
    (chain[0].state().expect("read the state"), mem)
}
