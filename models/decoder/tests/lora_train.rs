//! OPSD training of LoRA adapters on the tiny checkpoint A through the core's trainer, in each
//! teacher mode: only the adapters move and hold optimizer state, the base stays bit for bit,
//! `frozen` is the base with the adapters off, `ema` a second adapter set over the same base,
//! `live` the current adapters.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::tensor::TensorData;
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::step::{Episode, OpsdConfig, OpsdTrainer};
use omniopsd_core::teacher::TeacherMode;
use omniopsd_decoder::{LoraConfig, PeftAdapter, Qwen2Model, TokenPrompt};

use common::{ids, reference};
use omniopsd_checkpoint::Checkpoint;

type B = NdArray<f32>;
type A = Autodiff<B>;

fn student() -> Qwen2Model<A> {
    let ckpt = Checkpoint::open(&reference().join("qwen2_tiny")).unwrap();
    // Start from a PEFT adapter with B ≠ 0, so "adapters off" differs from θ₀.
    let adapter = PeftAdapter::open(&reference().join("lora_qv")).unwrap();
    Qwen2Model::<A>::from_checkpoint(&ckpt, &Default::default())
        .unwrap()
        .with_adapter(&adapter, "")
        .unwrap()
}

fn episodes() -> Vec<Episode<TokenPrompt>> {
    let student = ids("a.prompt0.ids");
    let mut teacher = student.clone();
    teacher.extend(ids("a.score.response_ids").iter().take(6));
    vec![Episode {
        student: TokenPrompt::new(student),
        teacher: TokenPrompt::new(teacher),
    }]
}

fn config(teacher: TeacherMode) -> OpsdConfig {
    OpsdConfig {
        rollout: RolloutConfig {
            samples_per_prompt: 2,
            max_new_tokens: 4,
            stop_tokens: vec![2],
            ..RolloutConfig::default()
        },
        teacher,
        learning_rate: 1e-2,
        seed: 3,
        ..OpsdConfig::default()
    }
}

/// Every base weight (adapters off) and every adapter tensor, by name.
fn base_weights(m: &Qwen2Model<B>) -> Vec<(String, TensorData)> {
    m.without_adapters().export_tensors()
}

fn adapter_weights(m: &Qwen2Model<B>) -> Vec<(String, TensorData)> {
    m.adapter_tensors("")
}

#[test]
fn lora_opsd_trains_only_the_adapters_in_every_teacher_mode() {
    let base0 = base_weights(&student().valid());
    let adapters0 = adapter_weights(&student().valid());
    for mode in [
        TeacherMode::Live,
        TeacherMode::Frozen,
        TeacherMode::Ema { rate: 0.5 },
    ] {
        let model = student();
        let n_adapters = model.adapters().len();
        assert_eq!(n_adapters, 3 * 2);
        let mut trainer = match mode {
            // LoRA's frozen teacher: the base with the adapters off, sharing its weights.
            TeacherMode::Frozen => {
                let base = model.valid().without_adapters();
                OpsdTrainer::with_teacher(model, config(mode), Some(base)).unwrap()
            }
            _ => OpsdTrainer::new(model, config(mode)).unwrap(),
        };
        for _ in 0..2 {
            let m = trainer.step(&episodes()).unwrap();
            assert!(!m.skipped && m.loss.is_finite(), "{mode:?}: {m:?}");
        }
        let trained = trainer.model().valid();
        assert_eq!(
            base_weights(&trained),
            base0,
            "{mode:?}: the base never moves"
        );
        assert_ne!(
            adapter_weights(&trained),
            adapters0,
            "{mode:?}: adapters move"
        );
        assert_eq!(
            trainer.state().optimizer.len(),
            2 * n_adapters,
            "{mode:?}: optimizer state for the adapters only"
        );
        match (mode, trainer.teacher().snapshot()) {
            (TeacherMode::Live, None) => {}
            (TeacherMode::Frozen, Some(t)) => {
                assert!(t.adapters().is_empty(), "frozen = adapters off");
                assert_eq!(base_weights(t), base0);
            }
            (TeacherMode::Ema { .. }, Some(t)) => {
                assert_eq!(t.adapters().len(), n_adapters, "a second adapter set");
                assert_eq!(base_weights(t), base0, "over the same base");
                let ema = adapter_weights(t);
                assert_ne!(ema, adapters0);
                assert_ne!(ema, adapter_weights(&trained));
                // A checkpointed EMA teacher goes back on the student's base.
                let grafted = trained.with_adapters_of(t).unwrap();
                assert_eq!(adapter_weights(&grafted), ema);
                assert_eq!(base_weights(&grafted), base0);
                let tied = Checkpoint::open(&reference().join("qwen2_tiny_tied_bf16")).unwrap();
                let other = Qwen2Model::<B>::from_checkpoint(&tied, &Default::default())
                    .unwrap()
                    .with_new_adapters(
                        &LoraConfig {
                            r: 4,
                            lora_alpha: 8.0,
                            lora_dropout: 0.0,
                            target_modules: vec!["k_proj".into()],
                            use_rslora: false,
                            placement: Default::default(),
                        },
                        0,
                    )
                    .unwrap();
                let err = trained.with_adapters_of(&other).unwrap_err().to_string();
                assert!(err.contains("3 layers here, 2"), "{err}");
            }
            (mode, snapshot) => panic!("{mode:?}: snapshot present: {}", snapshot.is_some()),
        }
    }
}

#[test]
fn new_adapters_train_from_a_zero_delta() {
    let ckpt = Checkpoint::open(&reference().join("qwen2_tiny")).unwrap();
    let config_lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: omniopsd_decoder::LORA_TARGETS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        use_rslora: true,
        placement: Default::default(),
    };
    let model = Qwen2Model::<A>::from_checkpoint(&ckpt, &Default::default())
        .unwrap()
        .with_new_adapters(&config_lora, 1)
        .unwrap();
    let mut trainer = OpsdTrainer::new(model, config(TeacherMode::Live)).unwrap();
    let m = trainer.step(&episodes()).unwrap();
    assert!(!m.skipped && m.grad_norm > 0.0, "{m:?}");
    assert_eq!(trainer.state().optimizer.len(), 2 * 3 * 7);
}

#[test]
fn a_new_adapter_rank_above_a_projection_width_is_refused_naming_it() {
    let ckpt = Checkpoint::open(&reference().join("qwen2_tiny")).unwrap();
    let err = Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default())
        .unwrap()
        .with_new_adapters(
            &LoraConfig {
                r: 1 << 40,
                lora_alpha: 8.0,
                lora_dropout: 0.0,
                target_modules: vec!["k_proj".into()],
                use_rslora: false,
                placement: Default::default(),
            },
            0,
        )
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("`r`") && err.contains("min(d_in, d_out) = 32") && err.contains("k_proj"),
        "{err}"
    );
}

#[test]
fn the_head_is_trainable_exactly_without_adapters() {
    use omniopsd_core::PolicyModel;
    let ckpt = Checkpoint::open(&reference().join("qwen2_tiny")).unwrap();
    let full = Qwen2Model::<A>::from_checkpoint(&ckpt, &Default::default()).unwrap();
    assert!(full.lm_head_trainable(), "a full fine-tune trains the head");
    // Under LoRA the base, head included, is frozen: the fused loss skips its gradient.
    assert!(!student().lm_head_trainable());
}
