//! Store round trips and damage detection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use store::{Access, PAGE, Store, StoreError};

mod common;

use common::{TestDir, meta, page, three_epochs};

/// A scratch directory and a store path in it, named for the test.
fn tempdir(name: &str) -> (TestDir, PathBuf) {
    common::tempdir(&format!("store-{name}"))
}

/// State and image of epoch `id` of the 8-page guest.
fn materialize(s: &Store, id: u64) -> (Vec<u8>, Vec<u8>) {
    common::image(s, id, 8)
}

fn first_bytes(mem: &[u8]) -> Vec<u8> {
    mem.chunks(PAGE).map(|p| p[0]).collect()
}

#[test]
fn chains_restore_every_epoch_exactly() {
    let (_dir_guard, dir) = tempdir("chain");
    let s = three_epochs(&dir);
    assert_eq!(s.ids().unwrap(), vec![1, 2, 3]);
    assert_eq!(s.latest().unwrap(), 3);
    assert_eq!(s.next_id().unwrap(), 4);
    let (st, m) = materialize(&s, 1);
    assert_eq!(
        (st.as_slice(), first_bytes(&m)),
        (&b"state-1"[..], vec![1, 1, 0, 0, 2, 2, 2, 0])
    );
    let (st, m) = materialize(&s, 2);
    assert_eq!(
        (st.as_slice(), first_bytes(&m)),
        (&b"state-2"[..], vec![1, 9, 0, 0, 0, 2, 2, 0])
    );
    let (st, m) = materialize(&s, 3);
    assert_eq!(
        (st.as_slice(), first_bytes(&m)),
        (&b"state-3"[..], vec![1, 9, 7, 7, 0, 2, 2, 0])
    );
    let listed = s.list().unwrap();
    assert_eq!(listed.len(), 3);
    let h = &listed[2].1.as_ref().unwrap().header;
    assert_eq!((h.parent, h.pages_data, h.pause_ns, h.progress), (2, 2, 30, 3));
}

#[test]
fn files_are_private() {
    let (_dir_guard, dir) = tempdir("perms");
    let s = three_epochs(&dir);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("epochs")), 0o700);
    assert_eq!(mode(&dir.join("STORE")), 0o600);
    assert_eq!(mode(&s.epoch_path(2)), 0o600);
}

#[test]
fn uncommitted_epochs_stay_invisible() {
    let (_dir_guard, dir) = tempdir("uncommitted");
    let s = three_epochs(&dir);
    {
        let mut w = s.writer(meta(4, Some(3))).unwrap();
        w.write_state(b"never").unwrap();
        w.scattered_pages(&[0], &page(5)).unwrap();
        // Dropped without commit, as when the write fails or the process dies.
    }
    assert_eq!(s.ids().unwrap(), vec![1, 2, 3]);
    // A leftover temporary file (a crash mid-write) is ignored, then cleaned.
    std::fs::write(dir.join("epochs/.tmp-00000000000000000004"), b"partial").unwrap();
    assert_eq!(s.ids().unwrap(), vec![1, 2, 3]);
    drop(s);
    let _s = Store::open_or_create(&dir).unwrap();
    assert!(!dir.join("epochs/.tmp-00000000000000000004").exists());
}

#[test]
fn writer_lock_is_exclusive() {
    let (_dir_guard, dir) = tempdir("lock");
    let s = three_epochs(&dir);
    assert!(matches!(Store::open(&dir, Access::Write), Err(StoreError::Busy(_))));
    assert!(Store::open(&dir, Access::Read).is_ok(), "readers do not need the lock");
    drop(s);
    assert!(Store::open(&dir, Access::Write).is_ok());
}

