//! The ablation table: held-out MER-UniBench scores per method, mean ± sd over seeds, as
//! `report.md` (for people) and `report.json` (for scripts).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Held-out scores of one trained model, in percent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// HIT on the basic-emotion labels: the mean over the basic-emotion datasets (MER2023 for
    /// samples without `dataset`).
    pub hit: f64,
    /// Weighted F1 of the sentiment sign: the mean over the sentiment datasets (CMU-MOSI for
    /// samples without `dataset`).
    pub waf: f64,
    /// F_s of the open-vocabulary sets (OV-MERD+ protocol).
    pub fs: f64,
    /// HIT on the samples whose subtitle misleads (sarcasm, masking, understatement), where
    /// reading the text alone fails; `None` when there are none.
    #[serde(default)]
    pub hit_misleading: Option<f64>,
    /// Each dataset's score by its own metric, when the corpus names datasets (empty
    /// otherwise: HIT, WAF and F_s are then one stand-in dataset each).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub datasets: BTreeMap<String, f64>,
}

impl Scores {
    /// Unweighted mean over datasets, as MER-UniBench averages: of the three metrics for a
    /// corpus without datasets, else of each dataset's score.
    pub fn mean(&self) -> f64 {
        match self.datasets.len() {
            0 => (self.hit + self.waf + self.fs) / 3.0,
            n => self.datasets.values().sum::<f64>() / n as f64,
        }
    }
}

/// One finished training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Row of the table.
    pub method: String,
    /// Seed of the training.
    pub seed: u64,
    /// Final held-out scores.
    pub scores: Scores,
    /// Mean per-token divergence to the teacher at the last update (OPSD methods).
    pub final_divergence: Option<f64>,
    /// Wall time of this training in seconds.
    pub seconds: f64,
}

/// Mean and sample standard deviation (n − 1; 0 for a single value).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanSd {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
    /// Number of values.
    pub n: usize,
}

impl MeanSd {
    /// Of `values`.
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self {
                mean: f64::NAN,
                sd: f64::NAN,
                n,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Self { mean, sd, n }
    }

    fn empty() -> Self {
        Self::of(&[])
    }

    fn cell(&self) -> String {
        if self.mean.is_nan() {
            "–".into()
        } else {
            format!("{:.2} ± {:.2}", self.mean, self.sd)
        }
    }
}

/// A row of the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Method name.
    pub method: String,
    /// HIT.
    pub hit: MeanSd,
    /// WAF.
    pub waf: MeanSd,
    /// F_s.
    pub fs: MeanSd,
    /// HIT on misleading-subtitle samples.
    #[serde(default = "MeanSd::empty")]
    pub hit_misleading: MeanSd,
    /// Mean of the three (or over the datasets).
    pub mean: MeanSd,
    /// Each dataset's score, when the corpus names datasets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub datasets: BTreeMap<String, MeanSd>,
    /// Final divergence (OPSD methods).
    pub final_divergence: MeanSd,
    /// Seeds.
    pub seeds: Vec<u64>,
}

/// Everything `report.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Run name.
    pub name: String,
    /// Rows in the order methods first appear.
    pub rows: Vec<Row>,
    /// Every training's result.
    pub results: Vec<RunResult>,
    /// Observations and caveats, in plain words.
    pub notes: Vec<String>,
    /// Wall time of the whole run in seconds.
    pub wall_seconds: f64,
}

/// Aggregates results into rows, in first-appearance order of methods.
pub fn rows(results: &[RunResult]) -> Vec<Row> {
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        if !by.contains_key(&r.method) {
            order.push(r.method.clone());
        }
        by.entry(r.method.clone()).or_default().push(r);
    }
    order
        .into_iter()
        .map(|method| {
            let rs = &by[&method];
            let f = |g: &dyn Fn(&RunResult) -> f64| {
                MeanSd::of(&rs.iter().map(|r| g(r)).collect::<Vec<_>>())
            };
            let divs: Vec<f64> = rs.iter().filter_map(|r| r.final_divergence).collect();
            Row {
                hit: f(&|r| r.scores.hit),
                waf: f(&|r| r.scores.waf),
                fs: f(&|r| r.scores.fs),
                hit_misleading: MeanSd::of(
                    &rs.iter()
                        .filter_map(|r| r.scores.hit_misleading)
                        .collect::<Vec<_>>(),
                ),
                mean: f(&|r| r.scores.mean()),
                datasets: {
                    let names: std::collections::BTreeSet<&String> =
                        rs.iter().flat_map(|r| r.scores.datasets.keys()).collect();
                    names
                        .into_iter()
                        .map(|d| {
                            let values: Vec<f64> = rs
                                .iter()
                                .filter_map(|r| r.scores.datasets.get(d).copied())
                                .collect();
                            (d.clone(), MeanSd::of(&values))
                        })
                        .collect()
                },
                final_divergence: MeanSd::of(&divs),
                seeds: rs.iter().map(|r| r.seed).collect(),
                method,
            }
        })
        .collect()
}

