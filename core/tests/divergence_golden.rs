//! Golden vectors from an independent reference: `tests/reference/gen_divergence.py` (PyTorch
//! float64 autograd, and TRL's `GKDTrainer.generalized_jsd_loss` for every full-vocabulary
//! forward-KL / reverse-KL / JSD value) → `tests/reference/divergence_golden.json`.
//!
//! Reduction mapping: TRL `reduction="batchmean"` with `labels` (−100 on padding) is our
//! [`Reduction::Token`] (the generator asserts the equality); TRL `reduction="none"` summed over
//! the vocabulary is our per-token divergence, which the generator reduces per sequence for
//! [`Reduction::Sequence`]. TRL's `beta` is our `Divergence::Jsd { beta }` (teacher weight in the
//! mixture); `ForwardKl` is TRL `beta = 0`, `ReverseKl` is TRL `beta = 1`.
//!
//! Tolerance: every loss, per-token value and gradient entry within `1e-5 · max(1, |ref|)` of
//! the float64 reference, on the logits path (autodiff) and on the fused path (analytic). On
//! the peaked set (logit scale 12, V = 257, a teacher that mostly agrees) the fused gradient is
//! also held to within 5× of PyTorch's own float32 autograd error.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use omniopsd_core::divergence::{
    loss_from_logits, per_token_divergence, Divergence, LossConfig, Reduction, TopK,
};
use omniopsd_core::fused::{fused_loss_and_grads, ResponseBatch, TeacherInput};
use serde_json::Value;

type Cpu = NdArray<f32>;
type Train = Autodiff<Cpu>;

const TOLERANCE: f64 = 1e-5;
/// On the peaked input set (logit scale 12, V = 257): the fused gradient's error, relative to
/// the largest gradient entry, at most this many times PyTorch's float32 autograd's.
const PEAKED_FACTOR: f64 = 5.0;

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/reference/divergence_golden.json"
    );
    let text = std::fs::read_to_string(path).expect("golden file is committed");
    serde_json::from_str(&text).expect("golden file is valid JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn config(c: &Value) -> LossConfig {
    let divergence = match c["divergence"].as_str().expect("divergence") {
        "forward_kl" => Divergence::ForwardKl,
        "reverse_kl" => Divergence::ReverseKl,
        "jsd" => Divergence::Jsd {
            beta: c["beta"].as_f64().expect("beta") as f32,
        },
        "sampled_reverse_kl" => Divergence::SampledReverseKl {
            ratio_clip: c["ratio_clip"].as_f64().expect("ratio_clip") as f32,
        },
        other => panic!("unknown divergence {other}"),
    };
    let reduction = match c["reduction"].as_str().expect("reduction") {
        "token" => Reduction::Token,
        "sequence" => Reduction::Sequence,
        other => panic!("unknown reduction {other}"),
    };
    LossConfig {
        divergence,
        top_k: c.get("top_k").filter(|t| !t.is_null()).map(|t| TopK {
            k: t["k"].as_u64().expect("k") as usize,
            tail: t["tail"].as_bool().expect("tail"),
        }),
        reduction,
        temperature: c["temperature"].as_f64().expect("temperature") as f32,
        kl_clip: c.get("kl_clip").and_then(Value::as_f64).map(|x| x as f32),
    }
}

/// Largest `|found − expected| / max(1, |expected|)`.
fn max_scaled_error(found: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(found.len(), expected.len());
    found
        .iter()
        .zip(expected)
        .map(|(&f, &e)| (f as f64 - e as f64).abs() / (e as f64).abs().max(1.0))
        .fold(0.0, f64::max)
}

struct Inputs {
    shape: [usize; 3],
    student: Vec<f32>,
    teacher: Vec<f32>,
    tokens: Vec<i64>,
    mask: Vec<f32>,
    behaviour: Vec<f32>,
}

