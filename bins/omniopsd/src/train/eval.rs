//! Held-out scoring: greedy answers of the student view, parsed by [`super::prompt`] and
//! scored with MER-UniBench's metrics.
//!
//! Invariant: every held-out number of a run (periodic, final, warm-up views) comes from
//! [`evaluate`], which decodes and lays out samples through `omniopsd predict`'s own
//! functions ([`crate::predict::answer_ids`], [`crate::predict::mer_samples`]): the basic
//! label is scored by HIT as a MER2023 sample, the sentiment word by WAF as a CMU-MOSI sample
//! and the open set by F_s as an OV-MERD+ sample, through `omniopsd-mer`, the benchmark's
//! exact metric implementation with its emotion wheels.

use std::path::PathBuf;

use anyhow::{Context, Result};
use omniopsd_mer::{EmotionWheels, Metric};

use omniopsd_decoder::{Qwen2Model, TokenPrompt};

use super::progress;
use super::report::Scores;
use super::run::Ctx;
use super::run_dir::MetricLine;
use crate::data::manifest::Record;
use crate::predict::{answer_ids, mer_samples, Decoding, PromptPreset};

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
        samples.extend(mer_samples(r, a, PromptPreset::Student, i + 1));
    }
    let report =
        omniopsd_mer::Report::evaluate(wheels, &samples, omniopsd_mer::ExtractionSummary::None);
    // Each metric over the datasets scored by it (one each for a corpus without `dataset`
    // fields: MER2023, CMU-MOSI, OV-MERD+), unweighted as MER-UniBench averages datasets.
    let get = |metric: Metric| {
        let scores: Vec<f64> = report
            .scores
            .iter()
            .filter(|s| s.dataset.metric() == metric)
            .filter_map(|s| s.score)
            .collect();
        match scores.len() {
            0 => 0.0,
            n => scores.iter().sum::<f64>() / n as f64,
        }
    };
    // Per dataset only when the corpus names datasets, so a corpus without keeps its results.
    let named = records.iter().any(|r| r.dataset.is_some());
    Scores {
        hit: get(Metric::Hit),
        waf: get(Metric::Waf),
        fs: get(Metric::Fs),
        hit_misleading: None,
        datasets: report
            .scores
            .iter()
            .filter(|_| named)
            .filter_map(|s| Some((s.dataset.name().to_string(), s.score?)))
            .collect(),
    }
}

/// Greedy answers of the student view of `heldout`, scored with the MER-UniBench metrics.
pub fn evaluate<B: burn::tensor::backend::Backend>(
    ctx: &Ctx<'_>,
    model: &Qwen2Model<B>,
    heldout: &[&super::samples::Sample],
    label: &str,
    prompt: impl Fn(&super::samples::Sample) -> &TokenPrompt,
) -> Result<(Scores, Vec<String>)> {
    let bar = progress::bar(heldout.len() as u64, "eval", ctx.out.quiet);
    bar.set_message(label.to_string());
    let mut answers = Vec::with_capacity(heldout.len());
    let decoding = Decoding::greedy(ctx.cfg.eval.max_new_tokens);
    for batch in heldout.chunks(ctx.cfg.eval.batch_size.max(1)) {
        let prompts: Vec<&TokenPrompt> = batch.iter().map(|s| prompt(s)).collect();
        let streams = vec![0; batch.len()];
        for ids in answer_ids(model, &prompts, &decoding, &[ctx.stop_token], &streams)? {
            answers.push(super::tokenizer::decode(ctx.tokenizer, &ids)?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let records: Vec<&Record> = heldout.iter().map(|s| &s.record).collect();
    Ok((score(ctx.wheels, &records, &answers), answers))
}

/// Appends the `eval` metric line of `scores`.
pub fn log(
    ctx: &Ctx<'_>,
    method: &str,
    seed: u64,
    phase: &str,
    step: u64,
    scores: &Scores,
) -> Result<()> {
    super::phase::metric(
        ctx,
        MetricLine {
            kind: "eval".into(),
            method: method.into(),
            seed,
            phase: phase.into(),
            step,
            values: super::phase::values(&[
                ("hit", scores.hit),
                ("waf", scores.waf),
                ("fs", scores.fs),
                ("mean", scores.mean()),
                ("hit_misleading", scores.hit_misleading.unwrap_or(f64::NAN)),
            ]),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::prompt::answer;
    use crate::train::prompt::tests::record;

    fn wheels() -> EmotionWheels {
        load_wheels(&None).unwrap()
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
    fn a_corpus_naming_datasets_is_scored_per_dataset_and_averaged_over_them() {
        let w = wheels();
        let mut meld = record("joy", 0.0, &[]);
        (meld.dataset, meld.sentiment, meld.openset) = (Some("MELD".into()), None, None);
        let mut sims = record("happy", 0.0, &[]);
        sims.id = "sims".into();
        (sims.dataset, sims.emotion, sims.sentiment, sims.openset) =
            (Some("CH-SIMS".into()), None, Some(-0.5), None);
        let answers = [
            "emotion: joy".to_string(),
            "sentiment: positive".to_string(),
        ];
        let s = score(&w, &[&meld, &sims], &answers);
        assert_eq!(s.datasets.len(), 2, "{s:?}");
        assert!((s.datasets["MELD"] - 100.0).abs() < 1e-9, "{s:?}");
        // One CH-SIMS sample, negative, answered positive: WAF 0.
        assert!(s.datasets["CH-SIMS"].abs() < 1e-9, "{s:?}");
        assert!(
            (s.mean() - 50.0).abs() < 1e-9,
            "the mean is over the two datasets"
        );
        assert!((s.hit - 100.0).abs() < 1e-9 && s.waf.abs() < 1e-9);
        // Without datasets nothing is listed per dataset (results as before).
        let plain = record("angry", -2.0, &["angry"]);
        assert!(score(&w, &[&plain], &[answer(&plain)]).datasets.is_empty());
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
