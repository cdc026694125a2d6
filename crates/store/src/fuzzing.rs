//! What the fuzz targets in `fuzz/` run, so that the same checks also run
//! on stable Rust in the test suite (`tests/fuzz_smoke.rs`, over the seed
//! corpus and its mutations) and under `cargo fuzz` for as long as one
//! likes (README, "Fuzzing the store's parsers").
//!
//! Each function takes arbitrary bytes and must return without panicking;
//! the assertions inside are properties of what the parser accepts.

use std::path::Path;

use crate::format::{Header, checksum, sum_table_len};
use crate::sums::block_table;
use crate::{EpochReader, Ledger, Policy, claims, plan};

/// Offset of the header checksum in an epoch file.
const HEADER_SUM_AT: usize = 4088;
/// Offset of the section table in the header.
const SECTIONS_AT: usize = 128;

/// An epoch file of arbitrary bytes, written to `path`: the reader refuses
/// it or accepts it, never panics, and what it accepts reads back page by
/// page and plans.
pub fn epoch(path: &Path, data: &[u8]) {
    if std::fs::write(path, data).is_err() {
        return;
    }
    if let Ok(h) = Header::decode(data, path) {
        let _ = h.check_layout(data.len() as u64, path);
    }
    if let Ok(r) = EpochReader::open(path) {
        let _ = r.state();
        let pages = r.header().pages_data.min(64);
        let mut buf = vec![0u8; 4096];
        for p in 0..pages {
            let _ = r.read_pages(p, &mut buf);
        }
        let chain = [r];
        let _ = plan(&chain);
        let _ = claims(&chain);
    }
    let _ = std::fs::remove_file(path);
}

/// Like [`epoch`], after making every checksum the header covers and the
/// INDEX, PAGE_SUMS and FRAMES checksums right again: arbitrary changes
/// then reach the structural checks behind the checksums.
pub fn sealed_epoch(path: &Path, data: &[u8]) {
    let mut b = data.to_vec();
    reseal(&mut b);
    epoch(path, &b);
}

/// Recompute the section checksums (INDEX, PAGE_SUMS, FRAMES) that the
/// section table describes, where they lie inside `b`, then the header
/// checksum. In version 4, PAGE_SUMS ends with the checksums of its
/// blocks: they are recomputed first, and the section checksum covers them.
pub fn reseal(b: &mut [u8]) {
    if b.len() < 4096 {
        return;
    }
    let get = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
    let v4 = u32::from_le_bytes(b[8..12].try_into().unwrap_or([0; 4])) >= 4;
    for i in [1usize, 2, 4] {
        let at = SECTIONS_AT + i * 32;
        let (off, len) = (get(b, at + 8), get(b, at + 16));
        let Some(end) = off.checked_add(len).filter(|&e| e <= b.len() as u64) else {
            continue;
        };
        let (off, end) = (off as usize, end as usize);
        let mut covered = off..end;
        if i == 2 && v4 {
            let pages = get(b, 88);
            let table = sum_table_len(pages);
            let Some(sums_end) = pages
                .checked_mul(8)
                .map(|n| n as usize)
                .and_then(|n| n.checked_add(off))
            else {
                continue;
            };
            if sums_end.checked_add(table as usize) != Some(end) {
                continue;
            }
            let t = block_table(&b[off..sums_end]);
            b[sums_end..end].copy_from_slice(&t);
            covered = sums_end..end;
        }
        let sum = checksum(&b[covered]);
        b[at + 24..at + 32].copy_from_slice(&sum.to_le_bytes());
    }
    let sum = checksum(&b[..HEADER_SUM_AT]);
    b[HEADER_SUM_AT..HEADER_SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
}

/// `--retain` text: parsed or refused, never a panic; what parses keeps a
/// subset of the epochs it is given that holds the newest.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = Policy::parse(text) {
        let epochs: Vec<(u64, u64)> = (1..200u64)
            .map(|i| (i, i * 37_000_000 + (i % 7) * 1_000_000_000))
            .collect();
        let keep = p.retained(&epochs);
        assert!(keep.contains(&199), "policy {text:?} drops the newest epoch");
        assert!(keep.iter().all(|id| (1..200).contains(id)), "policy {text:?}");
    }
}

/// RECLAIM bytes: decoded or refused, never a panic; what decodes encodes
/// back to the same bytes.
pub fn ledger(data: &[u8]) {
    if let Ok(l) = Ledger::decode(data, Path::new("RECLAIM")) {
        assert_eq!(l.encode(), data, "RECLAIM does not round-trip");
    }
}
