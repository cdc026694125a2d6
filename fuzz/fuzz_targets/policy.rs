//! `--retain` text: parsed or refused, never a panic; what parses selects
//! a subset that always holds the newest epoch.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = store::Policy::parse(text) {
        let epochs: Vec<(u64, u64)> = (1..200u64).map(|i| (i, i * 37_000_000 + (i % 7) * 1_000_000_000)).collect();
        let keep = p.retained(&epochs);
        assert!(keep.contains(&199));
        assert!(keep.iter().all(|id| (1..200).contains(id)));
    }
});
