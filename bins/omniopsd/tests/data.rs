//! `omniopsd data synth` and `omniopsd data check`, driven through the binary.

mod ffmpeg;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn omniopsd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .args(args)
        .output()
        .expect("the omniopsd binary runs")
}

fn synth(dir: &Path, n: usize, seed: u64) {
    let out = omniopsd(&[
        "data",
        "synth",
        "--quiet",
        "--out",
        dir.to_str().unwrap(),
        "--n",
        &n.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir`, relative path → bytes, sorted.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn check(manifest: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["data", "check", manifest.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = omniopsd(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn lines(manifest: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(manifest)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_lines(manifest: &Path, lines: &[String]) {
    fs::write(manifest, lines.join("\n") + "\n").unwrap();
}

/// A valid 6-sample corpus and its manifest path.
fn corpus() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 6, 11);
    let m = dir.path().join("manifest.jsonl");
    (dir, m)
}

#[test]
fn synth_same_seed_gives_byte_identical_files() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    synth(a.path(), 12, 7);
    synth(b.path(), 12, 7);
    let (ta, tb) = (tree(a.path()), tree(b.path()));
    assert_eq!(ta.len(), 1 + 12 + 12 * 4, "manifest + 12 wavs + 48 frames");
    assert!(ta == tb, "same seed must give byte-identical corpora");
}

#[test]
fn synth_different_seed_gives_different_corpus() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    synth(a.path(), 4, 1);
    synth(b.path(), 4, 2);
    assert!(tree(a.path()) != tree(b.path()));
}

#[test]
fn synth_corpus_uses_the_benchmark_taxonomy_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 60, 3);
    let m = dir.path().join("manifest.jsonl");
    let (ok, text) = check(&m, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("60 samples, all valid"), "{text}");
    let format_csv = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mer/data/format.csv"
    ))
    .unwrap();
    let known: std::collections::HashSet<String> = format_csv
        .lines()
        .skip(1)
        .flat_map(|l| {
            let (name, forms) = l.split_once(',').unwrap();
            std::iter::once(name.to_string()).chain(
                forms
                    .trim_matches('"')
                    .split(',')
                    .map(|f| f.trim().to_string()),
            )
        })
        .collect();
    let mut splits = std::collections::HashSet::new();
    let mut conflicts = 0;
    for v in lines(&m) {
        let emotion = v["emotion"].as_str().unwrap();
        if emotion != "neutral" {
            assert!(
                known.contains(emotion),
                "{emotion} is not a MER-UniBench label"
            );
        }
        for w in v["openset"].as_array().unwrap() {
            let w = w.as_str().unwrap();
            // `neutral` is a real label that the benchmark's tables drop on purpose.
            assert!(
                w == "neutral" || known.contains(w),
                "open-set label {w} is not in format.csv"
            );
        }
        let s = v["sentiment"].as_f64().unwrap();
        assert_eq!(s == 0.0, emotion == "neutral");
        let r = v["rationale"].as_str().unwrap();
        assert!(r.contains("Audio:") && r.contains("Visual:") && r.contains("Text:"));
        splits.insert(v["split"].as_str().unwrap().to_string());
        conflicts += usize::from(v.get("conflict").is_some());
    }
    assert_eq!(splits.len(), 2, "both splits present");
    assert!(conflicts > 0, "some subtitles mislead");
}

#[test]
fn synth_writes_16khz_mono_wav_and_equal_sized_png_frames() {
    let (dir, m) = corpus();
    let first = &lines(&m)[0];
    let wav = dir.path().join(first["audio"].as_str().unwrap());
    let reader = hound::WavReader::open(wav).unwrap();
    assert_eq!(reader.spec().sample_rate, 16_000);
    assert_eq!(reader.spec().channels, 1);
    let secs = reader.duration() as f64 / 16_000.0;
    assert!((0.5..4.0).contains(&secs), "{secs} s");
    let frames = dir.path().join(first["video"].as_str().unwrap());
    let mut names: Vec<_> = fs::read_dir(frames)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 4);
    for p in names {
        let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(p).unwrap()));
        let info = decoder.read_info().unwrap();
        assert_eq!((info.info().width, info.info().height), (56, 56));
    }
}

#[test]
fn check_reports_bad_json_with_its_line_number() {
    let (_dir, m) = corpus();
    let mut ls: Vec<String> = fs::read_to_string(&m)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    ls[2] = "{not json".to_string();
    write_lines(&m, &ls);
    let (ok, text) = check(&m, &[]);
    assert!(!ok);
    assert!(text.contains(":3: bad JSON"), "{text}");
    assert!(text.contains("1 problems on 1 of 6 lines"), "{text}");
}

#[test]
fn check_reports_missing_field_by_name() {
    let (_dir, m) = corpus();
    let mut vs = lines(&m);
    vs[1].as_object_mut().unwrap().remove("subtitle");
    write_lines(&m, &vs.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    let (ok, text) = check(&m, &[]);
    assert!(!ok);
    assert!(
        text.contains(":2: bad sample: missing field `subtitle`"),
        "{text}"
    );
}

#[test]
fn check_reports_missing_audio_beside_a_frame_directory() {
    let (_dir, m) = corpus();
    let mut vs = lines(&m);
    vs[1].as_object_mut().unwrap().remove("audio");
    write_lines(&m, &vs.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    let (ok, text) = check(&m, &[]);
    assert!(!ok);
    assert!(
        text.contains(":2: field `audio` is absent")
            && text.contains(vs[1]["video"].as_str().unwrap())
            && text.contains("no sound track"),
        "{text}"
    );
}

#[test]
fn check_reports_missing_rationale_unless_allowed() {
    let (_dir, m) = corpus();
    let mut vs = lines(&m);
    vs[4].as_object_mut().unwrap().remove("rationale");
    vs[5]["rationale"] = serde_json::json!("  ");
    write_lines(&m, &vs.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    let (ok, text) = check(&m, &[]);
    assert!(!ok);
    assert!(text.contains(":5: missing rationale"), "{text}");
    assert!(text.contains(":6: missing rationale"), "{text}");
    let (ok, text) = check(&m, &["--allow-missing-rationale"]);
    assert!(ok, "{text}");
}

#[test]
fn check_reports_missing_and_corrupt_audio() {
    let (dir, m) = corpus();
    let vs = lines(&m);
    fs::remove_file(dir.path().join(vs[0]["audio"].as_str().unwrap())).unwrap();
    let wav = dir.path().join(vs[3]["audio"].as_str().unwrap());
    let bytes = fs::read(&wav).unwrap();
    fs::write(&wav, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, text) = check(&m, &[]);
    assert!(!ok);
    assert!(
        text.contains(":1: audio") && text.contains("synth-00000.wav: no such file"),
        "{text}"
    );
    assert!(text.contains(":4: audio"), "{text}");
    assert!(
        text.contains("header announces") || text.contains("corrupt sample data"),
        "{text}"
    );
}

#[test]
fn a_wav_at_another_rate_is_resampled_by_ffmpeg_and_without_it_the_error_says_how_to_install() {
    let (dir, m) = corpus();
    let vs = lines(&m);
    let wav = dir.path().join(vs[2]["audio"].as_str().unwrap());
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 44_100,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&wav, spec).unwrap();
    for i in 0..8820 {
        w.write_sample(((i % 100) * 50) as i16).unwrap();
    }
    w.finalize().unwrap();
    let no_ffmpeg = Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .args(["data", "check", m.to_str().unwrap()])
        .env("OMNIOPSD_FFPROBE", dir.path().join("no-ffprobe"))
        .env("OMNIOPSD_FFMPEG", dir.path().join("no-ffmpeg"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&no_ffmpeg.stdout);
    assert!(!no_ffmpeg.status.success());
    assert!(
        text.contains(":3: ") && text.contains("needs FFmpeg") && text.contains(".wav"),
        "{text}"
    );
    if !ffmpeg::required() {
        return;
    }
    let (ok, text) = check(&m, &[]);
    assert!(ok, "{text}");
}

#[test]
fn check_reports_overlong_sample() {
    let (_dir, m) = corpus();
    let (ok, text) = check(&m, &["--max-audio-seconds", "0.5"]);
    assert!(!ok);
    assert!(text.contains("longer than the limit of 0.5 s"), "{text}");
    assert!(
        text.contains(":1: audio") && text.contains(":6: audio"),
        "{text}"
    );
}

#[test]
fn check_reports_missing_corrupt_and_mismatched_frames() {
    let (dir, m) = corpus();
    let vs = lines(&m);
    let v0 = dir.path().join(vs[0]["video"].as_str().unwrap());
    fs::remove_dir_all(&v0).unwrap();
    let v1 = dir.path().join(vs[1]["video"].as_str().unwrap());
    fs::write(v1.join("001.png"), b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    let v2 = dir.path().join(vs[2]["video"].as_str().unwrap());
    fs::copy(v1.join("000.png"), v2.join("009.png")).unwrap();
    let small = dir.path().join("small.png");
    {
        let mut e = png::Encoder::new(fs::File::create(&small).unwrap(), 8, 8);
        e.set_color(png::ColorType::Rgb);
        e.set_depth(png::BitDepth::Eight);
        e.write_header()
            .unwrap()
            .write_image_data(&[0u8; 192])
            .unwrap();
    }
    fs::copy(&small, v2.join("010.png")).unwrap();
    let v3 = dir.path().join(vs[3]["video"].as_str().unwrap());
    for e in fs::read_dir(&v3).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    let (ok, text) = check(&m, &[]);
    assert!(!ok);
    assert!(
        text.contains(":1: video") && text.contains("not a readable directory"),
        "{text}"
    );
    assert!(text.contains(":2: frame") && text.contains("PNG"), "{text}");
    assert!(
        text.contains(":3: frame") && text.contains("size 8x8 differs"),
        "{text}"
    );
    assert!(
        text.contains(":4: video") && text.contains("no PNG frames"),
        "{text}"
    );
}

#[test]
fn check_reports_bad_labels_and_duplicate_ids() {
    let (_dir, m) = corpus();
    let mut vs = lines(&m);
    vs[0]["emotion"] = serde_json::json!("ecstatic");
    vs[1]["sentiment"] = serde_json::json!(7.5);
    vs[2]["openset"] = serde_json::json!([]);
    vs[3]["id"] = vs[4]["id"].clone();
    write_lines(&m, &vs.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    let (ok, text) = check(&m, &[]);
    assert!(!ok);
    assert!(text.contains(":1: field `emotion` is `ecstatic`"), "{text}");
    assert!(text.contains(":2: field `sentiment` is 7.5"), "{text}");
    assert!(text.contains(":3: field `openset` has no label"), "{text}");
    assert!(text.contains(":5: duplicate id"), "{text}");
}

#[test]
fn check_of_a_missing_manifest_is_a_clear_error() {
    let (ok, text) = check(Path::new("/nonexistent/manifest.jsonl"), &[]);
    assert!(!ok);
    assert!(
        text.contains("reading manifest /nonexistent/manifest.jsonl"),
        "{text}"
    );
}

/// A labels file laid out as MELD's release does (`test_sent_emo.csv`), its rows pointing at
/// the synthetic corpus's media through the Utterance_ID column.
fn meld_csv(dir: &Path, emotions: [&str; 3]) -> PathBuf {
    let mut text = String::from(
        "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode\n",
    );
    for (i, e) in emotions.iter().enumerate() {
        text.push_str(&format!(
            "{},\"Oh, really? Line {i}.\",Ross,{e},positive,7,{i},3,4\n",
            i + 1
        ));
    }
    let path = dir.join("test_sent_emo.csv");
    fs::write(&path, text).unwrap();
    path
}

fn import(labels: &Path, media: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "data",
        "import",
        "--labels",
        labels.to_str().unwrap(),
        "--media",
        media.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = omniopsd(&args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const MELD_FLAGS: [&str; 12] = [
    "--dataset",
    "MELD",
    "--id",
    "dia{Dialogue_ID}_utt{Utterance_ID}",
    "--video",
    "frames/synth-0000{Utterance_ID}",
    "--audio",
    "audio/synth-0000{Utterance_ID}.wav",
    "--subtitle",
    "Utterance",
    "--emotion",
    "Emotion",
];

#[test]
fn import_builds_a_meld_manifest_that_check_accepts() {
    let (dir, _) = corpus();
    let labels = meld_csv(dir.path(), ["Joy", "anger", "neutral"]);
    let out = dir.path().join("meld.jsonl");
    let (ok, text) = import(&labels, dir.path(), &out, &MELD_FLAGS);
    assert!(ok, "{text}");
    assert!(
        text.contains("3 samples (0 train, 3 held-out) of MELD"),
        "{text}"
    );
    let vs = lines(&out);
    assert_eq!(vs[0]["id"], "dia7_utt0");
    assert_eq!(vs[0]["dataset"], "MELD");
    assert_eq!(vs[0]["emotion"], "joy", "lower-cased");
    assert_eq!(vs[0]["subtitle"], "Oh, really? Line 0.");
    assert_eq!(
        vs[0]["video"], "frames/synth-00000",
        "relative to the manifest"
    );
    assert!(vs[0].get("sentiment").is_none() && vs[0].get("openset").is_none());
    let (ok, text) = check(&out, &["--allow-missing-rationale"]);
    assert!(ok, "{text}");

    // An existing manifest is kept without --force.
    let before = fs::read(&out).unwrap();
    let (ok, text) = import(&labels, dir.path(), &out, &MELD_FLAGS);
    assert!(!ok && text.contains("--force"), "{text}");
    assert_eq!(fs::read(&out).unwrap(), before);
}

#[test]
fn import_reads_a_sentiment_set_with_its_split_column_from_json() {
    let (dir, _) = corpus();
    // CH-SIMS's label.csv columns, here as JSON.
    let rows = serde_json::json!([
        {"video_id": "synth", "clip_id": "00001", "text": "fine", "label": -0.6, "mode": "train"},
        {"video_id": "synth", "clip_id": "00002", "text": "great", "label": 0.8, "mode": "valid"},
        {"video_id": "synth", "clip_id": "00003", "text": "sure", "label": 0.0, "mode": "test"}
    ]);
    let labels = dir.path().join("label.json");
    fs::write(&labels, rows.to_string()).unwrap();
    let out = dir.path().join("sims").join("manifest.jsonl");
    let flags = [
        "--dataset",
        "CH-SIMS",
        "--id",
        "{video_id}_{clip_id}",
        "--video",
        "frames/{video_id}-{clip_id}",
        "--audio",
        "audio/{video_id}-{clip_id}.wav",
        "--subtitle",
        "text",
        "--sentiment",
        "label",
        "--split-column",
        "mode",
        "--split-map",
        "train=train,valid=train,test=heldout",
    ];
    let (ok, text) = import(&labels, dir.path(), &out, &flags);
    assert!(ok, "{text}");
    let vs = lines(&out);
    let splits: Vec<&str> = vs.iter().map(|v| v["split"].as_str().unwrap()).collect();
    assert_eq!(splits, ["train", "train", "heldout"]);
    assert_eq!(vs[0]["sentiment"], -0.6);
    // Outside the manifest's folder, media paths are absolute.
    assert!(Path::new(vs[0]["video"].as_str().unwrap()).is_absolute());
    let (ok, text) = check(&out, &["--allow-missing-rationale"]);
    assert!(ok, "{text}");
}

#[test]
fn import_errors_name_the_row_and_the_column_or_file_and_write_nothing() {
    let (dir, _) = corpus();
    let out = dir.path().join("meld.jsonl");
    // A label outside MELD's seven.
    let labels = meld_csv(dir.path(), ["joy", "happy", "anger"]);
    let (ok, text) = import(&labels, dir.path(), &out, &MELD_FLAGS);
    assert!(
        !ok && text.contains("line 3") && text.contains("`happy`"),
        "{text}"
    );
    assert!(!out.exists());
    // A column the file lacks.
    let labels = meld_csv(dir.path(), ["joy", "joy", "joy"]);
    let mut flags = MELD_FLAGS.to_vec();
    flags[11] = "Emotions";
    let (ok, text) = import(&labels, dir.path(), &out, &flags);
    assert!(
        !ok && text.contains("no column `Emotions`") && text.contains("line 2"),
        "{text}"
    );
    // A media file that is not there.
    fs::remove_file(dir.path().join("audio/synth-00001.wav")).unwrap();
    let (ok, text) = import(&labels, dir.path(), &out, &MELD_FLAGS);
    assert!(
        !ok && text.contains("synth-00001.wav") && text.contains("line 3"),
        "{text}"
    );
    assert!(!out.exists());
}

#[test]
fn check_validates_each_sample_against_its_own_dataset() {
    let (_dir, m) = corpus();
    let mut vs = lines(&m);
    let o = vs[0].as_object_mut().unwrap();
    o.insert("dataset".into(), "MELD".into());
    o.insert("emotion".into(), "happy".into());
    o.remove("openset");
    vs[1]
        .as_object_mut()
        .unwrap()
        .insert("dataset".into(), "cmu-mosi".into());
    write_lines(&m, &vs.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    let (ok, text) = check(&m, &[]);
    assert!(!ok);
    // Line 1: MELD carries only `emotion`, from its own set.
    assert!(
        text.contains(":1: field `sentiment` is set, but MELD samples carry only `emotion`"),
        "{text}"
    );
    assert!(text.contains(":1: field `emotion` is `happy`, expected one of neutral, surprise, fear, sadness, joy, disgust, anger of MELD"), "{text}");
    // Line 2: the exact spelling.
    assert!(
        text.contains(":2: field `dataset` is `cmu-mosi`: MER-UniBench spells it `CMU-MOSI`"),
        "{text}"
    );
}
