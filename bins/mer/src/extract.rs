//! Turning free-form answers into what the scorer reads: label lists and sentiment words.
//!
//! Two extractors: a deterministic one for structured answers ([`extract_structured`]) and the
//! benchmark's own LLM step ([`LlmExtractor`]): AffectGPT's MER-UniBench pipeline asks
//! Qwen2.5-7B-Instruct (vLLM; temperature 0.7, top-p 0.8, repetition penalty 1.05, 512 new
//! tokens) to list the emotions of a free-form description ([`openset_prompt`]) and, for the
//! sentiment sets, to turn that list into a sentiment word ([`sentiment_prompt`]). Here the model
//! is reached through any OpenAI-compatible `/chat/completions` endpoint with the client, retry
//! policy and cache of `omniopsd-endpoint` (shared with `omniopsd rationale`), and every answer
//! is cached on disk so a rerun makes no call.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use omniopsd_endpoint::{
    chat_completions_url, hex_sha256, run_bounded, ApiKey, Cache, CacheEntry, ChatClient,
    RetryPolicy,
};
use serde::{Deserialize, Serialize};

use crate::dataset::Metric;
use crate::error::{Error, Result};
use crate::labels::py_strip;
use crate::metrics::sentiment_word_from_answer;
use crate::predictions::{Pred, Sample};

/// Which extraction step turns answers into label lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtractMode {
    /// Answers are label lists / sentiment words already.
    None,
    /// The last `<answer>...</answer>` block, else a trailing bracketed list.
    Structured,
    /// The benchmark's LLM extraction prompts through an OpenAI-compatible endpoint.
    Llm,
}

impl ExtractMode {
    pub fn name(self) -> &'static str {
        match self {
            ExtractMode::None => "none",
            ExtractMode::Structured => "structured",
            ExtractMode::Llm => "llm",
        }
    }
}

/// What an extraction run did, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtractionSummary {
    None,
    Structured {
        /// String answers in which a structure was found and extracted.
        extracted: usize,
        /// String answers without structure, scored as they are.
        passed_through: usize,
    },
    Llm {
        url: String,
        model: String,
        /// Distinct prompts the run needed.
        prompts: usize,
        /// Of those, answered from the cache.
        cache_hits: usize,
        /// Of those, sent to the endpoint.
        calls: usize,
        cache: PathBuf,
    },
}

impl ExtractionSummary {
    pub fn mode(&self) -> ExtractMode {
        match self {
            ExtractionSummary::None => ExtractMode::None,
            ExtractionSummary::Structured { .. } => ExtractMode::Structured,
            ExtractionSummary::Llm { .. } => ExtractMode::Llm,
        }
    }
}

