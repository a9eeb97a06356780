//! The LLM extraction path against a mock OpenAI-compatible endpoint on 127.0.0.1.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::mock_llm::{emotion_responder, failing_responder, MockLlm};
use omniopsd_mer::extract::{openset_prompt, sentiment_prompt};
use omniopsd_mer::{
    parse_predictions, ApiKey, Error, ExtractionSummary, LlmConfig, LlmExtractor, Pred,
    RetryPolicy, Sampling,
};

const PREDICTIONS: &str = r#"{"dataset":"OV-MERD+","id":"a","gt":"happy","pred":"She is smiling broadly."}
{"dataset":"MELD","id":"b","gt":"sadness","pred":"There are tears in his eyes."}
{"dataset":"MELD","id":"c","gt":"joy","pred":["joyful"]}
{"dataset":"CMU-MOSI","id":"d","gt":1.2,"pred":"A wide smile."}
{"dataset":"CMU-MOSI","id":"e","gt":-0.8,"pred":"More tears."}
{"dataset":"CMU-MOSI","id":"f","gt":-0.4,"pred":null}
{"dataset":"MER2023","id":"g","gt":"happy","pred":"She is smiling broadly."}"#;

fn temp_cache(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("mer-{name}-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn config(url: &str, cache: PathBuf) -> LlmConfig {
    LlmConfig {
        url: url.to_string(),
        model: "qwen2.5-7b-instruct".into(),
        api_key: Some(ApiKey::new("test-key")),
        sampling: Sampling::default(),
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(5),
            ..RetryPolicy::default()
        },
        concurrency: 3,
        cache,
    }
}

