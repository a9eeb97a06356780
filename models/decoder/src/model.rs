//! The Qwen2 decoder, as transformers' `Qwen2Model` + `Qwen2ForCausalLM`'s head and the text
//! model of `Qwen2_5OmniThinkerForConditionalGeneration`.
//!
//! Per layer (pre-norm residual):
//! `h = x + o_proj(attn(rope(q_proj(n₁x)), rope(k_proj(n₁x)), v_proj(n₁x)))`,
//! `y = h + down_proj(silu(gate_proj(n₂h)) ⊙ up_proj(n₂h))`, with `nᵢ` RMSNorm
//! `x / sqrt(mean(x²) + ε) · w`, q/k/v with bias, GQA (each key/value head serves
//! `heads / kv_heads` query heads), causal softmax attention scaled by `1/√d`.
//!
//! Rotary embedding (Su et al. 2021, RoFormer): `x·cos + rotate_half(x)·sin` with angle
//! `p·θ^(−2j/d)` for frequency `j < d/2`. M-RoPE (Qwen2-VL, Wang et al. 2024): the position
//! `p` of frequency `j` comes from one of three position rows (temporal, height, width) as
//! `mrope_section` assigns them; with three equal rows it is 1-D RoPE.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, FloatDType, Int, Tensor, TensorData};
use omniopsd_backends::rows;
use omniopsd_checkpoint::{Checkpoint, ConfigView, Dtype, Layout, Weights};
use omniopsd_core::fused::lm_logits;
use omniopsd_nn::{Linear, RmsNorm};

use crate::{Error, LoraConfig, Qwen2Config};

#[derive(Module, Debug)]
struct Attention<B: Backend> {
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    heads: usize,
    kv_heads: usize,
}

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
}

#[derive(Module, Debug)]
struct DecoderLayer<B: Backend> {
    self_attn: Attention<B>,
    mlp: Mlp<B>,
    input_layernorm: RmsNorm<B>,
    post_attention_layernorm: RmsNorm<B>,
}

/// Keys and values of every layer for the positions decoded so far, `[B, kv_heads, S, d]`.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> KvCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self { layers: Vec::new() }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache of a batch of one repeated for `n` sequences.
    pub fn repeat(self, n: usize) -> Self {
        if n == 1 {
            return self;
        }
        let layers = self
            .layers
            .into_iter()
            .map(|(k, v)| (k.repeat_dim(0, n), v.repeat_dim(0, n)))
            .collect();
        Self { layers }
    }

    /// One cache for a batch from caches of single sequences of different lengths, each
    /// left-padded with zero keys and values to the longest (the padding
    /// [`Qwen2Model::forward_padded`] masks); the batch in the order given.
    pub fn stack_left_padded(caches: Vec<KvCache<B>>) -> Self {
        let len = caches.iter().map(KvCache::len).max().unwrap_or(0);
        let layers = caches.first().map_or(0, |c| c.layers.len());
        let mut per_layer: Vec<(Vec<Tensor<B, 4>>, Vec<Tensor<B, 4>>)> =
            (0..layers).map(|_| (Vec::new(), Vec::new())).collect();
        for cache in caches {
            let pad = len - cache.len();
            for (i, (k, v)) in cache.layers.into_iter().enumerate() {
                let padded = |t: Tensor<B, 4>| {
                    if pad == 0 {
                        return t;
                    }
                    let [b, h, _, d] = t.dims();
                    Tensor::cat(vec![Tensor::zeros([b, h, pad, d], &t.device()), t], 2)
                };
                per_layer[i].0.push(padded(k));
                per_layer[i].1.push(padded(v));
            }
        }
        Self {
            layers: per_layer
                .into_iter()
                .map(|(k, v)| (Tensor::cat(k, 0), Tensor::cat(v, 0)))
                .collect(),
        }
    }

    /// Keeps the sequences `rows` (indices into the batch, in that order): a batch whose
    /// finished sequences are dropped.
    pub fn select_rows(self, rows: &[usize]) -> Self {
        let Some((k, _)) = self.layers.first() else {
            return self;
        };
        let index = Tensor::<B, 1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
            &k.device(),
        );
        let layers = self
            .layers
            .into_iter()
            .map(|(k, v)| (k.select(0, index.clone()), v.select(0, index.clone())))
            .collect();
        Self { layers }
    }

    /// Appends this step's keys and values to layer `layer` and returns the full ones.
    fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        if let Some((pk, pv)) = self.layers.get(layer).cloned() {
            let k = Tensor::cat(vec![pk, k], 2);
            let v = Tensor::cat(vec![pv, v], 2);
            self.layers[layer] = (k.clone(), v.clone());
            (k, v)
        } else {
            self.layers.push((k.clone(), v.clone()));
            (k, v)
        }
    }
}

