//! `consnap restore`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use store::{Access, Store};

use crate::report::RestoredFrom;
use crate::session::{self, SessionArgs};

/// Options of `consnap restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Epoch to restore: an id from `consnap ls`, or `latest`.
    #[arg(long, default_value = "latest")]
    pub at: String,
    /// Reporting and snapshot options.
    #[command(flatten)]
    pub session: SessionArgs,
}

fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Restore a VM and run it to its end; returns consnap's exit status.
pub fn restore(a: RestoreArgs) -> Result<i32, String> {
    let started = Instant::now();
    let pre = session::preflight(&a.session)?;
    let store = Store::open(&a.dir, Access::Read).map_err(|e| e.to_string())?;
    let id = match a.at.as_str() {
        "latest" => store.latest().map_err(|e| e.to_string())?,
        s => s
            .parse()
            .map_err(|_| format!("--at '{s}' is not an epoch id or 'latest'"))?,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("restoring epoch {msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(id.to_string());
    let restored = snapshot::restore(&store, id, Box::new(std::io::stdout()), &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let from = RestoredFrom {
        dir: a.dir.display().to_string(),
        epoch: id,
        chain: restored.chain,
        bytes_read: restored.bytes_read,
        restore_s: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        epoch = id,
        chain = restored.chain,
        bytes = restored.bytes_read,
        "restored"
    );
    let parent = a
        .session
        .snapshot_dir
        .as_deref()
        .filter(|d| same_dir(d, &a.dir))
        .map(|_| id);
    drop(store);
    session::execute(
        restored.machine,
        "restore",
        &a.session,
        pre,
        Some(from),
        parent,
        started,
    )
}
