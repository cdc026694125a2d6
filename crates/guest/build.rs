//! Builds the workload guest with the host toolchain.
//!
//! Only the host target is installed, so the guest is compiled for
//! x86_64-unknown-linux-gnu as a freestanding static executable: `-C
//! panic=abort`, no start files or libc, our own link script, baseline
//! x86-64 code. First the `workload` crate is compiled to an rlib with the
//! same flags, then `image/main.rs` (which includes `image/boot.s`) is linked
//! against it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn rustc(args: &[&str]) {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(&rustc)
        .args(args)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {rustc}: {e}"));
    assert!(status.success(), "building the workload guest failed: {rustc} {args:?}");
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let image = manifest.join("image");
    let workload = manifest.join("../workload/src");
    for dir in [&image, &workload] {
        println!("cargo:rerun-if-changed={}", dir.display());
        for entry in std::fs::read_dir(dir).expect("read source dir").flatten() {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }
    let s = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
    let common = [
        "--edition=2024",
        "--target",
        TARGET,
        "-C",
        "opt-level=3",
        "-C",
        "panic=abort",
        "-C",
        "relocation-model=static",
        "-C",
        "target-cpu=x86-64",
        "-C",
        "debuginfo=0",
        "-C",
        "codegen-units=1",
    ];
    let lib_dir = out.join("guest-deps");
    std::fs::create_dir_all(&lib_dir).expect("create guest-deps");
    let mut args: Vec<String> = common.iter().map(|a| a.to_string()).collect();
    args.extend(["--crate-type", "rlib", "--crate-name", "workload", "--out-dir"].map(String::from));
    args.push(s(&lib_dir));
    args.push(s(&workload.join("lib.rs")));
    rustc(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let elf = out.join("consnap-guest.elf");
    let mut args: Vec<String> = common.iter().map(|a| a.to_string()).collect();
    args.extend(["--crate-type", "bin", "--crate-name", "consnap_guest"].map(String::from));
    args.push("--extern".into());
    args.push(format!("workload={}", s(&lib_dir.join("libworkload.rlib"))));
    for link in [
        "-nostdlib",
        "-nostartfiles",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,--strip-debug",
        "-Wl,--gc-sections",
        "-Wl,-z,noexecstack",
        "-Wl,-z,max-page-size=4096",
    ] {
        args.push("-C".into());
        args.push(format!("link-arg={link}"));
    }
    args.push("-C".into());
    args.push(format!("link-arg=-Wl,-T,{}", s(&image.join("guest.ld"))));
    args.push("-o".into());
    args.push(s(&elf));
    args.push(s(&image.join("main.rs")));
    rustc(&args.iter().map(String::as_str).collect::<Vec<_>>());
}