#[test]
fn llm_extraction_uses_the_benchmark_prompts_and_a_rerun_is_served_from_cache() {
    let mock = MockLlm::start(emotion_responder);
    let cache = temp_cache("rerun");

    let mut samples = parse_predictions(PREDICTIONS.as_bytes(), "p").unwrap();
    let summary = LlmExtractor::new(config(&mock.url, cache.clone()))
        .unwrap()
        .apply(&mut samples)
        .unwrap();
    // Distinct prompts: 4 open-set (the answer repeated on line g is asked once), then
    // sentiment for "[happy, joyful]" and "[sad]".
    assert_eq!(mock.requests(), 6);
    let ExtractionSummary::Llm {
        prompts,
        cache_hits,
        calls,
        ..
    } = &summary
    else {
        panic!("{summary:?}")
    };
    assert_eq!((*prompts, *cache_hits, *calls), (6, 0, 6));

    assert_eq!(samples[0].pred, Pred::Text("[happy, joyful]".into()));
    assert_eq!(samples[1].pred, Pred::Text("[sad]".into()));
    assert_eq!(samples[2].pred, Pred::List(vec!["joyful".into()]));
    assert_eq!(samples[3].pred, Pred::Text("positive".into()));
    assert_eq!(samples[4].pred, Pred::Text("negative".into()));
    assert_eq!(samples[5].pred, Pred::Missing);

    let bodies = mock.bodies();
    let first: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(first["model"], "qwen2.5-7b-instruct");
    assert_eq!(first["temperature"], 0.7);
    assert_eq!(first["top_p"], 0.8);
    assert_eq!(first["max_tokens"], 512);
    assert_eq!(first["repetition_penalty"], 1.05);
    assert_eq!(first["messages"][0]["role"], "user");
    let sent: Vec<String> = bodies
        .iter()
        .map(|b| {
            serde_json::from_str::<serde_json::Value>(b).unwrap()["messages"][0]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(sent.contains(&openset_prompt("There are tears in his eyes.")));
    assert!(sent.contains(&sentiment_prompt("[happy, joyful]")));
    assert!(mock.authorizations().iter().all(|a| a == "Bearer test-key"));

    // Second run: same answers, no request.
    let mut again = parse_predictions(PREDICTIONS.as_bytes(), "p").unwrap();
    let summary = LlmExtractor::new(config(&mock.url, cache.clone()))
        .unwrap()
        .apply(&mut again)
        .unwrap();
    assert_eq!(mock.requests(), 6);
    assert_eq!(again, samples);
    let ExtractionSummary::Llm {
        cache_hits, calls, ..
    } = summary
    else {
        panic!()
    };
    assert_eq!((cache_hits, calls), (6, 0));
    std::fs::remove_file(&cache).unwrap();
}

#[test]
fn a_change_of_model_does_not_reuse_cached_answers() {
    let mock = MockLlm::start(emotion_responder);
    let cache = temp_cache("model-change");
    let line = r#"{"dataset":"MELD","id":"b","gt":"sadness","pred":"tears"}"#;
    let mut samples = parse_predictions(line.as_bytes(), "p").unwrap();
    LlmExtractor::new(config(&mock.url, cache.clone()))
        .unwrap()
        .apply(&mut samples)
        .unwrap();
    let mut other = config(&mock.url, cache.clone());
    other.model = "another-model".into();
    let mut samples = parse_predictions(line.as_bytes(), "p").unwrap();
    LlmExtractor::new(other)
        .unwrap()
        .apply(&mut samples)
        .unwrap();
    assert_eq!(mock.requests(), 2);
    std::fs::remove_file(&cache).unwrap();
}

#[test]
fn an_endpoint_error_is_reported_with_its_status_and_nothing_is_cached() {
    let mock = MockLlm::start(failing_responder);
    let cache = temp_cache("failing");
    let mut samples = parse_predictions(PREDICTIONS.as_bytes(), "p").unwrap();
    let err = LlmExtractor::new(config(&mock.url, cache.clone()))
        .unwrap()
        .apply(&mut samples)
        .unwrap_err();
    assert!(matches!(err, Error::Llm { .. }), "{err}");
    assert!(err.to_string().contains("HTTP status 500"), "{err}");
    assert!(err.to_string().contains("/v1/chat/completions"), "{err}");
    assert!(!cache.exists() || std::fs::read_to_string(&cache).unwrap().is_empty());
    let _ = std::fs::remove_file(&cache);
}

#[test]
fn an_unreachable_endpoint_is_a_clear_error() {
    // Bind then drop a listener to get a port nobody serves.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = temp_cache("unreachable");
    let mut samples = parse_predictions(PREDICTIONS.as_bytes(), "p").unwrap();
    let err = LlmExtractor::new(config(
        &format!("http://127.0.0.1:{port}/v1"),
        cache.clone(),
    ))
    .unwrap()
    .apply(&mut samples)
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("LLM extraction via http://127.0.0.1:"),
        "{err}"
    );
}

#[test]
fn a_corrupt_cache_line_is_reported_with_its_line_number() {
    let cache = temp_cache("corrupt");
    std::fs::write(
        &cache,
        "{\"key\":\"k\",\"model\":\"m\",\"prompt\":\"p\",\"response\":\"r\"}\nnot json\n",
    )
    .unwrap();
    let err = LlmExtractor::new(config("http://127.0.0.1:9/v1", cache.clone()))
        .err()
        .unwrap();
    assert!(matches!(err, Error::BadCache { line: 2, .. }), "{err}");
    std::fs::remove_file(&cache).unwrap();
}

/// Fails the first request with 503, then answers like [`emotion_responder`].
fn flaky_responder(prompt: &str) -> Result<String, u16> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
        Err(503)
    } else {
        emotion_responder(prompt)
    }
}

#[test]
fn a_transient_server_error_is_retried_by_the_shared_client() {
    let mock = MockLlm::start(flaky_responder);
    let cache = temp_cache("flaky");
    let line = r#"{"dataset":"MELD","id":"b","gt":"sadness","pred":"tears"}"#;
    let mut samples = parse_predictions(line.as_bytes(), "p").unwrap();
    LlmExtractor::new(config(&mock.url, cache.clone()))
        .unwrap()
        .apply(&mut samples)
        .unwrap();
    assert_eq!(mock.requests(), 2, "one 503, one retry");
    assert_eq!(samples[0].pred, Pred::Text("[sad]".into()));
    std::fs::remove_file(&cache).unwrap();
}
