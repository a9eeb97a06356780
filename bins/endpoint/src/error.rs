//! The one error type of this crate. Request errors leave the URL to the caller, which
//! names the endpoint once; none of them ever holds the API key.

use std::path::PathBuf;

/// Everything that can go wrong talking to an endpoint or reading and writing the cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint answered an HTTP error status (after the retries it allows, if any).
    #[error("HTTP status {status} after {attempts} attempt(s): {body}")]
    Status {
        status: u16,
        /// The first 300 characters of the response body.
        body: String,
        attempts: u32,
    },

    /// The request never got an HTTP answer: refused connection, reset, timeout, DNS.
    #[error("{message} (after {attempts} attempt(s))")]
    Transport { message: String, attempts: u32 },

    /// The endpoint answered 200 with something that is not a chat completion.
    #[error("the response is not a chat completion: {message}")]
    BadResponse { message: String },

    /// The run's request budget (`--max-requests`) is spent; the request was not sent.
    #[error("the request budget of {limit} requests is spent")]
    BudgetSpent { limit: u64 },

    /// The cache file cannot be opened, read or appended to.
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A complete line of the cache is not a valid entry.
    #[error("cache {path} line {line}: {message}")]
    BadCache {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl Error {
    /// Whether the request may succeed if sent again (the retry policy's question).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Status { status, .. } => is_transient_status(*status),
            Error::Transport { .. } => true,
            _ => false,
        }
    }
}

/// 408 (request timeout), 429 (rate limited) and every 5xx are worth a retry; other 4xx
/// answers say the request itself is wrong and would fail again.
pub fn is_transient_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..600).contains(&status)
}

/// Shorthand for this crate's results.
pub type Result<T> = std::result::Result<T, Error>;
