//! WAF against scikit-learn (`tests/reference/waf_sklearn.py` -> `waf_cases.json`).

use omniopsd_mer::{parse_predictions, EmotionWheels, ExtractionSummary, Report};
use serde_json::Value;

const TOL: f64 = 1e-12;

#[test]
fn waf_and_accuracy_match_scikit_learn_weighted_f1() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/waf_cases.json"
    );
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // WAF needs no wheel data; an empty table set keeps the test independent of it.
    let wheels = EmotionWheels::from_tables(&[], &[], &[]);
    let mut checked = 0;
    for (k, case) in cases["cases"].as_array().unwrap().iter().enumerate() {
        let mut text = String::new();
        let preds = case["pred"].as_array().unwrap();
        for (i, (gt, pred)) in case["gt"].as_array().unwrap().iter().zip(preds).enumerate() {
            let line = serde_json::json!({"dataset": "CH-SIMS", "id": i, "gt": gt, "pred": pred});
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let samples = parse_predictions(text.as_bytes(), "case").unwrap();
        let report = Report::evaluate(&wheels, &samples, ExtractionSummary::None);
        let score = &report.scores[0];
        let (waf, acc) = (
            case["waf"].as_f64().unwrap(),
            case["accuracy"].as_f64().unwrap(),
        );
        let got_waf = score.score.unwrap() / 100.0;
        let got_acc = score.accuracy.unwrap() / 100.0;
        assert!(
            (got_waf - waf).abs() <= TOL,
            "case {k}: WAF {got_waf} vs sklearn {waf}"
        );
        assert!(
            (got_acc - acc).abs() <= TOL,
            "case {k}: accuracy {got_acc} vs sklearn {acc}"
        );
        checked += 1;
    }
    assert!(checked >= 40);
}

#[test]
fn waf_is_undefined_when_every_sentiment_score_is_zero() {
    let wheels = EmotionWheels::from_tables(&[], &[], &[]);
    let text = "{\"dataset\":\"CMU-MOSEI\",\"id\":\"a\",\"gt\":0.0,\"pred\":\"positive\"}\n\
                {\"dataset\":\"CMU-MOSEI\",\"id\":\"b\",\"gt\":-0.0,\"pred\":\"negative\"}\n";
    let samples = parse_predictions(text.as_bytes(), "case").unwrap();
    let report = Report::evaluate(&wheels, &samples, ExtractionSummary::None);
    assert_eq!(report.scores[0].score, None);
    assert_eq!(report.scores[0].accuracy, None);
    assert_eq!(report.mean, None);
    let json: Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["datasets"]["CMU-MOSEI"]["score"], Value::Null);
    assert!(json["datasets"]["CMU-MOSEI"]["reason"]
        .as_str()
        .unwrap()
        .contains("all sentiment scores are 0"));
}
