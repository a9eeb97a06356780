//! One OPSD training step on a Qwen2 checkpoint, timed: the Rust half of
//! `benches/compare/train_step.py`, which runs the same step in PyTorch on the same weights,
//! and of `benches/gpu/run.sh` (CUDA, bf16).
//!
//! The step (`OpsdTrainer::step` on `Autodiff<B>`, `B` the benchmark backend: NdArray, Flex
//! with `--features flex`, CUDA in bf16 with `--features cuda`): `G` rollouts of exactly
//! `--new` tokens from the student prompt (temperature 1, no stop token), the live teacher
//! (same weights, no graph) on the privileged prompt (student prompt + `--privileged` more
//! tokens), full-vocabulary generalized JSD β = 0.5 per response token, backward, AdamW.
//! Prints one JSON line: the seconds of every step (the first is a warm-up), response tokens
//! per second and model FLOP/s over the median of the others, the step's model FLOPs by
//! pass (`omniopsd_benches::flops`), and on the CPU the heap: bytes live once the model is
//! loaded and the peak during the steps (a counting allocator; GPU memory is not counted).
//!
//! `--episodes E` puts `E` prompts (different ids, same lengths) in each step, one update,
//! and `--micro-batch M` holds `M` of them in memory at once (the trainer's `micro_batch`,
//! the CLI's `opsd.batch_size`): the peak grows with `M`, not with `E`.
//!
//! The weights: `--model DIR` (an HF checkpoint), or `--random CONFIG` (a `config.json`;
//! randomly initialised in a temporary directory, removed once loaded). `--lora R` trains
//! rank-`R` adapters (α = 2R, no dropout) on all seven projections with the base frozen, as
//! the OPSD reference code and PEFT do; the teacher is still the live policy (adapters on, no
//! graph), so both sides of `benches/compare/train_step.py --lora R` do the same work.
//!
//! `cargo run --release -p omniopsd-benches --example train_step -- (--model DIR | --random
//! CONFIG) [--steps 4] [--prompt 64] [--privileged 64] [--group 4] [--new 32] [--lora R]
//! [--episodes 1] [--micro-batch 1] [--checkpointing none|balanced]
//! [--precision native|bf16-mixed]`
//!
//! `--checkpointing balanced` runs on `Autodiff<_, BalancedCheckpointing>`: Burn recomputes
//! memory-bound operations in the backward pass instead of keeping their outputs.
//!
//! `--precision bf16-mixed` is the trainer's `precision = "bf16-mixed"`: f32 master weights
//! (`omniopsd_benches::BenchMaster`, `Cuda<f32>` on CUDA) with every projection's products in
//! bf16; the default, `native`, runs in the benchmark backend's own float type (bf16 on
//! CUDA, f32 on the CPU). NdArray has no bf16: use Flex or CUDA.

use std::path::PathBuf;
use std::time::Instant;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;
use omniopsd_benches::flops::{opsd_step_flops, StepShape};
use omniopsd_benches::init::write_random_qwen2;
use omniopsd_benches::{count, flag_values, CountingAllocator};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::divergence::{Divergence, LossConfig};
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::step::{OpsdConfig, OpsdTrainer};
use omniopsd_core::teacher::TeacherMode;
use omniopsd_decoder::{LoraConfig, Qwen2Model, LORA_TARGETS};
use serde_json::json;

type Plain = Autodiff<omniopsd_benches::Bench>;
type Balanced = Autodiff<omniopsd_benches::Bench, BalancedCheckpointing>;
type MixedPlain = Autodiff<omniopsd_benches::BenchMaster>;
type MixedBalanced = Autodiff<omniopsd_benches::BenchMaster, BalancedCheckpointing>;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

