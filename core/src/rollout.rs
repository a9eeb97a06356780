//! On-policy rollouts: `G` sampled responses per prompt through a [`PolicyModel`].
//!
//! The prompt is prefilled once for all `G` sequences, then each step projects the last hidden
//! states through the LM head (only `[G, V]` logits exist at a time), draws one token per live
//! sequence on the host with the counter-based sampler of [`crate::sampling`], and feeds the
//! tokens back through the model's one-token decode with its cache.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::model::PolicyModel;
use crate::sampling::{self, SamplingConfig, SamplingError};

/// How responses are generated.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutConfig {
    /// Temperature, top-k, top-p of the draw.
    pub sampling: SamplingConfig,
    /// `G`: responses sampled per prompt.
    pub samples_per_prompt: usize,
    /// Upper bound on response length `R`, stop token included.
    pub max_new_tokens: usize,
    /// A sequence ends right after any of these tokens; the token itself is part of the
    /// response (and of the mask), since the model must learn to emit it.
    pub stop_tokens: Vec<u32>,
    /// Token written after a sequence's end (and fed to the decoder for finished sequences).
    /// Its value never matters: the mask is 0 there and causality keeps it from the valid
    /// positions.
    pub pad_token: u32,
    /// Temperature `τ_b` of the reported behaviour log-probabilities
    /// `log softmax(logits / τ_b)[y]` (full vocabulary, no top-k/top-p). The trainer sets it
    /// to the loss temperature so the importance ratio of the sampled-token loss is 1 on the
    /// first update after the rollout.
    pub logp_temperature: f32,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            sampling: SamplingConfig::default(),
            samples_per_prompt: 4,
            max_new_tokens: 256,
            stop_tokens: Vec::new(),
            pad_token: 0,
            logp_temperature: 1.0,
        }
    }
}

impl RolloutConfig {
    /// Checks the sampler, `samples_per_prompt >= 1`, `max_new_tokens >= 1` and
    /// `logp_temperature > 0`.
    pub fn validate(&self) -> Result<(), RolloutError> {
        self.sampling.validate()?;
        if self.samples_per_prompt == 0 {
            return Err(RolloutError::Config {
                field: "samples_per_prompt",
                expected: ">= 1",
                found: format!("{}", self.samples_per_prompt),
            });
        }
        if self.max_new_tokens == 0 {
            return Err(RolloutError::Config {
                field: "max_new_tokens",
                expected: ">= 1",
                found: format!("{}", self.max_new_tokens),
            });
        }
        if self.max_new_tokens > u32::MAX as usize {
            return Err(RolloutError::Config {
                field: "max_new_tokens",
                expected: "<= 4294967295 (positions index the random stream as u32)",
                found: format!("{}", self.max_new_tokens),
            });
        }
        if !(self.logp_temperature.is_finite() && self.logp_temperature > 0.0) {
            return Err(RolloutError::Config {
                field: "logp_temperature",
                expected: "a finite number > 0",
                found: format!("{}", self.logp_temperature),
            });
        }
        Ok(())
    }
}

/// Errors of a rollout.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RolloutError {
    /// A rollout knob is out of range.
    #[error("rollout config: `{field}` must be {expected}, found {found}")]
    Config {
        /// The field name in [`RolloutConfig`].
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// The value found.
        found: String,
    },
    /// Sampling knobs out of range.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The model's logits could not be sampled (NaN, `+inf`, or all `-inf`).
    #[error("sample {row}, response position {position}: {source}")]
    Logits {
        /// Sequence within the rollout.
        row: usize,
        /// Response position.
        position: usize,
        /// What was wrong with the logits row.
        source: SamplingError,
    },
    /// A tensor returned by the model has the wrong shape.
    #[error("model output `{tensor}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Which output (`prefill hidden`, `decode hidden`, `lm_head`).
        tensor: &'static str,
        /// Expected dimensions (`usize::MAX` where any size is accepted).
        expected: Vec<usize>,
        /// Dimensions found.
        found: Vec<usize>,
    },
    /// A tensor could not be read back to the host.
    #[error("reading `{tensor}` back to the host: {message}")]
    Readback {
        /// Which tensor.
        tensor: &'static str,
        /// The backend's message.
        message: alloc::string::String,
    },
}

impl RolloutError {
    /// The out-of-range field of a [`RolloutConfig`], if this is a config error.
    pub fn field_error(&self) -> Option<crate::FieldError> {
        match self {
            Self::Config {
                field,
                expected,
                found,
            } => Some(crate::FieldError::out_of_range(field, expected, found)),
            Self::Sampling(e) => e.field_error().map(|e| e.within("sampling")),
            _ => None,
        }
    }
}

/// `G` responses to one prompt, padded to the longest.
#[derive(Clone, Debug)]
pub struct Rollout<B: Backend> {
    /// Response tokens `[G, R]`; positions after a sequence's end hold the pad token.
    pub tokens: Tensor<B, 2, Int>,
    /// `[G, R]`: 1.0 on every generated token up to and including the stop token, 0.0 after.
    pub mask: Tensor<B, 2>,
    /// `[G, R]`: `log softmax(logits / τ_b)[y_t]` of each sampled token under the policy that
    /// sampled it, at `τ_b = logp_temperature` over the full vocabulary; 0.0 on padding.
    pub behaviour_logp: Tensor<B, 2>,
    /// Host copy of the response tokens, each row cut at its end (stop token included).
    pub responses: Vec<Vec<u32>>,
    /// `log q(y_t)` under the filtered distribution actually sampled from, per sequence
    /// (host, unpadded); 0.0 for greedy decoding.
    pub sample_logp: Vec<Vec<f64>>,
    /// Whether each sequence ended on a stop token (rather than at `max_new_tokens`).
    pub stopped: Vec<bool>,
}

