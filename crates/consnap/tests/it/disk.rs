//! A disk in every epoch: disk workloads (the guest's virtio-blk driver on
//! consnap's device) run with snapshots, the VMM is killed with SIGKILL at
//! a random moment, and the latest and an earlier committed epoch, each
//! restored onto a new image, finish with the checksum of an uninterrupted
//! run and leave a byte-identical disk image (both computed on the host by
//! the same workload code, which the QEMU cross-check ties to a real
//! device). Then what users get wrong about disks, and a failing host disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use crate::common;

use common::*;

/// The disk area the workloads use, and the image (a MiB more, which must
/// stay zero).
const DSIZE: u64 = 8 << 20;
const IMAGE: u64 = DSIZE + (1 << 20);

/// Disk workloads that run for about six seconds on any machine (paced),
/// so that the kill lands mid-run also at 1 s intervals.
fn spec(workload: &str, vcpus: u32) -> String {
    let n = u64::from(vcpus);
    match workload {
        "ftp" => format!("ftp,wss=16M,ops={},chunk=16K,rate=4M,dsize=8M,disk=on", 1_500 * n),
        "dblog" => format!("dblog,wss=2M,ops={},rate=2000,dsize=8M,flush=16", 12_000 * n),
        _ => unreachable!(),
    }
}

/// The checksum (with the op count) and the final image of `spec` run
/// without interruption on a fresh image of [`IMAGE`] bytes.
fn uninterrupted(spec: &str, vcpus: u32) -> ((u64, String), Vec<u8>) {
    let (out, disk) = workload::reference_with_disk(&parse_spec(spec), vcpus);
    let mut image = disk.to_bytes();
    image.resize(IMAGE as usize, 0);
    ((out.ops, format!("{:#018x}", out.checksum)), image)
}

