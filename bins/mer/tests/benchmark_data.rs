//! Scoring on the benchmark's real wheel data (the copy this crate ships, `bins/mer/data`):
//! the benchmark's fixture, an independent Python re-implementation on random cases, and the
//! label quirks the benchmark is known for; and the shipped copy checked byte for byte.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::shared::{fixtures_dir, shared_dir};
use omniopsd_mer::wheel::SHIPPED_FILES;
use omniopsd_mer::{parse_predictions, EmotionWheels, Error, ExtractionSummary, Report};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Tolerance for scores in percent; the issue asks for 1e-9.
const TOL: f64 = 1e-9;

fn wheels() -> &'static EmotionWheels {
    static WHEELS: OnceLock<EmotionWheels> = OnceLock::new();
    WHEELS.get_or_init(|| EmotionWheels::shipped().expect("the shipped wheel data loads"))
}

fn score_file(path: &Path) -> Report {
    let bytes = std::fs::read(path).unwrap();
    let samples = parse_predictions(&bytes, &path.display().to_string()).unwrap();
    Report::evaluate(wheels(), &samples, ExtractionSummary::None)
}

fn score_lines(text: &str) -> Report {
    let samples = parse_predictions(text.as_bytes(), "inline").unwrap();
    Report::evaluate(wheels(), &samples, ExtractionSummary::None)
}

/// Compares every number of `expected` (fixture schema) with the report's JSON.
fn assert_matches_expected(report: &Report, expected: &Value) -> f64 {
    let got: Value = serde_json::from_str(&report.to_json()).unwrap();
    let mut worst: f64 = 0.0;
    let expected_sets = expected["datasets"].as_object().unwrap();
    assert_eq!(
        got["datasets"].as_object().unwrap().len(),
        expected_sets.len()
    );
    for (name, fields) in expected_sets {
        for (field, value) in fields.as_object().unwrap() {
            let got_value = &got["datasets"][name][field];
            if let Some(want) = value.as_f64() {
                let have = got_value
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}.{field} missing: {got_value}"));
                worst = worst.max((have - want).abs());
                assert!(
                    (have - want).abs() <= TOL,
                    "{name}.{field}: {have} vs {want}"
                );
            } else {
                assert_eq!(got_value, value, "{name}.{field}");
            }
        }
    }
    let (have, want) = (
        got["mean"].as_f64().unwrap(),
        expected["mean"].as_f64().unwrap(),
    );
    assert!((have - want).abs() <= TOL, "mean: {have} vs {want}");
    worst.max((have - want).abs())
}

#[test]
fn shared_fixture_reproduces_expected_scores_to_1e9() {
    let dir = fixtures_dir();
    let report = score_file(&dir.join("sample.jsonl"));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sample.expected.json")).unwrap())
            .unwrap();
    let worst = assert_matches_expected(&report, &expected);
    assert!(report.complete());
    eprintln!("fixture: worst absolute difference {worst:e}");
}

#[test]
fn random_cases_match_the_independent_python_scorer_to_1e9() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let report = score_file(&dir.join("random_predictions.jsonl"));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("random_expected.json")).unwrap())
            .unwrap();
    let worst = assert_matches_expected(&report, &expected);
    eprintln!("random cases: worst absolute difference {worst:e}");
}

#[test]
fn neutral_is_dropped_on_every_wheel() {
    for wheel in 0..5 {
        assert_eq!(
            wheels().map_label("neutral", wheel),
            None,
            "wheel {}",
            wheel + 1
        );
    }
    // A basic-emotion set whose ground truths are all neutral keeps nothing: undefined.
    let report = score_lines(
        r#"{"dataset":"MELD","id":"a","gt":"neutral","pred":"[neutral]"}
{"dataset":"MELD","id":"b","gt":"Neutral","pred":"happy"}"#,
    );
    assert_eq!(report.scores[0].score, None);
    assert!(report.scores[0]
        .undefined_reason
        .as_deref()
        .unwrap()
        .contains("wheel 1"));
}

