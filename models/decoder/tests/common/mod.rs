//! Fixture access shared by the decoder's tests: the files `tests/reference/gen_qwen2.py`
//! wrote, and the error measure they are compared with.
#![allow(dead_code)] // each test binary uses its own part of this

use std::path::PathBuf;

use omniopsd_checkpoint::Checkpoint;

/// The two reference checkpoints and their fixture keys: A (untied head, GQA 4/2, f32) and B
/// (tied head, MHA, bf16 weights in 3 shards).
pub const MODELS: [(&str, &str); 2] = [("a", "qwen2_tiny"), ("b", "qwen2_tiny_tied_bf16")];

/// `tests/reference` at the repository root.
pub fn reference() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference"
    ))
}

/// Values and shape of one tensor of `qwen2_ref.safetensors`.
pub fn fixture(name: &str) -> (Vec<f32>, Vec<usize>) {
    Checkpoint::open_file(&reference().join("qwen2_ref.safetensors"))
        .unwrap()
        .read_f32(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A fixture of token ids.
pub fn ids(name: &str) -> Vec<u32> {
    fixture(name).0.iter().map(|&v| v as u32).collect()
}

/// `max|a − ref| / max|ref|`.
pub fn rel_err(a: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(a.len(), reference.len());
    let scale = reference.iter().map(|x| x.abs()).fold(0.0, f32::max);
    a.iter()
        .zip(reference)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}
