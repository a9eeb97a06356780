//! `omniopsd plan` and the memory check of `omniopsd train` through the built binary: the table
//! and its verdict, JSON on a checkpoint with LoRA, a plan that does not fit (exit 1, and a
//! run that stops before loading, leaving nothing), `--no-memory-check`, bad values.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::{ok, tiny_run_config, train, BIN};

fn plan(args: &[&str], cwd: &Path) -> Output {
    Command::new(BIN)
        .arg("plan")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("runs the binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn reference(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/reference")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn the_default_plan_prints_its_terms_and_fits() {
    let dir = tempfile::tempdir().unwrap();
    let out = plan(&["--device-memory", "64"], dir.path());
    ok(&out);
    let stdout = text(&out.stdout);
    for row in [
        "| weights (f32) |",
        "| AdamW moments (f32) |",
        "| teacher's own weights |",
        "| activations per backward pass |",
        "| fused loss buffers |",
        "| rollout: KV cache and sampling |",
        "| **peak** |",
        "| device memory | 64.00 GiB |",
        "embedded tiny model",
        "full fine-tune, frozen teacher",
        "fits: the peak is",
    ] {
        assert!(stdout.contains(row), "missing {row:?} in\n{stdout}");
    }
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "plan writes nothing"
    );
}

#[test]
fn a_checkpoint_with_lora_is_planned_from_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lora.toml");
    fs::write(
        &config,
        format!(
            "[model]\ndir = \"{}\"\n[lora]\nr = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n[opsd]\nsamples_per_prompt = 8\nmax_new_tokens = 64\n",
            reference("qwen2_tiny")
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let out = plan(
        &[
            "--config",
            &config,
            "--device-memory",
            "8",
            "--prompt-tokens",
            "300",
            "--json",
        ],
        dir.path(),
    );
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // qwen2_tiny: hidden 64, 3 layers, 2 KV heads of 16; q and v adapters of rank 8.
    let adapters = 3 * 8 * ((64 + 64) + (64 + 32));
    assert_eq!(v["trainable_params"], adapters, "{v}");
    assert_eq!(v["gradients_bytes"], 4 * adapters);
    assert_eq!(
        v["teacher_bytes"], 0,
        "LoRA's frozen teacher shares the base"
    );
    assert_eq!(v["shape"]["group"], 8);
    assert_eq!(v["shape"]["new_tokens"], 64);
    assert_eq!(v["shape"]["prompt"], 300);
    assert_eq!(v["fits"], true);
}

#[test]
fn a_plan_over_the_devices_memory_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = plan(&["--device-memory", "0.0001"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("does not fit"));
    assert!(
        text(&out.stderr).contains("exceeds ndarray's memory"),
        "{}",
        text(&out.stderr)
    );
    for bad in ["0", "-2", "NaN"] {
        let out = plan(&[&format!("--device-memory={bad}")], dir.path());
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("--device-memory"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn train_stops_before_loading_when_the_plan_does_not_fit_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = tiny_run_config(dir.path(), "toobig", &cache, "");
    let config = config.display().to_string();
    let out = train(&["--config", &config, "--device-memory", "0.0001"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("| **peak** |"),
        "the table is shown:\n{stderr}"
    );
    assert!(stderr.contains("--no-memory-check"), "{stderr}");
    assert!(stderr.contains("nothing was trained"), "{stderr}");
    assert!(
        !dir.path().join("runs/toobig").exists(),
        "the run directory is removed"
    );

    // Overridden: the same run trains, with the table as a warning.
    let out = train(&[
        "--config",
        &config,
        "--device-memory",
        "0.0001",
        "--no-memory-check",
    ]);
    ok(&out);
    assert!(dir.path().join("runs/toobig/report.md").exists());
}

#[test]
fn a_gpu_run_is_planned_from_a_config_json_alone_on_a_build_without_cuda() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("omni");
    fs::create_dir(&model).unwrap();
    // A Qwen2.5-Omni config whose weights are not here: its thinker's text_config is planned.
    let config: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(Path::new(&reference("omni_full_untied")).join("config.json")).unwrap(),
    )
    .unwrap();
    fs::write(model.join("config.json"), config.to_string()).unwrap();
    let toml = dir.path().join("gpu.toml");
    fs::write(
        &toml,
        format!(
            "device = \"cuda:0\"\nprecision = \"bf16-mixed\"\n[model]\ndir = \"{}\"\n",
            model.display()
        ),
    )
    .unwrap();
    let toml = toml.display().to_string();
    let out = plan(&["--config", &toml, "--device-memory", "80"], dir.path());
    ok(&out);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("on cuda:0"), "{stdout}");
    assert!(stdout.contains("precision bf16-mixed"), "{stdout}");
    let text_config = &config["thinker_config"]["text_config"];
    assert!(
        stdout.contains(&format!("hidden {},", text_config["hidden_size"])),
        "{stdout}"
    );
    // Without --device-memory the memory of a device this build lacks is unknown: no verdict.
    let out = plan(&["--config", &toml], dir.path());
    ok(&out);
    assert!(text(&out.stdout).contains("give --device-memory GIB"));
}
