//! Supervised fine-tuning steps (the warm-up, and the `label-sft` ablation): token-level
//! cross-entropy of a target answer after a prompt, AdamW, the same schedule and clipping as
//! the OPSD trainer, and a state that resumes bit-identically.

use anyhow::{ensure, Result};
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use omniopsd_core::fused::lm_logits;
use omniopsd_core::step::{clip_global_grad_norm, AdamWSettings, LrSchedule};
use omniopsd_core::PolicyModel;

/// The optimizer of an SFT phase.
pub type SftOptimizer<B, M> = OptimizerAdaptor<AdamW, M, B>;
/// Its saved state.
pub type SftOptimizerRecord<B, M> = <SftOptimizer<B, M> as Optimizer<M, B>>::Record;

/// One supervised example: the prompt and the target tokens that follow it.
pub struct Example<'a, P> {
    pub prompt: &'a P,
    pub target: &'a [u32],
}

/// Hyper-parameters of an SFT phase.
#[derive(Clone, Debug)]
pub struct SftConfig {
    pub learning_rate: f64,
    pub schedule: LrSchedule,
    pub adamw: AdamWSettings,
    pub max_grad_norm: Option<f32>,
}

/// What one update measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SftMetrics {
    /// Mean negative log-likelihood per target token.
    pub loss: f32,
    /// Pre-clip global gradient norm.
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Whether the update was skipped for a non-finite loss or gradient.
    pub skipped: bool,
}

/// An SFT phase in progress.
pub struct SftTrainer<B: AutodiffBackend, M: AutodiffModule<B>> {
    pub model: M,
    optimizer: SftOptimizer<B, M>,
    config: SftConfig,
    /// Updates applied so far.
    pub steps: u64,
}

impl<B, M> SftTrainer<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + PolicyModel<B>,
{
    /// A fresh phase.
    pub fn new(model: M, config: SftConfig) -> Self {
        Self {
            optimizer: Self::optimizer(&config),
            model,
            config,
            steps: 0,
        }
    }

    /// Continues a phase from its saved optimizer state and step count.
    pub fn resume(
        model: M,
        config: SftConfig,
        record: SftOptimizerRecord<B, M>,
        steps: u64,
    ) -> Self {
        Self {
            optimizer: Self::optimizer(&config).load_record(record),
            model,
            config,
            steps,
        }
    }

    fn optimizer(config: &SftConfig) -> SftOptimizer<B, M> {
        config.adamw.init()
    }

    /// The optimizer state to save.
    pub fn optimizer_record(&self) -> SftOptimizerRecord<B, M> {
        self.optimizer.to_record()
    }

    /// One update on `batch`: the loss is the mean NLL over every target token of the batch,
    /// `−(1/N) Σ_i Σ_t log p(y_it | prompt_i, y_i<t)`, accumulated example by example.
    pub fn step(&mut self, batch: &[Example<'_, M::Prompt>]) -> Result<SftMetrics> {
        ensure!(!batch.is_empty(), "an SFT step needs at least one example");
        let total: usize = batch.iter().map(|e| e.target.len()).sum();
        ensure!(total > 0, "every SFT target in the batch is empty");
        let lr = self.config.learning_rate * self.config.schedule.factor(self.steps);
        let device = self.model.lm_head().device();
        let mut accumulator = GradientsAccumulator::<M>::new();
        let mut loss_sum = 0.0f64;
        for example in batch.iter().filter(|e| !e.target.is_empty()) {
            let r = example.target.len();
            let ids: Vec<i64> = example.target.iter().map(|&t| t as i64).collect();
            let target = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, r]), &device);
            let hidden = self.model.response_hidden(example.prompt, target.clone());
            let h = hidden.dims()[2];
            let logits = lm_logits(hidden.reshape([r, h]), self.model.lm_head());
            let nll = log_softmax(logits, 1)
                .gather(1, target.reshape([r, 1]))
                .sum()
                .neg()
                .div_scalar(total as f64);
            let value: f32 = nll.clone().into_scalar().elem();
            loss_sum += f64::from(value);
            if !value.is_finite() {
                return Ok(SftMetrics {
                    loss: value,
                    grad_norm: f32::NAN,
                    lr,
                    skipped: true,
                });
            }
            let grads = GradientsParams::from_grads(nll.backward(), &self.model);
            accumulator.accumulate(&self.model, grads);
        }
        let (grads, norm) = clip_global_grad_norm::<B, M>(
            &self.model,
            accumulator.grads(),
            self.config.max_grad_norm,
        );
        let metrics = SftMetrics {
            loss: loss_sum as f32,
            grad_norm: norm,
            lr,
            skipped: !norm.is_finite(),
        };
        if metrics.skipped {
            return Ok(metrics);
        }
        self.model = self.optimizer.step(lr, self.model.clone(), grads);
        self.steps += 1;
        Ok(metrics)
    }
}
