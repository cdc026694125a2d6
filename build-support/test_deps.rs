//! What the tests of a crate need from the host, probed when the crate is
//! built (`build.rs` includes this file with `#[path]`), so that a test
//! whose dependency is missing is *ignored* by libtest, with the reason,
//! instead of passing without having run.
//!
//! For each dependency a crate names, [`emit`] declares the cfg `no_<name>`
//! (`cargo::rustc-check-cfg`) and sets it when the dependency is missing,
//! unless `CONSNAP_REQUIRE_<NAME>=1`: then the tests are compiled in and
//! fail on the missing dependency (scripts/test.sh sets those variables
//! where the dependency exists). Tests carry
//! `#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]`; a test that is not
//! ignored requires its dependency at run time (it never returns early).
//!
//! `CONSNAP_PRETEND_NO_<NAME>=1` makes the probe report that dependency
//! missing: a way to see the ignored tests on a host that has everything.
//!
//! The probe runs again when one of its inputs changes: the variables
//! above, those a probe reads (`PATH`, `HOME`, `CONSNAP_GARAGE`,
//! `CONSNAP_LINUX_DIR`, `CONSNAP_PRODUCT_BIN`), and the files it found; a
//! crate watches only the variables of the dependencies it names, so that
//! changing one rebuilds only the crates whose tests need it. A dependency
//! installed since the last build is seen after
//! `touch build-support/test_deps.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A dependency of some tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // each crate names only some of them
pub enum Dep {
    /// /dev/kvm, opened read-write.
    Kvm,
    /// `qemu-system-x86_64 --version` runs.
    Qemu,
    /// The Garage binary: `CONSNAP_GARAGE`, else scripts/garage.sh's cache.
    Garage,
    /// Network namespaces: root, and iproute2's `ip`.
    Netns,
    /// TUN/TAP: root, and /dev/net/tun opens read-write.
    Tap,
    /// userfaultfd for this user: root, vm.unprivileged_userfaultfd = 1,
    /// or /dev/userfaultfd opens read-write.
    Uffd,
    /// Root, to run something as another user or in a new mount namespace.
    Root,
    /// vm.unprivileged_userfaultfd = 0: users other than root may not
    /// create a userfaultfd (the tests of what they are told need it).
    UffdLimited,
    /// The kernel files of scripts/fetch-linux.sh (`CONSNAP_LINUX_DIR`,
    /// else target/linux).
    Linux,
    /// The product binary scripts/test.sh builds (`CONSNAP_PRODUCT_BIN`).
    Product,
}