#[test]
fn damage_is_detected_and_named() {
    let (_dir_guard, dir) = tempdir("damage");
    let s = three_epochs(&dir);
    let p3 = s.epoch_path(3);
    let good = std::fs::read(&p3).unwrap();

    // A flipped bit in a data page: the page fails its checksum on read.
    let mut bad = good.clone();
    bad[4096 * 2 + 10] ^= 0x40;
    std::fs::write(&p3, &bad).unwrap();
    let chain = s.chain(3).unwrap();
    let mut buf = vec![0u8; PAGE];
    let err = chain[0].read_pages(0, &mut buf).unwrap_err().to_string();
    assert!(
        err.contains("00000000000000000003.epoch")
            && err.contains("data page 0 (guest frame 0x2, file offset 8192) fails its checksum"),
        "{err}"
    );

    // Truncation.
    std::fs::write(&p3, &good[..good.len() - 5]).unwrap();
    let err = s.open_epoch(3).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    std::fs::write(&p3, &good[..100]).unwrap();
    assert!(s.open_epoch(3).unwrap_err().to_string().contains("truncated header"));

    // A damaged header, a damaged state, a wrong version.
    let mut bad = good.clone();
    bad[20] ^= 1;
    std::fs::write(&p3, &bad).unwrap();
    assert!(
        s.open_epoch(3)
            .unwrap_err()
            .to_string()
            .contains("header checksum mismatch")
    );
    let mut bad = good.clone();
    bad[4096] ^= 1;
    std::fs::write(&p3, &bad).unwrap();
    assert!(
        s.open_epoch(3)
            .unwrap()
            .state()
            .unwrap_err()
            .to_string()
            .contains("STATE section checksum")
    );
    let mut bad = good.clone();
    bad[8] = 9;
    std::fs::write(&p3, &bad).unwrap();
    assert!(matches!(s.open_epoch(3), Err(StoreError::Version { found: 9, .. })));

    // A missing parent breaks the chain with a clear message.
    std::fs::write(&p3, &good).unwrap();
    std::fs::rename(s.epoch_path(2), dir.join("moved")).unwrap();
    let err = s.chain(3).unwrap_err().to_string();
    assert!(err.contains("epoch 3 needs its parent epoch 2"), "{err}");
    assert!(matches!(s.open_epoch(2), Err(StoreError::NoEpoch { id: 2, .. })));
    std::fs::rename(dir.join("moved"), s.epoch_path(2)).unwrap();

    // Reading never modified anything.
    assert_eq!(std::fs::read(&p3).unwrap(), good);
    assert_eq!(materialize(&s, 3).1[2 * PAGE], 7);
}

#[test]
fn foreign_and_empty_directories() {
    let (_dir_guard, dir) = tempdir("foreign");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), b"hello").unwrap();
    let err = Store::open_or_create(&dir).unwrap_err().to_string();
    assert!(err.contains("not a consnap snapshot directory"), "{err}");
    let (_empty_guard, empty) = tempdir("empty");
    let s = Store::open_or_create(&empty).unwrap();
    assert!(matches!(s.latest(), Err(StoreError::Empty(_))));
    // An epoch copied in from another store is refused.
    let (_other_guard, other_dir) = tempdir("other");
    let other = three_epochs(&other_dir);
    std::fs::copy(other.epoch_path(1), s.epoch_path(1)).unwrap();
    assert!(s.open_epoch(1).unwrap_err().to_string().contains("another store"));
}

#[test]
fn an_epoch_without_pages_reads_back() {
    // An incremental epoch of an idle guest has state and no dirty pages.
    let (_dir_guard, dir) = tempdir("no-pages");
    let s = three_epochs(&dir);
    let mut w = s.writer(meta(4, Some(3))).unwrap();
    w.write_state(b"state-4").unwrap();
    w.commit(40).unwrap();
    let e = s.open_epoch(4).unwrap();
    assert_eq!((e.header().pages_data, e.index().len()), (0, 0));
    assert!(s.list().unwrap().iter().all(|(_, r)| r.is_ok()), "ls shows it damaged");
    let (st, m) = materialize(&s, 4);
    assert_eq!(
        (st.as_slice(), first_bytes(&m)),
        (&b"state-4"[..], vec![1, 9, 7, 7, 0, 2, 2, 0])
    );
}

#[test]
fn data_and_zero_pages_interleave_in_one_call() {
    for (codec, direct) in [(None, false), (None, true), (Some(store::Codec::Zstd), false)] {
        let (_dir_guard, dir) = tempdir("interleave");
        let s = three_epochs(&dir);
        let mut w = s.writer(meta(4, Some(3))).unwrap();
        if direct {
            w.use_direct_io();
        }
        if let Some(c) = codec {
            w.compress(c).unwrap();
        }
        w.write_state(b"state-4").unwrap();
        let refused = |w: &mut store::EpochWriter, gfns: &[u64], n: usize, zeros: &[u64]| {
            let r = w.pages_with_zeros(gfns, &vec![1u8; n * PAGE], zeros);
            assert!(matches!(r, Err(StoreError::Usage(_))), "{gfns:?} {zeros:?}: {r:?}");
        };
        refused(&mut w, &[2, 4], 2, &[4]);
        refused(&mut w, &[4, 2], 2, &[]);
        refused(&mut w, &[2], 2, &[3]);
        w.pages_with_zeros(
            &[0, 2, 3, 6],
            &[page(3), page(4), page(5), page(6)].concat(),
            &[1, 4, 7],
        )
        .unwrap();
        refused(&mut w, &[7], 1, &[]);
        let info = w.commit(40).unwrap();
        assert_eq!(
            (info.header.pages_data, info.header.pages_zero),
            (4, 3),
            "{codec:?} {direct}"
        );
        let (state, mem) = materialize(&s, 4);
        assert_eq!(state, b"state-4");
        let want: Vec<u8> = [3, 0, 4, 5, 0, 2, 6, 0].iter().flat_map(|&b| page(b)).collect();
        assert!(mem == want, "{codec:?} direct={direct}: restored pages differ");
    }
}
