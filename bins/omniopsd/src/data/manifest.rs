//! The JSONL manifest: one sample a line, media paths relative to the manifest's directory.
//!
//! ```json
//! {"id": "synth-00007", "split": "train", "audio": "audio/synth-00007.wav",
//!  "video": "frames/synth-00007", "subtitle": "Oh great, another meeting.",
//!  "rationale": "Audio: ... Visual: ... Text: ...", "emotion": "angry",
//!  "sentiment": -1.8, "openset": ["angry", "annoyed", "sarcastic"], "conflict": "sarcasm"}
//! ```
//!
//! Labels follow MER-UniBench. A sample without `dataset` carries all three kinds: `emotion`
//! one of the MER2023/MER2024 basic labels (scored by HIT), `sentiment` a CMU-MOSI-style score
//! in `[-3, 3]` (scored by WAF on its sign), and `openset` an OV-MERD+-style open-vocabulary
//! set (scored by F_s). A sample of one of the nine test sets (`"dataset": "MELD"`, …) carries
//! only the label its dataset has, from that dataset's label set or range
//! ([`super::datasets`]); one of any other dataset carries any of the three kinds.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::media;
use super::video::VideoOptions;

/// The basic-emotion labels of MER2023 / MER2024, the HIT-scored sets of MER-UniBench.
pub const BASIC_EMOTIONS: [&str; 6] = ["happy", "sad", "angry", "surprise", "worried", "neutral"];

/// Which part of the corpus a sample belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Used for training.
    Train,
    /// Used only for evaluation.
    Heldout,
}

/// One manifest line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unique sample id.
    pub id: String,
    /// Train or held-out.
    pub split: Split,
    /// The dataset it belongs to: one of MER-UniBench's nine (`OV-MERD+`, `MER2023`,
    /// `MER2024`, `IEMOCAP`, `MELD`, `CMU-MOSI`, `CMU-MOSEI`, `CH-SIMS`, `CH-SIMS-v2`), or any
    /// other name. Absent: a sample with all three label kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Audio file (WAV at any rate, MP3, FLAC, M4A/AAC, Ogg, …), relative to the manifest's
    /// directory (or absolute). Absent: the video file's own sound track.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<String>,
    /// A video file (`.mp4`, `.avi`, `.mkv`, `.webm`, `.mov`, …) or a directory of PNG frames
    /// in name order, relative to the manifest's directory (or absolute).
    pub video: String,
    /// What the speaker says.
    pub subtitle: String,
    /// Evidence-aware rationale citing audio, visual and textual cues (the privileged block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale: Option<String>,
    /// The model that wrote the rationale, when `omniopsd rationale` did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale_model: Option<String>,
    /// The prompt template that asked for it: its file name (`default` for the shipped one)
    /// and the first 12 hex digits of its SHA-256, e.g. `default@3f2a9c0d4e1b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale_prompt: Option<String>,
    /// The basic emotion: one of [`BASIC_EMOTIONS`] without a dataset, else one of the
    /// dataset's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emotion: Option<String>,
    /// Sentiment score in `[-3, 3]` (CH-SIMS: `[-1, 1]`); `0` is neutral.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentiment: Option<f64>,
    /// Open-vocabulary emotion labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openset: Option<Vec<String>>,
    /// Why the subtitle alone misleads (`sarcasm`, `masking`, `understatement`), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
}

/// Limits a manifest is checked against.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Longest audio accepted, in seconds.
    pub max_audio_seconds: f64,
    /// Most frames accepted per directory of frames.
    pub max_frames: usize,
    /// How frames of a video file are sampled and sized.
    pub video: VideoOptions,
    /// Whether a sample must carry a rationale (OPSD's privileged context needs one).
    pub require_rationale: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_audio_seconds: 30.0,
            max_frames: 64,
            video: VideoOptions::default(),
            require_rationale: true,
        }
    }
}

/// One thing wrong with a manifest, at a 1-based line.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// Line number in the manifest (1-based).
    pub line: usize,
    /// What is wrong, naming the field or file.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// A parsed manifest: the records that passed every check, with their line numbers, and the