/// Rotary tables for one forward, `cos` and `sin` as `[B, T, heads, d]` for the query heads
/// and the key heads: materialized at the full shape (they are small) so rotating a
/// projection is contiguous elementwise work, not a broadcast over a permuted view, which
/// CPU backends run through a slow strided path.
struct Rotary<B: Backend> {
    q: (Tensor<B, 4>, Tensor<B, 4>),
    k: (Tensor<B, 4>, Tensor<B, 4>),
}

impl<B: Backend> Rotary<B> {
    /// `x·cos + rotate_half(x)·sin` for `x: [B, T, heads, d]`,
    /// `rotate_half(x) = [−x₂, x₁]` on the two halves of `d`.
    fn apply(x: Tensor<B, 4>, (cos, sin): &(Tensor<B, 4>, Tensor<B, 4>)) -> Tensor<B, 4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        x * cos.clone() + Tensor::cat(vec![x2.neg(), x1], 3) * sin.clone()
    }
}

impl<B: Backend> Attention<B> {
    /// `mask`: `[B, 1, T, S]`, true where a query must not see a key (padding), on top of
    /// the causal mask.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
        mask: Option<&Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 3> {
        let [b, t, h] = x.dims();
        let d = h / self.heads;
        // `[B, T, heads, d]` as projected; q and k are rotated in that layout, then all three
        // are viewed as `[B, heads, T, d]`.
        let heads = |proj: &Linear<B>, n: usize| proj.forward(x.clone()).reshape([b, t, n, d]);
        let q = Rotary::apply(heads(&self.q_proj, self.heads), &rotary.q).swap_dims(1, 2);
        let k = Rotary::apply(heads(&self.k_proj, self.kv_heads), &rotary.k).swap_dims(1, 2);
        let v = heads(&self.v_proj, self.kv_heads).swap_dims(1, 2);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let groups = self.heads / self.kv_heads;
        let out = if t == 1 && groups > 1 {
            // One new position sees every cached key, so no mask is needed and each key/value
            // head can serve its query group directly: `[B, kv, groups, d]` queries, no
            // repeated copy of the cache.
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: false,
            };
            let s = k.dims()[2];
            let mask = mask.map(|m| m.clone().expand([b, self.kv_heads, groups, s]));
            attention(
                q.reshape([b, self.kv_heads, groups, d]),
                k,
                v,
                mask,
                None,
                options,
            )
            .reshape([b, self.heads, 1, d])
        } else {
            let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));
            // Causal with the mask aligned bottom-right, so cached keys are all visible.
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            let s = k.dims()[2];
            let mask = mask.map(|m| m.clone().expand([b, self.heads, t, s]));
            attention(q, k, v, mask, None, options)
        };
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, t, self.heads * d]))
    }

    /// `[B, kv, S, d]` → `[B, heads, S, d]`, each key/value head repeated for its group.
    fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let groups = self.heads / self.kv_heads;
        if groups == 1 {
            return x;
        }
        let [b, kv, s, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .repeat_dim(2, groups)
            .reshape([b, kv * groups, s, d])
    }
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

impl<B: Backend> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
        mask: Option<&Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rotary, cache, mask);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// The decoder: token embeddings, layers, final norm and the LM head (tied to the embeddings
/// when the config says so).
#[derive(Module, Debug)]
pub struct Qwen2Model<B: Backend> {
    embed_tokens: Param<Tensor<B, 2>>,
    layers: Vec<DecoderLayer<B>>,
    norm: RmsNorm<B>,
    /// `None` when tied: the head is `embed_tokens`.
    lm_head: Option<Param<Tensor<B, 2>>>,
    /// Per frequency `j < d/2`, which position row (0 temporal, 1 height, 2 width) drives it.
    freq_rows: Vec<usize>,
    inv_freq: Vec<f32>,
    config: Qwen2Config,
    /// The settings of the attached LoRA adapters (see `lora.rs`); `None` without adapters.
    pub(crate) lora: Option<LoraConfig>,
}

