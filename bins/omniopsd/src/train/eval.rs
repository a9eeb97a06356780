//! Held-out scoring: greedy answers of the student view, parsed by [`super::prompt`] and
//! scored with MER-UniBench's metrics.
//!
//! Invariant: every held-out number of a run (periodic, final, warm-up views) comes from
//! [`evaluate`]: the basic label is scored by HIT as a MER2023 sample, the sentiment word by
//! WAF as a CMU-MOSI sample and the open set by F_s as an OV-MERD+ sample, through
//! `omniopsd-mer`, the benchmark's exact metric implementation with its emotion wheels.

use std::path::PathBuf;

use anyhow::{Context, Result};
use omniopsd_mer::{Dataset, EmotionWheels, Gt, Pred, Sample};

use omniopsd_decoder::{Qwen2Model, TokenPrompt};

use super::progress;
use super::prompt::parse_answer;
use super::report::Scores;
use super::run::Ctx;
use super::run_dir::MetricLine;
use crate::data::manifest::Record;

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
    for s in heldout {
        let ids = model.generate_greedy(
            prompt(s),
            ctx.cfg.eval.max_new_tokens,
            true,
            &[ctx.stop_token],
        )?;
        let ids: Vec<u32> = ids.into_iter().filter(|&t| t != ctx.stop_token).collect();
        answers.push(super::tokenizer::decode(ctx.tokenizer, &ids)?);
        bar.inc(1);
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
