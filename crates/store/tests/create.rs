//! Creating a store: interrupted creations resume, racing creators share
//! one STORE, and modes are 0700/0600 whatever was there before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use store::{Access, EpochMeta, Mode, PAGE, Store, StoreError};

/// A directory under the target's tmpdir, removed when the test passes and
/// kept (and printed) when it fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("create-{name}-{}", std::process::id()));
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
            guest_ops: None,
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
        let d = TempDir::new(&format!("resume-{i}"));
        std::fs::create_dir_all(&d.0).unwrap();
        for f in *files {
            match f.strip_suffix('/') {
                Some(dir) => std::fs::create_dir(d.0.join(dir)).unwrap(),
                None => std::fs::write(d.0.join(f), b"CSNPST").unwrap(),
            }
        }
        let s = Store::open_or_create(&d.0).unwrap_or_else(|e| panic!("{files:?} not recovered: {e}"));
        assert_eq!(names(&d.0), ["STORE", "epochs"], "{files:?}: leftovers not removed");
        assert!(names(&d.0.join("epochs")).is_empty());
        write_epoch(&s, 1);
        let uuid = s.uuid();
        drop(s);
        let r = Store::open(&d.0, Access::Read).unwrap();
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
        let d = TempDir::new(&format!("refuse-{i}"));
        std::fs::create_dir_all(&d.0).unwrap();
        for f in *files {
            match f.strip_suffix('/') {
                Some(dir) => std::fs::create_dir(d.0.join(dir)).unwrap(),
                None => std::fs::write(d.0.join(f), b"x").unwrap(),
            }
        }
        let before = names(&d.0);
        let err = Store::open_or_create(&d.0).unwrap_err().to_string();
        assert!(err.contains("not a consnap snapshot directory"), "{err}");
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
        assert_eq!(names(&d.0), before, "a refused directory was changed");
    }
    let d = TempDir::new("file");
    std::fs::write(&d.0, b"x").unwrap();
    let err = Store::open_or_create(&d.0).unwrap_err().to_string();
    assert!(err.contains("it exists and is not a directory"), "{err}");
    std::fs::remove_file(&d.0).unwrap();
}

#[test]
fn racing_creators_share_one_store_and_one_lock() {
    let d = TempDir::new("race");
    std::fs::create_dir_all(&d.0).unwrap();
    const THREADS: usize = 6;
    for round in 0..60 {
        let dir = d.0.join(format!("s{round}"));
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
    let d = TempDir::new("open-dir");
    std::fs::create_dir_all(&d.0).unwrap();
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Store::open_or_create(&d.0).unwrap();
    write_epoch(&s, 1);
    assert_eq!(mode(&d.0), "0700");
    assert_eq!(mode(&d.0.join("epochs")), "0700");
    assert_eq!(mode(&d.0.join("STORE")), "0600");
    assert_eq!(mode(&s.epoch_path(1)), "0600");
    drop(s);

    // A store whose modes were widened (or, created under umask 777 by an
    // earlier consnap, emptied): reading changes nothing, writing fixes them.
    let set = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    let epoch = d.0.join("epochs/00000000000000000001.epoch");
    set(&d.0, 0o755);
    set(&d.0.join("epochs"), 0o000);
    set(&d.0.join("STORE"), 0o644);
    set(&epoch, 0o444);
    drop(Store::open(&d.0, Access::Read).unwrap());
    assert_eq!(mode(&d.0), "0755", "a reader changed a mode");
    let s = Store::open(&d.0, Access::Write).unwrap();
    assert_eq!(
        [
            mode(&d.0),
            mode(&d.0.join("epochs")),
            mode(&d.0.join("STORE")),
            mode(&epoch)
        ],
        ["0700", "0700", "0600", "0600"]
    );
    drop(s);

    // Missing parents are created 0700 too.
    let deep = d.0.join("a/b/store");
    drop(Store::open_or_create(&deep).unwrap());
    assert_eq!(
        [mode(&d.0.join("a")), mode(&d.0.join("a/b")), mode(&deep)],
        ["0700", "0700", "0700"]
    );
}

#[test]
fn modes_are_never_set_through_a_symbolic_link() {
    let d = TempDir::new("links");
    let s = Store::open_or_create(&d.0.join("store")).unwrap();
    drop(s);
    // A file outside the store, linked in under an epoch's name.
    let outside = d.0.join("outside");
    std::fs::write(&outside, b"x").unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&outside, d.0.join("store/epochs/00000000000000000001.epoch")).unwrap();
    drop(Store::open(&d.0.join("store"), Access::Write).unwrap());
    assert_eq!(mode(&outside), "0644", "chmod went through a link");
}
