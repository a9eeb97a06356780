//! `omniopsd predict` end to end through the built binary, on a student a short run trained:
//! its scores equal the run's own held-out scores, an interrupted file resumes to the bytes
//! of an uninterrupted one, sampled answers repeat per seed, and bad inputs are clear errors
//! that write nothing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_omniopsd");

fn omniopsd(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("runs the binary")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn failure(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A trained student (label-sft, every held-out sample evaluated), its run directory and the
/// corpus manifest.
struct Trained {
    dir: tempfile::TempDir,
    run: PathBuf,
    manifest: PathBuf,
}

impl Trained {
    fn student(&self) -> PathBuf {
        self.run.join("students").join("label-sft-seed0")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `predict` on the student with `extra` flags, writing `out`.
    fn predict(&self, out: &Path, extra: &[&str]) -> Output {
        let student = self.student();
        let mut args = vec![
            "predict",
            "--model",
            student.to_str().unwrap(),
            "--manifest",
            self.manifest.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        omniopsd(&args)
    }
}

fn trained() -> Trained {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = common::tiny_run_config(dir.path(), "p", &cache, "");
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("max_samples = 3\nmax_new_tokens = 8"));
    let text = text
        .replace(
            r#"methods = ["opsd", "label-sft"]"#,
            r#"methods = ["label-sft"]"#,
        )
        // Every held-out sample, with the default answer budget, which `predict` shares.
        .replace("max_samples = 3\nmax_new_tokens = 8", "max_samples = 1000");
    fs::write(&cfg, text).unwrap();
    ok(omniopsd(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
    ]));
    let manifest = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path().join("manifest.jsonl"))
        .find(|m| m.is_file())
        .expect("the synthetic corpus's manifest");
    let run = dir.path().join("runs").join("p");
    Trained { dir, run, manifest }
}

/// HIT, WAF and F_s of an eval-mer JSON report.
fn report_scores(report: &Value) -> [f64; 3] {
    let get = |name: &str| {
        report["datasets"][name]["score"]
            .as_f64()
            .unwrap_or_else(|| panic!("no {name} score in {report}"))
    };
    [get("MER2023"), get("CMU-MOSI"), get("OV-MERD+")]
}

#[test]
fn predictions_score_as_the_runs_own_heldout_evaluation_and_resume_byte_for_byte() {
    let t = trained();
    let out = t.path("preds.jsonl");
    ok(t.predict(&out, &[]));
    let first = fs::read(&out).unwrap();
    let lines = first.iter().filter(|&&b| b == b'\n').count();
    let heldout = fs::read_to_string(&t.manifest)
        .unwrap()
        .lines()
        .filter(|l| l.contains(r#""split":"heldout""#))
        .count();
    assert!(heldout > 0);
    assert_eq!(lines, 3 * heldout, "three lines per held-out sample");

    // The same numbers as the run's result for this student.
    let report = ok(omniopsd(&[
        "eval-mer",
        "--predictions",
        out.to_str().unwrap(),
        "--json",
    ]));
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    let result: Value = serde_json::from_slice(
        &fs::read(t.run.join("results").join("label-sft-seed0.json")).unwrap(),
    )
    .unwrap();
    let s = &result["scores"];
    let expected = ["hit", "waf", "fs"].map(|k| s[k].as_f64().unwrap());
    let found = report_scores(&report);
    for (e, f) in expected.iter().zip(found) {
        assert!((e - f).abs() < 1e-9, "run {expected:?}, predict {found:?}");
    }

    // Several samples per forward pass (the default, 8) or one at a time: the same answers.
    for batch in ["1", "3"] {
        let one = t.path(&format!("batch{batch}.jsonl"));
        ok(t.predict(&one, &["--batch-size", batch]));
        assert_eq!(fs::read(&one).unwrap(), first, "--batch-size {batch}");
    }
    let err = failure(t.predict(&t.path("zero.jsonl"), &["--batch-size", "0"]));
    assert!(err.contains("--batch-size"), "{err}");
    assert!(!t.path("zero.jsonl").exists());

    // Killed mid-write: a torn last line. The rerun cuts the unfinished sample and finishes
    // with the bytes of the uninterrupted file; a rerun of a finished file adds nothing.
    fs::write(&out, &first[..first.len() - 17]).unwrap();
    let resumed = ok(t.predict(&out, &[]));
    assert!(
        String::from_utf8_lossy(&resumed.stderr).contains("unfinished sample"),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(fs::read(&out).unwrap(), first);
    ok(t.predict(&out, &[]));
    assert_eq!(fs::read(&out).unwrap(), first);

    // Other settings on the same file are refused, naming the setting; the file is kept.
    let err = failure(t.predict(&out, &["--decoding", "affectgpt"]));
    assert!(err.contains("temperature"), "{err}");
    assert_eq!(fs::read(&out).unwrap(), first);

    // --score prints eval-mer's table.
    let scored = ok(t.predict(&out, &["--score"]));
    let table = String::from_utf8_lossy(&scored.stdout);
    assert!(
        table.contains("MER2023") && table.contains("OV-MERD+"),
        "{table}"
    );
}

#[test]
fn sampled_answers_repeat_per_seed_and_resume_to_the_same_file() {
    let t = trained();
    let sampled = [
        "--decoding",
        "affectgpt",
        "--seed",
        "3",
        "--max-new-tokens",
        "6",
    ];
    let (a, b) = (t.path("a.jsonl"), t.path("b.jsonl"));
    ok(t.predict(&a, &sampled));
    let whole = fs::read(&a).unwrap();
    // b: stopped after its first sample, then resumed.
    ok(t.predict(&b, &sampled));
    let first_group: usize = whole
        .split_inclusive(|&x| x == b'\n')
        .take(3)
        .map(<[u8]>::len)
        .sum();
    fs::write(&b, &whole[..first_group]).unwrap();
    ok(t.predict(&b, &sampled));
    assert_eq!(fs::read(&b).unwrap(), whole);
    // Each sample draws from its own stream, whichever batch it is decoded in.
    let single = t.path("single.jsonl");
    ok(t.predict(&single, &[&sampled[..], &["--batch-size", "1"]].concat()));
    assert_eq!(fs::read(&single).unwrap(), whole, "--batch-size 1");
    let other_seed = t.path("c.jsonl");
    ok(t.predict(
        &other_seed,
        &[
            "--decoding",
            "affectgpt",
            "--seed",
            "4",
            "--max-new-tokens",
            "6",
        ],
    ));
    assert_ne!(
        fs::read(&other_seed).unwrap(),
        whole,
        "another seed, other samples"
    );
}

#[test]
fn bad_inputs_are_named_and_write_nothing() {
    let t = trained();
    // A file this command did not write is never touched.
    let foreign = t.path("foreign.jsonl");
    fs::write(&foreign, "{\"mine\": true}\n").unwrap();
    let err = failure(t.predict(&foreign, &[]));
    assert!(err.contains("not written by `omniopsd predict`"), "{err}");
    assert_eq!(fs::read_to_string(&foreign).unwrap(), "{\"mine\": true}\n");

    // A held-out sample's audio missing: an error naming the manifest line and the file,
    // and no predictions file; with --on-bad-sample skip, a reported skip.
    let text = fs::read_to_string(&t.manifest).unwrap();
    let (index, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains(r#""split":"heldout""#))
        .unwrap();
    let record: Value = serde_json::from_str(line).unwrap();
    let audio = t
        .manifest
        .parent()
        .unwrap()
        .join(record["audio"].as_str().unwrap());
    fs::remove_file(&audio).unwrap();
    let out = t.path("missing.jsonl");
    let err = failure(t.predict(&out, &[]));
    let name = audio.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains(&format!(":{}", index + 1)) && err.contains(name),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    let skipped = ok(t.predict(&out, &["--on-bad-sample", "skip"]));
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(
        stderr.contains("skipped") && stderr.contains(name),
        "{stderr}"
    );
    let heldout = text
        .lines()
        .filter(|l| l.contains(r#""split":"heldout""#))
        .count();
    let summary = format!("{} sample(s) predicted", heldout - 1);
    assert!(stderr.contains(&summary), "{summary}: {stderr}");
    let written = fs::read_to_string(&out).unwrap();
    assert!(!written.contains(record["id"].as_str().unwrap()));

    // A model directory that does not exist.
    let err = failure(omniopsd(&[
        "predict",
        "--model",
        t.path("nowhere").to_str().unwrap(),
        "--manifest",
        t.manifest.to_str().unwrap(),
        "--out",
        t.path("x.jsonl").to_str().unwrap(),
    ]));
    assert!(err.contains("nowhere"), "{err}");
    assert!(!t.path("x.jsonl").exists());
}
