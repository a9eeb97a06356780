//! Data parallelism through burn-collective's real all-reduce (`sync::Collective`, feature
//! `collective`): two devices (two registered peers, one thread each, both NdArray CPU) with
//! `b` episodes each reach the weights and metrics of one device with `2b`, to f32 rounding,
//! and stay bit-identical to each other; a failure or a non-finite loss on one device stops
//! or skips the step on both, without leaving either waiting; a parameter only some devices
//! reached gets a zero gradient on the others, one no device reached stays without.

mod common;

use std::sync::Mutex;

use burn::backend::ndarray::NdArrayDevice;
use burn::collective::{register, reset_collective, CollectiveConfig, PeerId};
use burn::module::AutodiffModule;
use common::{params, Cpu, Toy, Train};
use omniopsd_core::divergence::{Divergence, LossConfig, Reduction};
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::sampling::SamplingConfig;
use omniopsd_core::sft::{Example, SftConfig, SftError, SftTrainer};
use omniopsd_core::step::{
    Episode, LrDecay, LrSchedule, OpsdConfig, OpsdTrainer, StepError, StepMetrics,
};
use omniopsd_core::sync::{Collective, SyncError};
use omniopsd_core::teacher::TeacherMode;

const VOCAB: usize = 12;
const HIDDEN: usize = 8;
const STEPS: usize = 3;

/// burn-collective's local server is one per process and backend: one test at a time.
static COLLECTIVE: Mutex<()> = Mutex::new(());

