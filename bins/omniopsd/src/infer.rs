//! `omniopsd score` and `omniopsd generate`: inspect a checkpoint the way the trainer uses it.
//!
//! `score` prints `log p(y_r | prompt, y_<r)` for each response token, for the student view
//! (the prompt) and, with `--privileged`, the teacher view (the prompt with the privileged
//! text appended) and their per-token gap `log p_teacher − log p_student`: the dense signal
//! rationale-privileged self-distillation trains on. `generate` decodes greedily, or samples
//! with the core's rollout sampler (`omniopsd_core::rollout::rollout`, one sample, Philox
//! draws keyed by seed, stream 0, row and position): the same sampler, temperature, top-k and
//! top-p as training rollouts, and the same tokens for the same seed on every run.
//!
//! Prompts are raw text: no chat template is applied (render one into `--prompt`). A
//! checkpoint whose `config.json` has `thinker_config` or `text_config` is a Qwen2.5-Omni
//! thinker and takes `--audio` / `--video`; any other is a `Qwen2ForCausalLM`. `--adapter DIR`
//! applies a LoRA adapter in PEFT's format to the text decoder (refused, naming the tensor and
//! both shapes, when it was made for another base).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use clap::Args;
use omniopsd_backends::DeviceSpec;
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::fused::lm_logits;
use omniopsd_core::rollout::{rollout, RolloutConfig};
use omniopsd_core::sampling::{log_softmax_at, SamplingConfig};
use omniopsd_core::PolicyModel;
use omniopsd_decoder::{check_tokenizer, PeftAdapter, Qwen2Model, TokenPrompt};
use omniopsd_thinker::{EncodedMedia, MediaInput, Thinker};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::inputs;

/// Longest audio accepted: the feature extractor reads one 30-second window and would drop
/// the rest silently.
const MAX_AUDIO_SECONDS: f64 = 30.0;
/// Most frames read from a `--video` directory.
const MAX_FRAMES: usize = 768;

const PROMPT_LAYOUT: &str = "Prompts are raw text, tokenized without a chat template (render \
one into --prompt yourself if the model expects it). With media, the placeholders come first: \
<|audio_bos|><|AUDIO|><|audio_eos|> for --audio, then <|vision_bos|><|VIDEO|><|vision_eos|> for \
--video (ids from the checkpoint's thinker config), then the prompt's tokens.";

/// The checkpoint, media and output options shared by `score` and `generate`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Checkpoint directory: config.json, *.safetensors and tokenizer.json. A config with
    /// `thinker_config` or `text_config` is loaded as a Qwen2.5-Omni thinker, any other as a
    /// Qwen2ForCausalLM.
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter directory saved by PEFT (`adapter_config.json` +
    /// `adapter_model.safetensors`) or by `omniopsd train`, made for --model; applied to the
    /// text decoder's projections.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// An audio file of at most 30 s: a 16 kHz mono WAV, or (through FFmpeg) WAV at any rate
    /// and channel count, MP3, FLAC, M4A/AAC, Ogg (omni-modal checkpoints only).
    #[arg(long, value_name = "FILE")]
    pub audio: Option<PathBuf>,
    /// A video file (.mp4, .avi, .mkv, .webm, .mov, …; through FFmpeg, frames sampled as
    /// qwen-omni-utils samples them) or a directory of PNG frames taken in file-name order
    /// (omni-modal checkpoints only).
    #[arg(long, value_name = "FILE|DIR_OF_FRAMES")]
    pub video: Option<PathBuf>,
    /// Frame rate of a --video directory of frames; places them in TMRoPE time (a video file's
    /// time base is its sampled frames' rate, see --video-fps).
    #[arg(long, default_value_t = 2.0)]
    pub fps: f64,
    /// Interleave the --video file's own sound track with its frames (Qwen2.5-Omni's
    /// use_audio_in_video), instead of no audio or a separate --audio.
    #[arg(long, requires = "video", conflicts_with = "audio")]
    pub audio_in_video: bool,
    /// How a --video file's frames are sampled.
    #[command(flatten)]
    pub video_sampling: inputs::VideoArgs,
    /// Device: cpu, ndarray, flex, cuda or cuda:N (as compiled into this build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `omniopsd score`.
#[derive(Debug, Args)]
#[command(after_help = format!("{PROMPT_LAYOUT} The response is tokenized on its own and \
appended to the prompt's tokens. With --privileged, the teacher sees the text PROMPT + \"\\n\" + \
PRIVILEGED (tokenized as one text) followed by the same response tokens; the gap is teacher \
minus student log-probability per response token."))]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The student's prompt text.
    #[arg(long)]
    pub prompt: String,
    /// The response whose tokens are scored.
    #[arg(long)]
    pub response: String,
    /// Privileged text (e.g. a rationale) the teacher sees after the prompt.
    #[arg(long)]
    pub privileged: Option<String>,
}

