//! Support for tests of consnap's crates: whether KVM tests may run, a
//! minimal PVH kernel around a few bytes of 32-bit guest code (in the style
//! of kvm-ioctls' tests), a private directory that removes itself when its
//! test passes, child processes with captured output and a deadline, and a
//! small random generator whose seed is printed.
//!
//! This file uses nothing but `std` and `libc`, so that the tests of crates
//! that do not depend on `vmm` can include it with `#[path]`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A console that keeps what the guest writes, for tests to read.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether this process may lower a thread's niceness (CAP_SYS_NICE),
/// tried on a thread of its own.
pub fn may_lower_niceness() -> bool {
    std::thread::spawn(|| {
        // SAFETY: setpriority on the calling thread, which ends right after.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, 5);
            libc::setpriority(libc::PRIO_PROCESS, 0, 0) == 0
        }
    })
    .join()
    .unwrap_or(false)
}

/// Fails the calling test: it needs `what`, which is missing (`why`).
///
/// A test whose dependency the build found missing is ignored, with the
/// reason (`#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]`, cfgs set by
/// build-support/test_deps.rs); one that runs requires its dependency, and
/// never passes without having checked anything.
pub fn missing(what: &str, why: impl std::fmt::Display) -> ! {
    panic!(
        "this test needs {what}, which is missing here ({why}); it ran because the build found it \
         or CONSNAP_REQUIRE_* asked for it (build-support/test_deps.rs: a rebuild probes again)"
    )
}

/// /dev/kvm, for a test that needs it (and is ignored under the `no_kvm`
/// cfg): always true, or the test fails ([`missing`]). The result is a bool
/// only so that the tests' `if !kvm_ready() { return; }` lines read as before.
pub fn kvm_ready() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => missing("/dev/kvm", e),
    }
}

/// Where [`pvh_elf`] loads its code and enters.
pub const LOAD: u64 = 0x10_0000;

/// A minimal ELF64 whose only segment is `code` at 1 MiB, entered through a
/// PVH note in 32-bit protected mode.
pub fn pvh_elf(code: &[u8]) -> &'static [u8] {
    let mut f = vec![0u8; 0x1000];
    f[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let put = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &0x3eu16.to_le_bytes()); // x86-64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &LOAD.to_le_bytes()); // e_entry
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
    // PT_LOAD
    let ph = 64;
    put(&mut f, ph, &1u32.to_le_bytes());
    put(&mut f, ph + 4, &7u32.to_le_bytes());
    put(&mut f, ph + 8, &0x1000u64.to_le_bytes());
    put(&mut f, ph + 16, &LOAD.to_le_bytes());
    put(&mut f, ph + 24, &LOAD.to_le_bytes());
    put(&mut f, ph + 32, &(code.len() as u64).to_le_bytes());
    put(&mut f, ph + 40, &(code.len() as u64).to_le_bytes());
    put(&mut f, ph + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE
    let ph = 64 + 56;
    put(&mut f, ph, &4u32.to_le_bytes());
    put(&mut f, ph + 4, &4u32.to_le_bytes());
    put(&mut f, ph + 8, &0x200u64.to_le_bytes());
    put(&mut f, ph + 32, &20u64.to_le_bytes());
    put(&mut f, ph + 40, &20u64.to_le_bytes());
    put(&mut f, ph + 48, &4u64.to_le_bytes());
    // The note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY, desc = entry.
    put(
        &mut f,
        0x200,
        &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0],
    );
    put(&mut f, 0x210, &(LOAD as u32).to_le_bytes());
    f.extend_from_slice(code);
    Box::leak(f.into_boxed_slice())
}