impl<B: Backend> Rollout<B> {
    /// `R`, the padded response length.
    pub fn width(&self) -> usize {
        self.tokens.dims()[1]
    }

    /// Valid tokens summed over the `G` sequences.
    pub fn valid_tokens(&self) -> usize {
        self.responses.iter().map(Vec::len).sum()
    }
}

fn read_f32<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
    name: &'static str,
) -> Result<Vec<f32>, RolloutError> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| RolloutError::Readback {
            tensor: name,
            message: alloc::format!("{e:?}"),
        })
}

fn check_hidden<B: Backend>(
    hidden: &Tensor<B, 2>,
    rows: usize,
    width: usize,
    name: &'static str,
) -> Result<(), RolloutError> {
    let dims = hidden.dims();
    if dims != [rows, width] {
        return Err(RolloutError::Shape {
            tensor: name,
            expected: vec![rows, width],
            found: dims.to_vec(),
        });
    }
    Ok(())
}

/// Samples `G = cfg.samples_per_prompt` responses to `prompt`.
///
/// The draw for sequence `g` at response position `t` uses
/// [`sampling::uniform`]`(seed, stream, g, t)`, so the result depends only on the model, the
/// prompt, `seed` and `stream` (give each rollout of a run its own `stream`). Generation stops
/// when every sequence has emitted a stop token or `max_new_tokens` tokens.
///
/// ```
/// # #[path = "../examples/own_model/model.rs"] mod model;
/// # use model::BagOfWords; // the small Burn model of core/examples/own_model
/// use omniopsd_core::rollout::{rollout, RolloutConfig};
///
/// type B = burn::backend::NdArray<f32>;
/// let model = BagOfWords::<B>::new(16, 8, &Default::default());
/// let cfg = RolloutConfig {
///     samples_per_prompt: 3,
///     max_new_tokens: 5,
///     stop_tokens: vec![0],
///     ..RolloutConfig::default()
/// };
/// let out = rollout(&model, &vec![3, 4, 5], &cfg, 42, 0)?;
/// assert_eq!(out.responses.len(), 3);
/// assert!(out.width() <= 5);
/// for (response, stopped) in out.responses.iter().zip(&out.stopped) {
///     // A stopped response ends on its stop token, which is part of it.
///     assert_eq!(*stopped, response.last() == Some(&0));
/// }
/// // Same seed and stream, same responses.
/// assert_eq!(rollout(&model, &vec![3, 4, 5], &cfg, 42, 0)?.responses, out.responses);
/// # Ok::<(), omniopsd_core::rollout::RolloutError>(())
/// ```
pub fn rollout<B, M>(
    model: &M,
    prompt: &M::Prompt,
    cfg: &RolloutConfig,
    seed: u64,
    stream: u64,
) -> Result<Rollout<B>, RolloutError>
where
    B: Backend,
    M: PolicyModel<B>,
{
    cfg.validate()?;
    let g = cfg.samples_per_prompt;
    let head = model.lm_head();
    let [vocab, width] = head.dims();
    let device = head.device();

    let (mut hidden, mut cache) = model.prefill(prompt, g);
    check_hidden(&hidden, g, width, "prefill hidden")?;

    let mut responses: Vec<Vec<u32>> = vec![Vec::new(); g];
    let mut behaviour: Vec<Vec<f64>> = vec![Vec::new(); g];
    let mut sample_logp: Vec<Vec<f64>> = vec![Vec::new(); g];
    let mut stopped = vec![false; g];

    for position in 0..cfg.max_new_tokens {
        let logits = read_f32(model.step_logits(hidden), "logits")?;
        let mut next = Vec::with_capacity(g);
        for row in 0..g {
            if stopped[row] {
                next.push(i64::from(cfg.pad_token));
                continue;
            }
            let row_logits = &logits[row * vocab..(row + 1) * vocab];
            let u = sampling::uniform(seed, stream, row as u32, position as u32);
            let choice = sampling::sample(row_logits, &cfg.sampling, u).map_err(|source| {
                RolloutError::Logits {
                    row,
                    position,
                    source,
                }
            })?;
            responses[row].push(choice.token);
            sample_logp[row].push(choice.sample_logp);
            behaviour[row].push(sampling::log_softmax_at(
                row_logits,
                cfg.logp_temperature,
                choice.token as usize,
            ));
            stopped[row] = cfg.stop_tokens.contains(&choice.token);
            next.push(i64::from(choice.token));
        }
        if stopped.iter().all(|s| *s) || position + 1 == cfg.max_new_tokens {
            break;
        }
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(next, [g]), &device);
        hidden = model.decode(tokens, &mut cache);
        check_hidden(&hidden, g, width, "decode hidden")?;
    }

    let r = responses.iter().map(Vec::len).max().unwrap_or(0);
    let mut tokens = vec![i64::from(cfg.pad_token); g * r];
    let mut mask = vec![0.0f32; g * r];
    let mut logp = vec![0.0f32; g * r];
    for row in 0..g {
        for (t, token) in responses[row].iter().enumerate() {
            tokens[row * r + t] = i64::from(*token);
            mask[row * r + t] = 1.0;
            logp[row * r + t] = behaviour[row][t] as f32;
        }
    }
    Ok(Rollout {
        tokens: Tensor::from_data(TensorData::new(tokens, [g, r]), &device),
        mask: Tensor::from_data(TensorData::new(mask, [g, r]), &device),
        behaviour_logp: Tensor::from_data(TensorData::new(logp, [g, r]), &device),
        responses,
        sample_logp,
        stopped,
    })
}
