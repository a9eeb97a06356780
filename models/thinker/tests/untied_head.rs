//! Which LM head a Qwen2.5-Omni checkpoint gets, against transformers 5.24 on the fixture of
//! `tests/reference/gen_omni_untied.py`: a full `Qwen2_5OmniForConditionalGeneration` saved
//! with an untied head, so `thinker_config.tie_word_embeddings` is false while
//! `thinker_config.text_config.tie_word_embeddings` keeps its default, true, and
//! `thinker.lm_head.weight` is stored. transformers ties the thinker's head by the thinker's
//! own flag, so the reference logits come from `thinker.lm_head.weight`. Tolerance: relative
//! error (max |Δ| / max |ref|) ≤ 1e-4 in f32, as the other thinker parity tests.

mod common;

use burn::tensor::Tensor;
use omniopsd_checkpoint::{Checkpoint, Layout};
use omniopsd_core::PolicyModel;
use omniopsd_thinker::{load_decoder, Thinker};

use common::{read, reference_dir, rel_err, B};

fn checkpoint() -> Checkpoint {
    Checkpoint::open(&reference_dir().join("omni_full_untied")).expect("fixture opens")
}

/// Prompt `name`'s ids and transformers' logits `[len, 256]`.
fn reference(name: &str, len: usize) -> (Vec<u32>, Vec<f32>) {
    let ids = read("omni_untied.safetensors", &format!("ids_{name}"), [len])
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let logits = read(
        "omni_untied.safetensors",
        &format!("logits_{name}"),
        [len, 256],
    );
    (ids, logits)
}

fn logits(model: &Thinker<B>, ids: &[u32]) -> Vec<f32> {
    let prompt = model.prompt(ids, &[]).expect("text prompt");
    let hidden: Tensor<B, 2> = model.forward(&prompt).reshape([ids.len(), 32]);
    hidden
        .matmul(model.lm_head().transpose())
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

#[test]
fn thinker_flag_governs_the_head_not_the_text_config() {
    let ckpt = checkpoint();
    assert_eq!(ckpt.layout(), Layout::Full);
    let config = ckpt.model_config();
    assert_eq!(config.json()["tie_word_embeddings"], false);
    assert_eq!(config.json()["text_config"]["tie_word_embeddings"], true);

    let model = Thinker::<B>::from_checkpoint(&ckpt, &Default::default()).expect("loads");
    assert!(!model.decoder.config().tie_word_embeddings);
    for (name, len) in [("a", 12), ("b", 6)] {
        let (ids, reference) = reference(name, len);
        let err = rel_err(&logits(&model, &ids), &reference);
        eprintln!("untied-head logits {name} rel err: {err:e}");
        assert!(err <= 1e-4, "prompt {name}: rel err {err}");
    }
}

#[test]
fn decoder_alone_gets_the_same_untied_head() {
    let ckpt = checkpoint();
    let decoder = load_decoder::<B>(&ckpt, &Default::default()).expect("decoder loads");
    let (head, _) = ckpt.read_f32("thinker.lm_head.weight").unwrap();
    let loaded = decoder
        .lm_head_weight()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(loaded, head);
}
