//! One OPSD training step on a Qwen2 checkpoint, timed: the Rust half of
//! `benches/compare/train_step.py`, which runs the same step in PyTorch on the same weights.
//!
//! The step (`OpsdTrainer::step` on `Autodiff<NdArray<f32>>`): `G` rollouts of exactly
//! `--new` tokens from the student prompt (temperature 1, no stop token), the live teacher
//! (same weights, no graph) on the privileged prompt (student prompt + `--privileged` more
//! tokens), full-vocabulary generalized JSD β = 0.5 per response token, backward, AdamW.
//! Prints one JSON line: the seconds of every step (the first is a warm-up).
//!
//! `cargo run --release -p omniopsd-benches --example train_step -- --model DIR
//! [--steps 4] [--prompt 64] [--privileged 64] [--group 4] [--new 32]`

use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use omniopsd_benches::{count, flag_values};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::divergence::{Divergence, LossConfig};
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::step::{Episode, OpsdConfig, OpsdTrainer};
use omniopsd_core::teacher::TeacherMode;
use omniopsd_decoder::{Qwen2Model, TokenPrompt};
use serde_json::json;

#[cfg(not(feature = "flex"))]
type B = Autodiff<burn::backend::NdArray<f32>>;
/// `--features flex`: Burn's Flex CPU backend.
#[cfg(feature = "flex")]
type B = Autodiff<burn::backend::Flex<f32>>;

struct Args {
    model: PathBuf,
    steps: usize,
    prompt: usize,
    privileged: usize,
    group: usize,
    new: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: PathBuf::new(),
        steps: 4,
        prompt: 64,
        privileged: 64,
        group: 4,
        new: 32,
    };
    for (flag, value) in flag_values()? {
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--steps" => args.steps = count(&flag, &value, 2)?,
            "--prompt" => args.prompt = count(&flag, &value, 1)?,
            "--privileged" => args.privileged = count(&flag, &value, 0)?,
            "--group" => args.group = count(&flag, &value, 1)?,
            "--new" => args.new = count(&flag, &value, 1)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// Deterministic token ids in `1..vocab` (the same formula as the Python side).
fn ids(start: usize, len: usize, vocab: usize) -> Vec<u32> {
    (start..start + len)
        .map(|i| (1 + (i * 7919) % (vocab - 1)) as u32)
        .collect()
}

fn main() -> Result<(), String> {
    omniopsd_backends::keep_freed_memory();
    let args = parse_args()?;
    let ckpt = Checkpoint::open(&args.model).map_err(|e| e.to_string())?;
    let model =
        Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default()).map_err(|e| e.to_string())?;
    let vocab = model.config().vocab_size;
    let student = ids(0, args.prompt, vocab);
    let mut teacher = student.clone();
    teacher.extend(ids(args.prompt, args.privileged, vocab));
    let episode = Episode {
        student: TokenPrompt::new(student),
        teacher: TokenPrompt::new(teacher),
    };
    let config = OpsdConfig {
        rollout: RolloutConfig {
            samples_per_prompt: args.group,
            max_new_tokens: args.new,
            stop_tokens: Vec::new(),
            ..RolloutConfig::default()
        },
        loss: LossConfig {
            divergence: Divergence::Jsd { beta: 0.5 },
            ..LossConfig::default()
        },
        teacher: TeacherMode::Live,
        learning_rate: 1e-5,
        max_grad_norm: None,
        ..OpsdConfig::default()
    };
    let mut trainer = OpsdTrainer::new(model, config).map_err(|e| e.to_string())?;
    let mut seconds = Vec::with_capacity(args.steps);
    let mut tokens = 0;
    for _ in 0..args.steps {
        let start = Instant::now();
        let m = trainer
            .step(std::slice::from_ref(&episode))
            .map_err(|e| e.to_string())?;
        seconds.push(start.elapsed().as_secs_f64());
        tokens = m.valid_tokens;
    }
    println!(
        "{}",
        json!({ "step_seconds": seconds, "response_tokens": tokens })
    );
    Ok(())
}
