//! `omniopsd train` end to end through the built binary: a short run killed with SIGKILL and
//! resumed reaches bit-identical students (and so does activation checkpointing); Ctrl-C saves and exits; runs are never
//! overwritten; bad corpora are clear errors or reported skips; a manifest of video files
//! trains (FFmpeg needed, tests/ffmpeg).

mod common;
mod ffmpeg;

use common::{kill_when, ok, spawn, tiny_run_config as config, train, wait_for, BIN};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file under `students/` with its bytes, and the scores of every result.
fn outcome(run: &Path) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut files = Vec::new();
    for phase in fs::read_dir(run.join("students")).unwrap() {
        let phase = phase.unwrap().path();
        let bytes = fs::read(phase.join("model.safetensors")).unwrap();
        files.push((phase.file_name().unwrap().to_string_lossy().into(), bytes));
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

/// The uninterrupted run also uses Burn's balanced activation checkpointing (recomputing
/// memory-bound operations in the backward pass) and the killed one does not: the students
/// must still agree bit for bit, so one comparison holds both claims.
#[test]
fn run_killed_mid_training_resumes_to_bit_identical_students() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let straight = config(dir.path(), "straight", &cache, "");
    let text = fs::read_to_string(&straight).unwrap();
    fs::write(
        &straight,
        format!("activation_checkpointing = \"balanced\"\n{text}"),
    )
    .unwrap();
    ok(&train(&["--config", straight.to_str().unwrap()]));
    let resolved = fs::read_to_string(dir.path().join("runs/straight/config.toml")).unwrap();
    assert!(resolved.contains("activation_checkpointing = \"balanced\""));
    let reference = outcome(&dir.path().join("runs/straight"));
    assert_eq!(reference.0.len(), 2, "one student per method");

    let killed = config(dir.path(), "killed", &cache, "");
    let run = dir.path().join("runs/killed");
    // Kill inside the warm-up, then inside the OPSD phase: each resume continues the phase.
    for marker in [
        "checkpoints/warmup/step-0000000002.ckpt",
        "checkpoints/opsd-seed0/step-0000000002.ckpt",
    ] {
        let child = if run.join("config.toml").exists() {
            spawn(&["--resume", run.to_str().unwrap()])
        } else {
            spawn(&["--config", killed.to_str().unwrap()])
        };
        kill_when(child, &run.join(marker));
    }
    ok(&train(&["--resume", run.to_str().unwrap()]));
    let resumed = outcome(&run);
    assert_eq!(resumed.1, reference.1, "same scores and divergences");
    for ((name, a), (_, b)) in resumed.0.iter().zip(&reference.0) {
        assert!(
            a == b,
            "student {name} differs from the uninterrupted (checkpointed) run"
        );
    }
    let metrics = fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let opsd_steps = metrics
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\"") && l.contains("\"method\":\"opsd\""))
        .count();
    assert_eq!(
        opsd_steps, 4,
        "every OPSD update logged exactly once after the resumes"
    );
    for f in [
        "report.md",
        "report.json",
        "plots/loss.png",
        "plots/heldout.png",
        "config.toml",
    ] {
        assert!(run.join(f).is_file(), "{f} written");
    }
    let student = run.join("students/opsd-seed0");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(student.join(f).is_file(), "exported student has {f}");
    }
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_with_a_resume_hint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "sigint", &dir.path().join("cache"), "");
    let run = dir.path().join("runs/sigint");
    let mut child = spawn(&["--config", cfg.to_str().unwrap()]);
    wait_for(
        &mut child,
        &run.join("checkpoints/warmup/step-0000000001.ckpt"),
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "interrupted runs exit non-zero");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("interrupted") && stderr.contains("--resume"),
        "{stderr}"
    );
    ok(&train(&["--resume", run.to_str().unwrap()]));
    assert!(run.join("report.json").is_file());
}

/// [`config`] with `[model] dir = model` in place of the embedded model's sizes.
fn config_with_model(dir: &Path, name: &str, model: &Path) -> PathBuf {
    let path = config(dir, name, &dir.join("cache"), "");
    let text = fs::read_to_string(&path).unwrap().replace(
        "[model]\nhidden_size = 32\nintermediate_size = 64\n",
        &format!("[model]\ndir = \"{}\"\n", model.display()),
    );
    fs::write(&path, text).unwrap();
    path
}

/// A config whose `[model] dir` does not exist.
fn config_with_missing_model(dir: &Path, name: &str) -> PathBuf {
    config_with_model(dir, name, &dir.join("no-such-model"))
}

