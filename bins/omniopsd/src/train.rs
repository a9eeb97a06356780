//! `omniopsd train`: OmniOPSD end to end, from a config file or the embedded default.
//!
//! Where things are, following a run from the command line:
//!
//! | module | its one job |
//! |---|---|
//! | this file | the command line: new run or `--resume`, run directory, device, Ctrl-C |
//! | [`config`] | TOML → the trainers' configs, one conversion per section, the knob table |
//! | [`run`] | the pipeline: which phases run, in what order, on what |
//! | [`samples`] | corpus → samples: media through the towers, every view's prompt |
//! | [`prompt`] | the chat template, the views, the privileged block, the answer format |
//! | [`tiny`] | the embedded tiny model: its tokenizer, checkpoint, size rules |
//! | [`phase`] | the phase driver: resume, data order, metrics, eval, checkpoints, Ctrl-C |
//! | [`parallel`] | data parallelism: devices as burn-collective peers, worker threads |
//! | [`steps`] | the updates a phase runs: SFT and OPSD |
//! | [`eval`] | held-out scoring with the MER-UniBench metrics |
//! | [`outputs`] | predictions, exported students, plots, report |
//!
//! and below them: [`checkpoint`] (the checksummed file format), [`run_dir`] (metrics.jsonl),
//! [`report`] (the table), [`plot`] (PNG charts), [`tokenizer`] (BPE and the chat specials),
//! [`progress`] (bars). The label-SFT trainer the warm-up and `label-sft` use is the core's
//! (`omniopsd_core::sft`).

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod outputs;
pub mod parallel;
pub mod phase;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod prompt;
pub mod report;
pub mod run;
pub mod run_dir;
pub mod samples;
pub mod steps;
pub mod tiny;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use omniopsd_backends::DeviceSpec;

use config::{ActivationCheckpointing, DeviceNames, Method, TrainConfig};
use parallel::Devices;
use run_dir::RunDir;

/// Arguments of `omniopsd train`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = config::knobs_help())]
pub struct Args {
    /// TOML config; every key is optional and unknown keys are errors. Without it: the
    /// embedded default (synthetic corpus, tiny omni model, every ablation, 3 seeds).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue a killed or interrupted run from its directory (runs/NAME); finished
    /// trainings are kept, the unfinished one continues from its newest valid checkpoint.
    #[arg(long, conflicts_with_all = ["config", "name", "methods", "seeds"])]
    pub resume: Option<PathBuf>,
    /// Run name: outputs go to <runs_dir>/<name>/, or <name>-2, <name>-3… when that holds a
    /// run already (an existing run is never overwritten).
    #[arg(long)]
    pub name: Option<String>,
    /// Methods to run, one flag each: opsd (rationale-privileged teacher), opsd-no-privileged
    /// (plain self-distillation), opsd-label-privileged (the teacher sees only the label),
    /// label-sft (supervised on labels, same update budget).
    #[arg(long = "method", value_name = "METHOD")]
    pub methods: Vec<String>,
    /// Seeds, comma-separated; the report gives mean ± sd over them.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// No progress bars or summary (errors still go to stderr).
    #[arg(long)]
    pub quiet: bool,
    /// Print every metric line to stdout as JSON (implies no progress bars).
    #[arg(long)]
    pub json_logs: bool,
    /// Device, overriding the config's `device`: cpu, ndarray, flex, cuda, cuda:N (flex and
    /// cuda need the build's `--features flex` / `--features cuda`); several, separated by
    /// commas, for data parallelism (cuda:0,cuda:1; cpu,cpu).
    #[arg(long, conflicts_with = "resume")]
    pub device: Option<String>,
    /// The device's usable memory in GiB for the memory plan's check, instead of what the
    /// device reports (free GPU memory, or the CPU's available memory).
    #[arg(long, value_name = "GIB")]
    pub device_memory: Option<f64>,
    /// Train even when the memory plan (`omniopsd plan`) exceeds the device's memory; the
    /// table is then printed as a warning.
    #[arg(long)]
    pub no_memory_check: bool,
    /// This machine's index in a multi-node run, overriding the config's `cluster.rank`.
    #[arg(long, conflicts_with = "resume")]
    pub node_rank: Option<u32>,
    /// This machine as the other nodes reach it (ws://HOST:PORT), overriding the config's
    /// `cluster.address`.
    #[arg(long, conflicts_with = "resume")]
    pub node_address: Option<String>,
}

/// Arguments of `omniopsd orchestrator`.
#[derive(Debug, clap::Args)]
pub struct OrchestratorArgs {
    /// Port to listen on (the `cluster.orchestrator` address of every node's config).
    #[arg(long, default_value_t = 3000)]
    pub port: u16,
}

/// Runs `omniopsd orchestrator`: burn-collective's global orchestrator, which introduces the
/// nodes of a multi-node run to each other, until Ctrl-C.
pub fn run_orchestrator(args: OrchestratorArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    eprintln!(
        "orchestrator listening on ws://0.0.0.0:{} (Ctrl-C stops it)",
        args.port
    );
    runtime.block_on(burn_collective::start_global_orchestrator(args.port));
    Ok(())
}

