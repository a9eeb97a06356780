//! `omniopsd export`: a LoRA adapter merged into its base model (`W + s·B·A` on every adapted
//! projection, PEFT's `merge_and_unload`), written as a plain Hugging Face checkpoint that
//! transformers loads with `from_pretrained` and that needs no PEFT.
//!
//! Invariant: never overwrites; everything is written into a staging directory beside `--out`
//! and renamed to it at the end, so a failure leaves no `--out` at all.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::backend::NdArray;
use clap::Args;
use omniopsd_checkpoint::{Checkpoint, Dtype};
use omniopsd_decoder::{PeftAdapter, Qwen2Model};

/// Files of the base checkpoint that describe tokenization and generation; copied as they are.
const COPIED: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
];

/// Arguments of `omniopsd export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The base checkpoint the adapter was made for (a Qwen2ForCausalLM directory).
    #[arg(long)]
    pub model: PathBuf,
    /// The LoRA adapter directory (PEFT's adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Where to write the merged checkpoint; must not exist yet.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Stored float type of the merged weights: f32, bf16 or f16 (the merge itself is f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// `omniopsd export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" => Dtype::F32,
        "bf16" => Dtype::Bf16,
        "f16" => Dtype::F16,
        other => bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    if args.out.exists() {
        bail!(
            "--out {}: already exists; export never overwrites (choose a new directory)",
            args.out.display()
        );
    }
    let ckpt = Checkpoint::open(&args.model)
        .with_context(|| format!("opening the base checkpoint in {}", args.model.display()))?;
    if ckpt.layout().is_multimodal() {
        bail!(
            "{}: a Qwen2.5-Omni checkpoint; merged export writes Qwen2ForCausalLM checkpoints \
             only (use --adapter with score or generate to run the adapter on a thinker)",
            args.model.display()
        );
    }
    let adapter = PeftAdapter::open(&args.adapter)
        .with_context(|| format!("opening the LoRA adapter in {}", args.adapter.display()))?;
    let device = Default::default();
    let merged = Qwen2Model::<NdArray<f32>>::from_checkpoint(&ckpt, &device)
        .with_context(|| format!("loading the base model in {}", args.model.display()))?
        .with_adapter(&adapter, ckpt.model_weights().prefix())
        .with_context(|| {
            format!(
                "applying the LoRA adapter in {} to the model in {}",
                args.adapter.display(),
                args.model.display()
            )
        })?
        .merge_adapters();

    let staging = staging_dir(&args.out)?;
    let written = (|| -> Result<()> {
        merged
            .save_pretrained(&staging, dtype)
            .context("writing the merged weights")?;
        for name in COPIED {
            let from = args.model.join(name);
            if from.is_file() {
                std::fs::copy(&from, staging.join(name))
                    .with_context(|| format!("copying {}", from.display()))?;
            }
        }
        Ok(())
    })();
    let renamed = written.and_then(|()| {
        if args.out.exists() {
            bail!(
                "--out {}: appeared while exporting; not overwritten",
                args.out.display()
            );
        }
        std::fs::rename(&staging, &args.out)
            .with_context(|| format!("renaming {} to --out", staging.display()))
    });
    if let Err(e) = renamed {
        // Best effort: the staging directory is ours and holds nothing else.
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    println!(
        "{}: {} merged with the LoRA adapter {}",
        args.out.display(),
        args.model.display(),
        args.adapter.display()
    );
    Ok(())
}

/// A new, empty directory beside `out`, named after it.
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .with_context(|| format!("--out {}: not a directory name", out.display()))?;
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir(&staging)
        .with_context(|| format!("creating the staging directory {}", staging.display()))?;
    Ok(staging)
}