#[test]
fn neutral_predictions_count_as_no_prediction() {
    // gt `sad` maps on every wheel; a `neutral` prediction maps to nothing, so precision and
    // recall are 0 on that sample, exactly like an empty prediction.
    let with_neutral =
        score_lines(r#"{"dataset":"OV-MERD+","id":"a","gt":"sad","pred":"neutral"}"#);
    let empty = score_lines(r#"{"dataset":"OV-MERD+","id":"a","gt":"sad","pred":""}"#);
    assert_eq!(with_neutral.scores[0].score, Some(0.0));
    assert_eq!(with_neutral.scores[0], empty.scores[0]);
}

#[test]
fn fear_maps_to_joyful_on_wheel_3() {
    let per_wheel: Vec<Option<&str>> = (0..5).map(|w| wheels().map_label("fear", w)).collect();
    assert_eq!(per_wheel[2], Some("joyful"));
    // and to `scared` on wheel 1, as one would expect.
    assert_eq!(per_wheel[0], Some("scared"));
    // So on wheel 3 `fear` hits a `happy` ground truth.
    assert_eq!(wheels().map_label("happy", 2), Some("joyful"));
}

#[test]
fn multi_word_and_hyphenated_labels_map_whole() {
    assert_eq!(wheels().map_label("at fault", 0), Some("sad"));
    assert_eq!(wheels().map_label("self-assured", 2), Some("powerful"));
    assert_eq!(wheels().map_label("self-conscious", 2), Some("scared"));
    assert_eq!(wheels().map_label("self-protection", 3), Some("anger"));
    // Their parts are not labels of their own.
    assert_eq!(wheels().map_label("self", 3), None);
    assert_eq!(wheels().map_label("fault", 0), None);
}

#[test]
fn casing_and_whitespace_do_not_change_scores() {
    let plain = score_lines(
        r#"{"dataset":"OV-MERD+","id":"a","gt":"sad,angry","pred":"sad,self-conscious"}"#,
    );
    let messy = score_lines(
        "{\"dataset\":\"OV-MERD+\",\"id\":\"a\",\"gt\":\"  SAD ,\\tAngry\",\"pred\":\"[ Sad ,  SELF-Conscious\\n]\"}",
    );
    assert_eq!(plain.scores[0], messy.scores[0]);
    assert!(plain.scores[0].score.unwrap() > 0.0);
}

#[test]
fn json_list_and_string_predictions_score_the_same() {
    let as_string = score_lines(
        r#"{"dataset":"OV-MERD+","id":"a","gt":"[sad, fear]","pred":"['worried', \"happy\"]"}
{"dataset":"MER2023","id":"b","gt":"happy","pred":"[joyful, sad]"}"#,
    );
    let as_list = score_lines(
        r#"{"dataset":"OV-MERD+","id":"a","gt":["sad","fear"],"pred":["worried","happy"]}
{"dataset":"MER2023","id":"b","gt":"happy","pred":["joyful","sad"]}"#,
    );
    assert_eq!(as_string.scores, as_list.scores);
    assert_eq!(as_string.mean, as_list.mean);
}

#[test]
fn hit_counts_a_hit_when_the_mapped_gt_is_among_the_mapped_predictions() {
    // `joyful` and `happy` share the level-1 word on every wheel.
    let report = score_lines(r#"{"dataset":"MER2024","id":"a","gt":"happy","pred":"[joy]"}"#);
    assert_eq!(report.scores[0].score, Some(100.0));
    let report = score_lines(r#"{"dataset":"MER2024","id":"a","gt":"happy","pred":"[sad]"}"#);
    assert_eq!(report.scores[0].score, Some(0.0));
}

#[test]
fn fewer_than_nine_datasets_give_a_mean_over_the_present_ones_flagged_incomplete() {
    let report = score_lines(
        r#"{"dataset":"MER2024","id":"a","gt":"happy","pred":"[joy]"}
{"dataset":"CMU-MOSI","id":"a","gt":1.5,"pred":"negative"}"#,
    );
    assert_eq!(report.mean, Some(50.0));
    assert!(!report.complete());
    assert_eq!(report.missing.len(), 7);
    let json: Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["complete"], false);
    assert!(json["note"]
        .as_str()
        .unwrap()
        .starts_with("mean over 2 of 9 datasets"));
    assert!(report.to_table().contains("absent"));
}

#[test]
fn a_missing_wheel_file_is_named_in_the_error() {
    let dir = std::env::temp_dir().join(format!("mer-missing-wheel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in [
        "format.csv",
        "synonym.xlsx",
        "wheel1.xlsx",
        "wheel2.xlsx",
        "wheel4.xlsx",
        "wheel5.xlsx",
    ] {
        let (_, bytes) = SHIPPED_FILES.iter().find(|(n, _)| *n == name).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let err = EmotionWheels::load(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        matches!(&err, Error::MissingWheelFile { path } if path.ends_with("wheel3.xlsx")),
        "{err}"
    );
    assert!(err.to_string().contains("wheel3.xlsx"));
}

#[test]
fn unknown_dataset_names_are_rejected_with_the_line_number() {
    let err = parse_predictions(
        b"{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"\"}\n{\"dataset\":\"meld\",\"id\":\"b\",\"gt\":\"joy\",\"pred\":\"\"}\n",
        "p.jsonl",
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("p.jsonl line 2") && message.contains("unknown dataset `meld`"),
        "{message}"
    );
    assert!(message.contains("CH-SIMS-v2"), "{message}");
}

/// SHA-256 of the shipped files as the benchmark's authors publish them (also listed in
/// `bins/mer/data/README.md`): a changed byte fails here even without `../shared`.
const SHIPPED_SHA256: [(&str, &str); 7] = [
    (
        "format.csv",
        "ba6de7d61db8e129d1d7ef8a2aae22a9e93a2c2e3e683e6f2735d04455f016f2",
    ),
    (
        "synonym.xlsx",
        "23f81f9ab1d2418aaf96775304fb5dc52c62bb5d5ef652a97471d045fc9d2e29",
    ),
    (
        "wheel1.xlsx",
        "e70485d354b82a7491ff24648273182a5f4f13f92c76e6b3e4f9033f5e6afcc1",
    ),
    (
        "wheel2.xlsx",
        "acc001e076a8e60440361f58dd8c05ed900c4890c84bb7d8d1df93708a7d9c87",
    ),
    (
        "wheel3.xlsx",
        "d62f30bf88c17c55876634cd088eacaef98278fc25457474364439872f9dbf83",
    ),
    (
        "wheel4.xlsx",
        "660260561b7fe15550f3679a01e7c783608ce3403d4c28db0a88520f68d83aea",
    ),
    (
        "wheel5.xlsx",
        "2dd4595b2cf8e7628ca06a416a8e38ac831614b244f23d1ae613dc34007649f1",
    ),
];

#[test]
fn shipped_files_have_the_published_checksums() {
    for ((name, bytes), (want_name, want)) in SHIPPED_FILES.iter().zip(SHIPPED_SHA256) {
        assert_eq!(*name, want_name);
        let have: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(have, want, "{name}");
    }
}

#[test]
fn shipped_files_are_byte_identical_to_the_benchmark_directory() {
    let dir = shared_dir();
    if !dir.is_dir() {
        eprintln!(
            "skipped: no benchmark directory at {} (set MER_UNIBENCH_DIR)",
            dir.display()
        );
        return;
    }
    for (name, bytes) in SHIPPED_FILES {
        let reference = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
        assert!(
            reference == bytes,
            "shipped {name} differs from {}",
            dir.join(name).display()
        );
    }
}

#[test]
fn a_directory_of_the_same_files_scores_like_the_shipped_copy() {
    let dir = tempfile_dir("mer-wheel-dir");
    for (name, bytes) in SHIPPED_FILES {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let from_dir = EmotionWheels::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let samples = parse_predictions(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/random_predictions.jsonl"),
        )
        .unwrap(),
        "random_predictions.jsonl",
    )
    .unwrap();
    let a = Report::evaluate(&from_dir, &samples, ExtractionSummary::None);
    let b = Report::evaluate(wheels(), &samples, ExtractionSummary::None);
    assert_eq!(a.to_json(), b.to_json());
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
