//! The whole evaluation: per-dataset scores, their mean, and how answers were extracted.
//!
//! The mean is the unweighted mean of the datasets that are present *and* defined. It is the
//! MER-UniBench score only when all nine are (`complete`); otherwise the report says which
//! datasets are missing or undefined and that the mean covers only the rest. A dataset whose
//! metric is undefined is reported with a `null` score and its reason, never as NaN or 0.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::dataset::{Dataset, Metric};
use crate::extract::ExtractionSummary;
use crate::metrics::{score_dataset, DatasetScore, Kept};
use crate::predictions::Sample;
use crate::wheel::EmotionWheels;

/// Scores and summary of one evaluation run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Present datasets, in the benchmark's table order.
    pub scores: Vec<DatasetScore>,
    /// Mean score of `mean_over`, `None` when no dataset is defined.
    pub mean: Option<f64>,
    pub mean_over: Vec<Dataset>,
    /// Datasets with no sample in the input.
    pub missing: Vec<Dataset>,
    /// Present datasets whose metric is undefined.
    pub undefined: Vec<Dataset>,
    pub extraction: ExtractionSummary,
}

impl Report {
    /// Scores `samples` (answers already extracted) dataset by dataset.
    pub fn evaluate(
        wheels: &EmotionWheels,
        samples: &[Sample],
        extraction: ExtractionSummary,
    ) -> Report {
        let mut scores = Vec::new();
        let mut missing = Vec::new();
        for dataset in Dataset::ALL {
            let of_dataset: Vec<&Sample> =
                samples.iter().filter(|s| s.dataset == dataset).collect();
            if of_dataset.is_empty() {
                missing.push(dataset);
            } else {
                scores.push(score_dataset(wheels, dataset, &of_dataset));
            }
        }
        Report::from_scores(scores, missing, extraction)
    }

    /// Assembles a report (mean and flags) from per-dataset scores.
    pub fn from_scores(
        scores: Vec<DatasetScore>,
        missing: Vec<Dataset>,
        extraction: ExtractionSummary,
    ) -> Report {
        let defined: Vec<(Dataset, f64)> = scores
            .iter()
            .filter_map(|s| s.score.map(|v| (s.dataset, v)))
            .collect();
        let undefined = scores
            .iter()
            .filter(|s| s.score.is_none())
            .map(|s| s.dataset)
            .collect();
        let mean = if defined.is_empty() {
            None
        } else {
            Some(defined.iter().map(|(_, v)| v).sum::<f64>() / defined.len() as f64)
        };
        Report {
            scores,
            mean,
            mean_over: defined.into_iter().map(|(d, _)| d).collect(),
            missing,
            undefined,
            extraction,
        }
    }

