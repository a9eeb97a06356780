//! `omniopsd score` and `omniopsd generate`, run as the built binary.
//!
//! Text path: against transformers 5.24 on `tests/reference/qwen2_tiny` (fixtures of
//! `tests/reference/gen_qwen2.py`): greedy `generate` of 64 tokens identical, response
//! log-probs within 1e-4 absolute. Omni path: `tests/reference/omni_tiny` with a word-level
//! tokenizer written here, a synthetic 16 kHz WAV and two PNG frames. Bad inputs exit non-zero
//! with the offending file named. Video files and resampled audio need FFmpeg (tests/ffmpeg).

mod ffmpeg;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use omniopsd_checkpoint::Checkpoint;
use serde_json::{json, Value};

const LOGPROB_TOLERANCE: f64 = 1e-4;

fn reference_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference"
    ))
}

fn qwen2_dir() -> PathBuf {
    reference_dir().join("qwen2_tiny")
}

fn omniopsd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .args(args)
        .output()
        .expect("the omniopsd binary runs")
}

/// Runs a command expected to succeed and parses its `--json` output.
fn json_of(args: &[&str]) -> Value {
    let out = omniopsd(args);
    assert!(
        out.status.success(),
        "omniopsd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// Runs a command expected to fail; returns its stderr.
fn failure_of(args: &[&str]) -> String {
    let out = omniopsd(args);
    assert!(!out.status.success(), "omniopsd {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A reference tensor of `qwen2_ref.safetensors` (all stored as f32).
fn reference(name: &str) -> Vec<f32> {
    let ckpt = Checkpoint::open_file(&reference_dir().join("qwen2_ref.safetensors")).unwrap();
    ckpt.read_f32(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .0
}

fn reference_ids(name: &str) -> Vec<u64> {
    reference(name).iter().map(|&v| v as u64).collect()
}

fn prompt_text(key: &str) -> String {
    let path = reference_dir().join("qwen2_prompts.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json[key]["text"].as_str().unwrap().to_string()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn greedy_generate_matches_transformers_generate_for_64_tokens() {
    let model = qwen2_dir();
    for (prompt, name) in [("prompt0", "a.gen0"), ("prompt1", "a.gen1")] {
        let text = prompt_text(prompt);
        let out = json_of(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            &text,
            "--max-new-tokens",
            "64",
            "--json",
        ]);
        assert_eq!(
            u64s(&out["prompt_ids"]),
            reference_ids(&format!("a.{prompt}.ids")),
            "{prompt}: the tokenizer encodes as transformers does"
        );
        assert_eq!(u64s(&out["ids"]), reference_ids(name), "{prompt}");
        assert_eq!(out["stopped"], json!(false));
    }
}

#[test]
fn score_logprobs_match_transformers_log_softmax() {
    let prompt = prompt_text("score_prompt");
    let response = prompt_text("score_response");
    let out = json_of(&[
        "score",
        "--model",
        qwen2_dir().to_str().unwrap(),
        "--prompt",
        &prompt,
        "--response",
        &response,
        "--json",
    ]);
    assert_eq!(
        u64s(&out["prompt_ids"]),
        reference_ids("a.score.prompt_ids")
    );
    assert_eq!(
        u64s(&out["response_ids"]),
        reference_ids("a.score.response_ids")
    );
    let ours = f64s(&out["student"]["logprobs"]);
    let theirs = reference("a.score.logprobs");
    assert_eq!(ours.len(), theirs.len());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, &b)| (a - f64::from(b)).abs())
        .fold(0.0, f64::max);
    assert!(worst <= LOGPROB_TOLERANCE, "max |Δ log p| = {worst:e}");
    let sum = out["student"]["sum"].as_f64().unwrap();
    assert!((sum - ours.iter().sum::<f64>()).abs() < 1e-9);
    assert_eq!(out["response_tokens"][22], json!("<|im_end|>"));
    assert!(out.get("teacher").is_none() && out.get("gap").is_none());
}

#[test]
fn privileged_score_gives_teacher_minus_student_gap_per_response_token() {
    let prompt = prompt_text("score_prompt");
    let response = prompt_text("score_response");
    let model = qwen2_dir();
    let out = json_of(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--response",
        &response,
        "--privileged",
        "Reasoning: the voice is soft and shaking, the words speak of loss.",
        "--json",
    ]);
    let student = f64s(&out["student"]["logprobs"]);
    let teacher = f64s(&out["teacher"]["logprobs"]);
    let gap = f64s(&out["gap"]);
    let r = reference_ids("a.score.response_ids").len();
    assert_eq!((student.len(), teacher.len(), gap.len()), (r, r, r));
    for i in 0..r {
        assert!((gap[i] - (teacher[i] - student[i])).abs() < 1e-12);
    }
    assert!(
        gap.iter().any(|g| g.abs() > 1e-3),
        "the privileged text changes the teacher's predictions"
    );
    assert!(
        out["teacher"]["prompt_tokens"].as_u64() > out["student"]["prompt_tokens"].as_u64(),
        "the teacher prompt is the student prompt plus the privileged text"
    );
    // The student view alone is unchanged by --privileged.
    let plain = json_of(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--response",
        &response,
        "--json",
    ]);
    assert_eq!(plain["student"], out["student"]);
}

#[test]
fn table_output_lists_every_response_token_and_the_sum() {
    let out = omniopsd(&[
        "score",
        "--model",
        qwen2_dir().to_str().unwrap(),
        "--prompt",
        "The woman looked",
        "--response",
        " happy.",
        "--privileged",
        "She smiled.",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].contains("student") && lines[1].contains("gap"));
    assert!(lines.last().unwrap().trim_start().starts_with("sum"));
}

#[test]
fn sampled_generation_is_reproducible_per_seed() {
    let model = qwen2_dir();
    let run = |seed: &str| {
        json_of(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The woman looked happy.",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ])["ids"]
            .clone()
    };
    let a = run("7");
    assert_eq!(a, run("7"));
    assert_ne!(a, run("8"));
    assert_eq!(a.as_array().unwrap().len(), 16);
}

#[test]
fn missing_model_directory_is_named() {
    let err = failure_of(&[
        "score",
        "--model",
        "/nonexistent/omniopsd-model",
        "--prompt",
        "a",
        "--response",
        "b",
    ]);
    assert!(err.contains("/nonexistent/omniopsd-model"), "{err}");
}

#[test]
fn checkpoint_without_tokenizer_is_refused_naming_tokenizer_json() {
    let dir = reference_dir().join("omni_tiny");
    let err = failure_of(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "w1",
    ]);
    assert!(
        err.contains("tokenizer.json") && err.contains("omni_tiny"),
        "{err}"
    );
}

#[test]
fn audio_on_a_text_only_checkpoint_is_refused() {
    let err = failure_of(&[
        "generate",
        "--model",
        qwen2_dir().to_str().unwrap(),
        "--prompt",
        "hello",
        "--audio",
        "clip.wav",
    ]);
    assert!(
        err.contains("clip.wav") && err.contains("text-only"),
        "{err}"
    );
}

#[test]
fn empty_response_is_refused() {
    let err = failure_of(&[
        "score",
        "--model",
        qwen2_dir().to_str().unwrap(),
        "--prompt",
        "hello",
        "--response",
        "",
    ]);
    assert!(err.contains("--response"), "{err}");
}

#[test]
fn empty_prompt_is_refused() {
    let err = failure_of(&[
        "score",
        "--model",
        qwen2_dir().to_str().unwrap(),
        "--prompt",
        "",
        "--response",
        "hello",
    ]);
    assert!(err.contains("--prompt"), "{err}");
}

#[test]
fn inputs_past_max_position_embeddings_are_refused_naming_both_lengths() {
    // qwen2_tiny has max_position_embeddings = 512; "hello" is one token a word or more.
    let long = "hello ".repeat(600);
    let model = qwen2_dir();
    let model = model.to_str().unwrap();
    for args in [
        vec![
            "score",
            "--model",
            model,
            "--prompt",
            &long,
            "--response",
            "hi",
        ],
        vec![
            "score",
            "--model",
            model,
            "--prompt",
            "hi",
            "--response",
            &long,
        ],
        vec!["generate", "--model", model, "--prompt", &long],
        vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "600",
        ],
    ] {
        let out = omniopsd(&args);
        assert!(!out.status.success(), "{:?} should fail", &args[..1]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("max_position_embeddings of 512") && !err.contains("panicked"),
            "{err}"
        );
    }
}

