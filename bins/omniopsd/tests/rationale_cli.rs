//! `omniopsd rationale` end to end: the built binary against a scripted OpenAI-compatible
//! server on 127.0.0.1, on a synthetic corpus whose rationales were stripped.

mod common;
mod ffmpeg;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::chat_server::{ChatServer, Reply, Request};
use serde_json::Value;

/// A prompt template that names the sample, so the server can tell samples apart.
const ID_PROMPT: &str = "id={{id}} emotion={{emotion}} subtitle={{subtitle}} media={{media}}";

fn omniopsd(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omniopsd"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("the omniopsd binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Corpus {
    dir: tempfile::TempDir,
    /// The manifest without rationales.
    manifest: PathBuf,
    /// Ids of the training samples (the ones needing a rationale).
    train: Vec<String>,
    /// Gold emotion by id.
    gold: HashMap<String, String>,
}

impl Corpus {
    fn out(&self) -> PathBuf {
        self.dir.path().join("out.jsonl")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A synthetic corpus of `n` samples with every rationale removed.
fn corpus(n: usize) -> Corpus {
    let dir = tempfile::tempdir().unwrap();
    let o = omniopsd(
        &[
            "data",
            "synth",
            "--quiet",
            "--out",
            dir.path().to_str().unwrap(),
            "--n",
            &n.to_string(),
            "--seed",
            "5",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let manifest = dir.path().join("manifest.jsonl");
    let mut lines = Vec::new();
    let (mut train, mut gold) = (Vec::new(), HashMap::new());
    for line in std::fs::read_to_string(&manifest).unwrap().lines() {
        let mut v: Value = serde_json::from_str(line).unwrap();
        v.as_object_mut().unwrap().remove("rationale");
        let id = v["id"].as_str().unwrap().to_string();
        gold.insert(id.clone(), v["emotion"].as_str().unwrap().to_string());
        if v["split"] == "train" {
            train.push(id);
        }
        lines.push(v.to_string());
    }
    assert!(train.len() >= 4, "the corpus needs training samples");
    std::fs::write(&manifest, lines.join("\n") + "\n").unwrap();
    Corpus {
        dir,
        manifest,
        train,
        gold,
    }
}

/// The sample id and gold emotion named by an [`ID_PROMPT`] prompt.
fn id_and_gold(request: &Request) -> (String, String) {
    let prompt = request.prompt();
    let field = |name: &str| {
        prompt
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_default()
            .to_string()
    };
    (field("id="), field("emotion="))
}

/// A valid rationale for the sample an [`ID_PROMPT`] request is about.
fn good_answer(request: &Request) -> Reply {
    let (id, gold) = id_and_gold(request);
    Reply::answer(&format!(
        "Audio: the voice of {id} carries the feeling. Visual: the face agrees. Text: the \
         words alone are ambiguous.\nLabel: {gold}"
    ))
}

fn write_prompt(corpus: &Corpus) -> PathBuf {
    let path = corpus.path("prompt.txt");
    std::fs::write(&path, ID_PROMPT).unwrap();
    path
}

/// `rationale` with the scripted server, the id prompt, fast retries and `extra` flags.
fn rationale(corpus: &Corpus, server: &ChatServer, extra: &[&str]) -> Output {
    rationale_with_env(corpus, &server.url, "frontier-omni", extra, &[])
}

fn rationale_with_env(
    corpus: &Corpus,
    url: &str,
    model: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Output {
    let prompt = write_prompt(corpus);
    let mut args = vec![
        "rationale".to_string(),
        "--manifest".into(),
        corpus.manifest.display().to_string(),
        "--out".into(),
        corpus.out().display().to_string(),
        "--endpoint".into(),
        url.into(),
        "--model".into(),
        model.into(),
        "--prompt-file".into(),
        prompt.display().to_string(),
        "--retry-base-ms".into(),
        "1".into(),
        "--quiet".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    omniopsd(&args, envs)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn summary(corpus: &Corpus) -> Value {
    let path = corpus.path("out.jsonl.summary.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cache_lines(corpus: &Corpus) -> Vec<Value> {
    lines(&corpus.path("out.jsonl.cache.jsonl"))
}

/// Ids of the output manifest that carry a rationale.
fn ids_with_rationale(out: &Path) -> BTreeSet<String> {
    lines(out)
        .iter()
        .filter(|v| v["rationale"].is_string())
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

fn set(ids: &[String]) -> BTreeSet<String> {
    ids.iter().cloned().collect()
}

#[test]
fn requests_carry_frames_audio_model_and_the_key_from_the_named_variable_never_shown() {
    let c = corpus(8);
    let server = ChatServer::start(good_answer);
    let input_before = std::fs::read(&c.manifest).unwrap();
    let o = rationale_with_env(
        &c,
        &server.url,
        "frontier-omni",
        &["--api-key-env", "OMNIOPSD_TEST_KEY", "--max-frames", "3"],
        &[("OMNIOPSD_TEST_KEY", "sk-secret")],
    );
    assert!(o.status.success(), "{}", text(&o));

    let requests = server.requests();
    assert_eq!(requests.len(), c.train.len());
    let b64 = base64::engine::general_purpose::STANDARD;
    for r in &requests {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.authorization.as_deref(), Some("Bearer sk-secret"));
        assert_eq!(r.body["model"], "frontier-omni");
        let parts = r.body["messages"][0]["content"].as_array().unwrap();
        assert_eq!(parts[0]["type"], "text");
        let (id, gold) = id_and_gold(r);
        assert_eq!(c.gold[&id], gold, "the prompt carries the gold label");
        // 4 synthetic frames, sampled down to 3, then the audio.
        assert!(r
            .prompt()
            .contains("media=3 video frames in time order and the audio track"));
        let images: Vec<&Value> = parts.iter().filter(|p| p["type"] == "image_url").collect();
        assert_eq!(images.len(), 3);
        for image in images {
            let url = image["image_url"]["url"].as_str().unwrap();
            let data = url.strip_prefix("data:image/png;base64,").unwrap();
            assert!(b64.decode(data).unwrap().starts_with(b"\x89PNG"));
        }
        let audio = parts.last().unwrap();
        assert_eq!(audio["type"], "input_audio");
        assert_eq!(audio["input_audio"]["format"], "wav");
        let wav = b64
            .decode(audio["input_audio"]["data"].as_str().unwrap())
            .unwrap();
        let on_disk = std::fs::read(c.path(&format!("audio/{id}.wav"))).unwrap();
        assert_eq!(wav, on_disk, "the audio is the WAV file's bytes");
    }

    // The key appears nowhere but in the header.
    for (what, bytes) in [
        ("stdout", o.stdout.clone()),
        ("stderr", o.stderr.clone()),
        ("out", std::fs::read(c.out()).unwrap()),
        (
            "cache",
            std::fs::read(c.path("out.jsonl.cache.jsonl")).unwrap(),
        ),
        (
            "summary",
            std::fs::read(c.path("out.jsonl.summary.json")).unwrap(),
        ),
    ] {
        assert!(
            !String::from_utf8_lossy(&bytes).contains("sk-secret"),
            "{what} shows the key"
        );
    }

    // The input is untouched; the output has every training rationale and its provenance.
    assert_eq!(std::fs::read(&c.manifest).unwrap(), input_before);
    let out = lines(&c.out());
    assert_eq!(out.len(), c.gold.len());
    for v in &out {
        if v["split"] == "train" {
            let id = v["id"].as_str().unwrap();
            assert!(v["rationale"].as_str().unwrap().contains(id));
            assert_eq!(v["rationale_model"], "frontier-omni");
            assert!(v["rationale_prompt"]
                .as_str()
                .unwrap()
                .starts_with("prompt.txt@"));
        } else {
            assert!(
                v.get("rationale").is_none(),
                "held-out samples are left alone"
            );
        }
    }
    let s = summary(&c);
    assert_eq!(s["needed"], c.train.len());
    assert_eq!(s["written"], c.train.len());
    assert_eq!(s["cached"], 0);
    assert_eq!(s["requests"], c.train.len());
    assert_eq!(s["prompt_tokens"], 100 * c.train.len());
    assert_eq!(s["completion_tokens"], 20 * c.train.len());
    assert!(text(&o).contains(&format!("{} written, 0 failed", c.train.len())));
}

#[test]
fn no_audio_and_no_frames_leave_those_parts_out() {
    let c = corpus(6);
    let server = ChatServer::start(good_answer);
    let o = rationale(&c, &server, &["--no-audio", "--no-frames"]);
    assert!(o.status.success(), "{}", text(&o));
    for r in server.requests() {
        let parts = r.body["messages"][0]["content"].as_array().unwrap();
        assert_eq!(parts.len(), 1, "{parts:?}");
        assert!(r.prompt().contains("media=no media, only the subtitle"));
        assert!(r.authorization.is_none());
    }
}

#[test]
fn a_rerun_makes_zero_requests_and_writes_the_same_manifest() {
    let c = corpus(8);
    let server = ChatServer::start(good_answer);
    let o = rationale(&c, &server, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let first = std::fs::read(c.out()).unwrap();
    let sent = server.requests().len();
    assert_eq!(sent, c.train.len());

    // Without --force an existing OUT is refused before any request.
    let o = rationale(&c, &server, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("already exists; pass --force"),
        "{}",
        text(&o)
    );

    let o = rationale(&c, &server, &["--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        server.requests().len(),
        sent,
        "the rerun must not call the endpoint"
    );
    assert_eq!(std::fs::read(c.out()).unwrap(), first);
    let s = summary(&c);
    assert_eq!(
        (s["cached"].as_u64(), s["requests"].as_u64()),
        (Some(sent as u64), Some(0))
    );

    // A different model is a different content address: asked again.
    let o = rationale_with_env(&c, &server.url, "other-model", &["--force"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(server.requests().len(), 2 * sent);
}

#[test]
fn a_rate_limit_is_waited_out_and_then_succeeds() {
    let c = corpus(6);
    let server = ChatServer::start(|r: &Request| {
        if r.index == 0 {
            Reply::status(429).with_header("Retry-After", "1")
        } else {
            good_answer(r)
        }
    });
    let o = rationale(&c, &server, &["--concurrency", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let requests = server.requests();
    assert_eq!(requests.len(), c.train.len() + 1);
    assert_eq!(
        requests[0].body, requests[1].body,
        "the rate-limited request is sent again unchanged"
    );
    let s = summary(&c);
    assert_eq!(s["retries"], 1);
    assert_eq!(s["written"], c.train.len());
    assert_eq!(ids_with_rationale(&c.out()), set(&c.train));
}

#[test]
fn a_500_storm_ends_in_a_clear_report_keeping_the_finished_samples() {
    let c = corpus(8);
    let healthy = AtomicUsize::new(2);
    let server = ChatServer::start(move |r: &Request| {
        if healthy.load(Ordering::SeqCst) > r.index {
            good_answer(r)
        } else {
            Reply::status(500)
        }
    });
    let o = rationale(&c, &server, &["--concurrency", "1", "--max-attempts", "3"]);
    assert!(!o.status.success());
    let report = text(&o);
    let failed = c.train.len() - 2;
    assert!(
        report.contains(&format!(
            "{failed} of {} samples still lack a rationale",
            c.train.len()
        )),
        "{report}"
    );
    assert!(
        report.contains("HTTP status 500 after 3 attempt(s)"),
        "{report}"
    );
    // Every attempt was made: 2 successes, 3 tries for each failed sample.
    assert_eq!(server.requests().len(), 2 + 3 * failed);

    // Nothing finished is lost: OUT and the cache hold the two, the summary names the rest.
    let done = ids_with_rationale(&c.out());
    assert_eq!(done.len(), 2);
    assert_eq!(cache_lines(&c).len(), 2);
    let s = summary(&c);
    let failed_ids: BTreeSet<String> = s["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed_ids.len(), failed);
    assert!(failed_ids.is_disjoint(&done));
    assert_eq!(&failed_ids | &done, set(&c.train));

    // `data check` names the samples still lacking one.
    let o = omniopsd(&["data", "check", c.out().to_str().unwrap()], &[]);
    assert!(!o.status.success());
    let check = text(&o);
    for id in &failed_ids {
        assert!(check.contains(id.as_str()), "{check}");
    }

    // Once the server recovers, a rerun asks only for the failed samples.
    drop(server);
    let server = ChatServer::start(good_answer);
    let o = rationale(&c, &server, &["--force"]);
    assert!(o.status.success(), "{}", text(&o));
    let asked: BTreeSet<String> = server.requests().iter().map(|r| id_and_gold(r).0).collect();
    assert_eq!(asked, failed_ids);
    assert_eq!(ids_with_rationale(&c.out()), set(&c.train));
}

#[test]
fn a_killed_run_resumes_without_repeating_finished_samples_or_tearing_lines() {
    let c = corpus(12);
    let slow =
        ChatServer::start(|r: &Request| good_answer(r).with_delay(Duration::from_millis(300)));
    let prompt = write_prompt(&c);
    let mut child = Command::new(env!("CARGO_BIN_EXE_omniopsd"))
        .args([
            "rationale",
            "--manifest",
            c.manifest.to_str().unwrap(),
            "--out",
            c.out().to_str().unwrap(),
            "--endpoint",
            &slow.url,
            "--model",
            "frontier-omni",
            "--prompt-file",
            prompt.to_str().unwrap(),
            "--concurrency",
            "2",
            "--quiet",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cache = c.path("out.jsonl.cache.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = std::fs::read_to_string(&cache)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no answer was cached in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !c.out().exists(),
        "a killed run leaves no OUT, torn or whole"
    );

    // What the killed run finished: the complete cache lines (a torn last one may follow).
    let text_after_kill = std::fs::read_to_string(&cache).unwrap();
    let finished: BTreeSet<String> = text_after_kill
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!finished.is_empty());
    assert!(
        finished.len() < c.train.len(),
        "the kill came too late to test a resume"
    );

    drop(slow);
    let server = ChatServer::start(good_answer);
    let o = rationale(&c, &server, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let asked: Vec<String> = server.requests().iter().map(|r| id_and_gold(r).0).collect();
    let asked_set: BTreeSet<String> = asked.iter().cloned().collect();
    assert_eq!(asked.len(), asked_set.len(), "no sample asked twice");
    assert!(
        asked_set.is_disjoint(&finished),
        "finished samples were asked again"
    );
    assert_eq!(&asked_set | &finished, set(&c.train));

    // Every line of OUT and of the cache is whole JSON, one per sample, no duplicate.
    let out = lines(&c.out());
    let ids: BTreeSet<&str> = out.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!((out.len(), ids.len()), (c.gold.len(), c.gold.len()));
    assert_eq!(ids_with_rationale(&c.out()), set(&c.train));
    let cached = cache_lines(&c);
    let cached_ids: BTreeSet<&str> = cached.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(
        (cached.len(), cached_ids.len()),
        (c.train.len(), c.train.len())
    );
}

#[test]
fn at_most_concurrency_requests_are_in_flight() {
    let c = corpus(12);
    let server =
        ChatServer::start(|r: &Request| good_answer(r).with_delay(Duration::from_millis(50)));
    let o = rationale(&c, &server, &["--concurrency", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(server.requests().len(), c.train.len());
    let peak = server.peak_in_flight();
    assert!(
        (1..=2).contains(&peak),
        "peak {peak} in flight with --concurrency 2"
    );
}

#[test]
fn an_invalid_answer_is_asked_once_more_then_reported_failed() {
    let c = corpus(8);
    let refuser = c.train[0].clone();
    let wrong_once = c.train[1].clone();
    let seen: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    let truncated_once = c.train[2].clone();
    let (r_id, w_id, t_id) = (refuser.clone(), wrong_once.clone(), truncated_once.clone());
    let server = ChatServer::start(move |r: &Request| {
        let (id, gold) = id_and_gold(r);
        let n = {
            let mut seen = seen.lock().unwrap();
            let n = seen.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if id == r_id {
            Reply::answer("I can't help with identifying emotions.")
        } else if id == w_id && n == 1 {
            let other = if gold == "happy" { "sad" } else { "happy" };
            Reply::answer(&format!("Audio: flat.\nLabel: {other}"))
        } else if id == t_id && n == 1 {
            Reply::completion("Audio: the voice", "length")
        } else {
            good_answer(r)
        }
    });
    let o = rationale(&c, &server, &["--concurrency", "2"]);
    assert!(!o.status.success());
    let report = text(&o);
    assert!(
        report.contains(&format!(
            "failed {refuser}: invalid answer twice: the model refused"
        )),
        "{report}"
    );
    let per_id = |id: &str| {
        server
            .requests()
            .iter()
            .filter(|r| id_and_gold(r).0 == id)
            .count()
    };
    assert_eq!(per_id(&refuser), 2, "asked once more, then given up");
    assert_eq!(per_id(&wrong_once), 2);
    assert_eq!(per_id(&truncated_once), 2);
    let done = ids_with_rationale(&c.out());
    assert!(
        !done.contains(&refuser),
        "a refusal is never written as a rationale"
    );
    assert!(
        done.contains(&wrong_once),
        "the second, valid answer is kept"
    );
    assert!(done.contains(&truncated_once));
    assert_eq!(done.len(), c.train.len() - 1);
    let s = summary(&c);
    assert_eq!(s["failed"].as_array().unwrap().len(), 1);
    // refuser + wrong label + truncated were each asked again once.
    assert_eq!(s["validation_retries"], 3);
    // No cache line holds an invalid answer.
    for line in cache_lines(&c) {
        let r = line["rationale"].as_str().unwrap();
        assert!(r.starts_with("Audio: the voice of"), "{r}");
    }
}

#[test]
fn the_request_budget_stops_the_run_and_reports_the_rest() {
    let c = corpus(8);
    let server = ChatServer::start(good_answer);
    let o = rationale(&c, &server, &["--concurrency", "1", "--max-requests", "2"]);
    assert!(!o.status.success());
    assert_eq!(server.requests().len(), 2);
    assert_eq!(ids_with_rationale(&c.out()).len(), 2);
    let s = summary(&c);
    let failed = s["failed"].as_array().unwrap();
    assert_eq!(failed.len(), c.train.len() - 2);
    for f in failed {
        assert!(
            f["reason"].as_str().unwrap().contains("request budget"),
            "{f}"
        );
    }
}

#[test]
fn a_missing_key_variable_is_an_error_naming_it() {
    let c = corpus(6);
    let server = ChatServer::start(good_answer);
    let o = rationale(&c, &server, &["--api-key-env", "OMNIOPSD_TEST_NO_SUCH_KEY"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("the environment variable OMNIOPSD_TEST_NO_SUCH_KEY is not set"),
        "{}",
        text(&o)
    );
    assert!(server.requests().is_empty());
    assert!(!c.out().exists());
}

#[test]
fn out_equal_to_the_input_is_refused() {
    let c = corpus(6);
    let before = std::fs::read(&c.manifest).unwrap();
    let o = omniopsd(
        &[
            "rationale",
            "--manifest",
            c.manifest.to_str().unwrap(),
            "--out",
            c.dir
                .path()
                .join(".")
                .join("manifest.jsonl")
                .to_str()
                .unwrap(),
            "--endpoint",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
            "--force",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("is the input manifest"), "{}", text(&o));
    assert_eq!(std::fs::read(&c.manifest).unwrap(), before);
}

#[test]
fn include_heldout_also_asks_for_the_held_out_samples() {
    let c = corpus(10);
    assert!(
        c.gold.len() > c.train.len(),
        "the corpus needs held-out samples"
    );
    let server = ChatServer::start(good_answer);
    let o = rationale(&c, &server, &["--include-heldout"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(server.requests().len(), c.gold.len());
    let all: Vec<String> = c.gold.keys().cloned().collect();
    assert_eq!(ids_with_rationale(&c.out()), set(&all));
    let o = omniopsd(&["data", "check", c.out().to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn an_endpoint_refusing_the_audio_part_is_reported_with_the_no_audio_hint() {
    let c = corpus(6);
    let server = ChatServer::start(|r: &Request| {
        let parts = r.body["messages"][0]["content"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if parts.iter().any(|p| p["type"] == "input_audio") {
            Reply::status(400)
        } else {
            good_answer(r)
        }
    });
    let o = rationale(&c, &server, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("HTTP status 400 after 1 attempt(s)"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("try --no-audio"), "{}", text(&o));
    assert_eq!(
        server.requests().len(),
        c.train.len(),
        "a 400 is not retried"
    );
    let o = rationale(&c, &server, &["--force", "--no-audio"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_wrong_endpoint_path_stops_the_run_after_one_request() {
    let c = corpus(8);
    let server = ChatServer::start(good_answer);
    let wrong = format!("{}/nowhere", server.url);
    let o = rationale_with_env(&c, &wrong, "frontier-omni", &["--concurrency", "1"], &[]);
    assert!(!o.status.success());
    // A 404 is final, and every later request would get it too: the run stops.
    assert_eq!(server.requests().len(), 1);
    assert_eq!(server.requests()[0].path, "/v1/nowhere/chat/completions");
    let s = summary(&c);
    let failed = s["failed"].as_array().unwrap();
    assert_eq!(failed.len(), c.train.len());
    assert!(failed[0]["reason"]
        .as_str()
        .unwrap()
        .contains("HTTP status 404"));
    assert!(failed[1..]
        .iter()
        .all(|f| f["reason"].as_str().unwrap().contains("not attempted")));
}

#[test]
fn a_video_file_sends_its_sampled_frames_and_its_own_track_as_16_khz_wav() {
    if !ffmpeg::required() {
        return;
    }
    let c = corpus(6);
    let clip = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference/media/clip_h264.mp4"
    ));
    std::fs::copy(&clip, c.path("clip.mp4")).unwrap();
    let text_of = std::fs::read_to_string(&c.manifest).unwrap();
    let lines: Vec<String> = text_of
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["video"] = "clip.mp4".into();
            v.as_object_mut().unwrap().remove("audio");
            v.to_string()
        })
        .collect();
    std::fs::write(&c.manifest, lines.join("\n") + "\n").unwrap();
    let server = ChatServer::start(good_answer);
    let o = rationale(
        &c,
        &server,
        &[
            "--max-frames",
            "3",
            "--video-min-pixels",
            "3136",
            "--video-max-pixels",
            "9408",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let b64 = base64::engine::general_purpose::STANDARD;
    let requests = server.requests();
    assert_eq!(requests.len(), c.train.len());
    for r in &requests {
        let parts = r.body["messages"][0]["content"].as_array().unwrap();
        let images: Vec<Vec<u8>> = parts
            .iter()
            .filter(|p| p["type"] == "image_url")
            .map(|p| {
                let url = p["image_url"]["url"].as_str().unwrap();
                b64.decode(url.strip_prefix("data:image/png;base64,").unwrap())
                    .unwrap()
            })
            .collect();
        // 4 sampled frames of the 2 s clip, 3 of them sent, at the sampled 56x56.
        assert_eq!(images.len(), 3);
        for png in &images {
            assert!(png.starts_with(b"\x89PNG"));
            assert_eq!(&png[16..24], &[0, 0, 0, 56, 0, 0, 0, 56]);
        }
        let audio = parts.last().unwrap();
        assert_eq!(audio["input_audio"]["format"], "wav");
        let wav = b64
            .decode(audio["input_audio"]["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(wav[24..28].try_into().unwrap()), 16_000);
        // About 2 s of 16-bit mono.
        assert!((60_000..70_000).contains(&wav.len()), "{}", wav.len());
    }
}
