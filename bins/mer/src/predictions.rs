//! The predictions file: one JSON object a line with `dataset`, `id`, `gt`, `pred`.

use std::collections::HashMap;

use serde_json::Value;

use crate::dataset::{Dataset, Metric};
use crate::error::{Error, Result};
use crate::labels::string_to_list;

/// The ground truth of one sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Gt {
    /// Emotion labels, as written (a label-list string or a JSON list), not yet normalised.
    Labels(Vec<String>),
    /// A sentiment score (sentiment datasets).
    Score(f64),
}

/// A model's answer for one sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Pred {
    /// A string: a label-list string, a sentiment word, or free-form prose to extract from.
    Text(String),
    /// A JSON list of labels, taken as is.
    List(Vec<String>),
    /// `null`: no answer (scored like an empty answer).
    Missing,
}

/// One line of the predictions file.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub dataset: Dataset,
    pub id: String,
    pub gt: Gt,
    pub pred: Pred,
    /// 1-based line number in the predictions file.
    pub line: usize,
}

/// Parses a whole predictions file held in memory.
///
/// `source_name` (usually the path) is used in error messages. Blank lines are skipped; a
/// leading UTF-8 byte-order mark is ignored. Errors name the 1-based line: invalid UTF-8 or
/// JSON, a missing or mistyped field, an unknown dataset name, a duplicate `id` within a dataset.
pub fn parse_predictions(bytes: &[u8], source_name: &str) -> Result<Vec<Sample>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut samples = Vec::new();
    let mut first_line: HashMap<(Dataset, String), usize> = HashMap::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let bad = |message: String| Error::BadLine {
            source_name: source_name.to_string(),
            line,
            message,
        };
        let text = std::str::from_utf8(raw).map_err(|e| bad(format!("not valid UTF-8 ({e})")))?;
        if text.trim().is_empty() {
            continue;
        }
        let sample = parse_line(text, line, source_name)?;
        if let Some(&first) = first_line.get(&(sample.dataset, sample.id.clone())) {
            return Err(Error::DuplicateId {
                source_name: source_name.to_string(),
                line,
                id: sample.id,
                dataset: sample.dataset.name().to_string(),
                first_line: first,
            });
        }
        first_line.insert((sample.dataset, sample.id.clone()), line);
        samples.push(sample);
    }
    if samples.is_empty() {
        return Err(Error::NoPredictions {
            source_name: source_name.to_string(),
        });
    }
    Ok(samples)
}

/// Parses one non-blank line.
pub fn parse_line(text: &str, line: usize, source_name: &str) -> Result<Sample> {
    let bad = |message: String| Error::BadLine {
        source_name: source_name.to_string(),
        line,
        message,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(bad(format!(
            "expected a JSON object, found {}",
            kind(&value)
        )));
    };
    let field = |name: &str| {
        object
            .get(name)
            .ok_or_else(|| bad(format!("missing field `{name}`")))
    };

    let dataset_name = match field("dataset")? {
        Value::String(s) => s,
        other => {
            return Err(bad(format!(
                "`dataset` must be a string, found {}",
                kind(other)
            )))
        }
    };
    let dataset = Dataset::from_name(dataset_name).ok_or_else(|| Error::UnknownDataset {
        source_name: source_name.to_string(),
        line,
        name: dataset_name.clone(),
        expected: Dataset::all_names(),
    })?;

    let id = match field("id")? {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        other => {
            return Err(bad(format!(
                "`id` must be a string or an integer, found {}",
                kind(other)
            )))
        }
    };

    let gt = match (dataset.metric(), field("gt")?) {
        (Metric::Waf, Value::Number(n)) => match n.as_f64() {
            Some(score) if score.is_finite() => Gt::Score(score),
            _ => return Err(bad(format!("`gt` {n} is not a finite number"))),
        },
        (Metric::Waf, other) => {
            return Err(bad(format!(
            "`gt` of sentiment dataset {dataset} must be a number (the sentiment score), found {}",
            kind(other)
        )))
        }
        (metric, value) => {
            let labels = label_list(value).map_err(|found| {
                bad(format!(
                    "`gt` of {dataset} must be a label-list string or a JSON list of strings, found {found}"
                ))
            })?;
            if metric == Metric::Hit && labels.len() > 1 {
                return Err(bad(format!(
                    "`gt` of basic-emotion dataset {dataset} must be one label, found {} ({})",
                    labels.len(),
                    labels.join(", ")
                )));
            }
            Gt::Labels(labels)
        }
    };

    let pred =
        match field("pred")? {
            Value::String(s) => Pred::Text(s.clone()),
            Value::Null => Pred::Missing,
            Value::Array(items) => Pred::List(string_items(items).map_err(|found| {
                bad(format!("`pred` list items must be strings, found {found}"))
            })?),
            other => {
                return Err(bad(format!(
                    "`pred` must be a string, a JSON list of strings or null, found {}",
                    kind(other)
                )))
            }
        };

    Ok(Sample {
        dataset,
        id,
        gt,
        pred,
        line,
    })
}