fn zero_image(path: &Path, bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

fn kill_restore_disk(workload: &str, mode: &str, vcpus: u32, interval: &str) {
    if !kvm_ready() {
        return;
    }
    let spec = spec(workload, vcpus);
    let ((ops, sum), want_image) = uninterrupted(&spec, vcpus);
    let dir = tempdir(&format!("disk-{workload}-{mode}-{vcpus}-{interval}"));
    let snaps = dir.join("snaps");
    let image = dir.join("disk.img");
    zero_image(&image, IMAGE);
    let want = if interval == "1s" { 3 } else { 12 };
    let args = [
        "run",
        "--workload",
        &spec,
        "--vcpus",
        &vcpus.to_string(),
        "--disk",
        image.to_str().unwrap(),
        "--snapshot-dir",
        snaps.to_str().unwrap(),
        "--mode",
        mode,
        "--interval",
        interval,
        "--pause-probe",
        "0",
    ];
    let child = start_until_epochs(&args, &snaps, want);
    // A random moment after that: the kill lands anywhere in an epoch.
    let mut rng = Rng(seed());
    std::thread::sleep(Duration::from_millis(rng.below(if interval == "1s" {
        900
    } else {
        60
    })));
    let out = child.stop(libc::SIGKILL);
    assert_killed(&out, libc::SIGKILL, &args);
    let epochs = ls(&snaps);
    assert!(epochs.len() >= want, "{epochs:?}");
    assert!(epochs.iter().all(|e| e["disk_bytes"].as_u64().is_some()));
    assert!(
        epochs.iter().any(|e| e["disk_bytes"].as_u64().unwrap() > 0),
        "no epoch holds disk blocks: {epochs:?}"
    );
    let ids: Vec<u64> = epochs.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    let latest = *ids.last().unwrap();
    let earlier = ids[rng.below(ids.len() as u64 - 1) as usize];
    let new = |what: &str| dir.join(format!("restored-{what}.img"));
    let (img_latest, img_lazy, img_earlier) = (new("latest"), new("lazy"), new("earlier"));
    let extra_latest = ["--disk", img_latest.to_str().unwrap()];
    let extra_lazy = ["--lazy", "--disk", img_lazy.to_str().unwrap()];
    let extra_earlier = ["--disk", img_earlier.to_str().unwrap()];
    let runs = [
        RestoreRun {
            store: &snaps,
            at: "latest".into(),
            extra: &extra_latest,
            report: dir.join("latest.json"),
        },
        RestoreRun {
            store: &snaps,
            at: latest.to_string(),
            extra: &extra_lazy,
            report: dir.join("lazy.json"),
        },
        RestoreRun {
            store: &snaps,
            at: earlier.to_string(),
            extra: &extra_earlier,
            report: dir.join("earlier.json"),
        },
    ];
    let reports = restore_many(&runs, 3);
    let what = format!("{workload}, {mode}, {vcpus} vCPUs, every {interval}");
    for ((r, img), epoch) in reports
        .iter()
        .zip([&img_latest, &img_lazy, &img_earlier])
        .zip([latest, latest, earlier])
    {
        assert_eq!(r["status"], "poweroff", "{what}: {r}");
        assert_eq!(r["restored_from"]["epoch"], epoch, "{r}");
        assert_eq!(r["workload_errors"], 0, "{what}: {r}");
        assert_eq!(r["ops"], ops, "{what}: {r}");
        assert_eq!(r["checksum"], sum.as_str(), "{what}: epoch {epoch} diverged: {r}");
        let got = std::fs::read(img).unwrap();
        assert!(
            got == want_image,
            "{what}: the disk restored from epoch {epoch} ends unlike an uninterrupted run's"
        );
    }
    // The image the VM first ran on is not the restores' business: it
    // stays as the killed run left it (never the end state).
    assert_eq!(std::fs::metadata(&image).unwrap().len(), IMAGE);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_disk_cow_1_vcpu_20ms() {
    kill_restore_disk("ftp", "cow", 1, "20ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dblog_cow_2_vcpus_20ms() {
    kill_restore_disk("dblog", "cow", 2, "20ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dblog_cow_1_vcpu_1s() {
    kill_restore_disk("dblog", "cow", 1, "1s");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_disk_cow_2_vcpus_1s() {
    kill_restore_disk("ftp", "cow", 2, "1s");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dblog_stop_copy_1_vcpu_20ms() {
    kill_restore_disk("dblog", "stop-copy", 1, "20ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_disk_stop_copy_2_vcpus_20ms() {
    kill_restore_disk("ftp", "stop-copy", 2, "20ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_disk_stop_copy_1_vcpu_1s() {
    kill_restore_disk("ftp", "stop-copy", 1, "1s");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dblog_stop_copy_2_vcpus_1s() {
    kill_restore_disk("dblog", "stop-copy", 2, "1s");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_disk_stop_copy_full_1_vcpu_20ms() {
    kill_restore_disk("ftp", "stop-copy-full", 1, "20ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dblog_stop_copy_full_2_vcpus_20ms() {
    kill_restore_disk("dblog", "stop-copy-full", 2, "20ms");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dblog_stop_copy_full_1_vcpu_1s() {
    kill_restore_disk("dblog", "stop-copy-full", 1, "1s");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ftp_disk_stop_copy_full_2_vcpus_1s() {
    kill_restore_disk("ftp", "stop-copy-full", 2, "1s");
}

/// `consnap run` with `args` must fail before the guest runs, with a
/// message containing each of `needles`.
#[track_caller]
fn refused(args: &[&str], needles: &[&str]) {
    let out = output(consnap().args(args));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} was not refused: {err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("consnap-guest: done"),
        "{args:?} ran the guest"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected '{n}' in: {err}");
    }
}

const SHORT: &str = "dblog,wss=1M,ops=200,dsize=1M";

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn bad_disk_images_are_refused_with_their_name() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("disk-bad");
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    refused(
        &["run", "--workload", SHORT, "--disk", &p("missing.img")],
        &["missing.img", "No such file"],
    );
    zero_image(&dir.join("small.img"), 512);
    refused(
        &["run", "--workload", SHORT, "--disk", &p("small.img")],
        &["small.img", "512 bytes"],
    );
    zero_image(&dir.join("odd.img"), (1 << 20) + 100);
    refused(
        &["run", "--workload", SHORT, "--disk", &p("odd.img")],
        &["odd.img", "multiple of 512"],
    );
    refused(
        &["run", "--workload", SHORT, "--disk", dir.to_str().unwrap()],
        &["not a regular file"],
    );
    // An unknown option is the command line's error (clap's exit status 2).
    let out = output(consnap().args(["run", "--workload", SHORT, "--disk", &format!("{},fast", p("x.img"))]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the only option after the path is ',readonly'"));
    // A read-only file system (as root) or a file without write permission.
    let ro = dir.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let img = ro.join("d.img");
    let mounted = read_only_image(&ro, &img);
    refused(
        &["run", "--workload", SHORT, "--disk", img.to_str().unwrap()],
        &["d.img", "for writing", ",readonly"],
    );
    // The guest refuses a read-only disk for a workload that writes, but
    // consnap attaches it.
    let out = output(consnap().args([
        "run",
        "--workload",
        SHORT,
        "--disk",
        &format!("{},readonly", img.display()),
    ]));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("read-only"));
    if mounted {
        run_ok(std::process::Command::new("umount").arg(&ro));
    }
}

/// Make `img` (1 MiB) unwritable: on a read-only tmpfs mounted at `dir`
/// as root (root ignores file modes), mode 0400 otherwise. Returns whether
/// it mounted.
fn read_only_image(dir: &Path, img: &Path) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        zero_image(img, 1 << 20);
        let mut perm = std::fs::metadata(img).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o400);
        std::fs::set_permissions(img, perm).unwrap();
        return false;
    }
    run_ok(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4M", "consnap-test"])
            .arg(dir),
    );
    zero_image(img, 1 << 20);
    run_ok(std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(dir));
    true
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn two_vms_never_share_an_image() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("disk-shared");
    let img = dir.join("d.img");
    zero_image(&img, IMAGE);
    let first_args = [
        "run",
        "--workload",
        &spec("dblog", 1),
        "--disk",
        img.to_str().unwrap(),
        "--pause-probe",
        "0",
    ];
    let mut first = spawn(consnap().args(first_args));
    first.wait_for("the first VM to use its disk", |c| c.stdout_contains("virtio-blk at"));
    refused(
        &["run", "--workload", SHORT, "--disk", img.to_str().unwrap()],
        &["d.img", "in use by another process"],
    );
    refused(
        &[
            "run",
            "--workload",
            SHORT,
            "--disk",
            &format!("{},readonly", img.display()),
        ],
        &["in use by another process"],
    );
    let out = first.stop(libc::SIGTERM);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn restores_need_one_new_image_per_disk() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("disk-restore-args");
    let img = dir.join("d.img");
    zero_image(&img, IMAGE);
    let snaps = dir.join("snaps");
    run_and_term(
        &[
            "run",
            "--workload",
            &spec("dblog", 1),
            "--disk",
            img.to_str().unwrap(),
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--interval",
            "100ms",
        ],
        &snaps,
        2,
    );
    let restore = |extra: &[&str], needles: &[&str]| {
        let out = output(consnap().args(["restore"]).arg(&snaps).args(["--at", "1"]).args(extra));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{extra:?}: expected '{n}' in: {err}");
        }
        assert!(!err.contains("newest epoch that restores"), "{err}");
    };
    restore(&[], &["epoch 1 has 1 disk(s) but 0", "--disk"]);
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    restore(
        &["--disk", a.to_str().unwrap(), "--disk", b.to_str().unwrap()],
        &["1 disk(s) but 2"],
    );
    // An existing file is never overwritten, the original image included.
    let before = std::fs::read(&img).unwrap();
    restore(&["--disk", img.to_str().unwrap()], &["d.img", "exists"]);
    assert_eq!(std::fs::read(&img).unwrap(), before);
    // No half-written image is left behind by a refused restore.
    assert!(!a.exists() && !b.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("consnap-restore"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Export writes the epoch's image without a VM (what it holds is
    // checked block by block by the engine's tests).
    let ex = dir.join("export.img");
    run_ok(
        consnap()
            .args(["export"])
            .arg(&snaps)
            .args(["--at", "1", "--disk-out"])
            .arg(&ex),
    );
    assert_eq!(std::fs::metadata(&ex).unwrap().len(), IMAGE);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn an_image_that_changes_size_under_the_vm_fails_its_snapshots() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("disk-resized");
    let img = dir.join("d.img");
    zero_image(&img, IMAGE);
    let snaps = dir.join("snaps");
    let report = dir.join("r.json");
    let args = [
        "run",
        "--workload",
        &spec("dblog", 1),
        "--disk",
        img.to_str().unwrap(),
        "--snapshot-dir",
        snaps.to_str().unwrap(),
        "--interval",
        "50ms",
        "--pause-probe",
        "0",
        "--on-snapshot-error",
        "continue",
        "--report",
        report.to_str().unwrap(),
    ];
    let mut child = start_until_epochs(&args, &snaps, 2);
    // Another process grows the image.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(IMAGE + 4096)
        .unwrap();
    child.wait_for("a failed snapshot", |c| c.stderr().contains("changed size"));
    let out = stop_term(child, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("d.img changed size from"), "{err}");
    let r = read_report(&report);
    assert!(r["snapshots"]["failed"].as_u64().unwrap() >= 1, "{}", r["snapshots"]);
    // What was committed before is intact.
    run_ok(consnap().arg("verify").arg(&snaps));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_failing_flush_reaches_the_guest_and_loses_no_snapshot() {
    if !kvm_ready() {
        return;
    }
    let dir = tempdir("disk-fault");
    let img = dir.join("d.img");
    zero_image(&img, IMAGE);
    let snaps = dir.join("snaps");
    let report = dir.join("r.json");
    let spec = "dblog,wss=1M,ops=2000,rate=2000,dsize=8M,flush=16";
    // The 20th flush fails (EIO from the host), after snapshots began.
    let out = output(
        consnap()
            .env("CONSNAP_TEST_DISK_FAULT", "flush:20")
            .args(["run", "--workload", spec, "--disk"])
            .arg(&img)
            .arg("--snapshot-dir")
            .arg(&snaps)
            .args(["--interval", "50ms", "--pause-probe", "0", "--report"])
            .arg(&report),
    );
    let r = read_report(&report);
    // The guest saw the error (an integrity error of the workload: exit 1).
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(r["workload_errors"], 1, "{r}");
    assert_eq!(r["snapshots"]["failed"], 0, "{}", r["snapshots"]);
    let epochs = ls(&snaps);
    assert!(epochs.len() >= 3, "{epochs:?}");
    run_ok(consnap().arg("verify").arg(&snaps));
    // A write that fails is the same: the guest is told.
    let img2 = dir.join("d2.img");
    zero_image(&img2, IMAGE);
    let out = output(
        consnap()
            .env("CONSNAP_TEST_DISK_FAULT", "write:100")
            .args(["run", "--workload", spec, "--disk"])
            .arg(&img2)
            .args(["--pause-probe", "0", "--report"])
            .arg(&report),
    );
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(read_report(&report)["workload_errors"].as_u64().unwrap() >= 1);
}
