//! Data parallelism: the same step on several devices, each on its own share of the step's
//! examples, agreeing on a few sums and on the gradient before the update.
//!
//! A trainer's `step_shard` ([`crate::step::OpsdTrainer::step_shard`],
//! [`crate::sft::SftTrainer::step_shard`]) works on one device's share and calls a
//! [`GradientSync`] at fixed points, the same points in the same order on every device:
//! 1. the sums the loss weights need (valid tokens of the whole step; for OPSD also the
//!    sequences and stopped sequences of the metrics), together with a failure flag;
//! 2. per update, after this device's micro-batches: the metric numerators and denominators,
//!    a non-finite-loss flag and the failure flag;
//! 3. per applied update, the gradient of every parameter that has one on any device.
//!
//! Every device's loss is already weighted by the step's global quantities (`T_i / Σ T` over
//! every device's episodes, `1 / n` over all `n` episodes), so the update is the **sum** of
//! the devices' gradients, never their mean: shares of unequal token counts stay exact. Every
//! device then applies the same clipped AdamW update to the same weights, so the weights stay
//! identical without ever being sent. A failure (a rollout, scoring or shape error) or a
//! non-finite loss on one device is known to all at the next sync point: all return the error
//! (the others [`SyncError::PeerFailed`]) or all skip the update, and none is left waiting.
//!
//! [`SingleDevice`] is the one-device sync (every sum is the value itself); a trainer's plain
//! `step` is `step_shard` with it, bit for bit the same. With the `collective` feature (which
//! needs `std`), `Collective` is the sync over Burn's `burn-collective` all-reduce: one
//! registered peer per device, in one process or, through its global orchestrator, across
//! machines.

use alloc::string::String;
use alloc::vec::Vec;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// Why devices could not agree.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SyncError {
    /// Another device's share of the step failed; that device's own error says why.
    #[error("another device's share of the step failed")]
    PeerFailed,
    /// The all-reduce itself failed (transport, a peer that left, mismatched shapes).
    #[error("all-reduce failed: {0}")]
    Collective(String),
}

/// How the devices of a data-parallel step agree. Every device calls the same methods in the
/// same order with values of the same lengths and the same parameters; an implementation
/// blocks until every device has called.
pub trait GradientSync<B: AutodiffBackend> {
    /// Devices taking part, this one included (1: no other).
    fn devices(&self) -> usize;

    /// Element-wise sum of `values` over every device, written back into `values`.
    fn sum(&mut self, values: &mut [f64]) -> Result<(), SyncError>;

    /// Each parameter's gradient summed over every device. Every device passes gradients for
    /// the same parameters (the trainers make sure of it with [`align_gradients`]).
    fn sum_gradients(&mut self, grads: GradientsParams) -> Result<GradientsParams, SyncError>;
}

/// One device alone: every sum is the value itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SingleDevice;

impl<B: AutodiffBackend> GradientSync<B> for SingleDevice {
    fn devices(&self) -> usize {
        1
    }

    fn sum(&mut self, _values: &mut [f64]) -> Result<(), SyncError> {
        Ok(())
    }

    fn sum_gradients(&mut self, grads: GradientsParams) -> Result<GradientsParams, SyncError> {
        Ok(grads)
    }
}

/// Whether each float parameter of a module has a gradient, in visiting order.
struct HasGradient<'a> {
    grads: &'a GradientsParams,
    present: Vec<f64>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for HasGradient<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let has = self.grads.get::<B::InnerBackend, D>(param.id).is_some();
        self.present.push(if has { 1.0 } else { 0.0 });
    }
}

/// Registers a zero gradient for each float parameter that another device has a gradient for
/// and this one does not.
struct FillZeros<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    anywhere: &'a [f64],
    index: usize,
    _backend: core::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for FillZeros<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let k = self.index;
        self.index += 1;
        if self.anywhere.get(k).is_some_and(|n| *n > 0.0)
            && self.grads.get::<B::InnerBackend, D>(param.id).is_none()
        {
            let value = param.val();
            let zeros = Tensor::<B::InnerBackend, D>::zeros(value.shape(), &value.device());
            self.grads.register::<B::InnerBackend, D>(param.id, zeros);
        }
    }
}

/// Makes every device hold gradients for the same parameters: a parameter the loss reached on
/// some device but not on this one (no episode here touched it) gets a zero gradient here. A
/// parameter no device has a gradient for stays without one, as on a single device, where
/// AdamW leaves it (and its moments) untouched. One [`GradientSync::sum`] of one flag per
/// float parameter of `model`.
pub fn align_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    mut grads: GradientsParams,
    sync: &mut dyn GradientSync<B>,
) -> Result<GradientsParams, SyncError> {
    let mut visitor = HasGradient {
        grads: &grads,
        present: Vec::new(),
    };
    model.visit(&mut visitor);
    let mut anywhere = visitor.present;
    sync.sum(&mut anywhere)?;
    let mut fill = FillZeros::<B> {
        grads: &mut grads,
        anywhere: &anywhere,
        index: 0,
        _backend: core::marker::PhantomData,
    };
    model.visit(&mut fill);
    Ok(grads)
}

