//! A tiny OpenAI-compatible chat endpoint on 127.0.0.1 for extraction tests.
//!
//! It answers `/chat/completions` POSTs with `respond(prompt)`, counts requests, records the
//! request bodies and `Authorization` headers, and stops when dropped or after 60 s at most.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct MockLlm {
    pub url: String,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<String>>>,
    auth: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// What the mock answers; `Err(status)` makes it fail with that HTTP status.
pub type Responder = fn(&str) -> Result<String, u16>;

impl MockLlm {
    pub fn start(respond: Responder) -> MockLlm {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let auth = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (requests, bodies, auth, stop) =
                (requests.clone(), bodies.clone(), auth.clone(), stop.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Some((authorization, body)) = serve(stream, respond) {
                                requests.fetch_add(1, Ordering::SeqCst);
                                bodies.lock().unwrap().push(body);
                                auth.lock().unwrap().push(authorization);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => break,
                    }
                }
            })
        };
        MockLlm {
            url,
            requests,
            bodies,
            auth,
            stop,
            handle: Some(handle),
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    pub fn authorizations(&self) -> Vec<String> {
        self.auth.lock().unwrap().clone()
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Serves one request on `stream`; returns (Authorization header, body).
fn serve(stream: TcpStream, respond: Responder) -> Option<(String, String)> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut content_length = 0usize;
    let mut authorization = String::new();
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.trim().parse().ok()?,
            "authorization" => authorization = value.trim().to_string(),
            _ => {}
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).ok()?;
    let body = String::from_utf8(body).ok()?;
    let prompt = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["messages"][0]["content"].as_str().map(str::to_string))
        .unwrap_or_default();
    let (status, payload) = match (request_line.contains("/v1/chat/completions"), respond(&prompt)) {
        (false, _) => (404, "{\"error\":\"not found\"}".to_string()),
        (true, Ok(content)) => (
            200,
            serde_json::json!({
                "id": "mock",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]
            })
            .to_string(),
        ),
        (true, Err(status)) => (status, "{\"error\":\"mock failure\"}".to_string()),
    };
    let mut stream = stream;
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    stream.write_all(response.as_bytes()).ok()?;
    stream.flush().ok()?;
    Some((authorization, body))
}

/// A deterministic stand-in for the extraction model: emotion words from cue words for the
/// open-vocabulary prompt; positive/negative for the sentiment prompt.
pub fn emotion_responder(prompt: &str) -> Result<String, u16> {
    let input = prompt.rsplit("Input: ").next().unwrap_or("");
    if prompt.contains("Please choose the most likely sentiment") {
        return Ok(if input.contains("happy") {
            "positive"
        } else {
            "negative"
        }
        .to_string());
    }
    Ok(if input.contains("smil") {
        "Output: [happy, joyful]\n".to_string()
    } else if input.contains("tears") {
        "[sad]".to_string()
    } else {
        "[]".to_string()
    })
}

/// Always fails with HTTP 500.
pub fn failing_responder(_: &str) -> Result<String, u16> {
    Err(500)
}