/// problems of the others.
#[derive(Clone, Debug, Default)]
pub struct Checked {
    /// `(line, record)` of every valid sample, in file order.
    pub records: Vec<(usize, Record)>,
    /// Every problem found, in file order.
    pub problems: Vec<Problem>,
    /// Non-blank lines read.
    pub lines: usize,
    /// Ids of the samples whose `rationale` is absent or empty, in file order (listed
    /// whether or not the limits require one).
    pub missing_rationale: Vec<String>,
}

/// Resolves a manifest path field against the manifest's directory.
pub fn resolve(base: &Path, field: &str) -> PathBuf {
    let p = Path::new(field);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Checks one record's fields and media; every problem found is pushed, not just the first.
pub fn check_record(record: &Record, base: &Path, limits: &Limits) -> Vec<String> {
    let mut problems = Vec::new();
    if record.id.trim().is_empty() {
        problems.push("field `id` is empty".to_string());
    }
    problems.extend(super::datasets::check_labels(record));
    if record.subtitle.trim().is_empty() {
        problems.push("field `subtitle` is empty".to_string());
    }
    let rationale_missing = record
        .rationale
        .as_deref()
        .is_none_or(|r| r.trim().is_empty());
    if limits.require_rationale && rationale_missing {
        problems.push(format!(
            "missing rationale: field `rationale` of sample `{}` is absent or empty, and OPSD's \
             teacher needs it (`omniopsd rationale` writes one)",
            record.id
        ));
    }
    // The media are decoded as training decodes them (a video file's sampled frames, not
    // kept), so a truncated file is found here rather than mid-run.
    let video = resolve(base, &record.video);
    let read = if crate::inputs::is_video_file(&video) {
        super::video::check_video(&video, &limits.video).map(drop)
    } else {
        media::read_frames(&video, limits.max_frames).map(drop)
    };
    let video_failed = read.is_err();
    if let Err(err) = read {
        problems.push(format!("{err:#}"));
    }
    // A video's own track is not read again when the video itself is unreadable.
    if !(record.audio.is_none() && video_failed) {
        let audio = crate::inputs::record_audio_path(record, base)
            .and_then(|path| media::read_audio(&path, limits.max_audio_seconds));
        if let Err(err) = audio {
            problems.push(format!("{err:#}"));
        }
    }
    problems
}

/// Parses and checks a whole manifest; returns `Err` only when the file itself cannot be read.
pub fn check_manifest(path: &Path, limits: &Limits) -> Result<Checked> {
    let text =
        fs::read_to_string(path).with_context(|| format!("reading manifest {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut checked = Checked::default();
    let mut seen = HashSet::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        checked.lines += 1;
        let record: Record = match serde_json::from_str(raw) {
            Ok(r) => r,
            Err(err) => {
                let what = if err.is_data() {
                    "bad sample"
                } else {
                    "bad JSON"
                };
                checked.problems.push(Problem {
                    line,
                    message: format!("{what}: {err}"),
                });
                continue;
            }
        };
        if record
            .rationale
            .as_deref()
            .is_none_or(|r| r.trim().is_empty())
        {
            checked.missing_rationale.push(record.id.clone());
        }
        let mut problems = check_record(&record, base, limits);
        if !seen.insert(record.id.clone()) {
            problems.push(format!("duplicate id `{}`", record.id));
        }
        if problems.is_empty() {
            checked.records.push((line, record));
        } else {
            checked.problems.extend(
                problems
                    .into_iter()
                    .map(|message| Problem { line, message }),
            );
        }
    }
    Ok(checked)
}

/// Writes records as JSONL, atomically: a manifest that exists is complete.
pub fn write_manifest(path: &Path, records: &[Record]) -> Result<()> {
    let mut out = String::new();
    for r in records {
        out.push_str(&serde_json::to_string(r).context("serializing a manifest record")?);
        out.push('\n');
    }
    Ok(omniopsd_checkpoint::atomic::write_atomic(
        path,
        out.as_bytes(),
    )?)
}

/// The sentiment word of a sentiment score: its sign, as CMU-MOSI's labels read it.
pub fn sentiment_word(score: f64) -> &'static str {
    if score > 0.0 {
        "positive"
    } else if score < 0.0 {
        "negative"
    } else {
        "neutral"
    }
}
