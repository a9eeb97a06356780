//! Qwen2 decoder parity with transformers 5.24 `Qwen2ForCausalLM` on the tiny checkpoints of
//! `tests/reference/gen_qwen2.py`: A (untied head, GQA 4/2, f32) and B (tied head, MHA, bf16
//! weights in 3 shards, computed in f32 after upcasting as `torch_dtype=float32` does).
//! Tolerance: relative error `max|Δ| / max|ref|` ≤ 1e-4 on logits; greedy ids identical.

mod common;

use std::path::Path;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use omniopsd_checkpoint::{Checkpoint, Dtype};
use omniopsd_core::PolicyModel;
use omniopsd_decoder::{
    check_tokenizer, text_positions, Error, PromptPositions, Qwen2Model, TokenPrompt,
};

use common::{fixture, ids, reference, rel_err, MODELS};

type B = NdArray<f32>;

fn model(dir: &str) -> Qwen2Model<B> {
    let ckpt = Checkpoint::open(&reference().join(dir)).unwrap();
    Qwen2Model::from_checkpoint(&ckpt, &Default::default()).expect("loads")
}

fn int2(ids: &[u32], rows: usize) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let cols = v.len() / rows;
    Tensor::from_data(TensorData::new(v, [rows, cols]), &Default::default())
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn logits_match_transformers_for_both_checkpoints() {
    for (key, dir) in MODELS {
        let m = model(dir);
        for prompt in ["prompt0", "prompt1"] {
            let p = ids(&format!("{key}.{prompt}.ids"));
            let logits = m.logits(m.forward_ids(int2(&p, 1)));
            let err = rel_err(
                &values(logits),
                &fixture(&format!("{key}.{prompt}.logits")).0,
            );
            eprintln!("{dir} {prompt} logits rel err {err:e}");
            assert!(err <= 1e-4, "{dir} {prompt}: {err}");
        }
    }
}

#[test]
fn batched_forward_matches_transformers() {
    for (key, dir) in MODELS {
        let m = model(dir);
        let p = ids(&format!("{key}.batch.ids"));
        let logits = m.logits(m.forward_ids(int2(&p, 2)));
        let err = rel_err(&values(logits), &fixture(&format!("{key}.batch.logits")).0);
        eprintln!("{dir} batch logits rel err {err:e}");
        assert!(err <= 1e-4, "{dir}: {err}");
    }
}

#[test]
fn explicit_position_ids_are_honoured() {
    let m = model("qwen2_tiny");
    let p = ids("a.pos.ids");
    let pos: Vec<i64> = fixture("a.pos.position_ids")
        .0
        .iter()
        .map(|&v| v as i64)
        .collect();
    let t = p.len();
    let rows: Vec<i64> = pos.iter().cycle().take(3 * t).copied().collect();
    let positions =
        Tensor::<B, 3, Int>::from_data(TensorData::new(rows, [3, 1, t]), &Default::default());
    let hidden = m.forward_embeds(m.embed(int2(&p, 1)), positions, None);
    let err = rel_err(&values(m.logits(hidden)), &fixture("a.pos.logits").0);
    eprintln!("explicit positions logits rel err {err:e}");
    assert!(err <= 1e-4, "{err}");
    // And they matter: the default positions give other logits.
    let plain = values(m.logits(m.forward_ids(int2(&p, 1))));
    assert!(rel_err(&plain, &fixture("a.pos.logits").0) > 1e-3);
}

#[test]
fn greedy_64_tokens_equal_transformers_generate_with_and_without_cache() {
    for (key, dir) in MODELS {
        let m = model(dir);
        for (prompt, gen) in [("prompt0", "gen0"), ("prompt1", "gen1")] {
            let p = TokenPrompt::new(ids(&format!("{key}.{prompt}.ids")));
            let expected = ids(&format!("{key}.{gen}"));
            let cached = m.generate_greedy(&p, 64, true, &[]).unwrap();
            assert_eq!(cached, expected, "{dir} {prompt} with KV cache");
            let uncached = m.generate_greedy(&p, 64, false, &[]).unwrap();
            assert_eq!(uncached, expected, "{dir} {prompt} without cache");
        }
    }
}

