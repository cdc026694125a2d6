//! An epoch file of arbitrary bytes: the reader refuses it or accepts it,
//! never panics; what it accepts reads back page by page.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Readers take files; /dev/shm keeps this in memory.
    let path = std::path::PathBuf::from(format!("/dev/shm/consnap-fuzz-epoch-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok((h, _)) = store::format::Header::decode(data, &path).map(|h| (h, ())) {
        let _ = h.check_layout(data.len() as u64, &path);
    }
    if let Ok(r) = store::EpochReader::open(&path) {
        let _ = r.state();
        let pages = r.header().pages_data.min(64);
        let mut buf = vec![0u8; 4096];
        for p in 0..pages {
            let _ = r.read_pages(p, &mut buf);
        }
        let chain = [r];
        let _ = store::plan(&chain);
        let _ = store::claims(&chain);
    }
    let _ = std::fs::remove_file(&path);
});
