//! F_s, HIT and WAF per dataset, as MER-UniBench computes them (README "Metrics").

use crate::dataset::{Dataset, Metric};
use crate::labels::{normalize_label, normalized_list, string_to_list};
use crate::predictions::{Gt, Pred, Sample};
use crate::wheel::EmotionWheels;

/// How many samples a metric kept after its skipping rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// F_s and HIT skip per wheel (a ground truth may map onto one wheel and not another).
    PerWheel(Vec<usize>),
    /// WAF keeps the samples with a non-zero sentiment score.
    Total(usize),
}

/// The score of one dataset, in percent. `score` is `None` when the metric is undefined
/// (every sample skipped), and `undefined_reason` then says why.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetScore {
    pub dataset: Dataset,
    /// Number of samples of this dataset in the input.
    pub n: usize,
    pub kept: Kept,
    pub score: Option<f64>,
    /// F_s only: mean over the wheels of the mean sample precision.
    pub precision: Option<f64>,
    /// F_s only: mean over the wheels of the mean sample recall.
    pub recall: Option<f64>,
    /// WAF only: binary accuracy over the kept samples.
    pub accuracy: Option<f64>,
    pub undefined_reason: Option<String>,
}

impl DatasetScore {
    pub fn metric(&self) -> Metric {
        self.dataset.metric()
    }
}

/// Normalised labels of a prediction (`string_to_list`, then lower-case and strip each).
pub fn pred_labels(pred: &Pred) -> Vec<String> {
    match pred {
        Pred::Text(s) => normalized_list(s),
        Pred::List(items) => items.iter().map(|s| normalize_label(s)).collect(),
        Pred::Missing => Vec::new(),
    }
}

/// The sentiment value of a prediction: `positive` -> 1, `negative` -> -1, anything else -> 0,
/// after lower-casing and stripping. A JSON list of exactly one string counts as that string.
pub fn sentiment_value(pred: &Pred) -> i8 {
    let word = match pred {
        Pred::Text(s) => normalize_label(s),
        Pred::List(items) if items.len() == 1 => normalize_label(&items[0]),
        Pred::List(_) | Pred::Missing => return 0,
    };
    match word.as_str() {
        "positive" => 1,
        "negative" => -1,
        _ => 0,
    }
}

/// Scores one dataset's samples with its metric.
pub fn score_dataset(
    wheels: &EmotionWheels,
    dataset: Dataset,
    samples: &[&Sample],
) -> DatasetScore {
    match dataset.metric() {
        Metric::Fs | Metric::Hit => score_wheel_metric(wheels, dataset, samples),
        Metric::Waf => score_waf(dataset, samples),
    }
}

fn gt_labels(gt: &Gt) -> Vec<String> {
    match gt {
        Gt::Labels(labels) => labels.iter().map(|s| normalize_label(s)).collect(),
        // Parsing guarantees a score only on sentiment sets; as labels it maps to nothing.
        Gt::Score(_) => Vec::new(),
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// F_s and HIT: per wheel, then averaged over the wheels.
///
/// F_s (per wheel `N`, over the samples whose mapped ground-truth set `G` is not empty):
/// `p = |G∩P|/|P|`, `r = |G∩P|/|G|` (both 0 when `P` is empty), `P_N = mean p`,
/// `R_N = mean r`, `F_N = 2 P_N R_N / (P_N + R_N)`; score `= mean_N F_N`.
/// The reference divides 0 by 0 (NaN) when `P_N = R_N = 0`; F_N is 0 there, the F1 convention,
/// since a model that never overlaps the ground truth scores 0, not "undefined".
///
/// HIT: `hit = |G∩P|` (0 or 1 for a one-label ground truth), `HIT_N = mean hit`,
/// score `= mean_N HIT_N`. Both are undefined when some wheel keeps no sample (the reference's
/// mean of an empty list is NaN).
fn score_wheel_metric(
    wheels: &EmotionWheels,
    dataset: Dataset,
    samples: &[&Sample],
) -> DatasetScore {
    let metric = dataset.metric();
    let labelled: Vec<(Vec<String>, Vec<String>)> = samples
        .iter()
        .map(|s| (gt_labels(&s.gt), pred_labels(&s.pred)))
        .collect();

    let mut kept = Vec::with_capacity(wheels.n_wheels());
    let mut per_wheel = Vec::with_capacity(wheels.n_wheels()); // (score, precision, recall)
    let mut empty_wheel = None;
    for wheel in 0..wheels.n_wheels() {
        let (mut precisions, mut recalls, mut hits) = (Vec::new(), Vec::new(), Vec::new());
        for (gt, pred) in &labelled {
            let g = wheels.map_set(gt, wheel);
            if g.is_empty() {
                continue;
            }
            let p = wheels.map_set(pred, wheel);
            let overlap = g.intersection(&p).count() as f64;
            hits.push(overlap);
            if p.is_empty() {
                precisions.push(0.0);
                recalls.push(0.0);
            } else {
                precisions.push(overlap / p.len() as f64);
                recalls.push(overlap / g.len() as f64);
            }
        }
        kept.push(hits.len());
        if hits.is_empty() {
            empty_wheel.get_or_insert(wheel);
            continue;
        }
        per_wheel.push(match metric {
            Metric::Fs => {
                let (p, r) = (mean(&precisions), mean(&recalls));
                let f = if p + r == 0.0 {
                    0.0
                } else {
                    2.0 * p * r / (p + r)
                };
                (f, p, r)
            }
            _ => (mean(&hits), 0.0, 0.0),
        });
    }

    let mut result = DatasetScore {
        dataset,
        n: samples.len(),
        kept: Kept::PerWheel(kept),
        score: None,
        precision: None,
        recall: None,
        accuracy: None,
        undefined_reason: None,
    };
    if let Some(wheel) = empty_wheel {
        result.undefined_reason = Some(format!(
            "every sample was skipped on wheel {} (no ground-truth label maps onto it, e.g. all are neutral or unknown words)",
            wheel + 1
        ));
        return result;
    }
    let column = |i: usize| {
        100.0
            * mean(
                &per_wheel
                    .iter()
                    .map(|t| [t.0, t.1, t.2][i])
                    .collect::<Vec<_>>(),
            )
    };
    result.score = Some(column(0));
    if metric == Metric::Fs {
        result.precision = Some(column(1));
        result.recall = Some(column(2));
    }
    result
}

/// Binary classification counts of one class.
fn f1_of_class(y_true: &[bool], y_pred: &[bool], class: bool) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    for (&t, &p) in y_true.iter().zip(y_pred) {
        match (t == class, p == class) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fn_ += 1,
            (false, false) => {}
        }
    }
    let denominator = 2 * tp + fp + fn_;
    if denominator == 0 {
        0.0
    } else {
        2.0 * tp as f64 / denominator as f64
    }
}

