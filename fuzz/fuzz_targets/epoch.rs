//! An epoch file of arbitrary bytes (store::fuzzing::epoch).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Readers take files; /dev/shm keeps this in memory.
    let path = std::path::PathBuf::from(format!("/dev/shm/consnap-fuzz-epoch-{}", std::process::id()));
    store::fuzzing::epoch(&path, data);
});
