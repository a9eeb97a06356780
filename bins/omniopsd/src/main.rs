//! `omniopsd`: rationale-privileged on-policy self-distillation from the command line.

use clap::{Parser, Subcommand};

/// Rationale-privileged on-policy self-distillation (OmniOPSD) for omni-modal LLMs.
#[derive(Debug, Parser)]
#[command(name = "omniopsd", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {};
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
