//! The rules on sections, non-regular files, the STORE file and chains,
//! and what the writer and old stores do.

use super::*;

/// Run `f` on a thread; fail if it takes longer than 20 s (a reader blocked
/// on a FIFO would never return).
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} blocked for 20 s"))
}

#[test]
fn files_that_are_not_regular_files() {
    let (d, s) = build("fifos");
    let fifo = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
    };
    let p4 = s.epoch_path(4);
    fifo(&p4);
    let dir = d.1.clone();
    let err = within_deadline("listing a FIFO epoch", move || {
        let s = Store::open(&dir, Access::Read).unwrap();
        let listed = s.list().unwrap();
        let e = listed[3].1.as_ref().map(|_| ()).unwrap_err().to_string();
        let o = s.open_epoch(4).map(|_| ()).unwrap_err().to_string();
        (e, o)
    });
    for e in [err.0, err.1] {
        assert!(e.contains("00000000000000000004.epoch: not a regular file"), "{e}");
    }
    std::fs::remove_file(&p4).unwrap();
    drop(s);
    let store = d.1.join("STORE");
    std::fs::rename(&store, d.1.join("STORE.real")).unwrap();
    fifo(&store);
    let dir = d.1.clone();
    let err = within_deadline("opening a FIFO STORE", move || {
        Store::open(&dir, Access::Read).map(|_| ()).unwrap_err().to_string()
    });
    assert!(err.contains("STORE: not a regular file"), "{err}");
    std::fs::remove_file(&store).unwrap();
    std::fs::rename(d.1.join("STORE.real"), &store).unwrap();
}

#[test]
fn data_section_is_page_aligned() {
    let (_d, s) = build("aligned");
    refused_header(
        &s,
        1,
        |b| {
            let off = get64(b, entry(3) + 8);
            put64(b, entry(3) + 8, off + 8);
            reseal(b);
        },
        "DATA section starts at 8200, which is not a multiple of 4096",
    );
}

#[test]
fn sections_lie_inside_the_file() {
    let (_d, s) = build("bounds");
    refused_header(
        &s,
        1,
        |b| {
            let len = b.len() as u64;
            put64(b, entry(1) + 8, len);
            reseal(b);
        },
        "INDEX section",
    );
    refused_header(
        &s,
        1,
        |b| {
            let len = b.len();
            b.truncate(len - 1);
        },
        "lies outside the file",
    );
    refused_header(
        &s,
        1,
        |b| {
            put64(b, entry(0) + 8, 100);
            reseal(b);
        },
        "STATE section [100, +7) starts inside the 4096-byte header",
    );
}

#[test]
fn sections_do_not_overlap() {
    let (_d, s) = build("overlap");
    refused_header(
        &s,
        1,
        |b| {
            let (index_at, _) = section(b, 1);
            put64(b, entry(2) + 8, index_at as u64 + 8);
            reseal(b);
        },
        "overlaps PAGE_SUMS section",
    );
}

#[test]
fn data_entry_checksum_is_zero() {
    let (_d, s) = build("data-sum");
    refused_header(
        &s,
        2,
        |b| {
            put64(b, entry(3) + 24, 0x1234);
            reseal(b);
        },
        "the DATA section entry has checksum 0x1234 (must be 0",
    );
}

#[test]
fn section_checksums() {
    let (_d, s) = build("section-sums");
    refused(
        &s,
        1,
        |b| {
            let (off, _) = section(b, 1);
            b[off] ^= 1;
        },
        "INDEX section checksum mismatch",
    );
    refused(
        &s,
        1,
        |b| {
            let (off, len) = section(b, 2);
            b[off + len - 1] ^= 1;
        },
        "PAGE_SUMS section checksum mismatch (its block table)",
    );
    // A page checksum itself is covered by its block's entry in the table:
    // the epoch opens (the block is not read), and reading a page of the
    // block fails, naming it.
    let path = s.epoch_path(1);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[section(&good, 2).0 + 8] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let r = s.open_epoch(1).unwrap();
    let e = r.read_pages(4, &mut vec![0u8; PAGE]).unwrap_err().to_string();
    assert!(
        e.contains("00000000000000000001.epoch: page checksum block 0 (data pages 0..5"),
        "{e}"
    );
    let v = store::verify(s.dir(), &mut |_, _| {}).unwrap();
    assert!(
        v.problems
            .iter()
            .any(|p| format!("{p:?}").contains("page checksum block 0")),
        "{:?}",
        v.problems
    );
    std::fs::write(&path, &good).unwrap();
}

