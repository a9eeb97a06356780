//! End to end: 50 OPSD steps of the toy model against a frozen teacher whose privileged
//! context changes its distribution; the student's divergence to the teacher must fall.

mod common;

use common::{Toy, Train};
use omniopsd_core::divergence::LossConfig;
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::sampling::SamplingConfig;
use omniopsd_core::step::{Episode, LrDecay, LrSchedule, OpsdConfig, OpsdTrainer};
use omniopsd_core::teacher::{PrivilegedTemplate, TeacherMode};

const VOCAB: usize = 16;
const HIDDEN: usize = 16;
const STEPS: usize = 50;

/// The rationale goes between the question and the last prompt token (the "assistant
/// header"), as a chat template would place it.
struct BeforeLastToken;

impl PrivilegedTemplate<Vec<u32>> for BeforeLastToken {
    type Block = [u32];
    fn teacher_prompt(&self, student: &Vec<u32>, block: &[u32]) -> Vec<u32> {
        let cut = student.len() - 1;
        let mut out = student[..cut].to_vec();
        out.extend_from_slice(block);
        out.push(student[cut]);
        out
    }
}

fn episodes() -> Vec<Episode<Vec<u32>>> {
    let data: [(&[u32], &[u32]); 4] = [
        (&[3, 4, 5, 1], &[9, 9, 12, 13]),
        (&[6, 2, 1], &[10, 14, 10]),
        (&[7, 8, 8, 3, 1], &[11, 15, 12]),
        (&[5, 5, 2, 1], &[13, 9, 14, 14, 15]),
    ];
    data.iter()
        .map(|(q, r)| Episode::privileged(&BeforeLastToken, q.to_vec(), r))
        .collect()
}

#[test]
fn fifty_opsd_steps_reduce_divergence_to_a_frozen_privileged_teacher() {
    let config = OpsdConfig {
        rollout: RolloutConfig {
            sampling: SamplingConfig::default(),
            samples_per_prompt: 4,
            max_new_tokens: 6,
            stop_tokens: vec![0],
            pad_token: 0,
            logp_temperature: 1.0,
        },
        loss: LossConfig::default(),
        teacher: TeacherMode::Frozen,
        learning_rate: 1e-2,
        schedule: LrSchedule {
            warmup_steps: 3,
            decay: LrDecay::Cosine,
            total_steps: STEPS as u64,
            min_lr_ratio: 0.1,
        },
        max_grad_norm: Some(1.0),
        seed: 2024,
        ..OpsdConfig::default()
    };
    let model = Toy::<Train>::new(VOCAB, HIDDEN, 77, &Default::default());
    let mut trainer = OpsdTrainer::new(model, config).unwrap();
    let episodes = episodes();
    let mut divergence = Vec::with_capacity(STEPS);
    for _ in 0..STEPS {
        let m = trainer.step(&episodes).unwrap();
        assert!(!m.skipped);
        assert!(m.loss.is_finite() && m.grad_norm.is_finite());
        divergence.push(m.mean_divergence);
    }
    let first = divergence[..5].iter().sum::<f32>() / 5.0;
    let last = divergence[STEPS - 5..].iter().sum::<f32>() / 5.0;
    eprintln!("mean divergence first 5 steps {first:.5}, last 5 steps {last:.5}");
    eprintln!("{divergence:?}");
    assert!(
        first > 1e-3,
        "the privileged block must change the teacher ({first})"
    );
    assert!(
        last < 0.5 * first,
        "divergence did not fall: {first} -> {last}"
    );
    assert_eq!(trainer.optimizer_steps(), STEPS as u64);
}
