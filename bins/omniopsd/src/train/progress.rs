//! Progress bars (indicatif) that disappear under `--quiet` / `--json-logs` and when stderr is
//! not a terminal, so scripts and CI logs stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar with ETA and a live message (the loss), or a hidden one when `quiet`.
pub fn bar(len: u64, prefix: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>8.bold} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar
}

/// A bar for work counted in items: position, items per second and ETA.
pub fn rate_bar(len: u64, prefix: &str, quiet: bool) -> ProgressBar {
    let bar = self::bar(len, prefix, quiet);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>8.bold} [{bar:30}] {pos}/{len} {per_sec} {elapsed_precise} eta {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