/// Arguments of `omniopsd generate`.
#[derive(Debug, Args)]
#[command(after_help = format!("{PROMPT_LAYOUT} Generation stops after max-new-tokens or \
at the config's eos_token_id, <|endoftext|> or <|im_end|> (when the tokenizer has them)."))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens generated, stop token included.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy (argmax, lowest id on ties; top-k/top-p unused).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler (the core's Philox stream 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `f` on the backend the user named.
macro_rules! on_device {
    ($name:expr, $f:ident, $args:expr) => {{
        let spec: DeviceSpec = $name.parse().map_err(|e| anyhow!("--device: {e}"))?;
        match spec {
            #[cfg(feature = "ndarray")]
            DeviceSpec::NdArray => {
                $f::<omniopsd_backends::NdArrayCpu>($args, &omniopsd_backends::NdArrayDevice::Cpu)
            }
            #[cfg(feature = "flex")]
            DeviceSpec::Flex => $f::<omniopsd_backends::FlexCpu>($args, &Default::default()),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(i) => {
                $f::<omniopsd_backends::CudaGpu>($args, &omniopsd_backends::CudaDevice::new(i))
            }
            #[allow(unreachable_patterns)]
            other => bail!("device {other} is not compiled into this build"),
        }
    }};
}
pub(crate) use on_device;

/// `omniopsd score`.
pub fn run_score(args: ScoreArgs) -> Result<()> {
    on_device!(args.model.device, score, &args)
}

/// `omniopsd generate`.
pub fn run_generate(args: GenerateArgs) -> Result<()> {
    on_device!(args.model.device, generate, &args)
}

/// A checkpoint's model: a text decoder, or a thinker with its towers.
pub(crate) enum Model<B: Backend> {
    Text(Qwen2Model<B>),
    Omni(Thinker<B>),
}

/// A loaded checkpoint with its tokenizer (and LoRA adapter): what `score`, `generate` and
/// `predict` run.
pub(crate) struct Loaded<B: Backend> {
    pub(crate) model: Model<B>,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) dir: PathBuf,
    pub(crate) adapter: Option<PathBuf>,
}