/// Runs `omniopsd train`.
pub fn run_cli(args: Args) -> Result<()> {
    // `fresh`: for a new run, what its directory held before (`None` inside: it did not
    // exist), so that a failed start removes only what it made; `None` for a resumed run.
    let (cfg, run, fresh) = match &args.resume {
        Some(dir) => {
            let run = RunDir::open(dir)?;
            let cfg = TrainConfig::load(&dir.join("config.toml"))?;
            cfg.device.specs()?;
            (cfg, run, None)
        }
        None => {
            let mut cfg = match &args.config {
                Some(path) => TrainConfig::load(path)?,
                None => TrainConfig::default(),
            };
            if let Some(name) = &args.name {
                cfg.name = name.clone();
            }
            if !args.methods.is_empty() {
                cfg.methods = args
                    .methods
                    .iter()
                    .map(|m| {
                        serde_json::from_value::<Method>(serde_json::Value::String(m.clone()))
                            .map_err(|_| {
                                anyhow!("--method {m}: expected opsd, opsd-no-privileged, opsd-label-privileged or label-sft")
                            })
                    })
                    .collect::<Result<_>>()?;
            }
            if !args.seeds.is_empty() {
                cfg.seeds = args.seeds.clone();
            }
            if let Some(device) = &args.device {
                cfg.device = DeviceNames::from_flag(device);
            }
            if args.node_rank.is_some() || args.node_address.is_some() {
                let cluster = cfg.cluster.as_mut().ok_or_else(|| {
                    anyhow!("--node-rank and --node-address need a [cluster] table in the config")
                })?;
                if let Some(rank) = args.node_rank {
                    cluster.rank = rank;
                }
                if let Some(address) = &args.node_address {
                    cluster.address = address.clone();
                }
            }
            cfg.validate().context("config")?;
            // Devices are counted before anything is written: burn-collective would wait
            // forever for a device that does not exist.
            cfg.device.specs()?;
            // A new run never reuses a directory that holds one: NAME, then NAME-2, NAME-3…
            if cfg.runs_dir.join(&cfg.name).join("config.toml").exists() {
                let mut k = 2;
                while cfg.runs_dir.join(format!("{}-{k}", cfg.name)).exists() {
                    k += 1;
                }
                cfg.name = format!("{}-{k}", cfg.name);
            }
            let root = cfg.runs_dir.join(&cfg.name);
            let before: Option<Vec<std::ffi::OsString>> =
                std::fs::read_dir(&root).ok().map(|entries| {
                    entries
                        .filter_map(|e| e.ok().map(|e| e.file_name()))
                        .collect()
                });
            let run = RunDir::create(&root)?;
            omniopsd_checkpoint::atomic::write_atomic(
                &root.join("config.toml"),
                cfg.to_toml()?.as_bytes(),
            )?;
            (cfg, run, Some(before))
        }
    };
    let result = train_on_device(&args, &cfg, &run);
    // A new run that failed before its first update (a missing model, a bad manifest) leaves
    // nothing behind, so the same command can be rerun under the same name once fixed. An
    // interrupted run keeps its directory: the error points at `--resume`.
    if let (Err(err), Some(before)) = (&result, fresh) {
        if err.downcast_ref::<phase::Interrupted>().is_none() && !run.holds_progress() {
            if run.remove_all_but(before.as_deref()).is_ok() {
                return Err(anyhow!(
                    "{err:#}\n(nothing was trained; {} was removed)",
                    run.root.display()
                ));
            }
        }
    }
    result
}

/// Trains `cfg` in `run` on the configured device and prints the report.
fn train_on_device(args: &Args, cfg: &TrainConfig, run: &RunDir) -> Result<()> {
    let out = run::Output {
        quiet: args.quiet || args.json_logs,
        json_logs: args.json_logs,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is being written is ignored on purpose: the
        // write is atomic and quick, and the run exits right after it.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let memory = plan::MemoryCheck {
        limit: plan::gib_to_bytes(args.device_memory)?,
        enforce: !args.no_memory_check,
    };
    let specs = cfg.device.specs()?;
    if cfg.cluster.is_some() {
        // Before burn-collective's websocket server installs its own (every transfer at INFO,
        // on stdout, where `--json-logs` writes metric lines).
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .with_writer(std::io::stderr)
            .try_init();
    }
    if !out.quiet {
        eprintln!("run directory: {}", run.root.display());
        if let Some(c) = &cfg.cluster {
            eprintln!(
                "node {} of {}: waiting for every node to join through {}",
                c.rank, c.nodes, c.orchestrator
            );
        }
    }
    // The backend's autodiff wrapper with the configured checkpointing strategy, on every
    // device of the list, registered as data-parallel peers when there are several.
    macro_rules! train_on {
        ($inner:ty, $devices:expr) => {
            match cfg.activation_checkpointing {
                ActivationCheckpointing::None => {
                    let devices =
                        Devices::<Autodiff<$inner>>::register($devices, cfg.cluster.as_ref())?;
                    run::train(cfg, run, &devices, out, memory, stop)?
                }
                ActivationCheckpointing::Balanced => {
                    let devices = Devices::<Autodiff<$inner, BalancedCheckpointing>>::register(
                        $devices,
                        cfg.cluster.as_ref(),
                    )?;
                    run::train(cfg, run, &devices, out, memory, stop)?
                }
            }
        };
    }
    let report = match specs[0] {
        #[cfg(feature = "ndarray")]
        DeviceSpec::NdArray => train_on!(
            omniopsd_backends::NdArrayCpu,
            vec![omniopsd_backends::NdArrayDevice::Cpu; specs.len()]
        ),
        #[cfg(feature = "flex")]
        DeviceSpec::Flex => train_on!(
            omniopsd_backends::FlexCpu,
            vec![Default::default(); specs.len()]
        ),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(_) => train_on!(
            omniopsd_backends::CudaGpu,
            specs
                .iter()
                .map(|s| match s {
                    DeviceSpec::Cuda(i) => omniopsd_backends::CudaDevice::new(*i),
                    other => unreachable!("check_devices keeps one backend, found {other}"),
                })
                .collect::<Vec<_>>()
        ),
        #[allow(unreachable_patterns)]
        other => bail!("device {other} is not compiled into this build"),
    };
    if !out.quiet {
        println!("{}", report::markdown(&report));
        println!("outputs in {}", run.root.display());
    }
    Ok(())
}