struct Args {
    model: PathBuf,
    random: Option<PathBuf>,
    steps: usize,
    prompt: usize,
    privileged: usize,
    group: usize,
    new: usize,
    lora: usize,
    episodes: usize,
    micro_batch: usize,
    checkpointing: bool,
    mixed: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: PathBuf::new(),
        random: None,
        steps: 4,
        prompt: 64,
        privileged: 64,
        group: 4,
        new: 32,
        lora: 0,
        episodes: 1,
        micro_batch: 1,
        checkpointing: false,
        mixed: false,
    };
    for (flag, value) in flag_values()? {
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--random" => args.random = Some(value.into()),
            "--steps" => args.steps = count(&flag, &value, 2)?,
            "--prompt" => args.prompt = count(&flag, &value, 1)?,
            "--privileged" => args.privileged = count(&flag, &value, 0)?,
            "--group" => args.group = count(&flag, &value, 1)?,
            "--new" => args.new = count(&flag, &value, 1)?,
            "--lora" => args.lora = count(&flag, &value, 0)?,
            "--episodes" => args.episodes = count(&flag, &value, 1)?,
            "--micro-batch" => args.micro_batch = count(&flag, &value, 1)?,
            "--checkpointing" => {
                args.checkpointing = match value.as_str() {
                    "none" => false,
                    "balanced" => true,
                    other => return Err(format!("--checkpointing: none or balanced, not {other}")),
                }
            }
            "--precision" => {
                args.mixed = match value.as_str() {
                    "native" => false,
                    "bf16-mixed" => true,
                    other => return Err(format!("--precision: native or bf16-mixed, not {other}")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn main() -> Result<(), String> {
    omniopsd_backends::keep_freed_memory();
    let args = parse_args()?;
    if args.mixed && !cfg!(any(feature = "flex", feature = "cuda")) {
        return Err(
            "--precision bf16-mixed needs bf16 tensors: build with --features flex or \
                    cuda (NdArray has none)"
                .into(),
        );
    }
    match (args.checkpointing, args.mixed) {
        (false, false) => bench::<Plain>(args),
        (true, false) => bench::<Balanced>(args),
        (false, true) => bench::<MixedPlain>(args),
        (true, true) => bench::<MixedBalanced>(args),
    }
}

fn bench<B: AutodiffBackend>(args: Args) -> Result<(), String> {
    let model = match &args.random {
        None => load::<B>(&args.model)?,
        Some(_) if !args.model.as_os_str().is_empty() => {
            return Err("give --model DIR or --random CONFIG, not both".into())
        }
        Some(config) => {
            let text = std::fs::read_to_string(config)
                .map_err(|e| format!("{}: {e}", config.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
            // A directory of our own (`create_dir` fails on one that exists), removed once
            // loaded whether or not loading worked.
            let dir = std::env::temp_dir().join(format!("omniopsd-random-{}", std::process::id()));
            std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let model = write_random_qwen2(&dir, &json, 0).and_then(|()| load::<B>(&dir));
            let _ = std::fs::remove_dir_all(&dir);
            model.map_err(|e| format!("{}: {e}", config.display()))?
        }
    };
    let model = match args.mixed {
        true => model.with_compute(Some(burn::tensor::FloatDType::BF16)),
        false => model,
    };
    let model = match args.lora {
        0 => model,
        r => {
            let lora = LoraConfig {
                r,
                lora_alpha: 2.0 * r as f64,
                lora_dropout: 0.0,
                target_modules: LORA_TARGETS.iter().map(|t| t.to_string()).collect(),
                use_rslora: false,
                placement: Default::default(),
            };
            model
                .with_new_adapters(&lora, 0)
                .map_err(|e| e.to_string())?
        }
    };
    let decoder = model.config().clone();
    let vocab = decoder.vocab_size;
    let episodes = omniopsd_benches::episodes(args.episodes, args.prompt, args.privileged, vocab);
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
        micro_batch: args.micro_batch,
        ..OpsdConfig::default()
    };
    let mut trainer = OpsdTrainer::new(model, config).map_err(|e| e.to_string())?;
    let mut seconds = Vec::with_capacity(args.steps);
    let mut tokens = 0;
    let loaded = ALLOC.live();
    ALLOC.reset_peak();
    for _ in 0..args.steps {
        let start = Instant::now();
        let m = trainer.step(&episodes).map_err(|e| e.to_string())?;
        // A GPU may still be running the optimizer's update: the step ends when it is done.
        <B as Backend>::sync(&Default::default()).map_err(|e| format!("device sync: {e:?}"))?;
        seconds.push(start.elapsed().as_secs_f64());
        tokens = m.valid_tokens;
    }
    let shape = StepShape {
        prompt: args.prompt,
        privileged: args.privileged,
        group: args.group,
        new: args.new,
    };
    let flops = match args.lora {
        0 => opsd_step_flops(&decoder, shape),
        _ => opsd_step_flops(&decoder, shape).frozen_base(),
    };
    let e = args.episodes as f64;
    let mut timed = seconds[1..].to_vec();
    timed.sort_by(f64::total_cmp);
    let median = timed[timed.len() / 2];
    println!(
        "{}",
        json!({
            "step_seconds": seconds,
            "response_tokens": tokens,
            "lora_rank": args.lora,
            "episodes": args.episodes,
            "micro_batch": args.micro_batch,
            "checkpointing": if args.checkpointing { "balanced" } else { "none" },
            "precision": if args.mixed { "bf16-mixed" } else { "native" },
            "tokens_per_second": tokens as f64 / median,
            "model_flops_per_second": e * flops.total() / median,
            "step_flops": {
                "total": e * flops.total(),
                "rollout": e * flops.rollout,
                "teacher": e * flops.teacher,
                "student": e * flops.student,
            },
            "heap_bytes_loaded": loaded,
            "heap_bytes_peak": ALLOC.peak(),
        })
    );
    Ok(())
}

fn load<B: Backend>(dir: &std::path::Path) -> Result<Qwen2Model<B>, String> {
    let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default()).map_err(|e| e.to_string())
}
