//! Fuzzes the MER-UniBench predictions reader, the label-list parser and the answer
//! extractor, and scores whatever parses: none of them may panic, and a defined score is
//! always finite.

#![no_main]

use libfuzzer_sys::fuzz_target;
use omniopsd_mer::extract::extract_structured;
use omniopsd_mer::labels::{normalized_list, py_strip, string_to_list};
use omniopsd_mer::metrics::sentiment_word_from_answer;
use omniopsd_mer::{parse_predictions, EmotionWheels, ExtractionSummary, Report};

fuzz_target!(|data: &[u8]| {
    if let Ok(samples) = parse_predictions(data, "fuzz.jsonl") {
        // Tiny wheel tables, so label mapping runs too.
        let wheels = EmotionWheels::from_tables(
            &[("happy".into(), "[happy, joy]".into())],
            &[vec![(Some("happy".into()), Some("glad, cheerful".into()))]],
            &[omniopsd_mer::wheel::WheelTree::from_rows([[
                Some("happy"),
                Some("happy"),
                Some("joy"),
            ]])],
        );
        let report = Report::evaluate(&wheels, &samples, ExtractionSummary::None);
        for score in &report.scores {
            for value in [score.score, score.precision, score.recall, score.accuracy]
                .into_iter()
                .flatten()
            {
                assert!(
                    value.is_finite() && (0.0..=100.0).contains(&value),
                    "{value}"
                );
            }
        }
        let json = report.to_json();
        assert!(
            serde_json::from_str::<serde_json::Value>(&json).is_ok(),
            "{json}"
        );
        let _ = report.to_table();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for item in string_to_list(text) {
            assert!(!item.is_empty());
            assert_eq!(py_strip(&item), item);
        }
        let _ = normalized_list(text);
        if let Some(answer) = extract_structured(text) {
            let _ = sentiment_word_from_answer(&answer);
        }
    }
});
