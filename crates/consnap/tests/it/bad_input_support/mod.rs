//! Small helpers for the bad-input tests (bad_input_store.rs,
//! bad_input_cli.rs): temporary directories that outlive a failing test,
//! child processes with a deadline, and stores built without KVM.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use store::{EpochMeta, Mode, PAGE, Store};

/// A directory under the target's tmpdir: removed when the test passes,
/// kept (and its path printed) when it fails.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bad-input-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
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

/// The consnap binary, stdin closed.
pub fn consnap() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_consnap"));
    c.stdin(Stdio::null());
    c
}

/// `sh -c SCRIPT` with `$CONSNAP` set to the binary, stdin closed.
pub fn shell(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(script)
        .env("CONSNAP", env!("CARGO_BIN_EXE_consnap"))
        .stdin(Stdio::null());
    c
}

/// Run `cmd` to its end, killing it (and failing) after `secs` seconds.
pub fn run(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {secs} s; killed\nstderr:\n{}",
                String::from_utf8_lossy(&e.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Fails unless `out` exited with `code`; shows its output.
pub fn expect_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Fails unless `out` failed (no panic) with `needle` on stderr.
pub fn expect_refusal(out: &Output, needle: &str, what: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{what}: succeeded\nstderr:\n{err}");
    assert_ne!(out.status.code(), Some(101), "{what}: panicked\n{err}");
    assert!(!err.contains("panicked"), "{what}: panicked\n{err}");
    assert!(
        err.contains(needle),
        "{what}: stderr does not mention '{needle}':\n{err}"
    );
}

/// /dev/kvm, for a test that needs it: always true, or the test fails
/// (tests that need it are ignored under the `no_kvm` cfg;
/// `vmm::testing::kvm_ready`).
pub fn kvm() -> bool {
    vmm::testing::kvm_ready()
}

/// Mode bits of `p` in octal, such as "0700".
pub fn mode(p: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    format!(
        "{:04o}",
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    )
}

/// A store of three epochs made with the store API (no KVM; the state is
/// not a machine's): 1 full (4 pages), 2 with parent 1, 3 with parent 2.
pub fn small_store(dir: &Path) {
    let s = Store::open_or_create(dir).unwrap();
    for id in 1..=3u64 {
        let full = id == 1;
        let mut w = s
            .writer(EpochMeta {
                id,
                parent: (!full).then_some(id - 1),
                mode: Mode::StopCopy,
                full,
                created_ns: id * 1_000_000_000,
                vcpus: 1,
                mem_size: 4 * PAGE as u64,
                progress: Some(id),
                regions: Vec::new(),
            })
            .unwrap();
        w.write_state(b"not a machine").unwrap();
        if full {
            w.data_pages(0, &[1u8; 2 * PAGE]).unwrap();
            w.zero_pages(2, 2).unwrap();
        } else {
            w.scattered_pages(&[id - 1], &vec![id as u8; PAGE]).unwrap();
        }
        w.commit(id * 1000).unwrap();
    }
}

/// The file of epoch `id` in `dir`.
pub fn epoch_file(dir: &Path, id: u64) -> PathBuf {
    dir.join("epochs").join(store::epoch_file_name(id))
}

/// Change a header field of an epoch file and make its checksum right
/// again, as a crafted file would.
pub fn craft_header(path: &Path, at: usize, value: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + value.len()].copy_from_slice(value);
    let sum = store::format::checksum(&b[..4088]);
    b[4088..4096].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(path, &b).unwrap();
}

/// Files in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Committed epoch files of a store.
pub fn epoch_count(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("epochs")).map_or(0, |d| {
        d.flatten()
            .filter(|e| store::epoch_id_of(&e.file_name().to_string_lossy()).is_some())
            .count()
    })
}