impl<B: Backend> Qwen2Model<B> {
    /// Loads the decoder from `w`, the parent of `model.*` and `lm_head.weight` (the
    /// checkpoint root for `Qwen2ForCausalLM`; a thinker's root for Qwen2.5-Omni).
    ///
    /// The head follows transformers' `tie_weights` at `from_pretrained`:
    /// `config.tie_word_embeddings` (the flag of the model that owns the head, which for a
    /// thinker is not its `text_config`'s) asks for a tied head, but a stored `lm_head.weight`
    /// that differs from the embeddings is kept as an untied head, and a tied checkpoint that
    /// stores only `lm_head.weight` shares it as the embeddings. Untied with no stored head is
    /// an error (transformers would initialise one at random). The loaded model's
    /// [`Self::config`] says whether the head ended up tied.
    pub fn load(w: &Weights, config: &Qwen2Config, device: &B::Device) -> Result<Self, Error> {
        config.validate().map_err(|(key, reason)| Error::Config {
            file: "config.json".into(),
            key: key.into(),
            reason,
        })?;
        let (h, heads, kv) = (
            config.hidden_size,
            config.num_attention_heads,
            config.kv_heads(),
        );
        let d = config.head_dim();
        let eps = config.rms_norm_eps;
        let m = w.pp("model");
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = m.pp("layers").pp(i);
                let a = l.pp("self_attn");
                let p = l.pp("mlp");
                let inter = config.intermediate_size;
                Ok(DecoderLayer {
                    self_attn: Attention {
                        q_proj: Linear::load(&a.pp("q_proj"), h, heads * d, true, device)?,
                        k_proj: Linear::load(&a.pp("k_proj"), h, kv * d, true, device)?,
                        v_proj: Linear::load(&a.pp("v_proj"), h, kv * d, true, device)?,
                        o_proj: Linear::load(&a.pp("o_proj"), heads * d, h, false, device)?,
                        heads,
                        kv_heads: kv,
                    },
                    mlp: Mlp {
                        gate_proj: Linear::load(&p.pp("gate_proj"), h, inter, false, device)?,
                        up_proj: Linear::load(&p.pp("up_proj"), h, inter, false, device)?,
                        down_proj: Linear::load(&p.pp("down_proj"), inter, h, false, device)?,
                    },
                    input_layernorm: RmsNorm::load(&l.pp("input_layernorm"), h, eps, device)?,
                    post_attention_layernorm: RmsNorm::load(
                        &l.pp("post_attention_layernorm"),
                        h,
                        eps,
                        device,
                    )?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let (embed, head) = ("model.embed_tokens.weight", "lm_head.weight");
        let tied = config.tie_word_embeddings
            && !(w.contains(head) && w.contains(embed) && !w.same_values(embed, head)?);
        let embed_source = if tied && !w.contains(embed) && w.contains(head) {
            head
        } else {
            embed
        };
        let lm_head = if tied {
            None
        } else {
            Some(w.param(head, [config.vocab_size, h], device)?)
        };
        let mut config = config.clone();
        config.tie_word_embeddings = tied;
        let mut freq_rows = Vec::with_capacity(d / 2);
        for (row, &n) in config.mrope_section().iter().enumerate() {
            freq_rows.extend(std::iter::repeat_n(row, n));
        }
        // As transformers: θ^(2j/d) in f32 arithmetic on the exponent.
        let theta = config.rope_theta() as f32;
        let inv_freq = (0..d / 2)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / d as f32))
            .collect();
        Ok(Self {
            embed_tokens: w.param(embed_source, [config.vocab_size, h], device)?,
            layers,
            norm: RmsNorm::load(&m.pp("norm"), h, eps, device)?,
            lm_head,
            freq_rows,
            inv_freq,
            config,
            lora: None,
        })
    }

