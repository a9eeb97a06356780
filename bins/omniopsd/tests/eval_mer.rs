//! `omniopsd eval-mer` end to end: the built binary on the benchmark's fixture and on bad
//! input, scoring with the wheel data shipped inside it unless `--wheel-dir` says otherwise.

#[path = "../../mer/tests/common/mock_llm.rs"]
mod mock_llm;
#[path = "../../mer/tests/common/shared.rs"]
mod shared;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mock_llm::{emotion_responder, MockLlm};
use omniopsd_mer::wheel::SHIPPED_FILES;
use serde_json::Value;
use shared::fixtures_dir;

const TOL: f64 = 1e-9;

fn fixture() -> PathBuf {
    fixtures_dir().join("sample.jsonl")
}

fn eval_mer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .arg("eval-mer")
        .args(args)
        .output()
        .expect("the omniopsd binary runs")
}

/// `eval-mer` on the shipped wheel data (no `--wheel-dir`).
fn with_wheels(extra: &[&str]) -> Output {
    eval_mer(extra)
}

/// Writes the shipped wheel files named `names` into `dir`.
fn write_wheel_files(dir: &Path, names: &[&str]) {
    for name in names {
        let (_, bytes) = SHIPPED_FILES.iter().find(|(n, _)| n == name).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn expected() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("sample.expected.json")).unwrap(),
    )
    .unwrap()
}

