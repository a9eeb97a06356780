//! `omniopsd train` with a `[lora]` table, through the built binary: the method phases train
//! adapters on the frozen warm-up weights; a run killed inside the OPSD phase resumes to
//! students bit-identical to an uninterrupted run's; each student is also saved as a PEFT
//! adapter; bad `[lora]` values stop the run before anything is written.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{kill_when, ok, spawn, train};

const LORA: &str =
    "[lora]\nr = 4\nlora_alpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n";

/// The shared tiny run with two warm-up updates and a learning rate that moves the adapters.
fn config(dir: &Path, name: &str, cache: &Path, opsd: &str, extra: &str) -> PathBuf {
    let opsd = format!("learning_rate = 1e-3\n{opsd}");
    common::tiny_run_config_with(dir, name, cache, 2, &opsd, extra)
}

/// Every student's weights and adapter, and the scores of every result.
fn outcome(run: &Path) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut files = Vec::new();
    for phase in fs::read_dir(run.join("students")).unwrap() {
        let phase = phase.unwrap().path();
        let name = phase.file_name().unwrap().to_string_lossy().to_string();
        for f in ["model.safetensors", "adapter/adapter_model.safetensors"] {
            files.push((format!("{name}/{f}"), fs::read(phase.join(f)).unwrap()));
        }
    }
    files.sort();
    let mut scores = Vec::new();
    for r in fs::read_dir(run.join("results")).unwrap() {
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(r.unwrap().path()).unwrap()).unwrap();
        scores.push(format!(
            "{} {} {}",
            v["method"], v["scores"], v["final_divergence"]
        ));
    }
    scores.sort();
    (files, scores)
}

#[test]
fn lora_run_killed_in_opsd_resumes_to_bit_identical_students_and_adapters() {
    killed_run_resumes_bit_identically("");
}

/// The EMA teacher (a second adapter set) is checkpointed and put back on the base.
#[test]
fn lora_run_with_an_ema_teacher_resumes_bit_identically() {
    killed_run_resumes_bit_identically("teacher = \"ema\"\nema_rate = 0.5");
}

fn killed_run_resumes_bit_identically(opsd: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let straight = config(dir.path(), "straight", &cache, opsd, LORA);
    ok(&train(&["--config", straight.to_str().unwrap()]));
    let run = dir.path().join("runs/straight");
    let reference = outcome(&run);
    assert_eq!(reference.0.len(), 4, "weights and adapter per method");
    let resolved = fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        resolved.contains("[lora]") && resolved.contains("down_proj"),
        "{resolved}"
    );

    let adapter = run.join("students/opsd-seed0/adapter");
    let peft: serde_json::Value =
        serde_json::from_slice(&fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(peft["peft_type"], "LORA");
    assert_eq!(peft["r"], 4);
    let weights =
        omniopsd_checkpoint::Checkpoint::open_file(&adapter.join("adapter_model.safetensors"))
            .unwrap();
    let names: Vec<&str> = weights.tensor_names().collect();
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("base_model.model.model.layers.")
                && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))),
        "{names:?}"
    );
    // Trained: B moved away from PEFT's zero initialisation.
    let b = names.iter().find(|n| n.ends_with("lora_B.weight")).unwrap();
    assert!(weights.read_f32(b).unwrap().0.iter().any(|&x| x != 0.0));

    let killed = config(dir.path(), "killed", &cache, opsd, LORA);
    let run = dir.path().join("runs/killed");
    kill_when(
        spawn(&["--config", killed.to_str().unwrap()]),
        &run.join("checkpoints/opsd-seed0/step-0000000002.ckpt"),
    );
    ok(&train(&["--resume", run.to_str().unwrap()]));
    let resumed = outcome(&run);
    assert_eq!(resumed.1, reference.1, "same scores and divergences");
    for ((name, a), (_, b)) in resumed.0.iter().zip(&reference.0) {
        assert!(a == b, "{name} differs from the uninterrupted run");
    }
}

#[test]
fn bad_lora_values_stop_before_any_run_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (table, key)) in [
        ("[lora]\nr = 0\n", "lora.r"),
        ("[lora]\nlora_alpha = -2.0\n", "lora.lora_alpha"),
        (
            "[lora]\ntarget_modules = [\"c_attn\"]\n",
            "lora.target_modules",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("bad{i}");
        let cfg = config(dir.path(), &name, &dir.path().join("cache"), "", table);
        let out = train(&["--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success(), "{table}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{table}: {stderr}");
        assert!(
            !dir.path().join("runs").join(&name).exists(),
            "{table}: nothing written"
        );
    }
}
