//! The layout is read once from `config.json` and the tensor names, and the model's level of
//! the checkpoint (weights and config) is handed out already prefixed.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::TensorData;
use omniopsd_checkpoint::{save_safetensors, Checkpoint, Dtype, Error, Layout};

type B = NdArray<f32>;

fn reference(dir: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference"
    ))
    .join(dir)
}

fn write_dir(dir: &Path, config: &str, names: &[&str]) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let tensors: Vec<_> = names
        .iter()
        .map(|n| (n.to_string(), TensorData::new(vec![1.0f32, 2.0], [2])))
        .collect();
    save_safetensors::<B>(&dir.join("model.safetensors"), &tensors, Dtype::F32).unwrap();
}

#[test]
fn the_three_reference_layouts_are_told_apart() {
    for (dir, layout) in [
        ("qwen2_tiny", Layout::CausalLm),
        ("omni_tiny", Layout::Thinker),
        ("omni_full_layout", Layout::Full),
        ("omni_full_untied", Layout::Full),
    ] {
        let ckpt = Checkpoint::open(&reference(dir)).unwrap();
        assert_eq!(ckpt.layout(), layout, "{dir}");
        assert_eq!(layout.is_multimodal(), layout != Layout::CausalLm);
    }
}

#[test]
fn full_layout_hands_out_the_thinker_level() {
    let ckpt = Checkpoint::open(&reference("omni_full_layout")).unwrap();
    let w = ckpt.model_weights();
    assert_eq!(w.prefix(), "thinker");
    assert!(w.pp("audio_tower").contains("conv1.weight"));
    assert!(!w.contains("talker.codec_head.weight"));
    let config = ckpt.model_config();
    assert_eq!(config.path(), "thinker_config");
    assert!(config.contains("text_config"));
    assert_eq!(
        config.get("audio_config").unwrap().path(),
        "thinker_config.audio_config"
    );

    let bare = Checkpoint::open(&reference("omni_tiny")).unwrap();
    assert_eq!(bare.model_weights().prefix(), "");
    assert_eq!(bare.model_config().path(), "");
}

#[test]
fn nested_config_errors_name_the_full_key_path() {
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Cfg {
        hidden_size: usize,
    }
    let dir = tempfile::tempdir().unwrap();
    write_dir(
        dir.path(),
        r#"{"thinker_config": {"text_config": {"vocab_size": 3}}}"#,
        &["thinker.model.w"],
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let text = ckpt.model_config().get("text_config").unwrap();
    let err = text.deserialize::<Cfg>().unwrap_err();
    assert!(
        matches!(err, Error::Config { ref key, .. } if key == "thinker_config.text_config.hidden_size"),
        "{err}"
    );
    let err = ckpt.model_config().get("audio_config").unwrap_err();
    assert!(
        err.to_string().contains("thinker_config.audio_config")
            && err.to_string().contains("missing"),
        "{err}"
    );
}

#[test]
fn nested_config_without_nested_tensors_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(
        dir.path(),
        r#"{"thinker_config": {"text_config": {}}}"#,
        &["model.w"],
    );
    let err = Checkpoint::open(dir.path()).err().expect("must fail");
    assert!(
        matches!(err, Error::Layout { .. }) && err.to_string().contains("thinker."),
        "{err}"
    );
}

#[test]
fn same_values_compares_stored_tensors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let t = |v: Vec<f32>| TensorData::new(v, [2]);
    let tensors = vec![
        ("a".to_string(), t(vec![1.0, 2.0])),
        ("b".to_string(), t(vec![1.0, 2.0])),
        ("c".to_string(), t(vec![1.0, 3.0])),
    ];
    save_safetensors::<B>(&dir.path().join("model.safetensors"), &tensors, Dtype::F32).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let w = ckpt.weights();
    assert!(w.same_values("a", "b").unwrap());
    assert!(!w.same_values("a", "c").unwrap());
    assert!(!w.same_values("a", "missing").unwrap());
}
