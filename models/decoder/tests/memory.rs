//! The memory plan's parameter counts against the checkpoints themselves: the tiny Qwen2
//! checkpoints (tied and untied heads), with and without LoRA adapters, counted by Burn over the loaded modules. (The plan's byte estimate
//! is checked against counted allocations in `benches/tests/memory_plan.rs`.)

mod common;

use burn::backend::NdArray;
use burn::module::Module;
use omniopsd_checkpoint::Checkpoint;
use omniopsd_decoder::memory::{StepShape, TeacherWeights};
use omniopsd_decoder::{LoraConfig, Qwen2Model, LORA_TARGETS};

use common::reference;

type B = NdArray<f32>;

fn lora(targets: &[&str], r: usize) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        use_rslora: false,
        placement: Default::default(),
    }
}

#[test]
fn parameter_counts_equal_the_loaded_modules() {
    for dir in ["qwen2_tiny", "qwen2_tiny_tied_bf16"] {
        let ckpt = Checkpoint::open(&reference().join(dir)).unwrap();
        let model = Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default()).unwrap();
        let config = model.config().clone();
        assert_eq!(config.param_count(), model.num_params() as u64, "{dir}");
        for (targets, r) in [(&LORA_TARGETS[..], 4), (&["q_proj", "v_proj"][..], 8)] {
            let l = lora(targets, r);
            let adapted = model.clone().with_new_adapters(&l, 0).unwrap();
            assert_eq!(
                config.param_count() + config.lora_param_count(&l),
                adapted.num_params() as u64,
                "{dir} with {targets:?}"
            );
        }
    }
}

#[test]
fn the_plan_adds_up_and_follows_the_training_setup() {
    let ckpt = Checkpoint::open(&reference().join("qwen2_tiny")).unwrap();
    let config = Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default())
        .unwrap()
        .config()
        .clone();
    let shape = |lora: Option<LoraConfig>, teacher| StepShape {
        prompt: 128,
        privileged: 64,
        group: 4,
        new_tokens: 32,
        micro_batch: 1,
        grad_accumulation: 1,
        chunk_rows: 1024,
        lora,
        teacher,
        compute_bytes: 4,
        checkpointing: false,
    };
    let full = config.memory_plan(&shape(None, TeacherWeights::Frozen));
    assert_eq!(full.trainable_params, full.params);
    assert_eq!(full.weights, 4 * full.params);
    assert_eq!(full.optimizer, 2 * full.gradients);
    assert_eq!(
        full.teacher, full.weights,
        "a frozen teacher copies the whole decoder"
    );
    let live = config.memory_plan(&shape(None, TeacherWeights::Live));
    assert_eq!(live.teacher, 0);
    assert_eq!(full.peak - live.peak, full.teacher);

    let l = lora(&LORA_TARGETS, 8);
    let adapters = config.lora_param_count(&l);
    let frozen = config.memory_plan(&shape(Some(l.clone()), TeacherWeights::Frozen));
    assert_eq!(frozen.trainable_params, adapters);
    assert_eq!(frozen.gradients, 4 * adapters);
    assert_eq!(frozen.teacher, 0, "LoRA's frozen teacher shares the base");
    let ema = config.memory_plan(&shape(Some(l), TeacherWeights::Ema));
    assert_eq!(
        ema.teacher,
        4 * adapters,
        "an EMA teacher is a second adapter set"
    );
    assert!(frozen.peak < full.peak);

    // More responses, longer answers, a longer prompt: never less memory.
    let mut s = shape(None, TeacherWeights::Live);
    let base = config.memory_plan(&s).peak;
    for grow in [
        |s: &mut StepShape| s.group *= 2,
        |s: &mut StepShape| s.new_tokens *= 2,
        |s: &mut StepShape| s.prompt *= 2,
    ] {
        let mut t = s.clone();
        grow(&mut t);
        assert!(config.memory_plan(&t).peak > base);
    }
    s.checkpointing = true;
    assert!(config.memory_plan(&s).activations < live.activations);
}
