//! Epochs with regions (disks): version 3, units listed by unit address
//! beside RAM's pages, restored through the same plan, kept whole by
//! merging and folding, and refused when an extent lies outside every
//! region or a chain changes its disks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use store::format::{RegionDesc, checksum, region_kind, region_of, unit_addr};
use store::{Access, EpochMeta, PAGE, Policy, ReclaimOptions, Source, Store, plan};

mod common;

use common::{meta, page, tempdir};

const DISK: RegionDesc = RegionDesc {
    kind: region_kind::DISK,
    readonly: false,
    // Three units and a half: the last unit is partly beyond the disk.
    bytes: 3 * 4096 + 2048,
};

fn with_disk(id: u64, parent: Option<u64>) -> EpochMeta {
    EpochMeta {
        regions: vec![DISK],
        ..meta(id, parent)
    }
}

/// Epoch 1: full, RAM pages 0..8 all 1s, disk units [5, 0, 6, 0];
/// epoch 2: RAM page 3 = 2, disk unit 1 = 7; epoch 3: disk unit 0 = 8.
fn store_with_disk(dir: &std::path::Path) -> Store {
    let s = Store::open_or_create(dir).unwrap();
    let mut w = s.writer(with_disk(1, None)).unwrap();
    w.write_state(b"s1").unwrap();
    w.data_pages(0, &page(1).repeat(8)).unwrap();
    w.data_pages(unit_addr(1, 0), &page(5)).unwrap();
    w.zero_pages(unit_addr(1, 1), 1).unwrap();
    w.data_pages(unit_addr(1, 2), &page(6)).unwrap();
    w.zero_pages(unit_addr(1, 3), 1).unwrap();
    w.commit(1).unwrap();
    let mut w = s.writer(with_disk(2, Some(1))).unwrap();
    w.write_state(b"s2").unwrap();
    w.data_pages(3, &page(2)).unwrap();
    w.data_pages(unit_addr(1, 1), &page(7)).unwrap();
    w.commit(2).unwrap();
    let mut w = s.writer(with_disk(3, Some(2))).unwrap();
    w.write_state(b"s3").unwrap();
    w.data_pages(unit_addr(1, 0), &page(8)).unwrap();
    w.commit(3).unwrap();
    s
}

/// (RAM, disk) as epoch `id` restores them.
fn images(s: &Store, id: u64) -> (Vec<u8>, Vec<u8>) {
    let chain = s.chain(id).unwrap();
    let (mut ram, mut disk) = (vec![0xeeu8; 8 * PAGE], vec![0xeeu8; 4 * PAGE]);
    for run in plan(&chain).unwrap() {
        let (buf, first) = match region_of(run.gfn) {
            0 => (&mut ram, run.gfn),
            1 => (&mut disk, run.gfn - unit_addr(1, 0)),
            r => panic!("region {r}"),
        };
        let at = first as usize * PAGE;
        let len = run.count as usize * PAGE;
        match run.source {
            Source::Data { epoch, page } => chain[epoch].read_pages(page, &mut buf[at..at + len]).unwrap(),
            Source::Zero => buf[at..at + len].fill(0),
        }
    }
    (ram, disk)
}

#[test]
fn disks_restore_through_the_chain_and_survive_folding() {
    let d = tempdir("regions-chain");
    let s = store_with_disk(&d.1);
    let h = s.open_epoch(3).unwrap().header().clone();
    assert_eq!((h.version, h.regions.clone()), (4, vec![DISK]));
    let want_ram = [page(1).repeat(3), page(2), page(1).repeat(4)].concat();
    let want_disk = [page(8), page(7), page(6), page(0)].concat();
    assert_eq!(images(&s, 3), (want_ram.clone(), want_disk.clone()));
    assert_eq!(images(&s, 1).1, [page(5), page(0), page(6), page(0)].concat());
    let v = store::verify(&d.1, &mut |_, _| {}).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    // Fold every chain to one file: epoch 3 becomes full, disks included.
    drop(s);
    let w = Store::open_or_create(&d.1).unwrap();
    let opts = ReclaimOptions {
        policy: Policy::keep_all(),
        max_chain: 1,
        ..ReclaimOptions::default()
    };
    store::reclaim(
        &w,
        &opts,
        &[],
        &std::sync::atomic::AtomicBool::new(false),
        &mut |_, _| {},
    )
    .unwrap();
    let e3 = w.open_epoch(3).unwrap();
    assert!(e3.header().is_full());
    assert_eq!(e3.header().regions, vec![DISK]);
    assert_eq!(images(&w, 3), (want_ram, want_disk));
}

#[test]
fn an_extent_outside_every_region_or_a_chain_of_other_disks_is_refused() {
    let d = tempdir("regions-refused");
    let s = store_with_disk(&d.1);
    // Move epoch 3's only extent to region 2, which the epoch does not have.
    let path = s.epoch_path(3);
    let good = std::fs::read(&path).unwrap();
    let mut b = good.clone();
    let index_at = u64::from_le_bytes(b[128 + 32 + 8..128 + 32 + 16].try_into().unwrap()) as usize;
    b[index_at..index_at + 8].copy_from_slice(&unit_addr(2, 0).to_le_bytes());
    let sum = checksum(&b[index_at..index_at + 24]);
    b[128 + 32 + 24..128 + 32 + 32].copy_from_slice(&sum.to_le_bytes());
    let sum = checksum(&b[..4088]);
    b[4088..4096].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let e = Store::open(&d.1, Access::Read)
        .unwrap()
        .open_epoch(3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lies outside guest RAM") && e.contains("1 disk"), "{e}");
    std::fs::write(&path, &good).unwrap();
    // An epoch whose parent has no disk is another machine.
    let mut w = s.writer(meta(4, Some(3))).unwrap();
    w.write_state(b"s4").unwrap();
    w.commit(4).unwrap();
    let e = s.chain(4).unwrap_err().to_string();
    assert!(e.contains("no disks") && e.contains("1 disk of 14336 bytes"), "{e}");
}
