//! The Qwen2.5-Omni vision tower (transformers `Qwen2_5OmniVisionEncoder`, the Qwen2.5-VL ViT).
//!
//! For `N` patches of one or more images / videos with grids `[t, h, w]`:
//! 1. `x = patches · W_patchᵀ` (the Conv3d with stride = kernel is a linear map);
//! 2. patches are regrouped window by window: merged 2×2 tokens are tiled into windows of
//!    `window_size / (merge · patch)` merged tokens per side (per frame), and the sequence is
//!    reordered so each window is contiguous;
//! 3. rotary positions on 2-D coordinates: for patch row `r`, column `c` and
//!    `θ_j = θ^{−2j/(d_h/2)}`, `j < d_h/4`, the angle vector is `[r·θ, c·θ, r·θ, c·θ]` and
//!    `q ← q cos + rotate_half(q) sin` (likewise `k`);
//! 4. `depth` blocks `x += Attn(RMS(x))`, `x += W_d(SiLU(W_g RMS(x)) ⊙ W_u RMS(x))`;
//!    attention stays within a window, except in `fullatt_block_indexes` blocks where it
//!    spans one whole frame;
//! 5. the merger: `RMS(x)`, 2×2 neighbours concatenated, `Linear → GELU → Linear` into
//!    `out_hidden_size`, then the window order is undone.

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, silu, softmax};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use omniopsd_checkpoint::{ConfigView, Weights};
use serde::Deserialize;

use omniopsd_nn::{Linear, RmsNorm};

use crate::{Error, PixelPatches};

/// ε of every RMSNorm in the tower: transformers hard-codes `Qwen2_5OmniRMSNorm(.., eps=1e-6)`
/// in the blocks and the merger, and `vision_config` has no key for it.
const RMS_NORM_EPS: f64 = 1e-6;

/// `rope_parameters` of the vision config (only the base is used: the rope is axial).
#[derive(Clone, Debug, Deserialize)]
pub struct VisionRopeParameters {
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f64,
}

/// Serde mirror of the checkpoint's `vision_config` (keys verbatim, HF defaults).
#[derive(Clone, Debug, Deserialize)]
pub struct VisionEncoderConfig {
    #[serde(default = "defaults::depth")]
    pub depth: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::spatial_merge_size")]
    pub spatial_merge_size: usize,
    #[serde(default = "defaults::temporal_patch_size")]
    pub temporal_patch_size: usize,
    #[serde(default = "defaults::window_size")]
    pub window_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub out_hidden_size: usize,
    #[serde(default = "defaults::fullatt_block_indexes")]
    pub fullatt_block_indexes: Vec<usize>,
    #[serde(default)]
    pub rope_parameters: Option<VisionRopeParameters>,
}

mod defaults {
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn depth() -> usize {
        32
    }
    pub fn hidden_size() -> usize {
        3584
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
    pub fn intermediate_size() -> usize {
        3420
    }
    pub fn num_heads() -> usize {
        16
    }
    pub fn in_channels() -> usize {
        3
    }
    pub fn patch_size() -> usize {
        14
    }
    pub fn spatial_merge_size() -> usize {
        2
    }
    pub fn temporal_patch_size() -> usize {
        2
    }
    pub fn window_size() -> usize {
        112
    }
    pub fn fullatt_block_indexes() -> Vec<usize> {
        vec![7, 15, 23, 31]
    }
}

impl VisionEncoderConfig {
    /// Reads the tower's config object (a thinker's `vision_config`); errors name the key
    /// with its path in `config.json`.
    pub fn from_config(view: &ConfigView) -> Result<Self, Error> {
        Ok(view.deserialize()?)
    }

