//! Which labels a sample carries, by its dataset, and which MER-UniBench test set each label
//! is scored as.
//!
//! Invariant: this is the one place that knows the nine test sets' label kinds, label sets and
//! ranges. `data check` (through [`check_labels`]), the trainer's answer line and `predict` /
//! the held-out evaluation (through [`scored_labels`]) all read them from here.
//!
//! | dataset | label | values | scored by |
//! |---|---|---|---|
//! | `MER2023`, `MER2024` | `emotion` | happy, sad, angry, surprise, worried, neutral | HIT |
//! | `IEMOCAP` | `emotion` | happy, sad, angry, neutral | HIT |
//! | `MELD` | `emotion` | neutral, surprise, fear, sadness, joy, disgust, anger | HIT |
//! | `CMU-MOSI`, `CMU-MOSEI` | `sentiment` | `[-3, 3]` | WAF |
//! | `CH-SIMS`, `CH-SIMS-v2` | `sentiment` | `[-1, 1]` | WAF |
//! | `OV-MERD+` | `openset` | any labels, at least one | F_s |
//! | none given | all three | MER2023's six, `[-3, 3]`, any | HIT as MER2023, WAF as CMU-MOSI, F_s as OV-MERD+ |
//! | any other name | any of the three | any label, a finite score, any labels | as with none given |
//!
//! A name that differs from one of the nine only in case or punctuation (`mer2023`,
//! `CMU_MOSI`) is refused with the exact spelling, since its samples would otherwise be scored
//! as another dataset's.

use omniopsd_mer::{Dataset, Metric};

use super::manifest::{Record, BASIC_EMOTIONS};

/// IEMOCAP's four classes as MER-UniBench scores them (excited folded into happy).
pub const IEMOCAP_EMOTIONS: [&str; 4] = ["happy", "sad", "angry", "neutral"];
/// MELD's seven classes, as its release spells them.
pub const MELD_EMOTIONS: [&str; 7] = [
    "neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger",
];

/// A label kind of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `emotion`: one basic-emotion label (HIT).
    Emotion,
    /// `sentiment`: a score whose sign is scored (WAF).
    Sentiment,
    /// `openset`: open-vocabulary labels (F_s).
    Openset,
}

impl Kind {
    /// The manifest field.
    pub fn field(self) -> &'static str {
        match self {
            Kind::Emotion => "emotion",
            Kind::Sentiment => "sentiment",
            Kind::Openset => "openset",
        }
    }

    /// The test set a label of this kind is scored as when the sample names none of the nine.
    fn proxy(self) -> Dataset {
        match self {
            Kind::Emotion => Dataset::Mer2023,
            Kind::Sentiment => Dataset::CmuMosi,
            Kind::Openset => Dataset::OvMerdPlus,
        }
    }
}

/// What a dataset name means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Named {
    /// No `dataset`: all three kinds.
    Unnamed,
    /// One of the nine.
    Benchmark(Dataset),
    /// Any other name: any of the three kinds.
    Other,
}

/// Reads a `dataset` value; a near miss of one of the nine is an error giving its spelling.
pub fn named(dataset: Option<&str>) -> Result<Named, String> {
    let Some(name) = dataset else {
        return Ok(Named::Unnamed);
    };
    if let Some(d) = Dataset::from_name(name) {
        return Ok(Named::Benchmark(d));
    }
    let squash = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_alphanumeric() || *c == '+')
            .flat_map(char::to_lowercase)
            .collect()
    };
    match Dataset::ALL
        .iter()
        .find(|d| squash(d.name()) == squash(name))
    {
        Some(d) => Err(format!(
            "field `dataset` is `{name}`: MER-UniBench spells it `{}` (names are exact: {})",
            d.name(),
            Dataset::all_names()
        )),
        None if name.trim().is_empty() => Err("field `dataset` is empty".into()),
        None => Ok(Named::Other),
    }
}

