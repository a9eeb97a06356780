//! The SFT trainer: the loss falls on the toy model, numerics equal the update written out by
//! hand (AdamW, schedule, clipping, example-by-example accumulation), resumption from a
//! serialized optimizer record is bit-identical, non-finite losses and gradients skip the
//! update, and bad input is an error naming what is wrong.

mod common;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, Record};
use burn::tensor::activation::log_softmax;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use common::{param_bits, Toy, Train};
use omniopsd_core::fused::lm_logits;
use omniopsd_core::sft::{Example, SftConfig, SftError, SftTrainer};
use omniopsd_core::step::{clip_global_grad_norm, LossScaling, LrDecay, LrSchedule};
use omniopsd_core::PolicyModel;

const VOCAB: usize = 12;
const HIDDEN: usize = 8;

type Trainer = SftTrainer<Train, Toy<Train>>;

fn model(seed: u64) -> Toy<Train> {
    Toy::new(VOCAB, HIDDEN, seed, &Default::default())
}

fn config() -> SftConfig {
    SftConfig {
        learning_rate: 1e-2,
        schedule: LrSchedule {
            warmup_steps: 2,
            decay: LrDecay::Cosine,
            total_steps: 12,
            min_lr_ratio: 0.1,
        },
        max_grad_norm: Some(1.0),
        ..SftConfig::default()
    }
}

/// (prompt, target) pairs of different lengths.
fn data() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![1, 2, 3], vec![4, 5, 0]),
        (vec![6, 7], vec![8, 9, 10, 0]),
        (vec![11, 3, 3, 2], vec![1, 0]),
    ]
}

fn batch(data: &[(Vec<u32>, Vec<u32>)]) -> Vec<Example<'_, Vec<u32>>> {
    data.iter()
        .map(|(p, t)| Example {
            prompt: p,
            target: t,
        })
        .collect()
}

fn nan_head(toy: Toy<Train>) -> Toy<Train> {
    let head = toy.head.clone();
    Toy {
        head: head.map(|t| t.mul_scalar(f32::NAN)),
        ..toy
    }
}

#[test]
fn forty_steps_reduce_the_loss_on_the_toy_model() {
    let data = data();
    let batch = batch(&data);
    let mut t = Trainer::new(
        model(1),
        SftConfig {
            learning_rate: 3e-2,
            ..SftConfig::default()
        },
    );
    let first = t.step(&batch).unwrap();
    let mut last = first;
    for _ in 0..39 {
        last = t.step(&batch).unwrap();
        assert!(!last.skipped && last.loss.is_finite() && last.grad_norm.is_finite());
    }
    eprintln!("SFT loss {:.4} -> {:.4}", first.loss, last.loss);
    assert!(
        last.loss < 0.5 * first.loss,
        "{} -> {}",
        first.loss,
        last.loss
    );
    assert_eq!(t.steps, 40);
}

/// The update written out by hand, as the binary's trainer did it before it moved into the
/// core: the SFT trainer must give the same bits.
#[test]
fn updates_equal_the_hand_written_update_bit_for_bit() {
    // One backward per micro-batch of `micro` examples, whose losses are summed first.
    for micro in [1, 2, 3] {
        hand_written_update_with_micro_batches(micro);
    }
}

fn hand_written_update_with_micro_batches(micro: usize) {
    let data = data();
    let batch = batch(&data);
    let cfg = SftConfig {
        micro_batch: micro,
        ..config()
    };
    let mut trainer = Trainer::new(model(2), cfg.clone());
    let mut reference = model(2);
    let mut optimizer = cfg.adamw.init::<Train, Toy<Train>>();
    let total: usize = data.iter().map(|(_, t)| t.len()).sum();
    for step in 0..5u64 {
        let lr = cfg.learning_rate * cfg.schedule.factor(step);
        let mut accumulator = GradientsAccumulator::<Toy<Train>>::new();
        let mut loss = 0.0f64;
        let mut pending: Option<Tensor<Train, 1>> = None;
        for (i, (prompt, target)) in data.iter().enumerate() {
            if i % micro == 0 {
                if let Some(sum) = pending.take() {
                    accumulator.accumulate(
                        &reference,
                        GradientsParams::from_grads(sum.backward(), &reference),
                    );
                }
            }
            let r = target.len();
            let ids: Vec<i64> = target.iter().map(|&t| i64::from(t)).collect();
            let target = Tensor::<Train, 2, Int>::from_data(
                TensorData::new(ids, [1, r]),
                &Default::default(),
            );
            let hidden = reference.response_hidden(prompt, target.clone());
            let logits = lm_logits(hidden.reshape([r, HIDDEN]), reference.lm_head());
            let nll = log_softmax(logits, 1)
                .gather(1, target.reshape([r, 1]))
                .sum()
                .neg()
                .div_scalar(total as f64);
            loss += f64::from(nll.clone().into_scalar().elem::<f32>());
            pending = Some(match pending {
                Some(sum) => sum.add(nll),
                None => nll,
            });
        }
        let sum = pending.expect("the data has examples");
        accumulator.accumulate(
            &reference,
            GradientsParams::from_grads(sum.backward(), &reference),
        );
        let (grads, norm) =
            clip_global_grad_norm::<Train, _>(&reference, accumulator.grads(), cfg.max_grad_norm);
        reference = optimizer.step(lr, reference.clone(), grads);

        let m = trainer.step(&batch).unwrap();
        assert_eq!(
            m.loss.to_bits(),
            (loss as f32).to_bits(),
            "micro {micro} step {step}"
        );
        assert_eq!(
            m.grad_norm.to_bits(),
            norm.to_bits(),
            "micro {micro} step {step}"
        );
        assert_eq!(m.lr, lr);
        assert!(!m.skipped);
        assert_eq!(
            param_bits(&trainer.model.valid()),
            param_bits(&reference.valid()),
            "micro {micro} step {step}"
        );
    }
}