impl Dep {
    /// The lower-case name: the cfg is `no_<name>`, the variables are
    /// `CONSNAP_REQUIRE_<NAME>` and `CONSNAP_PRETEND_NO_<NAME>`.
    pub fn name(self) -> &'static str {
        match self {
            Dep::Kvm => "kvm",
            Dep::Qemu => "qemu",
            Dep::Garage => "garage",
            Dep::Netns => "netns",
            Dep::Tap => "tap",
            Dep::Uffd => "uffd",
            Dep::Root => "root",
            Dep::UffdLimited => "uffd_limited",
            Dep::Linux => "linux",
            Dep::Product => "product",
        }
    }

    /// The environment variables its probe reads.
    fn reads(self) -> &'static [&'static str] {
        match self {
            Dep::Qemu | Dep::Netns => &["PATH"],
            Dep::Garage => &["CONSNAP_GARAGE", "HOME"],
            Dep::Linux => &["CONSNAP_LINUX_DIR"],
            Dep::Product => &["CONSNAP_PRODUCT_BIN"],
            Dep::Kvm | Dep::Tap | Dep::Uffd | Dep::Root | Dep::UffdLimited => &[],
        }
    }

    /// Whether the host has it; the files that decide it, to watch.
    fn probe(self) -> (bool, Vec<PathBuf>) {
        match self {
            Dep::Kvm => (opens_rw("/dev/kvm"), existing(["/dev/kvm"])),
            Dep::Qemu => (runs("qemu-system-x86_64", "--version"), Vec::new()),
            Dep::Garage => match garage() {
                Some(p) => {
                    // The tests start the binary found here.
                    println!("cargo::rustc-env=CONSNAP_BUILD_GARAGE={}", p.display());
                    (true, vec![p])
                }
                None => (false, Vec::new()),
            },
            Dep::Netns => (root() && runs("ip", "-V"), Vec::new()),
            Dep::Tap => (root() && opens_rw("/dev/net/tun"), existing(["/dev/net/tun"])),
            Dep::Uffd => (
                root() || uffd_sysctl().as_deref() == Some("1") || opens_rw("/dev/userfaultfd"),
                existing(["/proc/sys/vm/unprivileged_userfaultfd"]),
            ),
            Dep::Root => (root(), Vec::new()),
            Dep::UffdLimited => (uffd_sysctl().as_deref() == Some("0"), Vec::new()),
            Dep::Linux => {
                let dir = linux_dir();
                let files = [dir.join("vmlinux"), dir.join("bzImage")];
                (files.iter().all(|f| f.exists()), existing(files))
            }
            // Not watched: scripts/test.sh builds it again on every run.
            Dep::Product => (
                std::env::var_os("CONSNAP_PRODUCT_BIN").is_some_and(|p| Path::new(&p).exists()),
                Vec::new(),
            ),
        }
    }
}

/// Probe `deps` and tell cargo: a `no_<name>` cfg for each missing one
/// that is not required, and what to watch.
pub fn emit(deps: &[Dep]) {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=../../build-support/test_deps.rs");
    let mut watched: Vec<&str> = deps.iter().flat_map(|d| d.reads()).copied().collect();
    watched.sort_unstable();
    watched.dedup();
    for var in watched {
        println!("cargo::rerun-if-env-changed={var}");
    }
    for &dep in deps {
        let name = dep.name();
        let require = format!("CONSNAP_REQUIRE_{}", name.to_uppercase());
        let pretend = format!("CONSNAP_PRETEND_NO_{}", name.to_uppercase());
        println!("cargo::rustc-check-cfg=cfg(no_{name})");
        println!("cargo::rerun-if-env-changed={require}");
        println!("cargo::rerun-if-env-changed={pretend}");
        let (mut present, watch) = dep.probe();
        for f in watch {
            println!("cargo::rerun-if-changed={}", f.display());
        }
        if std::env::var(&pretend).as_deref() == Ok("1") {
            present = false;
        }
        let required = std::env::var(&require).as_deref() == Ok("1");
        if !present && !required {
            println!("cargo::rustc-cfg=no_{name}");
            println!(
                "cargo::warning=tests that need {name} are ignored: it is missing here (set {require}=1 to run them anyway)"
            );
        }
    }
}

fn opens_rw(path: &str) -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open(path).is_ok()
}

fn existing<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Vec<PathBuf> {
    paths
        .into_iter()
        .map(|p| p.as_ref().to_path_buf())
        .filter(|p| p.exists())
        .collect()
}

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this build runs as root: /proc/self belongs to the effective
/// user and group.
fn root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn uffd_sysctl() -> Option<String> {
    let s = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").ok()?;
    Some(s.trim().to_string())
}

/// `CONSNAP_GARAGE`, else the newest `~/.cache/consnap/garage-*/bin/garage`.
fn garage() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CONSNAP_GARAGE") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let cache = PathBuf::from(std::env::var_os("HOME")?).join(".cache/consnap");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("garage-"))
        .map(|e| e.path().join("bin/garage"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// `CONSNAP_LINUX_DIR`, else the workspace's target/linux.
fn linux_dir() -> PathBuf {
    std::env::var_os("CONSNAP_LINUX_DIR").map_or_else(
        || {
            let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default();
            PathBuf::from(manifest).join("../../target/linux")
        },
        PathBuf::from,
    )
}