impl<B: Backend> Loaded<B> {
    pub(crate) fn load(dir: &Path, adapter: Option<&Path>, device: &B::Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "model directory {} does not exist or is not a directory",
                dir.display()
            );
        }
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            bail!(
                "{}: not found; score and generate need the checkpoint's tokenizer",
                tokenizer_path.display()
            );
        }
        let ckpt = Checkpoint::open(dir)
            .with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
        let lora = adapter
            .map(|path| {
                PeftAdapter::open(path)
                    .with_context(|| format!("opening the LoRA adapter in {}", path.display()))
            })
            .transpose()?;
        let model =
            if ckpt.layout().is_multimodal() {
                Model::Omni(Thinker::from_checkpoint(&ckpt, device).with_context(|| {
                    format!("loading the Qwen2.5-Omni thinker in {}", dir.display())
                })?)
            } else {
                Model::Text(Qwen2Model::from_checkpoint(&ckpt, device).with_context(|| {
                    format!("loading the Qwen2ForCausalLM in {}", dir.display())
                })?)
            };
        let model = match lora {
            None => model,
            Some(lora) => {
                let context = || {
                    format!(
                        "applying the LoRA adapter in {} to the model in {}",
                        lora.dir().display(),
                        dir.display()
                    )
                };
                let weights = ckpt.model_weights();
                let prefix = weights.prefix();
                match model {
                    Model::Text(m) => {
                        Model::Text(m.with_adapter(&lora, prefix).with_context(context)?)
                    }
                    // The towers too: PEFT puts adapters on every module its targets match.
                    Model::Omni(t) => {
                        Model::Omni(t.with_adapter(&lora, prefix).with_context(context)?)
                    }
                }
            }
        };
        let vocab = match &model {
            Model::Text(m) => m.config().vocab_size,
            Model::Omni(t) => t.decoder.config().vocab_size,
        };
        Ok(Self {
            tokenizer: check_tokenizer(&tokenizer_path, vocab)?,
            model,
            dir: dir.to_path_buf(),
            adapter: adapter.map(Path::to_path_buf),
        })
    }

    pub(crate) fn decoder(&self) -> &Qwen2Model<B> {
        match &self.model {
            Model::Text(m) => m,
            Model::Omni(t) => &t.decoder,
        }
    }

    pub(crate) fn architecture(&self) -> &'static str {
        match self.model {
            Model::Text(_) => "Qwen2ForCausalLM",
            Model::Omni(_) => "Qwen2.5-Omni thinker",
        }
    }

    /// Token ids of `text`, no special tokens added (special tokens written in the text,
    /// like `<|im_start|>`, are still recognised).
    fn encode(&self, text: &str, what: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing {what}: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Each token as its own decoded text (special tokens kept).
    fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| self.tokenizer.decode(&[id], false).unwrap_or_default())
            .collect()
    }

    /// Stop tokens: the config's `eos_token_id` and, when the tokenizer has them,
    /// `<|endoftext|>` and `<|im_end|>`.
    pub(crate) fn stop_tokens(&self) -> Vec<u32> {
        let mut stop = self.decoder().config().eos_ids();
        for name in ["<|endoftext|>", "<|im_end|>"] {
            if let Some(id) = self.tokenizer.token_to_id(name) {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        stop
    }

    /// Reads `--audio` / `--video` and lays out prompts over them.
    fn prompter(&self, args: &ModelArgs) -> Result<Prompter<'_, B>> {
        let thinker = match &self.model {
            Model::Omni(t) => t,
            Model::Text(_) => {
                if let Some(path) = args.audio.as_ref().or(args.video.as_ref()) {
                    let flag = if args.audio.is_some() {
                        "--audio"
                    } else {
                        "--video"
                    };
                    bail!(
                        "{flag} {}: the checkpoint in {} is a text-only Qwen2ForCausalLM (its \
                         config.json has no thinker_config or text_config); audio and video \
                         need a Qwen2.5-Omni thinker checkpoint",
                        path.display(),
                        self.dir.display()
                    );
                }
                return Ok(Prompter::Text(self.decoder()));
            }
        };
        let cfg = &thinker.config;
        let mut prefix = Vec::new();
        let mut inputs = Vec::new();
        if let Some(path) = &args.audio {
            inputs.push(read_audio(path)?);
            prefix.extend([
                cfg.audio_start_token_id,
                cfg.audio_token_index,
                cfg.audio_end_token_id,
            ]);
        }
        if let Some(path) = &args.video {
            inputs.push(read_video(path, args)?);
            prefix.extend([
                cfg.vision_start_token_id,
                cfg.video_token_index,
                cfg.vision_end_token_id,
            ]);
        }
        let encoded = thinker
            .encode_media(&inputs)
            .context("encoding the media inputs")?;
        Ok(Prompter::Omni {
            thinker,
            encoded,
            prefix,
        })
    }
}

/// Turns prompt text ids into the decoder's prompt, media encoded once for every view.
enum Prompter<'a, B: Backend> {
    Text(&'a Qwen2Model<B>),
    Omni {
        thinker: &'a Thinker<B>,
        encoded: EncodedMedia<B>,
        prefix: Vec<u32>,
    },
}

impl<B: Backend> Prompter<'_, B> {
    fn prompt(&self, text_ids: &[u32], what: &str) -> Result<TokenPrompt> {
        Ok(match self {
            Prompter::Text(decoder) => {
                if text_ids.is_empty() {
                    bail!("{what} has no tokens");
                }
                let prompt = TokenPrompt::new(text_ids.to_vec());
                decoder.check_prompt(&prompt)?;
                prompt
            }
            Prompter::Omni {
                thinker,
                encoded,
                prefix,
            } => {
                let ids = [prefix.as_slice(), text_ids].concat();
                thinker.prompt_encoded(&ids, encoded)?
            }
        })
    }
}

