//! Prompts, answers and held-out scoring.
//!
//! The model answers in one short structured line,
//! `emotion: angry; sentiment: negative; open: angry, annoyed, sarcastic`,
//! which is parsed back into the three MER-UniBench predictions: the basic label (scored by
//! HIT as a MER2023 sample), the sentiment word (WAF, as a CMU-MOSI sample) and the open set
//! (F_s, as an OV-MERD+ sample). Scoring goes through `omniopsd-mer`, the benchmark's exact
//! metric implementation with its emotion wheels.

use std::path::PathBuf;

use anyhow::{Context, Result};
use omniopsd_mer::{Dataset, EmotionWheels, Gt, Pred, Sample};

use super::report::Scores;
use crate::data::manifest::Record;

/// Which privileged block the teacher sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privileged {
    /// The rationale (the method).
    Rationale,
    /// Only the gold answer (ablation).
    Label,
    /// Nothing: the teacher's context equals the student's (ablation).
    None,
}

/// The sentiment word of a score.
pub fn sentiment_word(score: f64) -> &'static str {
    if score > 0.0 {
        "positive"
    } else if score < 0.0 {
        "negative"
    } else {
        "neutral"
    }
}

/// The gold answer line of a record.
pub fn answer(record: &Record) -> String {
    format!(
        "emotion: {}; sentiment: {}; open: {}",
        record.emotion,
        sentiment_word(record.sentiment),
        record.openset.join(", ")
    )
}

/// The text part of the student's prompt (media come before it as placeholders/features).
pub fn student_text(record: &Record) -> String {
    format!(
        "subtitle: {}\nhow does the speaker feel?\n",
        record.subtitle
    )
}

/// The privileged block inserted before the answer header for the teacher.
pub fn privileged_text(record: &Record, kind: Privileged) -> String {
    match kind {
        Privileged::Rationale => format!(
            "rationale: {}\n",
            record.rationale.as_deref().unwrap_or_default()
        ),
        Privileged::Label => format!("reference: {}\n", answer(record)),
        Privileged::None => String::new(),
    }
}

/// A parsed answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// The basic-emotion word (empty if absent).
    pub emotion: String,
    /// The sentiment word (empty if absent).
    pub sentiment: String,
    /// The open-vocabulary labels.
    pub openset: Vec<String>,
}

/// Parses `emotion: ...; sentiment: ...; open: ...`, tolerating missing or reordered parts
/// and stray whitespace (a partly trained model writes partial answers; they score as such).
pub fn parse_answer(text: &str) -> Parsed {
    let mut p = Parsed::default();
    for part in text.split([';', '\n']) {
        let Some((key, value)) = part.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "emotion" if p.emotion.is_empty() => p.emotion = value.to_string(),
            "sentiment" if p.sentiment.is_empty() => p.sentiment = value.to_string(),
            "open" if p.openset.is_empty() => {
                p.openset = value
                    .split(',')
                    .map(|w| w.trim().to_string())
                    .filter(|w| !w.is_empty())
                    .collect()
            }
            _ => {}
        }
    }
    p
}

/// Loads the MER-UniBench emotion wheels: from `dir` (`eval.mer_data`) when set, else the
/// copy shipped inside the binary.
pub fn load_wheels(dir: &Option<PathBuf>) -> Result<EmotionWheels> {
    EmotionWheels::load_or_shipped(dir.as_deref()).with_context(|| match dir {
        Some(dir) => format!(
            "loading the MER-UniBench scoring data from {} (`eval.mer_data`)",
            dir.display()
        ),
        None => "loading the shipped MER-UniBench scoring data".to_string(),
    })
}

/// HIT, WAF and F_s (percent) of `answers` for `records`, and HIT on the records whose
/// subtitle misleads.
pub fn score(wheels: &EmotionWheels, records: &[&Record], answers: &[String]) -> Scores {
    let (misleading, answers_misleading): (Vec<&Record>, Vec<String>) = records
        .iter()
        .zip(answers)
        .filter(|(r, _)| r.conflict.is_some())
        .map(|(r, a)| (*r, a.clone()))
        .unzip();
    let mut scores = score_all(wheels, records, answers);
    if !misleading.is_empty() {
        scores.hit_misleading = Some(score_all(wheels, &misleading, &answers_misleading).hit);
    }
    scores
}

