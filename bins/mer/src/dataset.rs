//! The nine MER-UniBench test sets and the metric each is scored with.

use std::fmt;

/// The primary metric of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Emotion-wheel F-score over open-vocabulary label sets (`OV-MERD+`).
    Fs,
    /// Emotion-wheel hit rate of one ground-truth label (basic-emotion sets).
    Hit,
    /// Weighted F1 of binarised sentiment (sentiment sets).
    Waf,
}

impl Metric {
    /// The name the report uses (`F_s`, `HIT`, `WAF`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Fs => "F_s",
            Metric::Hit => "HIT",
            Metric::Waf => "WAF",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One of the nine MER-UniBench test sets, in the benchmark's table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dataset {
    OvMerdPlus,
    Mer2023,
    Mer2024,
    Iemocap,
    Meld,
    CmuMosi,
    CmuMosei,
    ChSims,
    ChSimsV2,
}

impl Dataset {
    /// All nine, in the benchmark's table order (fine-grained, basic emotion, sentiment).
    pub const ALL: [Dataset; 9] = [
        Dataset::OvMerdPlus,
        Dataset::Mer2023,
        Dataset::Mer2024,
        Dataset::Iemocap,
        Dataset::Meld,
        Dataset::CmuMosi,
        Dataset::CmuMosei,
        Dataset::ChSims,
        Dataset::ChSimsV2,
    ];

    /// The exact name used in prediction files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::OvMerdPlus => "OV-MERD+",
            Dataset::Mer2023 => "MER2023",
            Dataset::Mer2024 => "MER2024",
            Dataset::Iemocap => "IEMOCAP",
            Dataset::Meld => "MELD",
            Dataset::CmuMosi => "CMU-MOSI",
            Dataset::CmuMosei => "CMU-MOSEI",
            Dataset::ChSims => "CH-SIMS",
            Dataset::ChSimsV2 => "CH-SIMS-v2",
        }
    }

    /// Parses an exact dataset name (case-sensitive, as the benchmark spells it).
    pub fn from_name(name: &str) -> Option<Dataset> {
        Dataset::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The metric the benchmark scores this dataset with.
    pub fn metric(self) -> Metric {
        match self {
            Dataset::OvMerdPlus => Metric::Fs,
            Dataset::Mer2023 | Dataset::Mer2024 | Dataset::Iemocap | Dataset::Meld => Metric::Hit,
            Dataset::CmuMosi | Dataset::CmuMosei | Dataset::ChSims | Dataset::ChSimsV2 => {
                Metric::Waf
            }
        }
    }

    /// The nine names joined for error messages.
    pub fn all_names() -> String {
        Dataset::ALL
            .iter()
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_and_names_are_case_sensitive() {
        for d in Dataset::ALL {
            assert_eq!(Dataset::from_name(d.name()), Some(d));
        }
        assert_eq!(Dataset::from_name("meld"), None);
        assert_eq!(Dataset::from_name("OV-MERD"), None);
    }
}
