//! Data parallelism: the devices of a run as burn-collective peers, and the worker threads
//! that hold a phase's other replicas.
//!
//! Every device of this machine is one registered peer (`omniopsd_core::sync::Collective`);
//! with `[cluster]`, every device of every node, through burn-collective's global
//! orchestrator. Device 0 of this machine is the driver's ([`super::phase::drive`]); each
//! other device gets a worker thread per phase that builds its stepper from the same model or
//! checkpoint, steps its share of each update when told, and stops when the driver's channel
//! closes. The shares: of an update's `n` examples, device `g` (over all nodes) takes
//! `g·n/N .. (g+1)·n/N` (`N` devices; the config makes `n` a multiple of `N`).
//!
//! Invariant: only the driver writes anything or talks to the user; workers and driver meet
//! only at the core's sync points, so an error on any device reaches every device at the same
//! step, and a panicking device thread ends the process rather than leave the others waiting.

use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use burn::collective::{
    all_reduce, finish_collective, register, AllReduceStrategy, CollectiveConfig, PeerId,
    ReduceOperation,
};
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorPrimitive};
use omniopsd_core::sft::SftError;
use omniopsd_core::step::StepError;
use omniopsd_core::sync::{Collective, GradientSync, SingleDevice, SyncError};
use omniopsd_decoder::Qwen2Model;

use super::config::ClusterSection;
use super::phase::{Resumed, Stepper};

/// The devices a run trains on: this machine's, and where they sit among all nodes'.
pub struct Devices<B: AutodiffBackend> {
    devices: Vec<B::Device>,
    /// Index over all nodes of this machine's first device (rank × devices per node).
    first: usize,
    /// Devices over all nodes.
    total: usize,
    /// Part of a multi-node run.
    cluster: bool,
}

impl<B: AutodiffBackend> Devices<B> {
    /// One device, no peers.
    pub fn single(device: B::Device) -> Self {
        Self {
            devices: vec![device],
            first: 0,
            total: 1,
            cluster: false,
        }
    }

    /// Every device of this machine registered as a burn-collective peer, with `cluster` as
    /// one node of a multi-node run. Blocks until every peer of every node has registered
    /// (on several nodes: until each has started with its own `--node-rank`). The config was
    /// checked before (`TrainConfig::validate`, device counts by
    /// `omniopsd_backends::check_devices`): a mismatch would leave registration waiting.
    pub fn register(devices: Vec<B::Device>, cluster: Option<&ClusterSection>) -> Result<Self> {
        let local = devices.len();
        if local == 1 && cluster.is_none() {
            return Ok(Self::single(devices[0].clone()));
        }
        let mut config = CollectiveConfig::default().with_num_devices(local);
        let (first, total) = match cluster {
            Some(c) => {
                let port = c.check()?;
                config = config
                    .with_num_nodes(c.nodes)
                    .with_global_address(
                        c.orchestrator
                            .parse()
                            .map_err(|e| anyhow!("cluster.orchestrator: {e}"))?,
                    )
                    .with_node_address(
                        c.address
                            .parse()
                            .map_err(|e| anyhow!("cluster.address: {e}"))?,
                    )
                    .with_data_service_port(port)
                    // burn-collective's default global strategy, Ring, refuses a tensor whose
                    // largest dimension is below the node count (the run's few metric sums,
                    // a small parameter); a binary tree takes any shape.
                    .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2));
                (c.rank as usize * local, c.nodes as usize * local)
            }
            None => (0, local),
        };
        // `register` returns once all `local` peers have called it: one thread each.
        std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(d, device)| {
                    let config = config.clone();
                    s.spawn(move || {
                        register::<B::InnerBackend>(peer(first + d), device.clone(), config)
                            .map_err(|e| anyhow!("registering device {d}: {e:?}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| bail!("registering a device panicked"))
                })
                .collect::<Result<Vec<()>>>()
        })
        .context("starting data parallelism (burn-collective)")?;
        if let Some(c) = cluster {
            probe::<B::InnerBackend>(&devices, first, total, Duration::from_secs(c.timeout))?;
        }
        Ok(Self {
            devices,
            first,
            total,
            cluster: cluster.is_some(),
        })
    }

    /// This machine's device 0: the driver's, where samples, evaluation and checkpoints live.
    pub fn first(&self) -> &B::Device {
        &self.devices[0]
    }

    /// Devices of this machine.
    pub fn local(&self) -> usize {
        self.devices.len()
    }

    /// Devices over all nodes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether this is one node of a multi-node run.
    pub fn cluster(&self) -> bool {
        self.cluster
    }

    /// The sync of this machine's device `d`.
    pub fn sync(&self, d: usize) -> Box<dyn GradientSync<B>> {
        if self.total == 1 {
            return Box::new(SingleDevice);
        }
        Box::new(Collective::<B::InnerBackend>::new(
            peer(self.first + d),
            self.devices[d].clone(),
            self.total,
        ))
    }

    /// The examples of an update of `n` that this machine's device `d` steps.
    pub fn share(&self, d: usize, n: usize) -> Range<usize> {
        let g = self.first + d;
        g * n / self.total..(g + 1) * n / self.total
    }
}