/// Finds the last occurrence of `needle` (ASCII case-insensitive) in `haystack` before `end`.
fn rfind_ascii_ci(haystack: &str, needle: &str, end: usize) -> Option<usize> {
    let hay = &haystack.as_bytes()[..end];
    let needle = needle.as_bytes();
    if needle.len() > hay.len() {
        return None;
    }
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// Deterministic extraction from a structured answer, `None` when it has no structure.
///
/// 1. The content of the last `<answer>...</answer>` block (tags matched case-insensitively),
///    stripped.
/// 2. Otherwise a bracketed list that ends the answer (trailing whitespace and one final `.`
///    allowed): the text from the last `[` before the final `]`, brackets included.
pub fn extract_structured(text: &str) -> Option<String> {
    if let Some(close) = rfind_ascii_ci(text, "</answer>", text.len()) {
        if let Some(open) = rfind_ascii_ci(text, "<answer>", close) {
            return Some(py_strip(&text[open + "<answer>".len()..close]).to_string());
        }
    }
    let tail = py_strip(text);
    let tail = tail.strip_suffix('.').map(py_strip).unwrap_or(tail);
    if tail.ends_with(']') {
        if let Some(open) = tail.rfind('[') {
            return Some(tail[open..].to_string());
        }
    }
    None
}

/// Applies [`extract_structured`] to every string answer; JSON lists are kept as they are.
/// On sentiment sets a one-item list answer stands for its word (`[positive]` -> `positive`).
pub fn apply_structured(samples: &mut [Sample]) -> ExtractionSummary {
    let (mut extracted, mut passed_through) = (0, 0);
    for sample in samples.iter_mut() {
        let Pred::Text(text) = &sample.pred else {
            continue;
        };
        match extract_structured(text) {
            Some(answer) => {
                extracted += 1;
                sample.pred = Pred::Text(if sample.dataset.metric() == Metric::Waf {
                    sentiment_word_from_answer(&answer)
                } else {
                    answer
                });
            }
            None => passed_through += 1,
        }
    }
    ExtractionSummary::Structured {
        extracted,
        passed_through,
    }
}

/// AffectGPT's description -> open-vocabulary labels prompt (`reason_to_openset_qwen`).
pub fn openset_prompt(reason: &str) -> String {
    format!(
        "Please assume the role of an expert in the field of emotions. \
We provide clues that may be related to the emotions of the characters. Based on the provided clues, please identify the emotional states of the main character. \
The main character is the one with the most detailed clues. \
Please separate different emotional categories with commas and output only the clearly identifiable emotional categories in a list format. \
If none are identified, please output an empty list. \
Input: We cannot recognize his emotional state; Output: [] \
Input: His emotional state is happy, sad, and angry; Output: [happy, sad, angry] \
Input: {reason}; Output: "
    )
}

/// AffectGPT's open-vocabulary labels -> sentiment prompt (`openset_to_sentiment_qwen`).
///
/// The reference writes it as an indented Python string with `\` line continuations, so each
/// continuation keeps twelve spaces of indentation; they are part of the prompt.
pub fn sentiment_prompt(openset: &str) -> String {
    let gap = " ".repeat(12);
    format!(
        "Please act as an expert in the field of emotions. {gap}\
We provide a few words to describe the emotions of a character. {gap}\
Please choose the most likely sentiment from the given candidates: [positive, negative, neutral] {gap}\
Please direct output answer without analyzing process. {gap}\
Input: [joyful]; Output: positive {gap}\
Input: []; Output: neutral {gap}\
Input: {openset}; Output: "
    )
}

/// AffectGPT's `func_postprocess_qwen`: trims echoed "Output:"-style prefixes and newlines.
pub fn postprocess_response(response: &str) -> String {
    let mut r = py_strip(response);
    for prefix in [
        "输入",
        "输出",
        "翻译",
        "让我们来翻译一下：",
        "output",
        "Output",
        "input",
        "Input",
    ] {
        r = r.strip_prefix(prefix).unwrap_or(r);
    }
    r = py_strip(r);
    r = r.strip_prefix(':').unwrap_or(r);
    r = r.strip_prefix('：').unwrap_or(r);
    let r = py_strip(r).replace('\n', "");
    py_strip(&r).to_string()
}

/// Sampling settings of the extraction model (defaults: the benchmark's vLLM settings).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u32,
    /// vLLM's `repetition_penalty`; `None` leaves it out for servers that reject it.
    pub repetition_penalty: Option<f64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.7,
            top_p: 0.8,
            max_tokens: 512,
            repetition_penalty: Some(1.05),
        }
    }
}

/// Where and how to call the extraction model.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// Base URL (`http://host:8000/v1`) or the full `/chat/completions` URL.
    pub url: String,
    pub model: String,
    pub api_key: Option<ApiKey>,
    pub sampling: Sampling,
    pub timeout: Duration,
    /// When a failed request is sent again (429, 5xx, timeouts).
    pub retry: RetryPolicy,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// The JSONL cache file (created if absent, appended to).
    pub cache: PathBuf,
}

impl LlmConfig {
    /// The `/chat/completions` URL the requests go to.
    pub fn endpoint(&self) -> String {
        chat_completions_url(&self.url)
    }
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// The request body; its JSON text is also what the cache key hashes, so a change of model,
/// prompt or sampling setting never reuses a stale answer.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: [Message<'a>; 1],
    temperature: f64,
    top_p: f64,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    repetition_penalty: Option<f64>,
}

/// One line of the extraction cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheLine {
    /// SHA-256 (hex) of the request body.
    pub key: String,
    pub model: String,
    pub prompt: String,
    /// The raw answer, before [`postprocess_response`].
    pub response: String,
}

impl CacheEntry for CacheLine {
    fn key(&self) -> &str {
        &self.key
    }
}