    /// Whether the mean is the MER-UniBench score: all nine datasets present and defined.
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.undefined.is_empty()
    }

    /// Why the mean is not the benchmark score, `None` when it is.
    pub fn note(&self) -> Option<String> {
        if self.complete() {
            return None;
        }
        let names = |v: &[Dataset]| v.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ");
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing: {}", names(&self.missing)));
        }
        if !self.undefined.is_empty() {
            parts.push(format!("undefined: {}", names(&self.undefined)));
        }
        Some(match self.mean {
            Some(_) => format!(
                "mean over {} of 9 datasets ({}); not a MER-UniBench score",
                self.mean_over.len(),
                parts.join("; ")
            ),
            None => format!("no dataset has a defined score ({})", parts.join("; ")),
        })
    }

    /// The JSON report: the fixture's schema (`datasets` -> `metric`, `score`, plus
    /// `precision`/`recall` for F_s and `accuracy` for WAF; `mean`), extended with sample counts,
    /// the reason for an undefined score, the mean's coverage and the extraction used. Keys are
    /// sorted and indented by one space, as `json.dumps(indent=1, sort_keys=True)` writes.
    pub fn to_json(&self) -> String {
        let datasets = self
            .scores
            .iter()
            .map(|s| (s.dataset.name(), DatasetJson::from(s)))
            .collect();
        let json = ReportJson {
            complete: self.complete(),
            datasets,
            extract: ExtractJson::from(&self.extraction),
            mean: self.mean,
            mean_over: self.mean_over.iter().map(|d| d.name()).collect(),
            note: self.note(),
        };
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b" ");
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        // Only strings, finite numbers and maps: serialising cannot fail.
        let _ = json.serialize(&mut serializer);
        let mut text = String::from_utf8(out).unwrap_or_default();
        text.push('\n');
        text
    }

    /// A readable table: one row per dataset (all nine; absent ones marked), then the mean.
    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "MER-UniBench (scores in percent; extraction: {})",
            extraction_line(&self.extraction)
        );
        let _ = writeln!(
            t,
            "{:<12} {:<6} {:>9}  {:<26} {:>5}  kept",
            "dataset", "metric", "score", "detail", "n"
        );
        let mut reasons = Vec::new();
        for dataset in Dataset::ALL {
            let Some(s) = self.scores.iter().find(|s| s.dataset == dataset) else {
                let _ = writeln!(
                    t,
                    "{:<12} {:<6} {:>9}  {:<26} {:>5}  -",
                    dataset.name(),
                    dataset.metric().name(),
                    "absent",
                    "",
                    0
                );
                continue;
            };
            let score = match s.score {
                Some(v) => format!("{v:.2}"),
                None => "undefined".to_string(),
            };
            let detail = match (s.metric(), s.precision, s.recall, s.accuracy) {
                (Metric::Fs, Some(p), Some(r), _) => format!("P {p:.2}  R {r:.2}"),
                (Metric::Waf, _, _, Some(a)) => format!("accuracy {a:.2}"),
                _ => String::new(),
            };
            let kept = match &s.kept {
                Kept::Total(k) => k.to_string(),
                Kept::PerWheel(v) => format!(
                    "{} (wheels 1-5)",
                    v.iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                ),
            };
            let _ = writeln!(
                t,
                "{:<12} {:<6} {:>9}  {:<26} {:>5}  {}",
                dataset.name(),
                s.metric().name(),
                score,
                detail,
                s.n,
                kept
            );
            if let Some(reason) = &s.undefined_reason {
                reasons.push(format!("{}: undefined, {reason}", dataset.name()));
            }
        }
        let mean = match self.mean {
            Some(v) => format!("{v:.2}"),
            None => "undefined".to_string(),
        };
        let _ = writeln!(t, "{:<12} {:<6} {:>9}", "mean", "", mean);
        match self.note() {
            None => {
                let _ = writeln!(t, "mean over all 9 datasets: the MER-UniBench score");
            }
            Some(note) => {
                let _ = writeln!(t, "note: {note}");
            }
        }
        for reason in reasons {
            let _ = writeln!(t, "note: {reason}");
        }
        t
    }
}

fn extraction_line(summary: &ExtractionSummary) -> String {
    match summary {
        ExtractionSummary::None => "none".into(),
        ExtractionSummary::Structured {
            extracted,
            passed_through,
        } => format!("structured, {extracted} answers extracted, {passed_through} used as written"),
        ExtractionSummary::Llm {
            model,
            url,
            prompts,
            cache_hits,
            calls,
            ..
        } => format!(
            "llm {model} at {url}, {prompts} prompts: {cache_hits} from cache, {calls} calls"
        ),
    }
}

/// Per-dataset JSON object; fields in alphabetical order so the output keys are sorted.
#[derive(Serialize)]
struct DatasetJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kept: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kept_per_wheel: Option<Vec<usize>>,
    metric: &'static str,
    n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    precision: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recall: Option<Option<f64>>,
    score: Option<f64>,
}