impl<B: AutodiffBackend> Drop for Devices<B> {
    fn drop(&mut self) {
        if self.total > 1 {
            for d in 0..self.devices.len() {
                let _ = finish_collective::<B::InnerBackend>(peer(self.first + d));
            }
        }
    }
}

fn peer(index: usize) -> PeerId {
    PeerId::from(index)
}

/// Two all-reduces of a 1 from every device of every node, each sum checked, all within
/// `timeout`: a multi-node run that cannot complete them stops here with an error instead of
/// hanging at its first update. The published burn-collective 0.21.0 never completes a
/// process's second global all-reduce (its `SyncService::sync` clears a copy of the syncing
/// peers, not the list itself), so this is where a multi-node run on it ends.
fn probe<B: Backend>(
    devices: &[B::Device],
    first: usize,
    total: usize,
    timeout: Duration,
) -> Result<()> {
    let (tx, rx) = channel();
    for (d, device) in devices.iter().enumerate() {
        let (tx, device) = (tx.clone(), device.clone());
        // Detached: a blocked all-reduce cannot be cancelled, so the thread is left behind
        // when the run ends with the error.
        std::thread::spawn(move || {
            let result = (1..=2).try_for_each(|round| {
                let one = Tensor::<B, 1>::ones([1], &device).into_primitive().tensor();
                let sum = all_reduce::<B>(peer(first + d), one, ReduceOperation::Sum)
                    .map_err(|e| anyhow!("all-reduce {round}: {e:?}"))?;
                let sum: f64 = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(sum))
                    .into_scalar()
                    .elem();
                if sum != total as f64 {
                    bail!("all-reduce {round}: {total} devices summed their 1s to {sum}");
                }
                Ok(())
            });
            let _ = tx.send((d, result));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    for _ in devices {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((_, Ok(()))) => {}
            Ok((d, Err(e))) => {
                return Err(e.context(format!("checking the nodes' all-reduce on device {d}")))
            }
            Err(_) => bail!(
                "every node joined, but two all-reduces over all {total} devices did not complete \
                 within {} s (cluster.timeout). With the published burn-collective 0.21.0 a \
                 process's second global all-reduce never completes (global/node/sync.rs \
                 clears a copy of its syncing peers, not the list), so multi-node training \
                 needs a burn-collective with that fixed (README, \"Several machines\"). \
                 Otherwise: a node stopped, or another node cannot reach this one's \
                 cluster.address",
                timeout.as_secs()
            ),
        }
    }
    Ok(())
}

/// `model` with its parameter ids numbered in visiting order: the same on every node, so
/// gradients pair up across machines (fresh parameters get random ids). Replicas inside one
/// process are clones and share ids already.
pub fn renumber<B: AutodiffBackend>(model: Qwen2Model<B>) -> Qwen2Model<B> {
    struct Renumber(u64);
    impl<B: Backend> ModuleMapper<B> for Renumber {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (_, tensor, mapper) = param.consume();
            self.0 += 1;
            Param::from_mapped_value(ParamId::from(self.0), tensor, mapper)
        }
    }
    model.map(&mut Renumber(0))
}

/// What the driver tells a worker.
enum Job {
    /// Check that every device resumes the phase at this step.
    Agree(u64),
    /// Step these examples, the `first`-th of `total` in the update.
    Step {
        batch: Vec<usize>,
        first: usize,
        total: usize,
    },
}

/// Every device starts the phase at the same step: on several nodes, each resumes from its
/// own run directory, and a node killed between its last step and its checkpoint would be a
/// step behind.
pub fn agree_on_step<B: AutodiffBackend>(sync: &mut dyn GradientSync<B>, step: u64) -> Result<()> {
    let s = step as f64;
    let mut sums = [s, s * s];
    sync.sum(&mut sums)
        .map_err(|e| anyhow!("data parallel: {e}"))?;
    let n = sync.devices() as f64;
    if sums[0] != n * s || sums[1] != n * s * s {
        bail!(
            "data parallel: this node resumes at step {step} but another at a different step \
             (mean {}); resume every node from checkpoints of the same step (remove the newer \
             ones)",
            sums[0] / n
        );
    }
    Ok(())
}

/// The worker threads of one phase (this machine's devices 1 .. local).
pub struct Workers<'scope> {
    workers: Vec<Worker<'scope>>,
}

struct Worker<'scope> {
    device: usize,
    jobs: Sender<Job>,
    done: Receiver<Result<()>>,
    _thread: ScopedJoinHandle<'scope, ()>,
}

