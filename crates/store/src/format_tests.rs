//! Unit tests of the header and extent encodings.

use super::*;

fn header() -> Header {
    Header {
        version: 2,
        id: 7,
        parent: 6,
        store_uuid: [9; 16],
        created_ns: 123,
        mode: Mode::StopCopy,
        flags: 0,
        vcpus: 2,
        mem_size: 1 << 30,
        progress: 55,
        pages_data: 3,
        pages_zero: 1,
        extents: 2,
        pause_ns: 999,
        codec: Codec::None,
        frames: 0,
        merged: 4,
        sections: [
            Section {
                offset: 4096,
                len: 100,
                sum: 1,
            },
            Section {
                offset: 4096 * 5,
                len: 48,
                sum: 2,
            },
            Section {
                offset: 4096 * 5 + 48,
                len: 24,
                sum: 3,
            },
            Section {
                offset: 8192,
                len: 3 * 4096,
                sum: 0,
            },
            Section {
                offset: 4096 * 5 + 72,
                len: 0,
                sum: 0,
            },
        ],
        regions: Vec::new(),
        region_pages_data: 0,
    }
}

#[test]
fn header_round_trips_and_detects_damage() {
    let h = header();
    let b = h.encode();
    let p = Path::new("x");
    assert_eq!(Header::decode(&b, p).unwrap(), h);
    // STATE [4096, 4196), DATA [8192, 20480), INDEX and PAGE_SUMS to 20552.
    h.check_layout(4096 * 5 + 72, p).unwrap();
    assert!(h.check_layout(4096 * 5, p).is_err(), "truncation must be caught");
    let e = h.check_layout(4096 * 6, p).unwrap_err().to_string();
    assert!(e.contains("bytes after it belong to no section"), "{e}");
    assert_eq!(h.gaps(4096 * 5 + 72), vec![(4196, 8192)]);
    for i in [0, 8, 20, 200, 4000] {
        let mut bad = b.clone();
        bad[i] ^= 1;
        assert!(Header::decode(&bad, p).is_err(), "flip at {i} accepted");
    }
    let mut v5 = b.clone();
    v5[8] = 5;
    let sum = checksum(&v5[..SUM_AT]);
    v5[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
    assert!(matches!(
        Header::decode(&v5, p),
        Err(StoreError::Version { found: 5, .. })
    ));
}

#[test]
fn regions_round_trip_and_count_in_the_pages_of_a_full_epoch() {
    let mut h = header();
    h.regions = vec![
        RegionDesc {
            kind: region_kind::DISK,
            readonly: false,
            bytes: 64 << 20,
        },
        RegionDesc {
            kind: region_kind::DISK,
            readonly: true,
            bytes: 4096 * 3 + 512,
        },
    ];
    h.version = VERSION;
    let p = Path::new("x");
    assert_eq!(Header::decode(&h.encode(), p).unwrap(), h);
    assert_eq!(h.regions[1].units(), 4);
    assert_eq!(
        h.unit_ranges()[1..],
        [(1 << 48, (1 << 48) + 16384), (2 << 48, (2 << 48) + 4)]
    );
    assert_eq!(region_of(unit_addr(2, 3)), 2);
    // A FULL epoch lists RAM's pages and every region's.
    h.flags = flags::FULL;
    h.parent = 0;
    h.pages_data = 0;
    h.pages_zero = (1 << 30) / 4096 + 16384 + 4;
    h.extents = 3;
    Header::decode(&h.encode(), p).unwrap();
    h.pages_zero -= 1;
    let e = Header::decode(&h.encode(), p).unwrap_err().to_string();
    assert!(e.contains("2 disks"), "{e}");
    // A version 3 header without regions (version 2 was written then), or
    // with a damaged region table; version 4 may have none.
    let mut none = h.clone();
    none.regions.clear();
    none.pages_zero = (1 << 30) / 4096;
    none.extents = 1;
    none.version = 3;
    let e = Header::decode(&none.encode(), p).unwrap_err().to_string();
    assert!(e.contains("version 3 epochs have 1 to 64"), "{e}");
    none.version = 4;
    let back = Header::decode(&none.encode(), p);
    assert!(back.as_ref().is_ok_and(|b| b.regions.is_empty()), "{back:?}");
    h.version = 3;
    h.pages_zero += 1;
    assert_eq!(Header::decode(&h.encode(), p).unwrap(), h, "version 3 is still read");
    let mut b = h.encode();
    b[REGIONS_AT + 16] = 9;
    let sum = checksum(&b[..SUM_AT]);
    b[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
    let e = Header::decode(&b, p).unwrap_err().to_string();
    assert!(e.contains("unknown kind 9"), "{e}");
    // A parent with other disks is another machine.
    let mut parent = h.clone();
    parent.regions.pop();
    assert!(h.parent_mismatch(&parent).is_some());
}

#[test]
fn ram_frames_skip_the_mmio_hole() {
    assert_eq!(ram_frames(8 * 4096), vec![(0, 8)]);
    assert_eq!(ram_frames(3 << 30), vec![(0, 786_432)]);
    assert_eq!(ram_frames(4 << 30), vec![(0, 786_432), (1_048_576, 1_310_720)]);
    assert_eq!(describe_frames(4 << 30), "frames 0..786432 and 1048576..1310720");
}

#[test]
fn extents_round_trip() {
    let e = Extent {
        gfn: 1 << 20,
        count: 5,
        kind: ExtentKind::Zero,
        data_page: 0,
    };
    let mut v = Vec::new();
    e.encode(&mut v);
    assert_eq!(v.len(), EXTENT_SIZE);
    assert_eq!(Extent::decode(&v), Some(e));
    v[12] = 9;
    assert_eq!(Extent::decode(&v), None);
}
