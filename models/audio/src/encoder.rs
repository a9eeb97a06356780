//! The Qwen2.5-Omni audio tower (transformers `Qwen2_5OmniAudioEncoder`).
//!
//! For each clip of `n` log-mel frames:
//! 1. split into chunks of `2·n_window` frames (the last may be shorter);
//! 2. per chunk: `h = GELU(conv1(x))` (kernel 3, padding 1), zeroed past the chunk's end,
//!    `h = GELU(conv2(h))` (kernel 3, stride 2, padding 1), plus sinusoidal positions
//!    `PE[p, i] = sin(p·τ_i)`, `PE[p, C/2 + i] = cos(p·τ_i)`, `τ_i = 10000^{−i/(C/2−1)}`
//!    (restarting at 0 in every chunk);
//! 3. pre-LN transformer layers, attention confined to each chunk (Whisper layer:
//!    `h += Attn(LN(h))`, `h += fc2(GELU(fc1(LN(h))))`);
//! 4. concatenate the chunks, average consecutive pairs (`AvgPool1d(2, 2)`, a trailing odd
//!    frame is dropped), `ln_post`, `proj` into the thinker's hidden size.

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::conv1d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use omniopsd_checkpoint::{ConfigView, Weights};
use serde::Deserialize;

use omniopsd_nn::{LayerNorm, Linear};

use crate::{Error, LogMel};

/// ε of every LayerNorm in the tower: transformers builds them as `nn.LayerNorm(d_model)`,
/// PyTorch's default, and `audio_config` has no key for it.
const LAYER_NORM_EPS: f64 = 1e-5;

/// Serde mirror of the checkpoint's `audio_config` (keys verbatim, HF defaults).
#[derive(Clone, Debug, Deserialize)]
pub struct AudioEncoderConfig {
    #[serde(default = "defaults::num_mel_bins")]
    pub num_mel_bins: usize,
    #[serde(default = "defaults::encoder_layers")]
    pub encoder_layers: usize,
    #[serde(default = "defaults::encoder_attention_heads")]
    pub encoder_attention_heads: usize,
    #[serde(default = "defaults::encoder_ffn_dim")]
    pub encoder_ffn_dim: usize,
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "defaults::max_source_positions")]
    pub max_source_positions: usize,
    #[serde(default = "defaults::n_window")]
    pub n_window: usize,
    #[serde(default = "defaults::output_dim")]
    pub output_dim: usize,
}

mod defaults {
    pub fn num_mel_bins() -> usize {
        128
    }
    pub fn encoder_layers() -> usize {
        32
    }
    pub fn encoder_attention_heads() -> usize {
        20
    }
    pub fn encoder_ffn_dim() -> usize {
        5120
    }
    pub fn d_model() -> usize {
        1280
    }
    pub fn activation_function() -> String {
        "gelu".into()
    }
    pub fn max_source_positions() -> usize {
        1500
    }
    pub fn n_window() -> usize {
        100
    }
    pub fn output_dim() -> usize {
        3584
    }
}

impl AudioEncoderConfig {
    /// Reads the tower's config object (a thinker's `audio_config`); errors name the key with
    /// its path in `config.json`.
    pub fn from_config(view: &ConfigView) -> Result<Self, Error> {
        Ok(view.deserialize()?)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.activation_function != "gelu" {
            return Err(Error::Config {
                field: "activation_function",
                reason: format!(
                    "only \"gelu\" is supported, found {:?}",
                    self.activation_function
                ),
            });
        }
        if self.encoder_attention_heads == 0 || self.d_model % self.encoder_attention_heads != 0 {
            return Err(Error::Config {
                field: "encoder_attention_heads",
                reason: format!(
                    "{} does not divide d_model = {}",
                    self.encoder_attention_heads, self.d_model
                ),
            });
        }
        if self.d_model % 2 != 0 || self.d_model < 4 {
            return Err(Error::Config {
                field: "d_model",
                reason: format!(
                    "sinusoidal positions need an even d_model >= 4, found {}",
                    self.d_model
                ),
            });
        }
        // `2 · n_window` frames make a chunk; `max_source_positions` comes from the same file,
        // so it bounds nothing by itself.
        if self.n_window == 0
            || self.n_window > self.max_source_positions
            || self.n_window.checked_mul(2).is_none()
        {
            return Err(Error::Config {
                field: "n_window",
                reason: format!(
                    "must be in 1..={} (max_source_positions), found {}",
                    self.max_source_positions, self.n_window
                ),
            });
        }
        Ok(())
    }
}