/// The label kind each of the nine carries.
pub fn kind_of(dataset: Dataset) -> Kind {
    match dataset.metric() {
        Metric::Hit => Kind::Emotion,
        Metric::Waf => Kind::Sentiment,
        Metric::Fs => Kind::Openset,
    }
}

/// A basic-emotion dataset's label set.
pub fn emotion_labels(dataset: Dataset) -> &'static [&'static str] {
    match dataset {
        Dataset::Iemocap => &IEMOCAP_EMOTIONS,
        Dataset::Meld => &MELD_EMOTIONS,
        _ => &BASIC_EMOTIONS,
    }
}

/// A sentiment dataset's score range.
pub fn sentiment_range(dataset: Dataset) -> (f64, f64) {
    match dataset {
        Dataset::ChSims | Dataset::ChSimsV2 => (-1.0, 1.0),
        _ => (-3.0, 3.0),
    }
}

/// Every problem with a record's `dataset` and labels (empty when they are right).
pub fn check_labels(record: &Record) -> Vec<String> {
    let named = match named(record.dataset.as_deref()) {
        Ok(n) => n,
        Err(problem) => return vec![problem],
    };
    let present = present_kinds(record);
    let mut problems = Vec::new();
    let (required, emotions, range): (Vec<Kind>, Option<&[&str]>, (f64, f64)) = match named {
        Named::Unnamed => (
            vec![Kind::Emotion, Kind::Sentiment, Kind::Openset],
            Some(&BASIC_EMOTIONS),
            (-3.0, 3.0),
        ),
        Named::Benchmark(d) => {
            let kind = kind_of(d);
            for extra in present.iter().filter(|k| **k != kind) {
                problems.push(format!(
                    "field `{}` is set, but {} samples carry only `{}`",
                    extra.field(),
                    d.name(),
                    kind.field()
                ));
            }
            (vec![kind], Some(emotion_labels(d)), sentiment_range(d))
        }
        Named::Other => {
            if present.is_empty() {
                problems.push(
                    "no label: a sample needs `emotion`, `sentiment` or `openset`".to_string(),
                );
            }
            (Vec::new(), None, (f64::NEG_INFINITY, f64::INFINITY))
        }
    };
    let dataset_note = || match &record.dataset {
        Some(d) => format!(" of {d}"),
        None => String::new(),
    };
    for kind in &required {
        if !present.contains(kind) {
            problems.push(format!("field `{}` is missing", kind.field()));
        }
    }
    if let Some(emotion) = &record.emotion {
        match emotions {
            Some(set) if !set.contains(&emotion.as_str()) => problems.push(format!(
                "field `emotion` is `{emotion}`, expected one of {}{}",
                set.join(", "),
                dataset_note()
            )),
            None if emotion.trim().is_empty() => {
                problems.push("field `emotion` is empty".to_string())
            }
            _ => {}
        }
    }
    if let Some(s) = record.sentiment {
        if !(s.is_finite() && s >= range.0 && s <= range.1) {
            problems.push(match range.0.is_finite() {
                true => format!(
                    "field `sentiment` is {s}, expected a number in [{}, {}]{}",
                    range.0,
                    range.1,
                    dataset_note()
                ),
                false => format!("field `sentiment` is {s}, expected a finite number"),
            });
        }
    }
    if let Some(openset) = &record.openset {
        if openset.iter().all(|w| w.trim().is_empty()) {
            problems.push("field `openset` has no label".to_string());
        }
    }
    problems
}

/// The label kinds a record carries.
pub fn present_kinds(record: &Record) -> Vec<Kind> {
    let mut kinds = Vec::new();
    if record.emotion.is_some() {
        kinds.push(Kind::Emotion);
    }
    if record.sentiment.is_some() {
        kinds.push(Kind::Sentiment);
    }
    if record.openset.is_some() {
        kinds.push(Kind::Openset);
    }
    kinds
}

