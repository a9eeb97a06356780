//! Teacher weight modes (frozen, EMA, live), EMA blending by parameter id, privileged
//! contexts and response-position alignment.

mod common;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use common::{param_bits, params, values, Cpu, Toy, Train};
use omniopsd_core::divergence::LossConfig;
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::sampling::SamplingConfig;
use omniopsd_core::step::{Episode, OpsdConfig, OpsdTrainer};
use omniopsd_core::teacher::{
    ema_blend, score, PrivilegedTemplate, Teacher, TeacherError, TeacherMode,
};
use omniopsd_core::PolicyModel;

const VOCAB: usize = 10;
const HIDDEN: usize = 8;

/// Adds `delta · (index + 1)` to every float parameter, keeping parameter ids.
struct Shift(f32);

impl<B: Backend> ModuleMapper<B> for Shift {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let delta = self.0;
        self.0 *= 1.5;
        param.map(|t| t.add_scalar(delta))
    }
}

/// Teacher prompt = privileged block, then the student prompt.
struct BlockFirst;

impl PrivilegedTemplate<Vec<u32>> for BlockFirst {
    type Block = [u32];
    fn teacher_prompt(&self, student: &Vec<u32>, block: &[u32]) -> Vec<u32> {
        block.iter().chain(student).copied().collect()
    }
}

fn episodes() -> Vec<Episode<Vec<u32>>> {
    vec![
        Episode::privileged(&BlockFirst, vec![1, 2, 3], &[7, 8, 9, 7][..]),
        Episode::privileged(&BlockFirst, vec![4, 5], &[9, 9, 8][..]),
    ]
}

fn config(mode: TeacherMode) -> OpsdConfig {
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
        teacher: mode,
        learning_rate: 1e-2,
        seed: 5,
        ..OpsdConfig::default()
    }
}

fn trainer(mode: TeacherMode) -> OpsdTrainer<Train, Toy<Train>> {
    let model = Toy::<Train>::new(VOCAB, HIDDEN, 11, &Default::default());
    OpsdTrainer::new(model, config(mode)).unwrap()
}

#[test]
fn episode_privileged_builds_teacher_context_with_the_template() {
    let e = &episodes()[0];
    assert_eq!(e.student, vec![1, 2, 3]);
    assert_eq!(e.teacher, vec![7, 8, 9, 7, 1, 2, 3]);
}

#[test]
fn ema_blend_is_rate_weighted_average_of_every_param() {
    let teacher = Toy::<Cpu>::new(VOCAB, HIDDEN, 1, &Default::default());
    let student = teacher.clone().map(&mut Shift(0.3));
    let rate = 0.25f32;
    let blended = ema_blend(teacher.clone(), &student, rate).unwrap();
    for ((t, s), b) in params(&teacher)
        .iter()
        .zip(params(&student))
        .zip(params(&blended))
    {
        for ((t, s), b) in t.iter().zip(&s).zip(b) {
            let want = (1.0 - rate) * t + rate * s;
            assert!(
                (want - b).abs() <= 1e-6 * want.abs().max(1.0),
                "{b} vs {want}"
            );
        }
    }
    // Parameter ids survive the blend, so a blended teacher can be blended again.
    assert!(ema_blend(blended, &student, rate).is_ok());
}

