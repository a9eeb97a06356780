//! LoRA parity with transformers 5.25 + PEFT 0.21.2 on the tiny checkpoint A
//! (`tests/reference/gen_lora.py`): four PEFT-saved adapters with non-zero `lora_B`
//! (`lora_qv`: q/v, α/r; `lora_all_rslora`: all seven projections, α/√r; `lora_pattern`: a
//! regular-expression target with a lookahead, an excluded module, per-module ranks and alphas;
//! `lora_layers`: a dotted-suffix target on layers 0 and 2 only, rsLoRA, a per-module rank).
//! Tolerances:
//! log-probs `max|Δ|` ≤ 1e-4, greedy ids identical, LoRA gradients `max|Δ| / max|ref|` ≤ 1e-5
//! per tensor.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use omniopsd_checkpoint::{Checkpoint, Dtype};
use omniopsd_core::PolicyModel;
use omniopsd_decoder::{LoraConfig, PeftAdapter, Qwen2Model, TokenPrompt};

use common::{reference, rel_err};

type B = NdArray<f32>;
type A = Autodiff<B>;

const ADAPTERS: [(&str, &str); 4] = [
    ("qv", "lora_qv"),
    ("all", "lora_all_rslora"),
    ("pattern", "lora_pattern"),
    ("layers", "lora_layers"),
];