/// A fresh private directory for one test, removed when it is dropped,
/// unless the thread is panicking (the test failed): then it is kept for a
/// post-mortem and its path printed on stderr as `kept <path>`.
///
/// Integration tests put it under Cargo's per-target scratch directory,
/// `TestDir::new(env!("CARGO_TARGET_TMPDIR"), "name")`: that variable only
/// exists at compile time, so it must be read with `env!`.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// `base/NAME-PID-N`, empty.
    pub fn new(base: impl AsRef<Path>, name: &str) -> TestDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base.as_ref().join(format!("{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("cannot create test directory {}: {e}", path.display());
        }
        TestDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for TestDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A small deterministic generator (the seed is printed, to replay a failure).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// `CONSNAP_TEST_SEED`, or one from the clock; printed.
pub fn seed() -> u64 {
    let s = std::env::var("CONSNAP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("CONSNAP_TEST_SEED={s}");
    s
}

/// How long a child process may run before the test kills it and fails:
/// `CONSNAP_TEST_TIMEOUT` seconds, default 300.
pub fn timeout() -> Duration {
    let secs = std::env::var("CONSNAP_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Lines of each stream quoted when a child fails.
const TAIL_LINES: usize = 40;

/// How often waits look at the child and the awaited event.
const POLL: Duration = Duration::from_millis(5);

type Buffer = Arc<Mutex<Vec<u8>>>;

/// Copy `from` into `into` until end of file, on a thread of its own.
fn capture(mut from: impl Read + Send + 'static, into: Buffer) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// The last `n` lines of `bytes`.
pub fn tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        out += &format!("[... {skip} lines before]\n");
    }
    for l in &lines[skip..] {
        out += l;
        out.push('\n');
    }
    out
}

/// A child process whose stdout and stderr are captured by reader threads,
/// with a deadline. Every wait checks that it is still running, so a child
/// that dies fails the test at once with its last output; one that outlives
/// its deadline is killed, and the test fails with its last output. A child
/// still running when this is dropped (a failed test) is killed.
pub struct Child {
    what: String,
    child: std::process::Child,
    stdout: Buffer,
    stderr: Buffer,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
    status: Option<ExitStatus>,
}

/// Start `cmd` (stdin from /dev/null) with the default deadline, [`timeout`].
#[track_caller]
pub fn spawn(cmd: &mut Command) -> Child {
    match try_spawn(cmd) {
        Ok(c) => c,
        Err(e) => panic!("cannot start {cmd:?}: {e}"),
    }
}

/// [`spawn`], or the error when `cmd` cannot be started (not installed).
pub fn try_spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = Buffer::default();
    let stderr = Buffer::default();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(capture(out, stdout.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(capture(err, stderr.clone()));
    }
    let started = Instant::now();
    Ok(Child {
        what,
        child,
        stdout,
        stderr,
        readers,
        started,
        deadline: started + timeout(),
        status: None,
    })
}

/// Run `cmd` to its end (within [`timeout`]) and return what it printed,
/// whatever its exit status.
#[track_caller]
pub fn output(cmd: &mut Command) -> Output {
    spawn(cmd).wait()
}

/// Run `cmd` to its end (within [`timeout`]); fail the test, quoting its
/// last output, unless it exits with status 0.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> Output {
    let mut c = spawn(cmd);
    c.wait_exit();
    if !c.status.is_some_and(|s| s.success()) {
        c.fail("did not succeed");
    }
    c.wait()
}

impl Child {
    /// Replace the deadline: `limit` from the start.
    pub fn deadline(mut self, limit: Duration) -> Child {
        self.deadline = self.started + limit;
        self
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child printed on stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// True once the child has printed `text` on stdout.
    pub fn stdout_contains(&self, text: &str) -> bool {
        let out = self.stdout.lock().unwrap_or_else(PoisonError::into_inner);
        let t = text.as_bytes();
        t.is_empty() || out.windows(t.len()).any(|w| w == t)
    }

    /// Everything the child printed on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// Its exit status, once it has ended.
    #[track_caller]
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(s) => self.status = s,
                Err(e) => self.fail(&format!("cannot wait for it: {e}")),
            }
        }
        self.status
    }

    /// True while the child runs.
    #[track_caller]
    pub fn running(&mut self) -> bool {
        self.poll().is_none()
    }

    /// Wait until `event` holds, looking at it and at the child every few
    /// milliseconds. The child ending first, or the deadline passing, fails
    /// the test with the child's last output; `what` names the event.
    #[track_caller]
    pub fn wait_for(&mut self, what: &str, mut event: impl FnMut(&Child) -> bool) {
        loop {
            if event(self) {
                return;
            }
            if let Some(status) = self.poll() {
                self.join_readers();
                if event(self) {
                    return;
                }
                self.fail(&format!("ended ({status}) before {what}"));
            }
            if Instant::now() >= self.deadline {
                self.fail(&format!("timed out waiting for {what}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Send signal `sig` to the child, unless it has already ended.
    #[track_caller]
    pub fn signal(&mut self, sig: i32) {
        if self.running() {
            let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
                self.fail("pid out of range");
            };
            // SAFETY: kill(2) with the pid of our own child that has not
            // been reaped yet (so the pid cannot have been reused).
            let rc = unsafe { libc::kill(pid, sig) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                self.fail(&format!("cannot send signal {sig}: {e}"));
            }
        }
    }

    /// Wait for the child to end, within the deadline.
    #[track_caller]
    fn wait_exit(&mut self) {
        while self.poll().is_none() {
            if Instant::now() >= self.deadline {
                self.fail("timed out");
            }
            std::thread::sleep(POLL);
        }
        self.join_readers();
    }

    /// Wait for the child to end (within the deadline) and return what it
    /// printed, whatever its exit status.
    #[track_caller]
    pub fn wait(mut self) -> Output {
        self.wait_exit();
        let take = |b: &Buffer| std::mem::take(&mut *b.lock().unwrap_or_else(PoisonError::into_inner));
        let Some(status) = self.status else {
            self.fail("no exit status");
        };
        Output {
            status,
            stdout: take(&self.stdout),
            stderr: take(&self.stderr),
        }
    }

    /// Send `sig`, then wait for the child to end and return its output.
    #[track_caller]
    pub fn stop(mut self, sig: i32) -> Output {
        self.signal(sig);
        self.wait()
    }

    /// Collect what the reader threads still hold after the child ended.
    /// A grandchild that inherited the pipes may keep them open: give up
    /// after a few seconds rather than wait for it.
    fn join_readers(&mut self) {
        let until = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        for r in std::mem::take(&mut self.readers) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }

    /// Kill the child if it still runs, then fail the test with `why` and
    /// the last lines of its output.
    #[track_caller]
    fn fail(&mut self, why: &str) -> ! {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.join_readers();
        let out = self.stdout.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let err = self.stderr.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let status = self.status.map_or("unknown".to_string(), |s| s.to_string());
        panic!(
            "{}: {why} (status {status}, after {:.1}s)\n--- stdout (last {TAIL_LINES} lines) ---\n{}--- stderr (last {TAIL_LINES} lines) ---\n{}",
            self.what,
            self.started.elapsed().as_secs_f64(),
            tail(&out, TAIL_LINES),
            tail(&err, TAIL_LINES),
        );
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() && self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