    /// Values per patch row: `in_channels · temporal_patch_size · patch_size²`.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map_or_else(defaults::rope_theta, |r| r.rope_theta)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.hidden_act != "silu" {
            return Err(Error::Config {
                field: "hidden_act",
                reason: format!("only \"silu\" is supported, found {:?}", self.hidden_act),
            });
        }
        if self.num_heads == 0
            || self.hidden_size % self.num_heads != 0
            || (self.hidden_size / self.num_heads) % 4 != 0
        {
            return Err(Error::Config {
                field: "num_heads",
                reason: format!(
                    "hidden_size {} must split into {} heads of a multiple of 4 dims (2-D rope)",
                    self.hidden_size, self.num_heads
                ),
            });
        }
        // Products of the file's sizes, overflow checked: a wrapped product could pass the
        // checks below and the tensor shapes, and index past a buffer later.
        let overflow = |what: &str| Error::Config {
            field: "spatial_merge_size",
            reason: format!("{what} overflows with the sizes of vision_config"),
        };
        let merge = self.spatial_merge_size;
        let unit = merge
            .checked_mul(self.patch_size)
            .ok_or_else(|| overflow("spatial_merge_size · patch_size"))?;
        merge
            .checked_mul(merge)
            .and_then(|m2| m2.checked_mul(self.hidden_size))
            .ok_or_else(|| overflow("hidden_size · spatial_merge_size²"))?;
        [self.in_channels, self.temporal_patch_size, self.patch_size]
            .iter()
            .try_fold(self.patch_size, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| overflow("in_channels · temporal_patch_size · patch_size²"))?;
        if unit == 0 || self.window_size < unit || self.window_size % unit != 0 {
            return Err(Error::Config {
                field: "window_size",
                reason: format!(
                    "must be a positive multiple of spatial_merge_size · patch_size = {unit}, found {}",
                    self.window_size
                ),
            });
        }
        if let Some(&bad) = self
            .fullatt_block_indexes
            .iter()
            .find(|&&i| i >= self.depth)
        {
            return Err(Error::Config {
                field: "fullatt_block_indexes",
                reason: format!("index {bad} is not below depth {}", self.depth),
            });
        }
        Ok(())
    }
}

#[derive(Module, Debug)]
struct Attention<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    proj: Linear<B>,
    num_heads: usize,
}

/// Rows of the (window-ordered) sequence that attend to each other, bucketed by length so
/// equal-length segments run as one batch.
#[derive(Clone, Debug)]
struct Segments {
    /// (segment length, row indices of all segments of that length, concatenated).
    groups: Vec<(usize, Vec<i64>)>,
    /// Inverse of the concatenated group rows: restores sequence order.
    restore: Vec<i64>,
}

impl Segments {
    fn new(bounds: &[(usize, usize)]) -> Self {
        let mut groups: Vec<(usize, Vec<i64>)> = Vec::new();
        for &(start, len) in bounds {
            let rows = (start..start + len).map(|r| r as i64);
            match groups.iter_mut().find(|g| g.0 == len) {
                Some(g) => g.1.extend(rows),
                None => groups.push((len, rows.collect())),
            }
        }
        let n: usize = bounds.iter().map(|b| b.1).sum();
        let mut restore = vec![0i64; n];
        for (i, &row) in groups.iter().flat_map(|g| g.1.iter()).enumerate() {
            restore[row as usize] = i as i64;
        }
        Self { groups, restore }
    }
}

impl<B: Backend> Attention<B> {
    fn load(w: &Weights, d: usize, heads: usize, device: &B::Device) -> Result<Self, Error> {
        Ok(Self {
            q: Linear::load(&w.pp("q"), d, d, true, device)?,
            k: Linear::load(&w.pp("k"), d, d, true, device)?,
            v: Linear::load(&w.pp("v"), d, d, true, device)?,
            proj: Linear::load(&w.pp("proj"), d, d, true, device)?,
            num_heads: heads,
        })
    }

    /// `x: [N, D]`, `cos`/`sin: [N, 1, d_h]`.
    fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        segments: &Segments,
    ) -> Tensor<B, 2> {
        let [n, d] = x.dims();
        let h = self.num_heads;
        let hd = d / h;
        let device = x.device();
        let rope = |t: Tensor<B, 3>| {
            let x1 = t.clone().narrow(2, 0, hd / 2);
            let x2 = t.clone().narrow(2, hd / 2, hd / 2);
            let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
            t * cos.clone() + rotated * sin.clone()
        };
        let q = rope(self.q.forward(x.clone()).reshape([n, h, hd]));
        let k = rope(self.k.forward(x.clone()).reshape([n, h, hd]));
        let v = self.v.forward(x).reshape([n, h, hd]);
        let scale = (hd as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(segments.groups.len());
        for (len, rows) in &segments.groups {
            let g = rows.len() / len;
            let idx = int_tensor::<B>(rows.clone(), &device);
            let take = |t: &Tensor<B, 3>| {
                t.clone()
                    .select(0, idx.clone())
                    .reshape([g, *len, h, hd])
                    .swap_dims(1, 2)
            };
            let (qg, kg, vg) = (take(&q), take(&k), take(&v));
            let att = softmax(qg.matmul(kg.transpose()) * scale, 3).matmul(vg);
            outs.push(att.swap_dims(1, 2).reshape([g * len, d]));
        }
        let out =
            Tensor::cat(outs, 0).select(0, int_tensor::<B>(segments.restore.clone(), &device));
        self.proj.forward(out)
    }
}

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
}