/// Rewrite epoch file `b` (version 4) as version `v` (1 to 3) wrote it:
/// PAGE_SUMS without the block table (its checksum over the page
/// checksums), the sections after it moved down, the header sealed again.
fn as_version(b: &mut Vec<u8>, v: u32) {
    let pages = get64(b, 88) as usize;
    let (at, len) = section(b, 2);
    let table = len - pages * 8;
    b.drain(at + pages * 8..at + len);
    for i in [0, 1, 3, 4] {
        let (off, _) = section(b, i);
        if off > at {
            put64(b, entry(i) + 8, (off - table) as u64);
        }
    }
    put64(b, entry(2) + 16, (pages * 8) as u64);
    let sum = checksum(&b[at..at + pages * 8]);
    put64(b, entry(2) + 24, sum);
    put32(b, 8, v);
    if v == 1 {
        // No FRAMES entry, frame count or merged count in version 1.
        b[256..304].fill(0);
    }
    reseal(b);
}

/// A store that an older consnap wrote (version 2: page checksums read
/// whole) restores and verifies as it is, and a damaged checksum in it is
/// still found.
#[test]
fn a_version_2_store_still_restores() {
    let (_d, s) = build("v2-store");
    let before: Vec<_> = (1..=3).map(|id| common::image(&s, id, 8)).collect();
    for id in 1..=3 {
        let path = s.epoch_path(id);
        let mut b = std::fs::read(&path).unwrap();
        as_version(&mut b, 2);
        std::fs::write(&path, &b).unwrap();
    }
    for id in 1..=3 {
        assert_eq!(s.open_epoch(id).unwrap().header().version, 2);
        assert_eq!(
            common::image(&s, id, 8),
            before[id as usize - 1],
            "epoch {id} of the v2 store"
        );
    }
    let v = store::verify(s.dir(), &mut |_, _| {}).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    refused(
        &s,
        1,
        |b| {
            let (off, _) = section(b, 2);
            b[off] ^= 1;
        },
        "PAGE_SUMS section checksum mismatch (bytes",
    );
}

#[test]
fn store_uuid_equals_the_store_file() {
    let (_d, s) = build("uuid");
    refused_header(
        &s,
        2,
        |b| {
            b[32] ^= 1;
            reseal(b);
        },
        "epoch belongs to another store",
    );
}

#[test]
fn a_chain_describes_one_machine() {
    let (_d, s) = build("one-machine");
    let path = s.epoch_path(2);
    let good = std::fs::read(&path).unwrap();
    for (at, v, needle) in [
        (
            68,
            2u64,
            "epoch 2 has 32768 bytes of RAM and 2 vCPUs but its parent epoch 1 has 32768 bytes and 1",
        ),
        (
            72,
            16 * 4096,
            "epoch 2 has 65536 bytes of RAM and 1 vCPUs but its parent epoch 1 has 32768 bytes and 1",
        ),
    ] {
        let mut b = good.clone();
        if at == 68 {
            put32(&mut b, at, v as u32);
        } else {
            put64(&mut b, at, v);
        }
        reseal(&mut b);
        std::fs::write(&path, &b).unwrap();
        s.open_epoch(2).unwrap();
        let err = s.chain(2).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
        assert!(err.contains("00000000000000000001.epoch"), "{err}");
    }
    std::fs::write(&path, &good).unwrap();
}

