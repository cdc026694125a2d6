//! `consnap verify`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use crate::progress::Bar;

/// Options of `consnap verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Snapshot directory.
    pub dir: PathBuf,
}

/// Check every byte of a store; exit status 1 on any problem, each named
/// with its file, byte offsets and what is wrong.
pub fn verify(a: VerifyArgs) -> Result<i32, String> {
    let bar = Bar::new("verifying", false);
    let v = store::verify(&a.dir, &mut |done, total| bar.update(done, total)).map_err(|e| e.to_string())?;
    bar.finish();
    let mut out = std::io::stdout().lock();
    let mut print = || -> std::io::Result<()> {
        for p in &v.problems {
            writeln!(out, "{p}")?;
        }
        for n in &v.notes {
            writeln!(out, "note: {n}")?;
        }
        writeln!(
            out,
            "{}: {} epochs, {} checked: {}",
            a.dir.display(),
            v.epochs,
            crate::ls_cmd::human(v.bytes),
            match v.problems.len() {
                0 => "no problems".to_string(),
                1 => "1 problem".to_string(),
                n => format!("{n} problems"),
            }
        )
    };
    match print() {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(format!("cannot write the report: {e}")),
    }
    Ok(i32::from(!v.problems.is_empty()))
}
