//! A deterministic synthetic omni-modal affect corpus in the real manifest format.
//!
//! Every sample has an emotion that three channels carry, each imperfectly:
//! - **audio**: harmonic "speech" (voiced syllables with vowel-like formants) whose prosody
//!   follows the emotion: mean pitch, pitch contour, energy, tempo and tremor (the acoustic
//!   correlates of Scherer 2003 and Banse & Scherer 1996: high/variable pitch and fast tempo for
//!   joy, low falling pitch and slow, soft speech for sadness, loud flat speech with sharp
//!   accents for anger, a steep final rise for surprise, tremor and hesitation for worry);
//! - **video**: frames of a drawn face whose brows, eyes and mouth follow the emotion (the
//!   action units of Ekman & Friesen's FACS), ramping from onset to apex;
//! - **text**: a subtitle, which in about a quarter of the emotional samples misleads on purpose
//!   (sarcasm, masking, understatement), so text alone fails.
//!
//! The rationale is written from the very parameters that generated the sample, like a
//! frontier model that looked closely would write it, citing all three channels.
//! Each sample draws from its own random stream `(seed, index)`, so a sample does not depend
//! on `n`, and the same seed gives byte-identical files.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::manifest::{self, sentiment_word, Record, Split, BASIC_EMOTIONS};
use super::media::{self, Frame, SAMPLE_RATE};

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    /// Number of samples.
    pub n: usize,
    /// Seed of every random stream.
    pub seed: u64,
    /// Fraction of samples put in the held-out split.
    pub heldout_fraction: f64,
    /// Frames per video.
    pub frames: usize,
    /// Frame width and height in pixels.
    pub size: u32,
    /// Probability that an emotional sample's subtitle misleads.
    pub conflict_rate: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            n: 480,
            seed: 0,
            heldout_fraction: 0.2,
            frames: 4,
            size: 56,
            conflict_rate: 0.25,
        }
    }
}

/// The corpus draws from the core's SplitMix64 (fully specified, so the corpus is identical on
/// every platform and version of every dependency).
pub use omniopsd_core::rng::SplitMix64;

/// Prosody of an utterance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prosody {
    /// Mean pitch in Hz.
    pub f0: f64,
    /// Relative pitch excursion of the contour.
    pub range: f64,
    /// Peak amplitude in `(0, 1]`.
    pub energy: f64,
    /// Syllables per second.
    pub tempo: f64,
    /// Relative depth of a 6 Hz pitch tremor.
    pub tremor: f64,
}

/// Expression of the drawn face at its apex.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Face {
    /// Inner-brow raise (+, sadness/worry/surprise) or lowering (−, anger), in pixels at 56 px.
    pub brow_inner: f64,
    /// Whole-brow raise in pixels.
    pub brow_height: f64,
    /// Eye opening as a fraction of the neutral opening.
    pub eye_open: f64,
    /// Mouth-corner lift (+ smile, − frown), in pixels.
    pub mouth_curve: f64,
    /// Mouth opening in pixels.
    pub mouth_open: f64,
}

/// Per-emotion centre of the prosody (before per-sample variation).
fn base_prosody(emotion: &str) -> Prosody {
    let (f0, range, energy, tempo, tremor) = match emotion {
        "happy" => (230.0, 0.28, 0.80, 5.8, 0.0),
        "sad" => (135.0, 0.06, 0.30, 2.8, 0.0),
        "angry" => (195.0, 0.12, 0.95, 6.2, 0.0),
        "surprise" => (210.0, 0.45, 0.70, 4.6, 0.0),
        "worried" => (185.0, 0.10, 0.45, 4.8, 0.05),
        _ => (160.0, 0.05, 0.55, 4.2, 0.0),
    };
    Prosody {
        f0,
        range,
        energy,
        tempo,
        tremor,
    }
}

