//! Shared helpers of the CLI tests.

#![allow(dead_code)]

pub mod chat_server;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_omniopsd");

/// A run small enough for the test profile: one seed, two methods, a checkpoint per update.
pub fn tiny_run_config(dir: &Path, name: &str, cache: &Path, extra: &str) -> PathBuf {
    tiny_run_config_with(dir, name, cache, 4, "", extra)
}

/// [`tiny_run_config`] with `warmup_steps` warm-up updates and `opsd` added to `[opsd]`.
pub fn tiny_run_config_with(
    dir: &Path,
    name: &str,
    cache: &Path,
    warmup_steps: usize,
    opsd: &str,
    extra: &str,
) -> PathBuf {
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
steps = {warmup_steps}
batch_size = 2
[opsd]
steps = 4
batch_size = 2
grad_accumulation = 1
samples_per_prompt = 2
max_new_tokens = 8
lr_warmup_steps = 1
{opsd}
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

/// `omniopsd train ARGS --quiet`, run to the end.
pub fn train(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("train")
        .args(args)
        .arg("--quiet")
        .output()
        .expect("runs the binary")
}

/// `omniopsd train ARGS --quiet`, started (stderr piped).
pub fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("train")
        .args(args)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns the binary")
}

/// Asserts a successful exit, showing stderr otherwise.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the child with SIGKILL once `path` exists (a checkpoint it wrote), and reaps it.
pub fn kill_when(mut child: Child, path: &Path) {
    wait_for(&mut child, path);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Waits until `path` exists (the child is making progress) or the child exits.
pub fn wait_for(child: &mut Child, path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the run ended ({status}) before {} appeared",
                path.display()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(600), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}