// ---- omni-modal checkpoint -------------------------------------------------------------------

/// Ids of the media tokens in omni_tiny's config.json.
const OMNI_SPECIALS: [(&str, u32); 7] = [
    ("<|AUDIO|>", 240),
    ("<|IMAGE|>", 241),
    ("<|VIDEO|>", 242),
    ("<|audio_bos|>", 243),
    ("<|audio_eos|>", 244),
    ("<|vision_bos|>", 245),
    ("<|vision_eos|>", 246),
];

/// A word-level `tokenizer.json`: `w0` … `w{words-1}` and `<unk>` around the media specials at
/// their config ids (in the model's vocabulary too, or `tokenizers` would renumber them).
fn word_tokenizer(words: usize) -> String {
    let special = |id: usize| (240..=246).contains(&id);
    let mut ids = (0..).filter(|&id| !special(id));
    let mut vocab: serde_json::Map<String, Value> = (0..words)
        .map(|i| (format!("w{i}"), json!(ids.next())))
        .collect();
    vocab.insert("<unk>".into(), json!(ids.next()));
    for (content, id) in OMNI_SPECIALS {
        vocab.insert(content.into(), json!(id));
    }
    let added: Vec<Value> = OMNI_SPECIALS
        .iter()
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

/// omni_tiny copied into a temporary directory with a tokenizer of `words` words.
fn omni_model(words: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(
            reference_dir().join("omni_tiny").join(name),
            dir.path().join(name),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), word_tokenizer(words)).unwrap();
    dir
}