fn fixture(name: &str) -> Vec<f32> {
    Checkpoint::open_file(&reference().join("lora_ref.safetensors"))
        .unwrap()
        .read_f32(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .0
}

fn ids(name: &str) -> Vec<u32> {
    fixture(name).iter().map(|&v| v as u32).collect()
}

fn base<Bk: Backend>(dir: &str) -> Qwen2Model<Bk> {
    let ckpt = Checkpoint::open(&reference().join(dir)).unwrap();
    Qwen2Model::from_checkpoint(&ckpt, &Default::default()).unwrap()
}

fn adapted<Bk: Backend>(adapter: &str) -> Qwen2Model<Bk> {
    let adapter = PeftAdapter::open(&reference().join(adapter)).unwrap();
    base::<Bk>("qwen2_tiny").with_adapter(&adapter, "").unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `log p(response[r] | prompt, response[..r])`, `[R]`.
fn logprobs<Bk: Backend>(m: &Qwen2Model<Bk>, prompt: &[u32], response: &[u32]) -> Tensor<Bk, 1> {
    let r = response.len();
    let device = Default::default();
    let resp: Vec<i64> = response.iter().map(|&t| t as i64).collect();
    let hidden = m.response_hidden(
        &TokenPrompt::new(prompt.to_vec()),
        Tensor::<Bk, 2, Int>::from_data(TensorData::new(resp.clone(), [1, r]), &device),
    );
    let v = m.config().vocab_size;
    let logp = log_softmax(m.logits(hidden).reshape([r, v]), 1);
    logp.gather(
        1,
        Tensor::<Bk, 2, Int>::from_data(TensorData::new(resp, [r, 1]), &device),
    )
    .reshape([r])
}

fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn score_logprobs<Bk: Backend>(m: &Qwen2Model<Bk>, key: &str) -> Vec<f32> {
    values(logprobs(
        m,
        &ids(&format!("{key}.score.prompt_ids")),
        &ids(&format!("{key}.score.response_ids")),
    ))
}

#[test]
fn peft_adapters_give_transformers_peft_log_probs() {
    for (key, dir) in ADAPTERS {
        let m = adapted::<B>(dir);
        let got = score_logprobs(&m, key);
        let err = max_abs(&got, &fixture(&format!("{key}.score.logprobs")));
        eprintln!("{dir}: response log-probs max |Δ| {err:e}");
        assert!(err <= 1e-4, "{dir}: {err}");
        // The adapter matters: the base's log-probs are far from these.
        assert!(max_abs(&got, &fixture("base.score.logprobs")) > 1e-2);
    }
}

#[test]
fn adapters_off_is_the_base_model_bit_for_bit() {
    let plain = score_logprobs(&base::<B>("qwen2_tiny"), "all");
    let off = adapted::<B>("lora_all_rslora").without_adapters();
    assert!(off.adapters().is_empty() && off.lora_config().is_none());
    assert_eq!(score_logprobs(&off, "all"), plain);
    let err = max_abs(&plain, &fixture("base.score.logprobs"));
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn greedy_ids_equal_peft_generate() {
    for (key, dir) in ADAPTERS {
        let m = adapted::<B>(dir);
        for gen in ["gen0", "gen1"] {
            let prompt = TokenPrompt::new(ids(&format!("{key}.{gen}.prompt_ids")));
            let expected = ids(&format!("{key}.{gen}"));
            assert_eq!(expected.len(), 32);
            let got = m.generate_greedy(&prompt, 32, true, &[]).unwrap();
            assert_eq!(got, expected, "{dir} {gen}");
        }
    }
}

#[test]
fn lora_gradients_equal_pytorch_autograd() {
    let m = adapted::<A>("lora_all_rslora");
    let loss = logprobs(
        &m,
        &ids("all.score.prompt_ids"),
        &ids("all.score.response_ids"),
    )
    .sum();
    let grads = GradientsParams::from_grads(loss.backward(), &m);
    let adapters = m.adapters();
    assert_eq!(adapters.len(), 3 * 7);
    // Only the adapters are trained: no gradient for any base weight.
    assert_eq!(grads.len(), 2 * adapters.len());
    let mut worst = 0f32;
    for (name, a) in &adapters {
        for (which, id, [rows, cols]) in [
            ("lora_A", a.a_t_param().id, [a.rank(), 0]),
            ("lora_B", a.b_t_param().id, [0, a.rank()]),
        ] {
            let g = grads
                .get::<B, 2>(id)
                .unwrap_or_else(|| panic!("{name}.{which}: no gradient"));
            // Stored transposed: [d_in, r] for A, [r, d_out] for B.
            let g = values(g.transpose());
            let expected = fixture(&format!("all.grad.base_model.model.{name}.{which}.weight"));
            assert_eq!(g.len(), expected.len(), "{name}.{which} ({rows}, {cols})");
            let err = rel_err(&g, &expected);
            assert!(err <= 1e-5, "{name}.{which}: gradient rel err {err:e}");
            worst = worst.max(err);
        }
    }
    eprintln!("LoRA gradients vs PyTorch autograd: worst rel err {worst:e}");
}

#[test]
fn new_adapters_change_nothing_until_trained_and_are_the_only_trainable_weights() {
    let config = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        target_modules: vec!["k_proj".into(), "down_proj".into()],
        use_rslora: false,
        placement: Default::default(),
    };
    let m = base::<A>("qwen2_tiny")
        .with_new_adapters(&config, 7)
        .unwrap();
    assert_eq!(m.adapters().len(), 6);
    let before = score_logprobs(&base::<B>("qwen2_tiny"), "all");
    let lp = logprobs(
        &m,
        &ids("all.score.prompt_ids"),
        &ids("all.score.response_ids"),
    );
    assert_eq!(values(lp.clone().inner()), before);
    let grads = GradientsParams::from_grads(lp.sum().backward(), &m);
    assert_eq!(grads.len(), 12);
    // B = 0 at the start, so A's gradient is zero and B's is not (as with PEFT's init).
    let (_, a) = &m.adapters()[0];
    let ga = values(grads.get::<B, 2>(a.a_t_param().id).unwrap());
    let gb = values(grads.get::<B, 2>(a.b_t_param().id).unwrap());
    assert!(ga.iter().all(|&x| x == 0.0));
    assert!(gb.iter().any(|&x| x != 0.0));
    // The seed decides A.
    let other = base::<B>("qwen2_tiny")
        .with_new_adapters(&config, 8)
        .unwrap();
    let same = base::<B>("qwen2_tiny")
        .with_new_adapters(&config, 7)
        .unwrap();
    let a_of = |m: &Qwen2Model<B>| values(m.adapters()[0].1.lora_a());
    assert_eq!(a_of(&same), values(a.lora_a().inner()));
    assert_ne!(a_of(&other), a_of(&same));
}

fn header_and_tensors(path: &Path) -> Vec<(String, Vec<f32>, Vec<usize>)> {
    let ckpt = Checkpoint::open_file(path).unwrap();
    ckpt.tensor_names()
        .map(|n| {
            let (v, s) = ckpt.read_f32(n).unwrap();
            (n.to_string(), v, s)
        })
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn saved_adapter_has_peft_names_values_and_config() {
    for (key, dir) in ADAPTERS {
        let m = adapted::<B>(dir);
        let out = tempfile::tempdir().unwrap();
        m.save_adapter(out.path(), "", Some("tests/reference/qwen2_tiny"))
            .unwrap();
        let peft = reference().join(dir);
        assert_eq!(
            header_and_tensors(&out.path().join("adapter_model.safetensors")),
            header_and_tensors(&peft.join("adapter_model.safetensors")),
            "{dir}: same names, shapes and values as PEFT's file"
        );
        let (ours, theirs) = (
            json(&out.path().join("adapter_config.json")),
            json(&peft.join("adapter_config.json")),
        );
        for field in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "use_dora",
            "bias",
            "fan_in_fan_out",
            "base_model_name_or_path",
            "inference_mode",
        ] {
            assert_eq!(
                ours[field]
                    .as_f64()
                    .map_or(ours[field].clone(), |x| x.into()),
                theirs[field]
                    .as_f64()
                    .map_or(theirs[field].clone(), |x| x.into()),
                "{dir}: {field}"
            );
        }
        // Lists compare as sets (PEFT writes its target set in hash order), patterns and
        // the placement keys as they are.
        let set = |v: &serde_json::Value| -> serde_json::Value {
            match v.as_array() {
                Some(items) => {
                    serde_json::json!(items.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>())
                }
                None => v.clone(),
            }
        };
        for field in [
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "alpha_pattern",
        ] {
            assert_eq!(set(&ours[field]), set(&theirs[field]), "{dir}: {field}");
        }
        // And it loads back to the same model.
        let again = PeftAdapter::open(out.path()).unwrap();
        let m2 = base::<B>("qwen2_tiny").with_adapter(&again, "").unwrap();
        assert_eq!(score_logprobs(&m2, key), score_logprobs(&m, key));
    }
}

fn rust_saved() -> PathBuf {
    reference().join("lora_saved_by_rust")
}

/// `gen_lora.py` checks that PEFT loads `tests/reference/lora_saved_by_rust/` to the same
/// adapter as `lora_all_rslora`; this keeps that fixture equal, byte for byte, to what
/// `save_adapter` writes now (rewrite it with the ignored test below and rerun the script).
#[test]
fn rust_saved_fixture_is_what_save_adapter_writes() {
    let out = tempfile::tempdir().unwrap();
    adapted::<B>("lora_all_rslora")
        .save_adapter(out.path(), "", Some("tests/reference/qwen2_tiny"))
        .unwrap();
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(out.path().join(file)).unwrap(),
            std::fs::read(rust_saved().join(file)).unwrap(),
            "{file}"
        );
    }
}