/// Per-emotion apex expression (before per-sample variation).
fn base_face(emotion: &str) -> Face {
    let (brow_inner, brow_height, eye_open, mouth_curve, mouth_open) = match emotion {
        "happy" => (0.0, 0.5, 0.7, 5.0, 1.0),
        "sad" => (3.0, 0.0, 0.6, -4.0, 0.0),
        "angry" => (-3.5, -1.5, 0.55, -1.5, 0.0),
        "surprise" => (1.0, 4.0, 1.6, 0.0, 5.0),
        "worried" => (3.0, 1.5, 1.2, -1.5, 0.5),
        _ => (0.0, 0.0, 1.0, 0.0, 0.0),
    };
    Face {
        brow_inner,
        brow_height,
        eye_open,
        mouth_curve,
        mouth_open,
    }
}

/// Open-vocabulary labels per emotion (each a `format.csv` name of MER-UniBench).
fn openset_pool(emotion: &str) -> &'static [&'static str] {
    match emotion {
        "happy" => &[
            "joyful",
            "excited",
            "pleased",
            "cheerful",
            "delighted",
            "grateful",
        ],
        "sad" => &[
            "disappointed",
            "lonely",
            "gloomy",
            "helpless",
            "hurt",
            "upset",
        ],
        "angry" => &["annoyed", "frustrated", "irritated", "furious", "resentful"],
        "surprise" => &["amazed", "astonished", "shocked", "confused"],
        "worried" => &["anxious", "nervous", "uneasy", "tense", "scared"],
        _ => &["calm", "indifferent", "relaxed"],
    }
}

const TOPICS: [&str; 12] = [
    "the interview",
    "my brother's visit",
    "the exam results",
    "this project",
    "the new apartment",
    "the meeting",
    "the phone call",
    "the trip",
    "the test",
    "the dinner",
    "my old car",
    "the letter",
];

/// Honest subtitles: the words agree with the emotion. `{}` is the topic.
fn honest_lines(emotion: &str) -> &'static [&'static str] {
    match emotion {
        "happy" => &[
            "I can't believe how well {} went, this is wonderful!",
            "Honestly, {} made my whole week.",
            "We did it, {} is finally done and it's great.",
            "I love it, {} turned out perfect.",
        ],
        "sad" => &[
            "I really thought {} would work out this time.",
            "Nobody even asked me about {}.",
            "I miss how things were before {}.",
            "It's over, {} just fell apart.",
        ],
        "angry" => &[
            "How many times do I have to say it, {} is not my fault!",
            "This is ridiculous, they ruined {} again!",
            "Don't you dare blame me for {}.",
            "I'm done, {} was a complete disaster because of you.",
        ],
        "surprise" => &[
            "Wait, what? {} is happening today?",
            "No way, you finished {} already?",
            "Really? I had no idea about {}!",
            "Oh! I never expected {} to look like this.",
        ],
        "worried" => &[
            "What if {} goes wrong again?",
            "I keep thinking something bad will happen with {}.",
            "I'm not sure I'm ready for {}, what if I fail?",
            "Have you heard anything about {}? I can't stop checking.",
        ],
        _ => &[
            "The report on {} is on the table.",
            "We talked about {} on Tuesday.",
            "I'll send you the details of {} later.",
            "So {} starts at nine tomorrow.",
        ],
    }
}

/// Misleading subtitles: the words say something the voice and face do not.
fn conflict_lines(emotion: &str) -> Option<(&'static str, &'static [&'static str])> {
    match emotion {
        "angry" => Some((
            "sarcasm",
            &[
                "Oh great, {} again. Just what I needed, wonderful.",
                "Perfect, {} went exactly as planned. Lovely.",
                "Sure, I just love dealing with {}. Fantastic.",
            ],
        )),
        "sad" => Some((
            "masking",
            &[
                "I'm fine, really, {} doesn't matter to me.",
                "It's okay, {} was fine, don't worry about me.",
                "No, I'm good. {} is all good.",
            ],
        )),
        "worried" => Some((
            "masking",
            &[
                "Everything is fine with {}, totally fine.",
                "No problem at all, {} will be great.",
            ],
        )),
        "happy" => Some((
            "understatement",
            &[
                "Well, {} was okay, I suppose.",
                "It's whatever, {} happened.",
            ],
        )),
        _ => None,
    }
}

/// One generated sample before it is written.
struct Sample {
    record: Record,
    audio: Vec<i16>,
    frames: Vec<Frame>,
}

fn vary(rng: &mut SplitMix64, x: f64, rel: f64) -> f64 {
    x * (1.0 + rel * rng.normal()).max(0.2)
}

fn pitch_words(f0: f64) -> &'static str {
    if f0 > 205.0 {
        "high-pitched"
    } else if f0 < 150.0 {
        "low-pitched"
    } else {
        "mid-pitched"
    }
}