fn read_audio(path: &Path) -> Result<MediaInput> {
    let (mel, _) = inputs::audio_features(path, MAX_AUDIO_SECONDS)?;
    Ok(MediaInput::Audio(mel))
}

fn read_video(path: &Path, args: &ModelArgs) -> Result<MediaInput> {
    let processor = inputs::processor_for(&args.model)?;
    let is_file = inputs::is_video_file(path);
    if args.audio_in_video && !is_file {
        bail!(
            "--audio-in-video: --video {} is a directory of frames, which has no sound track",
            path.display()
        );
    }
    let (patches, fps) = if is_file {
        let opts = args.video_sampling.options()?;
        let video = inputs::video_file_patches(path, &opts, &processor)?;
        let fps = video.sample_fps.unwrap_or(opts.fps);
        (video.patches, fps)
    } else {
        let fps = args.fps;
        if !(fps.is_finite() && fps > 0.0) {
            bail!("--fps {fps}: must be a positive number");
        }
        (inputs::video_patches(path, MAX_FRAMES, &processor)?.0, fps)
    };
    let audio = if args.audio_in_video {
        Some(inputs::audio_features(path, MAX_AUDIO_SECONDS)?.0)
    } else {
        None
    };
    Ok(MediaInput::Video {
        patches,
        second_per_grid: processor.temporal_patch_size as f64 / fps,
        audio,
    })
}

/// `log softmax(logits)[y_r]` at each response position: the hidden state before token `r`
/// (teacher forcing over prompt ++ response) through the LM head, in f64 on the host.
fn response_logprobs<B: Backend>(
    decoder: &Qwen2Model<B>,
    prompt: &TokenPrompt,
    response: &[u32],
    device: &B::Device,
) -> Result<Vec<f64>> {
    let r = response.len();
    decoder.check_length(prompt, r - 1)?;
    let ids: Vec<i64> = response.iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, r]), device);
    let hidden = decoder.response_hidden(prompt, ids);
    let h = hidden.dims()[2];
    let logits = lm_logits(hidden.reshape([r, h]), PolicyModel::lm_head(decoder));
    let vocab = logits.dims()[1];
    let values = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow!("reading logits: {e:?}"))?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "the logits before response token {} hold {} (the weights are finite: the \
             activations overflowed in this backend's float type)",
            i / vocab,
            values[i]
        );
    }
    Ok(response
        .iter()
        .enumerate()
        .map(|(i, &t)| log_softmax_at(&values[i * vocab..(i + 1) * vocab], 1.0, t as usize))
        .collect())
}