impl<'scope> Workers<'scope> {
    /// Starts a worker on each of this machine's devices but the first: each builds its
    /// stepper with `start` from a replica of `model` (or from `resumed`) on its device and
    /// reports back; [`Self::ready`] waits for all.
    pub fn spawn<'env, B, S, F>(
        scope: &'scope Scope<'scope, 'env>,
        devices: &'env Devices<B>,
        model: &Qwen2Model<B>,
        resumed: Option<&'env Resumed>,
        start: &'env F,
    ) -> Self
    where
        B: AutodiffBackend,
        S: Stepper<B>,
        F: Fn(Qwen2Model<B>, Option<&Resumed>, &B::Device) -> Result<S> + Sync,
    {
        let workers = (1..devices.local())
            .map(|device| {
                let (jobs, job_rx) = channel();
                let (done_tx, done) = channel();
                let replica = model.clone();
                let thread = scope.spawn(move || {
                    let _exit = ExitOnPanic;
                    work(devices, device, replica, resumed, start, job_rx, done_tx)
                });
                Worker {
                    device,
                    jobs,
                    done,
                    _thread: thread,
                }
            })
            .collect();
        Self { workers }
    }

    /// Waits until every worker has its stepper; the first that could not build one is the
    /// error (the workers then stop when this is dropped).
    pub fn ready(&self) -> Result<()> {
        for w in &self.workers {
            w.done
                .recv()
                .map_err(|_| anyhow!("device {} stopped while starting", w.device))?
                .with_context(|| format!("device {}", w.device))?;
        }
        Ok(())
    }

    /// Each worker checks `step` with the driver ([`agree_on_step`]); the driver's own check
    /// is `mine`, run meanwhile.
    pub fn agree(&self, step: u64, mine: impl FnOnce() -> Result<()>) -> Result<()> {
        for w in &self.workers {
            let _ = w.jobs.send(Job::Agree(step));
        }
        self.gather(mine())
    }

    /// One update: each worker steps its share of `batch`, the driver's is `mine` (called
    /// with its range), run meanwhile. A worker's own error wins over the driver's report that
    /// another device failed.
    pub fn step<T>(
        &self,
        devices: &Devices<impl AutodiffBackend>,
        batch: &[usize],
        mine: impl FnOnce(Range<usize>) -> Result<T>,
    ) -> Result<T> {
        let total = batch.len();
        for w in &self.workers {
            let share = devices.share(w.device, total);
            let _ = w.jobs.send(Job::Step {
                batch: batch[share.clone()].to_vec(),
                first: share.start,
                total,
            });
        }
        self.gather(mine(devices.share(0, total)))
    }

    fn gather<T>(&self, mine: Result<T>) -> Result<T> {
        let mut theirs = None;
        for w in &self.workers {
            let result = w
                .done
                .recv()
                .unwrap_or_else(|_| Err(anyhow!("the device's thread stopped")));
            if let (Err(e), None) = (result, &theirs) {
                theirs = Some(e.context(format!("device {}", w.device)));
            }
        }
        match (mine, theirs) {
            (Ok(value), None) => Ok(value),
            (Err(e), Some(theirs)) if peer_failed(&e) => Err(theirs),
            (Err(e), _) => Err(e),
            (Ok(_), Some(theirs)) => Err(theirs),
        }
    }
}

/// Whether `e` only says that another device's share failed.
fn peer_failed(e: &anyhow::Error) -> bool {
    let peer = |s: &SyncError| *s == SyncError::PeerFailed;
    e.chain().any(|cause| {
        matches!(cause.downcast_ref::<StepError>(), Some(StepError::Sync(s)) if peer(s))
            || matches!(cause.downcast_ref::<SftError>(), Some(SftError::Sync(s)) if peer(s))
    })
}

/// A worker's life: build the stepper on its device, then step what the driver sends until
/// its channel closes or a step fails (every device fails that step alike).
fn work<B, S, F>(
    devices: &Devices<B>,
    device: usize,
    model: Qwen2Model<B>,
    resumed: Option<&Resumed>,
    start: &F,
    jobs: Receiver<Job>,
    done: Sender<Result<()>>,
) where
    B: AutodiffBackend,
    S: Stepper<B>,
    F: Fn(Qwen2Model<B>, Option<&Resumed>, &B::Device) -> Result<S>,
{
    let on = &devices.devices[device];
    let mut stepper = match start(model.fork(on), resumed, on) {
        Ok(stepper) => stepper,
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    if done.send(Ok(())).is_err() {
        return;
    }
    let mut sync = devices.sync(device);
    while let Ok(job) = jobs.recv() {
        let result = match job {
            Job::Agree(step) => agree_on_step(&mut *sync, step),
            Job::Step {
                batch,
                first,
                total,
            } => stepper.step(&batch, first, total, &mut *sync).map(|_| ()),
        };
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            return;
        }
    }
}

/// Ends the process when a device thread panics: the other devices would wait for it at
/// their next sync point forever. Checkpoints already written stay (`--resume`).
pub struct ExitOnPanic;

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "error: a data-parallel device thread panicked (above); the run stops, its \
                 checkpoints are kept (continue with `omniopsd train --resume`)"
            );
            std::process::exit(101);
        }
    }
}
