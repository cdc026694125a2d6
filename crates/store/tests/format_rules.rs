//! Every rule of docs/FORMAT.md that a reader checks, one test each: a
//! valid store is built, one field of one epoch is changed (with the header
//! and INDEX checksums made correct again, as a crafted file would have
//! them), and the reader must refuse it with a message naming the file and
//! the rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use store::format::checksum;
use store::{Access, EpochMeta, Mode, PAGE, Store};

/// A directory under the target's tmpdir, removed when the test passes and
/// kept (and printed) when it fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("format-rules-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn meta(id: u64, parent: Option<u64>) -> EpochMeta {
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
        guest_ops: Some(id),
    }
}

/// Epoch 1: full, 8 pages: data 0..2, zero 2..4, data 4..7, zero 7.
/// Epoch 2 (parent 1): data 1, zero 4. Epoch 3 (parent 2): data 2..4.
fn build(name: &str) -> (TempDir, Store) {
    let dir = TempDir::new(name);
    let s = Store::open_or_create(&dir.0).unwrap();
    let page = |fill: u8| vec![fill; PAGE];
    let mut w = s.writer(meta(1, None)).unwrap();
    w.write_state(b"state-1").unwrap();
    w.data_pages(0, &[page(1), page(1)].concat()).unwrap();
    w.zero_pages(2, 2).unwrap();
    w.data_pages(4, &[page(2), page(2), page(2)].concat()).unwrap();
    w.zero_pages(7, 1).unwrap();
    w.commit(10).unwrap();
    let mut w = s.writer(meta(2, Some(1))).unwrap();
    w.write_state(b"state-2").unwrap();
    w.scattered_pages(&[1], &page(9)).unwrap();
    w.zero_pages(4, 1).unwrap();
    w.commit(20).unwrap();
    let mut w = s.writer(meta(3, Some(2))).unwrap();
    w.write_state(b"state-3").unwrap();
    w.scattered_pages(&[2, 3], &[page(7), page(7)].concat()).unwrap();
    w.commit(30).unwrap();
    (dir, s)
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Offset of section table entry `i` (0 STATE, 1 INDEX, 2 PAGE_SUMS, 3 DATA).
fn entry(i: usize) -> usize {
    128 + i * 32
}

/// (offset, length) of section `i`.
fn section(b: &[u8], i: usize) -> (usize, usize) {
    (get64(b, entry(i) + 8) as usize, get64(b, entry(i) + 16) as usize)
}

/// Offset in the file of INDEX entry `n`.
fn extent(b: &[u8], n: usize) -> usize {
    section(b, 1).0 + n * 24
}

/// Make the header checksum correct again.
fn reseal(b: &mut [u8]) {
    let sum = checksum(&b[..4088]);
    put64(b, 4088, sum);
}

/// Make the INDEX checksum (and then the header checksum) correct again.
fn reseal_index(b: &mut [u8]) {
    let (off, len) = section(b, 1);
    let sum = checksum(&b[off..off + len]);
    put64(b, entry(1) + 24, sum);
    reseal(b);
}

/// Change epoch `id` with `craft`, then check that opening it and
/// restoring epoch 3 (whose chain holds every epoch) fail with a message
/// naming the file and containing `needle`; put the file back.
fn refused(s: &Store, id: u64, craft: impl FnOnce(&mut Vec<u8>), needle: &str) {
    check(s, id, craft, needle, false);
}

/// Like [`refused`], for rules the header alone shows: the listing (`ls`)
/// must report the damage too.
fn refused_header(s: &Store, id: u64, craft: impl FnOnce(&mut Vec<u8>), needle: &str) {
    check(s, id, craft, needle, true);
}

fn check(s: &Store, id: u64, craft: impl FnOnce(&mut Vec<u8>), needle: &str, listed: bool) {
    let path = s.epoch_path(id);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    craft(&mut bad);
    assert_ne!(bad, good, "the craft changed nothing");
    std::fs::write(&path, &bad).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut errors = vec![
        s.open_epoch(id)
            .map(|_| ())
            .expect_err(&format!("epoch {id} accepted ({needle})"))
            .to_string(),
        s.chain(3)
            .map(|_| ())
            .expect_err("chain of epoch 3 accepted")
            .to_string(),
    ];
    if listed {
        let all = s.list().unwrap();
        let (_, info) = all.iter().find(|(i, _)| *i == id).unwrap();
        errors.push(info.as_ref().map(|_| ()).expect_err("listed as valid").to_string());
    }
    for err in errors {
        assert!(err.contains(&name), "message does not name {name}: {err}");
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
        assert!(!err.contains("Some("), "{err}");
    }
    std::fs::write(&path, &good).unwrap();
    s.chain(3).unwrap();
}

#[test]
fn the_fixture_is_valid() {
    let (_d, s) = build("valid");
    for id in 1..=3 {
        s.chain(id).unwrap();
        store::plan(&s.chain(id).unwrap()).unwrap();
    }
}

#[test]
fn full_flag_on_an_epoch_with_a_parent() {
    // The reported case: incremental epoch 3 (parent 2) claims to be FULL,
    // so a restore would stop at it and leave most of RAM empty.
    let (_d, s) = build("full-with-parent");
    refused_header(
        &s,
        3,
        |b| {
            put32(b, 60, 1);
            reseal(b);
        },
        "epoch 3 has the FULL flag and parent 2: a FULL epoch has parent 0",
    );
    refused_header(
        &s,
        1,
        |b| {
            put64(b, 24, 7);
            reseal(b);
        },
        "epoch 1 has the FULL flag and parent 7",
    );
}

#[test]
fn incremental_epoch_without_a_parent() {
    let (_d, s) = build("incr-no-parent");
    refused_header(
        &s,
        2,
        |b| {
            put64(b, 24, 0);
            reseal(b);
        },
        "epoch 2 is incremental (FULL flag clear) but has no parent",
    );
    // Clearing FULL on the full epoch leaves it without a parent too.
    refused_header(
        &s,
        1,
        |b| {
            put32(b, 60, 0);
            reseal(b);
        },
        "epoch 1 is incremental (FULL flag clear) but has no parent",
    );
}

#[test]
fn parent_must_be_older() {
    let (_d, s) = build("parent-older");
    for parent in [2, 3, u64::MAX] {
        refused_header(
            &s,
            2,
            |b| {
                put64(b, 24, parent);
                reseal(b);
            },
            &format!("epoch 2 has parent {parent}: a parent's id must be smaller"),
        );
    }
}

#[test]
fn unknown_flags() {
    let (_d, s) = build("flags");
    refused_header(
        &s,
        1,
        |b| {
            put32(b, 60, 1 | 4);
            reseal(b);
        },
        "epoch 1 has unknown flags 0x4",
    );
    refused_header(
        &s,
        2,
        |b| {
            put32(b, 60, 0x8000_0000);
            reseal(b);
        },
        "epoch 2 has unknown flags 0x80000000",
    );
}

#[test]
fn epoch_id_zero() {
    let (_d, s) = build("id-zero");
    refused_header(
        &s,
        1,
        |b| {
            put64(b, 16, 0);
            reseal(b);
        },
        "epoch id is 0",
    );
}

#[test]
fn epoch_id_equals_file_name() {
    let (_d, s) = build("id-name");
    refused_header(
        &s,
        2,
        |b| {
            put64(b, 16, 5);
            reseal(b);
        },
        "file name says epoch 2, header says 5",
    );
}

#[test]
fn known_mode_codes() {
    let (_d, s) = build("mode");
    for code in [0, 4, u32::MAX] {
        refused_header(
            &s,
            2,
            |b| {
                put32(b, 56, code);
                reseal(b);
            },
            &format!("epoch 2 has unknown mode {code}"),
        );
    }
    // 3 (cow) is a known mode.
    let path = s.epoch_path(2);
    let mut b = std::fs::read(&path).unwrap();
    put32(&mut b, 56, 3);
    reseal(&mut b);
    std::fs::write(&path, &b).unwrap();
    assert_eq!(s.open_epoch(2).unwrap().header().mode, Mode::Cow);
}

#[test]
fn header_and_page_size() {
    let (_d, s) = build("sizes");
    refused_header(
        &s,
        2,
        |b| {
            put32(b, 12, 8192);
            reseal(b);
        },
        "header size is 8192, not 4096",
    );
    refused_header(
        &s,
        2,
        |b| {
            put32(b, 64, 65536);
            reseal(b);
        },
        "page size is 65536, not 4096",
    );
}

#[test]
fn magic_version_and_checksum() {
    let (_d, s) = build("magic");
    refused_header(&s, 2, |b| b[0] = b'X', "bad magic");
    refused_header(&s, 2, |b| put32(b, 8, 3), "format version 3 is not supported");
    refused_header(&s, 2, |b| put32(b, 8, 0), "format version 0 is not supported");
    refused_header(&s, 2, |b| b[300] ^= 1, "header checksum mismatch");
    refused_header(&s, 2, |b| b.truncate(100), "truncated header");
}

#[test]
fn vcpu_count_is_plausible() {
    let (_d, s) = build("vcpus");
    for n in [0, 256, u32::MAX] {
        refused_header(
            &s,
            1,
            |b| {
                put32(b, 68, n);
                reseal(b);
            },
            &format!("epoch 1 has vCPU count {n} (must be 1 to 255)"),
        );
    }
}

#[test]
fn ram_size_is_plausible() {
    let (_d, s) = build("ram");
    for bytes in [0, 8 * 4096 + 1, (1 << 40) + 4096, u64::MAX] {
        refused_header(
            &s,
            2,
            |b| {
                put64(b, 72, bytes);
                reseal(b);
            },
            &format!("epoch 2 has guest RAM size {bytes} bytes"),
        );
    }
}

#[test]
fn page_counts_fit_in_ram() {
    let (_d, s) = build("counts-fit");
    refused_header(
        &s,
        2,
        |b| {
            put64(b, 96, u64::MAX);
            reseal(b);
        },
        "more than the 8 pages of its guest RAM",
    );
}

#[test]
fn full_epoch_lists_every_page_of_ram() {
    let (_d, s) = build("full-covers");
    // RAM one page larger than what the FULL epoch lists.
    refused_header(
        &s,
        1,
        |b| {
            put64(b, 72, 9 * 4096);
            reseal(b);
        },
        "FULL epoch 1 lists 5 data and 3 zero pages, but its guest RAM has 9 pages",
    );
    // The right number of pages, but one of them outside RAM (a hole at frame 7).
    refused(
        &s,
        1,
        |b| {
            let e = extent(b, 3);
            assert_eq!((get64(b, e), get32(b, e + 12)), (7, 1), "fixture changed");
            put64(b, e, 8);
            reseal_index(b);
        },
        "index entry 3 (frames 8..9) lies outside guest RAM of 32768 bytes (frames 0..8)",
    );
}

#[test]
fn extents_lie_inside_ram() {
    let (_d, s) = build("inside-ram");
    refused(
        &s,
        3,
        |b| {
            let e = extent(b, 0);
            put64(b, e, 7);
            reseal_index(b);
        },
        "index entry 0 (frames 7..9) lies outside guest RAM",
    );
    refused(
        &s,
        3,
        |b| {
            let e = extent(b, 0);
            put64(b, e, u64::MAX - 1);
            reseal_index(b);
        },
        "index entry 0 (frame 18446744073709551614 + 2 pages) overflows",
    );
}

#[test]
fn zero_extents_have_data_page_zero() {
    let (_d, s) = build("zero-dp");
    refused(
        &s,
        2,
        |b| {
            let e = extent(b, 1);
            assert_eq!(
                get32(b, e + 12),
                1,
                "fixture changed: entry 1 of epoch 2 is a zero extent"
            );
            put64(b, e + 16, 5);
            reseal_index(b);
        },
        "index entry 1 is a zero extent with data page 5 (must be 0)",
    );
}

#[test]
fn extent_kinds_are_known() {
    let (_d, s) = build("kind");
    refused(
        &s,
        2,
        |b| {
            let e = extent(b, 1);
            put32(b, e + 12, 7);
            reseal_index(b);
        },
        "index entry 1 has unknown kind 7",
    );
}

#[test]
fn extents_are_never_empty() {
    let (_d, s) = build("empty-extent");
    refused(
        &s,
        2,
        |b| {
            let e = extent(b, 1);
            put32(b, e + 8, 0);
            reseal_index(b);
        },
        "index entry 1 is empty (page count 0)",
    );
}

#[test]
fn extents_ascend_without_overlap() {
    let (_d, s) = build("ascending");
    // Overlapping: entry 1 (2..4) moved to 1..3 over entry 0 (0..2).
    refused(
        &s,
        1,
        |b| {
            let e = extent(b, 1);
            put64(b, e, 1);
            reseal_index(b);
        },
        "index entry 1 starts at frame 1, before the end of entry 0 (frame 2)",
    );
    // Descending: epoch 2's entries swapped.
    refused(
        &s,
        2,
        |b| {
            let (a, c) = (extent(b, 0), extent(b, 1));
            let first: Vec<u8> = b[a..a + 24].to_vec();
            b.copy_within(c..c + 24, a);
            b[c..c + 24].copy_from_slice(&first);
            reseal_index(b);
        },
        "index entry 1 starts at frame 1, before the end of entry 0 (frame 5)",
    );
}

#[test]
fn data_extents_cover_data_in_order() {
    let (_d, s) = build("data-order");
    refused(
        &s,
        1,
        |b| {
            let e = extent(b, 2);
            put64(b, e + 16, 3);
            reseal_index(b);
        },
        "index entry 2 points at data page 3, expected 2",
    );
}

#[test]
fn index_counts_equal_header_counts() {
    let (_d, s) = build("index-counts");
    refused(
        &s,
        2,
        |b| {
            put64(b, 96, 2);
            reseal(b);
        },
        "index lists 1 data and 1 zero pages, the header says 1 and 2",
    );
}

#[test]
fn section_kinds_in_order() {
    let (_d, s) = build("kinds");
    refused_header(
        &s,
        2,
        |b| {
            put32(b, entry(0), 2);
            put32(b, entry(1), 1);
            reseal(b);
        },
        "section table entry 0 has kind 2 (expected 1: STATE)",
    );
}

#[test]
fn section_lengths_match_counts() {
    let (_d, s) = build("lengths");
    refused_header(
        &s,
        1,
        |b| {
            let len = get64(b, entry(1) + 16);
            put64(b, entry(1) + 16, len + 24);
            reseal(b);
        },
        "INDEX section is 120 bytes, but the header's 4 index extents need 96",
    );
    refused_header(
        &s,
        1,
        |b| {
            put64(b, entry(2) + 16, 8);
            reseal(b);
        },
        "PAGE_SUMS section is 8 bytes, but the header's 5 data pages need 40",
    );
    refused_header(
        &s,
        1,
        |b| {
            put64(b, entry(3) + 16, 4096);
            reseal(b);
        },
        "DATA section is 4096 bytes, but the header's 5 data pages need 20480",
    );
}

#[test]
fn extents_are_at_most_the_listed_pages() {
    // Also what bounds the INDEX a reader loads to the size of guest RAM.
    let (_d, s) = build("extent-count");
    refused_header(
        &s,
        2,
        |b| {
            put64(b, 104, 3);
            reseal(b);
        },
        "epoch 2 has 3 index extents for 1 data and 1 zero pages (extents are never empty)",
    );
    refused_header(
        &s,
        1,
        |b| {
            put64(b, 104, u64::MAX / 2);
            reseal(b);
        },
        "epoch 1 has 9223372036854775807 index extents for 5 data and 3 zero pages",
    );
}

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
    let dir = d.0.clone();
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
    let store = d.0.join("STORE");
    std::fs::rename(&store, d.0.join("STORE.real")).unwrap();
    fifo(&store);
    let dir = d.0.clone();
    let err = within_deadline("opening a FIFO STORE", move || {
        Store::open(&dir, Access::Read).map(|_| ()).unwrap_err().to_string()
    });
    assert!(err.contains("STORE: not a regular file"), "{err}");
    std::fs::remove_file(&store).unwrap();
    std::fs::rename(d.0.join("STORE.real"), &store).unwrap();
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
            let (off, _) = section(b, 2);
            b[off] ^= 1;
        },
        "PAGE_SUMS section checksum mismatch",
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
    let path = d.0.join("STORE");
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
            let err = Store::open(&d.0, access).unwrap_err().to_string();
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
    Store::open(&d.0, Access::Read).unwrap();
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
    let (index_at, _) = section(&good, 1);
    let rest = good[index_at..].to_vec();
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

