//! Every rule of docs/FORMAT.md that a reader checks, one test each: a
//! valid store is built, one field of one epoch is changed (with the header
//! and INDEX checksums made correct again, as a crafted file would have
//! them), and the reader must refuse it with a message naming the file and
//! the rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use store::format::checksum;
use store::{Access, EpochMeta, Mode, PAGE, Store};

#[path = "../common/mod.rs"]
mod common;

use common::{TestDir, meta, three_epochs};

/// The three-epoch store of [`three_epochs`], named for the test; `.0.1`
/// is its directory.
fn build(name: &str) -> ((TestDir, PathBuf), Store) {
    let d = common::tempdir(&format!("format-rules-{name}"));
    let s = three_epochs(&d.1);
    (d, s)
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
    refused_header(&s, 2, |b| put32(b, 8, 5), "format version 5 is not supported");
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

// The INDEX rules and the rules on sections, files and the STORE file.
mod index;
mod sections;