/// The on-disk extraction cache: one JSON object a line, `{key, model, prompt, response}`,
/// `key` = SHA-256 (hex) of the request body. Answers are appended as they arrive, so an
/// interrupted run keeps what it paid for (the shared [`Cache`] of `omniopsd-endpoint`).
pub type ExtractionCache = Cache<CacheLine>;

/// Maps the shared crate's errors onto this crate's: cache errors keep their file and line,
/// request errors name the endpoint.
fn endpoint_error(url: &str, error: omniopsd_endpoint::Error) -> Error {
    use omniopsd_endpoint::Error as E;
    match error {
        E::Io { path, source } => Error::Io { path, source },
        E::BadCache {
            path,
            line,
            message,
        } => Error::BadCache {
            path,
            line,
            message,
        },
        other => Error::Llm {
            url: url.to_string(),
            message: other.to_string(),
        },
    }
}

/// The benchmark's LLM extraction through an OpenAI-compatible chat endpoint, with caching.
pub struct LlmExtractor {
    config: LlmConfig,
    cache: ExtractionCache,
    client: ChatClient,
    prompts: HashSet<String>,
    cache_hits: usize,
    calls: usize,
}

impl LlmExtractor {
    pub fn new(config: LlmConfig) -> Result<LlmExtractor> {
        let cache =
            Cache::open(&config.cache).map_err(|e| endpoint_error(&config.endpoint(), e))?;
        let client = ChatClient::new(&config.url, config.timeout)
            .with_api_key(config.api_key.clone())
            .with_retry(config.retry.clone());
        Ok(LlmExtractor {
            config,
            cache,
            client,
            prompts: HashSet::new(),
            cache_hits: 0,
            calls: 0,
        })
    }

    fn request_body(&self, prompt: &str) -> String {
        let sampling = &self.config.sampling;
        let request = ChatRequest {
            model: &self.config.model,
            messages: [Message {
                role: "user",
                content: prompt,
            }],
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            max_tokens: sampling.max_tokens,
            repetition_penalty: sampling.repetition_penalty,
        };
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string(&request).unwrap_or_default()
    }

    fn llm_error(&self, message: String) -> Error {
        Error::Llm {
            url: self.config.endpoint(),
            message,
        }
    }

    /// Answers every prompt (post-processed), from the cache or by calling the endpoint with up
    /// to `concurrency` requests in flight. Each new answer is cached as soon as it arrives;
    /// the first failure (after the retry policy gave up) stops the run.
    pub fn complete_all(&mut self, prompts: &[String]) -> Result<Vec<String>> {
        let keyed: Vec<(String, String)> = prompts
            .iter()
            .map(|p| {
                let body = self.request_body(p);
                (hex_sha256(body.as_bytes()), body)
            })
            .collect();
        let mut todo: Vec<usize> = Vec::new();
        let mut seen = HashSet::new();
        for (i, (key, _)) in keyed.iter().enumerate() {
            let cached = self.cache.get(key).is_some();
            if self.prompts.insert(key.clone()) {
                if cached {
                    self.cache_hits += 1;
                } else {
                    self.calls += 1;
                }
            }
            if !cached && seen.insert(key.clone()) {
                todo.push(i);
            }
        }

        let stop = AtomicBool::new(false);
        let url = self.config.endpoint();
        let this = &*self;
        let outcomes = run_bounded(
            &todo,
            this.config.concurrency.clamp(1, 64),
            &stop,
            |_, &i| {
                let (key, body) = &keyed[i];
                let outcome = this
                    .client
                    .complete(body)
                    .and_then(|completion| {
                        this.cache.insert(CacheLine {
                            key: key.clone(),
                            model: this.config.model.clone(),
                            prompt: prompts[i].clone(),
                            response: completion.content,
                        })
                    })
                    .map_err(|e| endpoint_error(&url, e));
                if outcome.is_err() {
                    stop.store(true, Ordering::SeqCst);
                }
                outcome
            },
        );
        if let Some(error) = outcomes.into_iter().flatten().find_map(|o| o.err()) {
            return Err(error);
        }
        keyed
            .iter()
            .map(|(key, _)| {
                self.cache
                    .get(key)
                    .map(|line| postprocess_response(&line.response))
                    .ok_or_else(|| self.llm_error("an answer went missing".into()))
            })
            .collect()
    }