#[derive(Module, Debug)]
struct Block<B: Backend> {
    norm1: RmsNorm<B>,
    norm2: RmsNorm<B>,
    attn: Attention<B>,
    mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    fn load(w: &Weights, cfg: &VisionEncoderConfig, device: &B::Device) -> Result<Self, Error> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let m = w.pp("mlp");
        Ok(Self {
            norm1: RmsNorm::load(&w.pp("norm1"), d, RMS_NORM_EPS, device)?,
            norm2: RmsNorm::load(&w.pp("norm2"), d, RMS_NORM_EPS, device)?,
            attn: Attention::load(&w.pp("attn"), d, cfg.num_heads, device)?,
            mlp: Mlp {
                gate_proj: Linear::load(&m.pp("gate_proj"), d, i, true, device)?,
                up_proj: Linear::load(&m.pp("up_proj"), d, i, true, device)?,
                down_proj: Linear::load(&m.pp("down_proj"), i, d, true, device)?,
            },
        })
    }

    fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        segments: &Segments,
    ) -> Tensor<B, 2> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), cos, sin, segments);
        let y = self.norm2.forward(x.clone());
        let ff = self
            .mlp
            .down_proj
            .forward(silu(self.mlp.gate_proj.forward(y.clone())) * self.mlp.up_proj.forward(y));
        x + ff
    }
}

#[derive(Module, Debug)]
struct Merger<B: Backend> {
    ln_q: RmsNorm<B>,
    mlp_0: Linear<B>,
    mlp_2: Linear<B>,
}

/// The Qwen2.5-Omni vision tower; field names follow `thinker.visual.*`.
#[derive(Module, Debug)]
pub struct VisionEncoder<B: Backend> {
    patch_embed: Param<Tensor<B, 2>>,
    blocks: Vec<Block<B>>,
    merger: Merger<B>,
    hidden_size: usize,
    num_heads: usize,
    patch_dim: usize,
    merge_size: usize,
    window_merged: usize,
    full_attention: Vec<bool>,
    out_hidden_size: usize,
    rope_theta: f64,
}

/// Window layout of a batch of grids.
struct Layout {
    /// Patch rows in window order (`window_index` expanded to patches).
    patch_order: Vec<i64>,
    /// Merged-token order undoing the windowing (`argsort(window_index)`).
    merged_restore: Vec<i64>,
    windows: Segments,
    frames: Segments,
    /// (row, column) of every patch, in window order.
    coords: Vec<(usize, usize)>,
}

impl<B: Backend> VisionEncoder<B> {
    /// Every linear layer passed through `f` with its name below the tower, as transformers
    /// names it (`blocks.0.attn.q`, `blocks.0.mlp.gate_proj`, `merger.mlp.0`): how LoRA
    /// adapters are put on the tower.
    pub fn map_linears<E>(
        mut self,
        mut f: impl FnMut(&str, Linear<B>) -> Result<Linear<B>, E>,
    ) -> Result<Self, E> {
        let blocks = std::mem::take(&mut self.blocks);
        for (i, mut b) in blocks.into_iter().enumerate() {
            let p = |name: &str| format!("blocks.{i}.{name}");
            let a = b.attn;
            b.attn = Attention {
                q: f(&p("attn.q"), a.q)?,
                k: f(&p("attn.k"), a.k)?,
                v: f(&p("attn.v"), a.v)?,
                proj: f(&p("attn.proj"), a.proj)?,
                num_heads: a.num_heads,
            };
            let m = b.mlp;
            b.mlp = Mlp {
                gate_proj: f(&p("mlp.gate_proj"), m.gate_proj)?,
                up_proj: f(&p("mlp.up_proj"), m.up_proj)?,
                down_proj: f(&p("mlp.down_proj"), m.down_proj)?,
            };
            self.blocks.push(b);
        }
        self.merger.mlp_0 = f("merger.mlp.0", self.merger.mlp_0)?;
        self.merger.mlp_2 = f("merger.mlp.2", self.merger.mlp_2)?;
        Ok(self)
    }

