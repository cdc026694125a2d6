//! An epoch file of arbitrary bytes with its checksums made right
//! (store::fuzzing::sealed_epoch): reaches the checks behind them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::PathBuf::from(format!("/dev/shm/consnap-fuzz-sealed-{}", std::process::id()));
    store::fuzzing::sealed_epoch(&path, data);
});
