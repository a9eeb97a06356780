//! A randomly initialised Qwen2 checkpoint from a `config.json` alone, for benchmarks of
//! shapes no fixture ships (a 0.5B-class model on the GPU machine, where nothing can be
//! downloaded and 2 GB of weights cannot be carried).
//!
//! Initialised as transformers' `Qwen2PreTrainedModel._init_weights` does: every projection
//! and the embedding from `N(0, initializer_range²)` (default 0.02), biases 0, RMSNorm
//! weights 1, through the models' one random init ([`RandomInit`]), so a seed always gives
//! the same weights, whatever the tensor order.

use std::path::Path;

use burn::tensor::TensorData;
use omniopsd_checkpoint::{save_safetensors, Dtype};
use omniopsd_decoder::Qwen2Config;
use omniopsd_nn::RandomInit;

/// The HF-named tensors of a randomly initialised Qwen2 decoder of `config`.
pub fn random_qwen2(config: &Qwen2Config, std: f64, seed: u64) -> Vec<(String, TensorData)> {
    let h = config.hidden_size;
    let q = config.num_attention_heads * config.head_dim();
    let kv = config.kv_heads() * config.head_dim();
    let i = config.intermediate_size;
    let mut init = RandomInit::new();
    init.normal("model.embed_tokens.weight", vec![config.vocab_size, h]);
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        init.rms_norm(&format!("{p}.input_layernorm"), h);
        init.linear(&format!("{p}.self_attn.q_proj"), h, q, true);
        init.linear(&format!("{p}.self_attn.k_proj"), h, kv, true);
        init.linear(&format!("{p}.self_attn.v_proj"), h, kv, true);
        init.linear(&format!("{p}.self_attn.o_proj"), q, h, false);
        init.rms_norm(&format!("{p}.post_attention_layernorm"), h);
        init.linear(&format!("{p}.mlp.gate_proj"), h, i, false);
        init.linear(&format!("{p}.mlp.up_proj"), h, i, false);
        init.linear(&format!("{p}.mlp.down_proj"), i, h, false);
    }
    init.rms_norm("model.norm", h);
    if !config.tie_word_embeddings {
        init.linear("lm_head", h, config.vocab_size, false);
    }
    init.draw(std, seed)
}

/// Writes `config` (as given, a `config.json` object) and its [`random_qwen2`] weights
/// (f32) to `dir` as an HF checkpoint. `initializer_range` of the config is the weights'
/// standard deviation. Refuses a `dir` that already holds a `config.json` or
/// `model.safetensors`, so no checkpoint is ever overwritten.
pub fn write_random_qwen2(dir: &Path, config: &serde_json::Value, seed: u64) -> Result<(), String> {
    for name in ["config.json", "model.safetensors"] {
        if dir.join(name).exists() {
            return Err(format!(
                "{}: already holds {name}; not overwritten",
                dir.display()
            ));
        }
    }
    let parsed: Qwen2Config =
        serde_json::from_value(config.clone()).map_err(|e| format!("config.json: {e}"))?;
    parsed
        .validate()
        .map_err(|(key, reason)| format!("config.json `{key}`: {reason}"))?;
    let std = config
        .get("initializer_range")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.02);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // The weights first (written to a temporary and renamed), then the config: a failure
    // leaves no config.json, so the directory never looks like a finished checkpoint.
    let weights = dir.join("model.safetensors");
    let tensors = random_qwen2(&parsed, std, seed);
    save_safetensors::<crate::Cpu>(&weights, &tensors, Dtype::F32).map_err(|e| e.to_string())?;
    let text = serde_json::to_string_pretty(config).map_err(|e| e.to_string())?;
    let config_path = dir.join("config.json");
    omniopsd_checkpoint::atomic::write_atomic(&config_path, text.as_bytes()).map_err(|e| {
        let _ = std::fs::remove_file(&weights);
        e.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Int, Tensor};
    use omniopsd_checkpoint::Checkpoint;
    use omniopsd_decoder::Qwen2Model;

    fn tiny(tied: bool) -> serde_json::Value {
        serde_json::json!({
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": tied, "initializer_range": 0.05
        })
    }

    #[test]
    fn a_written_checkpoint_loads_and_runs_in_the_decoder() {
        for tied in [true, false] {
            let dir = std::env::temp_dir().join(format!(
                "omniopsd-random-test-{}-{tied}",
                std::process::id()
            ));
            write_random_qwen2(&dir, &tiny(tied), 3).unwrap();
            // A second write into the same directory is refused and changes nothing.
            let before = std::fs::read(dir.join("model.safetensors")).unwrap();
            let err = write_random_qwen2(&dir, &tiny(!tied), 4).unwrap_err();
            assert!(err.contains("not overwritten"), "{err}");
            assert_eq!(
                std::fs::read(dir.join("model.safetensors")).unwrap(),
                before
            );
            let ckpt = Checkpoint::open(&dir).unwrap();
            // Every tensor the decoder reads is there with its shape, and nothing else.
            let model =
                Qwen2Model::<crate::Cpu>::from_checkpoint(&ckpt, &Default::default()).unwrap();
            assert_eq!(ckpt.tensor_names().count(), 2 + 2 * 12 + usize::from(!tied));
            let (embed, shape) = ckpt.read_f32("model.embed_tokens.weight").unwrap();
            assert_eq!(shape, [64, 32]);
            let std = (embed.iter().map(|x| x * x).sum::<f32>() / embed.len() as f32).sqrt();
            assert!((std - 0.05).abs() < 0.005, "{std}");
            let ids = Tensor::<crate::Cpu, 2, Int>::from_data([[1, 2, 3]], &Default::default());
            let logits = model.logits(model.forward_ids(ids));
            assert_eq!(logits.dims(), [1, 3, 64]);
            let values = logits.into_data().to_vec::<f32>().unwrap();
            assert!(values.iter().all(|x| x.is_finite()));
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_config_the_decoder_cannot_run_is_refused_by_key() {
        let dir = std::env::temp_dir().join(format!("omniopsd-random-bad-{}", std::process::id()));
        let mut bad = tiny(true);
        bad["num_attention_heads"] = 5.into();
        let err = write_random_qwen2(&dir, &bad, 0).unwrap_err();
        assert!(err.contains("num_attention_heads"), "{err}");
        assert!(!dir.exists());
        let mut missing = tiny(true);
        missing.as_object_mut().unwrap().remove("hidden_size");
        let err = write_random_qwen2(&dir, &missing, 0).unwrap_err();
        assert!(err.contains("hidden_size"), "{err}");
    }
}
