//! A PEFT LoRA adapter on the Qwen2.5-Omni thinker, towers included, against transformers 5.25 +
//! PEFT 0.21.2 (`tests/reference/gen_omni_lora.py`): listed targets that PEFT matches in the
//! decoder, the audio tower (attention, MLP) and the vision tower (attention, MLP, merger), on
//! prompt `a` of `gen_omni.py` (audio + image + video) from raw media. Tolerance: relative
//! error (max |Δ| / max |ref|) of the logits ≤ 1e-4 in f32. The adapter is read under both
//! namings PEFT has saved thinkers with (transformers 5's, as the fixture; transformers 4's,
//! the checkpoint's, by renaming its tensors). A second adapter is PEFT's `all-linear` as
//! PEFT resolves and saves it (57 modules).

use std::collections::BTreeSet;
use std::path::Path;

use omniopsd_checkpoint::{Checkpoint, Dtype};
use omniopsd_decoder::PeftAdapter;
use omniopsd_thinker::Thinker;

mod common;

use common::*;

fn logits_a(model: &Thinker<B>) -> Vec<f32> {
    let (ids, media) = prompt_a(&model.config);
    let prompt = model.prompt(&ids, &media).expect("prompt");
    let n = prompt.ids.len();
    logits(model, model.forward(&prompt).reshape([n, 64]))
}

/// Attached adapters on the audio and the vision tower.
fn tower_adapters(model: &Thinker<B>) -> [usize; 2] {
    let mut on = [0; 2];
    let _ = model.audio.clone().map_linears(|_, lin| {
        on[0] += usize::from(lin.adapter().is_some());
        Ok::<_, ()>(lin)
    });
    let _ = model.visual.clone().map_linears(|_, lin| {
        on[1] += usize::from(lin.adapter().is_some());
        Ok::<_, ()>(lin)
    });
    on
}

/// A decoder projection's name (`model.layers.0.self_attn.q_proj`) as transformers 5 names
/// it in a thinker, and PEFT saved the fixture with.
fn v5_name(name: &str) -> String {
    format!(
        "model.language_model.{}",
        name.strip_prefix("model.").unwrap()
    )
}

fn adapter(dir: &Path) -> PeftAdapter {
    PeftAdapter::open(dir).expect("adapter opens")
}

fn reference(name: &str) -> Vec<f32> {
    read("lora_omni_ref.safetensors", name, [75, 256])
}

/// A copy of the fixture adapter with its tensors named as transformers 4 names the modules.
fn legacy_copy(out: &Path) {
    let src = reference_dir().join("lora_omni");
    std::fs::copy(
        src.join("adapter_config.json"),
        out.join("adapter_config.json"),
    )
    .unwrap();
    let file = Checkpoint::open_file(&src.join("adapter_model.safetensors")).unwrap();
    let renamed: Vec<_> = file
        .tensor_names()
        .map(|name| {
            let (values, shape) = file.read_f32(name).unwrap();
            let legacy = name
                .replace(
                    "base_model.model.model.language_model.",
                    "base_model.model.model.",
                )
                .replace(
                    "base_model.model.model.audio_tower.",
                    "base_model.model.audio_tower.",
                )
                .replace("base_model.model.model.visual.", "base_model.model.visual.");
            (legacy, burn::tensor::TensorData::new(values, shape))
        })
        .collect();
    omniopsd_checkpoint::save_safetensors::<B>(
        &out.join("adapter_model.safetensors"),
        &renamed,
        Dtype::F32,
    )
    .unwrap();
}

#[test]
fn a_thinker_adapter_on_decoder_and_towers_gives_peft_logits_under_both_namings() {
    let model = thinker().with_adapter(&adapter(&reference_dir().join("lora_omni")), "");
    let model = model.expect("the adapter attaches");
    // PEFT's 15 tower adapters (gen_omni_lora.py): audio q/v/fc1 in 2 layers, vision q and
    // down_proj in 4 blocks, and the merger's first layer.
    assert_eq!(
        tower_adapters(&model),
        [6, 9],
        "adapters on the audio and vision towers"
    );
    let got = logits_a(&model);
    let err = rel_err(&got, &reference("logits_a"));
    eprintln!("thinker logits with a PEFT adapter on decoder and towers: rel err {err:e}");
    assert!(err <= 1e-4, "rel err {err}");

    let dir = tempfile::tempdir().unwrap();
    legacy_copy(dir.path());
    let legacy = thinker().with_adapter(&adapter(dir.path()), "").unwrap();
    assert_eq!(
        logits_a(&legacy),
        got,
        "transformers 4 names: the same model"
    );
}