/// Round-trips a record through JSON, as a checkpoint on disk would.
fn through_json<R: Record<Train>>(record: R) -> R {
    let json = serde_json::to_string(&record.into_item::<FullPrecisionSettings>()).unwrap();
    let item: R::Item<FullPrecisionSettings> = serde_json::from_str(&json).unwrap();
    R::from_item(item, &Default::default())
}

#[test]
fn resumed_trainer_continues_bit_identically_from_a_serialized_record() {
    let data = data();
    let batch = batch(&data);
    let mut straight = Trainer::new(model(3), config());
    let mut first = Trainer::new(model(3), config());
    for _ in 0..3 {
        let a = straight.step(&batch).unwrap();
        let b = first.step(&batch).unwrap();
        assert_eq!(a, b);
    }
    let weights = through_json(first.model.clone().into_record());
    let optimizer = through_json(first.optimizer_record());
    let steps = first.steps;
    drop(first);
    let mut resumed = Trainer::resume(model(0).load_record(weights), config(), optimizer, steps);
    assert_eq!(resumed.current_lr(), straight.current_lr());
    for _ in 0..3 {
        let a = straight.step(&batch).unwrap();
        let b = resumed.step(&batch).unwrap();
        assert_eq!(a, b);
    }
    assert_eq!(
        param_bits(&straight.model.valid()),
        param_bits(&resumed.model.valid())
    );
    assert_eq!((straight.steps, resumed.steps), (6, 6));
}

#[test]
fn loss_scaling_trains_bit_identically_and_its_state_resumes() {
    let data = data();
    let batch = batch(&data);
    let scaled = SftConfig {
        loss_scaling: Some(LossScaling {
            growth_interval: 2,
            ..LossScaling::default()
        }),
        ..config()
    };
    let mut plain = Trainer::new(model(3), config());
    let mut a = Trainer::new(model(3), scaled.clone());
    for _ in 0..3 {
        assert_eq!(plain.step(&batch).unwrap(), a.step(&batch).unwrap());
    }
    assert_eq!(
        param_bits(&plain.model.valid()),
        param_bits(&a.model.valid())
    );
    let state = a.loss_scale_state().unwrap();
    assert_eq!((state.scale, state.good_steps), (131072.0, 1));
    assert_eq!(plain.loss_scale_state(), None);
    let mut b = Trainer::resume(a.model.clone(), scaled, a.optimizer_record(), a.steps);
    b.set_loss_scale_state(Some(state));
    a.step(&batch).unwrap();
    b.step(&batch).unwrap();
    assert_eq!(a.loss_scale_state(), b.loss_scale_state());
    assert_eq!(a.loss_scale_state().unwrap().scale, 262144.0);
}

#[test]
fn non_finite_loss_skips_the_update_and_keeps_weights_bit_identical() {
    let data = data();
    let mut t = Trainer::new(nan_head(model(4)), config());
    let before = param_bits(&t.model.valid());
    let m = t.step(&batch(&data)).unwrap();
    assert!(m.skipped);
    assert!(!m.loss.is_finite() && m.grad_norm.is_nan());
    assert_eq!(param_bits(&t.model.valid()), before);
    assert_eq!(t.steps, 0);
    assert!(t.optimizer_record().is_empty(), "optimizer state touched");
}

