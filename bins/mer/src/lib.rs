//! MER-UniBench scoring, exactly as the benchmark scores (AffectGPT, Lian et al., ICML 2025).
//!
//! Nine test sets, one metric each, and the unweighted mean of the nine is the MER-UniBench
//! score:
//!
//! | task | datasets | metric |
//! |---|---|---|
//! | fine-grained, open vocabulary | `OV-MERD+` | F_s ([`metrics`]) |
//! | basic emotion | `MER2023`, `MER2024`, `IEMOCAP`, `MELD` | HIT |
//! | sentiment | `CMU-MOSI`, `CMU-MOSEI`, `CH-SIMS`, `CH-SIMS-v2` | WAF |
//!
//! Emotion labels are compared after mapping onto five emotion wheels through the benchmark's
//! published tables ([`wheel`]), read from the original `format.csv` / `.xlsx` files (a
//! byte-identical copy ships compiled into this crate, [`EmotionWheels::shipped`]; a directory
//! of them replaces it, [`EmotionWheels::load`]), with the reference's quirks kept: `neutral`
//! maps to nothing and is dropped; `fear` maps to `joyful` on wheel 3 (the first
//! synonym-merged word in sorted order that the wheel knows decides).
//!
//! Flow: [`predictions::parse_predictions`] -> optional extraction ([`extract`]) ->
//! [`report::Report::evaluate`]. Invariant: knows nothing about models or training;
//! predictions in, scores out.

pub mod dataset;
pub mod error;
pub mod extract;
pub mod labels;
pub mod metrics;
pub mod predictions;
pub mod report;
pub mod wheel;

pub use dataset::{Dataset, Metric};
pub use error::{Error, Result};
pub use extract::{ExtractMode, ExtractionSummary, LlmConfig, LlmExtractor, Sampling};
pub use omniopsd_endpoint::{ApiKey, RetryPolicy};
pub use predictions::{parse_predictions, Gt, Pred, Sample};
pub use report::Report;
pub use wheel::EmotionWheels;