    /// Loads the tower from `w`, a view at the tower's own tensors (a thinker's `visual`).
    pub fn load(w: &Weights, cfg: &VisionEncoderConfig, device: &B::Device) -> Result<Self, Error> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let unit = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let patch = w.tensor::<B, 5>(
            "patch_embed.proj.weight",
            [
                d,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ],
            device,
        )?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::load(&w.pp("blocks").pp(i), cfg, device))
            .collect::<Result<Vec<_>, _>>()?;
        let m = w.pp("merger");
        Ok(Self {
            patch_embed: Param::from_tensor(patch.reshape([d, cfg.patch_dim()])),
            blocks,
            merger: Merger {
                ln_q: RmsNorm::load(&m.pp("ln_q"), d, RMS_NORM_EPS, device)?,
                mlp_0: Linear::load(&m.pp("mlp").pp(0), d * unit, d * unit, true, device)?,
                mlp_2: Linear::load(
                    &m.pp("mlp").pp(2),
                    d * unit,
                    cfg.out_hidden_size,
                    true,
                    device,
                )?,
            },
            hidden_size: d,
            num_heads: cfg.num_heads,
            patch_dim: cfg.patch_dim(),
            merge_size: cfg.spatial_merge_size,
            window_merged: cfg.window_size / cfg.spatial_merge_size / cfg.patch_size,
            full_attention: (0..cfg.depth)
                .map(|i| cfg.fullatt_block_indexes.contains(&i))
                .collect(),
            out_hidden_size: cfg.out_hidden_size,
            rope_theta: cfg.rope_theta(),
        })
    }

    /// The hidden size the merger projects into (the thinker's).
    pub fn output_dim(&self) -> usize {
        self.out_hidden_size
    }

    /// Rows the tower emits for a grid: `t · h · w / merge²` (the placeholder count).
    pub fn output_rows(&self, grid_thw: [usize; 3]) -> usize {
        grid_thw[0] * grid_thw[1] * grid_thw[2] / (self.merge_size * self.merge_size)
    }

    /// Encodes one preprocessed image or video: `[output_rows(grid), out_hidden_size]`.
    pub fn encode(
        &self,
        patches: &PixelPatches,
        device: &B::Device,
    ) -> Result<Tensor<B, 2>, Error> {
        if patches.patch_dim == 0 || patches.data.len() % patches.patch_dim != 0 {
            return Err(Error::InputShape {
                what: "patch data length",
                expected: format!("a multiple of patch_dim = {}", patches.patch_dim),
                found: patches.data.len().to_string(),
            });
        }
        let rows = patches.data.len() / patches.patch_dim;
        let x = Tensor::from_data(
            TensorData::new(patches.data.clone(), [rows, patches.patch_dim]),
            device,
        );
        self.forward(x, &[patches.grid_thw])
    }

    /// transformers' `visual(pixel_values, grid_thw)`: the patches of several images / videos
    /// concatenated, `[Σ t·h·w, patch_dim]`; returns their merged tokens concatenated.
    pub fn forward(
        &self,
        pixels: Tensor<B, 2>,
        grids: &[[usize; 3]],
    ) -> Result<Tensor<B, 2>, Error> {
        let [n, dim] = pixels.dims();
        if dim != self.patch_dim {
            return Err(Error::InputShape {
                what: "values per patch",
                expected: self.patch_dim.to_string(),
                found: dim.to_string(),
            });
        }
        let m = self.merge_size;
        if grids.is_empty()
            || grids
                .iter()
                .any(|g| g.contains(&0) || g[1] % m != 0 || g[2] % m != 0)
        {
            return Err(Error::InputShape {
                what: "grid_thw",
                expected: format!("non-empty [t, h, w] with h and w multiples of {m}"),
                found: format!("{grids:?}"),
            });
        }
        let expected: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if expected != n {
            return Err(Error::InputShape {
                what: "patch rows vs Σ t·h·w",
                expected: expected.to_string(),
                found: n.to_string(),
            });
        }
        let device = pixels.device();
        let layout = self.layout(grids);
        let (cos, sin) = self.rotary(&layout.coords, &device);

        let x = pixels.matmul(self.patch_embed.val().transpose());
        let mut x = x.select(0, int_tensor::<B>(layout.patch_order.clone(), &device));
        for (block, &full) in self.blocks.iter().zip(&self.full_attention) {
            let segments = if full {
                &layout.frames
            } else {
                &layout.windows
            };
            x = block.forward(x, &cos, &sin, segments);
        }
        let unit = m * m;
        let merged = self
            .merger
            .ln_q
            .forward(x)
            .reshape([n / unit, self.hidden_size * unit]);
        let out = self
            .merger
            .mlp_2
            .forward(gelu(self.merger.mlp_0.forward(merged)));
        Ok(out.select(0, int_tensor::<B>(layout.merged_restore, &device)))
    }

    /// `get_vision_window_index` plus the per-frame segments and patch coordinates.
    fn layout(&self, grids: &[[usize; 3]]) -> Layout {
        let m = self.merge_size;
        let unit = m * m;
        let vw = self.window_merged;
        let mut window_index: Vec<usize> = Vec::new();
        let mut window_bounds = Vec::new();
        let mut frame_bounds = Vec::new();
        let mut merged_coords: Vec<(usize, usize)> = Vec::new();
        let mut merged_offset = 0;
        for &[t, h, w] in grids {
            let (lh, lw) = (h / m, w / m);
            // The reference pads by a whole window when the grid is already a multiple; the
            // extra windows are empty and contribute nothing.
            let (nwh, nww) = ((lh + vw - lh % vw) / vw, (lw + vw - lw % vw) / vw);
            for ti in 0..t {
                frame_bounds.push((merged_offset * unit + ti * h * w, h * w));
                for wh in 0..nwh {
                    for ww in 0..nww {
                        let start = window_index.len();
                        for i in 0..vw {
                            for j in 0..vw {
                                let (r, c) = (wh * vw + i, ww * vw + j);
                                if r < lh && c < lw {
                                    window_index.push(merged_offset + ti * lh * lw + r * lw + c);
                                    merged_coords.push((r, c));
                                }
                            }
                        }
                        let len = window_index.len() - start;
                        if len > 0 {
                            window_bounds.push((start * unit, len * unit));
                        }
                    }
                }
            }
            merged_offset += t * lh * lw;
        }
        let mut merged_restore = vec![0i64; window_index.len()];
        for (pos, &idx) in window_index.iter().enumerate() {
            merged_restore[idx] = pos as i64;
        }
        let mut patch_order = Vec::with_capacity(window_index.len() * unit);
        let mut coords = Vec::with_capacity(window_index.len() * unit);
        for (&idx, &(r, c)) in window_index.iter().zip(&merged_coords) {
            for u in 0..unit {
                patch_order.push((idx * unit + u) as i64);
                coords.push((r * m + u / m, c * m + u % m));
            }
        }
        Layout {
            patch_order,
            merged_restore,
            windows: Segments::new(&window_bounds),
            frames: Segments::new(&frame_bounds),
            coords,
        }
    }

    /// `cos`, `sin` of the 2-D rotary angles `[r·θ, c·θ, r·θ, c·θ]`, `[N, 1, d_h]`, computed in
    /// f32 as the reference (`θ_j = 1 / theta^{2j / (d_h/2)}`).
    fn rotary(
        &self,
        coords: &[(usize, usize)],
        device: &B::Device,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let hd = self.hidden_size / self.num_heads;
        let spatial = hd / 2;
        let inv: Vec<f32> = (0..spatial / 2)
            .map(|j| 1.0 / (self.rope_theta as f32).powf((2 * j) as f32 / spatial as f32))
            .collect();
        let n = coords.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * hd), Vec::with_capacity(n * hd));
        for &(r, c) in coords {
            let angles: Vec<f32> = inv
                .iter()
                .map(|f| r as f32 * f)
                .chain(inv.iter().map(|f| c as f32 * f))
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [n, 1, hd]), device),
            Tensor::from_data(TensorData::new(sin, [n, 1, hd]), device),
        )
    }
}

fn int_tensor<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}