#[test]
fn cached_decode_equals_teacher_forcing() {
    let m = model("qwen2_tiny");
    let prompt = TokenPrompt::new(ids("a.prompt1.ids"));
    let response = ids("a.gen1")[..8].to_vec();
    let forced = m.response_hidden(&prompt, int2(&response, 1).repeat_dim(0, 3));
    let (first, mut cache) = m.prefill(&prompt, 3);
    let mut rows = vec![first];
    for &t in &response[..7] {
        let tok = Tensor::<B, 1, Int>::from_data(
            TensorData::new(vec![t as i64; 3], [3]),
            &Default::default(),
        );
        rows.push(m.decode(tok, &mut cache));
    }
    assert_eq!(cache.kv.len(), prompt.ids.len() + 7);
    let decoded: Tensor<B, 3> = Tensor::stack(rows, 1);
    let err = rel_err(&values(decoded), &values(forced));
    eprintln!("cached decode vs teacher forcing rel err {err:e}");
    assert!(err <= 1e-5, "{err}");
}

#[test]
fn response_log_probs_match_transformers() {
    for (key, dir) in MODELS {
        let m = model(dir);
        let prompt = TokenPrompt::new(ids(&format!("{key}.score.prompt_ids")));
        let response = ids(&format!("{key}.score.response_ids"));
        let r = response.len();
        let hidden = m.response_hidden(&prompt, int2(&response, 1));
        let logp = burn::tensor::activation::log_softmax(m.logits(hidden).reshape([r, 448]), 1);
        let picked = logp.gather(1, int2(&response, r));
        let err = rel_err(
            &values(picked),
            &fixture(&format!("{key}.score.logprobs")).0,
        );
        eprintln!("{dir} response log-probs rel err {err:e}");
        assert!(err <= 1e-4, "{dir}: {err}");
    }
}

#[test]
fn exported_weights_reload_to_identical_logits() {
    for (_, dir) in MODELS {
        let m = model(dir);
        let out = tempfile::tempdir().unwrap();
        m.save_pretrained(out.path(), Dtype::F32).unwrap();
        let names: Vec<String> = m.export_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.contains(&"lm_head.weight".to_string()),
            !m.config().tie_word_embeddings,
            "{dir}: lm_head exported exactly when untied"
        );
        let reloaded = Qwen2Model::<B>::from_checkpoint(
            &Checkpoint::open(out.path()).unwrap(),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(reloaded.config().vocab_size, m.config().vocab_size);
        let p = int2(&ids("a.prompt1.ids"), 1);
        assert_eq!(
            values(m.logits(m.forward_ids(p.clone()))),
            values(reloaded.logits(reloaded.forward_ids(p))),
            "{dir}"
        );
    }
}

#[test]
fn text_positions_repeat_one_row_per_sequence() {
    let p = text_positions::<B>(5, 2, 3, &Default::default());
    let v: Vec<i64> = p.into_data().to_vec::<i64>().unwrap();
    assert_eq!(v, [5, 6, 7].repeat(6));
}

/// A copy of checkpoint A in a temp dir, with `edit` applied to its config and tensors.
fn broken(
    edit_config: impl FnOnce(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
    reshape: Option<&str>,
) -> tempfile::TempDir {
    let src = reference().join("qwen2_tiny");
    let out = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(out.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        out.path().join("tokenizer.json"),
    )
    .unwrap();
    let ckpt = Checkpoint::open(&src).unwrap();
    let mut tensors = Vec::new();
    for name in ckpt.tensor_names().filter(|n| keep(n)) {
        let (v, mut shape) = ckpt.read_f32(name).unwrap();
        if reshape == Some(name) {
            shape = vec![shape.iter().product::<usize>()];
        }
        tensors.push((name.to_string(), TensorData::new(v, shape)));
    }
    omniopsd_checkpoint::save_safetensors::<B>(
        &out.path().join("model.safetensors"),
        &tensors,
        Dtype::F32,
    )
    .unwrap();
    out
}

fn load_err(dir: &Path) -> String {
    let ckpt = Checkpoint::open(dir).unwrap();
    Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default())
        .err()
        .expect("must fail")
        .to_string()
}