impl From<&DatasetScore> for DatasetJson {
    fn from(s: &DatasetScore) -> Self {
        let metric = s.metric();
        let (kept, kept_per_wheel) = match &s.kept {
            Kept::Total(k) => (Some(*k), None),
            Kept::PerWheel(v) => (None, Some(v.clone())),
        };
        DatasetJson {
            accuracy: (metric == Metric::Waf).then_some(s.accuracy),
            kept,
            kept_per_wheel,
            metric: metric.name(),
            n: s.n,
            precision: (metric == Metric::Fs).then_some(s.precision),
            reason: s.undefined_reason.clone(),
            recall: (metric == Metric::Fs).then_some(s.recall),
            score: s.score,
        }
    }
}

#[derive(Serialize)]
struct ExtractJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_hits: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    calls: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extracted: Option<usize>,
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    passed_through: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompts: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
}

impl From<&ExtractionSummary> for ExtractJson {
    fn from(summary: &ExtractionSummary) -> Self {
        let mut json = ExtractJson {
            cache: None,
            cache_hits: None,
            calls: None,
            extracted: None,
            mode: summary.mode().name(),
            model: None,
            passed_through: None,
            prompts: None,
            url: None,
        };
        match summary {
            ExtractionSummary::None => {}
            ExtractionSummary::Structured {
                extracted,
                passed_through,
            } => {
                json.extracted = Some(*extracted);
                json.passed_through = Some(*passed_through);
            }
            ExtractionSummary::Llm {
                url,
                model,
                prompts,
                cache_hits,
                calls,
                cache,
            } => {
                json.url = Some(url.clone());
                json.model = Some(model.clone());
                json.prompts = Some(*prompts);
                json.cache_hits = Some(*cache_hits);
                json.calls = Some(*calls);
                json.cache = Some(cache.display().to_string());
            }
        }
        json
    }
}

#[derive(Serialize)]
struct ReportJson<'a> {
    complete: bool,
    datasets: BTreeMap<&'a str, DatasetJson>,
    extract: ExtractJson,
    mean: Option<f64>,
    mean_over: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(dataset: Dataset, value: Option<f64>) -> DatasetScore {
        DatasetScore {
            dataset,
            n: 3,
            kept: Kept::Total(if value.is_some() { 3 } else { 0 }),
            score: value,
            precision: None,
            recall: None,
            accuracy: value,
            undefined_reason: value
                .is_none()
                .then(|| "every sample was skipped".to_string()),
        }
    }

    #[test]
    fn an_undefined_dataset_is_left_out_of_the_mean_and_flagged() {
        let report = Report::from_scores(
            vec![
                score(Dataset::CmuMosi, Some(40.0)),
                score(Dataset::CmuMosei, None),
                score(Dataset::ChSims, Some(60.0)),
            ],
            vec![],
            ExtractionSummary::None,
        );
        assert_eq!(report.mean, Some(50.0));
        assert_eq!(report.undefined, vec![Dataset::CmuMosei]);
        assert!(!report.complete());
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(
            json["datasets"]["CMU-MOSEI"]["score"],
            serde_json::Value::Null
        );
        assert_eq!(
            json["datasets"]["CMU-MOSEI"]["accuracy"],
            serde_json::Value::Null
        );
        assert!(json["datasets"]["CMU-MOSEI"]["reason"]
            .as_str()
            .unwrap()
            .contains("skipped"));
        assert_eq!(json["complete"], false);
        assert!(json["note"]
            .as_str()
            .unwrap()
            .contains("undefined: CMU-MOSEI"));
        assert_eq!(
            json["mean_over"],
            serde_json::json!(["CMU-MOSI", "CH-SIMS"])
        );
        let table = report.to_table();
        assert!(table.contains("undefined"), "{table}");
        assert!(table.contains("absent"), "{table}");
    }

    #[test]
    fn the_mean_is_null_when_no_dataset_is_defined() {
        let report = Report::from_scores(
            vec![score(Dataset::CmuMosi, None)],
            vec![],
            ExtractionSummary::None,
        );
        assert_eq!(report.mean, None);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["mean"], serde_json::Value::Null);
        let table = report.to_table();
        let mean_line = table.lines().find(|l| l.starts_with("mean ")).unwrap();
        assert!(mean_line.ends_with("undefined"), "{table}");
    }
}
