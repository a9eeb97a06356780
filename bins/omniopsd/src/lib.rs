//! The `omniopsd` command's parts as a library: what the binary runs, and what the fuzz targets
//! (`fuzz/`) feed arbitrary bytes, through the same functions (train config TOML, manifest
//! JSONL, WAV and PNG media). `main.rs` only parses the command line and dispatches.

pub mod data;
pub mod eval_mer;
pub mod export;
pub mod infer;
pub mod inputs;
pub mod predict;
pub mod rationale;
pub mod train;