#[test]
fn peft_all_linear_resolved_on_a_thinker_gives_peft_logits() {
    let all = adapter(&reference_dir().join("lora_omni_all"));
    let model = thinker()
        .with_adapter(&all, "")
        .expect("the adapter attaches");
    // 57 in all (gen_omni_lora.py): 14 decoder projections, 43 tower layers.
    let [audio, vision] = tower_adapters(&model);
    assert_eq!(audio + vision + model.decoder.adapters().len(), 57);
    let err = rel_err(&logits_a(&model), &reference("all.logits_a"));
    eprintln!("thinker logits with PEFT's all-linear adapter: rel err {err:e}");
    assert!(err <= 1e-4, "rel err {err}");
}

#[test]
fn the_towers_adapters_matter_and_the_decoder_part_alone_is_peft_with_towers_off() {
    let lora = adapter(&reference_dir().join("lora_omni"));
    let mut used = BTreeSet::new();
    let mut model = thinker();
    model.decoder = model
        .decoder
        .attach_adapter(&lora, v5_name, &mut used)
        .unwrap();
    let got = logits_a(&model);
    let err = rel_err(&got, &reference("decoder_only_logits_a"));
    eprintln!("decoder part alone vs PEFT with the towers' adapters off: rel err {err:e}");
    assert!(err <= 1e-4, "rel err {err}");
    assert!(
        rel_err(&got, &reference("logits_a")) > 1e-2,
        "the towers' adapters change the logits"
    );
    // That decoder-only model left the towers' tensors unread, which `with_adapter` refuses.
    let err = lora
        .check_all_used(&used, "the decoder")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.audio_tower.") || err.contains("model.visual."),
        "{err}"
    );
}

#[test]
fn a_thinker_adapter_on_its_text_decoder_alone_is_refused_naming_the_missing_tensor() {
    let ckpt = Checkpoint::open(&reference_dir().join("omni_tiny")).unwrap();
    let decoder = omniopsd_thinker::load_decoder::<B>(&ckpt, &Default::default()).unwrap();
    let err = decoder
        .with_adapter(&adapter(&reference_dir().join("lora_omni")), "")
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("model.layers.0.") && err.contains("lora_A"),
        "{err}"
    );
}

fn rust_saved() -> std::path::PathBuf {
    reference_dir().join("lora_omni_saved_by_rust")
}

/// The decoder part of `lora_omni` saved as training saves a thinker's adapters: the config
/// names the decoder's projections only (`LoraConfig::on_thinker_decoder`).
fn save_decoder_part(dir: &Path) {
    let lora = adapter(&reference_dir().join("lora_omni"));
    let decoder = thinker()
        .decoder
        .attach_adapter(&lora, v5_name, &mut BTreeSet::new())
        .unwrap();
    let config = decoder.lora_config().unwrap().on_thinker_decoder("");
    decoder
        .save_adapter_as(dir, "", Some("tests/reference/omni_tiny"), &config)
        .unwrap();
}

/// `gen_omni_lora.py` loads `lora_omni_saved_by_rust/` with `PeftModel.from_pretrained` and
/// checks that PEFT puts adapters on the decoder only, with no missing tensor, and computes
/// `decoder_only_logits_a`; this keeps that fixture equal, byte for byte, to what saving writes.
#[test]
fn rust_saved_thinker_fixture_is_what_saving_writes() {
    let out = tempfile::tempdir().unwrap();
    save_decoder_part(out.path());
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(out.path().join(file)).unwrap(),
            std::fs::read(rust_saved().join(file)).unwrap(),
            "{file}: rerun `cargo test -p omniopsd-thinker --test lora -- --ignored`, then \
             tests/reference/gen_omni_lora.py"
        );
    }
    // And it reads back here as the decoder part: the thinker's logits with it are PEFT's
    // with the towers' adapters off.
    let model = thinker().with_adapter(&adapter(&rust_saved()), "").unwrap();
    let err = rel_err(&logits_a(&model), &reference("decoder_only_logits_a"));
    assert!(err <= 1e-4, "rel err {err}");
}

#[test]
#[ignore = "writes tests/reference/lora_omni_saved_by_rust/ for gen_omni_lora.py to check with PEFT"]
fn writes_the_rust_saved_thinker_adapter_fixture() {
    save_decoder_part(&rust_saved());
}
