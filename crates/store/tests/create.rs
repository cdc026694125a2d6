//! Creating a store: interrupted creations resume, racing creators share
//! one STORE, and modes are 0700/0600 whatever was there before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use store::{Access, EpochMeta, Mode, PAGE, Store, StoreError};

mod common;

use common::tempdir;

/// Mode bits of `p` in octal, such as "0700".
fn mode(p: &Path) -> String {
    format!("{:04o}", std::fs::metadata(p).unwrap().permissions().mode() & 0o7777)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn write_epoch(s: &Store, id: u64) {
    let mut w = s
        .writer(EpochMeta {
            id,
            parent: None,
            mode: Mode::StopCopyFull,
            full: true,
            created_ns: 1,
            vcpus: 1,
            mem_size: 2 * PAGE as u64,
            progress: None,
            regions: Vec::new(),
        })
        .unwrap();
    w.write_state(b"s").unwrap();
    w.data_pages(0, &[7u8; 2 * PAGE]).unwrap();
    w.commit(1).unwrap();
}

#[test]
fn an_interrupted_creation_resumes() {
    // What a disk-full error while creating left behind with earlier
    // versions (a partial `.STORE.tmp` next to an empty `epochs/`), and
    // with this one (a `.STORE.tmp-PID-NONCE`, possibly no `epochs/`).
    let leftovers: [&[&str]; 3] = [
        &[".STORE.tmp", "epochs/"],
        &[".STORE.tmp-123-00000000deadbeef"],
        &[
            "epochs/",
            "epochs/.tmp-00000000000000000001",
            ".STORE.tmp-9-1",
            ".STORE.tmp",
        ],
    ];
    for (i, files) in leftovers.iter().enumerate() {
        let (_t, d) = tempdir(&format!("create-resume-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in *files {
            match f.strip_suffix('/') {
                Some(dir) => std::fs::create_dir(d.join(dir)).unwrap(),
                None => std::fs::write(d.join(f), b"CSNPST").unwrap(),
            }
        }
        let s = Store::open_or_create(&d).unwrap_or_else(|e| panic!("{files:?} not recovered: {e}"));
        assert_eq!(names(&d), ["STORE", "epochs"], "{files:?}: leftovers not removed");
        assert!(names(&d.join("epochs")).is_empty());
        write_epoch(&s, 1);
        let uuid = s.uuid();
        drop(s);
        let r = Store::open(&d, Access::Read).unwrap();
        assert_eq!(r.uuid(), uuid);
        r.chain(1).unwrap();
    }
}

#[test]
fn a_directory_that_is_not_a_half_created_store_is_refused() {
    let cases: [(&[&str], &str); 3] = [
        (&["notes.txt"], "notes.txt is in it"),
        (
            &["epochs/", "epochs/00000000000000000001.epoch"],
            "00000000000000000001.epoch exists",
        ),
        (&["epochs/", "epochs/keep.me"], "keep.me exists"),
    ];
    for (i, (files, needle)) in cases.iter().enumerate() {
        let (_t, d) = tempdir(&format!("create-refuse-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in *files {
            match f.strip_suffix('/') {
                Some(dir) => std::fs::create_dir(d.join(dir)).unwrap(),
                None => std::fs::write(d.join(f), b"x").unwrap(),
            }
        }
        let before = names(&d);
        let err = Store::open_or_create(&d).unwrap_err().to_string();
        assert!(err.contains("not a consnap snapshot directory"), "{err}");
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
        assert_eq!(names(&d), before, "a refused directory was changed");
    }
    let (_t, d) = tempdir("create-file");
    std::fs::write(&d, b"x").unwrap();
    let err = Store::open_or_create(&d).unwrap_err().to_string();
    assert!(err.contains("it exists and is not a directory"), "{err}");
    std::fs::remove_file(&d).unwrap();
}

#[test]
fn racing_creators_share_one_store_and_one_lock() {
    let (_t, d) = tempdir("create-race");
    std::fs::create_dir_all(&d).unwrap();
    const THREADS: usize = 6;
    for round in 0..60 {
        let dir = d.join(format!("s{round}"));
        if round % 2 == 1 {
            // Half the rounds start from an existing empty directory.
            std::fs::create_dir(&dir).unwrap();
        }
        let barrier = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (dir, barrier) = (dir.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Store::open_or_create(&dir)
                })
            })
            .collect();
        let results: Vec<Result<Store, StoreError>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<&Store> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, StoreError::Busy(_)), "round {round}: a creator failed: {e}");
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} creators hold the lock",
            winners.len()
        );
        let uuid = winners[0].uuid();
        assert_eq!(Store::open(&dir, Access::Read).unwrap().uuid(), uuid, "round {round}");
        assert!(
            matches!(Store::open(&dir, Access::Write), Err(StoreError::Busy(_))),
            "round {round}: the STORE file is not the locked one"
        );
        assert_eq!(names(&dir), ["STORE", "epochs"], "round {round}");
        drop(results);
        assert_eq!(Store::open(&dir, Access::Write).unwrap().uuid(), uuid);
    }
}

#[test]
fn existing_directories_are_made_private() {
    // An empty directory made by someone else, 0755.
    let (_t, d) = tempdir("create-open-dir");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Store::open_or_create(&d).unwrap();
    write_epoch(&s, 1);
    assert_eq!(mode(&d), "0700");
    assert_eq!(mode(&d.join("epochs")), "0700");
    assert_eq!(mode(&d.join("STORE")), "0600");
    assert_eq!(mode(&s.epoch_path(1)), "0600");
    drop(s);

    // A store whose modes were widened (or, created under umask 777 by an
    // earlier consnap, emptied): reading changes nothing, writing fixes them.
    let set = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    let epoch = d.join("epochs/00000000000000000001.epoch");
    set(&d, 0o755);
    set(&d.join("epochs"), 0o000);
    set(&d.join("STORE"), 0o644);
    set(&epoch, 0o444);
    drop(Store::open(&d, Access::Read).unwrap());
    assert_eq!(mode(&d), "0755", "a reader changed a mode");
    let s = Store::open(&d, Access::Write).unwrap();
    assert_eq!(
        [mode(&d), mode(&d.join("epochs")), mode(&d.join("STORE")), mode(&epoch)],
        ["0700", "0700", "0600", "0600"]
    );
    drop(s);

    // Missing parents are created 0700 too.
    let deep = d.join("a/b/store");
    drop(Store::open_or_create(&deep).unwrap());
    assert_eq!(
        [mode(&d.join("a")), mode(&d.join("a/b")), mode(&deep)],
        ["0700", "0700", "0700"]
    );
}

#[test]
fn modes_are_never_set_through_a_symbolic_link() {
    let (_t, d) = tempdir("create-links");
    let s = Store::open_or_create(&d.join("store")).unwrap();
    drop(s);
    // A file outside the store, linked in under an epoch's name.
    let outside = d.join("outside");
    std::fs::write(&outside, b"x").unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("store/epochs/00000000000000000001.epoch")).unwrap();
    drop(Store::open(&d.join("store"), Access::Write).unwrap());
    assert_eq!(mode(&outside), "0644", "chmod went through a link");
}