fn score<B: Backend>(args: &ScoreArgs, device: &B::Device) -> Result<()> {
    let loaded = Loaded::<B>::load(&args.model.model, args.model.adapter.as_deref(), device)?;
    let response = loaded.encode(&args.response, "--response")?;
    if response.is_empty() {
        bail!("--response {:?} has no tokens to score", args.response);
    }
    let prompter = loaded.prompter(&args.model)?;
    let student_ids = loaded.encode(&args.prompt, "--prompt")?;
    let student_prompt = prompter.prompt(
        &student_ids,
        "--prompt (the first response token is predicted from the last prompt token)",
    )?;
    let student = response_logprobs(loaded.decoder(), &student_prompt, &response, device)?;
    let teacher = match &args.privileged {
        None => None,
        Some(text) => {
            let ids = loaded.encode(&format!("{}\n{text}", args.prompt), "--privileged")?;
            let prompt = prompter.prompt(&ids, "the teacher prompt")?;
            let logp = response_logprobs(loaded.decoder(), &prompt, &response, device)?;
            Some((prompt.ids.len(), logp))
        }
    };
    let tokens = loaded.token_strings(&response);
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    if args.model.json {
        let mut out = json!({
            "model": loaded.dir,
            "adapter": loaded.adapter,
            "architecture": loaded.architecture(),
            "prompt_ids": student_ids,
            "response_ids": response,
            "response_tokens": tokens,
            "student": {
                "prompt_tokens": student_prompt.ids.len(),
                "logprobs": student,
                "sum": sum(&student),
            },
        });
        if let Some((len, logp)) = &teacher {
            let gap: Vec<f64> = logp.iter().zip(&student).map(|(t, s)| t - s).collect();
            out["teacher"] = json!({
                "prompt_tokens": len,
                "logprobs": logp,
                "sum": sum(logp),
            });
            out["gap_sum"] = json!(sum(&gap));
            out["gap"] = json!(gap);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}{} ({}); student prompt: {} tokens{}",
        loaded.dir.display(),
        loaded
            .adapter
            .as_ref()
            .map(|a| format!(" + LoRA {}", a.display()))
            .unwrap_or_default(),
        loaded.architecture(),
        student_prompt.ids.len(),
        teacher
            .as_ref()
            .map(|(len, _)| format!(", teacher prompt: {len} tokens"))
            .unwrap_or_default()
    );
    let width = tokens
        .iter()
        .map(|t| format!("{t:?}").chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut header = format!(
        "{:>4} {:>7}  {:<width$} {:>12}",
        "#", "id", "token", "student"
    );
    if teacher.is_some() {
        header.push_str(&format!(" {:>12} {:>12}", "teacher", "gap"));
    }
    println!("{header}");
    for (i, (&id, token)) in response.iter().zip(&tokens).enumerate() {
        let mut line = format!(
            "{i:>4} {id:>7}  {:<width$} {:>12.5}",
            format!("{token:?}"),
            student[i]
        );
        if let Some((_, logp)) = &teacher {
            line.push_str(&format!(
                " {:>12.5} {:>+12.5}",
                logp[i],
                logp[i] - student[i]
            ));
        }
        println!("{line}");
    }
    let mut total = format!(
        "{:>4} {:>7}  {:<width$} {:>12.5}",
        "sum",
        "",
        "",
        sum(&student)
    );
    if let Some((_, logp)) = &teacher {
        total.push_str(&format!(
            " {:>12.5} {:>+12.5}",
            sum(logp),
            sum(logp) - sum(&student)
        ));
    }
    println!("{total}");
    Ok(())
}

fn generate<B: Backend>(args: &GenerateArgs, device: &B::Device) -> Result<()> {
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    sampling.validate()?;
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let loaded = Loaded::<B>::load(&args.model.model, args.model.adapter.as_deref(), device)?;
    let prompter = loaded.prompter(&args.model)?;
    let prompt_ids = loaded.encode(&args.prompt, "--prompt")?;
    let prompt = prompter.prompt(&prompt_ids, "--prompt")?;
    loaded
        .decoder()
        .check_length(&prompt, args.max_new_tokens - 1)
        .context("--prompt with --max-new-tokens")?;
    let stop = loaded.stop_tokens();
    let (ids, stopped) = if args.temperature == 0.0 {
        let ids = loaded
            .decoder()
            .generate_greedy(&prompt, args.max_new_tokens, true, &stop)?;
        let stopped = ids.last().is_some_and(|t| stop.contains(t));
        (ids, stopped)
    } else {
        let cfg = RolloutConfig {
            sampling,
            samples_per_prompt: 1,
            max_new_tokens: args.max_new_tokens,
            stop_tokens: stop.clone(),
            pad_token: 0,
            logp_temperature: 1.0,
        };
        let mut out = rollout::<B, _>(loaded.decoder(), &prompt, &cfg, args.seed, 0)?;
        (out.responses.swap_remove(0), out.stopped[0])
    };
    let text = loaded
        .tokenizer
        .decode(&ids, true)
        .map_err(|e| anyhow!("decoding the generated tokens: {e}"))?;
    if args.model.json {
        let out = json!({
            "model": loaded.dir,
            "adapter": loaded.adapter,
            "architecture": loaded.architecture(),
            "prompt_ids": prompt_ids,
            "prompt_tokens": prompt.ids.len(),
            "ids": ids,
            "tokens": loaded.token_strings(&ids),
            "text": text,
            "stopped": stopped,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "seed": args.seed,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{text}");
    }
    Ok(())
}