#[test]
fn non_finite_gradient_skips_the_update_and_keeps_weights_bit_identical() {
    // probe = 0 adds 0·sqrt(0) to the hidden state: finite forward, 0·∞ = NaN gradient.
    let toy = model(5);
    let probe = toy.probe.clone();
    let toy = Toy {
        probe: probe.map(|t| t.mul_scalar(0.0)),
        ..toy
    };
    let data = data();
    let mut t = Trainer::new(toy, config());
    let before = param_bits(&t.model.valid());
    let m = t.step(&batch(&data)).unwrap();
    assert!(m.skipped && m.loss.is_finite(), "{m:?}");
    assert!(!m.grad_norm.is_finite());
    assert_eq!(param_bits(&t.model.valid()), before);
    assert_eq!(t.steps, 0);
    // The learning rate stays that of update 0.
    assert_eq!(t.current_lr(), m.lr);
}

#[test]
fn empty_targets_contribute_nothing_and_an_all_empty_batch_is_an_error() {
    let data = data();
    let empty: (Vec<u32>, Vec<u32>) = (vec![5, 5], vec![]);
    let mut with_empty = batch(&data);
    with_empty.insert(
        1,
        Example {
            prompt: &empty.0,
            target: &empty.1,
        },
    );
    let mut a = Trainer::new(model(6), config());
    let mut b = Trainer::new(model(6), config());
    assert_eq!(a.step(&batch(&data)).unwrap(), b.step(&with_empty).unwrap());
    assert_eq!(param_bits(&a.model.valid()), param_bits(&b.model.valid()));
    // In micro-batches the empty example takes a slot, which regroups the others: the loss is
    // the same sum, the weights the same to rounding.
    for micro in [2, 3] {
        let cfg = SftConfig {
            micro_batch: micro,
            ..config()
        };
        let mut a = Trainer::new(model(6), cfg.clone());
        let mut b = Trainer::new(model(6), cfg);
        let (ma, mb) = (a.step(&batch(&data)).unwrap(), b.step(&with_empty).unwrap());
        assert_eq!(ma.loss.to_bits(), mb.loss.to_bits(), "micro {micro}");
        assert!(!mb.skipped);
        for (x, y) in common::params(&a.model.valid())
            .iter()
            .flatten()
            .zip(common::params(&b.model.valid()).iter().flatten())
        {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "micro {micro}: {x} vs {y}"
            );
        }
    }

    let only_empty = [Example {
        prompt: &empty.0,
        target: &empty.1,
    }];
    assert_eq!(b.step(&only_empty), Err(SftError::EmptyTargets));
    assert_eq!(b.step(&[]), Err(SftError::NoExamples));
    assert_eq!(b.steps, 1);
}

#[test]
fn bad_input_is_an_error_naming_the_example_and_leaves_the_trainer_unchanged() {
    let data = data();
    let target = [1u32, 2, VOCAB as u32];
    let mut bad = batch(&data);
    bad[1].target = &target;
    let mut t = Trainer::new(model(7), config());
    let before = param_bits(&t.model.valid());
    let err = t.step(&bad).unwrap_err();
    assert_eq!(
        err,
        SftError::TokenOutOfRange {
            example: 1,
            position: 2,
            token: VOCAB as u32,
            vocab: VOCAB,
        }
    );
    assert!(err.to_string().starts_with("example 1:"), "{err}");
    assert_eq!(param_bits(&t.model.valid()), before);
    assert_eq!(t.steps, 0);
}

#[test]
fn bad_config_is_rejected_naming_the_field() {
    let field = |cfg: SftConfig| match Trainer::try_new(model(8), cfg) {
        Err(SftError::Config { field, .. }) => field,
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted a bad config"),
    };
    let base = config();
    assert_eq!(
        field(SftConfig {
            learning_rate: -1.0,
            ..base.clone()
        }),
        "learning_rate"
    );
    assert_eq!(
        field(SftConfig {
            max_grad_norm: Some(f32::INFINITY),
            ..base.clone()
        }),
        "max_grad_norm"
    );
    let mut c = base.clone();
    c.adamw.epsilon = 0.0;
    assert_eq!(field(c), "adamw.epsilon");
    let c = SftConfig {
        micro_batch: 0,
        ..base.clone()
    };
    assert_eq!(field(c.clone()), "micro_batch");
    // `new` does not check the config; the step refuses the one knob it cannot run.
    let data = data();
    assert!(matches!(
        Trainer::new(model(8), c).step(&batch(&data)),
        Err(SftError::Config {
            field: "micro_batch",
            ..
        })
    ));
    let mut c = base;
    c.schedule.total_steps = 1;
    assert_eq!(field(c), "schedule.total_steps");
    let msg = SftConfig {
        learning_rate: 0.0,
        ..config()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        msg.starts_with("sft config: `learning_rate`") && msg.contains("found 0"),
        "{msg}"
    );
}