#[test]
#[ignore = "writes tests/reference/lora_saved_by_rust/ for gen_lora.py to check with PEFT"]
fn writes_the_rust_saved_adapter_fixture() {
    adapted::<B>("lora_all_rslora")
        .save_adapter(&rust_saved(), "", Some("tests/reference/qwen2_tiny"))
        .unwrap();
}

#[test]
fn merged_export_reloads_as_a_plain_checkpoint_with_the_adapted_log_probs() {
    let m = adapted::<B>("lora_all_rslora");
    let out = tempfile::tempdir().unwrap();
    m.merge_adapters()
        .save_pretrained(out.path(), Dtype::F32)
        .unwrap();
    let merged = Qwen2Model::<B>::from_checkpoint(
        &Checkpoint::open(out.path()).unwrap(),
        &Default::default(),
    )
    .unwrap();
    assert!(merged.adapters().is_empty());
    let err = max_abs(
        &score_logprobs(&merged, "all"),
        &fixture("all.score.logprobs"),
    );
    eprintln!("merged export: response log-probs max |Δ| {err:e}");
    assert!(err <= 1e-4, "{err}");
}

/// A copy of `lora_all_rslora` with its config edited and its tensors filtered / added.
fn edited_adapter(
    edit: impl FnOnce(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
    extra: Option<(&str, Vec<usize>)>,
) -> tempfile::TempDir {
    let src = reference().join("lora_all_rslora");
    let out = tempfile::tempdir().unwrap();
    let mut config = json(&src.join("adapter_config.json"));
    edit(&mut config);
    std::fs::write(out.path().join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, TensorData)> =
        header_and_tensors(&src.join("adapter_model.safetensors"))
            .into_iter()
            .filter(|(n, _, _)| keep(n))
            .map(|(n, v, s)| (n, TensorData::new(v, s)))
            .collect();
    if let Some((name, shape)) = extra {
        let n = shape.iter().product();
        tensors.push((name.into(), TensorData::new(vec![0.5f32; n], shape)));
    }
    omniopsd_checkpoint::save_safetensors::<B>(
        &out.path().join("adapter_model.safetensors"),
        &tensors,
        Dtype::F32,
    )
    .unwrap();
    out
}

fn attach_err(dir: &Path, base_dir: &str) -> String {
    match PeftAdapter::open(dir) {
        Err(e) => e.to_string(),
        Ok(adapter) => base::<B>(base_dir)
            .with_adapter(&adapter, "")
            .err()
            .expect("must fail")
            .to_string(),
    }
}

#[test]
fn adapter_made_for_another_base_names_the_tensor_and_both_shapes() {
    // Checkpoint B has 4 key/value heads where A has 2: k_proj is [64, 64], not [32, 64].
    let err = attach_err(&reference().join("lora_all_rslora"), "qwen2_tiny_tied_bf16");
    assert!(
        err.contains("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")
            && err.contains("[32, 4]")
            && err.contains("[64, 4]")
            && err.contains("adapter_model.safetensors"),
        "{err}"
    );
}

#[test]
fn rank_zero_alpha_not_positive_and_unknown_targets_in_a_file_are_refused() {
    for (key, value, needle) in [
        ("r", serde_json::json!(0), "at least 1"),
        ("lora_alpha", serde_json::json!(0.0), "positive"),
        ("lora_alpha", serde_json::json!(-8), "positive"),
        (
            "target_modules",
            serde_json::json!(["q_proj", "qkv_proj"]),
            "qkv_proj",
        ),
        ("use_dora", serde_json::json!(true), "DoRA"),
    ] {
        let dir = edited_adapter(|c| c[key] = value.clone(), |_| true, None);
        let err = attach_err(dir.path(), "qwen2_tiny");
        assert!(
            err.contains("adapter_config.json")
                && err.contains(&format!("`{key}`"))
                && err.contains(needle),
            "{key} = {value}: {err}"
        );
    }
}

#[test]
fn a_missing_and_a_foreign_adapter_tensor_are_named() {
    let gone = "base_model.model.model.layers.2.mlp.up_proj.lora_A.weight";
    let dir = edited_adapter(|_| {}, |n| n != gone, None);
    let err = attach_err(dir.path(), "qwen2_tiny");
    assert!(err.contains(gone) && err.contains("not found"), "{err}");

    let foreign = "base_model.model.lm_head.lora_A.weight";
    let dir = edited_adapter(|_| {}, |_| true, Some((foreign, vec![4, 64])));
    let err = attach_err(dir.path(), "qwen2_tiny");
    assert!(err.contains(foreign), "{err}");

    // Targets the config does not list leave their tensors unused: refused too.
    let dir = edited_adapter(
        |c| c["target_modules"] = serde_json::json!(["q_proj"]),
        |_| true,
        None,
    );
    let err = attach_err(dir.path(), "qwen2_tiny");
    assert!(err.contains("lora_") && err.contains("more"), "{err}");
}

#[test]
fn a_missing_adapter_directory_or_file_is_named() {
    let err = attach_err(Path::new("/nonexistent/adapter"), "qwen2_tiny");
    assert!(err.contains("/nonexistent/adapter"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        reference().join("lora_qv/adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let err = attach_err(dir.path(), "qwen2_tiny");
    assert!(err.contains("adapter_model.safetensors"), "{err}");
}

/// The decoder of a full Qwen2.5-Omni checkpoint sits under `thinker.`; PEFT's names carry
/// that prefix (`base_model.model.thinker.model.layers…`), and an adapter saved for one
/// prefix is refused at another, naming the tensor it looked for.
#[test]
fn adapter_names_follow_the_decoder_prefix_in_its_checkpoint() {
    let m = adapted::<B>("lora_qv");
    let out = tempfile::tempdir().unwrap();
    m.save_adapter(out.path(), "thinker", None).unwrap();
    let names: Vec<String> = header_and_tensors(&out.path().join("adapter_model.safetensors"))
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(names.len(), 3 * 2 * 2);
    assert!(names.contains(
        &"base_model.model.thinker.model.layers.1.self_attn.v_proj.lora_B.weight".to_string()
    ));
    let adapter = PeftAdapter::open(out.path()).unwrap();
    let again = base::<B>("qwen2_tiny")
        .with_adapter(&adapter, "thinker")
        .unwrap();
    assert_eq!(score_logprobs(&again, "qv"), score_logprobs(&m, "qv"));
    let err = base::<B>("qwen2_tiny")
        .with_adapter(&adapter, "")
        .err()
        .expect("another prefix")
        .to_string();
    assert!(
        err.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            && err.contains("not found"),
        "{err}"
    );
    assert_eq!(
        json(&out.path().join("adapter_config.json"))["base_model_name_or_path"],
        serde_json::Value::Null
    );
}

/// The modules PEFT put adapters on, with their ranks, from the file's tensor shapes.
fn ranks_in_file(dir: &str) -> Vec<(String, usize)> {
    header_and_tensors(&reference().join(dir).join("adapter_model.safetensors"))
        .into_iter()
        .filter_map(|(name, _, shape)| {
            let module = name.strip_suffix(".lora_A.weight")?;
            let module = module.strip_prefix("base_model.model.").unwrap();
            Some((module.to_string(), shape[0]))
        })
        .collect()
}

#[test]
fn peft_placement_puts_each_adapter_where_peft_did_with_its_rank() {
    for (_, dir) in ADAPTERS {
        let m = adapted::<B>(dir);
        let ours: Vec<(String, usize)> = m
            .adapters()
            .into_iter()
            .map(|(name, a)| (name, a.lora_a().dims()[0]))
            .collect();
        let mut theirs = ranks_in_file(dir);
        theirs.sort();
        let mut ours_sorted = ours.clone();
        ours_sorted.sort();
        assert_eq!(ours_sorted, theirs, "{dir}");
    }
    // What the fixtures exercise (gen_lora.py): layer 2 and the excluded module left out, the
    // rank patterns applied.
    let pattern = ranks_in_file("lora_pattern");
    assert!(!pattern.iter().any(|(n, _)| n.contains("layers.2.")));
    assert!(!pattern
        .iter()
        .any(|(n, _)| n == "model.layers.0.mlp.up_proj"));
    assert!(pattern.contains(&("model.layers.1.mlp.up_proj".into(), 6)));
    assert!(pattern.contains(&("model.layers.0.self_attn.o_proj".into(), 2)));
    let layers = ranks_in_file("lora_layers");
    assert!(!layers.iter().any(|(n, _)| n.contains("layers.1.")));
    assert!(layers.contains(&("model.layers.2.mlp.gate_proj".into(), 8)));
}
