//! The HTTP side: one agent, one endpoint, bearer authentication, retries and the budget.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::retry::{jitter_unit, parse_retry_after, Budget, RetryPolicy};

/// An API key. Its `Debug` and `Display` print `***`, so no log line, error or panic message
/// can carry it; the only place the value goes is the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key value.
    pub fn new(value: impl Into<String>) -> ApiKey {
        ApiKey(value.into())
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The `/chat/completions` URL of `url`: a base URL (`http://host:8000/v1`, trailing `/`
/// allowed) gets the path appended; a URL already ending in `/chat/completions` is kept.
pub fn chat_completions_url(url: &str) -> String {
    let base = url.trim().trim_end_matches('/');
    if base.ends_with("/chat/completions") {
        base.to_string()
    } else {
        format!("{base}/chat/completions")
    }
}

/// Token counts, when the endpoint reports `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// The first choice of a chat completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// `choices[0].message.content`; empty when the endpoint sent `null`.
    pub content: String,
    /// `choices[0].finish_reason` (`stop`, `length`, ...), when present.
    pub finish_reason: Option<String>,
    /// Token usage, when reported.
    pub usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

/// What a client has done so far (all counters, read with [`ChatClient::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Of those, retries of a transient failure.
    pub retries: u64,
    /// Answers that reported `usage`.
    pub usage_reported: u64,
    /// Sum of `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// Sum of `usage.completion_tokens`.
    pub completion_tokens: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    usage_reported: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// A client of one OpenAI-compatible chat endpoint, shareable across worker threads.
pub struct ChatClient {
    url: String,
    api_key: Option<ApiKey>,
    agent: ureq::Agent,
    retry: RetryPolicy,
    budget: Budget,
    counters: Counters,
}

impl fmt::Debug for ChatClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatClient")
            .field("url", &self.url)
            .field("api_key", &self.api_key)
            .field("retry", &self.retry)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl ChatClient {
    /// A client of `url` (see [`chat_completions_url`]) with a per-request `timeout`, the
    /// default retry policy, no key and no budget.
    pub fn new(url: &str, timeout: Duration) -> ChatClient {
        ChatClient {
            url: chat_completions_url(url),
            api_key: None,
            agent: ureq::AgentBuilder::new().timeout(timeout).build(),
            retry: RetryPolicy::default(),
            budget: Budget::new(None),
            counters: Counters::default(),
        }
    }

    /// Sends `Authorization: Bearer KEY` with every request.
    pub fn with_api_key(mut self, key: Option<ApiKey>) -> ChatClient {
        self.api_key = key;
        self
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> ChatClient {
        self.retry = retry;
        self
    }

    /// Sends at most `limit` requests in all (`None`: unlimited).
    pub fn with_max_requests(mut self, limit: Option<u64>) -> ChatClient {
        self.budget = Budget::new(limit);
        self
    }

    /// The `/chat/completions` URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The request budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            requests: c.requests.load(Ordering::SeqCst),
            retries: c.retries.load(Ordering::SeqCst),
            usage_reported: c.usage_reported.load(Ordering::SeqCst),
            prompt_tokens: c.prompt_tokens.load(Ordering::SeqCst),
            completion_tokens: c.completion_tokens.load(Ordering::SeqCst),
        }
    }

    /// Posts the JSON `body` and returns the first choice, retrying transient failures as the
    /// policy allows. Every attempt takes one request from the budget first; when it is spent
    /// the answer is [`Error::BudgetSpent`] and nothing more is sent.
    pub fn complete(&self, body: &str) -> Result<Completion> {
        let max_attempts = self.retry.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !self.budget.take() {
                return Err(Error::BudgetSpent {
                    limit: self.budget.limit().unwrap_or(0),
                });
            }
            self.counters.requests.fetch_add(1, Ordering::SeqCst);
            match self.send_once(body) {
                Ok(completion) => {
                    if let Some(usage) = completion.usage {
                        let c = &self.counters;
                        c.usage_reported.fetch_add(1, Ordering::SeqCst);
                        c.prompt_tokens
                            .fetch_add(usage.prompt_tokens, Ordering::SeqCst);
                        c.completion_tokens
                            .fetch_add(usage.completion_tokens, Ordering::SeqCst);
                    }
                    return Ok(completion);
                }
                Err((mut error, retry_after)) => {
                    if !error.is_transient() || attempt >= max_attempts {
                        set_attempts(&mut error, attempt);
                        return Err(error);
                    }
                    self.counters.retries.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(self.retry.delay(attempt, retry_after, jitter_unit()));
                }
            }
        }
    }

    /// One HTTP request; a failure comes with the `Retry-After` wait the endpoint asked for.
    fn send_once(&self, body: &str) -> std::result::Result<Completion, (Error, Option<Duration>)> {
        let mut request = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.set("Authorization", &key.bearer());
        }
        let response = match request.send_string(body) {
            Ok(response) => response,
            Err(ureq::Error::Status(status, response)) => {
                let retry_after = response.header("Retry-After").and_then(parse_retry_after);
                let text = response.into_string().unwrap_or_default();
                let body = text.chars().take(300).collect();
                return Err((
                    Error::Status {
                        status,
                        body,
                        attempts: 1,
                    },
                    retry_after,
                ));
            }
            Err(ureq::Error::Transport(transport)) => {
                let error = Error::Transport {
                    message: transport.to_string(),
                    attempts: 1,
                };
                return Err(match transport.kind() {
                    // A URL that cannot be understood will not be understood next time either.
                    ureq::ErrorKind::InvalidUrl
                    | ureq::ErrorKind::UnknownScheme
                    | ureq::ErrorKind::InsecureRequestHttpsOnly
                    | ureq::ErrorKind::InvalidProxyUrl => (
                        Error::BadResponse {
                            message: transport.to_string(),
                        },
                        None,
                    ),
                    _ => (error, None),
                });
            }
        };
        let text = response.into_string().map_err(|e| {
            (
                Error::Transport {
                    message: format!("cannot read the response body: {e}"),
                    attempts: 1,
                },
                None,
            )
        })?;
        let parsed: ChatResponse = serde_json::from_str(&text).map_err(|e| {
            (
                Error::BadResponse {
                    message: format!("{e}: {}", text.chars().take(300).collect::<String>()),
                },
                None,
            )
        })?;
        let usage = parsed.usage;
        let choice = parsed.choices.into_iter().next().ok_or_else(|| {
            (
                Error::BadResponse {
                    message: "no choices[0]".into(),
                },
                None,
            )
        })?;
        Ok(Completion {
            content: choice.message.content.unwrap_or_default(),
            finish_reason: choice.finish_reason,
            usage,
        })
    }
}