/// A label list from a string (`string_to_list`) or a JSON list of strings; `Err(kind)` else.
fn label_list(value: &Value) -> std::result::Result<Vec<String>, String> {
    match value {
        Value::String(s) => Ok(string_to_list(s)),
        Value::Array(items) => string_items(items),
        other => Err(kind(other).to_string()),
    }
}

fn string_items(items: &[Value]) -> std::result::Result<Vec<String>, String> {
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(kind(other).to_string()),
        })
        .collect()
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Result<Sample> {
        parse_predictions(line.as_bytes(), "p.jsonl").map(|mut v| v.remove(0))
    }

    #[test]
    fn json_list_and_string_gts_parse_to_the_same_labels() {
        let a = one(r#"{"dataset":"OV-MERD+","id":"a","gt":"[happy, Sad]","pred":""}"#).unwrap();
        let b = one(r#"{"dataset":"OV-MERD+","id":"a","gt":["happy","Sad"],"pred":[]}"#).unwrap();
        assert_eq!(a.gt, b.gt);
        assert_eq!(a.pred, Pred::Text(String::new()));
        assert_eq!(b.pred, Pred::List(vec![]));
    }

    #[test]
    fn a_json_list_pred_is_taken_as_is() {
        // Items of a JSON list are not split again on commas or quotes (the reference returns
        // a list unchanged).
        let s = one(r#"{"dataset":"MELD","id":1,"gt":"joy","pred":["a, b","c"]}"#).unwrap();
        assert_eq!(s.pred, Pred::List(vec!["a, b".into(), "c".into()]));
        assert_eq!(s.id, "1");
    }

    #[test]
    fn sentiment_gt_must_be_a_number() {
        let err = one(r#"{"dataset":"CMU-MOSI","id":"a","gt":"1.0","pred":"positive"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("must be a number"),
            "{err}"
        );
    }

    #[test]
    fn basic_emotion_gt_with_two_labels_is_rejected() {
        let err = one(r#"{"dataset":"MER2023","id":"a","gt":"happy, sad","pred":""}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be one label, found 2"), "{err}");
    }

    #[test]
    fn blank_lines_and_a_byte_order_mark_are_skipped_but_line_numbers_count_them() {
        let text =
            "\u{feff}\n{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"\"}\n\n{oops\n";
        let err = parse_predictions(text.as_bytes(), "p.jsonl").unwrap_err();
        assert!(matches!(err, Error::BadLine { line: 4, .. }), "{err}");
    }

    #[test]
    fn duplicate_ids_are_allowed_across_datasets_but_not_within_one() {
        let ok = "{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"\"}\n\
                  {\"dataset\":\"IEMOCAP\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"\"}\n";
        assert_eq!(parse_predictions(ok.as_bytes(), "p").unwrap().len(), 2);
        let dup =
            format!("{ok}{{\"dataset\":\"MELD\",\"id\":\"a\",\"gt\":\"joy\",\"pred\":\"x\"}}\n");
        let err = parse_predictions(dup.as_bytes(), "p").unwrap_err();
        assert!(
            matches!(
                err,
                Error::DuplicateId {
                    line: 3,
                    first_line: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn an_empty_file_is_an_error() {
        assert!(matches!(
            parse_predictions(b"\n\n", "p"),
            Err(Error::NoPredictions { .. })
        ));
    }
}
