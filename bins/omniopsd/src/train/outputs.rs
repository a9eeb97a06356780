//! What a run leaves for people and scripts: `predictions/`, `students/`, `plots/`,
//! `report.md` and `report.json`.
//!
//! Invariant: outputs are derived, never read back by training: predictions and exported
//! students are written once per finished phase, and the report and plots are recomputed from
//! the phase results and `metrics.jsonl` after every phase, so a resumed run rewrites them
//! identically. Every file goes through [`omniopsd_checkpoint::atomic::write_atomic`].

use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::TensorData;
use omniopsd_checkpoint::{Checkpoint, Dtype};
use omniopsd_decoder::Qwen2Model;

use super::config::Method;
use super::plot::{self, Series};
use super::prompt;
use super::report::{self, Report, RunResult};
use super::run::{Ctx, WARMUP_ROW};
use super::samples::Sample;

/// `predictions/{phase}.jsonl`: the held-out answers, one JSON object per line.
pub fn write_predictions(
    ctx: &Ctx<'_>,
    phase: &str,
    heldout: &[&Sample],
    answers: &[String],
) -> Result<()> {
    let mut text = String::new();
    for (s, a) in heldout.iter().zip(answers) {
        let line = serde_json::json!({
            "id": s.record.id,
            "answer": a,
            "gold": prompt::answer(&s.record),
            "conflict": s.record.conflict,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let dir = ctx.run.root.join("predictions");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(omniopsd_checkpoint::atomic::write_atomic(
        &dir.join(format!("{phase}.jsonl")),
        text.as_bytes(),
    )?)
}

/// `students/{phase}/`: the trained model as an HF checkpoint directory of the same layout as
/// the one it started from (towers copied, decoder weights replaced, LoRA adapters merged),
/// with its tokenizer; a LoRA-trained model also as a PEFT adapter in `adapter/`.
pub fn export_student<B: burn::tensor::backend::Backend>(
    ctx: &Ctx<'_>,
    phase: &str,
    model: &Qwen2Model<B>,
    init: &Checkpoint,
) -> Result<()> {
    let dir = ctx.run.root.join("students").join(phase);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let prefix = if init.weights().contains("thinker.model.embed_tokens.weight") {
        "thinker."
    } else {
        ""
    };
    let trained: BTreeMap<String, TensorData> = model
        .export_tensors()
        .into_iter()
        .map(|(n, d)| (format!("{prefix}{n}"), d))
        .collect();
    let mut tensors = Vec::new();
    for name in init.tensor_names() {
        match trained.get(name) {
            Some(d) => tensors.push((name.to_string(), d.clone())),
            None => {
                let (values, shape) = init.read_f32(name)?;
                tensors.push((name.to_string(), TensorData::new(values, shape)));
            }
        }
    }
    for (name, data) in &trained {
        if !tensors.iter().any(|(n, _)| n == name) {
            tensors.push((name.clone(), data.clone()));
        }
    }
    omniopsd_checkpoint::save_safetensors::<B>(
        &dir.join("model.safetensors"),
        &tensors,
        Dtype::F32,
    )?;
    let config = serde_json::to_vec_pretty(init.config_json())?;
    omniopsd_checkpoint::atomic::write_atomic(&dir.join("config.json"), &config)?;
    if model.lora_config().is_some() {
        // The weights above have the adapters merged in; the adapters alone, in PEFT's format,
        // go to `adapter/` for `PeftModel.from_pretrained` or `--adapter`.
        let base_prefix = prefix.trim_end_matches('.');
        match (init.layout().is_multimodal(), model.lora_config()) {
            // A thinker: the adapters' config names the decoder's projections only, so
            // PEFT puts none on the towers' modules of the same names.
            (true, Some(config)) => model.save_adapter_as(
                &dir.join("adapter"),
                base_prefix,
                None,
                &config.on_thinker_decoder(base_prefix),
            )?,
            _ => model.save_adapter(&dir.join("adapter"), base_prefix, None)?,
        }
    }
    if init.layout().is_multimodal() {
        // The frames' sizes the student was trained on, for `predict` and `generate`.
        let processor = crate::inputs::processor_json(&super::samples::video_processor(ctx.cfg)?);
        omniopsd_checkpoint::atomic::write_atomic(
            &dir.join(crate::inputs::VIDEO_PROCESSOR_FILE),
            &serde_json::to_vec_pretty(&processor)?,
        )?;
    }
    super::tokenizer::save(ctx.tokenizer, &dir.join("tokenizer.json"))
}

/// Plain-words observations computed from the results.
pub fn observations(results: &[RunResult]) -> Vec<String> {
    let rows = report::rows(results);
    let mut notes = Vec::new();
    let get = |m: &str| rows.iter().find(|r| r.method == m);
    if let (Some(o), Some(s)) = (get(Method::Opsd.name()), get(Method::LabelSft.name())) {
        notes.push(format!(
            "opsd vs label-sft (mean of HIT, WAF, F_s): {:.2} vs {:.2} ({:+.2} points over {} seeds)",
            o.mean.mean,
            s.mean.mean,
            o.mean.mean - s.mean.mean,
            o.seeds.len()
        ));
    }
    if let (Some(o), Some(w)) = (get(Method::Opsd.name()), get(WARMUP_ROW)) {
        notes.push(format!(
            "opsd vs the warm-up it starts from: {:.2} vs {:.2} ({:+.2})",
            o.mean.mean,
            w.mean.mean,
            o.mean.mean - w.mean.mean
        ));
    }
    if let Some(n) = get(Method::OpsdNoPrivileged.name()) {
        notes.push(format!(
            "opsd-no-privileged: the teacher sees exactly the student's context, so its only signal is the gap between the current student and the teacher's weights (zero by construction for a live teacher); final divergence {:.2e}",
            n.final_divergence.mean
        ));
    }
    notes
}

/// Writes `report.md`, `report.json` and the plots for `results` so far.
pub fn write_outputs(
    ctx: &Ctx<'_>,
    results: &[RunResult],
    notes: &[String],
    started: Instant,
) -> Result<Report> {
    let report = Report {
        name: ctx.cfg.name.clone(),
        rows: report::rows(results),
        results: results.to_vec(),
        notes: notes.to_vec(),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    report::write(&ctx.run.root, &report)?;
    plots(ctx)?;
    Ok(report)
}

/// The curves, from `metrics.jsonl`, one line per method averaged over seeds:
/// `plots/warmup_loss.png`, `plots/loss.png`, `plots/divergence.png` and `plots/heldout.png`
/// (every method starts at the warm-up's held-out score at update 0).
fn plots(ctx: &Ctx<'_>) -> Result<()> {
    let lines = ctx.run.read_metrics()?;
    // (plot, method) → update → values over seeds
    let mut by: BTreeMap<(&'static str, String), BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    let mut warm_score = None;
    for m in &lines {
        let get = |k: &str| m.values.get(k).and_then(|v| v.as_f64());
        let mut add = |plot: &'static str, v: Option<f64>| {
            if let Some(v) = v {
                by.entry((plot, m.method.clone()))
                    .or_default()
                    .entry(m.step)
                    .or_default()
                    .push(v);
            }
        };
        match (m.kind.as_str(), m.phase.as_str()) {
            ("train", "warmup") => add("warmup_loss", get("loss")),
            ("train", _) => {
                add("loss", get("loss"));
                add("divergence", get("divergence"));
            }
            ("eval", "warmup") if m.method == "warmup" => warm_score = get("mean"),
            ("eval", "warmup") => {}
            _ => add("heldout", get("mean")),
        }
    }
    let dir = ctx.run.root.join("plots");
    for (plot, title) in [
        (
            "warmup_loss",
            "warm-up loss (answers with the rationale in context)",
        ),
        ("loss", "training loss per update, mean over seeds"),
        (
            "divergence",
            "per-token divergence to the teacher, mean over seeds",
        ),
        (
            "heldout",
            "held-out score (mean of HIT, WAF, F_s), mean over seeds",
        ),
    ] {
        let series: Vec<Series> = by
            .iter()
            .filter(|(k, _)| k.0 == plot)
            .map(|(k, steps)| {
                let mut points: Vec<(f64, f64)> = Vec::new();
                if plot == "heldout" {
                    points.extend(warm_score.map(|w| (0.0, w)));
                }
                points.extend(
                    steps
                        .iter()
                        .map(|(x, v)| (*x as f64, v.iter().sum::<f64>() / v.len() as f64)),
                );
                Series {
                    label: k.1.clone(),
                    points,
                }
            })
            .collect();
        if !series.is_empty() {
            plot::line_chart(&dir.join(format!("{plot}.png")), title, "update", &series)?;
        }
    }
    Ok(())
}
