//! Shared helpers of the CLI tests.

#![allow(dead_code)]

pub mod chat_server;

use std::fs;
use std::path::{Path, PathBuf};

/// A run small enough for the test profile: one seed, two methods, a checkpoint per update.
pub fn tiny_run_config(dir: &Path, name: &str, cache: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"name = "{name}"
runs_dir = "{runs}"
seeds = [0]
methods = ["opsd", "label-sft"]
[data]
cache_dir = "{cache}"
synth_n = 20
[model]
hidden_size = 32
intermediate_size = 64
[warmup]
steps = 4
batch_size = 2
[opsd]
steps = 4
batch_size = 2
samples_per_prompt = 2
max_new_tokens = 8
lr_warmup_steps = 1
[eval]
every = 100
max_samples = 3
max_new_tokens = 8
[checkpoint]
every = 1
keep_last = 10
{extra}
"#,
        runs = dir.join("runs").display(),
        cache = cache.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).unwrap();
    path
}