fn contour_words(emotion: &str, range: f64) -> &'static str {
    match emotion {
        "surprise" => "with a steep rise at the end of the phrase",
        "sad" => "with a flat contour that sinks toward the end",
        "angry" => "flat but punctuated by sharp, forceful accents",
        "happy" if range > 0.2 => "with a lively rise-and-fall melody",
        "happy" => "with a moderately lively melody",
        "worried" => "with a slight quaver and hesitant pauses",
        _ => "with an even, steady contour",
    }
}

fn energy_words(energy: f64) -> &'static str {
    if energy > 0.85 {
        "very loud"
    } else if energy > 0.6 {
        "strong"
    } else if energy > 0.4 {
        "moderate"
    } else {
        "soft, low"
    }
}

fn tempo_words(tempo: f64) -> &'static str {
    if tempo > 5.4 {
        "fast"
    } else if tempo < 3.5 {
        "slow"
    } else {
        "moderate"
    }
}

fn face_words(emotion: &str) -> &'static str {
    match emotion {
        "happy" => "the mouth corners are pulled up into a smile and the eyes narrow slightly, as in a genuine (Duchenne) smile",
        "sad" => "the inner brows are raised, the eyelids droop and the mouth corners turn down",
        "angry" => "the brows are lowered and drawn together, the eyes are narrowed and the lips are pressed into a tight, downturned line",
        "surprise" => "the brows shoot up, the eyes open wide and the jaw drops into an open mouth",
        "worried" => "the inner brows are pulled up and together, the eyes are widened and the lips are tense",
        _ => "the face is relaxed, with level brows, normally open eyes and a flat mouth",
    }
}

/// The basic label as an adjective for prose (`surprise` → `surprised`).
fn adjective(emotion: &str) -> &str {
    match emotion {
        "surprise" => "surprised",
        e => e,
    }
}

/// Draws the emotion, weighted so the neutral class (dropped by HIT and WAF) stays small.
fn draw_emotion(rng: &mut SplitMix64) -> &'static str {
    const WEIGHTS: [f64; 6] = [0.19, 0.19, 0.19, 0.16, 0.17, 0.10];
    let u = rng.uniform();
    let mut acc = 0.0;
    for (e, w) in BASIC_EMOTIONS.iter().zip(WEIGHTS) {
        acc += w;
        if u < acc {
            return e;
        }
    }
    BASIC_EMOTIONS[BASIC_EMOTIONS.len() - 1]
}

fn draw_sentiment(rng: &mut SplitMix64, emotion: &str) -> f64 {
    let magnitude = match emotion {
        "neutral" => return 0.0,
        "angry" => rng.range(1.2, 3.0),
        "happy" => rng.range(1.0, 3.0),
        "sad" => rng.range(0.8, 2.8),
        _ => rng.range(0.4, 2.0),
    };
    let positive = match emotion {
        "happy" => true,
        "surprise" => rng.uniform() < 0.7,
        _ => false,
    };
    let rounded = (magnitude * 10.0).round() / 10.0;
    if positive {
        rounded
    } else {
        -rounded
    }
}

