//! The OPSD trainer: skipped updates on non-finite loss or gradients, global grad-norm
//! clipping, learning-rate schedules, several updates per rollout, configuration errors, and
//! bit-identical resumption from a serialized checkpoint.

mod common;

use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::record::{FullPrecisionSettings, Record};
use burn::tensor::{Int, Tensor, TensorData};
use common::{param_bits, Cpu, Toy, Train};
use omniopsd_core::divergence::{Divergence, LossConfig, Reduction};
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::sampling::SamplingConfig;
use omniopsd_core::step::{
    clip_global_grad_norm, Episode, LossScaling, LrDecay, LrSchedule, OpsdConfig, OpsdTrainer,
    SkipReason, StepError, TrainerState,
};
use omniopsd_core::teacher::TeacherMode;
use omniopsd_core::PolicyModel;

const VOCAB: usize = 10;
const HIDDEN: usize = 8;

type Trainer = OpsdTrainer<Train, Toy<Train>>;

fn episodes() -> Vec<Episode<Vec<u32>>> {
    vec![
        Episode {
            student: vec![1, 2, 3],
            teacher: vec![7, 8, 1, 2, 3],
        },
        Episode {
            student: vec![4, 5],
            teacher: vec![9, 4, 9, 5],
        },
    ]
}

fn config() -> OpsdConfig {
    OpsdConfig {
        rollout: RolloutConfig {
            sampling: SamplingConfig::default(),
            samples_per_prompt: 3,
            max_new_tokens: 5,
            stop_tokens: vec![0],
            pad_token: 0,
            logp_temperature: 1.0,
        },
        loss: LossConfig::default(),
        teacher: TeacherMode::Frozen,
        learning_rate: 1e-2,
        seed: 9,
        ..OpsdConfig::default()
    }
}

fn model(seed: u64) -> Toy<Train> {
    Toy::new(VOCAB, HIDDEN, seed, &Default::default())
}

fn nan_head<B: burn::tensor::backend::Backend>(toy: Toy<B>) -> Toy<B> {
    let head = toy.head.clone();
    Toy {
        head: head.map(|t| t.mul_scalar(f32::NAN)),
        ..toy
    }
}

#[test]
fn non_finite_loss_skips_the_update_and_keeps_weights_bit_identical() {
    let fresh = Trainer::new(model(1), config()).unwrap();
    let before = param_bits(&fresh.model().valid());
    // A frozen teacher whose LM head is NaN makes every teacher log-prob, hence the loss, NaN.
    let mut state = fresh.state();
    state.teacher = Some(nan_head(fresh.model().valid()));
    let mut t = Trainer::resume(fresh.into_model(), config(), state).unwrap();
    let m = t.step(&episodes()).unwrap();
    assert!(m.skipped);
    assert_eq!(m.updates_applied, 0);
    assert_eq!(m.updates[0].skipped, Some(SkipReason::NonFiniteLoss));
    assert!(!m.loss.is_finite());
    assert_eq!(param_bits(&t.model().valid()), before);
    assert_eq!(t.optimizer_steps(), 0);
    assert!(
        t.state().optimizer.is_empty(),
        "optimizer state must not be touched"
    );
    // The rollout still consumed its random streams.
    assert_eq!(t.episodes_seen(), 2);
}

#[test]
fn non_finite_gradient_skips_the_update_and_keeps_weights_bit_identical() {
    // probe = 0 adds 0·sqrt(0) to the hidden state: finite forward, 0·∞ = NaN gradient.
    let toy = model(2);
    let probe = toy.probe.clone();
    let toy = Toy {
        probe: probe.map(|t| t.mul_scalar(0.0)),
        ..toy
    };
    let mut t = Trainer::new(toy, config()).unwrap();
    let before = param_bits(&t.model().valid());
    let m = t.step(&episodes()).unwrap();
    assert!(m.loss.is_finite(), "loss {}", m.loss);
    assert_eq!(m.updates[0].skipped, Some(SkipReason::NonFiniteGradient));
    assert!(!m.grad_norm.is_finite());
    assert_eq!(param_bits(&t.model().valid()), before);
    assert_eq!(t.optimizer_steps(), 0);
}