#[test]
fn ema_blend_rejects_modules_with_different_param_ids() {
    let a = Toy::<Cpu>::new(VOCAB, HIDDEN, 1, &Default::default());
    let b = Toy::<Cpu>::new(VOCAB, HIDDEN, 1, &Default::default());
    let err = ema_blend(a, &b, 0.5).unwrap_err();
    assert!(matches!(err, TeacherError::ParamMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("parameter"), "{err}");
}

#[test]
fn frozen_teacher_is_unchanged_by_training_steps() {
    let mut t = trainer(TeacherMode::Frozen);
    let theta0 = param_bits(&t.model().valid());
    for _ in 0..3 {
        let m = t.step(&episodes()).unwrap();
        assert!(!m.skipped);
    }
    assert_eq!(t.optimizer_steps(), 3);
    assert_eq!(param_bits(t.teacher().snapshot().unwrap()), theta0);
    assert_ne!(
        param_bits(&t.model().valid()),
        theta0,
        "the student must move"
    );
}

#[test]
fn ema_teacher_after_one_update_is_rate_blend_of_theta0_and_theta1() {
    let rate = 0.2f32;
    let mut t = trainer(TeacherMode::Ema { rate });
    let theta0 = params(&t.model().valid());
    t.step(&episodes()).unwrap();
    let theta1 = params(&t.model().valid());
    let teacher = params(t.teacher().snapshot().unwrap());
    let mut moved = false;
    for ((p0, p1), pt) in theta0.iter().zip(&theta1).zip(&teacher) {
        for ((a, b), c) in p0.iter().zip(p1).zip(pt) {
            let want = (1.0 - rate) * a + rate * b;
            assert!(
                (want - c).abs() <= 1e-6 * want.abs().max(1.0),
                "{c} vs {want}"
            );
            moved |= a != b;
        }
    }
    assert!(moved);
}

#[test]
fn live_teacher_is_the_current_student() {
    let mut t = trainer(TeacherMode::Live);
    assert!(t.teacher().snapshot().is_none());
    // With no privileged block the live teacher sees exactly what the student sees, so the
    // divergence is zero at every step: the teacher always has the current weights.
    let same: Vec<Episode<Vec<u32>>> = episodes()
        .into_iter()
        .map(|e| Episode {
            teacher: e.student.clone(),
            student: e.student,
        })
        .collect();
    for _ in 0..3 {
        let m = t.step(&same).unwrap();
        assert!(
            m.mean_divergence.abs() < 1e-6,
            "divergence {}",
            m.mean_divergence
        );
    }
    let live = t.model().valid();
    assert!(std::ptr::eq(t.teacher().weights(&live), &live));
}

#[test]
fn frozen_teacher_diverges_from_the_moving_student_on_the_same_context() {
    let mut t = trainer(TeacherMode::Frozen);
    let same: Vec<Episode<Vec<u32>>> = episodes()
        .into_iter()
        .map(|e| Episode {
            teacher: e.student.clone(),
            student: e.student,
        })
        .collect();
    let first = t.step(&same).unwrap();
    assert!(first.mean_divergence.abs() < 1e-6);
    for _ in 0..3 {
        t.step(&same).unwrap();
    }
    let later = t.step(&same).unwrap();
    assert!(
        later.mean_divergence > 1e-6,
        "divergence {}",
        later.mean_divergence
    );
}

#[test]
fn teacher_scores_align_with_the_student_by_response_position() {
    let model = Toy::<Cpu>::new(VOCAB, HIDDEN, 3, &Default::default());
    let e = &episodes()[0];
    let response = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(vec![4i64, 2, 6, 1, 3, 5], [2, 3]),
        &Default::default(),
    );
    let scores = score(&model, &e.teacher, response.clone()).unwrap();
    assert_eq!(scores.hidden.dims(), [2, 3, HIDDEN]);
    // Row r of the teacher scores is the state after teacher_prompt ++ response[..r].
    let p = e.teacher.len();
    let full: Vec<i64> = (0..2)
        .flat_map(|g| {
            let resp = values(response.clone().float())[g * 3..g * 3 + 3].to_vec();
            e.teacher
                .iter()
                .map(|t| i64::from(*t))
                .chain(resp.into_iter().map(|x| x as i64))
                .collect::<Vec<_>>()
        })
        .collect();
    let ids =
        Tensor::<Cpu, 2, Int>::from_data(TensorData::new(full, [2, p + 3]), &Default::default());
    let all = model.forward(ids);
    let want = values(all.narrow(1, p - 1, 3));
    let got = values(scores.hidden);
    for (a, b) in want.iter().zip(&got) {
        assert!((a - b).abs() < 1e-6);
    }
    assert_eq!(values(scores.weight), values(model.lm_head()));
}