#[test]
fn store_file_rules() {
    let (d, s) = build("store-file");
    drop(s);
    let path = d.1.join("STORE");
    let good = std::fs::read(&path).unwrap();
    let reseal_store = |b: &mut Vec<u8>| {
        let sum = checksum(&b[..56]);
        put64(b, 56, sum);
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..63].to_vec(), "STORE is 63 bytes long, not 64"),
        (
            [good.clone(), vec![0]].concat(),
            "STORE is longer than 64 bytes, not 64",
        ),
        (
            {
                let mut b = good.clone();
                b[0] = b'X';
                reseal_store(&mut b);
                b
            },
            "does not start with \"CSNPSTOR\"",
        ),
        (
            {
                let mut b = good.clone();
                put32(&mut b, 8, 7);
                reseal_store(&mut b);
                b
            },
            "format version 7 is not supported",
        ),
        (
            {
                let mut b = good.clone();
                b[20] ^= 1;
                b
            },
            "STORE checksum mismatch",
        ),
    ];
    for (bytes, needle) in cases {
        std::fs::write(&path, &bytes).unwrap();
        for access in [Access::Read, Access::Write] {
            let err = Store::open(&d.1, access).unwrap_err().to_string();
            assert!(err.contains(needle), "expected '{needle}' in: {err}");
            assert!(err.contains("STORE"), "{err}");
        }
    }
    std::fs::write(&path, &good).unwrap();
    // Reserved fields are ignored (FORMAT.md, Versioning).
    let mut b = good.clone();
    b[12] = 1;
    b[45] = 1;
    reseal_store(&mut b);
    std::fs::write(&path, &b).unwrap();
    Store::open(&d.1, Access::Read).unwrap();
}

#[test]
fn the_writer_refuses_what_the_reader_refuses() {
    let (_d, s) = build("writer");
    let bad = [
        EpochMeta {
            full: true,
            ..meta(4, Some(3))
        },
        EpochMeta {
            full: false,
            ..meta(4, None)
        },
        meta(4, Some(4)),
        EpochMeta {
            vcpus: 0,
            ..meta(4, None)
        },
        EpochMeta {
            mem_size: 4097,
            ..meta(4, None)
        },
    ];
    for m in bad {
        assert!(s.writer(m.clone()).is_err(), "{m:?} accepted");
    }
}

#[test]
fn a_huge_section_is_an_error_not_an_abort() {
    // A sparse file whose STATE section claims 4 TiB: inside the file, so
    // the layout is valid, but no host allocates it.
    let (_d, s) = build("huge-state");
    let path = s.epoch_path(3);
    let good = std::fs::read(&path).unwrap();
    // Rebuild the file as header, DATA, INDEX, PAGE_SUMS, FRAMES, then the
    // STATE section at the next page boundary, so that every other rule holds.
    let (data_at, data_len) = section(&good, 3);
    let rest = good[data_at + data_len..].to_vec();
    let mut b = good[..4096].to_vec();
    b.extend_from_slice(&good[data_at..data_at + data_len]);
    let shift = data_at - 4096;
    for i in [1, 2, 4] {
        let (off, _) = section(&good, i);
        put64(&mut b, entry(i) + 8, (off - shift) as u64);
    }
    put64(&mut b, entry(3) + 8, 4096);
    b.extend_from_slice(&rest);
    let at = (b.len() as u64).next_multiple_of(4096);
    let len = 4u64 << 40;
    put64(&mut b, entry(0) + 8, at);
    put64(&mut b, entry(0) + 16, len);
    reseal(&mut b);
    std::fs::write(&path, &b).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    if let Err(e) = f.set_len(at + len) {
        eprintln!("skipping: this file system has no 4 TiB sparse files ({e})");
        return;
    }
    let err = s.open_epoch(3).unwrap().state().unwrap_err().to_string();
    assert!(
        err.contains("00000000000000000003.epoch: a section of 4398046511104 bytes does not fit in memory"),
        "{err}"
    );
}