fn set_attempts(error: &mut Error, n: u32) {
    match error {
        Error::Status { attempts, .. } | Error::Transport { attempts, .. } => *attempts = n,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_or_the_full_path_reach_the_same_endpoint() {
        for url in [
            "http://127.0.0.1:8000/v1",
            "http://127.0.0.1:8000/v1/",
            "http://127.0.0.1:8000/v1/chat/completions",
            " http://127.0.0.1:8000/v1/chat/completions/ ",
        ] {
            assert_eq!(
                chat_completions_url(url),
                "http://127.0.0.1:8000/v1/chat/completions"
            );
        }
    }

    #[test]
    fn the_api_key_never_shows_in_debug_or_display() {
        let key = ApiKey::new("sk-very-secret");
        let client =
            ChatClient::new("http://h/v1", Duration::from_secs(1)).with_api_key(Some(key.clone()));
        for text in [format!("{key:?}"), format!("{key}"), format!("{client:?}")] {
            assert!(!text.contains("sk-very-secret"), "{text}");
        }
        assert_eq!(key.bearer(), "Bearer sk-very-secret");
    }

    #[test]
    fn rate_limits_server_errors_and_timeouts_are_transient_other_4xx_are_not() {
        let status = |status| Error::Status {
            status,
            body: String::new(),
            attempts: 1,
        };
        for s in [408, 429, 500, 502, 503, 599] {
            assert!(status(s).is_transient(), "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert!(!status(s).is_transient(), "{s}");
        }
        assert!(Error::Transport {
            message: "timed out".into(),
            attempts: 1
        }
        .is_transient());
        assert!(!Error::BudgetSpent { limit: 3 }.is_transient());
    }
}