#[test]
fn global_grad_norm_clipping_scales_the_norm_to_the_maximum() {
    let toy = model(3);
    let response = Tensor::<Train, 2, Int>::from_data(
        TensorData::new(vec![1i64, 2, 3, 4, 5, 6], [2, 3]),
        &Default::default(),
    );
    let hidden = toy.response_hidden(&vec![1, 2], response);
    let loss = hidden
        .matmul(toy.lm_head().transpose().unsqueeze_dim::<3>(0))
        .powi_scalar(2)
        .sum();
    let grads = GradientsParams::from_grads(loss.backward(), &toy);
    let (grads, norm) = clip_global_grad_norm::<Train, _>(&toy, grads, None);
    assert!(norm > 1.0, "test needs a large gradient, got {norm}");
    let (clipped, before) = clip_global_grad_norm::<Train, _>(&toy, grads, Some(0.5));
    assert_eq!(before, norm);
    let (_, after) = clip_global_grad_norm::<Train, _>(&toy, clipped, None);
    assert!((after - 0.5).abs() < 1e-5, "clipped norm {after}");
}

#[test]
fn step_reports_pre_clip_grad_norm_and_scheduled_lr() {
    let cfg = OpsdConfig {
        learning_rate: 0.1,
        schedule: LrSchedule {
            warmup_steps: 2,
            decay: LrDecay::Linear,
            total_steps: 6,
            min_lr_ratio: 0.0,
        },
        max_grad_norm: Some(1e-3),
        ..config()
    };
    let mut t = Trainer::new(model(4), cfg).unwrap();
    let lrs: Vec<f64> = (0..5).map(|_| t.step(&episodes()).unwrap().lr).collect();
    let want = [0.05, 0.1, 0.1, 0.075, 0.05];
    for (got, want) in lrs.iter().zip(want) {
        assert!((got - want).abs() < 1e-12, "{lrs:?}");
    }
    let m = t.step(&episodes()).unwrap();
    assert!(
        m.grad_norm > 1e-3,
        "the pre-clip norm is reported ({})",
        m.grad_norm
    );
}

#[test]
fn lr_schedule_follows_warmup_then_cosine_or_linear_decay() {
    let cos = LrSchedule {
        warmup_steps: 4,
        decay: LrDecay::Cosine,
        total_steps: 14,
        min_lr_ratio: 0.1,
    };
    assert_eq!(cos.factor(0), 0.25);
    assert_eq!(cos.factor(3), 1.0);
    assert!((cos.factor(4) - 1.0).abs() < 1e-12);
    // Halfway through the decay: m + (1 - m)/2.
    assert!((cos.factor(9) - 0.55).abs() < 1e-12);
    assert!((cos.factor(14) - 0.1).abs() < 1e-12);
    assert!((cos.factor(100) - 0.1).abs() < 1e-12);
    let lin = LrSchedule {
        decay: LrDecay::Linear,
        ..cos
    };
    assert!((lin.factor(6) - (0.1 + 0.9 * 0.8)).abs() < 1e-12);
    let constant = LrSchedule::default();
    assert_eq!(constant.factor(0), 1.0);
    assert_eq!(constant.factor(1_000_000), 1.0);
}

#[test]
fn reused_rollouts_are_refused_for_losses_without_the_importance_ratio() {
    for divergence in [
        Divergence::Jsd { beta: 0.5 },
        Divergence::ForwardKl,
        Divergence::ReverseKl,
    ] {
        let cfg = OpsdConfig {
            loss: LossConfig {
                divergence,
                ..LossConfig::default()
            },
            updates_per_rollout: 2,
            ..config()
        };
        let err = cfg.validate().unwrap_err();
        assert!(
            err.to_string().contains("updates_per_rollout"),
            "{divergence:?}: {err}"
        );
        let one = OpsdConfig {
            updates_per_rollout: 1,
            ..cfg
        };
        assert!(one.validate().is_ok());
    }
}