    /// Loads a text-only checkpoint ([`Layout::CausalLm`]: `Qwen2ForCausalLM`, `model.*` and
    /// `lm_head.weight` with the config at the root). The text model of a Qwen2.5-Omni
    /// checkpoint is loaded by `omniopsd-thinker`, which knows where it sits.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &B::Device) -> Result<Self, Error> {
        let config = ckpt.model_config();
        if ckpt.layout() != Layout::CausalLm {
            return Err(Error::Config {
                file: config.file().to_path_buf(),
                key: "text_config".into(),
                reason: format!(
                    "a multimodal checkpoint ({:?} layout); its text model loads through the thinker",
                    ckpt.layout()
                ),
            });
        }
        Self::load(
            &ckpt.model_weights(),
            &Qwen2Config::from_config(&config)?,
            device,
        )
    }

    /// The configuration the model was loaded with.
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// Token embeddings `[B, T, H]` of `ids: [B, T]`.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let table = self.embed_tokens.val();
        let h = table.dims()[1];
        table.select(0, ids.reshape([b * t])).reshape([b, t, h])
    }

    /// Final-norm hidden states `[B, T, H]` of input embeddings at `position_ids: [3, B, T]`
    /// (temporal, height, width rows; equal rows for text). With a cache, the new positions
    /// attend to everything cached and are appended to it.
    pub fn forward_embeds(
        &self,
        embeds: Tensor<B, 3>,
        position_ids: Tensor<B, 3, Int>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.forward_padded(embeds, position_ids, cache, &[])
    }

    /// [`Self::forward_embeds`] for sequences of different lengths in one batch, each
    /// left-padded: sequence `b`'s first `pads[b]` positions (counted from the start of the
    /// cache) are padding, which no real position attends to. Padding positions attend
    /// causally to the padding before them, so their states stay finite and are never read.
    /// `pads` empty or all zero is the unpadded forward, operation for operation.
    pub fn forward_padded(
        &self,
        embeds: Tensor<B, 3>,
        position_ids: Tensor<B, 3, Int>,
        mut cache: Option<&mut KvCache<B>>,
        pads: &[usize],
    ) -> Tensor<B, 3> {
        let [b, t, _] = embeds.dims();
        let cached = cache.as_deref().map_or(0, KvCache::len);
        let mask = pads
            .iter()
            .any(|&p| p > 0)
            .then(|| padding_mask::<B>(pads, b, t, cached, &embeds.device()));
        let rotary = self.rotary(position_ids);
        let mut x = embeds;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(
                x,
                &rotary,
                cache.as_deref_mut().map(|c| (c, i)),
                mask.as_ref(),
            );
        }
        self.norm.forward(x)
    }

    /// [`Self::forward_embeds`] on token ids at positions `0..T`.
    pub fn forward_ids(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let device = ids.device();
        let positions = text_positions::<B>(0, b, t, &device);
        self.forward_embeds(self.embed(ids), positions, None)
    }

    /// Logits `[B, T, V]` of hidden states `[B, T, H]` (the full head; the trainer applies it
    /// in chunks instead).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = hidden.dims();
        let v = self.config.vocab_size;
        lm_logits(hidden.reshape([b * t, h]), self.lm_head_weight()).reshape([b, t, v])
    }

    /// Logits `[n, V]` of a decode step's hidden states `[n, H]`: [`lm_logits`], or for a few
    /// rows on a host backend the streaming product of [`omniopsd_backends::rows`] (equal up
    /// to f32 rounding).
    pub fn step_logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match rows::product(hidden, self.lm_head_weight(), rows::Layout::OutIn) {
            Ok(logits) => logits,
            Err((hidden, head)) => lm_logits(hidden, head),
        }
    }

    /// The LM-head weight `[V, H]`.
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(w) => w.val(),
            None => self.embed_tokens.val(),
        }
    }

    fn rotary(&self, position_ids: Tensor<B, 3, Int>) -> Rotary<B> {
        let [_, b, t] = position_ids.dims();
        let device = position_ids.device();
        let half = self.inv_freq.len();
        let mut select = vec![0f32; 3 * half];
        for (j, &row) in self.freq_rows.iter().enumerate() {
            select[row * half + j] = 1.0;
        }
        let select = Tensor::<B, 4>::from_data(TensorData::new(select, [3, 1, 1, half]), &device);
        let inv = Tensor::<B, 4>::from_data(
            TensorData::new(self.inv_freq.clone(), [1, 1, 1, half]),
            &device,
        );
        // Angle of frequency j = position (from its row) × inv_freq[j].
        let angles = (position_ids.float().unsqueeze_dim::<4>(3) * inv * select)
            .sum_dim(0)
            .reshape([b, t, 1, half]);
        let angles = Tensor::cat(vec![angles.clone(), angles], 3);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let heads = |n: usize| (cos.clone().repeat_dim(2, n), sin.clone().repeat_dim(2, n));
        Rotary {
            q: heads(self.config.num_attention_heads),
            k: heads(self.config.kv_heads()),
        }
    }

    /// The model with every projection's products (attention q/k/v/o, MLP, LoRA adapters) in
    /// `compute` (`None`: the backend's float type): mixed precision as `torch.autocast`
    /// runs a Qwen2 layer, with the weights kept in the backend's type as master weights
    /// and embeddings, RMSNorm, rotary, attention scores and softmax, the residual stream
    /// and the LM head (the loss) in it too.
    pub fn with_compute(self, compute: Option<FloatDType>) -> Self {
        match self.map_projections(|_, _, lin| {
            Ok::<_, std::convert::Infallible>(lin.with_compute(compute))
        }) {
            Ok(model) => model,
            Err(never) => match never {},
        }
    }

    /// The type the projections compute in, if not the backend's float type.
    pub fn compute(&self) -> Option<FloatDType> {
        self.layers
            .first()
            .and_then(|l| l.self_attn.q_proj.compute())
    }

    /// Every projection of every layer with its name below the decoder's prefix
    /// (`model.layers.3.mlp.up_proj`) and its short name (`up_proj`), in layer order.
    pub(crate) fn projections(&self) -> Vec<(String, &'static str, &Linear<B>)> {
        let mut out = Vec::with_capacity(7 * self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let (a, m) = (&l.self_attn, &l.mlp);
            for (group, name, lin) in [
                ("self_attn", "q_proj", &a.q_proj),
                ("self_attn", "k_proj", &a.k_proj),
                ("self_attn", "v_proj", &a.v_proj),
                ("self_attn", "o_proj", &a.o_proj),
                ("mlp", "gate_proj", &m.gate_proj),
                ("mlp", "up_proj", &m.up_proj),
                ("mlp", "down_proj", &m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.{group}.{name}"), name, lin));
            }
        }
        out
    }

    /// Replaces every projection by `f(name, short name, projection)`, names as in
    /// [`Self::projections`]; stops at the first error.
    pub(crate) fn map_projections<E>(
        mut self,
        mut f: impl FnMut(&str, &'static str, Linear<B>) -> Result<Linear<B>, E>,
    ) -> Result<Self, E> {
        let layers = std::mem::take(&mut self.layers);
        for (i, mut l) in layers.into_iter().enumerate() {
            let p = |group: &str, name: &str| format!("model.layers.{i}.{group}.{name}");
            let a = l.self_attn;
            let m = l.mlp;
            l.self_attn = Attention {
                q_proj: f(&p("self_attn", "q_proj"), "q_proj", a.q_proj)?,
                k_proj: f(&p("self_attn", "k_proj"), "k_proj", a.k_proj)?,
                v_proj: f(&p("self_attn", "v_proj"), "v_proj", a.v_proj)?,
                o_proj: f(&p("self_attn", "o_proj"), "o_proj", a.o_proj)?,
                heads: a.heads,
                kv_heads: a.kv_heads,
            };
            l.mlp = Mlp {
                gate_proj: f(&p("mlp", "gate_proj"), "gate_proj", m.gate_proj)?,
                up_proj: f(&p("mlp", "up_proj"), "up_proj", m.up_proj)?,
                down_proj: f(&p("mlp", "down_proj"), "down_proj", m.down_proj)?,
            };
            self.layers.push(l);
        }
        Ok(self)
    }

    /// Every weight under its HF name (`model.*`, and `lm_head.weight` unless tied), as
    /// transformers' `Qwen2ForCausalLM` names them. Attached LoRA adapters are merged into
    /// the projections' weights (`W + s·B·A`), so the export computes what this model does.
    pub fn export_tensors(&self) -> Vec<(String, TensorData)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.val().into_data(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            for (name, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &l.mlp.gate_proj),
                ("mlp.up_proj", &l.mlp.up_proj),
                ("mlp.down_proj", &l.mlp.down_proj),
            ] {
                let lin = lin.clone().merged();
                out.push((format!("{p}.{name}.weight"), lin.weight().into_data()));
                if let Some(bias) = lin.bias() {
                    out.push((format!("{p}.{name}.bias"), bias.into_data()));
                }
            }
            for (name, norm) in [
                ("input_layernorm", &l.input_layernorm),
                ("post_attention_layernorm", &l.post_attention_layernorm),
            ] {
                out.push((format!("{p}.{name}.weight"), norm.weight().into_data()));
            }
        }
        out.push((
            "model.norm.weight".to_string(),
            self.norm.weight().into_data(),
        ));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.val().into_data()));
        }
        out
    }

    /// Writes a directory transformers loads with `Qwen2ForCausalLM.from_pretrained`:
    /// `config.json` (this model's config, `architectures` and `model_type` set) and
    /// `model.safetensors` in `dtype`. Existing files are replaced atomically.
    pub fn save_pretrained(&self, dir: &Path, dtype: Dtype) -> Result<(), Error> {
        let io = |file: &Path, source: std::io::Error| {
            Error::Checkpoint(omniopsd_checkpoint::Error::Io {
                file: file.to_path_buf(),
                source,
            })
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut json = serde_json::to_value(&self.config).map_err(|e| Error::Config {
            file: dir.join("config.json"),
            key: String::new(),
            reason: e.to_string(),
        })?;
        if let Some(obj) = json.as_object_mut() {
            obj.insert(
                "architectures".into(),
                serde_json::json!(["Qwen2ForCausalLM"]),
            );
            obj.insert("model_type".into(), serde_json::json!("qwen2"));
            let name = match dtype {
                Dtype::F32 => "float32",
                Dtype::Bf16 => "bfloat16",
                Dtype::F16 => "float16",
            };
            obj.insert("torch_dtype".into(), serde_json::json!(name));
        }
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        omniopsd_checkpoint::atomic::write_atomic(&dir.join("config.json"), text.as_bytes())
            .map_err(|e| io(&e.path, e.source))?;
        omniopsd_checkpoint::save_safetensors::<B>(
            &dir.join("model.safetensors"),
            &self.export_tensors(),
            dtype,
        )?;
        Ok(())
    }
}