fn write_wav(path: &Path, rate: u32, seconds: f64) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let n = (f64::from(rate) * seconds) as usize;
    for i in 0..n {
        let t = i as f64 / f64::from(rate);
        let s = 0.3 * (2.0 * std::f64::consts::PI * 220.0 * t).sin() * (1.0 + t).sin();
        w.write_sample((s * 32767.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

fn write_frames(dir: &Path, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let (w, h) = (56u32, 56u32);
    for k in 0..count {
        let rgb: Vec<u8> = (0..w * h)
            .flat_map(|p| {
                let (x, y) = (p % w, p / w);
                [(x * 4) as u8, (y * 4) as u8, (40 * k as u32 + x + y) as u8]
            })
            .collect();
        let file = std::fs::File::create(dir.join(format!("frame_{k:03}.png"))).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(&rgb).unwrap();
        writer.finish().unwrap();
    }
}

struct OmniFixture {
    model: tempfile::TempDir,
    wav: PathBuf,
    frames: PathBuf,
}

fn omni_fixture() -> OmniFixture {
    let model = omni_model(239);
    let wav = model.path().join("speech.wav");
    write_wav(&wav, 16_000, 1.0);
    let frames = model.path().join("frames");
    write_frames(&frames, 2);
    OmniFixture { model, wav, frames }
}

#[test]
fn omni_generate_with_audio_and_video_returns_the_requested_tokens() {
    let f = omni_fixture();
    let out = json_of(&[
        "generate",
        "--model",
        f.model.path().to_str().unwrap(),
        "--prompt",
        "w1 w2 w3",
        "--audio",
        f.wav.to_str().unwrap(),
        "--video",
        f.frames.to_str().unwrap(),
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert_eq!(out["architecture"], json!("Qwen2.5-Omni thinker"));
    assert_eq!(u64s(&out["prompt_ids"]), [1, 2, 3]);
    assert_eq!(out["ids"].as_array().unwrap().len(), 5);
    // Media placeholders expand into one token per encoder output row.
    assert!(out["prompt_tokens"].as_u64().unwrap() > 3 + 6);
}

#[test]
fn omni_score_sum_is_the_sum_of_its_per_token_logprobs() {
    let f = omni_fixture();
    let model = f.model.path().to_str().unwrap();
    let score = |media: &[&str]| {
        let mut args = vec![
            "score",
            "--model",
            model,
            "--prompt",
            "w1 w2 w3",
            "--response",
            "w10 w11 w12 w13",
            "--privileged",
            "w20 w21",
            "--json",
        ];
        args.extend_from_slice(media);
        json_of(&args)
    };
    let wav = f.wav.to_str().unwrap();
    let frames = f.frames.to_str().unwrap();
    let out = score(&["--audio", wav, "--video", frames]);
    for view in ["student", "teacher"] {
        let logp = f64s(&out[view]["logprobs"]);
        assert_eq!(logp.len(), 4);
        assert!(logp.iter().all(|l| l.is_finite() && *l < 0.0));
        let sum = out[view]["sum"].as_f64().unwrap();
        assert!((sum - logp.iter().sum::<f64>()).abs() < 1e-9, "{view}");
    }
    assert_eq!(f64s(&out["gap"]).len(), 4);
    let text_only = score(&[]);
    assert_ne!(
        text_only["student"]["logprobs"], out["student"]["logprobs"],
        "the media change the prediction"
    );
}

#[test]
fn unreadable_wav_is_named() {
    let f = omni_fixture();
    let bad = f.model.path().join("broken.wav");
    std::fs::write(&bad, b"RIFF not really a wave file").unwrap();
    let err = failure_of(&[
        "generate",
        "--model",
        f.model.path().to_str().unwrap(),
        "--prompt",
        "w1",
        "--audio",
        bad.to_str().unwrap(),
    ]);
    assert!(err.contains("broken.wav"), "{err}");
}

#[test]
fn wav_at_another_sample_rate_is_resampled_to_the_same_features_length() {
    if !ffmpeg::required() {
        return;
    }
    let f = omni_fixture();
    let wav = f.model.path().join("cd.wav");
    write_wav(&wav, 44_100, 1.0);
    let tokens = |audio: &Path| {
        json_of(&[
            "generate",
            "--model",
            f.model.path().to_str().unwrap(),
            "--prompt",
            "w1",
            "--audio",
            audio.to_str().unwrap(),
            "--max-new-tokens",
            "1",
            "--json",
        ])["prompt_tokens"]
            .as_u64()
            .unwrap()
    };
    // One second at 44.1 kHz and at 16 kHz: the same number of audio tokens.
    assert_eq!(tokens(&wav), tokens(&f.wav));
}

fn media_fixture(name: &str) -> PathBuf {
    reference_dir().join("media").join(name)
}

#[test]
fn a_video_file_with_its_own_sound_track_generates() {
    if !ffmpeg::required() {
        return;
    }
    let f = omni_fixture();
    let model = f.model.path().to_str().unwrap();
    let clip = media_fixture("clip_h264.mp4");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "w1 w2",
            "--video",
            clip.to_str().unwrap(),
            "--max-new-tokens",
            "2",
            "--json",
            "--video-min-pixels",
            "3136",
            "--video-max-pixels",
            "9408",
        ];
        args.extend_from_slice(extra);
        json_of(&args)
    };
    let silent = run(&[]);
    let with_track = run(&["--audio-in-video"]);
    assert_eq!(silent["ids"].as_array().unwrap().len(), 2);
    // 4 frames of 56x56: 2 temporal patches of 2x2 merged tokens = 8 video tokens.
    assert_eq!(silent["prompt_tokens"].as_u64().unwrap(), 2 + 2 + 8);
    assert!(
        with_track["prompt_tokens"].as_u64().unwrap() > silent["prompt_tokens"].as_u64().unwrap(),
        "the track's audio tokens are interleaved"
    );
}

#[test]
fn audio_in_video_with_a_frame_directory_is_refused() {
    let f = omni_fixture();
    let err = failure_of(&[
        "generate",
        "--model",
        f.model.path().to_str().unwrap(),
        "--prompt",
        "w1",
        "--video",
        f.frames.to_str().unwrap(),
        "--audio-in-video",
    ]);
    assert!(
        err.contains("--audio-in-video") && err.contains("no sound track"),
        "{err}"
    );
}

#[test]
fn video_directory_without_frames_is_refused() {
    let f = omni_fixture();
    let empty = f.model.path().join("no_frames");
    std::fs::create_dir_all(&empty).unwrap();
    let err = failure_of(&[
        "generate",
        "--model",
        f.model.path().to_str().unwrap(),
        "--prompt",
        "w1",
        "--video",
        empty.to_str().unwrap(),
    ]);
    assert!(err.contains("no_frames"), "{err}");
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    // 300 words + <unk> + 7 media tokens against omni_tiny's 256 embedding rows.
    let model = omni_model(300);
    let err = failure_of(&[
        "generate",
        "--model",
        model.path().to_str().unwrap(),
        "--prompt",
        "w1",
    ]);
    assert!(
        err.contains("tokenizer.json") && err.contains("256"),
        "{err}"
    );
}
