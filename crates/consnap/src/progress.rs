//! Progress bars for `restore`, `compact` and `verify`: drawn on stderr
//! when it is a terminal, nothing otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar, or nothing when stderr is not a terminal.
#[derive(Debug)]
pub struct Bar(Option<ProgressBar>);

impl Bar {
    /// A bar labelled `what`, counting bytes when `bytes`, else items.
    pub fn new(what: &str, bytes: bool) -> Bar {
        if !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let template = if bytes {
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}"
        } else {
            "{msg} {bar:30} {pos}/{len}"
        };
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
            .with_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
        bar.set_message(what.to_string());
        Bar(Some(bar))
    }

    /// Done so far, of total.
    pub fn update(&self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
