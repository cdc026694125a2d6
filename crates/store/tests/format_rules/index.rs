//! The INDEX rules: extents, their kinds, order and counts.

use super::*;

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
        "PAGE_SUMS section is 8 bytes, but the header's 5 data pages need 48",
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
