//! The memory plan against the heap: one OPSD update run by the core's own trainer on the CPU,
//! its peak live bytes counted by [`CountingAllocator`], beside
//! [`omniopsd_decoder::memory`]'s estimate of the same update.

use std::path::Path;

use burn::tensor::backend::AutodiffBackend;
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::divergence::{Divergence, LossConfig};
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::step::{OpsdConfig, OpsdTrainer};
use omniopsd_core::teacher::TeacherMode;
use omniopsd_decoder::memory::{MemoryPlan, StepShape, TeacherWeights};
use omniopsd_decoder::{Qwen2Config, Qwen2Model};

use crate::CountingAllocator;

/// What was measured: the heap's peak over an update after the first (AdamW's moments exist
/// then) and the plan's estimate of it.
#[derive(Debug)]
pub struct PlanCheck {
    /// Highest live heap bytes during the measured updates.
    pub measured: u64,
    /// The plan.
    pub plan: MemoryPlan,
}

impl PlanCheck {
    /// Estimate over measurement.
    pub fn ratio(&self) -> f64 {
        self.plan.peak as f64 / self.measured as f64
    }
}

/// Runs three updates of `shape` on the checkpoint at `dir` (the first unmeasured) and
/// returns the peak of the other two beside the plan. Episodes have distinct prompts of
/// exactly `shape.prompt` tokens; responses are exactly `shape.new_tokens` long (no stop
/// token), so the shape is the plan's.
pub fn check_plan<B: AutodiffBackend>(
    alloc: &CountingAllocator,
    dir: &Path,
    shape: &StepShape,
) -> Result<PlanCheck, String> {
    let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    let mut model =
        Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default()).map_err(|e| e.to_string())?;
    drop(ckpt);
    let config: Qwen2Config = model.config().clone();
    if let Some(lora) = &shape.lora {
        model = model
            .with_new_adapters(lora, 0)
            .map_err(|e| e.to_string())?;
    }
    if shape.compute_bytes == 2 {
        model = model.with_compute(Some(burn::tensor::FloatDType::BF16));
    }
    let episodes = crate::episodes(
        shape.micro_batch * shape.grad_accumulation,
        shape.prompt,
        shape.privileged,
        config.vocab_size,
    );
    let teacher = match shape.teacher {
        TeacherWeights::Live => TeacherMode::Live,
        TeacherWeights::Frozen => TeacherMode::Frozen,
        TeacherWeights::Ema => TeacherMode::Ema { rate: 0.1 },
    };
    let opsd = OpsdConfig {
        rollout: RolloutConfig {
            samples_per_prompt: shape.group,
            max_new_tokens: shape.new_tokens,
            stop_tokens: Vec::new(),
            ..RolloutConfig::default()
        },
        loss: LossConfig {
            divergence: Divergence::Jsd { beta: 0.5 },
            ..LossConfig::default()
        },
        teacher,
        learning_rate: 1e-5,
        micro_batch: shape.micro_batch,
        chunk_rows: shape.chunk_rows,
        ..OpsdConfig::default()
    };
    // The LoRA `frozen` teacher is the base with the adapters off, shared with the student.
    let snapshot = match (&shape.lora, shape.teacher) {
        (Some(_), TeacherWeights::Frozen) => {
            Some(burn::module::AutodiffModule::valid(&model).without_adapters())
        }
        _ => None,
    };
    let mut trainer = match snapshot {
        Some(s) => OpsdTrainer::with_teacher(model, opsd, Some(s)),
        None => OpsdTrainer::new(model, opsd),
    }
    .map_err(|e| e.to_string())?;
    trainer.step(&episodes).map_err(|e| e.to_string())?;
    alloc.reset_peak();
    for _ in 0..2 {
        trainer.step(&episodes).map_err(|e| e.to_string())?;
    }
    Ok(PlanCheck {
        measured: alloc.peak() as u64,
        plan: config.memory_plan(shape),
    })
}