/// Rows the tower emits for a clip of `frames` log-mel frames:
/// `a = (frames − 1) / 2 + 1` after the stride-2 stem, then `(a − 2) / 2 + 1` after pooling
/// (integer division, as `_get_feat_extract_output_lengths`). This is also the number of
/// audio placeholder tokens the processor inserts.
pub fn output_lengths(frames: usize) -> usize {
    let after_stem = frames.saturating_sub(1) / 2 + 1;
    after_stem / 2
}

#[derive(Module, Debug)]
struct Attention<B: Backend> {
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    num_heads: usize,
}

impl<B: Backend> Attention<B> {
    fn load(w: &Weights, cfg: &AudioEncoderConfig, device: &B::Device) -> Result<Self, Error> {
        let d = cfg.d_model;
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), d, d, true, device)?,
            k_proj: Linear::load(&w.pp("k_proj"), d, d, false, device)?,
            v_proj: Linear::load(&w.pp("v_proj"), d, d, true, device)?,
            out_proj: Linear::load(&w.pp("out_proj"), d, d, true, device)?,
            num_heads: cfg.encoder_attention_heads,
        })
    }

    /// `softmax(QKᵀ/√d_h + mask) V` per chunk; `x: [C, L, D]`, `key_mask: [C, 1, 1, L]`
    /// (0 for frames inside the chunk, a large negative number for padding).
    fn forward(&self, x: Tensor<B, 3>, key_mask: Tensor<B, 4>) -> Tensor<B, 3> {
        let [c, l, d] = x.dims();
        let h = self.num_heads;
        let hd = d / h;
        let split = |t: Tensor<B, 3>| t.reshape([c, l, h, hd]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let scores = q.matmul(k.transpose()) * (hd as f64).powf(-0.5) + key_mask;
        let out = softmax(scores, 3).matmul(v);
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([c, l, d]))
    }
}

#[derive(Module, Debug)]
struct EncoderLayer<B: Backend> {
    self_attn: Attention<B>,
    self_attn_layer_norm: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    final_layer_norm: LayerNorm<B>,
}

impl<B: Backend> EncoderLayer<B> {
    fn load(w: &Weights, cfg: &AudioEncoderConfig, device: &B::Device) -> Result<Self, Error> {
        let d = cfg.d_model;
        Ok(Self {
            self_attn: Attention::load(&w.pp("self_attn"), cfg, device)?,
            self_attn_layer_norm: LayerNorm::load(
                &w.pp("self_attn_layer_norm"),
                d,
                LAYER_NORM_EPS,
                device,
            )?,
            fc1: Linear::load(&w.pp("fc1"), d, cfg.encoder_ffn_dim, true, device)?,
            fc2: Linear::load(&w.pp("fc2"), cfg.encoder_ffn_dim, d, true, device)?,
            final_layer_norm: LayerNorm::load(
                &w.pp("final_layer_norm"),
                d,
                LAYER_NORM_EPS,
                device,
            )?,
        })
    }

    fn forward(&self, x: Tensor<B, 3>, key_mask: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = x.clone()
            + self
                .self_attn
                .forward(self.self_attn_layer_norm.forward(x), key_mask);
        let ff = self.fc2.forward(gelu(
            self.fc1.forward(self.final_layer_norm.forward(x.clone())),
        ));
        x + ff
    }
}

/// The Qwen2.5-Omni audio tower; field names follow `thinker.audio_tower.*`.
#[derive(Module, Debug)]
pub struct AudioEncoder<B: Backend> {
    conv1_weight: Param<Tensor<B, 3>>,
    conv1_bias: Param<Tensor<B, 1>>,
    conv2_weight: Param<Tensor<B, 3>>,
    conv2_bias: Param<Tensor<B, 1>>,
    layers: Vec<EncoderLayer<B>>,
    ln_post: LayerNorm<B>,
    proj: Linear<B>,
    num_mel_bins: usize,
    d_model: usize,
    n_window: usize,
    output_dim: usize,
}

/// Added to attention scores of padded keys; finite so gradients stay finite.
const MASKED: f32 = -1.0e9;