/// A version 1 store (same layout, no compression: docs/FORMAT.md) opens,
/// restores and verifies as it is, takes new version 2 epochs, and its
/// epochs become version 2 when reclamation rewrites them.
#[test]
fn a_version_1_store_is_read_extended_and_upgraded_by_reclamation() {
    let (dir, s) = build("v1-store");
    let image = |s: &Store, id: u64| {
        let chain = s.chain(id).unwrap();
        let mut mem = vec![0xeeu8; 8 * PAGE];
        for run in store::plan(&chain).unwrap() {
            let dst = &mut mem[run.gfn as usize * PAGE..(run.gfn + run.count) as usize * PAGE];
            match run.source {
                store::Source::Zero => dst.fill(0),
                store::Source::Data { epoch, page } => chain[epoch].read_pages(page, dst).unwrap(),
            }
        }
        (chain[0].state().unwrap(), mem)
    };
    let before: Vec<_> = (1..=3).map(|id| image(&s, id)).collect();
    drop(s);
    // Make it what an older consnap wrote: version 1 in STORE and in
    // every epoch header, checksums sealed again.
    let store_file = dir.0.join("STORE");
    let mut b = std::fs::read(&store_file).unwrap();
    put32(&mut b, 8, 1);
    let sum = checksum(&b[..56]);
    put64(&mut b, 56, sum);
    std::fs::write(&store_file, &b).unwrap();
    let probe = Store::open(&dir.0, Access::Read).unwrap();
    for id in 1..=3 {
        let path = probe.epoch_path(id);
        let mut b = std::fs::read(&path).unwrap();
        put32(&mut b, 8, 1);
        // No FRAMES entry, frame count or merged count in version 1.
        b[256..304].fill(0);
        reseal(&mut b);
        std::fs::write(&path, &b).unwrap();
    }
    drop(probe);

    let r = Store::open(&dir.0, Access::Read).unwrap();
    for id in 1..=3 {
        assert_eq!(r.open_epoch(id).unwrap().header().version, 1);
        assert_eq!(image(&r, id), before[id as usize - 1], "epoch {id} of the v1 store");
    }
    let v = store::verify(&dir.0, &mut |_, _| {}).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    drop(r);

    let w = Store::open_or_create(&dir.0).unwrap();
    let mut e = w.writer(meta(4, Some(3))).unwrap();
    e.write_state(b"state-4").unwrap();
    e.scattered_pages(&[5], &vec![4u8; PAGE]).unwrap();
    e.commit(40).unwrap();
    assert_eq!(w.open_epoch(4).unwrap().header().version, store::VERSION);
    let four = image(&w, 4);
    assert_eq!(four.1[5 * PAGE], 4);
    // Folding every chain to one file rewrites the v1 epochs as v2.
    let opts = store::ReclaimOptions {
        policy: store::Policy::keep_all(),
        max_chain: 1,
        rate: None,
        codec: None,
        batch_merges: false,
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
            assert_eq!(h.version, store::VERSION, "epoch {id} rewritten as v1");
        }
    }
    for id in 1..=3 {
        assert_eq!(image(&w, id), before[id as usize - 1], "epoch {id} after the upgrade");
    }
    assert_eq!(image(&w, 4), four);
}