#[test]
fn teacher_snapshot_presence_must_match_the_mode() {
    let m = Toy::<Cpu>::new(VOCAB, HIDDEN, 3, &Default::default());
    assert!(Teacher::from_snapshot(TeacherMode::Frozen, Some(m.clone())).is_ok());
    assert!(Teacher::<Toy<Cpu>>::from_snapshot(TeacherMode::Live, None).is_ok());
    let err = Teacher::<Toy<Cpu>>::from_snapshot(TeacherMode::Frozen, None).unwrap_err();
    assert!(err.to_string().contains("frozen"), "{err}");
    let err = Teacher::from_snapshot(TeacherMode::Live, Some(m.clone())).unwrap_err();
    assert!(matches!(err, TeacherError::Snapshot { mode: "live", .. }));
}

#[test]
fn ema_rate_outside_unit_interval_is_rejected() {
    let m = Toy::<Cpu>::new(VOCAB, HIDDEN, 3, &Default::default());
    for rate in [0.0f32, -0.1, 1.5, f32::NAN] {
        let err = Teacher::new(TeacherMode::Ema { rate }, &m).unwrap_err();
        assert!(matches!(err, TeacherError::Rate { .. }), "{rate}: {err:?}");
    }
    assert!(Teacher::new(TeacherMode::Ema { rate: 1.0 }, &m).is_ok());
}

/// LoRA-style training: parameters that do not require gradients are frozen. They get no
/// optimizer state, never change, and the EMA teacher leaves them alone instead of blending a
/// copy of them, while the trained ones are blended as before.
#[test]
fn frozen_params_get_no_optimizer_state_and_the_ema_teacher_blends_only_the_trained_ones() {
    use omniopsd_core::teacher::trainable_params;
    let mut model = Toy::<Train>::new(VOCAB, HIDDEN, 11, &Default::default());
    model.embed = model.embed.set_require_grad(false);
    model.head = model.head.set_require_grad(false);
    let (embed0, head0) = (values(model.embed.val()), values(model.head.val()));
    let trainable = trainable_params::<Train, _>(&model);
    assert_eq!(trainable.len(), 6);
    assert!(trainable.binary_search(&model.embed.id).is_err());
    assert!(trainable.windows(2).all(|w| w[0] < w[1]), "sorted");

    let mut trainer = OpsdTrainer::new(model, config(TeacherMode::Ema { rate: 0.5 })).unwrap();
    let wq0 = values(trainer.model().wq.val());
    for _ in 0..2 {
        let m = trainer.step(&episodes()).unwrap();
        assert!(!m.skipped, "{m:?}");
    }
    let student = trainer.model();
    assert_eq!(values(student.embed.val()), embed0);
    assert_eq!(values(student.head.val()), head0);
    assert_ne!(values(student.wq.val()), wq0, "the trained weights move");
    assert_eq!(
        trainer.state().optimizer.len(),
        6,
        "state for trained params only"
    );
    let teacher = trainer.teacher().snapshot().unwrap();
    assert_eq!(values(teacher.embed.val()), embed0);
    let t = values(teacher.wq.val());
    assert!(
        t != wq0 && t != values(student.wq.val()),
        "blended between θ₀ and θ"
    );
}

/// `with_teacher`: the frozen teacher is what the caller gives (LoRA: the base, adapters off),
/// not the student's θ₀; `live` takes none.
#[test]
fn with_teacher_uses_the_given_frozen_snapshot() {
    let student = Toy::<Train>::new(VOCAB, HIDDEN, 11, &Default::default());
    let other = student.valid().map(&mut Shift(0.2));
    let trainer = OpsdTrainer::with_teacher(
        student.clone(),
        config(TeacherMode::Frozen),
        Some(other.clone()),
    )
    .unwrap();
    assert_eq!(
        params(trainer.teacher().snapshot().unwrap()),
        params(&other)
    );
    let err =
        OpsdTrainer::with_teacher(student, config(TeacherMode::Live), Some(other)).unwrap_err();
    assert!(err.to_string().contains("snapshot"), "{err}");
}