impl<B: Backend> AudioEncoder<B> {
    /// Every linear layer passed through `f` with its name below the tower, as transformers
    /// names it (`layers.0.self_attn.q_proj`, `layers.0.fc1`, `proj`): how LoRA adapters
    /// are put on the tower.
    pub fn map_linears<E>(
        mut self,
        mut f: impl FnMut(&str, Linear<B>) -> Result<Linear<B>, E>,
    ) -> Result<Self, E> {
        let layers = std::mem::take(&mut self.layers);
        for (i, mut l) in layers.into_iter().enumerate() {
            let p = |name: &str| format!("layers.{i}.{name}");
            let a = l.self_attn;
            l.self_attn = Attention {
                q_proj: f(&p("self_attn.q_proj"), a.q_proj)?,
                k_proj: f(&p("self_attn.k_proj"), a.k_proj)?,
                v_proj: f(&p("self_attn.v_proj"), a.v_proj)?,
                out_proj: f(&p("self_attn.out_proj"), a.out_proj)?,
                num_heads: a.num_heads,
            };
            l.fc1 = f(&p("fc1"), l.fc1)?;
            l.fc2 = f(&p("fc2"), l.fc2)?;
            self.layers.push(l);
        }
        self.proj = f("proj", self.proj)?;
        Ok(self)
    }

