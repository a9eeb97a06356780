//! `omniopsd`: rationale-privileged on-policy self-distillation from the command line.

use clap::{Parser, Subcommand};
use omniopsd_cli::{data, eval_mer, export, infer, predict, rationale, train};

/// Rationale-privileged on-policy self-distillation (OmniOPSD) for omni-modal LLMs.
#[derive(Debug, Parser)]
#[command(name = "omniopsd", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train with rationale-privileged on-policy self-distillation; without --config, the
    /// embedded default: synthetic corpus, tiny omni model, every ablation, 3 seeds.
    Train(train::Args),
    /// Corpus tools: generate the synthetic corpus, validate a manifest.
    #[command(subcommand)]
    Data(data::Command),
    /// Write evidence-aware rationales for the training samples that lack one, with a
    /// frontier model behind any OpenAI-compatible endpoint (frames, audio, subtitle and gold
    /// labels in; cached, resumable, validated).
    Rationale(rationale::Args),
    /// Score predictions on MER-UniBench (F_s, HIT, WAF, nine-dataset mean).
    #[command(name = "eval-mer")]
    EvalMer(eval_mer::Args),
    /// Per-token log-probs of a response given a prompt; with --privileged, the teacher view
    /// and the per-token teacher - student gap.
    Score(infer::ScoreArgs),
    /// Generate a response: greedy at temperature 0, else the trainer's rollout sampler.
    Generate(infer::GenerateArgs),
    /// Run a model over a manifest's samples and write eval-mer's input (resumable; --score
    /// scores it).
    Predict(predict::PredictArgs),
    /// Merge a LoRA adapter into its base model and write the result as a plain checkpoint.
    Export(export::ExportArgs),
    /// The memory one OPSD update of a config needs (weights, gradients, AdamW, teacher,
    /// activations, loss, rollout), against the device's memory; exit 1 when it does not fit.
    Plan(train::plan::PlanArgs),
    /// The global orchestrator of a multi-node data-parallel run (burn-collective's): start
    /// it once, then `train` on every node with a [cluster] table naming it.
    Orchestrator(train::OrchestratorArgs),
}

fn main() -> std::process::ExitCode {
    omniopsd_backends::keep_freed_memory();
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Train(args) => train::run_cli(args),
        Command::Data(cmd) => data::run(cmd),
        Command::Rationale(args) => rationale::run(args),
        Command::EvalMer(args) => eval_mer::run(args),
        Command::Score(args) => infer::run_score(args),
        Command::Generate(args) => infer::run_generate(args),
        Command::Export(args) => export::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Plan(args) => train::plan::run(args),
        Command::Orchestrator(args) => train::run_orchestrator(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
