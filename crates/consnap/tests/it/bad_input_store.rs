//! Bad snapshot directories: interrupted creation, umask and open modes,
//! crafted epochs, damaged or oddly named files in `consnap ls`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::bad_input_support;

use bad_input_support::*;

/// A short workload run that takes a few snapshots (about 0.3 s of guest work).
const SNAP_RUN: &str = "run --workload memstress,wss=8M,ops=3000000 --mode stop-copy --interval 20ms --pause-probe 0";

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn an_interrupted_store_creation_is_completed_by_the_next_run() {
    if !kvm() {
        return;
    }
    let d = TempDir::new("resume-create");
    let snaps = d.join("snaps");
    // A full disk while the store is created: with a file-size limit of 0
    // every write fails (EFBIG; consnap ignores SIGXFSZ).
    let full = run(
        &mut shell(&format!(
            "ulimit -f 0; exec \"$CONSNAP\" {SNAP_RUN} --snapshot-dir '{}'",
            snaps.display()
        )),
        120,
    );
    let err = text(&full.stderr);
    assert!(err.contains("snapshot directory unusable"), "{err}");
    assert!(!snaps.join("STORE").exists());
    assert!(
        names(&snaps).iter().all(|n| n == "epochs"),
        "a failed creation left {:?}",
        names(&snaps)
    );
    // The next run, with room, completes the store and snapshots into it.
    let out = run(
        consnap().args(SNAP_RUN.split(' ')).arg("--snapshot-dir").arg(&snaps),
        120,
    );
    expect_code(&out, 0, "run after the failed creation");
    assert!(
        epoch_count(&snaps) >= 1,
        "no snapshot after an interrupted creation:\n{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("0 failed"), "{}", text(&out.stderr));
    expect_code(&run(consnap().arg("ls").arg(&snaps), 30), 0, "ls");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn store_modes_do_not_follow_the_umask() {
    if !kvm() {
        return;
    }
    let d = TempDir::new("umask");
    let snaps = d.join("new/parent/snaps");
    let out = run(
        &mut shell(&format!(
            "umask 777; exec \"$CONSNAP\" {SNAP_RUN} --snapshot-dir '{}'",
            snaps.display()
        )),
        120,
    );
    expect_code(&out, 0, "run under umask 777");
    assert!(epoch_count(&snaps) >= 1, "{}", text(&out.stderr));
    for dir in [d.join("new"), d.join("new/parent"), snaps.clone(), snaps.join("epochs")] {
        assert_eq!(mode(&dir), "0700", "{}", dir.display());
    }
    assert_eq!(mode(&snaps.join("STORE")), "0600");
    for e in std::fs::read_dir(snaps.join("epochs")).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), "0600", "{}", p.display());
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn an_open_directory_is_made_private_with_a_warning() {
    if !kvm() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = TempDir::new("open-dir");
    let snaps = d.join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    std::fs::set_permissions(&snaps, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(
        consnap().args(SNAP_RUN.split(' ')).arg("--snapshot-dir").arg(&snaps),
        120,
    );
    expect_code(&out, 0, "run into a 0755 directory");
    let err = text(&out.stderr);
    assert_eq!(mode(&snaps), "0700");
    assert!(
        err.contains(&format!(
            "{} was mode 0755, open to other users; set it to 0700",
            snaps.display()
        )),
        "{err}"
    );
    // stderr is a pipe here: the log line carries no colour codes.
    assert!(
        !err.contains('\x1b'),
        "ANSI escapes in a log written to a pipe:\n{err:?}"
    );
    // Again, on the existing store opened to others.
    std::fs::set_permissions(&snaps, std::fs::Permissions::from_mode(0o750)).unwrap();
    let out = run(
        consnap().args(SNAP_RUN.split(' ')).arg("--snapshot-dir").arg(&snaps),
        120,
    );
    expect_code(&out, 0, "run into an existing 0750 store");
    assert_eq!(mode(&snaps), "0700");
    assert!(text(&out.stderr).contains("was mode 0750"), "{}", text(&out.stderr));
    // Epoch files opened to others: one line for all of them.
    let files: Vec<_> = std::fs::read_dir(snaps.join("epochs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 2, "{files:?}");
    for f in &files {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = run(
        consnap().args(SNAP_RUN.split(' ')).arg("--snapshot-dir").arg(&snaps),
        120,
    );
    expect_code(&out, 0, "run into a store with 0644 epoch files");
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("open to other users")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&format!(
            "{} epoch files in {}",
            files.len(),
            snaps.join("epochs").display()
        )) && lines[0].contains("mode 0644"),
        "{err}"
    );
    // (The run's retention may have reclaimed some since.)
    for f in files.iter().filter(|f| f.exists()) {
        assert_eq!(mode(f), "0600", "{}", f.display());
    }
}

#[test]
fn restore_refuses_a_crafted_full_epoch_with_a_parent() {
    let d = TempDir::new("crafted-full");
    let snaps = d.join("snaps");
    small_store(&snaps);
    // Epoch 2 (parent 1) claims to be FULL: a restore would stop at it and
    // leave the rest of RAM empty.
    let path = epoch_file(&snaps, 2);
    craft_header(&path, 60, &1u32.to_le_bytes());
    for at in ["2", "3"] {
        let out = run(
            consnap()
                .arg("restore")
                .arg(&snaps)
                .args(["--at", at, "--pause-probe", "0"]),
            60,
        );
        expect_refusal(
            &out,
            &format!(
                "{}: epoch 2 has the FULL flag and parent 1: a FULL epoch has parent 0",
                path.display()
            ),
            &format!("restore --at {at}"),
        );
        assert!(out.stdout.is_empty(), "the VM ran: {}", text(&out.stdout));
    }
    let ls = run(consnap().args(["ls", "--json"]).arg(&snaps), 30);
    expect_code(&ls, 1, "ls --json");
    let rows: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(rows[1]["damaged"], true, "{rows}");
    assert_eq!(rows[2]["chain_error"], "its parent epoch 2 is damaged", "{rows}");
}

fn ls(snaps: &std::path::Path, json: bool) -> std::process::Output {
    let mut c = consnap();
    c.arg("ls").arg(snaps);
    if json {
        c.arg("--json");
    }
    run(&mut c, 30)
}

fn ls_json(snaps: &std::path::Path) -> (i32, Vec<serde_json::Value>) {
    let out = ls(snaps, true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ls --json printed no JSON ({e}):\n{}", text(&out.stdout)));
    (out.status.code().unwrap(), v.as_array().unwrap().clone())
}

#[test]
fn ls_table_and_json_agree() {
    let d = TempDir::new("ls-agree");
    let snaps = d.join("snaps");
    small_store(&snaps);
    // Sound.
    expect_code(&ls(&snaps, false), 0, "ls");
    let (code, rows) = ls_json(&snaps);
    assert_eq!(code, 0);
    assert!(
        rows.iter()
            .all(|r| r["damaged"] == false && r["restorable"] == true && r["parent_missing"] == false),
        "{rows:?}"
    );
    // Epoch 2 damaged: both exit 1; the JSON marks 2 damaged and 3 unrestorable.
    let p2 = epoch_file(&snaps, 2);
    let good = std::fs::read(&p2).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(&p2, &bad).unwrap();
    let table = ls(&snaps, false);
    expect_code(&table, 1, "ls on a damaged store");
    assert!(
        text(&table.stdout).contains(&format!("2  damaged: {}: header checksum mismatch", p2.display())),
        "{}",
        text(&table.stdout)
    );
    assert!(
        text(&table.stdout).contains("3  cannot be restored: its parent epoch 2 is damaged"),
        "{}",
        text(&table.stdout)
    );
    let (code, rows) = ls_json(&snaps);
    assert_eq!(code, 1, "ls --json on a damaged store");
    assert_eq!(rows[1]["damaged"], true);
    assert_eq!(rows[1]["restorable"], false);
    assert_eq!(rows[1]["file"], "00000000000000000002.epoch");
    assert!(rows[1]["error"].as_str().unwrap().contains("header checksum mismatch"));
    assert_eq!(rows[2]["damaged"], false);
    assert_eq!(rows[2]["restorable"], false);
    std::fs::write(&p2, &good).unwrap();
}

#[test]
fn ls_flags_a_missing_parent() {
    let d = TempDir::new("ls-missing-parent");
    let snaps = d.join("snaps");
    small_store(&snaps);
    std::fs::remove_file(epoch_file(&snaps, 1)).unwrap();
    let table = ls(&snaps, false);
    expect_code(&table, 1, "ls with a missing parent");
    let t = text(&table.stdout);
    assert!(
        t.contains("2  cannot be restored: its parent epoch 1 is missing"),
        "{t}"
    );
    assert!(
        t.contains("3  cannot be restored: its ancestor (the parent of epoch 2) epoch 1 is missing"),
        "{t}"
    );
    let (code, rows) = ls_json(&snaps);
    assert_eq!(code, 1, "ls --json with a missing parent");
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0]["id"].as_u64(), rows[0]["parent_missing"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(rows[0]["chain_error"], "its parent epoch 1 is missing");
    assert_eq!(rows[0]["restorable"], false);
    assert_eq!(rows[1]["parent_missing"], false);
    assert_eq!(rows[1]["restorable"], false);
}

#[test]
fn ls_names_non_canonical_files_by_their_real_name() {
    let d = TempDir::new("ls-names");
    let snaps = d.join("snaps");
    small_store(&snaps);
    let epochs = snaps.join("epochs");
    std::fs::rename(epoch_file(&snaps, 3), epochs.join("3.epoch")).unwrap();
    std::fs::copy(epoch_file(&snaps, 2), epochs.join("0002.epoch")).unwrap();
    std::fs::write(epochs.join("notes.txt"), b"hello").unwrap();
    let table = ls(&snaps, false);
    expect_code(&table, 1, "ls with non-canonical names");
    let t = text(&table.stdout);
    for (name, why) in [
        (
            "3.epoch",
            "not a canonical epoch file name (epoch 3 would be 00000000000000000003.epoch)",
        ),
        (
            "0002.epoch",
            "not a canonical epoch file name (epoch 2 would be 00000000000000000002.epoch)",
        ),
        ("notes.txt", "not an epoch file"),
    ] {
        assert!(
            t.contains(&format!("{}: {why}", epochs.join(name).display())),
            "{name}:\n{t}"
        );
    }
    assert!(
        !t.contains("00000000000000000003.epoch: "),
        "reported under a name that does not exist:\n{t}"
    );
    let (code, rows) = ls_json(&snaps);
    assert_eq!(code, 1);
    let files: Vec<&str> = rows.iter().map(|r| r["file"].as_str().unwrap()).collect();
    assert_eq!(
        files,
        [
            "00000000000000000001.epoch",
            "00000000000000000002.epoch",
            "0002.epoch",
            "3.epoch",
            "notes.txt"
        ]
    );
    for r in &rows[2..] {
        assert_eq!((r["id"].is_null(), r["damaged"].as_bool()), (true, Some(true)), "{r}");
    }
    // consnap does not read them: epoch 3 is not in the store.
    let out = run(consnap().arg("restore").arg(&snaps).args(["--at", "3"]), 30);
    expect_refusal(&out, "epoch 3 is not in", "restore --at 3");
}

/// Five epochs over 4 pages of RAM: 1 full; 2 writes page 1; 3 pages 2
/// and 3; 4 page 2 again; 5 page 0. Returns the store.
fn five_epochs(dir: &std::path::Path) {
    let s = store::Store::open_or_create(dir).unwrap();
    let writes: [&[u64]; 5] = [&[0, 1, 2, 3], &[1], &[2, 3], &[2], &[0]];
    for (i, pages) in writes.iter().enumerate() {
        let id = i as u64 + 1;
        let mut w = s
            .writer(store::EpochMeta {
                id,
                parent: (id > 1).then_some(id - 1),
                mode: store::Mode::StopCopy,
                full: id == 1,
                created_ns: id * 1_000_000_000,
                vcpus: 1,
                mem_size: 4 * store::PAGE as u64,
                progress: Some(id),
                regions: Vec::new(),
            })
            .unwrap();
        w.write_state(b"not a machine").unwrap();
        let data: Vec<u8> = pages
            .iter()
            .flat_map(|p| vec![(id * 16 + p) as u8; store::PAGE])
            .collect();
        w.scattered_pages(pages, &data).unwrap();
        w.commit(id * 1000).unwrap();
    }
}

/// One flipped byte of page data in epoch 3 (its copy of page 2, which
/// epoch 4 writes again): epoch 3 does not restore, 4 and 5 do, and `ls`
/// (table and JSON), `verify`, `inspect` and the store's own verdict all
/// say exactly that.
#[test]
fn ls_verify_and_inspect_agree_on_which_epochs_restore() {
    let d = TempDir::new("one-truth");
    let snaps = d.join("snaps");
    five_epochs(&snaps);
    let p3 = epoch_file(&snaps, 3);
    let r3 = store::EpochReader::open(&p3).unwrap();
    let data_at = r3.header().sections[3].offset as usize;
    drop(r3);
    let mut bytes = std::fs::read(&p3).unwrap();
    // Data pages of epoch 3 are in guest-page order: page 2 is the first.
    bytes[data_at + 100] ^= 0x40;
    std::fs::write(&p3, &bytes).unwrap();

    let s = store::Store::open(&snaps, store::Access::Read).unwrap();
    let health = store::assess(&s, store::Depth::Pages, &mut |_, _| {}).unwrap();
    assert_eq!(health.restorable().collect::<Vec<_>>(), vec![1, 2, 4, 5]);
    for id in 1..=5 {
        assert_eq!(
            store::assess_epoch(&s, id, store::Depth::Pages).unwrap(),
            health.epochs[&id],
            "epoch {id}"
        );
    }

    let (code, rows) = ls_json(&snaps);
    assert_eq!(code, 1, "ls --json on a store with an epoch that does not restore");
    let restorable: Vec<bool> = rows.iter().map(|r| r["restorable"].as_bool().unwrap()).collect();
    assert_eq!(restorable, [true, true, false, true, true], "{rows:?}");
    assert!(rows.iter().all(|r| r["pages_checked"] == true));
    let why = rows[2]["chain_error"].as_str().unwrap();
    assert!(why.contains("of epoch 3, which fails its checksum"), "{why}");
    let table = text(&ls(&snaps, false).stdout);
    assert!(table.contains("3  cannot be restored: it takes data page 0"), "{table}");
    assert!(table.contains("; 1 epoch does not restore"), "{table}");
    // --quick reads no pages and says so.
    let quick = run(consnap().args(["ls", "--quick", "--json"]).arg(&snaps), 30);
    expect_code(&quick, 0, "ls --quick");
    let q: serde_json::Value = serde_json::from_slice(&quick.stdout).unwrap();
    assert!(
        q.as_array()
            .unwrap()
            .iter()
            .all(|r| r["pages_checked"] == false && r["restorable"] == true)
    );

    let v = run(consnap().arg("verify").arg(&snaps), 30);
    expect_code(&v, 1, "verify");
    let out = text(&v.stdout);
    assert!(out.contains("epoch 3 does not restore"), "{out}");
    for other in [1, 2, 4, 5] {
        assert!(!out.contains(&format!("epoch {other} does not restore")), "{out}");
    }
    assert!(out.contains("5 epochs") && out.contains("4 restore"), "{out}");

    let i3 = run(consnap().arg("inspect").arg(&snaps).arg("3"), 30);
    expect_code(&i3, 1, "inspect 3");
    assert!(
        text(&i3.stdout).contains("restores: no: it takes data page 0"),
        "{}",
        text(&i3.stdout)
    );
    for id in ["4", "5"] {
        let i = run(consnap().arg("inspect").arg(&snaps).arg(id), 30);
        expect_code(&i, 0, "inspect");
        assert!(text(&i.stdout).contains("restores: yes"), "{}", text(&i.stdout));
    }
}
