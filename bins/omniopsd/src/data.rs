//! `omniopsd data`: generate the synthetic corpus, import a dataset's labels, validate
//! manifests.

pub mod datasets;
pub mod import;
pub mod manifest;
pub mod media;
pub mod synth;
pub mod video;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

/// Corpus tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a deterministic synthetic omni-modal affect corpus (16 kHz WAV speech whose
    /// prosody carries the emotion, PNG frames of a drawn face, subtitles that sometimes mislead,
    /// evidence-aware rationales, MER-UniBench labels) in the manifest format.
    Synth(SynthArgs),
    /// Validate a JSONL manifest and list every problem with its line number; exits non-zero
    /// if there is any.
    Check(CheckArgs),
    /// Build a manifest from a dataset's labels file (CSV, TSV, JSON, JSONL) and media folder,
    /// mapping its columns to the manifest's fields.
    Import(import::ImportArgs),
}

/// Arguments of `data synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory (gets manifest.jsonl, audio/, frames/).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 480)]
    pub n: usize,
    /// Seed: the same seed gives byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of samples placed in the held-out split.
    #[arg(long, default_value_t = 0.2)]
    pub heldout_fraction: f64,
    /// Video frames per sample (expression ramps from onset to apex).
    #[arg(long, default_value_t = 4)]
    pub frames: usize,
    /// Frame width = height in pixels (>= 28).
    #[arg(long, default_value_t = 56)]
    pub size: u32,
    /// Probability that an emotional sample's subtitle misleads (sarcasm, masking, understatement).
    #[arg(long, default_value_t = 0.25)]
    pub conflict_rate: f64,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `data check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The JSONL manifest.
    pub manifest: PathBuf,
    /// Longest audio accepted, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub max_audio_seconds: f64,
    /// Most frames accepted per directory of frames.
    #[arg(long, default_value_t = 64)]
    pub max_frames: usize,
    /// How video files are sampled (their sampled frames are decoded to check them).
    #[command(flatten)]
    pub video: crate::inputs::VideoArgs,
    /// Accept samples without a rationale (only label-SFT can use them).
    #[arg(long)]
    pub allow_missing_rationale: bool,
}

/// Runs a `data` subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Import(args) => import::run(args),
        Command::Synth(args) => {
            let cfg = synth::SynthConfig {
                n: args.n,
                seed: args.seed,
                heldout_fraction: args.heldout_fraction,
                frames: args.frames,
                size: args.size,
                conflict_rate: args.conflict_rate,
            };
            let bar = crate::train::progress::bar(args.n as u64, "synth", args.quiet);
            let records = synth::synthesize(&args.out, &cfg, |i| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            let heldout = records
                .iter()
                .filter(|r| r.split == manifest::Split::Heldout)
                .count();
            if !args.quiet {
                println!(
                    "wrote {} samples ({} train, {} held-out) to {}",
                    records.len(),
                    records.len() - heldout,
                    heldout,
                    args.out.join("manifest.jsonl").display()
                );
            }
            Ok(())
        }
        Command::Check(args) => {
            if !(args.max_audio_seconds.is_finite() && args.max_audio_seconds > 0.0) {
                bail!(
                    "--max-audio-seconds {}: must be a finite number > 0",
                    args.max_audio_seconds
                );
            }
            let limits = manifest::Limits {
                max_audio_seconds: args.max_audio_seconds,
                max_frames: args.max_frames,
                video: args.video.options()?,
                require_rationale: !args.allow_missing_rationale,
            };
            let checked = manifest::check_manifest(&args.manifest, &limits)?;
            let name = args.manifest.display();
            for p in &checked.problems {
                println!("{name}:{}: {}", p.line, p.message);
            }
            if !checked.missing_rationale.is_empty() {
                println!(
                    "{name}: {} samples lack a rationale: {}",
                    checked.missing_rationale.len(),
                    checked.missing_rationale.join(", ")
                );
            }
            if checked.problems.is_empty() {
                println!("{name}: {} samples, all valid", checked.records.len());
                Ok(())
            } else {
                let bad: std::collections::BTreeSet<usize> =
                    checked.problems.iter().map(|p| p.line).collect();
                bail!(
                    "{name}: {} problems on {} of {} lines",
                    checked.problems.len(),
                    bad.len(),
                    checked.lines
                )
            }
        }
    }
}