#[test]
fn an_existing_run_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_missing_model(dir.path(), "twice");
    let run = dir.path().join("runs/twice");
    fs::create_dir_all(&run).unwrap();
    fs::write(run.join("config.toml"), "name = \"twice\"\n").unwrap();
    let out = train(&["--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The new run went to twice-2 (and, failing before any update, left nothing there).
    assert!(
        stderr.contains("no-such-model") && stderr.contains("twice-2 was removed"),
        "{stderr}"
    );
    assert!(!dir.path().join("runs/twice-2").exists());
    assert_eq!(
        fs::read_to_string(run.join("config.toml")).unwrap(),
        "name = \"twice\"\n"
    );
    assert_eq!(fs::read_dir(&run).unwrap().count(), 1, "nothing added");
}

#[test]
fn a_run_that_fails_before_its_first_update_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_missing_model(dir.path(), "early");
    for _ in 0..2 {
        let out = train(&["--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The second attempt fails the same way: no "already holds a run", no early-2.
        assert!(
            stderr.contains("no-such-model") && stderr.contains("early was removed"),
            "{stderr}"
        );
        assert!(!dir.path().join("runs/early").exists());
        assert!(!dir.path().join("runs/early-2").exists());
    }
    // A directory the user made beforehand keeps what it held.
    let run = dir.path().join("runs/early");
    fs::create_dir_all(&run).unwrap();
    fs::write(run.join("notes.txt"), "mine").unwrap();
    assert!(!train(&["--config", cfg.to_str().unwrap()]).status.success());
    let left: Vec<_> = fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
}

#[test]
fn unwritable_runs_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("runs");
    fs::write(&blocker, b"a file, not a directory").unwrap();
    let cfg = config(dir.path(), "blocked", &dir.path().join("cache"), "");
    let out = train(&["--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("run directory") && stderr.contains("blocked"),
        "{stderr}"
    );
}

#[test]
fn unknown_config_key_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "typo",
        &dir.path().join("cache"),
        "[extra]\nlerning_rate = 1\n",
    );
    let out = train(&["--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("extra"), "{stderr}");
}

#[test]
fn video_sampling_knobs_are_checked_naming_their_key() {
    let dir = tempfile::tempdir().unwrap();
    for (name, table, key) in [
        ("fps", "[data.video]\nfps = 0.0\n", "data.video.fps"),
        (
            "frames",
            "[data.video]\nmin_frames = 9\nmax_frames = 8\n",
            "data.video.min_frames",
        ),
        ("typo", "[data.video]\nfpz = 2.0\n", "fpz"),
    ] {
        let cfg = config(dir.path(), name, &dir.path().join("cache"), table);
        let out = train(&["--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{name}: {stderr}");
        assert!(!dir.path().join("runs").join(name).exists());
    }
}

#[test]
fn device_flag_overrides_the_config_and_bad_devices_fail_before_any_run_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "dev", &dir.path().join("cache"), "");
    let out = train(&["--config", cfg.to_str().unwrap(), "--device", "tpu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("device") && stderr.contains("tpu"),
        "{stderr}"
    );
    // The tests build without the flex feature: the flag reaches the backend check.
    if !cfg!(feature = "flex") {
        let out = train(&["--config", cfg.to_str().unwrap(), "--device", "flex"]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--features flex"), "{stderr}");
    }
    assert!(!dir.path().join("runs").join("dev").exists());
}

#[test]
fn a_precision_the_backend_cannot_run_fails_before_any_run_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for (precision, expected) in [
        ("bf16-mixed", "NdArray"),
        ("f16-mixed", "NdArray"),
        ("f8", "unknown variant"),
    ] {
        let cfg = config(dir.path(), "prec", &dir.path().join("cache"), "");
        let text = fs::read_to_string(&cfg).unwrap();
        fs::write(&cfg, format!("precision = \"{precision}\"\n{text}")).unwrap();
        let out = train(&["--config", cfg.to_str().unwrap(), "--device", "cpu"]);
        assert!(!out.status.success(), "{precision}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("precision") && stderr.contains(expected),
            "{precision}: {stderr}"
        );
        assert!(
            !dir.path().join("runs").join("prec").exists(),
            "{precision}"
        );
    }
}

/// A corpus with one sample whose WAV is missing.
fn broken_corpus(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus");
    let status = Command::new(BIN)
        .args([
            "data",
            "synth",
            "--out",
            corpus.to_str().unwrap(),
            "--n",
            "20",
            "--quiet",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let manifest = corpus.join("manifest.jsonl");
    let text = fs::read_to_string(&manifest).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
    fs::remove_file(corpus.join(first["audio"].as_str().unwrap())).unwrap();
    manifest
}

#[test]
fn missing_media_stops_the_run_naming_the_line_unless_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = broken_corpus(dir.path());
    let data = format!("manifest = \"{}\"\n", manifest.display());
    let strict = config(dir.path(), "strict", &dir.path().join("cache"), "")
        .to_str()
        .unwrap()
        .to_string();
    let text = fs::read_to_string(&strict)
        .unwrap()
        .replace("[data]\n", &format!("[data]\n{data}"));
    fs::write(&strict, &text).unwrap();
    let out = train(&["--config", &strict]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("manifest.jsonl:2") && stderr.contains("skip"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("runs/strict").exists(),
        "nothing left behind"
    );

    let lenient = dir.path().join("lenient.toml");
    fs::write(
        &lenient,
        text.replace("name = \"strict\"", "name = \"lenient\"")
            .replace("[data]\n", "[data]\non_bad_sample = \"skip\"\n"),
    )
    .unwrap();
    ok(&train(&["--config", lenient.to_str().unwrap()]));
    let report = fs::read_to_string(dir.path().join("runs/lenient/report.md")).unwrap();
    assert!(
        report.contains("skipped") && report.contains("manifest.jsonl:2"),
        "{report}"
    );
}

#[test]
fn trains_on_video_files_with_their_own_sound_tracks() {
    if !ffmpeg::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let status = Command::new(BIN)
        .args([
            "data",
            "synth",
            "--out",
            corpus.to_str().unwrap(),
            "--n",
            "20",
            "--quiet",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let media = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference/media"
    ));
    let clips = ["clip_h264.mp4", "clip_vp9.webm", "clip_mjpeg.avi"];
    for clip in clips {
        fs::copy(media.join(clip), corpus.join(clip)).unwrap();
    }
    let manifest = corpus.join("manifest.jsonl");
    let lines: Vec<String> = fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["video"] = clips[i % clips.len()].into();
            v.as_object_mut().unwrap().remove("audio");
            v.to_string()
        })
        .collect();
    fs::write(&manifest, lines.join("\n") + "\n").unwrap();
    // Frames at the embedded model's 56x56 (one merged token per 28x28 block).
    let extra = "[data.video]\nmin_pixels = 3136\nmax_pixels = 3136\n";
    let path = config(dir.path(), "video", &dir.path().join("cache"), extra);
    let text = fs::read_to_string(&path).unwrap().replace(
        "[data]\n",
        &format!("[data]\nmanifest = \"{}\"\n", manifest.display()),
    );
    fs::write(&path, text).unwrap();
    ok(&train(&["--config", path.to_str().unwrap()]));
    assert!(dir.path().join("runs/video/report.md").is_file());
}

fn reference(dir: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference"
    ))
    .join(dir)
}

