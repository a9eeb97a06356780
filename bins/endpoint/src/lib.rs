//! One way to call an OpenAI-compatible `/chat/completions` endpoint, shared by every command
//! that does (`omniopsd rationale`, `omniopsd eval-mer --extract llm`).
//!
//! - [`ChatClient`]: one HTTP agent, URL normalisation (a base `/v1` URL or the full
//!   `/chat/completions` URL), bearer authentication from an [`ApiKey`] that never appears in
//!   `Debug`, `Display` or an error, and a [`Completion`] with the content, the
//!   `finish_reason` and the token usage when the endpoint reports it.
//! - [`RetryPolicy`]: exponential backoff with full jitter on 429, 408, 5xx, timeouts and
//!   connection errors, honouring `Retry-After`; other 4xx answers are final.
//! - [`Budget`]: an upper bound on the HTTP requests of a run, retries included.
//! - [`Cache`]: a content-addressed JSONL file of answers, appended one whole line at a time,
//!   so a killed run resumes where it stopped.
//! - [`run_bounded`]: a fixed pool of workers, never more than `concurrency` calls in flight.
//!
//! Invariant: knows nothing about prompts, manifests or labels; request bodies in, answers
//! out. Burn-free, so it builds in seconds.

pub mod cache;
pub mod client;
pub mod error;
pub mod retry;
pub mod runner;

pub use cache::{hex_sha256, Cache, CacheEntry};
pub use client::{chat_completions_url, ApiKey, ChatClient, Completion, Stats, Usage};
pub use error::{Error, Result};
pub use retry::{Budget, RetryPolicy};
pub use runner::run_bounded;