#[test]
fn several_updates_per_rollout_each_step_the_optimizer() {
    let cfg = OpsdConfig {
        loss: LossConfig {
            divergence: Divergence::SampledReverseKl { ratio_clip: 2.0 },
            ..LossConfig::default()
        },
        updates_per_rollout: 3,
        ..config()
    };
    let mut t = Trainer::new(model(5), cfg).unwrap();
    let m = t.step(&episodes()).unwrap();
    assert_eq!(m.updates.len(), 3);
    assert_eq!(m.updates_applied, 3);
    assert_eq!(t.optimizer_steps(), 3);
    assert_eq!(t.episodes_seen(), 2);
    // The first update is on-policy: no importance ratio is clipped.
    assert_eq!(m.updates[0].clip_fraction, 0.0);
    assert_eq!(m.loss, m.updates[0].loss);
    assert!(m.updates.iter().all(|u| u.loss.is_finite()));
    assert!(m.response_length >= 1.0 && m.response_length <= 5.0);
    assert_eq!(m.valid_tokens as f32, m.response_length * 6.0);
}

#[test]
fn sequence_reduction_trains_too() {
    let cfg = OpsdConfig {
        loss: LossConfig {
            reduction: Reduction::Sequence,
            ..LossConfig::default()
        },
        ..config()
    };
    let mut t = Trainer::new(model(6), cfg).unwrap();
    let m = t.step(&episodes()).unwrap();
    assert!(!m.skipped && m.loss.is_finite());
}

/// Loss of `episodes` on a fresh trainer whose sampler stream starts at `stream`.
fn fresh_step(cfg: &OpsdConfig, episodes: &[Episode<Vec<u32>>], stream: u64) -> (f32, usize) {
    let t = Trainer::new(model(13), cfg.clone()).unwrap();
    let mut state = t.state();
    state.episodes_seen = stream;
    let mut t = Trainer::resume(t.into_model(), cfg.clone(), state).unwrap();
    let m = t.step(episodes).unwrap();
    (m.loss, m.valid_tokens)
}

#[test]
fn gradient_accumulation_weights_episodes_like_one_batch() {
    for reduction in [Reduction::Token, Reduction::Sequence] {
        let cfg = OpsdConfig {
            loss: LossConfig {
                reduction,
                ..LossConfig::default()
            },
            ..config()
        };
        let eps = episodes();
        let (both, _) = fresh_step(&cfg, &eps, 0);
        // Episode i of a step uses sampler stream episodes_seen + i, so these reproduce the
        // two rollouts of the joint step.
        let (a, ta) = fresh_step(&cfg, &eps[..1], 0);
        let (b, tb) = fresh_step(&cfg, &eps[1..], 1);
        // Unequal token counts, so token weighting and plain averaging disagree.
        assert_ne!(ta, tb);
        let want = match reduction {
            Reduction::Token => (a * ta as f32 + b * tb as f32) / (ta + tb) as f32,
            Reduction::Sequence => (a + b) / 2.0,
        };
        assert!(
            (both - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{reduction:?}: {both} vs {want}"
        );
    }
}

/// Weights after one step over three episodes of unequal lengths, with `cfg`.
fn after_one_step(cfg: OpsdConfig) -> (Vec<Vec<f32>>, Vec<f32>) {
    let mut eps = episodes();
    eps.push(Episode {
        student: vec![6],
        teacher: vec![8, 8, 6],
    });
    let mut t = Trainer::new(model(17), cfg).unwrap();
    let m = t.step(&eps).unwrap();
    assert_eq!(m.updates_applied, m.updates.len());
    let losses = m.updates.iter().map(|u| u.loss).collect();
    (common::params(&t.model().valid()), losses)
}

#[test]
fn micro_batches_group_episodes_without_changing_the_update() {
    let sampled = LossConfig {
        divergence: Divergence::SampledReverseKl { ratio_clip: 2.0 },
        ..LossConfig::default()
    };
    // Every teacher mode (a live teacher is scored per micro-batch with the sampling
    // weights), both reductions, and reused rollouts (scores kept for the whole step).
    let cases = [
        config(),
        OpsdConfig {
            teacher: TeacherMode::Live,
            ..config()
        },
        OpsdConfig {
            teacher: TeacherMode::Ema { rate: 0.5 },
            loss: LossConfig {
                reduction: Reduction::Sequence,
                ..LossConfig::default()
            },
            ..config()
        },
        OpsdConfig {
            loss: sampled,
            updates_per_rollout: 2,
            ..config()
        },
    ];
    for cfg in cases {
        let (one, one_loss) = after_one_step(cfg.clone());
        for micro_batch in [2, 3, 8] {
            let (grouped, loss) = after_one_step(OpsdConfig {
                micro_batch,
                ..cfg.clone()
            });
            // The first update's loss is the same per-episode values summed in the same order;
            // a reused rollout's later updates start from weights that differ by rounding.
            assert_eq!(loss[0], one_loss[0], "{cfg:?} micro_batch {micro_batch}");
            for (a, b) in loss.iter().zip(&one_loss) {
                assert!((a - b).abs() <= 1e-6 * a.abs(), "{cfg:?}: {a} vs {b}");
            }
            // Only the order of the gradient's additions differs: weights agree to f32
            // rounding (Adam's first step moves each weight by about the learning rate).
            for (a, b) in one.iter().flatten().zip(grouped.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                    "{cfg:?} micro_batch {micro_batch}: {a} vs {b}"
                );
            }
        }
    }
}