fn score_all(wheels: &EmotionWheels, records: &[&Record], answers: &[String]) -> Scores {
    let mut samples = Vec::with_capacity(records.len() * 3);
    for (i, (r, a)) in records.iter().zip(answers).enumerate() {
        let p = parse_answer(a);
        let line = i + 1;
        samples.push(Sample {
            dataset: Dataset::Mer2023,
            id: r.id.clone(),
            gt: Gt::Labels(vec![r.emotion.clone()]),
            pred: Pred::List(if p.emotion.is_empty() {
                Vec::new()
            } else {
                vec![p.emotion.clone()]
            }),
            line,
        });
        samples.push(Sample {
            dataset: Dataset::CmuMosi,
            id: r.id.clone(),
            gt: Gt::Score(r.sentiment),
            pred: Pred::Text(p.sentiment.clone()),
            line,
        });
        samples.push(Sample {
            dataset: Dataset::OvMerdPlus,
            id: r.id.clone(),
            gt: Gt::Labels(r.openset.clone()),
            pred: Pred::List(p.openset.clone()),
            line,
        });
    }
    let report =
        omniopsd_mer::Report::evaluate(wheels, &samples, omniopsd_mer::ExtractionSummary::None);
    let get = |d: Dataset| {
        report
            .scores
            .iter()
            .find(|s| s.dataset == d)
            .and_then(|s| s.score)
            .unwrap_or(0.0)
    };
    Scores {
        hit: get(Dataset::Mer2023),
        waf: get(Dataset::CmuMosi),
        fs: get(Dataset::OvMerdPlus),
        hit_misleading: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::manifest::Split;

    fn record(emotion: &str, sentiment: f64, openset: &[&str]) -> Record {
        Record {
            id: format!("{emotion}{sentiment}"),
            split: Split::Heldout,
            audio: String::new(),
            video: String::new(),
            subtitle: "x".into(),
            rationale: Some("r".into()),
            emotion: emotion.into(),
            sentiment,
            openset: openset.iter().map(|s| s.to_string()).collect(),
            conflict: None,
        }
    }

    fn wheels() -> EmotionWheels {
        load_wheels(&None).unwrap()
    }

    #[test]
    fn parse_answer_reads_the_gold_format_back() {
        let r = record("angry", -2.0, &["angry", "annoyed", "sarcastic"]);
        let p = parse_answer(&answer(&r));
        assert_eq!(p.emotion, "angry");
        assert_eq!(p.sentiment, "negative");
        assert_eq!(p.openset, vec!["angry", "annoyed", "sarcastic"]);
    }

    #[test]
    fn parse_answer_tolerates_partial_answers() {
        let p = parse_answer("sentiment:  positive ; emotion: happy");
        assert_eq!(
            (p.emotion.as_str(), p.sentiment.as_str()),
            ("happy", "positive")
        );
        assert!(p.openset.is_empty());
        assert_eq!(parse_answer("garbage"), Parsed::default());
    }

    #[test]
    fn gold_answers_score_100_and_wrong_answers_less() {
        let w = wheels();
        let rs = [
            record("angry", -2.0, &["angry", "annoyed"]),
            record("happy", 1.5, &["happy", "joyful"]),
            record("sad", -1.0, &["sad", "lonely"]),
        ];
        let refs: Vec<&Record> = rs.iter().collect();
        let gold: Vec<String> = rs.iter().map(answer).collect();
        let s = score(&w, &refs, &gold);
        assert!(
            (s.hit - 100.0).abs() < 1e-9 && (s.waf - 100.0).abs() < 1e-9,
            "{s:?}"
        );
        assert!((s.fs - 100.0).abs() < 1e-9, "{s:?}");
        let wrong: Vec<String> = rs
            .iter()
            .map(|_| "emotion: happy; sentiment: positive; open: happy".into())
            .collect();
        let s = score(&w, &refs, &wrong);
        assert!(s.hit < 50.0 && s.waf < 60.0 && s.fs < 60.0, "{s:?}");
        assert_eq!(s.hit_misleading, None, "no misleading subtitle among these");
    }

    #[test]
    fn misleading_subtitle_samples_get_their_own_hit() {
        let w = wheels();
        let mut sarcastic = record("angry", -2.0, &["angry"]);
        sarcastic.conflict = Some("sarcasm".into());
        let plain = record("happy", 1.5, &["happy"]);
        let refs = [&sarcastic, &plain];
        let answers = [
            "emotion: happy; sentiment: positive; open: happy".to_string(),
            answer(&plain),
        ];
        let s = score(&w, &refs, &answers);
        assert_eq!(
            s.hit_misleading,
            Some(0.0),
            "the text-led answer misses the sarcasm"
        );
        assert!((s.hit - 50.0).abs() < 1e-9, "{s:?}");
    }
}