/// The test set each label of a (checked) record is scored as: its own dataset when it names
/// one of the nine, else each kind's stand-in (MER2023, CMU-MOSI, OV-MERD+), in the order
/// emotion, sentiment, open set.
pub fn scored_labels(record: &Record) -> Vec<(Dataset, Kind)> {
    match named(record.dataset.as_deref()) {
        Ok(Named::Benchmark(d)) => vec![(d, kind_of(d))],
        _ => present_kinds(record)
            .into_iter()
            .map(|k| (k.proxy(), k))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::prompt::tests::record;

    fn of(dataset: &str, edit: impl Fn(&mut Record)) -> Vec<String> {
        let mut r = record("happy", 1.0, &["happy"]);
        r.dataset = Some(dataset.into());
        (r.emotion, r.sentiment, r.openset) = (None, None, None);
        edit(&mut r);
        check_labels(&r)
    }

    #[test]
    fn each_benchmark_dataset_takes_its_own_label_from_its_own_set() {
        assert!(of("MELD", |r| r.emotion = Some("joy".into())).is_empty());
        let p = of("MELD", |r| r.emotion = Some("happy".into()));
        assert!(
            p[0].contains("`happy`") && p[0].contains("joy") && p[0].contains("MELD"),
            "{p:?}"
        );
        assert!(of("IEMOCAP", |r| r.emotion = Some("neutral".into())).is_empty());
        assert_eq!(
            of("IEMOCAP", |r| r.emotion = Some("worried".into())).len(),
            1
        );
        assert!(of("CH-SIMS", |r| r.sentiment = Some(-0.8)).is_empty());
        let p = of("CH-SIMS-v2", |r| r.sentiment = Some(2.0));
        assert!(p[0].contains("[-1, 1]"), "{p:?}");
        assert!(of("CMU-MOSEI", |r| r.sentiment = Some(2.6)).is_empty());
        assert!(of("OV-MERD+", |r| r.openset = Some(vec!["calm".into()])).is_empty());
        // The dataset's label missing; another dataset's label present.
        assert_eq!(of("MER2024", |_| {}), vec!["field `emotion` is missing"]);
        let p = of("CMU-MOSI", |r| {
            r.sentiment = Some(1.0);
            r.emotion = Some("happy".into());
        });
        assert!(
            p[0].contains("`emotion` is set") && p[0].contains("CMU-MOSI"),
            "{p:?}"
        );
    }

    #[test]
    fn near_misses_of_the_nine_names_are_refused_and_other_names_are_custom() {
        let p = of("mer2023", |r| r.emotion = Some("happy".into()));
        assert!(p[0].contains("`MER2023`"), "{p:?}");
        assert!(of("CMU_MOSI", |r| r.sentiment = Some(1.0))[0].contains("`CMU-MOSI`"));
        assert!(of("ov-merd+", |r| r.openset = Some(vec!["a".into()]))[0].contains("OV-MERD+"));
        assert!(of("my-clips", |r| r.emotion = Some("contempt".into())).is_empty());
        assert!(of("my-clips", |_| {})[0].contains("no label"));
        let mut r = record("happy", 1.0, &["happy"]);
        r.dataset = Some("my-clips".into());
        r.sentiment = None;
        assert_eq!(
            scored_labels(&r),
            vec![
                (Dataset::Mer2023, Kind::Emotion),
                (Dataset::OvMerdPlus, Kind::Openset)
            ]
        );
    }

    #[test]
    fn a_sample_without_dataset_needs_all_three_as_before() {
        assert!(check_labels(&record("happy", 1.0, &["happy"])).is_empty());
        let mut r = record("joy", 4.0, &[" "]);
        r.sentiment = Some(4.0);
        let p = check_labels(&r);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("worried") && p[1].contains("[-3, 3]") && p[2].contains("openset"));
        r.openset = None;
        assert!(check_labels(&r)
            .iter()
            .any(|p| p == "field `openset` is missing"));
    }
}