/// Round-trips a record through JSON, as a checkpoint on disk would.
fn through_json<R: Record<B>, B: burn::tensor::backend::Backend>(record: R) -> R {
    let json = serde_json::to_string(&record.into_item::<FullPrecisionSettings>()).unwrap();
    let item: R::Item<FullPrecisionSettings> = serde_json::from_str(&json).unwrap();
    R::from_item(item, &Default::default())
}

#[test]
fn resumed_trainer_continues_bit_identically_from_a_serialized_checkpoint() {
    let cfg = OpsdConfig {
        teacher: TeacherMode::Ema { rate: 0.3 },
        loss: LossConfig {
            divergence: Divergence::SampledReverseKl { ratio_clip: 2.0 },
            ..LossConfig::default()
        },
        updates_per_rollout: 2,
        schedule: LrSchedule {
            warmup_steps: 1,
            decay: LrDecay::Cosine,
            total_steps: 8,
            min_lr_ratio: 0.0,
        },
        // The scale grows after every update, so a resumed run must carry it.
        loss_scaling: Some(LossScaling {
            growth_interval: 1,
            ..LossScaling::default()
        }),
        ..config()
    };
    let mut straight = Trainer::new(model(7), cfg.clone()).unwrap();
    let mut first = Trainer::new(model(7), cfg.clone()).unwrap();
    let mut straight_metrics = Vec::new();
    for _ in 0..2 {
        straight_metrics.push(straight.step(&episodes()).unwrap());
        first.step(&episodes()).unwrap();
    }

    // Checkpoint: model, optimizer and teacher records through JSON, counters as numbers.
    let state = first.state();
    let model_record = through_json::<_, Train>(first.model().clone().into_record());
    let teacher_record = through_json::<_, Cpu>(state.teacher.clone().unwrap().into_record());
    let optimizer = through_json::<_, Train>(state.optimizer.clone());
    drop(first);
    let restored = TrainerState::<Train, Toy<Train>> {
        optimizer,
        teacher: Some(
            Toy::<Cpu>::new(VOCAB, HIDDEN, 0, &Default::default()).load_record(teacher_record),
        ),
        optimizer_steps: state.optimizer_steps,
        episodes_seen: state.episodes_seen,
        seed: state.seed,
        loss_scale: state.loss_scale,
    };
    let model = model(0).load_record(model_record);
    let mut resumed = Trainer::resume(model, cfg, restored).unwrap();

    for _ in 0..2 {
        let a = straight.step(&episodes()).unwrap();
        let b = resumed.step(&episodes()).unwrap();
        assert_eq!(a, b);
    }
    assert_eq!(
        param_bits(&straight.model().valid()),
        param_bits(&resumed.model().valid())
    );
    assert_eq!(
        param_bits(straight.teacher().snapshot().unwrap()),
        param_bits(resumed.teacher().snapshot().unwrap())
    );
    assert_eq!(straight.optimizer_steps(), 8);
    assert_eq!(resumed.optimizer_steps(), 8);
    let scale = straight.state().loss_scale.unwrap();
    assert_eq!(resumed.state().loss_scale, Some(scale));
    assert_eq!(
        scale.scale,
        65536.0 * 256.0,
        "doubled after each of 8 updates"
    );
}

