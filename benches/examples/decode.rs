//! Decode throughput of the Qwen2 decoder with its KV cache: the Rust half of
//! `benches/compare/decode.py`, which builds the checkpoint, runs transformers' `generate` on
//! the same weights and prints the ratio.
//!
//! For each prompt of `--prompts` (a JSON list of `{"context": n, "ids": [...]}`) and each
//! repeat: prefill the prompt and pick the first token (timed as `prefill_seconds`), then
//! `new_tokens − 1` greedy steps, each one cached decode step, the LM head and a host argmax,
//! as `Qwen2Model::generate_greedy` does (timed as `decode_seconds`). Prints one JSON line
//! per prompt, with the per-step times of the first repeat and the generated ids (of the first
//! sequence). `--batch n` decodes `n` sequences of the prompt together, as a rollout group
//! does (the prompt is prefilled once and its cache shared).
//!
//! `cargo run --release -p omniopsd-benches --example decode -- --model DIR --prompts FILE
//! [--new-tokens 64] [--repeats 3] [--batch 1]`

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use omniopsd_benches::{count, flag_values};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::PolicyModel;
use omniopsd_decoder::{Qwen2Model, TokenPrompt};
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
        new_tokens: 64,
        repeats: 3,
        batch: 1,
    };
    for (flag, value) in flag_values()? {
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--prompts" => args.prompts = value.into(),
            "--new-tokens" => args.new_tokens = count(&flag, &value, 2)?,
            "--repeats" => args.repeats = count(&flag, &value, 1)?,
            "--batch" => args.batch = count(&flag, &value, 1)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// First index of the largest logit, as `generate`'s argmax.
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Next token of each of the `n` rows of `hidden: [n, H]`: logits from the model's
/// `step_logits`, as `generate_greedy` and the rollout compute them, then a host argmax per row.
fn next_tokens(model: &Qwen2Model<B>, hidden: Tensor<B, 2>) -> Result<Vec<u32>, String> {
    let n = hidden.dims()[0];
    let logits = model
        .step_logits(hidden)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| format!("reading logits: {e:?}"))?;
    let v = logits.len() / n;
    Ok(logits.chunks(v).map(argmax).collect())
}

/// One greedy run of `batch` sequences: `(prefill seconds, per-step decode seconds, ids of
/// the first sequence)`.
fn run(
    model: &Qwen2Model<B>,
    prompt: &TokenPrompt,
    new_tokens: usize,
    batch: usize,
) -> Result<(f64, Vec<f64>, Vec<u32>), String> {
    let device = Default::default();
    let start = Instant::now();
    let (hidden, mut cache) = model.prefill(prompt, batch);
    let mut tokens = next_tokens(model, hidden)?;
    let prefill = start.elapsed().as_secs_f64();
    let mut ids = vec![tokens[0]];
    let mut steps = Vec::with_capacity(new_tokens);
    for _ in 1..new_tokens {
        let step = Instant::now();
        let input: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let input = Tensor::<B, 1, Int>::from_data(TensorData::new(input, [batch]), &device);
        let hidden = model.decode(input, &mut cache);
        tokens = next_tokens(model, hidden)?;
        steps.push(step.elapsed().as_secs_f64());
        ids.push(tokens[0]);
    }
    Ok((prefill, steps, ids))
}

fn main() -> Result<(), String> {
    omniopsd_backends::keep_freed_memory();
    let args = parse_args()?;
    let ckpt = Checkpoint::open(&args.model).map_err(|e| e.to_string())?;
    let model =
        Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default()).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(&args.prompts)
        .map_err(|e| format!("{}: {e}", args.prompts.display()))?;
    let prompts: Vec<Value> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", args.prompts.display()))?;
    for entry in prompts {
        let ids: Vec<u32> = serde_json::from_value(entry["ids"].clone())
            .map_err(|e| format!("{}: ids: {e}", args.prompts.display()))?;
        let prompt = TokenPrompt::new(ids);
        model.check_prompt(&prompt).map_err(|e| e.to_string())?;
        // One untimed run warms the allocator and the caches.
        run(&model, &prompt, 4, args.batch)?;
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        let mut first = None;
        for _ in 0..args.repeats {
            let (p, steps, ids) = run(&model, &prompt, args.new_tokens, args.batch)?;
            prefill.push(p);
            decode.push(steps.iter().sum::<f64>());
            first.get_or_insert((steps, ids));
        }
        let (steps, ids) = first.unwrap_or_default();
        println!(
            "{}",
            json!({
                "context": entry["context"],
                "batch": args.batch,
                "new_tokens": args.new_tokens,
                "prefill_seconds": prefill,
                "decode_seconds": decode,
                "step_seconds": steps,
                "ids": ids,
            })
        );
    }
    Ok(())
}
