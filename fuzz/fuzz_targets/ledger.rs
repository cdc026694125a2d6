//! RECLAIM bytes: decoded or refused, never a panic; what decodes
//! encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = store::Ledger::decode(data, std::path::Path::new("RECLAIM")) {
        assert_eq!(l.encode(), data);
    }
});