#[test]
fn loss_scaling_without_overflow_trains_bit_identically_to_none() {
    // Power-of-two scales: scaling the loss and unscaling the gradients are exact.
    for init_scale in [1024.0, 65536.0, 2f64.powi(40)] {
        let scaled = OpsdConfig {
            loss_scaling: Some(LossScaling {
                init_scale,
                growth_interval: 1,
                ..LossScaling::default()
            }),
            ..config()
        };
        let mut a = Trainer::new(model(3), config()).unwrap();
        let mut b = Trainer::new(model(3), scaled).unwrap();
        for _ in 0..3 {
            assert_eq!(a.step(&episodes()).unwrap(), b.step(&episodes()).unwrap());
        }
        assert_eq!(
            param_bits(&a.model().valid()),
            param_bits(&b.model().valid())
        );
        assert_eq!(a.state().loss_scale, None);
        let state = b.state().loss_scale.unwrap();
        assert_eq!(state.scale, init_scale * 8.0, "grew after each update");
    }
}

#[test]
fn an_overflowing_loss_scale_skips_the_update_backs_off_and_then_trains() {
    let cfg = OpsdConfig {
        loss_scaling: Some(LossScaling {
            // The scaled loss overflows f32: every gradient is non-finite.
            init_scale: 1e300,
            backoff_factor: 1e-296,
            growth_factor: 2.0,
            growth_interval: 2,
        }),
        ..config()
    };
    let mut t = Trainer::new(model(5), cfg).unwrap();
    let before = param_bits(&t.model().valid());
    let m = t.step(&episodes()).unwrap();
    assert_eq!(m.updates[0].skipped, Some(SkipReason::NonFiniteGradient));
    assert!(m.loss.is_finite(), "the loss itself is finite");
    assert_eq!(param_bits(&t.model().valid()), before, "weights untouched");
    assert_eq!(t.optimizer_steps(), 0);
    let state = t.state().loss_scale.unwrap();
    assert!((state.scale - 1e4).abs() < 1e-6, "{state:?}");
    assert_eq!(state.good_steps, 0);
    // Now finite: two applied updates, then the scale grows.
    for expected in [1, 0] {
        let m = t.step(&episodes()).unwrap();
        assert_eq!(m.updates_applied, 1);
        assert_eq!(t.state().loss_scale.unwrap().good_steps, expected);
    }
    assert!((t.state().loss_scale.unwrap().scale - 2e4).abs() < 1e-6);
    assert_ne!(param_bits(&t.model().valid()), before);
}