/// Synthesizes the utterance: voiced syllables of summed harmonics shaped by vowel formants,
/// pitch following the emotion's contour, syllable envelopes, pauses and a little breath noise.
fn synth_audio(rng: &mut SplitMix64, emotion: &str, p: &Prosody) -> Vec<i16> {
    const VOWELS: [(f64, f64); 5] = [
        (730.0, 1090.0),
        (270.0, 2290.0),
        (530.0, 1840.0),
        (570.0, 840.0),
        (300.0, 870.0),
    ];
    let sr = f64::from(SAMPLE_RATE);
    let syllables = 5 + rng.below(4);
    let lead = (0.08 * sr) as usize;
    let mut out: Vec<f64> = vec![0.0; lead];
    let mut phase = 0.0f64;
    for s in 0..syllables {
        let u0 = s as f64 / syllables as f64;
        let dur = rng.range(0.75, 1.25) / p.tempo;
        let n = (dur * sr) as usize;
        let (f1, f2) = *rng.pick(&VOWELS);
        let accent: f64 = if emotion == "angry" && rng.uniform() < 0.4 {
            1.35
        } else {
            1.0
        };
        let amp = p.energy * rng.range(0.85, 1.0) * accent.min(1.15);
        for i in 0..n {
            let t = i as f64 / sr;
            let u = u0 + (i as f64 / n as f64) / syllables as f64;
            let contour = match emotion {
                "happy" => 1.0 + p.range * (std::f64::consts::PI * u * 2.0).sin(),
                "sad" => 1.0 + p.range - 2.5 * p.range * u,
                "angry" => 1.0 + p.range * (accent - 1.0) * 3.0 * (1.0 - i as f64 / n as f64),
                "surprise" => 1.0 - 0.3 * p.range + p.range * 1.6 * u * u,
                _ => 1.0 + p.range * (0.5 - u) * 0.5,
            };
            let tremor = 1.0 + p.tremor * (std::f64::consts::TAU * 6.0 * t).sin();
            let f0 = p.f0 * contour * tremor;
            phase += std::f64::consts::TAU * f0 / sr;
            let mut v = 0.0;
            for k in 1..=12 {
                let fk = f0 * k as f64;
                if fk > sr / 2.0 {
                    break;
                }
                let formant = (-((fk - f1) / 110.0).powi(2)).exp()
                    + 0.6 * (-((fk - f2) / 140.0).powi(2)).exp()
                    + 0.25 / k as f64;
                v += formant * (phase * k as f64).sin();
            }
            let attack = (t / 0.02).min(1.0);
            let release = ((dur - t) / 0.04).clamp(0.0, 1.0);
            out.push(0.35 * amp * attack * release * v);
        }
        let pause = if emotion == "worried" && rng.uniform() < 0.35 {
            rng.range(0.15, 0.3)
        } else if emotion == "sad" {
            rng.range(0.08, 0.16)
        } else {
            rng.range(0.02, 0.07)
        };
        out.extend(std::iter::repeat_n(0.0, (pause * sr) as usize));
    }
    out.extend(std::iter::repeat_n(0.0, lead));
    let noise = 0.004 + 0.006 * p.energy;
    out.iter()
        .map(|x| {
            let y = (x + noise * rng.normal()).clamp(-1.0, 1.0);
            (y * 32000.0).round() as i16
        })
        .collect()
}

fn set_px(frame: &mut Frame, x: i64, y: i64, c: [u8; 3]) {
    if x < 0 || y < 0 || x >= i64::from(frame.width) || y >= i64::from(frame.height) {
        return;
    }
    let i = (y as usize * frame.width as usize + x as usize) * 3;
    frame.rgb[i..i + 3].copy_from_slice(&c);
}

fn fill_ellipse(frame: &mut Frame, cx: f64, cy: f64, rx: f64, ry: f64, c: [u8; 3]) {
    if rx <= 0.0 || ry <= 0.0 {
        return;
    }
    let (x0, x1) = ((cx - rx).floor() as i64, (cx + rx).ceil() as i64);
    let (y0, y1) = ((cy - ry).floor() as i64, (cy + ry).ceil() as i64);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let dx = (x as f64 + 0.5 - cx) / rx;
            let dy = (y as f64 + 0.5 - cy) / ry;
            if dx * dx + dy * dy <= 1.0 {
                set_px(frame, x, y, c);
            }
        }
    }
}

/// A thick line segment, drawn as overlapping discs.
fn line(frame: &mut Frame, a: (f64, f64), b: (f64, f64), width: f64, c: [u8; 3]) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) * 2.0)
        .ceil()
        .max(1.0) as usize;
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
        fill_ellipse(frame, x, y, width / 2.0, width / 2.0, c);
    }
}