#[cfg(feature = "collective")]
pub use collective::Collective;

#[cfg(feature = "collective")]
mod collective {
    use alloc::format;
    use alloc::vec::Vec;
    use burn::collective::{all_reduce, finish_collective, PeerId, ReduceOperation};
    use burn::optim::GradientsParams;
    use burn::tensor::backend::{AutodiffBackend, Backend};
    use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

    use super::{GradientSync, SyncError};

    /// [`GradientSync`] over `burn-collective`'s all-reduce (sum), for one registered peer.
    ///
    /// `B` is the inner backend (`NdArray`, not `Autodiff<NdArray>`): collective operations
    /// take plain tensors. The scalar sums travel as one `f64` tensor (exact for the integer
    /// counts, and no coarser than the trainers' own `f64` accumulation), the gradients
    /// parameter by parameter in sorted [`burn::module::ParamId`] order
    /// (`GradientsParams::all_reduce`), so replicas must share their parameter ids (clone one
    /// model, or load the same record). Over several nodes, register with a global strategy
    /// that takes any shape (`CollectiveConfig::with_global_all_reduce_strategy(Tree(2))`):
    /// burn-collective's default, Ring, refuses a tensor whose largest dimension is below the
    /// node count, such as the few scalar sums.
    ///
    /// ```no_run
    /// use burn::collective::{register, CollectiveConfig, PeerId};
    /// use omniopsd_core::sync::Collective;
    /// type Inner = burn::backend::NdArray<f32>;
    /// // One thread per device: register (blocks until every peer has), then train with it.
    /// let peers = 2;
    /// let handles: Vec<_> = (0..peers)
    ///     .map(|d| {
    ///         std::thread::spawn(move || {
    ///             let config = CollectiveConfig::default().with_num_devices(peers);
    ///             register::<Inner>(PeerId::from(d), Default::default(), config).unwrap();
    ///             let sync = Collective::<Inner>::new(PeerId::from(d), Default::default(), peers);
    ///             // trainer.step_shard(&episodes[d * b..(d + 1) * b], d * b, peers * b, &mut sync)
    ///             sync.finish().unwrap();
    ///         })
    ///     })
    ///     .collect();
    /// # for h in handles { h.join().unwrap(); }
    /// ```
    #[derive(Debug)]
    pub struct Collective<B: Backend> {
        peer: PeerId,
        device: B::Device,
        devices: usize,
    }

    impl<B: Backend> Collective<B> {
        /// The sync of `peer`, already registered (`burn::collective::register::<B>`) on
        /// `device`, in a collective of `devices` peers over all nodes.
        pub fn new(peer: PeerId, device: B::Device, devices: usize) -> Self {
            Self {
                peer,
                device,
                devices,
            }
        }

        /// The peer this sync speaks for.
        pub fn peer(&self) -> PeerId {
            self.peer
        }

        /// Unregisters the peer (`burn::collective::finish_collective`).
        pub fn finish(self) -> Result<(), SyncError> {
            finish_collective::<B>(self.peer).map_err(|e| SyncError::Collective(format!("{e:?}")))
        }
    }

    impl<A: AutodiffBackend> GradientSync<A> for Collective<A::InnerBackend> {
        fn devices(&self) -> usize {
            self.devices
        }

        fn sum(&mut self, values: &mut [f64]) -> Result<(), SyncError> {
            let n = values.len();
            if n == 0 {
                return Ok(());
            }
            let data = TensorData::new(values.to_vec(), [n]);
            let tensor = Tensor::<A::InnerBackend, 1>::from_data(data, (&self.device, DType::F64));
            let TensorPrimitive::Float(primitive) = tensor.into_primitive() else {
                unreachable!("a float tensor made from f64 data is not quantized");
            };
            let summed = all_reduce::<A::InnerBackend>(self.peer, primitive, ReduceOperation::Sum)
                .map_err(|e| SyncError::Collective(format!("{e:?}")))?;
            let summed: Vec<f64> =
                Tensor::<A::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(summed))
                    .into_data()
                    .convert::<f64>()
                    .into_vec()
                    .map_err(|e| SyncError::Collective(format!("{e:?}")))?;
            values.copy_from_slice(&summed);
            Ok(())
        }

        fn sum_gradients(&mut self, grads: GradientsParams) -> Result<GradientsParams, SyncError> {
            grads
                .all_reduce::<A::InnerBackend>(self.peer, ReduceOperation::Sum)
                .map_err(|e| SyncError::Collective(format!("{e:?}")))
        }
    }
}
