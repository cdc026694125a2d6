//! Making a rename or removal durable: fsync of the directory that holds it.

use std::fs::File;
use std::path::Path;

use crate::error::{Result, io};

/// fsync `dir`, so that a rename or removal in it survives a crash.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync directory"))
}
