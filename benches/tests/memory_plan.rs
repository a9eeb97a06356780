//! The memory plan (`omniopsd plan`, `omniopsd_decoder::memory`) against the heap: OPSD
//! updates run by the core's trainer on NdArray, their peak live bytes counted by a counting
//! allocator, at two model sizes, full fine-tune and LoRA, with and without gradient
//! accumulation and checkpointing. The estimate must be within 15% of the measurement.
//!
//! One test function: the allocator counts the whole process, so the cases run one at a time.

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, NdArray};
use omniopsd_benches::init::write_random_qwen2;
use omniopsd_benches::plan::check_plan;
use omniopsd_benches::CountingAllocator;
use omniopsd_decoder::memory::{StepShape, TeacherWeights};
use omniopsd_decoder::{LoraConfig, LORA_TARGETS};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

fn config(
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    vocab: usize,
) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 2,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": true
    })
}

fn shape(
    lora: Option<usize>,
    teacher: TeacherWeights,
    accumulation: usize,
    checkpointing: bool,
) -> StepShape {
    StepShape {
        prompt: 96,
        privileged: 48,
        group: 4,
        new_tokens: 24,
        micro_batch: 1,
        grad_accumulation: accumulation,
        chunk_rows: 1024,
        lora: lora.map(|r| LoraConfig {
            r,
            lora_alpha: 2.0 * r as f64,
            lora_dropout: 0.0,
            target_modules: LORA_TARGETS.iter().map(|t| t.to_string()).collect(),
            use_rslora: false,
            placement: Default::default(),
        }),
        teacher,
        compute_bytes: 4,
        checkpointing,
    }
}

#[test]
fn the_plan_is_within_15_percent_of_the_measured_peak_at_two_model_sizes() {
    let sizes = [
        ("h128, 2 layers, V 4096", config(128, 512, 2, 4, 4096)),
        ("h384, 4 layers, V 16384", config(384, 1024, 4, 6, 16384)),
    ];
    let cases = [
        (
            "full, frozen teacher, 2 micro-batches",
            shape(None, TeacherWeights::Frozen, 2, false),
        ),
        (
            "full, live teacher, balanced checkpointing",
            shape(None, TeacherWeights::Live, 1, true),
        ),
        (
            "LoRA r8, frozen teacher",
            shape(Some(8), TeacherWeights::Frozen, 1, false),
        ),
        (
            "LoRA r8, EMA teacher, balanced, 2 micro-batches",
            shape(Some(8), TeacherWeights::Ema, 2, true),
        ),
    ];
    let mut report = Vec::new();
    for (size, json) in &sizes {
        let dir = std::env::temp_dir().join(format!(
            "omniopsd-plan-test-{}-{}",
            std::process::id(),
            json["hidden_size"]
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        write_random_qwen2(&dir, json, 0).unwrap();
        for (case, s) in &cases {
            let checked = if s.checkpointing {
                check_plan::<Autodiff<NdArray<f32>, BalancedCheckpointing>>(&ALLOC, &dir, s)
            } else {
                check_plan::<Autodiff<NdArray<f32>>>(&ALLOC, &dir, s)
            }
            .unwrap();
            report.push(format!(
                "{size}, {case}: measured {:.1} MB, plan {:.1} MB ({}), ratio {:.3}",
                checked.measured as f64 / 1e6,
                checked.plan.peak as f64 / 1e6,
                checked.plan.phase.name(),
                checked.ratio()
            ));
            assert!(
                (checked.ratio() - 1.0).abs() <= 0.15,
                "{}",
                report.join("\n")
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!("{}", report.join("\n"));
}