/// The Markdown table.
pub fn markdown(report: &Report) -> String {
    let mut s = format!(
        "# OmniOPSD run `{}`\n\nHeld-out scores in percent (MER-UniBench metrics), mean ± sd over seeds.\n\n\
         | method | HIT | WAF | F_s | mean | HIT, misleading subtitle | final divergence | seeds |\n|---|---|---|---|---|---|---|---|\n",
        report.name
    );
    for r in &report.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.method,
            r.hit.cell(),
            r.waf.cell(),
            r.fs.cell(),
            r.mean.cell(),
            r.hit_misleading.cell(),
            if r.final_divergence.n == 0 {
                "–".to_string()
            } else {
                format!(
                    "{:.4} ± {:.4}",
                    r.final_divergence.mean, r.final_divergence.sd
                )
            },
            r.seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let names: std::collections::BTreeSet<&String> =
        report.rows.iter().flat_map(|r| r.datasets.keys()).collect();
    if !names.is_empty() {
        s.push_str("\nPer dataset, each by its own metric (HIT, WAF or F_s):\n\n| method |");
        for d in &names {
            s.push_str(&format!(" {d} |"));
        }
        s.push_str(&format!("\n|---|{}\n", "---|".repeat(names.len())));
        for r in &report.rows {
            s.push_str(&format!("| {} |", r.method));
            for d in &names {
                let cell = r.datasets.get(*d).map_or("–".to_string(), MeanSd::cell);
                s.push_str(&format!(" {cell} |"));
            }
            s.push('\n');
        }
    }
    s.push_str(&format!("\nWall time: {:.1} s.\n", report.wall_seconds));
    if !report.notes.is_empty() {
        s.push_str("\n## Notes\n\n");
        for n in &report.notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s.push_str("\nCurves: `plots/loss.png`, `plots/divergence.png`, `plots/heldout.png`.\n");
    s
}

/// Writes `report.md` and `report.json` into `dir`.
pub fn write(dir: &Path, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("serializing report.json")?;
    omniopsd_checkpoint::atomic::write_atomic(&dir.join("report.json"), json.as_bytes())?;
    omniopsd_checkpoint::atomic::write_atomic(&dir.join("report.md"), markdown(report).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(method: &str, seed: u64, hit: f64) -> RunResult {
        RunResult {
            method: method.into(),
            seed,
            scores: Scores {
                hit,
                waf: 50.0,
                fs: 40.0,
                hit_misleading: None,
                datasets: BTreeMap::new(),
            },
            final_divergence: None,
            seconds: 1.0,
        }
    }

    #[test]
    fn mean_sd_uses_the_sample_deviation() {
        let m = MeanSd::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m.mean, 2.5);
        assert!((m.sd - 1.290_994_448_735_805_6).abs() < 1e-12);
        assert_eq!(MeanSd::of(&[7.0]).sd, 0.0);
    }

    #[test]
    fn rows_group_by_method_in_first_appearance_order() {
        let rs = vec![
            result("opsd", 0, 60.0),
            result("label-sft", 0, 40.0),
            result("opsd", 1, 70.0),
        ];
        let rows = rows(&rs);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].method, "opsd");
        assert_eq!(rows[0].hit.mean, 65.0);
        assert_eq!(rows[0].seeds, vec![0, 1]);
        let md = markdown(&Report {
            name: "t".into(),
            rows,
            results: rs,
            notes: vec!["a note".into()],
            wall_seconds: 3.0,
        });
        assert!(
            md.contains("| opsd | 65.00 ± 7.07 | 50.00 ± 0.00 | 40.00 ± 0.00 | 51.67 ± 2.36 |"),
            "{md}"
        );
        assert!(md.contains("- a note"));
        assert!(!md.contains("Per dataset"), "no datasets, no second table");
        let mut with = result("opsd", 0, 60.0);
        with.scores.datasets = BTreeMap::from([("MELD".into(), 30.0), ("CH-SIMS".into(), 70.0)]);
        let rows = super::rows(std::slice::from_ref(&with));
        assert_eq!(rows[0].mean.mean, 50.0, "mean over the datasets");
        let md = markdown(&Report {
            name: "t".into(),
            rows,
            results: vec![with],
            notes: Vec::new(),
            wall_seconds: 1.0,
        });
        assert!(md.contains("| method | CH-SIMS | MELD |"), "{md}");
        assert!(
            md.contains("| opsd | 70.00 ± 0.00 | 30.00 ± 0.00 |"),
            "{md}"
        );
    }
}