/// Draws one frame at expression intensity `k` (0 = neutral, 1 = apex), with head offset.
fn draw_face(size: u32, face: &Face, k: f64, offset: (f64, f64), bg: [u8; 3]) -> Frame {
    let mut f = Frame {
        width: size,
        height: size,
        rgb: bg
            .iter()
            .copied()
            .cycle()
            .take(size as usize * size as usize * 3)
            .collect(),
    };
    let s = f64::from(size) / 56.0;
    let (cx, cy) = (28.0 * s + offset.0, 29.0 * s + offset.1);
    const SKIN: [u8; 3] = [232, 190, 150];
    const DARK: [u8; 3] = [50, 35, 30];
    const WHITE: [u8; 3] = [250, 250, 250];
    const LIPS: [u8; 3] = [170, 60, 60];
    fill_ellipse(&mut f, cx, cy, 20.0 * s, 24.0 * s, SKIN);
    let eye_y = cy - 5.0 * s;
    let eye_h = 3.0 * s * (1.0 + k * (face.eye_open - 1.0));
    for side in [-1.0, 1.0] {
        let ex = cx + side * 8.0 * s;
        fill_ellipse(&mut f, ex, eye_y, 4.0 * s, eye_h.max(0.6 * s), WHITE);
        fill_ellipse(
            &mut f,
            ex,
            eye_y,
            1.6 * s,
            (eye_h * 0.8).clamp(0.5 * s, 1.6 * s),
            DARK,
        );
        let brow_y = eye_y - 6.0 * s - k * face.brow_height * s;
        let inner = (cx + side * 3.0 * s, brow_y - k * face.brow_inner * s);
        let outer = (cx + side * 13.0 * s, brow_y);
        line(&mut f, inner, outer, 1.8 * s, DARK);
    }
    let my = cy + 11.0 * s;
    let curve = k * face.mouth_curve * s;
    let half = 8.0 * s;
    let steps = (16.0 * s).ceil() as usize;
    let mut prev: Option<(f64, f64)> = None;
    for i in 0..=steps {
        let x = -half + 2.0 * half * i as f64 / steps as f64;
        // Corners move by `curve`; the middle stays, so the lip is a parabola through both.
        let y = my - curve * (x / half).powi(2);
        if let Some(p) = prev {
            line(&mut f, p, (cx + x, y), 1.6 * s, LIPS);
        }
        prev = Some((cx + x, y));
    }
    let open = k * face.mouth_open * s;
    if open > 0.5 {
        fill_ellipse(
            &mut f,
            cx,
            my + open * 0.4,
            3.5 * s + open * 0.3,
            open,
            DARK,
        );
    }
    f
}

fn fill_topic(template: &str, topic: &str) -> String {
    let filled = template.replacen("{}", topic, 1);
    let mut chars = filled.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => filled,
    }
}