/// scikit-learn's `f1_score(y_true, y_pred, average="weighted")` for two classes, and the
/// accuracy; `None` for empty input.
///
/// `WAF = Σ_c n_c F1_c / Σ_c n_c`, `F1_c = 2TP_c / (2TP_c + FP_c + FN_c)`, `n_c` the true
/// support of class `c`. A class with no true sample has weight 0, so its F1 (0 by
/// scikit-learn's `zero_division` default when undefined) never matters.
pub fn weighted_f1_and_accuracy(y_true: &[bool], y_pred: &[bool]) -> Option<(f64, f64)> {
    if y_true.is_empty() || y_true.len() != y_pred.len() {
        return None;
    }
    let n = y_true.len() as f64;
    let positives = y_true.iter().filter(|&&t| t).count() as f64;
    let waf = (positives * f1_of_class(y_true, y_pred, true)
        + (n - positives) * f1_of_class(y_true, y_pred, false))
        / n;
    let correct = y_true.iter().zip(y_pred).filter(|(t, p)| t == p).count() as f64;
    Some((waf, correct / n))
}

/// WAF: drop samples with score 0, binarise `gt > 0` and `pred > 0` (neutral counts as
/// negative), weighted F1 over the two classes.
fn score_waf(dataset: Dataset, samples: &[&Sample]) -> DatasetScore {
    let (mut y_true, mut y_pred) = (Vec::new(), Vec::new());
    for sample in samples {
        let Gt::Score(score) = sample.gt else {
            continue;
        };
        if score == 0.0 {
            continue;
        }
        y_true.push(score > 0.0);
        y_pred.push(sentiment_value(&sample.pred) > 0);
    }
    let mut result = DatasetScore {
        dataset,
        n: samples.len(),
        kept: Kept::Total(y_true.len()),
        score: None,
        precision: None,
        recall: None,
        accuracy: None,
        undefined_reason: None,
    };
    match weighted_f1_and_accuracy(&y_true, &y_pred) {
        Some((waf, accuracy)) => {
            result.score = Some(100.0 * waf);
            result.accuracy = Some(100.0 * accuracy);
        }
        None => {
            result.undefined_reason =
                Some("every sample was skipped (all sentiment scores are 0)".to_string());
        }
    }
    result
}

/// The label list a free-form extraction produced for a sentiment set: a one-item bracketed
/// list stands for its item (`[positive]` -> `positive`); anything else is kept as it is.
pub fn sentiment_word_from_answer(answer: &str) -> String {
    if answer.trim_start().starts_with('[') {
        let items = string_to_list(answer.trim());
        if items.len() == 1 {
            return items[0].clone();
        }
    }
    answer.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentiment_words_are_case_and_space_insensitive_and_neutral_is_zero() {
        assert_eq!(sentiment_value(&Pred::Text(" Positive\n".into())), 1);
        assert_eq!(sentiment_value(&Pred::Text("NEGATIVE".into())), -1);
        assert_eq!(sentiment_value(&Pred::Text("neutral".into())), 0);
        assert_eq!(sentiment_value(&Pred::Text("[positive]".into())), 0);
        assert_eq!(sentiment_value(&Pred::Text("".into())), 0);
        assert_eq!(sentiment_value(&Pred::List(vec!["positive".into()])), 1);
        assert_eq!(
            sentiment_value(&Pred::List(vec!["positive".into(), "x".into()])),
            0
        );
        assert_eq!(sentiment_value(&Pred::Missing), 0);
    }

    #[test]
    fn weighted_f1_weights_each_class_by_its_true_support() {
        // y_true = [1,1,1,0], y_pred = [1,0,1,1]: F1(1) = 4/6, F1(0) = 0.
        let (waf, acc) =
            weighted_f1_and_accuracy(&[true, true, true, false], &[true, false, true, true])
                .unwrap();
        assert!((waf - 0.75 * 4.0 / 6.0).abs() < 1e-15);
        assert!((acc - 0.5).abs() < 1e-15);
        assert_eq!(weighted_f1_and_accuracy(&[], &[]), None);
    }

    #[test]
    fn one_item_bracketed_answers_become_the_sentiment_word() {
        assert_eq!(sentiment_word_from_answer("[Positive]"), "Positive");
        assert_eq!(sentiment_word_from_answer("negative"), "negative");
        assert_eq!(sentiment_word_from_answer("[a, b]"), "[a, b]");
    }
}