/// Every number of the fixture's expected scores, to 1e-9.
fn assert_reproduces_fixture(got: &Value) {
    let expected = expected();
    for (name, fields) in expected["datasets"].as_object().unwrap() {
        for (field, want) in fields.as_object().unwrap() {
            let have = &got["datasets"][name][field];
            match want.as_f64() {
                Some(w) => assert!((have.as_f64().unwrap() - w).abs() <= TOL, "{name}.{field}"),
                None => assert_eq!(have, want, "{name}.{field}"),
            }
        }
    }
    assert!((got["mean"].as_f64().unwrap() - expected["mean"].as_f64().unwrap()).abs() <= TOL);
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_predictions(dir: &Path, lines: &str) -> PathBuf {
    let path = dir.join("predictions.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

fn assert_fails_with(o: &Output, needles: &[&str]) {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    let err = stderr(o);
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
}

#[test]
fn json_report_reproduces_the_shared_fixture_to_1e9() {
    let o = with_wheels(&["--predictions", fixture().to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_reproduces_fixture(&got);
    assert_eq!(got["complete"], true);
    assert_eq!(got["extract"]["mode"], "none");
    assert_eq!(got["datasets"]["OV-MERD+"]["n"], 40);
    assert_eq!(
        got["datasets"]["OV-MERD+"]["kept_per_wheel"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn runs_from_any_working_directory_without_wheel_dir() {
    // A fresh directory with nothing in it: the wheels come from inside the binary.
    let cwd = tempfile::tempdir().unwrap();
    let predictions = cwd.path().join("preds.jsonl");
    std::fs::copy(fixture(), &predictions).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .current_dir(cwd.path())
        .args(["eval-mer", "--predictions", "preds.jsonl", "--json"])
        .output()
        .expect("the omniopsd binary runs");
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_reproduces_fixture(&got);
    assert_eq!(got["complete"], true);
    // Nothing was written beside the predictions.
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 1);
}

#[test]
fn wheel_dir_replaces_the_shipped_copy() {
    let dir = tempfile::tempdir().unwrap();
    write_wheel_files(dir.path(), &omniopsd_mer::wheel::WHEEL_FILES);
    let fx = fixture();
    let args = ["--predictions", fx.to_str().unwrap(), "--json"];
    let mut with_dir = vec!["--wheel-dir", dir.path().to_str().unwrap()];
    with_dir.extend_from_slice(&args);
    let o = eval_mer(&with_dir);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_reproduces_fixture(&got);
    let shipped = with_wheels(&args);
    assert_eq!(stdout(&o), stdout(&shipped));

    // The directory is what gets read: a broken wheel there is an error naming it.
    std::fs::write(dir.path().join("wheel4.xlsx"), b"not a spreadsheet").unwrap();
    let o = eval_mer(&with_dir);
    assert_fails_with(&o, &["wheel4.xlsx"]);
}

#[test]
fn table_has_nine_rows_the_mean_and_kept_counts() {
    let o = with_wheels(&["--predictions", fixture().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    for name in [
        "OV-MERD+",
        "MER2023",
        "MER2024",
        "IEMOCAP",
        "MELD",
        "CMU-MOSI",
        "CMU-MOSEI",
        "CH-SIMS ",
        "CH-SIMS-v2",
    ] {
        assert!(
            table.lines().any(|l| l.starts_with(name)),
            "no row {name}: {table}"
        );
    }
    let mean = table.lines().find(|l| l.starts_with("mean ")).unwrap();
    assert!(mean.trim_end().ends_with("38.70"), "{table}");
    assert!(table.contains("extraction: none"), "{table}");
    assert!(table.contains("the MER-UniBench score"), "{table}");
    assert!(table.contains("(wheels 1-5)"), "{table}");
}

#[test]
fn unknown_dataset_fails_naming_the_line_and_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_predictions(
        dir.path(),
        "{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"\"}\n{\"dataset\":\"SIMS\",\"id\":\"a\",\"gt\":1,\"pred\":\"\"}\n",
    );
    let o = with_wheels(&["--predictions", p.to_str().unwrap()]);
    assert_fails_with(&o, &["line 2", "unknown dataset `SIMS`"]);
}

#[test]
fn bad_json_line_fails_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_predictions(
        dir.path(),
        "{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"\"}\n\n{\"dataset\":\"MELD\",\"id\":\"b\",\n",
    );
    let o = with_wheels(&["--predictions", p.to_str().unwrap()]);
    assert_fails_with(&o, &["predictions.jsonl line 3", "invalid JSON"]);
}

#[test]
fn duplicate_id_within_a_dataset_fails_naming_both_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_predictions(
        dir.path(),
        "{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"\"}\n{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"joy\"}\n",
    );
    let o = with_wheels(&["--predictions", p.to_str().unwrap()]);
    assert_fails_with(
        &o,
        &[
            "line 2",
            "duplicate id `a` in dataset MELD",
            "first seen on line 1",
        ],
    );
}

#[test]
fn missing_wheel_file_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_wheel_files(
        dir.path(),
        &[
            "format.csv",
            "synonym.xlsx",
            "wheel1.xlsx",
            "wheel2.xlsx",
            "wheel3.xlsx",
            "wheel4.xlsx",
        ],
    );
    let o = eval_mer(&[
        "--wheel-dir",
        dir.path().to_str().unwrap(),
        "--predictions",
        fixture().to_str().unwrap(),
    ]);
    assert_fails_with(&o, &["missing wheel file", "wheel5.xlsx"]);
}

#[test]
fn missing_predictions_file_fails_naming_it() {
    let o = with_wheels(&["--predictions", "/nonexistent/preds.jsonl"]);
    assert_fails_with(&o, &["reading predictions /nonexistent/preds.jsonl"]);
}

#[test]
fn undefined_metric_is_null_with_a_reason_and_undefined_in_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_predictions(
        dir.path(),
        "{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"neutral\",\"pred\":\"joy\"}\n\
         {\"dataset\":\"CMU-MOSI\",\"id\":\"a\",\"gt\":1.0,\"pred\":\"positive\"}\n",
    );
    let o = with_wheels(&["--predictions", p.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(got["datasets"]["MELD"]["score"], Value::Null);
    assert!(got["datasets"]["MELD"]["reason"]
        .as_str()
        .unwrap()
        .contains("skipped"));
    assert_eq!(got["mean"], 100.0);
    assert_eq!(got["mean_over"], serde_json::json!(["CMU-MOSI"]));
    assert_eq!(got["complete"], false);
    assert!(got["note"].as_str().unwrap().contains("undefined: MELD"));

    let o = with_wheels(&["--predictions", p.to_str().unwrap()]);
    let table = stdout(&o);
    let meld = table.lines().find(|l| l.starts_with("MELD")).unwrap();
    assert!(meld.contains("undefined"), "{table}");
    assert!(table.contains("not a MER-UniBench score"), "{table}");
}

#[test]
fn out_is_written_atomically_and_never_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.json");
    let fx = fixture();
    let args = [
        "--predictions",
        fx.to_str().unwrap(),
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = with_wheels(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
    let first: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(first["mean"].as_f64().is_some());

    std::fs::write(&out, "keep me").unwrap();
    let o = with_wheels(&args);
    assert_fails_with(&o, &["already exists", "--force"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep me");

    let mut forced = args.to_vec();
    forced.push("--force");
    let o = with_wheels(&forced);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&out)
            .unwrap()
            .trim_start()
            .chars()
            .next(),
        Some('{')
    );
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn structured_extraction_reads_answer_blocks_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_predictions(
        dir.path(),
        "{\"dataset\":\"MER2023\",\"id\":\"a\",\"gt\":\"happy\",\"pred\":\"He grins, sad? no. <answer>[joyful]</answer>\"}\n\
         {\"dataset\":\"CH-SIMS\",\"id\":\"a\",\"gt\":1.0,\"pred\":\"Upbeat voice. <answer>[Positive]</answer>\"}\n\
         {\"dataset\":\"CH-SIMS\",\"id\":\"b\",\"gt\":-1.0,\"pred\":\"negative\"}\n",
    );
    let o = with_wheels(&[
        "--predictions",
        p.to_str().unwrap(),
        "--json",
        "--extract",
        "structured",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(got["extract"]["mode"], "structured");
    assert_eq!(got["extract"]["extracted"], 2);
    assert_eq!(got["extract"]["passed_through"], 1);
    assert_eq!(got["datasets"]["MER2023"]["score"], 100.0);
    assert_eq!(got["datasets"]["CH-SIMS"]["score"], 100.0);

    // Without extraction the prose is scored as written and misses.
    let o = with_wheels(&["--predictions", p.to_str().unwrap(), "--json"]);
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        got["datasets"]["CH-SIMS"]["score"].as_f64().unwrap() < 100.0,
        true
    );
}

#[test]
fn llm_extraction_calls_the_endpoint_once_and_reruns_from_cache() {
    let mock = MockLlm::start(emotion_responder);
    let dir = tempfile::tempdir().unwrap();
    let p = write_predictions(
        dir.path(),
        "{\"dataset\":\"MER2024\",\"id\":\"a\",\"gt\":\"happy\",\"pred\":\"She keeps smiling.\"}\n\
         {\"dataset\":\"MER2024\",\"id\":\"b\",\"gt\":\"sad\",\"pred\":\"There are tears.\"}\n\
         {\"dataset\":\"CMU-MOSEI\",\"id\":\"a\",\"gt\":2.0,\"pred\":\"A big smile.\"}\n",
    );
    let args = [
        "--predictions",
        p.to_str().unwrap(),
        "--json",
        "--extract",
        "llm",
        "--llm-url",
        mock.url.as_str(),
        "--llm-model",
        "qwen",
        "--llm-api-key",
        "k",
    ];
    let o = with_wheels(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // 3 open-set prompts + 1 sentiment prompt.
    assert_eq!(mock.requests(), 4);
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(got["extract"]["mode"], "llm");
    assert_eq!(got["extract"]["model"], "qwen");
    assert_eq!(got["extract"]["calls"], 4);
    assert_eq!(got["datasets"]["MER2024"]["score"], 100.0);
    assert_eq!(got["datasets"]["CMU-MOSEI"]["score"], 100.0);
    assert!(dir
        .path()
        .join("predictions.jsonl.llm-cache.jsonl")
        .is_file());

    let o = with_wheels(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mock.requests(), 4, "the rerun must not call the endpoint");
    let again: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(again["extract"]["calls"], 0);
    assert_eq!(again["extract"]["cache_hits"], 4);
    assert_eq!(again["datasets"], got["datasets"]);
}

#[test]
fn llm_extraction_without_a_url_is_an_error() {
    let o = with_wheels(&[
        "--predictions",
        fixture().to_str().unwrap(),
        "--extract",
        "llm",
    ]);
    assert_fails_with(&o, &["--extract llm needs --llm-url"]);
}

#[test]
fn llm_api_key_env_sends_the_key_from_the_named_variable() {
    let mock = MockLlm::start(emotion_responder);
    let dir = tempfile::tempdir().unwrap();
    let p = write_predictions(
        dir.path(),
        "{\"dataset\":\"MER2024\",\"id\":\"a\",\"gt\":\"happy\",\"pred\":\"She keeps smiling.\"}\n",
    );
    let args = [
        "eval-mer",
        "--predictions",
        p.to_str().unwrap(),
        "--json",
        "--extract",
        "llm",
        "--llm-url",
        mock.url.as_str(),
        "--llm-model",
        "qwen",
        "--llm-api-key-env",
        "OMNIOPSD_TEST_MER_KEY",
    ];
    let o = Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .args(args)
        .env("OMNIOPSD_TEST_MER_KEY", "sk-mer-secret")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mock.authorizations(), ["Bearer sk-mer-secret"]);
    assert!(!stdout(&o).contains("sk-mer-secret") && !stderr(&o).contains("sk-mer-secret"));

    let o = Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .args(args)
        .env_remove("OMNIOPSD_TEST_MER_KEY")
        .output()
        .unwrap();
    assert_fails_with(&o, &["OMNIOPSD_TEST_MER_KEY is not set"]);
}