    /// Runs the benchmark's extraction on every sample and replaces its answer.
    ///
    /// Emotion sets: a string answer -> [`openset_prompt`] -> label list. Sentiment sets: a
    /// string answer -> [`openset_prompt`] -> [`sentiment_prompt`] -> sentiment word; a JSON list
    /// answer goes to [`sentiment_prompt`] directly. JSON lists on emotion sets and `null`
    /// answers are kept as they are.
    pub fn apply(&mut self, samples: &mut [Sample]) -> Result<ExtractionSummary> {
        let text_indices: Vec<usize> = samples
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.pred, Pred::Text(_)))
            .map(|(i, _)| i)
            .collect();
        let prompts: Vec<String> = text_indices
            .iter()
            .map(|&i| match &samples[i].pred {
                Pred::Text(t) => openset_prompt(t),
                _ => String::new(),
            })
            .collect();
        let opensets = self.complete_all(&prompts)?;
        for (&i, openset) in text_indices.iter().zip(opensets) {
            samples[i].pred = Pred::Text(openset);
        }

        let sentiment_indices: Vec<usize> = samples
            .iter()
            .enumerate()
            .filter(|(_, s)| s.dataset.metric() == Metric::Waf && s.pred != Pred::Missing)
            .map(|(i, _)| i)
            .collect();
        let prompts: Vec<String> = sentiment_indices
            .iter()
            .map(|&i| match &samples[i].pred {
                Pred::Text(t) => sentiment_prompt(t),
                Pred::List(items) => sentiment_prompt(&format!("[{}]", items.join(", "))),
                Pred::Missing => String::new(),
            })
            .collect();
        let sentiments = self.complete_all(&prompts)?;
        for (&i, sentiment) in sentiment_indices.iter().zip(sentiments) {
            samples[i].pred = Pred::Text(sentiment);
        }

        Ok(ExtractionSummary::Llm {
            url: self.config.endpoint(),
            model: self.config.model.clone(),
            prompts: self.prompts.len(),
            cache_hits: self.cache_hits,
            calls: self.calls,
            cache: self.config.cache.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_answer_block_wins_and_tags_are_case_insensitive() {
        let text = "<answer>[sad]</answer> on reflection <ANSWER> [happy, Excited] </Answer> done";
        assert_eq!(
            extract_structured(text).as_deref(),
            Some("[happy, Excited]")
        );
    }

    #[test]
    fn a_trailing_bracketed_list_is_extracted_with_its_brackets() {
        assert_eq!(
            extract_structured("He smiles [a] and laughs, so: [happy, joyful].\n").as_deref(),
            Some("[happy, joyful]")
        );
        assert_eq!(extract_structured("He seems happy."), None);
        assert_eq!(extract_structured("[happy] he seems"), None);
        assert_eq!(extract_structured("unclosed <answer> happy"), None);
    }

    #[test]
    fn postprocessing_removes_echoed_output_prefixes_and_newlines() {
        assert_eq!(
            postprocess_response("  Output: [happy,\n sad]\n"),
            "[happy, sad]"
        );
        assert_eq!(postprocess_response("输出：[开心]"), "[开心]");
        assert_eq!(postprocess_response("positive"), "positive");
    }

    #[test]
    fn prompts_embed_the_input_verbatim() {
        let p = openset_prompt("He is smiling");
        assert!(p.starts_with(
            "Please assume the role of an expert in the field of emotions. We provide clues"
        ));
        assert!(p.ends_with("Input: He is smiling; Output: "));
        let s = sentiment_prompt("[happy]");
        assert!(s.contains("emotions.             We provide a few words"));
        assert!(s.ends_with("Input: [happy]; Output: "));
    }

    #[test]
    fn endpoint_accepts_a_base_url_or_the_full_path() {
        let mut config = LlmConfig {
            url: "http://127.0.0.1:8000/v1/".into(),
            model: "m".into(),
            api_key: None,
            sampling: Sampling::default(),
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            concurrency: 1,
            cache: PathBuf::from("c.jsonl"),
        };
        assert_eq!(
            config.endpoint(),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
        config.url = "http://h/v1/chat/completions".into();
        assert_eq!(config.endpoint(), "http://h/v1/chat/completions");
    }
}
