//! Each malformed checkpoint gets an error naming the file and the tensor or key.

use std::path::Path;

use burn::backend::NdArray;
use burn::tensor::TensorData;
use omniopsd_checkpoint::{save_safetensors, Checkpoint, Dtype, Error};

type B = NdArray<f32>;

fn write_dir(dir: &Path, config: &str, dtype: Dtype) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let tensors = vec![
        (
            "model.w".to_string(),
            TensorData::new(vec![1.0f32, -2.0, 0.5, 3.0, 4.0, 5.0], [2, 3]),
        ),
        (
            "model.b".to_string(),
            TensorData::new(vec![0.25f32, 1.5], [2]),
        ),
    ];
    save_safetensors::<B>(&dir.join("model.safetensors"), &tensors, dtype).unwrap();
}

#[test]
fn roundtrip_reads_f32_bf16_f16_values_and_shapes() {
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), "{}", dtype);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let w = ckpt.weights().pp("model");
        assert!(w.contains("w"));
        let t = w.tensor::<B, 2>("w", [2, 3], &Default::default()).unwrap();
        assert_eq!(
            t.into_data().to_vec::<f32>().unwrap(),
            vec![1.0, -2.0, 0.5, 3.0, 4.0, 5.0]
        );
    }
}

#[test]
fn missing_tensor_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), "{}", Dtype::F32);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let err = ckpt
        .weights()
        .pp("model")
        .tensor::<B, 1>("nope", [2], &Default::default())
        .unwrap_err();
    assert!(matches!(err, Error::MissingTensor { ref tensor, .. } if tensor == "model.nope"));
}

#[test]
fn wrong_shape_names_file_tensor_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), "{}", Dtype::F32);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let err = ckpt
        .weights()
        .tensor::<B, 2>("model.w", [3, 2], &Default::default())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.w"),
        "{msg}"
    );
    assert!(msg.contains("[2, 3]") && msg.contains("[3, 2]"), "{msg}");
}

fn raw_file(header: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    bytes
}

#[test]
fn unsupported_dtype_names_tensor_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let header = r#"{"x":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
    std::fs::write(dir.path().join("model.safetensors"), raw_file(header, 16)).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let err = ckpt
        .weights()
        .tensor::<B, 1>("x", [2], &Default::default())
        .unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { ref tensor, .. } if tensor == "x"));
}

#[test]
fn truncated_file_is_rejected_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), "{}", Dtype::F32);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(matches!(err, Error::InvalidSafetensors { .. }));
    assert!(err.to_string().contains("model.safetensors"));
}

#[test]
fn header_offsets_past_the_data_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let header = r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,1000000]}}"#;
    std::fs::write(dir.path().join("model.safetensors"), raw_file(header, 16)).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(matches!(err, Error::InvalidSafetensors { .. }), "{err}");
    let msg = err.to_string();
    for part in [
        "model.safetensors",
        "`x`",
        "[0, 1000000]",
        "16 bytes",
        "file 84 bytes",
    ] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
}

#[test]
fn header_errors_name_the_tensor_to_blame() {
    let cases = [
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,12]}}"#,
            12,
            "tensor `b` has data_offsets [8, 12] (4 bytes), but its dtype and shape need 8 bytes",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "tensor `b` starts at byte 4",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            12,
            "the tensors cover 8 bytes of data, but the data section holds 12 bytes",
        ),
    ];
    for (header, data_len, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(
            dir.path().join("model.safetensors"),
            raw_file(header, data_len),
        )
        .unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap();
        assert!(
            err.to_string().contains(expected),
            "{expected} missing from: {err}"
        );
    }
}

#[test]
fn header_length_larger_than_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    assert!(Checkpoint::open(dir.path()).is_err());
}

#[test]
fn config_missing_required_key_names_the_key() {
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Cfg {
        hidden_size: usize,
    }
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), r#"{"vocab_size": 3}"#, Dtype::F32);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let err = ckpt.config::<Cfg>().unwrap_err();
    assert!(
        matches!(err, Error::Config { ref key, .. } if key == "hidden_size"),
        "{err}"
    );
    assert!(err.to_string().contains("config.json"));
}

#[test]
fn sharded_index_pointing_outside_the_directory_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), "{}", Dtype::F32);
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map":{"model.w":"../model.safetensors"}}"#,
    )
    .unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        matches!(err, Error::Index { ref tensor, .. } if tensor == "model.w"),
        "{err}"
    );
}

#[test]
fn non_finite_weights_name_the_tensor_and_element() {
    for (value, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let tensors = vec![
            (
                "model.a".to_string(),
                TensorData::new(vec![1.0f32; 4], [2, 2]),
            ),
            (
                "model.b".to_string(),
                TensorData::new(vec![0.0f32, 1.0, 2.0, 3.0, value, 5.0], [2, 3]),
            ),
        ];
        save_safetensors::<B>(&dir.path().join("model.safetensors"), &tensors, Dtype::Bf16)
            .unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert!(ckpt.read_f32("model.a").is_ok());
        let err = ckpt.read_f32("model.b").unwrap_err();
        assert!(
            matches!(err, Error::NonFinite { ref tensor, ref index, .. } if tensor == "model.b" && index == &[1, 1]),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(shown) && msg.contains("model.safetensors"),
            "{msg}"
        );
    }
}

#[test]
fn config_type_errors_name_the_key_and_the_file() {
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Rope {
        mrope_section: Vec<usize>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Cfg {
        hidden_size: usize,
        num_hidden_layers: usize,
        #[serde(default)]
        rope_scaling: Option<Rope>,
    }
    let cases = [
        (
            r#"{"hidden_size": "wide", "num_hidden_layers": 2}"#,
            "hidden_size",
        ),
        (
            r#"{"hidden_size": 8, "num_hidden_layers": -2}"#,
            "num_hidden_layers",
        ),
        (
            r#"{"hidden_size": 8, "num_hidden_layers": 2, "rope_scaling": {"mrope_section": [1, "x"]}}"#,
            "rope_scaling.mrope_section[1]",
        ),
        (
            r#"{"hidden_size": 8, "num_hidden_layers": 2, "rope_scaling": {}}"#,
            "rope_scaling.mrope_section",
        ),
    ];
    for (config, key) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), config, Dtype::F32);
        let err = Checkpoint::open(dir.path())
            .unwrap()
            .config::<Cfg>()
            .unwrap_err();
        assert!(
            matches!(err, Error::Config { key: ref found, .. } if found == key),
            "{key}: {err}"
        );
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
