//! Shared pieces of the omniopsd benchmarks: a counting global allocator for peak-memory
//! measurement and the two ways of computing the distillation loss with its gradients.
//!
//! The allocator type lives here; each bench binary installs it with `#[global_allocator]`.
//! Besides: [`flops`] (model FLOPs of an OPSD step, for FLOP/s and MFU), [`init`] (a random
//! Qwen2 checkpoint from a `config.json`) and [`Bench`], the backend the examples run on.

pub mod flops;
pub mod init;
pub mod plan;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor, TensorData};
use omniopsd_core::divergence::{loss_from_logits, LossConfig};
use omniopsd_core::fused::{fused_loss_and_grads, ResponseBatch, TeacherInput};

/// CPU backend of the benchmarks.
pub type Cpu = NdArray<f32>;
/// Its autodiff wrapper (the naive path).
pub type Train = Autodiff<Cpu>;

/// The backend the examples run on, by cargo feature: Burn's CUDA backend with bf16 as its
/// float type (`cuda`), Flex (`flex`), else NdArray; f32 on the CPU.
#[cfg(feature = "cuda")]
pub type Bench = burn::backend::Cuda<burn::tensor::bf16>;
/// The backend the examples run on, by cargo feature: Burn's CUDA backend with bf16 as its
/// float type (`cuda`), Flex (`flex`), else NdArray; f32 on the CPU.
#[cfg(all(feature = "flex", not(feature = "cuda")))]
pub type Bench = burn::backend::Flex<f32>;
/// The backend the examples run on, by cargo feature: Burn's CUDA backend with bf16 as its
/// float type (`cuda`), Flex (`flex`), else NdArray; f32 on the CPU.
#[cfg(not(any(feature = "flex", feature = "cuda")))]
pub type Bench = Cpu;

/// The backend of mixed-precision runs (`train_step --precision bf16-mixed`): f32 master
/// weights, products in bf16 by the models' compute type. On CUDA that is `Cuda<f32>`; the
/// CPU backends are f32 already.
#[cfg(feature = "cuda")]
pub type BenchMaster = burn::backend::Cuda<f32>;
/// The backend of mixed-precision runs (`train_step --precision bf16-mixed`): f32 master
/// weights, products in bf16 by the models' compute type. On CUDA that is `Cuda<f32>`; the
/// CPU backends are f32 already.
#[cfg(not(feature = "cuda"))]
pub type BenchMaster = Bench;

/// Wraps the system allocator, tracking live bytes and their high-water mark.
pub struct CountingAllocator {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl CountingAllocator {
    /// A fresh counter (for a `static`).
    pub const fn new() -> Self {
        Self {
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Bytes currently allocated.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Restarts the high-water mark at the current live bytes.
    pub fn reset_peak(&self) {
        self.peak.store(self.live(), Ordering::Relaxed);
    }

    /// Highest live bytes since the last [`Self::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    fn grew(&self, bytes: usize) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }
}

impl Default for CountingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the counters are only bookkeeping.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            self.grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            self.grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        self.live.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            self.live.fetch_sub(layout.size(), Ordering::Relaxed);
            self.grew(new_size);
        }
        new
    }
}

/// `n` OPSD episodes with distinct deterministic prompts: a student prompt of `prompt` token
/// ids and a teacher prompt of that plus `privileged` more, ids in `1..vocab` by the formula
/// `benches/compare/train_step.py` uses (`1 + (i · 7919) mod (vocab − 1)`, `i` counting on
/// from episode to episode), so both sides score the same tokens.
pub fn episodes(
    n: usize,
    prompt: usize,
    privileged: usize,
    vocab: usize,
) -> Vec<omniopsd_core::step::Episode<omniopsd_decoder::TokenPrompt>> {
    let ids = |start: usize, len: usize| -> Vec<u32> {
        (start..start + len)
            .map(|i| (1 + (i * 7919) % (vocab - 1)) as u32)
            .collect()
    };
    (0..n)
        .map(|e| {
            let start = e * (prompt + privileged);
            let student = ids(start, prompt);
            let mut teacher = student.clone();
            teacher.extend(ids(start + prompt, privileged));
            omniopsd_core::step::Episode {
                student: omniopsd_decoder::TokenPrompt::new(student),
                teacher: omniopsd_decoder::TokenPrompt::new(teacher),
            }
        })
        .collect()
}

/// The `--flag value` pairs of this process's command line, in order (the examples' syntax).
pub fn flag_values() -> Result<Vec<(String, String)>, String> {
    let mut it = std::env::args().skip(1);
    let mut pairs = Vec::new();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag}: missing value"))?;
        pairs.push((flag, value));
    }
    Ok(pairs)
}

/// `value` of `flag` as a count, raised to at least `min`.
pub fn count(flag: &str, value: &str, min: usize) -> Result<usize, String> {
    value
        .parse::<usize>()
        .map(|n| n.max(min))
        .map_err(|e| format!("{flag} {value}: {e}"))
}

/// One benchmark problem: student and teacher hidden states `[N, R, H]` sharing the LM head
/// `[V, H]` (self-distillation), with a response batch.
#[derive(Clone)]
pub struct Problem<B: Backend = Cpu> {
    /// Student hidden states.
    pub hidden: Tensor<B, 3>,
    /// Teacher hidden states.
    pub teacher_hidden: Tensor<B, 3>,
    /// LM head.
    pub weight: Tensor<B, 2>,
    /// Tokens, mask, behaviour log-probs.
    pub batch: ResponseBatch<B>,
}