/// Input set `name`, with its own `shape` or the file's.
fn inputs(doc: &Value, name: &str) -> Inputs {
    let i = &doc["inputs"][name];
    let dims: Vec<usize> = i
        .get("shape")
        .unwrap_or(&doc["shape"])
        .as_array()
        .expect("shape")
        .iter()
        .map(|x| x.as_u64().expect("dim") as usize)
        .collect();
    Inputs {
        shape: [dims[0], dims[1], dims[2]],
        student: floats(&i["student"]),
        teacher: floats(&i["teacher"]),
        tokens: i["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|x| x.as_i64().expect("int"))
            .collect(),
        mask: floats(&i["mask"]),
        behaviour: floats(&i["behaviour_logp"]),
    }
}

#[test]
fn logits_path_and_fused_path_match_torch_and_trl_golden_vectors() {
    let doc = golden();
    let device = Default::default();
    let mut worst = [0.0f64; 5];
    let mut worst_peaked = 0.0f64;
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() > 100, "golden file lost its cases");
    for case in cases {
        let cfg = config(&case["config"]);
        let set = case["config"]["inputs"].as_str().expect("inputs");
        let inp = inputs(&doc, set);
        let [n, r, v] = inp.shape;
        let expected_loss = case["loss"].as_f64().expect("loss") as f32;
        let expected_grad = floats(&case["grad_student"]);
        let label = format!("{}", case["config"]);

        // Logits path, autodiff gradient.
        let student =
            Tensor::<Train, 3>::from_data(TensorData::new(inp.student.clone(), [n, r, v]), &device)
                .require_grad();
        let teacher =
            Tensor::<Train, 3>::from_data(TensorData::new(inp.teacher.clone(), [n, r, v]), &device);
        let tokens = Tensor::<Train, 2, Int>::from_data(
            TensorData::new(inp.tokens.clone(), [n, r]),
            &device,
        );
        let mask =
            Tensor::<Train, 2>::from_data(TensorData::new(inp.mask.clone(), [n, r]), &device);
        let behaviour =
            Tensor::<Train, 2>::from_data(TensorData::new(inp.behaviour.clone(), [n, r]), &device);
        let loss = loss_from_logits(
            student.clone(),
            teacher.clone(),
            tokens,
            mask,
            behaviour,
            &cfg,
        );
        let grads = loss.backward();
        let loss_value = loss.into_scalar();
        let grad: Vec<f32> = student
            .grad(&grads)
            .expect("student logits get a gradient")
            .into_data()
            .to_vec()
            .expect("f32");
        let e_loss = max_scaled_error(&[loss_value], &[expected_loss]);
        let e_grad = max_scaled_error(&grad, &expected_grad);
        assert!(
            e_loss <= TOLERANCE,
            "{label}: loss {loss_value} vs {expected_loss}"
        );
        assert!(e_grad <= TOLERANCE, "{label}: autodiff grad error {e_grad}");
        worst[0] = worst[0].max(e_loss);
        worst[1] = worst[1].max(e_grad);

        if let Some(per_token) = case.get("per_token") {
            let found: Vec<f32> =
                per_token_divergence(student.clone().inner(), teacher.inner(), &cfg)
                    .into_data()
                    .to_vec()
                    .expect("f32");
            let e = max_scaled_error(&found, &floats(per_token));
            assert!(e <= TOLERANCE, "{label}: per-token error {e}");
            worst[2] = worst[2].max(e);
        }

        // Fused path with H = V and W = I, so hidden = logits and ∂L/∂hidden = ∂L/∂logits.
        let eye: Vec<f32> = (0..v * v)
            .map(|i| if i / v == i % v { 1.0 } else { 0.0 })
            .collect();
        let weight = Tensor::<Cpu, 2>::from_data(TensorData::new(eye, [v, v]), &device);
        let hidden = Tensor::<Cpu, 3>::from_data(TensorData::new(inp.student, [n, r, v]), &device);
        let teacher = Tensor::<Cpu, 3>::from_data(TensorData::new(inp.teacher, [n, r, v]), &device);
        let batch = ResponseBatch {
            tokens: Tensor::from_data(TensorData::new(inp.tokens, [n, r]), &device),
            mask: Tensor::from_data(TensorData::new(inp.mask, [n, r]), &device),
            behaviour_logp: Tensor::from_data(TensorData::new(inp.behaviour, [n, r]), &device),
        };
        let fused = fused_loss_and_grads(
            hidden,
            weight,
            TeacherInput::Logits(teacher),
            &batch,
            &cfg,
            5,
        );
        let fused_grad: Vec<f32> = fused.grad_hidden.into_data().to_vec().expect("f32");
        let e_loss = max_scaled_error(&[fused.stats.loss], &[expected_loss]);
        let e_grad = max_scaled_error(&fused_grad, &expected_grad);
        assert!(
            e_loss <= TOLERANCE,
            "{label}: fused loss {} vs {expected_loss}",
            fused.stats.loss
        );
        assert!(e_grad <= TOLERANCE, "{label}: fused grad error {e_grad}");
        worst[3] = worst[3].max(e_loss);
        worst[4] = worst[4].max(e_grad);
        if set == "peaked" {
            // Peaked rows: the analytic gradient within a small factor of f32 rounding, as
            // PyTorch's float32 autograd of the same loss reaches it (the generator measures
            // that), relative to the gradient's largest entry. Measured: 0.7–3.5× PyTorch's.
            // Issue 17's form of the fused gradient reached 1.3e-5, 10× PyTorch, on such rows.
            let torch_f32 = case["torch_f32_grad_error"]
                .as_f64()
                .expect("peaked cases carry PyTorch's f32 gradient error");
            let bound = PEAKED_FACTOR * torch_f32;
            let scale = expected_grad
                .iter()
                .fold(0.0f64, |m, g| m.max(f64::from(g.abs())));
            let e = fused_grad
                .iter()
                .zip(&expected_grad)
                .map(|(f, g)| f64::from((f - g).abs()))
                .fold(0.0, f64::max)
                / scale;
            assert!(
                e <= bound,
                "{label}: fused grad error {e:.2e} of the largest entry on peaked rows, \
                 PyTorch f32 autograd {torch_f32:.2e}"
            );
            worst_peaked = worst_peaked.max(e / torch_f32);
        }
        if let Some(fraction) = case["config"].get("expect_clip_fraction") {
            let expected = fraction.as_f64().expect("fraction") as f32;
            assert!(
                (fused.stats.clip_fraction - expected).abs() < 1e-6,
                "{label}: clip fraction {} vs {expected}",
                fused.stats.clip_fraction
            );
        }
    }
    println!(
        "max scaled error vs golden: logits loss {:.2e}, logits grad {:.2e}, per-token {:.2e}, fused loss {:.2e}, fused grad {:.2e}",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
    println!("peaked rows: fused-gradient error at most {worst_peaked:.2}× PyTorch f32 autograd's");
    assert!(worst_peaked > 0.0, "the golden file lost its peaked cases");
}