#[test]
fn trains_a_text_only_hf_checkpoint_and_exports_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_model(dir.path(), "text", &reference("qwen2_tiny"));
    ok(&train(&["--config", path.to_str().unwrap()]));
    let run = dir.path().join("runs/text");
    let report = fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains("text-only checkpoint"), "{report}");
    let student = run.join("students/opsd-seed0");
    let exported: serde_json::Value =
        serde_json::from_slice(&fs::read(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(exported["architectures"][0], "Qwen2ForCausalLM");
    assert!(student.join("model.safetensors").is_file());
}

#[test]
fn checkpoint_without_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_model(dir.path(), "notok", &reference("omni_tiny"));
    let out = train(&["--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("omni_tiny") && stderr.contains("tokenizer.json"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("runs/notok").exists(),
        "nothing left behind"
    );
}

#[test]
fn json_logs_print_one_metric_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "json", &dir.path().join("cache"), "");
    let out = Command::new(BIN)
        .args(["train", "--config", cfg.to_str().unwrap(), "--json-logs"])
        .args(["--method", "label-sft"])
        .output()
        .unwrap();
    ok(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["kind"] == "train" && l["phase"] == "warmup"));
    assert!(lines
        .iter()
        .any(|l| l["kind"] == "eval" && l["method"] == "label-sft"));
    assert!(
        lines.iter().all(|l| l["method"] != "opsd"),
        "--method picks the rows"
    );
}