fn generate(cfg: &SynthConfig, index: usize) -> Sample {
    let mut rng = SplitMix64::new(cfg.seed, index as u64);
    let id = format!("synth-{index:05}");
    let emotion = draw_emotion(&mut rng);
    let split = if rng.uniform() < cfg.heldout_fraction {
        Split::Heldout
    } else {
        Split::Train
    };
    let base = base_prosody(emotion);
    let prosody = Prosody {
        f0: vary(&mut rng, base.f0, 0.08),
        range: vary(&mut rng, base.range, 0.2),
        energy: vary(&mut rng, base.energy, 0.1).min(1.0),
        tempo: vary(&mut rng, base.tempo, 0.1),
        tremor: base.tremor,
    };
    let bf = base_face(emotion);
    let face = Face {
        brow_inner: bf.brow_inner + 0.4 * rng.normal(),
        brow_height: bf.brow_height + 0.4 * rng.normal(),
        eye_open: vary(&mut rng, bf.eye_open, 0.08),
        mouth_curve: bf.mouth_curve + 0.5 * rng.normal(),
        mouth_open: (bf.mouth_open + 0.4 * rng.normal()).max(0.0),
    };
    let topic = *rng.pick(&TOPICS);
    let conflict = match conflict_lines(emotion) {
        Some((kind, lines)) if rng.uniform() < cfg.conflict_rate => {
            Some((kind, fill_topic(*rng.pick(lines), topic)))
        }
        _ => None,
    };
    let subtitle = match &conflict {
        Some((_, text)) => text.clone(),
        None => fill_topic(*rng.pick(honest_lines(emotion)), topic),
    };
    let sentiment = draw_sentiment(&mut rng, emotion);
    let pool = openset_pool(emotion);
    let first = rng.below(pool.len());
    let second = (first + 1 + rng.below(pool.len() - 1)) % pool.len();
    let mut openset = vec![emotion.to_string(), pool[first].to_string()];
    if rng.uniform() < 0.5 {
        openset.push(pool[second].to_string());
    }
    if let Some(("sarcasm", _)) = conflict.as_ref().map(|(k, t)| (*k, t)) {
        openset.push("sarcastic".to_string());
    }

    let audio = synth_audio(&mut rng, emotion, &prosody);
    let bg = [
        200 + rng.below(40) as u8,
        200 + rng.below(40) as u8,
        200 + rng.below(40) as u8,
    ];
    let frames = (0..cfg.frames)
        .map(|i| {
            let k = if cfg.frames > 1 {
                0.35 + 0.65 * i as f64 / (cfg.frames - 1) as f64
            } else {
                1.0
            };
            let offset = (rng.range(-1.5, 1.5), rng.range(-1.0, 1.0));
            draw_face(cfg.size, &face, k, offset, bg)
        })
        .collect();

    let seconds = audio.len() as f64 / f64::from(SAMPLE_RATE);
    let text_cue = match (&conflict, emotion) {
        (Some(("sarcasm", _)), _) => "sounds positive on the surface, but the exaggerated praise is sarcastic given the voice and face".to_string(),
        (Some(("masking", _)), _) => "claims everything is fine, which the voice and face contradict: the speaker is masking the feeling".to_string(),
        (Some((_, _)), _) => "plays the event down, an understatement that the voice and face do not support".to_string(),
        (None, "neutral") => "is matter-of-fact and carries no emotional wording".to_string(),
        (None, e) => format!("is consistent with the speaker feeling {}", adjective(e)),
    };
    let extra: Vec<&str> = openset[1..]
        .iter()
        .map(String::as_str)
        .filter(|w| *w != "sarcastic")
        .collect();
    let rationale = format!(
        "Audio: over {seconds:.1} s the voice is {} (about {:.0} Hz) {}, with {} energy and a {} pace of about {:.1} syllables per second. \
         Visual: {}. \
         Text: the subtitle \"{}\" {}. \
         Conclusion: weighing the voice and face above the words, the speaker is {}{}; the overall sentiment is {}.",
        pitch_words(prosody.f0),
        prosody.f0,
        contour_words(emotion, prosody.range),
        energy_words(prosody.energy),
        tempo_words(prosody.tempo),
        prosody.tempo,
        face_words(emotion),
        subtitle,
        text_cue,
        adjective(emotion),
        if extra.is_empty() {
            String::new()
        } else {
            format!(", more specifically {}", extra.join(" and "))
        },
        sentiment_word(sentiment),
    );

    let record = Record {
        audio: Some(format!("audio/{id}.wav")),
        video: format!("frames/{id}"),
        id,
        split,
        subtitle,
        rationale: Some(rationale),
        rationale_model: None,
        rationale_prompt: None,
        dataset: None,
        emotion: Some(emotion.to_string()),
        sentiment: Some(sentiment),
        openset: Some(openset),
        conflict: conflict.map(|(k, _)| k.to_string()),
    };
    Sample {
        record,
        audio,
        frames,
    }
}

