//! `runs/<name>/`: the resolved config, `metrics.jsonl`, plots, reports, checkpoints.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricLine {
    /// `train` (an update) or `eval` (held-out scores).
    pub kind: String,
    /// Method name.
    pub method: String,
    /// Seed.
    pub seed: u64,
    /// `warmup`, `opsd` or `sft`.
    pub phase: String,
    /// Updates done in this phase when measured.
    pub step: u64,
    /// Named values (loss, divergence, entropy, lr, grad_norm, hit, waf, fs, ...).
    pub values: serde_json::Map<String, serde_json::Value>,
}

/// An opened run directory.
pub struct RunDir {
    /// `runs/<name>`.
    pub root: PathBuf,
}

impl RunDir {
    /// Creates (or reopens) the run directory and checks that it is writable.
    pub fn create(root: &Path) -> Result<Self> {
        fs::create_dir_all(root)
            .with_context(|| format!("run directory {}: cannot create it", root.display()))?;
        let probe = root.join(".write-test");
        File::create(&probe)
            .and_then(|mut f| f.write_all(b"ok"))
            .with_context(|| format!("run directory {}: not writable", root.display()))?;
        let _ = fs::remove_file(&probe);
        for sub in ["plots", "checkpoints"] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("run directory {}: creating {sub}/", root.display()))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Opens an existing run directory for `--resume`.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.join("config.toml").is_file() {
            bail!(
                "--resume {}: not a run directory (no config.toml)",
                root.display()
            );
        }
        Self::create(root)
    }

    /// Whether the run has anything worth resuming: a metric line, a checkpoint or a finished
    /// training's result.
    pub fn holds_progress(&self) -> bool {
        let metrics = fs::metadata(self.metrics_path()).is_ok_and(|m| m.len() > 0);
        let any_entry = |sub: &str| {
            fs::read_dir(self.root.join(sub)).is_ok_and(|mut entries| entries.next().is_some())
        };
        metrics || self.any_checkpoint() || any_entry("results")
    }

    fn any_checkpoint(&self) -> bool {
        let Ok(phases) = fs::read_dir(self.root.join("checkpoints")) else {
            return false;
        };
        phases
            .filter_map(|p| p.ok())
            .any(|p| fs::read_dir(p.path()).is_ok_and(|mut files| files.next().is_some()))
    }

    /// Removes the run directory, or, when it existed before the run (`before`: its entries
    /// then), only the entries the run added.
    pub fn remove_all_but(&self, before: Option<&[std::ffi::OsString]>) -> std::io::Result<()> {
        let Some(before) = before else {
            return fs::remove_dir_all(&self.root);
        };
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            if before.contains(&entry.file_name()) {
                continue;
            }
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// Checkpoint directory of one phase (`warmup`, `opsd-seed0`, …).
    pub fn checkpoints(&self, phase: &str) -> PathBuf {
        self.root.join("checkpoints").join(phase)
    }

    /// Appends one line to `metrics.jsonl` and flushes it.
    pub fn append_metric(&self, line: &MetricLine) -> Result<()> {
        let path = self.metrics_path();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut text = serde_json::to_string(line).context("serializing a metric line")?;
        text.push('\n');
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Every metric line written so far (unparsable lines, e.g. one torn by a kill, dropped).
    pub fn read_metrics(&self) -> Result<Vec<MetricLine>> {
        let path = self.metrics_path();
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let mut out = Vec::new();
        for line in BufReader::new(f).lines() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if let Ok(m) = serde_json::from_str(&line) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Keeps only the metric lines `keep` accepts (after a resume, the lines a killed run
    /// wrote past its last checkpoint are dropped, so every step appears once).
    pub fn retain_metrics(&self, keep: impl Fn(&MetricLine) -> bool) -> Result<()> {
        let lines: Vec<MetricLine> = self
            .read_metrics()?
            .into_iter()
            .filter(|m| keep(m))
            .collect();
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l).context("serializing a metric line")?);
            text.push('\n');
        }
        Ok(omniopsd_checkpoint::atomic::write_atomic(
            &self.metrics_path(),
            text.as_bytes(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64) -> MetricLine {
        MetricLine {
            kind: "train".into(),
            method: "opsd".into(),
            seed: 0,
            phase: "opsd".into(),
            step,
            values: serde_json::Map::new(),
        }
    }

    #[test]
    fn metrics_append_read_and_retain() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r")).unwrap();
        for s in 0..5 {
            run.append_metric(&line(s)).unwrap();
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(run.metrics_path())
            .unwrap();
        f.write_all(b"{\"kind\":\"tr").unwrap();
        assert_eq!(run.read_metrics().unwrap().len(), 5, "torn line dropped");
        run.retain_metrics(|m| m.step < 3).unwrap();
        let steps: Vec<u64> = run.read_metrics().unwrap().iter().map(|m| m.step).collect();
        assert_eq!(steps, vec![0, 1, 2]);
    }

    #[test]
    fn run_dir_under_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let err = RunDir::create(&file.join("run")).err().unwrap();
        assert!(format!("{err:#}").contains("cannot create it"), "{err:#}");
    }
}