impl<B: Backend> Problem<B> {
    /// Random problem with `n·r` rows, hidden size `h`, vocabulary `v`; the last quarter of
    /// each sequence is padding.
    pub fn random(n: usize, r: usize, h: usize, v: usize) -> Self {
        use burn::tensor::Distribution;
        let device = Default::default();
        let scale = 1.0 / (h as f64).sqrt();
        let hidden = Tensor::random([n, r, h], Distribution::Normal(0.0, 1.0), &device);
        let teacher_hidden = Tensor::random([n, r, h], Distribution::Normal(0.0, 1.0), &device);
        let weight = Tensor::random([v, h], Distribution::Normal(0.0, 2.0 * scale), &device);
        let tokens =
            Tensor::<B, 2, Int>::random([n, r], Distribution::Uniform(0.0, v as f64), &device);
        Self::assemble(hidden, teacher_hidden, weight, tokens)
    }

    /// The same problem as `benches/compare/loss.py` builds, with no random generator to
    /// agree on: element `i` of a tensor is `a · sin(c · i + φ)` computed in f64 (student
    /// hidden: c = 0.7071, φ = 0, a = 1; teacher hidden: c = 0.5773, φ = 1, a = 1; head:
    /// c = 0.3183, φ = 2, a = 2/√h), token `k` is `(k · 7919) mod v`, and the last quarter
    /// of each sequence is padding.
    pub fn deterministic(n: usize, r: usize, h: usize, v: usize) -> Self {
        let device = Default::default();
        let wave = |len: usize, c: f64, phase: f64, a: f64| -> Vec<f32> {
            (0..len)
                .map(|i| (a * (c * i as f64 + phase).sin()) as f32)
                .collect()
        };
        let scale = 2.0 / (h as f64).sqrt();
        let hidden = Tensor::from_data(
            TensorData::new(wave(n * r * h, 0.7071, 0.0, 1.0), [n, r, h]),
            &device,
        );
        let teacher_hidden = Tensor::from_data(
            TensorData::new(wave(n * r * h, 0.5773, 1.0, 1.0), [n, r, h]),
            &device,
        );
        let weight = Tensor::from_data(
            TensorData::new(wave(v * h, 0.3183, 2.0, scale), [v, h]),
            &device,
        );
        let tokens: Vec<i64> = (0..n * r).map(|k| ((k * 7919) % v) as i64).collect();
        let tokens = Tensor::from_data(TensorData::new(tokens, [n, r]), &device);
        Self::assemble(hidden, teacher_hidden, weight, tokens)
    }

    fn assemble(
        hidden: Tensor<B, 3>,
        teacher_hidden: Tensor<B, 3>,
        weight: Tensor<B, 2>,
        tokens: Tensor<B, 2, Int>,
    ) -> Self {
        let [n, r, _] = hidden.dims();
        let device = hidden.device();
        let valid = r - r / 4;
        let mask = Tensor::<B, 1, Int>::arange(0..r as i64, &device)
            .lower_elem(valid as i64)
            .float()
            .unsqueeze_dim::<2>(0)
            .repeat_dim(0, n);
        Self {
            hidden,
            teacher_hidden,
            weight,
            batch: ResponseBatch {
                tokens,
                mask,
                behaviour_logp: Tensor::zeros([n, r], &device),
            },
        }
    }
}

/// Naive path: full `[N·R, V]` logits for student and teacher, loss from logits, Burn
/// autodiff backward. Returns the loss and the gradients w.r.t. hidden and weight.
pub fn naive<B: Backend>(
    problem: &Problem<B>,
    cfg: &LossConfig,
) -> (f32, Tensor<B, 3>, Tensor<B, 2>) {
    let hidden = Tensor::<Autodiff<B>, 3>::from_inner(problem.hidden.clone()).require_grad();
    let weight = Tensor::<Autodiff<B>, 2>::from_inner(problem.weight.clone()).require_grad();
    let student_logits = hidden
        .clone()
        .matmul(weight.clone().transpose().unsqueeze_dim::<3>(0));
    let teacher_logits = problem
        .teacher_hidden
        .clone()
        .matmul(problem.weight.clone().transpose().unsqueeze_dim::<3>(0));
    let loss = loss_from_logits(
        student_logits,
        Tensor::from_inner(teacher_logits),
        Tensor::from_inner(problem.batch.tokens.clone()),
        Tensor::from_inner(problem.batch.mask.clone()),
        Tensor::from_inner(problem.batch.behaviour_logp.clone()),
        cfg,
    );
    let grads = loss.backward();
    let grad_hidden = hidden.grad(&grads).expect("hidden requires grad");
    let grad_weight = weight.grad(&grads).expect("weight requires grad");
    (loss.into_scalar().elem(), grad_hidden, grad_weight)
}

/// Chunked path: [`fused_loss_and_grads`] with the teacher given as hidden states + LM head.
pub fn chunked<B: Backend>(
    problem: &Problem<B>,
    cfg: &LossConfig,
    chunk_rows: usize,
) -> (f32, Tensor<B, 3>, Tensor<B, 2>) {
    let out = fused_loss_and_grads(
        problem.hidden.clone(),
        problem.weight.clone(),
        TeacherInput::Hidden {
            hidden: problem.teacher_hidden.clone(),
            weight: problem.weight.clone(),
        },
        &problem.batch,
        cfg,
        chunk_rows,
    );
    (out.stats.loss, out.grad_hidden, out.grad_weight)
}