    /// Loads the tower from `w`, a view at the tower's own tensors (a thinker's `audio_tower`).
    pub fn load(w: &Weights, cfg: &AudioEncoderConfig, device: &B::Device) -> Result<Self, Error> {
        cfg.validate()?;
        let d = cfg.d_model;
        let layers = (0..cfg.encoder_layers)
            .map(|i| EncoderLayer::load(&w.pp("layers").pp(i), cfg, device))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            conv1_weight: w.param("conv1.weight", [d, cfg.num_mel_bins, 3], device)?,
            conv1_bias: w.param("conv1.bias", [d], device)?,
            conv2_weight: w.param("conv2.weight", [d, d, 3], device)?,
            conv2_bias: w.param("conv2.bias", [d], device)?,
            layers,
            ln_post: LayerNorm::load(&w.pp("ln_post"), d, LAYER_NORM_EPS, device)?,
            proj: Linear::load(&w.pp("proj"), d, cfg.output_dim, true, device)?,
            num_mel_bins: cfg.num_mel_bins,
            d_model: d,
            n_window: cfg.n_window,
            output_dim: cfg.output_dim,
        })
    }

    /// The hidden size the tower projects into (the thinker's).
    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    /// Encodes one clip's valid log-mel frames: `[output_lengths(valid_frames), output_dim]`.
    pub fn encode(&self, mel: &LogMel, device: &B::Device) -> Result<Tensor<B, 2>, Error> {
        if mel.valid_frames > mel.n_frames || mel.data.len() != mel.n_mels * mel.n_frames {
            return Err(Error::FeatureShape {
                what: "log-mel buffer",
                expected: format!(
                    "{} x {} values with valid_frames <= n_frames",
                    mel.n_mels, mel.n_frames
                ),
                found: format!(
                    "{} values, valid_frames {}",
                    mel.data.len(),
                    mel.valid_frames
                ),
            });
        }
        let features = Tensor::from_data(
            TensorData::new(mel.valid_features(), [mel.n_mels, mel.valid_frames]),
            device,
        );
        self.forward(features, &[mel.valid_frames])
    }

    /// transformers' `audio_tower(input_features, feature_lens)`: `features` are clips'
    /// valid frames concatenated along time, `[num_mel_bins, Σ feature_lens]`; returns the
    /// clips' embeddings concatenated, `[Σ output_lengths(len), output_dim]`.
    pub fn forward(
        &self,
        features: Tensor<B, 2>,
        feature_lens: &[usize],
    ) -> Result<Tensor<B, 2>, Error> {
        let [bins, total] = features.dims();
        if bins != self.num_mel_bins {
            return Err(Error::FeatureShape {
                what: "mel bins (rows)",
                expected: self.num_mel_bins.to_string(),
                found: bins.to_string(),
            });
        }
        if feature_lens.is_empty() || feature_lens.contains(&0) {
            return Err(Error::FeatureShape {
                what: "feature_lens",
                expected: "one positive frame count per clip".into(),
                found: format!("{feature_lens:?}"),
            });
        }
        if let Some(&short) = feature_lens.iter().find(|&&l| output_lengths(l) == 0) {
            return Err(Error::FeatureShape {
                what: "clip length in frames (a clip needs >= 3 frames, i.e. > 320 samples, to yield one audio token)",
                expected: ">= 3".into(),
                found: short.to_string(),
            });
        }
        let sum: usize = feature_lens.iter().sum();
        if sum != total {
            return Err(Error::FeatureShape {
                what: "frames (columns) vs Σ feature_lens",
                expected: sum.to_string(),
                found: total.to_string(),
            });
        }
        let device = features.device();

        // Chunks of 2·n_window frames: (start column, length).
        let window = 2 * self.n_window;
        let mut chunks = Vec::new();
        let mut offset = 0;
        for &len in feature_lens {
            let mut start = 0;
            while start < len {
                let l = window.min(len - start);
                chunks.push((offset + start, l));
                start += l;
            }
            offset += len;
        }
        let max_len = chunks.iter().map(|c| c.1).max().unwrap_or(window);
        let padded: Vec<Tensor<B, 3>> = chunks
            .iter()
            .map(|&(start, len)| {
                let x = features.clone().narrow(1, start, len);
                let x = if len < max_len {
                    Tensor::cat(vec![x, Tensor::zeros([bins, max_len - len], &device)], 1)
                } else {
                    x
                };
                x.unsqueeze_dim(0)
            })
            .collect();
        let x = Tensor::cat(padded, 0);
        let n_chunks = chunks.len();

        let frame_mask: Vec<f32> = chunks
            .iter()
            .flat_map(|&(_, len)| (0..max_len).map(move |t| if t < len { 1.0 } else { 0.0 }))
            .collect();
        let frame_mask =
            Tensor::<B, 3>::from_data(TensorData::new(frame_mask, [n_chunks, 1, max_len]), &device);
        let h = conv1d(
            x,
            self.conv1_weight.val(),
            Some(self.conv1_bias.val()),
            ConvOptions::new([1], [1], [1], 1),
        );
        let h = gelu(h) * frame_mask;
        let h = conv1d(
            h,
            self.conv2_weight.val(),
            Some(self.conv2_bias.val()),
            ConvOptions::new([2], [1], [1], 1),
        );
        let h = gelu(h).swap_dims(1, 2);
        let stem_len = h.dims()[1];
        let h = h + sinusoids::<B>(stem_len, self.d_model, &device).unsqueeze_dim(0);

        let after_stem = |len: usize| (len - 1) / 2 + 1;
        let key_mask: Vec<f32> = chunks
            .iter()
            .flat_map(|&(_, len)| {
                let valid = after_stem(len);
                (0..stem_len).map(move |t| if t < valid { 0.0 } else { MASKED })
            })
            .collect();
        let key_mask = Tensor::<B, 4>::from_data(
            TensorData::new(key_mask, [n_chunks, 1, 1, stem_len]),
            &device,
        );
        let mut h = h;
        for layer in &self.layers {
            h = layer.forward(h, key_mask.clone());
        }

        // Valid rows of every chunk in order, then pairs within each clip for the pooling.
        let valid_rows: Vec<i64> = chunks
            .iter()
            .enumerate()
            .flat_map(|(c, &(_, len))| (0..after_stem(len)).map(move |t| (c * stem_len + t) as i64))
            .collect();
        let n_valid = valid_rows.len();
        let h = h
            .reshape([n_chunks * stem_len, self.d_model])
            .select(0, int_tensor::<B>(valid_rows, &device));
        let (mut even, mut odd) = (Vec::new(), Vec::new());
        let mut clip_start = 0;
        for &len in feature_lens {
            let rows = after_stem(len);
            for i in 0..rows / 2 {
                even.push((clip_start + 2 * i) as i64);
                odd.push((clip_start + 2 * i + 1) as i64);
            }
            clip_start += rows;
        }
        debug_assert_eq!(clip_start, n_valid);
        let pooled = (h.clone().select(0, int_tensor::<B>(even, &device))
            + h.select(0, int_tensor::<B>(odd, &device)))
            / 2.0;
        Ok(self.proj.forward(self.ln_post.forward(pooled)))
    }
}

fn int_tensor<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Whisper's sinusoidal table, rows `0..len`: `[sin(p·τ), cos(p·τ)]` with
/// `τ_i = exp(−i · ln(10000) / (C/2 − 1))`, computed in f32 as the reference does.
fn sinusoids<B: Backend>(len: usize, channels: usize, device: &B::Device) -> Tensor<B, 2> {
    let half = channels / 2;
    let increment = (10000f64.ln() / (half - 1) as f64) as f32;
    let inv: Vec<f32> = (0..half).map(|i| (-increment * i as f32).exp()).collect();
    let mut table = Vec::with_capacity(len * channels);
    for p in 0..len {
        let angles = inv.iter().map(|t| p as f32 * t);
        table.extend(angles.clone().map(f32::sin));
        table.extend(angles.map(f32::cos));
    }
    Tensor::from_data(TensorData::new(table, [len, channels]), device)
}