/// Runs `work(device, input, sync)` on `inputs.len()` devices at once, one registered peer
/// each, and returns their outputs in device order.
fn on_devices<I: Send, T: Send>(
    inputs: Vec<I>,
    work: impl Fn(usize, I, &mut Collective<Cpu>) -> T + Sync,
) -> Vec<T> {
    let _one_at_a_time = COLLECTIVE.lock().unwrap_or_else(|e| e.into_inner());
    reset_collective::<Cpu>();
    let n = inputs.len();
    let work = &work;
    std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .into_iter()
            .enumerate()
            .map(|(d, input)| {
                s.spawn(move || {
                    let config = CollectiveConfig::default().with_num_devices(n);
                    register::<Cpu>(PeerId::from(d), NdArrayDevice::Cpu, config).unwrap();
                    let mut sync = Collective::<Cpu>::new(PeerId::from(d), NdArrayDevice::Cpu, n);
                    let out = work(d, input, &mut sync);
                    sync.finish().unwrap();
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn episodes() -> Vec<Episode<Vec<u32>>> {
    [
        (vec![1, 2, 3], vec![7, 8, 1, 2, 3]),
        (vec![4, 5], vec![9, 4, 9, 5]),
        (vec![6], vec![10, 11, 6]),
        (vec![2, 9, 9, 4], vec![3, 2, 9, 9, 4]),
    ]
    .into_iter()
    .map(|(student, teacher)| Episode { student, teacher })
    .collect()
}

fn config(teacher: TeacherMode, micro_batch: usize) -> OpsdConfig {
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
        teacher,
        learning_rate: 1e-2,
        schedule: LrSchedule {
            warmup_steps: 1,
            decay: LrDecay::Cosine,
            total_steps: 6,
            min_lr_ratio: 0.1,
        },
        micro_batch,
        seed: 5,
        ..OpsdConfig::default()
    }
}

type Opsd = OpsdTrainer<Train, Toy<Train>>;

/// Largest `|a − b| / max(1, |a|)` over every weight.
fn max_relative(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() / x.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn close(a: f32, b: f32, what: &str) {
    assert!(
        (a - b).abs() <= 1e-5 * a.abs().max(1.0) || (a.is_nan() && b.is_nan()),
        "{what}: one device {a}, two devices {b}"
    );
}

fn same_metrics(one: &StepMetrics, two: &StepMetrics) {
    close(one.loss, two.loss, "loss");
    close(one.mean_divergence, two.mean_divergence, "divergence");
    close(one.student_entropy, two.student_entropy, "entropy");
    close(one.clip_fraction, two.clip_fraction, "clip fraction");
    close(one.grad_norm, two.grad_norm, "grad norm");
    assert_eq!(one.lr, two.lr);
    assert_eq!(one.response_length, two.response_length);
    assert_eq!(one.stop_fraction, two.stop_fraction);
    assert_eq!(one.valid_tokens, two.valid_tokens);
    assert_eq!(one.skipped, two.skipped);
    assert_eq!(one.updates_applied, two.updates_applied);
}

/// `STEPS` steps of the four episodes on one device, then on two devices with two each.
/// Returns the largest relative weight difference.
fn two_devices_equal_one(config: OpsdConfig) -> f32 {
    let model = Toy::<Train>::new(VOCAB, HIDDEN, 3, &Default::default());
    let eps = episodes();
    let mut one = Opsd::new(model.clone(), config.clone()).unwrap();
    let reference: Vec<StepMetrics> = (0..STEPS).map(|_| one.step(&eps).unwrap()).collect();

    let runs = on_devices(vec![model.clone(), model], |d, model, sync| {
        let mut t = Opsd::new(model, config.clone()).unwrap();
        let shard = &eps[2 * d..2 * d + 2];
        let metrics: Vec<StepMetrics> = (0..STEPS)
            .map(|_| t.step_shard(shard, 2 * d, 4, sync).unwrap())
            .collect();
        (metrics, t)
    });
    for (d, (metrics, t)) in runs.iter().enumerate() {
        assert_eq!(t.episodes_seen(), one.episodes_seen(), "device {d}");
        assert_eq!(t.optimizer_steps(), one.optimizer_steps(), "device {d}");
        for (a, b) in reference.iter().zip(metrics) {
            same_metrics(a, b);
        }
    }
    let w0 = params(&runs[0].1.model().valid());
    let w1 = params(&runs[1].1.model().valid());
    assert_eq!(w0, w1, "the two devices' weights are bit-identical");
    if let (Some(a), Some(b)) = (one.teacher().snapshot(), runs[0].1.teacher().snapshot()) {
        assert!(max_relative(&params(a), &params(b)) < 1e-5, "teachers");
    }
    let reference = params(&one.model().valid());
    let moved = max_relative(
        &params(&runs[0].1.model().valid()),
        &params(&Toy::<Cpu>::new(VOCAB, HIDDEN, 3, &Default::default())),
    );
    assert!(moved > 1e-3, "the weights moved ({moved})");
    max_relative(&reference, &w0)
}

#[test]
fn two_devices_with_b_episodes_equal_one_device_with_2b() {
    for (name, teacher, micro_batch) in [
        ("frozen, micro-batch 1", TeacherMode::Frozen, 1),
        ("frozen, micro-batch 2", TeacherMode::Frozen, 2),
        ("ema, micro-batch 1", TeacherMode::Ema { rate: 0.5 }, 1),
        ("ema, micro-batch 2", TeacherMode::Ema { rate: 0.5 }, 2),
        ("live, micro-batch 1", TeacherMode::Live, 1),
    ] {
        let diff = two_devices_equal_one(config(teacher, micro_batch));
        eprintln!("{name}: max relative weight difference {diff:e}");
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}

#[test]
fn sequence_reduction_and_reused_rollouts_shard_the_same_way() {
    let mut sequence = config(TeacherMode::Frozen, 1);
    sequence.loss.reduction = Reduction::Sequence;
    let diff = two_devices_equal_one(sequence);
    eprintln!("sequence reduction: {diff:e}");
    assert!(diff < 1e-5, "sequence reduction: {diff}");

    let mut reused = config(TeacherMode::Frozen, 2);
    reused.loss.divergence = Divergence::SampledReverseKl { ratio_clip: 2.0 };
    reused.updates_per_rollout = 2;
    let diff = two_devices_equal_one(reused);
    eprintln!("two updates per rollout: {diff:e}");
    assert!(diff < 1e-5, "two updates per rollout: {diff}");
}

#[test]
fn a_failing_rollout_on_one_device_is_an_error_on_both() {
    // NaN position embeddings from position 10 on: only a prompt of 10 or more tokens meets
    // them, and its rollout fails on a NaN logit. Device 1 holds that prompt.
    let toy = Toy::<Train>::new(VOCAB, HIDDEN, 3, &Default::default());
    let pos = toy.pos.clone().map(|p| {
        let keep = p.clone().narrow(0, 0, 10);
        let nan = p
            .narrow(0, 10, common::MAX_POSITIONS - 10)
            .mul_scalar(f32::NAN);
        burn::tensor::Tensor::cat(vec![keep, nan], 0)
    });
    let model = Toy { pos, ..toy };
    let mut eps = episodes();
    eps[3].student = vec![2; 12];
    let eps = &eps;
    let results = on_devices(vec![model.clone(), model], |d, model, sync| {
        let mut t = Opsd::new(model, config(TeacherMode::Frozen, 1)).unwrap();
        let result = t.step_shard(&eps[2 * d..2 * d + 2], 2 * d, 4, sync);
        (result, t.episodes_seen(), t.optimizer_steps())
    });
    assert!(
        matches!(results[0].0, Err(StepError::Sync(SyncError::PeerFailed))),
        "{:?}",
        results[0].0
    );
    assert!(
        matches!(results[1].0, Err(StepError::Rollout { episode: 3, .. })),
        "{:?}",
        results[1].0
    );
    for (d, (_, seen, steps)) in results.iter().enumerate() {
        assert_eq!(
            (*seen, *steps),
            (0, 0),
            "device {d} left as before the step"
        );
    }
}

#[test]
fn a_non_finite_loss_on_one_device_skips_the_update_on_both() {
    let model = Toy::<Train>::new(VOCAB, HIDDEN, 3, &Default::default());
    let before = params(&model.valid());
    let eps = episodes();
    let runs = on_devices(vec![model.clone(), model], |d, model, sync| {
        let fresh = Opsd::new(model, config(TeacherMode::Frozen, 1)).unwrap();
        let mut state = fresh.state();
        if d == 1 {
            // Device 1's frozen teacher has a NaN head: its losses are NaN, device 0's finite.
            let t = fresh.model().valid();
            state.teacher = Some(Toy {
                head: t.head.clone().map(|h| h.mul_scalar(f32::NAN)),
                ..t
            });
        }
        let mut t =
            Opsd::resume(fresh.into_model(), config(TeacherMode::Frozen, 1), state).unwrap();
        let m = t
            .step_shard(&eps[2 * d..2 * d + 2], 2 * d, 4, sync)
            .unwrap();
        (m, params(&t.model().valid()), t.optimizer_steps())
    });
    for (d, (m, weights, steps)) in runs.iter().enumerate() {
        assert!(m.skipped && m.updates_applied == 0, "device {d}: {m:?}");
        assert!(!m.loss.is_finite(), "device {d}");
        assert_eq!(*steps, 0, "device {d}");
        assert_eq!(weights, &before, "device {d} kept its weights");
    }
}

#[test]
fn a_bad_target_on_one_device_is_an_error_on_both() {
    let model = Toy::<Train>::new(VOCAB, HIDDEN, 3, &Default::default());
    let data = sft_data();
    let results = on_devices(vec![model.clone(), model], |d, model, sync| {
        let mut t = SftTrainer::<Train, Toy<Train>>::new(model, sft_config());
        let mut targets: Vec<Vec<u32>> = data.iter().map(|(_, t)| t.clone()).collect();
        if d == 1 {
            targets[2] = vec![VOCAB as u32];
        }
        let batch: Vec<Example<'_, Vec<u32>>> = data[2 * d..2 * d + 2]
            .iter()
            .zip(&targets[2 * d..2 * d + 2])
            .map(|((p, _), t)| Example {
                prompt: p,
                target: t,
            })
            .collect();
        (t.step_shard(&batch, sync), t.steps)
    });
    assert!(
        matches!(results[0].0, Err(SftError::Sync(SyncError::PeerFailed))),
        "{:?}",
        results[0].0
    );
    assert!(
        matches!(results[1].0, Err(SftError::TokenOutOfRange { token, .. }) if token == VOCAB as u32),
        "{:?}",
        results[1].0
    );
    assert_eq!((results[0].1, results[1].1), (0, 0), "no update anywhere");
}

fn sft_data() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![1, 2, 3], vec![4, 5, 0]),
        (vec![6, 7], vec![8, 9, 10, 0]),
        (vec![11, 3, 3, 2], vec![1, 0]),
        (vec![5], vec![2, 2, 7, 7, 0]),
    ]
}

fn sft_config() -> SftConfig {
    SftConfig {
        learning_rate: 1e-2,
        micro_batch: 1,
        ..SftConfig::default()
    }
}

#[test]
fn sft_on_two_devices_equals_one_device() {
    let model = Toy::<Train>::new(VOCAB, HIDDEN, 4, &Default::default());
    let data = sft_data();
    let batch = |range: std::ops::Range<usize>| -> Vec<Example<'_, Vec<u32>>> {
        data[range]
            .iter()
            .map(|(p, t)| Example {
                prompt: p,
                target: t,
            })
            .collect()
    };
    for micro_batch in [1, 2] {
        let config = SftConfig {
            micro_batch,
            ..sft_config()
        };
        let mut one = SftTrainer::<Train, Toy<Train>>::new(model.clone(), config.clone());
        let reference: Vec<_> = (0..STEPS)
            .map(|_| one.step(&batch(0..4)).unwrap())
            .collect();
        let runs = on_devices(vec![model.clone(), model.clone()], |d, model, sync| {
            let mut t = SftTrainer::<Train, Toy<Train>>::new(model, config.clone());
            let metrics: Vec<_> = (0..STEPS)
                .map(|_| t.step_shard(&batch(2 * d..2 * d + 2), sync).unwrap())
                .collect();
            (metrics, params(&t.model.valid()))
        });
        assert_eq!(
            runs[0].1, runs[1].1,
            "the devices' weights are bit-identical"
        );
        for (metrics, _) in &runs {
            for (a, b) in reference.iter().zip(metrics) {
                close(a.loss, b.loss, "loss");
                close(a.grad_norm, b.grad_norm, "grad norm");
                assert_eq!((a.lr, a.skipped), (b.lr, b.skipped));
            }
        }
        let diff = max_relative(&params(&one.model.valid()), &runs[0].1);
        eprintln!("sft, micro-batch {micro_batch}: max relative weight difference {diff:e}");
        assert!(diff < 1e-5, "micro-batch {micro_batch}: {diff}");
    }
}

#[test]
fn a_shard_outside_its_step_is_refused() {
    let model = Toy::<Train>::new(VOCAB, HIDDEN, 3, &Default::default());
    let mut t = Opsd::new(model, config(TeacherMode::Frozen, 1)).unwrap();
    let eps = episodes();
    let err = t
        .step_shard(&eps[..2], 3, 4, &mut omniopsd_core::sync::SingleDevice)
        .unwrap_err();
    assert_eq!(
        err,
        StepError::Shard {
            first: 3,
            len: 2,
            total: 4
        }
    );
}

#[test]
fn a_parameter_no_episode_reached_on_one_device_gets_a_zero_gradient_there() {
    use burn::optim::GradientsParams;
    use burn::tensor::Tensor;
    use omniopsd_core::sync::{align_gradients, GradientSync};

    let toy = Toy::<Train>::new(VOCAB, HIDDEN, 3, &Default::default());
    let (embed, head, wq) = (toy.embed.id, toy.head.id, toy.wq.id);
    let sums = on_devices(vec![toy.clone(), toy], |d, toy, sync| {
        let ones = |dims: [usize; 2]| Tensor::<Cpu, 2>::ones(dims, &NdArrayDevice::Cpu);
        let mut grads = GradientsParams::new();
        // Both devices reached the head; only device 0 reached the embedding; nobody `wq`.
        grads.register::<Cpu, 2>(head, ones([VOCAB, HIDDEN]).mul_scalar(d as f32 + 1.0));
        if d == 0 {
            grads.register::<Cpu, 2>(embed, ones([VOCAB, HIDDEN]));
        }
        let grads = align_gradients::<Train, _>(&toy, grads, sync).unwrap();
        let grads = GradientSync::<Train>::sum_gradients(sync, grads).unwrap();
        let read = |id| {
            grads
                .get::<Cpu, 2>(id)
                .map(|t| t.into_data().to_vec::<f32>().unwrap()[0])
        };
        (read(head), read(embed), read(wq))
    });
    for (d, sum) in sums.iter().enumerate() {
        assert_eq!(*sum, (Some(3.0), Some(1.0), None), "device {d}");
    }
}