/// `[B, 1, T, S]` (`S = cached + T`): true where query `i` of sequence `b`, at sequence
/// index `cached + i`, is a real position and key `j < pads[b]` is padding.
fn padding_mask<B: Backend>(
    pads: &[usize],
    batch: usize,
    t: usize,
    cached: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let s = cached + t;
    let mut data = Vec::with_capacity(batch * t * s);
    for b in 0..batch {
        let pad = pads.get(b).copied().unwrap_or(0);
        for i in 0..t {
            let real_query = cached + i >= pad;
            data.extend((0..s).map(|j| real_query && j < pad));
        }
    }
    Tensor::from_data(TensorData::new(data, [batch, 1, t, s]), device)
}

/// Text position ids `[3, B, T]`: `start..start + T` in all three rows.
pub fn text_positions<B: Backend>(
    start: i64,
    batch: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 3, Int> {
    let row: Vec<i64> = (start..start + len as i64).collect();
    let data: Vec<i64> = std::iter::repeat_n(row, 3 * batch).flatten().collect();
    Tensor::from_data(TensorData::new(data, [3, batch, len]), device)
}

impl Qwen2Config {
    /// Deserializes and validates the config object `view` (the root of a `Qwen2ForCausalLM`
    /// `config.json`, or a thinker's `text_config`); errors name the file and the key with its
    /// path in the file.
    pub fn from_config(view: &ConfigView) -> Result<Self, Error> {
        let config: Self = view.deserialize()?;
        config
            .validate()
            .map_err(|(key, reason)| view.error(key, reason))?;
        Ok(config)
    }
}