#[test]
fn crafted_headers_and_indexes_never_panic() {
    // Every byte of the used header and of each INDEX, set to a few values,
    // checksums made right again: the reader refuses or accepts, never panics,
    // and whatever it accepts restores every page of RAM exactly once.
    let (_d, s) = build("never-panic");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for id in 1..=3 {
        let path = s.epoch_path(id);
        let good = std::fs::read(&path).unwrap();
        let (index_at, index_len) = section(&good, 1);
        let spots: Vec<usize> = (0..256).chain(index_at..index_at + index_len).collect();
        for at in spots {
            for v in [0u8, 0xff, next() as u8] {
                let mut b = good.clone();
                b[at] = v;
                if at >= index_at {
                    reseal_index(&mut b);
                } else {
                    reseal(&mut b);
                }
                std::fs::write(&path, &b).unwrap();
                let _ = s.list().unwrap();
                if let Ok(chain) = s.chain(3) {
                    let runs = store::plan(&chain).unwrap();
                    let pages: u64 = runs.iter().map(|r| r.count).sum();
                    assert_eq!(pages, 8, "epoch {id} byte {at} = {v:#x}: {runs:?}");
                }
            }
        }
        std::fs::write(&path, &good).unwrap();
    }
}

/// A version 1 store (no compression, page checksums read whole:
/// docs/FORMAT.md) opens, restores and verifies as it is, takes new
/// version 4 epochs, and its epochs become version 4 when reclamation
/// rewrites them.
#[test]
fn a_version_1_store_is_read_extended_and_upgraded_by_reclamation() {
    let (dir, s) = build("v1-store");
    let image = |s: &Store, id: u64| common::image(s, id, 8);
    let before: Vec<_> = (1..=3).map(|id| image(&s, id)).collect();
    drop(s);
    // Make it what an older consnap wrote: version 1 in STORE and in
    // every epoch header, checksums sealed again.
    let store_file = dir.1.join("STORE");
    let mut b = std::fs::read(&store_file).unwrap();
    put32(&mut b, 8, 1);
    let sum = checksum(&b[..56]);
    put64(&mut b, 56, sum);
    std::fs::write(&store_file, &b).unwrap();
    let probe = Store::open(&dir.1, Access::Read).unwrap();
    for id in 1..=3 {
        let path = probe.epoch_path(id);
        let mut b = std::fs::read(&path).unwrap();
        as_version(&mut b, 1);
        std::fs::write(&path, &b).unwrap();
    }
    drop(probe);

    let r = Store::open(&dir.1, Access::Read).unwrap();
    for id in 1..=3 {
        assert_eq!(r.open_epoch(id).unwrap().header().version, 1);
        assert_eq!(image(&r, id), before[id as usize - 1], "epoch {id} of the v1 store");
    }
    let v = store::verify(&dir.1, &mut |_, _| {}).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    drop(r);

    let w = Store::open_or_create(&dir.1).unwrap();
    let mut e = w.writer(meta(4, Some(3))).unwrap();
    e.write_state(b"state-4").unwrap();
    e.scattered_pages(&[5], &vec![4u8; PAGE]).unwrap();
    e.commit(40).unwrap();
    assert_eq!(w.open_epoch(4).unwrap().header().version, 4, "new epochs are version 4");
    let four = image(&w, 4);
    assert_eq!(four.1[5 * PAGE], 4);
    // Folding every chain to one file rewrites the v1 epochs as v4.
    let opts = store::ReclaimOptions {
        policy: store::Policy::keep_all(),
        max_chain: 1,
        rate: None,
        codec: None,
        batch_merges: false,
        ..Default::default()
    };
    store::reclaim(
        &w,
        &opts,
        &[],
        &std::sync::atomic::AtomicBool::new(false),
        &mut |_, _| {},
    )
    .unwrap();
    for id in 1..=4 {
        let h = w.open_epoch(id).unwrap().header().clone();
        assert!(h.is_full(), "epoch {id} not folded");
        if id > 1 {
            assert_eq!(h.version, 4, "epoch {id} rewritten as v1");
        }
    }
    for id in 1..=3 {
        assert_eq!(image(&w, id), before[id as usize - 1], "epoch {id} after the upgrade");
    }
    assert_eq!(image(&w, 4), four);
}
