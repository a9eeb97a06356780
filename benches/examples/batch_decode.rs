//! Answers per second of greedy decoding over a set of prompts of different lengths, several
//! prompts per forward pass: the Rust half of `benches/compare/predict.py`, which builds the
//! checkpoint, runs transformers' `generate` on the same left-padded batches and prints the
//! ratio.
//!
//! The prompts of `--prompts` (a JSON list of `{"ids": [...]}`) are decoded in order, `--batch`
//! at a time, each for exactly `--new-tokens` tokens (no stop token), by
//! `Qwen2Model::generate_batch` with a host argmax: what `omniopsd predict --batch-size`
//! does per batch, without media and tokenizer. Each repeat times the whole set (prefills
//! included). Prints one JSON line: the seconds of each repeat and every prompt's ids.
//!
//! `cargo run --release -p omniopsd-benches --example batch_decode -- --model DIR --prompts FILE
//! [--new-tokens 24] [--repeats 3] [--batch 8]`

use std::path::PathBuf;
use std::time::Instant;

use omniopsd_benches::{count, flag_values};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_decoder::{argmax_first, Error, Qwen2Model, TokenPrompt};
use serde_json::{json, Value};

/// NdArray, or Flex (`--features flex`), or CUDA in bf16 (`--features cuda`).
type B = omniopsd_benches::Bench;

struct Args {
    model: PathBuf,
    prompts: PathBuf,
    new_tokens: usize,
    repeats: usize,
    batch: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: PathBuf::new(),
        prompts: PathBuf::new(),
        new_tokens: 24,
        repeats: 3,
        batch: 8,
    };
    for (flag, value) in flag_values()? {
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--prompts" => args.prompts = value.into(),
            "--new-tokens" => args.new_tokens = count(&flag, &value, 1)?,
            "--repeats" => args.repeats = count(&flag, &value, 1)?,
            "--batch" => args.batch = count(&flag, &value, 1)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// Every prompt's greedy ids, `batch` prompts per `generate_batch` call.
fn decode_all(
    model: &Qwen2Model<B>,
    prompts: &[TokenPrompt],
    new_tokens: usize,
    batch: usize,
) -> Result<Vec<Vec<u32>>, String> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch) {
        let refs: Vec<&TokenPrompt> = chunk.iter().collect();
        let ids = model
            .generate_batch(&refs, new_tokens, &[], |_, _, logits| {
                Ok::<_, Error>(argmax_first(logits))
            })
            .map_err(|e| e.to_string())?;
        out.extend(ids);
    }
    Ok(out)
}

fn main() -> Result<(), String> {
    omniopsd_backends::keep_freed_memory();
    let args = parse_args()?;
    let ckpt = Checkpoint::open(&args.model).map_err(|e| e.to_string())?;
    let model =
        Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default()).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(&args.prompts)
        .map_err(|e| format!("{}: {e}", args.prompts.display()))?;
    let entries: Vec<Value> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", args.prompts.display()))?;
    let prompts = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            serde_json::from_value(e["ids"].clone())
                .map(TokenPrompt::new)
                .map_err(|err| format!("{}: prompt {i}: ids: {err}", args.prompts.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // One untimed batch warms the allocator and the caches.
    decode_all(
        &model,
        &prompts[..args.batch.min(prompts.len())],
        2,
        args.batch,
    )?;
    let mut seconds = Vec::with_capacity(args.repeats);
    let mut ids = Vec::new();
    for _ in 0..args.repeats {
        let start = Instant::now();
        ids = decode_all(&model, &prompts, args.new_tokens, args.batch)?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        json!({
            "batch": args.batch,
            "prompts": prompts.len(),
            "new_tokens": args.new_tokens,
            "seconds": seconds,
            "ids": ids,
        })
    );
    Ok(())
}
