//! The guest command-line words of a `--workload` spec.

/// `ftp,wss=256M` is `workload=ftp wss=256M` (what QEMU's `-append` takes
/// and consnap writes on the guest's command line).
pub fn guest_words(spec: &str) -> String {
    spec.split(',')
        .enumerate()
        .map(|(i, w)| if i == 0 { format!("workload={w}") } else { w.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}
