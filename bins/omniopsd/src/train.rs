//! `omniopsd train`: OmniOPSD end to end, from a config file or the embedded default.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod plot;
pub mod progress;
pub mod report;
pub mod run_dir;
pub mod tokenizer;
