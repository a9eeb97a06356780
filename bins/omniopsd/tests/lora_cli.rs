//! `score` / `generate` with `--adapter`, and `omniopsd export`, run as the built binary,
//! against transformers + PEFT on `tests/reference/qwen2_tiny` with the PEFT-saved adapters of
//! `tests/reference/gen_lora.py`: log-probs within 1e-4, greedy ids identical, the merged
//! export scoring as the adapter does. Adapters made for another base, and an `--out` that
//! exists, exit non-zero and write nothing.

use std::path::PathBuf;
use std::process::{Command, Output};

use omniopsd_checkpoint::Checkpoint;
use serde_json::Value;

fn reference_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference"
    ))
}

fn path(name: &str) -> String {
    reference_dir().join(name).to_str().unwrap().to_string()
}

fn omniopsd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .args(args)
        .output()
        .expect("the omniopsd binary runs")
}

fn json_of(args: &[&str]) -> Value {
    let out = omniopsd(args);
    assert!(
        out.status.success(),
        "omniopsd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

fn failure_of(args: &[&str]) -> String {
    let out = omniopsd(args);
    assert!(!out.status.success(), "omniopsd {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lora_ref(name: &str) -> Vec<f32> {
    Checkpoint::open_file(&reference_dir().join("lora_ref.safetensors"))
        .unwrap()
        .read_f32(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .0
}

fn prompt_text(key: &str) -> String {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(reference_dir().join("qwen2_prompts.json")).unwrap(),
    )
    .unwrap();
    json[key]["text"].as_str().unwrap().to_string()
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `score --json` of the reference prompt and response with `extra` arguments.
fn score(model: &str, extra: &[&str]) -> Value {
    let (prompt, response) = (prompt_text("score_prompt"), prompt_text("score_response"));
    let mut args = vec![
        "score",
        "--model",
        model,
        "--prompt",
        &prompt,
        "--response",
        &response,
        "--json",
    ];
    args.extend_from_slice(extra);
    json_of(&args)
}

fn max_abs_vs(ours: &[f64], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, &b)| (a - f64::from(b)).abs())
        .fold(0.0, f64::max)
}

#[test]
fn score_with_a_peft_adapter_matches_transformers_peft() {
    for (key, dir) in [
        ("qv", "lora_qv"),
        ("all", "lora_all_rslora"),
        ("pattern", "lora_pattern"),
        ("layers", "lora_layers"),
    ] {
        let adapter = path(dir);
        let out = score(&path("qwen2_tiny"), &["--adapter", &adapter]);
        let ids = numbers(&out["prompt_ids"]);
        let expected: Vec<f64> = lora_ref(&format!("{key}.score.prompt_ids"))
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        assert_eq!(ids, expected, "{dir}: same prompt tokens");
        let err = max_abs_vs(
            &numbers(&out["student"]["logprobs"]),
            &lora_ref(&format!("{key}.score.logprobs")),
        );
        assert!(err <= 1e-4, "{dir}: max |Δ log p| = {err:e}");
        assert_eq!(out["adapter"].as_str(), Some(adapter.as_str()));
    }
}

#[test]
fn greedy_generate_with_an_adapter_matches_peft_generate() {
    let text = prompt_text("prompt0");
    let adapter = path("lora_qv");
    let out = json_of(&[
        "generate",
        "--model",
        &path("qwen2_tiny"),
        "--adapter",
        &adapter,
        "--prompt",
        &text,
        "--max-new-tokens",
        "32",
        "--json",
    ]);
    let ids: Vec<u32> = numbers(&out["ids"]).iter().map(|&x| x as u32).collect();
    let expected: Vec<u32> = lora_ref("qv.gen0").iter().map(|&x| x as u32).collect();
    // The reference ran all 32 steps; the command stops early only on a stop token.
    assert!(!ids.is_empty() && ids.len() <= 32);
    assert_eq!(ids, expected[..ids.len()], "greedy ids");
    if ids.len() < 32 {
        assert_eq!(out["stopped"], Value::Bool(true));
    }
}

#[test]
fn adapter_for_another_base_is_refused_naming_the_tensor_and_both_shapes() {
    let (prompt, response) = (prompt_text("score_prompt"), prompt_text("score_response"));
    let err = failure_of(&[
        "score",
        "--model",
        &path("qwen2_tiny_tied_bf16"),
        "--adapter",
        &path("lora_all_rslora"),
        "--prompt",
        &prompt,
        "--response",
        &response,
    ]);
    assert!(
        err.contains("k_proj.lora_B.weight") && err.contains("[32, 4]") && err.contains("[64, 4]"),
        "{err}"
    );
}

#[test]
fn export_writes_merged_weights_that_score_as_the_adapter_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let out_s = out.to_str().unwrap();
    let export = |model: &str, out: &str| {
        omniopsd(&[
            "export",
            "--model",
            &path(model),
            "--adapter",
            &path("lora_all_rslora"),
            "--out",
            out,
        ])
    };
    let done = export("qwen2_tiny", out_s);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(out.join("tokenizer.json").is_file());
    // A plain checkpoint now: no adapter needed to get the adapted log-probs.
    let scored = score(out_s, &[]);
    let err = max_abs_vs(
        &numbers(&scored["student"]["logprobs"]),
        &lora_ref("all.score.logprobs"),
    );
    assert!(err <= 1e-4, "merged: max |Δ log p| = {err:e}");
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();

    // Again into the same directory: refused, nothing touched.
    let again = export("qwen2_tiny", out_s);
    assert!(!again.status.success());
    let msg = String::from_utf8_lossy(&again.stderr);
    assert!(msg.contains("already exists"), "{msg}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );

    // An adapter for another base: refused, and no --out (nor staging directory) left behind.
    let other = tmp.path().join("other");
    let failed = export("qwen2_tiny_tied_bf16", other.to_str().unwrap());
    assert!(!failed.status.success());
    let msg = String::from_utf8_lossy(&failed.stderr);
    assert!(
        msg.contains("lora_B.weight") && msg.contains("[64, 4]"),
        "{msg}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("merged")], "{left:?}");
}

#[test]
fn missing_adapter_directory_is_named() {
    let err = failure_of(&[
        "generate",
        "--model",
        &path("qwen2_tiny"),
        "--adapter",
        "/nonexistent/lora",
        "--prompt",
        "Hello",
    ]);
    assert!(err.contains("/nonexistent/lora"), "{err}");
}

/// A copy of `lora_qv` with `key` of its adapter_config.json set to `value`.
fn adapter_with(dir: &std::path::Path, key: &str, value: Value) -> PathBuf {
    let src = reference_dir().join("lora_qv");
    let out = dir.join(format!("adapter-{key}"));
    std::fs::create_dir(&out).unwrap();
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    config[key] = value;
    std::fs::write(out.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        out.join("adapter_model.safetensors"),
    )
    .unwrap();
    out
}

#[test]
fn rank_zero_alpha_not_positive_and_unknown_targets_exit_non_zero_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    for (key, value, needle) in [
        ("r", serde_json::json!(0), "at least 1"),
        ("lora_alpha", serde_json::json!(0), "positive"),
        ("lora_alpha", serde_json::json!(-16), "positive"),
        (
            "target_modules",
            serde_json::json!(["q_proj", "c_attn"]),
            "c_attn",
        ),
        // PEFT's placement keys: a pattern that is no regular expression, a zero rank.
        (
            "target_modules",
            serde_json::json!("(q_proj"),
            "not a regular expression",
        ),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 0}),
            "at least 1",
        ),
        (
            "exclude_modules",
            serde_json::json!(["v_proj", 3]),
            "expected names",
        ),
    ] {
        let adapter = adapter_with(tmp.path(), key, value.clone());
        let out = tmp.path().join("merged");
        let failed = omniopsd(&[
            "export",
            "--model",
            &path("qwen2_tiny"),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!failed.status.success(), "{key} = {value}");
        let msg = String::from_utf8_lossy(&failed.stderr);
        assert!(
            msg.contains("adapter_config.json") && msg.contains(key) && msg.contains(needle),
            "{key} = {value}: {msg}"
        );
        assert!(!out.exists(), "{key} = {value}: nothing written");
        let err = failure_of(&[
            "generate",
            "--model",
            &path("qwen2_tiny"),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            "Hello",
        ]);
        assert!(
            err.contains(key) && err.contains(needle),
            "{key} = {value}: {err}"
        );
        std::fs::remove_dir_all(&adapter).unwrap();
    }
    // Only the adapters this test made and removed were ever in the directory.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
