//! RECLAIM bytes (store::fuzzing::ledger).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| store::fuzzing::ledger(data));