#[test]
fn missing_tensor_is_named() {
    let dir = broken(|_| {}, |n| n != "model.layers.1.mlp.up_proj.weight", None);
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_named_with_file_and_shapes() {
    let dir = broken(
        |_| {},
        |_| true,
        Some("model.layers.0.self_attn.k_proj.weight"),
    );
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight")
            && err.contains("model.safetensors")
            && err.contains("[2048]")
            && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn config_missing_a_required_key_is_named() {
    let dir = broken(
        |c| {
            c.as_object_mut().unwrap().remove("hidden_size");
        },
        |_| true,
        None,
    );
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
}

#[test]
fn unsupported_config_is_named() {
    let dir = broken(|c| c["use_sliding_window"] = true.into(), |_| true, None);
    let err = load_err(dir.path());
    assert!(err.contains("use_sliding_window"), "{err}");
    let dir = broken(|c| c["num_key_value_heads"] = 3.into(), |_| true, None);
    assert!(load_err(dir.path()).contains("num_key_value_heads"));
}

/// transformers' `tie_weights` at `from_pretrained`: a config that asks for a tied head but a
/// checkpoint that stores a different `lm_head.weight` keeps that head untied.
#[test]
fn tied_config_with_a_different_stored_head_keeps_the_head() {
    let dir = broken(|c| c["tie_word_embeddings"] = true.into(), |_| true, None);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let m = Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default()).unwrap();
    assert!(!m.config().tie_word_embeddings);
    let p = ids("a.prompt0.ids");
    let err = rel_err(
        &values(m.logits(m.forward_ids(int2(&p, 1)))),
        &fixture("a.prompt0.logits").0,
    );
    assert!(err <= 1e-4, "{err}");
}

/// A tied checkpoint that stores the shared matrix only as `lm_head.weight` (transformers
/// swaps source and target and ties the embeddings to it).
#[test]
fn tied_config_storing_only_the_head_shares_it_as_embeddings() {
    let dir = broken(
        |c| c["tie_word_embeddings"] = true.into(),
        |n| n != "model.embed_tokens.weight",
        None,
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let m = Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default()).unwrap();
    assert!(m.config().tie_word_embeddings);
    let (head, _) = ckpt.read_f32("lm_head.weight").unwrap();
    assert_eq!(values(m.lm_head_weight()), head);
    let embedded = m.embed(int2(&[0, 1, 2], 1)).reshape([3 * 64]);
    assert_eq!(values(embedded), head[..3 * 64]);
}

#[test]
fn untied_config_without_a_stored_head_names_it() {
    let dir = broken(|_| {}, |n| n != "lm_head.weight", None);
    let err = load_err(dir.path());
    assert!(
        err.contains("lm_head.weight") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn multimodal_checkpoint_is_refused_by_the_text_loader() {
    let ckpt = Checkpoint::open(&reference().join("omni_tiny")).unwrap();
    let err = Qwen2Model::<B>::from_checkpoint(&ckpt, &Default::default())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("thinker"), "{err}");
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    let path = reference().join("qwen2_tiny/tokenizer.json");
    let tk = check_tokenizer(&path, 448).expect("fits the real embedding");
    let size = tk.get_vocab_size(true);
    match check_tokenizer(&path, size - 1) {
        Err(Error::TokenizerVocab {
            file,
            tokenizer,
            embedding,
        }) => {
            assert_eq!((tokenizer, embedding), (size, size - 1));
            assert!(file.ends_with("tokenizer.json"));
        }
        other => panic!("expected TokenizerVocab, got {other:?}"),
    }
}

#[test]
fn tokenizer_with_an_added_token_past_the_embedding_is_refused() {
    // Few tokens, but one at an id the embedding has no row for (vocabularies may be
    // sparse): the largest id decides, not the count. Encoding `<|far|>` gives id 1000.
    let path = reference().join("qwen2_tiny/tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["model"]["vocab"]["<|far|>"] = serde_json::json!(1000);
    json["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 1000, "content": "<|far|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    let dir = tempfile::tempdir().unwrap();
    let far = dir.path().join("tokenizer.json");
    std::fs::write(&far, json.to_string()).unwrap();
    match check_tokenizer(&far, 448) {
        Err(Error::TokenizerVocab {
            tokenizer,
            embedding,
            ..
        }) => assert_eq!((tokenizer, embedding), (1001, 448)),
        other => panic!("expected TokenizerVocab, got {other:?}"),
    }
}

#[test]
fn prompt_outside_the_vocabulary_is_refused() {
    let m = model("qwen2_tiny");
    let err = m
        .generate_greedy(&TokenPrompt::new(vec![1, 2, 448]), 4, true, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("448") && err.contains("vocabulary"), "{err}");
    assert!(m.check_prompt(&TokenPrompt::new(Vec::new())).is_err());
}

#[test]
fn length_checks_take_any_extra_count_and_any_position_offset_without_overflow() {
    // max_position_embeddings = 512 in qwen2_tiny.
    let m = model("qwen2_tiny");
    let text = TokenPrompt::new(vec![1, 2, 3]);
    m.check_length(&text, 509).expect("positions 0..=511 fit");
    let err = m.check_length(&text, 510).unwrap_err().to_string();
    assert!(err.contains("reach position 512"), "{err}");
    let err = m.check_length(&text, usize::MAX).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings of 512"), "{err}");
    // A media time base from a file can put the offset anywhere.
    let far = TokenPrompt {
        positions: Some(PromptPositions {
            rows: std::array::from_fn(|_| vec![0, 1, 2]),
            delta: i64::MAX - 1,
        }),
        ..text
    };
    m.check_prompt(&far).expect("the prompt itself fits");
    let err = m.check_length(&far, 8).unwrap_err().to_string();
    assert!(
        err.contains(&format!("reach position {}", i64::MAX)),
        "{err}"
    );
}

#[test]
fn greedy_decoding_takes_any_token_bound() {
    // Every id stops decoding, so one token comes back whatever the bound.
    let m = model("qwen2_tiny");
    let stop: Vec<u32> = (0..448).collect();
    let out = m
        .generate_greedy(&TokenPrompt::new(vec![1, 2, 3]), usize::MAX, true, &stop)
        .unwrap();
    assert_eq!(out.len(), 1);
}

#[test]
fn compute_dtype_follows_the_backend_f64_matches_too() {
    type B64 = NdArray<f64>;
    let ckpt = Checkpoint::open(&reference().join("qwen2_tiny_tied_bf16")).unwrap();
    let m = Qwen2Model::<B64>::from_checkpoint(&ckpt, &Default::default()).unwrap();
    let p: Vec<i64> = ids("b.prompt1.ids").iter().map(|&t| t as i64).collect();
    let n = p.len();
    let x = Tensor::<B64, 2, Int>::from_data(TensorData::new(p, [1, n]), &Default::default());
    let logits: Vec<f32> = m
        .logits(m.forward_ids(x))
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    let err = rel_err(&logits, &fixture("b.prompt1.logits").0);
    eprintln!("bf16 weights computed in f64: logits rel err {err:e}");
    assert!(err <= 1e-4, "{err}");
}

/// `response_hidden` runs the shared prompt once and the responses against its cache; it must
/// give the states and the gradients of one uncached causal pass over each
/// `prompt ++ response`, here with M-RoPE rows and an offset so the response positions matter.
#[test]
fn shared_prompt_response_states_and_gradients_equal_full_sequence_passes() {
    use burn::backend::Autodiff;
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use omniopsd_decoder::PromptPositions;
    type A = Autodiff<B>;

    let ckpt = Checkpoint::open(&reference().join("qwen2_tiny")).unwrap();
    let m = Qwen2Model::<A>::from_checkpoint(&ckpt, &Default::default()).unwrap();
    let ids_p = ids("a.prompt1.ids");
    let p = ids_p.len();
    // Three distinct responses of 6 tokens, and M-RoPE rows that differ per row (a 2×3 grid
    // in the middle of the prompt), generated positions continuing at P + delta.
    let responses: Vec<u32> = (0..18).map(|i| (7 + 31 * i) % 448).collect();
    let (n, r) = (3, 6);
    let rows: [Vec<i64>; 3] = std::array::from_fn(|k| {
        (0..p as i64)
            .map(|i| {
                if (3..9).contains(&i) {
                    3 + (i - 3) * (k as i64 + 1) % 5
                } else {
                    i
                }
            })
            .collect()
    });
    let delta = -2;
    let prompt = TokenPrompt {
        ids: ids_p.clone(),
        positions: Some(PromptPositions {
            rows: rows.clone(),
            delta,
        }),
        inserts: None,
    };
    let device = Default::default();
    let response = {
        let v: Vec<i64> = responses.iter().map(|&t| t as i64).collect();
        Tensor::<A, 2, Int>::from_data(TensorData::new(v, [n, r]), &device)
    };
    let weights = Tensor::<A, 3>::random(
        [n, r, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );

    let shared = m.response_hidden(&prompt, response.clone());

    // Reference: every sequence in full, positions spelled out, no cache.
    let mut full_ids = Vec::new();
    for s in 0..n {
        full_ids.extend(ids_p.iter().map(|&t| t as i64));
        full_ids.extend(responses[s * r..(s + 1) * r].iter().map(|&t| t as i64));
    }
    let full_ids = Tensor::<A, 2, Int>::from_data(TensorData::new(full_ids, [n, p + r]), &device);
    let pos: Vec<i64> = (0..3)
        .flat_map(|k| {
            let mut row = rows[k].clone();
            row.extend((p..p + r).map(|i| i as i64 + delta));
            std::iter::repeat_n(row, n).flatten()
        })
        .collect();
    let pos = Tensor::<A, 3, Int>::from_data(TensorData::new(pos, [3, n, p + r]), &device);
    let full = m
        .forward_embeds(m.embed(full_ids), pos, None)
        .narrow(1, p - 1, r);

    let err = rel_err(
        &full.clone().inner().into_data().to_vec::<f32>().unwrap(),
        &shared.clone().inner().into_data().to_vec::<f32>().unwrap(),
    );
    eprintln!("shared-prompt states vs full passes rel err {err:e}");
    assert!(err <= 1e-5, "{err}");

    let grad_of = |hidden: Tensor<A, 3>| {
        let grads = (hidden * weights.clone()).sum().backward();
        let grads = GradientsParams::from_grads(grads, &m);
        let mut collect = CollectGrads {
            grads: &grads,
            out: Vec::new(),
        };
        m.visit(&mut collect);
        collect.out
    };
    let g_shared = grad_of(shared);
    let g_full = grad_of(full);
    assert_eq!(g_shared.len(), g_full.len());
    // Every weight but the (untied) LM head reaches these states.
    assert!(g_full.len() > 10, "only {} gradients", g_full.len());
    let mut worst = 0f32;
    for (k, ((id_a, a), (id_b, b))) in g_shared.iter().zip(&g_full).enumerate() {
        assert_eq!(id_a, id_b);
        let err = rel_err(a, b);
        assert!(err <= 1e-4, "parameter {k}: gradient rel err {err}");
        worst = worst.max(err);
    }
    eprintln!("shared-prompt gradients vs full passes worst rel err {worst:e}");
}

/// Each parameter's gradient, in visiting order.
struct CollectGrads<'a> {
    grads: &'a burn::optim::GradientsParams,
    out: Vec<(burn::module::ParamId, Vec<f32>)>,
}

impl burn::module::ModuleVisitor<burn::backend::Autodiff<B>> for CollectGrads<'_> {
    fn visit_float<const D: usize>(
        &mut self,
        param: &burn::module::Param<Tensor<burn::backend::Autodiff<B>, D>>,
    ) {
        if let Some(g) = self.grads.get::<B, D>(param.id) {
            self.out
                .push((param.id, g.into_data().to_vec::<f32>().unwrap()));
        }
    }
}