/// Generates the corpus into `out` (`manifest.jsonl`, `audio/`, `frames/`) and returns the
/// records. Existing files of the same names are overwritten.
pub fn synthesize(
    out: &Path,
    cfg: &SynthConfig,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Record>> {
    if cfg.frames == 0 || cfg.size < 28 {
        anyhow::bail!("synth: need at least 1 frame of at least 28x28 pixels");
    }
    if u64::from(cfg.size).pow(2) > media::MAX_FRAME_PIXELS {
        anyhow::bail!(
            "synth: frames of {0}x{0} pixels have more than the {1} a frame may have (the PNG \
             reader would refuse them)",
            cfg.size,
            media::MAX_FRAME_PIXELS
        );
    }
    if !(0.0..=1.0).contains(&cfg.heldout_fraction) {
        anyhow::bail!(
            "synth: heldout fraction {} is not in [0, 1]",
            cfg.heldout_fraction
        );
    }
    let audio_dir = out.join("audio");
    let frames_dir = out.join("frames");
    for dir in [out, &audio_dir, &frames_dir] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Grown, not preallocated: `n` is a flag or config value, and a large one should run
    // until the disk is full, not fail at once on an impossible allocation.
    let mut records = Vec::new();
    for index in 0..cfg.n {
        let sample = generate(cfg, index);
        if let Some(audio) = &sample.record.audio {
            media::write_wav(&out.join(audio), &sample.audio)?;
        }
        let dir = out.join(&sample.record.video);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, frame) in sample.frames.iter().enumerate() {
            media::write_png(&dir.join(format!("{i:03}.png")), frame)?;
        }
        records.push(sample.record);
        progress(index + 1);
    }
    manifest::write_manifest(&out.join("manifest.jsonl"), &records)?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_larger_than_the_reader_takes_are_refused_before_anything_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        for size in [4097, u32::MAX] {
            let cfg = SynthConfig {
                n: 1,
                frames: 1,
                size,
                ..SynthConfig::default()
            };
            let err = synthesize(dir.path(), &cfg, |_| {})
                .unwrap_err()
                .to_string();
            assert!(err.contains("more than the 16777216"), "{size}: {err}");
        }
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn a_huge_corpus_size_writes_samples_instead_of_failing_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            n: usize::MAX,
            frames: 1,
            ..SynthConfig::default()
        };
        // Stopped from the progress callback once the first sample is written.
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            synthesize(dir.path(), &cfg, |done| {
                if done == 1 {
                    std::panic::panic_any("first sample written");
                }
            })
        }));
        let payload = stopped.expect_err("stopped by the callback");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"first sample written")
        );
        assert!(dir.path().join("audio").is_dir());
    }

    #[test]
    fn sample_does_not_depend_on_corpus_size() {
        let small = SynthConfig {
            n: 3,
            ..SynthConfig::default()
        };
        let large = SynthConfig {
            n: 50,
            ..SynthConfig::default()
        };
        let a = generate(&small, 2);
        let b = generate(&large, 2);
        assert_eq!(a.record, b.record);
        assert_eq!(a.audio, b.audio);
    }

    #[test]
    fn emotional_prosody_is_ordered_as_specified() {
        let cfg = SynthConfig::default();
        let mut f0 = std::collections::HashMap::<String, Vec<f64>>::new();
        for i in 0..120 {
            let s = generate(&cfg, i);
            let rms = (s.audio.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>()
                / s.audio.len() as f64)
                .sqrt();
            f0.entry(s.record.emotion.clone().unwrap_or_default())
                .or_default()
                .push(rms);
        }
        let mean = |e: &str| {
            let v = &f0[e];
            v.iter().sum::<f64>() / v.len() as f64
        };
        assert!(
            mean("angry") > mean("sad") * 1.5,
            "angry speech must be louder than sad"
        );
        assert!(mean("happy") > mean("worried"));
    }

    #[test]
    fn misleading_subtitles_occur_and_are_labelled() {
        let cfg = SynthConfig::default();
        let conflicts: Vec<Record> = (0..200)
            .map(|i| generate(&cfg, i).record)
            .filter(|r| r.conflict.is_some())
            .collect();
        assert!(
            conflicts.len() > 15 && conflicts.len() < 80,
            "{}",
            conflicts.len()
        );
        for r in &conflicts {
            assert_ne!(r.emotion.as_deref(), Some("neutral"));
            let kind = r.conflict.as_deref().unwrap_or_default();
            let stem = &kind[..5];
            assert!(
                r.rationale.as_deref().is_some_and(|t| t.contains(stem)),
                "rationale of a {kind} sample must name it"
            );
        }
    }
}