#[test]
fn bad_loss_scaling_is_rejected_naming_the_field() {
    for (bad, field) in [
        (
            LossScaling {
                init_scale: 0.0,
                ..LossScaling::default()
            },
            "loss_scaling.init_scale",
        ),
        (
            LossScaling {
                growth_factor: 1.0,
                ..LossScaling::default()
            },
            "loss_scaling.growth_factor",
        ),
        (
            LossScaling {
                backoff_factor: 1.0,
                ..LossScaling::default()
            },
            "loss_scaling.backoff_factor",
        ),
        (
            LossScaling {
                growth_interval: 0,
                ..LossScaling::default()
            },
            "loss_scaling.growth_interval",
        ),
    ] {
        let cfg = OpsdConfig {
            loss_scaling: Some(bad),
            ..config()
        };
        let err = Trainer::new(model(0), cfg).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn rollout_failure_is_an_error_and_leaves_the_trainer_unchanged() {
    let mut t = Trainer::new(nan_head(model(8)), config()).unwrap();
    let err = t.step(&episodes()).unwrap_err();
    assert!(
        matches!(err, StepError::Rollout { episode: 0, .. }),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("episode 0: rollout"), "{err}");
    assert_eq!(t.episodes_seen(), 0);
    assert_eq!(t.optimizer_steps(), 0);
}

#[test]
fn step_without_episodes_is_an_error() {
    let mut t = Trainer::new(model(9), config()).unwrap();
    assert!(matches!(t.step(&[]), Err(StepError::NoEpisodes)));
}

#[test]
fn resume_rejects_a_state_from_another_seed_or_teacher_mode() {
    let t = Trainer::new(model(10), config()).unwrap();
    let mut state = t.state();
    state.seed = 1234;
    let err = Trainer::resume(model(10), config(), state).unwrap_err();
    assert!(matches!(
        err,
        StepError::StateMismatch {
            field: "seed",
            expected: 9,
            found: 1234
        }
    ));
    let state = t.state();
    let live = OpsdConfig {
        teacher: TeacherMode::Live,
        ..config()
    };
    assert!(matches!(
        Trainer::resume(model(10), live, state),
        Err(StepError::Teacher(_))
    ));
}

#[test]
fn bad_config_is_rejected_naming_the_field() {
    let field = |cfg: OpsdConfig| match Trainer::new(model(11), cfg) {
        Err(StepError::Config { field, .. }) => field,
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted a bad config"),
    };
    let base = config();
    assert_eq!(
        field(OpsdConfig {
            learning_rate: 0.0,
            ..base.clone()
        }),
        "learning_rate"
    );
    assert_eq!(
        field(OpsdConfig {
            learning_rate: f64::NAN,
            ..base.clone()
        }),
        "learning_rate"
    );
    assert_eq!(
        field(OpsdConfig {
            max_grad_norm: Some(0.0),
            ..base.clone()
        }),
        "max_grad_norm"
    );
    assert_eq!(
        field(OpsdConfig {
            updates_per_rollout: 0,
            ..base.clone()
        }),
        "updates_per_rollout"
    );
    assert_eq!(
        field(OpsdConfig {
            chunk_rows: 0,
            ..base.clone()
        }),
        "chunk_rows"
    );
    assert_eq!(
        field(OpsdConfig {
            micro_batch: 0,
            ..base.clone()
        }),
        "micro_batch"
    );
    let mut c = base.clone();
    c.adamw.beta_2 = 1.0;
    assert_eq!(field(c), "adamw.beta_1/beta_2");
    let mut c = base.clone();
    c.adamw.epsilon = 0.0;
    assert_eq!(field(c), "adamw.epsilon");
    let mut c = base.clone();
    c.adamw.weight_decay = -1.0;
    assert_eq!(field(c), "adamw.weight_decay");
    let mut c = base.clone();
    c.rollout.logp_temperature = 0.5;
    assert_eq!(field(c), "rollout.logp_temperature");
    let mut c = base.clone();
    c.schedule = LrSchedule {
        decay: LrDecay::Cosine,
        warmup_steps: 5,
        total_steps: 5,
        min_lr_ratio: 0.0,
    };
    assert_eq!(field(c), "schedule.total_steps");
    let mut c = base.clone();
    c.schedule.min_lr_ratio = 2.0;
    assert_eq!(field(c), "schedule.min_lr_ratio");
    let mut c = base.clone();
    c.rollout.samples_per_prompt = 0;
    assert!(matches!(
        Trainer::new(model(11), c),
        Err(StepError::RolloutConfig(_))
    ));
    let mut c = base.clone();
    c.teacher = TeacherMode::Ema { rate: 0.0 };
    assert!(matches!(
        Trainer::new(model(11), c),
        Err(StepError::Teacher(_))
    ));
    let mut c = base;
    c.loss.divergence = Divergence::Jsd { beta: 2.0 };
    let err = Trainer::new(model(11), c).unwrap_err();
    assert!(matches!(err, StepError::Loss(_)), "{err:?}");
    assert!(err.to_string().contains("beta"), "{err}");
    let msg = OpsdConfig {
        max_grad_norm: Some(-2.5),
        ..config()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("max_grad_norm") && msg.contains("found -2.5"),
        "{msg}"
    );
    assert!(OpsdConfig::default().validate().is_ok());
}

/// Burn's balanced activation checkpointing recomputes memory-bound operations in the
/// backward pass instead of keeping their outputs: the same numbers, bit for bit.
#[test]
fn balanced_activation_checkpointing_trains_bit_identically() {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    type Checkpointed = burn::backend::Autodiff<Cpu, BalancedCheckpointing>;
    let cfg = OpsdConfig {
        micro_batch: 2,
        ..config()
    };
    let mut plain = Trainer::new(model(21), cfg.clone()).unwrap();
    let mut checkpointed = OpsdTrainer::<Checkpointed, Toy<Checkpointed>>::new(
        Toy::new(VOCAB, HIDDEN, 21, &Default::default()),
        cfg,
    )
    .unwrap();
    for step in 0..3 {
        let a = plain.step(&episodes()).unwrap();
        let b = checkpointed.step(&episodes()).unwrap();
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {step}");
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits(), "step {step}");
    }
    assert_eq!(
        param_bits(&plain.model().valid()),
        param_bits(&checkpointed.model().valid())
    );
}
