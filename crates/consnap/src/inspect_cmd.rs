//! `consnap inspect`: one epoch in detail.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use store::{Access, Source, Store};
use thiserror::Error;

use crate::at::AtError;
use crate::ls_cmd::{human, utc};

/// Why an epoch cannot be shown.
#[derive(Debug, Error)]
pub enum InspectError {
    /// The store, the epoch or its chain cannot be read.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The epoch named does not exist.
    #[error(transparent)]
    At(#[from] AtError),
}

/// Options of `consnap inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Epoch: an id, `latest`, `-30s` or an RFC 3339 time.
    #[arg(allow_hyphen_values = true)]
    pub id: String,
}

/// Print epoch ID: its header, chain and files, what a restore reads from
/// each, the machine its state describes, and whether it restores (exit
/// status 1 when it does not).
pub fn inspect(a: InspectArgs) -> Result<i32, InspectError> {
    let store = Store::open(&a.dir, Access::Read)?;
    let id = crate::at::resolve(&store, &a.id)?;
    let chain = store.chain(id)?;
    let head = &chain[0];
    let h = head.header();
    let state = head.state()?;
    let runs = store::plan(&chain)?;
    let mut used = vec![0u64; chain.len()];
    let mut zero = 0;
    for r in &runs {
        match r.source {
            Source::Zero => zero += r.count,
            Source::Data { epoch, .. } => used[epoch] += r.count,
        }
    }
    let mut o = String::new();
    o += &format!("epoch {id}: {}\n", head.path().display());
    o += &format!(
        "  captured {} UTC, mode {}, {}, parent {}, format version {}\n",
        utc(h.created_ns),
        h.mode.name(),
        if h.is_full() { "full" } else { "incremental" },
        if h.parent == 0 {
            "-".to_string()
        } else {
            h.parent.to_string()
        },
        h.version
    );
    o += &format!(
        "  {} data pages, {} zero pages, {} extents; page data {} ({}{}), file {}; guest downtime {:.2} ms; {} epochs merged into it\n",
        h.pages_data,
        h.pages_zero,
        h.extents,
        human(h.sections[3].len),
        h.codec.name(),
        if h.frames > 0 {
            format!(", {} frames", h.frames)
        } else {
            String::new()
        },
        human(head.file_len()),
        h.pause_ns as f64 / 1e6,
        h.merged
    );
    match vmm::state::decode(&state) {
        Ok(s) => {
            o += &format!(
                "  machine: {}, {} of RAM, kernel {}{}\n",
                crate::args::counted(s.config.vcpus, "vCPU"),
                human(s.config.mem_size),
                s.config.kernel,
                match guest::host::workload_of(&s.config) {
                    Some(w) => format!(", workload '{w}'"),
                    None => s
                        .config
                        .cmdline
                        .map_or(String::new(), |c| format!(", command line '{c}'")),
                }
            );
        }
        Err(e) => o += &format!("  machine state cannot be decoded: {e}\n"),
    }
    for (i, r) in h.regions.iter().enumerate() {
        o += &format!(
            "  disk {i}: {} ({} bytes){}\n",
            human(r.bytes),
            r.bytes,
            if r.readonly { ", read-only" } else { "" }
        );
    }
    if !h.regions.is_empty() {
        o += &format!(
            "  of the page data, {} are disk blocks\n",
            human(h.region_pages_data * store::PAGE as u64)
        );
    }
    if h.progress != u64::MAX {
        o += &format!("  guest ops at capture: {}\n", h.progress);
    }
    let total: u64 = chain.iter().map(|e| e.file_len()).sum();
    o += &format!(
        "restore reads {} files ({} in all), {} of page data, {} zero pages:\n",
        chain.len(),
        human(total),
        human(used.iter().sum::<u64>() * 4096),
        zero
    );
    for (e, n) in chain.iter().zip(&used) {
        let eh = e.header();
        o += &format!(
            "  {:>8} {:<11} {:>10}  {} of its {} data pages used, {}\n",
            eh.id,
            if eh.is_full() { "full" } else { "incremental" },
            human(e.file_len()),
            n,
            eh.pages_data,
            e.path().display()
        );
    }
    // The answer of ls, verify and restore.
    let verdict = store::assess_epoch(&store, id, store::Depth::Pages)?;
    let code = match &verdict {
        store::Verdict::Restores { .. } => {
            o += "restores: yes (its chain, state and every page it takes were checked)\n";
            0
        }
        store::Verdict::Fails(why) => {
            o += &format!("restores: no: {why}\n");
            1
        }
    };
    let _ = std::io::stdout().write_all(o.as_bytes());
    Ok(code)
}