/// omni_tiny (a Qwen2.5-Omni thinker checkpoint) with a word-level tokenizer whose chat and
/// media tokens sit at the ids its config names.
fn omni_checkpoint(dir: &Path) -> PathBuf {
    let out = dir.join("omni");
    fs::create_dir_all(&out).unwrap();
    for name in ["config.json", "model.safetensors"] {
        fs::copy(reference("omni_tiny").join(name), out.join(name)).unwrap();
    }
    let specials = [
        ("<|AUDIO|>", 240),
        ("<|IMAGE|>", 241),
        ("<|VIDEO|>", 242),
        ("<|audio_bos|>", 243),
        ("<|audio_eos|>", 244),
        ("<|vision_bos|>", 245),
        ("<|vision_eos|>", 246),
        ("<|im_start|>", 248),
        ("<|im_end|>", 249),
    ];
    let mut vocab = serde_json::Map::new();
    let mut free = (0u32..).filter(|id| !specials.iter().any(|s| s.1 == *id));
    for word in [
        "<unk>",
        "system",
        "user",
        "assistant",
        "emotion:",
        "happy;",
        "sad;",
    ] {
        vocab.insert(word.into(), free.next().unwrap().into());
    }
    for (token, id) in specials {
        vocab.insert(token.into(), id.into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|(content, id)| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    fs::write(out.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    out
}

/// The tiny run config at `path` rewritten to train OPSD alone on the checkpoint `model`
/// instead of the embedded model, on a smaller corpus.
fn on_checkpoint(path: &Path, model: &Path) {
    let text = fs::read_to_string(path)
        .unwrap()
        .replace(
            "methods = [\"opsd\", \"label-sft\"]",
            "methods = [\"opsd\"]",
        )
        .replace(
            "[model]\nhidden_size = 32\nintermediate_size = 64\n",
            &format!("[model]\ndir = \"{}\"\n", model.display()),
        )
        .replace("synth_n = 20", "synth_n = 12");
    fs::write(path, text).unwrap();
}

#[test]
fn trains_a_qwen2_5_omni_thinker_checkpoint_and_exports_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "omni", &dir.path().join("cache"), "");
    on_checkpoint(&path, &omni_checkpoint(dir.path()));
    ok(&train(&["--config", path.to_str().unwrap()]));
    let student = dir.path().join("runs/omni/students/opsd-seed0");
    let exported =
        omniopsd_checkpoint::Checkpoint::open(&student).expect("the student is a checkpoint");
    let names: Vec<&str> = exported.tensor_names().collect();
    assert!(names.iter().any(|n| n.starts_with("audio_tower.")));
    assert!(names.iter().any(|n| n.starts_with("visual.")));
    assert!(names.contains(&"lm_head.weight"));
}

/// `omniopsd score --json` on one prompt and response, its student log-probs.
fn score_logprobs(model: &Path, adapter: Option<&Path>) -> Vec<f64> {
    let mut cmd = Command::new(BIN);
    cmd.args(["score", "--model"]).arg(model).args([
        "--prompt",
        "how does the speaker feel",
        "--response",
        "happy",
        "--json",
    ]);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let out = cmd.output().unwrap();
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["student"]["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn lora_on_a_thinker_saves_an_adapter_that_names_the_decoder_only_and_scores_as_the_student() {
    let dir = tempfile::tempdir().unwrap();
    let omni = omni_checkpoint(dir.path());
    let lora = "[lora]\nr = 4\nlora_alpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    // No warm-up: the adapters sit on the checkpoint itself, the base `--model` names.
    let path = common::tiny_run_config_with(
        dir.path(),
        "omni",
        &dir.path().join("cache"),
        0,
        "learning_rate = 0.05\n",
        lora,
    );
    on_checkpoint(&path, &omni);
    ok(&train(&["--config", path.to_str().unwrap()]));
    let student = dir.path().join("runs/omni/students/opsd-seed0");
    let adapter = student.join("adapter");
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
    // A pattern over the decoder's layers, so PEFT leaves the audio tower's q_proj/v_proj be.
    let pattern = config["target_modules"].as_str().expect("a pattern");
    assert!(
        pattern.contains("layers") && pattern.contains("q_proj|v_proj"),
        "{pattern}"
    );
    // The adapter on the base scores as the merged student.
    let merged = score_logprobs(&student, None);
    let adapted = score_logprobs(&omni, Some(&adapter));
    let base = score_logprobs(&omni, None);
    let gap = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    assert!(gap(&adapted, &merged) <= 1e-4, "{adapted:?} vs {merged:?}");
    assert!(gap(&base, &merged) > 1e-6, "training moved the student");
}
