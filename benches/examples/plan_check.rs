//! The memory plan (`omniopsd plan`'s estimate, `omniopsd_decoder::memory`) beside the heap
//! peak of the same OPSD updates, run by the core's trainer on the CPU and counted by a
//! counting allocator. Prints one JSON line: measured and estimated bytes, their ratio, the
//! plan's terms and the phase it puts the peak in.
//!
//! `cargo run --release -p omniopsd-benches --example plan_check -- --random CONFIG
//! [--prompt 64] [--privileged 64] [--group 4] [--new 32] [--micro-batch 1]
//! [--accumulation 1] [--chunk-rows 1024] [--lora R] [--teacher live|frozen|ema]
//! [--checkpointing none|balanced]`

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use omniopsd_benches::init::write_random_qwen2;
use omniopsd_benches::plan::check_plan;
use omniopsd_benches::{count, flag_values, CountingAllocator};
use omniopsd_decoder::memory::{StepShape, TeacherWeights};
use omniopsd_decoder::{LoraConfig, LORA_TARGETS};
use serde_json::json;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

fn main() -> Result<(), String> {
    omniopsd_backends::keep_freed_memory();
    let mut config = None;
    let mut s = StepShape {
        prompt: 64,
        privileged: 64,
        group: 4,
        new_tokens: 32,
        micro_batch: 1,
        grad_accumulation: 1,
        chunk_rows: 1024,
        lora: None,
        teacher: TeacherWeights::Live,
        compute_bytes: 4,
        checkpointing: false,
    };
    for (flag, value) in flag_values()? {
        match flag.as_str() {
            "--random" => config = Some(value),
            "--prompt" => s.prompt = count(&flag, &value, 1)?,
            "--privileged" => s.privileged = count(&flag, &value, 0)?,
            "--group" => s.group = count(&flag, &value, 1)?,
            "--new" => s.new_tokens = count(&flag, &value, 2)?,
            "--micro-batch" => s.micro_batch = count(&flag, &value, 1)?,
            "--accumulation" => s.grad_accumulation = count(&flag, &value, 1)?,
            "--chunk-rows" => s.chunk_rows = count(&flag, &value, 1)?,
            "--lora" => {
                let r = count(&flag, &value, 1)?;
                s.lora = Some(LoraConfig {
                    r,
                    lora_alpha: 2.0 * r as f64,
                    lora_dropout: 0.0,
                    target_modules: LORA_TARGETS.iter().map(|t| t.to_string()).collect(),
                    use_rslora: false,
                    placement: Default::default(),
                });
            }
            "--teacher" => {
                s.teacher = match value.as_str() {
                    "live" => TeacherWeights::Live,
                    "frozen" => TeacherWeights::Frozen,
                    "ema" => TeacherWeights::Ema,
                    other => return Err(format!("--teacher: live, frozen or ema, not {other}")),
                }
            }
            "--checkpointing" => {
                s.checkpointing = match value.as_str() {
                    "none" => false,
                    "balanced" => true,
                    other => return Err(format!("--checkpointing: none or balanced, not {other}")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let config = config.ok_or("--random CONFIG is required")?;
    let text = std::fs::read_to_string(&config).map_err(|e| format!("{config}: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{config}: {e}"))?;
    let dir = std::env::temp_dir().join(format!("omniopsd-plan-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let checked = write_random_qwen2(&dir, &json, 0).and_then(|()| {
        if s.checkpointing {
            check_plan::<Autodiff<omniopsd_benches::Cpu, BalancedCheckpointing>>(&ALLOC, &dir, &s)
        } else {
            check_plan::<Autodiff<omniopsd_benches::Cpu>>(&ALLOC, &dir, &s)
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    let c = checked?;
    let p = &c.plan;
    println!(
        "{}",
        json!({
            "measured_bytes": c.measured,
            "estimated_bytes": p.peak,
            "ratio": c.ratio(),
            "phase": p.phase.name(),
            "weights": p.weights, "gradients": p.gradients, "optimizer": p.optimizer,
            "teacher": p.teacher, "activations": p.activations, "loss": p.loss,
            "rollout": p.rollout, "teacher_forward": p.teacher_forward, "update": p.update,
        })
    );
    Ok(())
}
