//! The core in a trainer of your own: a small Burn model written here (see `model.rs`),
//! trained with [`OpsdTrainer`] against a rationale-privileged teacher, on NdArray in
//! seconds:
//!
//! ```text
//! cargo run -p omniopsd-core --example own_model
//! ```
//!
//! Each episode is a question (token ids) and a rationale only the teacher sees: its context
//! is the student's prompt followed by the rationale tokens. The student samples answers to
//! the bare question and is pulled, token by token, toward what the same weights predict
//! when they have read the rationale.

mod model;

use burn::tensor::backend::Backend as _;
use model::BagOfWords;
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::step::{Episode, OpsdConfig, OpsdTrainer};
use omniopsd_core::teacher::{PrivilegedTemplate, TeacherMode};

type Backend = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

const VOCAB: usize = 16;
const WIDTH: usize = 16;
const STEPS: usize = 60;

/// The teacher's context: the student's prompt, then the privileged tokens.
struct AppendRationale;

impl PrivilegedTemplate<Vec<u32>> for AppendRationale {
    type Block = [u32];
    fn teacher_prompt(&self, student: &Vec<u32>, rationale: &[u32]) -> Vec<u32> {
        student.iter().chain(rationale).copied().collect()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    Backend::seed(&device, 0);
    let model = BagOfWords::<Backend>::new(VOCAB, WIDTH, &device);

    // (question, rationale) pairs; token 0 ends an answer.
    let data: [(&[u32], &[u32]); 4] = [
        (&[3, 4, 5], &[9, 9, 12]),
        (&[6, 2], &[10, 14, 10]),
        (&[7, 8, 8, 3], &[11, 15]),
        (&[5, 5, 2], &[13, 9, 14]),
    ];
    let episodes: Vec<Episode<Vec<u32>>> = data
        .iter()
        .map(|(question, rationale)| {
            Episode::privileged(&AppendRationale, question.to_vec(), rationale)
        })
        .collect();

    let config = OpsdConfig {
        rollout: RolloutConfig {
            samples_per_prompt: 4,
            max_new_tokens: 6,
            stop_tokens: vec![0],
            ..RolloutConfig::default()
        },
        teacher: TeacherMode::Frozen,
        learning_rate: 1e-2,
        seed: 7,
        ..OpsdConfig::default()
    };
    let mut trainer = OpsdTrainer::new(model, config)?;

    let mut losses = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        let m = trainer.step(&episodes)?;
        if step % 10 == 0 || step + 1 == STEPS {
            println!(
                "step {step:3}  loss {:.4}  grad norm {:.3}  answer length {:.1}",
                m.loss, m.grad_norm, m.response_length
            );
        }
        losses.push(m.loss);
    }
    let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len() as f32;
    let (first, last) = (mean(&losses[..10]), mean(&losses[STEPS - 10..]));
    println!("mean loss: first 10 steps {first:.4}, last 10 steps {last:.4}");
    if !(last < first) {
        return Err(format!("the loss did not go down ({first} -> {last})").into());
    }
    Ok(())
}
