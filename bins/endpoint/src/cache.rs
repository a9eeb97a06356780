//! A content-addressed JSONL file of answers: one JSON object a line, each with a `key` that
//! is the SHA-256 of everything that decides the answer (for chat requests: the request body,
//! which holds the model, the prompt, the media and the sampling settings).
//!
//! Crash safety: an entry is appended as one whole line with a single `write_all`, then
//! `sync_data`, so a killed run loses at most the line being written. On open, a last line
//! without its newline is such a torn append: it is ignored and cut off the file, so the next
//! append starts on a fresh line. A complete line that is not a valid entry is corruption, not
//! a crash, and is an error naming its line. A key written twice (two runs racing) is
//! tolerated; the later line wins.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One line of a [`Cache`].
pub trait CacheEntry: Serialize + DeserializeOwned + Clone {
    /// The content address of the entry.
    fn key(&self) -> &str;
}

/// The cache: every entry of the file in memory, and the file open for appending.
pub struct Cache<T> {
    path: PathBuf,
    entries: Mutex<HashMap<String, T>>,
    file: Mutex<Option<File>>,
}

impl<T: CacheEntry> Cache<T> {
    /// Reads the cache at `path` (a missing file is an empty cache, created on the first
    /// insert) and cuts off a torn last line.
    pub fn open(path: &Path) -> Result<Cache<T>> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let complete = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |last| last + 1);
        if complete < bytes.len() {
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| {
                    f.set_len(complete as u64)?;
                    f.sync_data()
                })
                .map_err(io)?;
        }
        let mut entries = HashMap::new();
        for (index, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let entry: T = serde_json::from_slice(line).map_err(|e| Error::BadCache {
                path: path.to_path_buf(),
                line: index + 1,
                message: format!("invalid cache entry: {e}"),
            })?;
            entries.insert(entry.key().to_string(), entry);
        }
        Ok(Cache {
            path: path.to_path_buf(),
            entries: Mutex::new(entries),
            file: Mutex::new(None),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry stored under `key`.
    pub fn get(&self, key: &str) -> Option<T> {
        lock(&self.entries).get(key).cloned()
    }

    /// Distinct keys held.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `entry` as one line, durably, then makes it visible to [`Cache::get`].
    pub fn insert(&self, entry: T) -> Result<()> {
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| Error::BadCache {
            path: self.path.clone(),
            line: 0,
            message: format!("cannot serialize an entry: {e}"),
        })?;
        line.push(b'\n');
        {
            let mut file = lock(&self.file);
            if file.is_none() {
                *file = Some(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.path)
                        .map_err(io)?,
                );
            }
            if let Some(f) = file.as_mut() {
                f.write_all(&line).map_err(io)?;
                f.sync_data().map_err(io)?;
            }
        }
        lock(&self.entries).insert(entry.key().to_string(), entry);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lower-case hex SHA-256 of `bytes`: the content address.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Entry {
        key: String,
        value: String,
    }

    impl CacheEntry for Entry {
        fn key(&self) -> &str {
            &self.key
        }
    }

    fn entry(key: &str, value: &str) -> Entry {
        Entry {
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn entries_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let cache = Cache::<Entry>::open(&path).unwrap();
        assert!(cache.is_empty() && !path.exists());
        cache.insert(entry("a", "1")).unwrap();
        cache.insert(entry("b", "2")).unwrap();
        let again = Cache::<Entry>::open(&path).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again.get("b"), Some(entry("b", "2")));
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(
            &path,
            "{\"key\":\"a\",\"value\":\"1\"}\n{\"key\":\"b\",\"va",
        )
        .unwrap();
        let cache = Cache::<Entry>::open(&path).unwrap();
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("b"), None);
        cache.insert(entry("c", "3")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"key\":\"a\",\"value\":\"1\"}\n{\"key\":\"c\",\"value\":\"3\"}\n"
        );
    }

    #[test]
    fn a_corrupt_complete_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(&path, "{\"key\":\"a\",\"value\":\"1\"}\nnot json\n").unwrap();
        let err = Cache::<Entry>::open(&path).err().unwrap();
        assert!(matches!(err, Error::BadCache { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("c.jsonl line 2"), "{err}");
    }

    #[test]
    fn a_duplicate_key_is_tolerated_and_the_later_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(
            &path,
            "{\"key\":\"a\",\"value\":\"1\"}\n\n{\"key\":\"a\",\"value\":\"2\"}\n",
        )
        .unwrap();
        let cache = Cache::<Entry>::open(&path).unwrap();
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("a"), Some(entry("a", "2")));
    }

    #[test]
    fn concurrent_inserts_write_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let cache = Cache::<Entry>::open(&path).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let cache = &cache;
                s.spawn(move || {
                    for i in 0..25 {
                        cache
                            .insert(entry(&format!("{t}-{i}"), &"x".repeat(500)))
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(Cache::<Entry>::open(&path).unwrap().len(), 100);
    }

    #[test]
    fn the_content_address_is_sha256_hex() {
        assert_eq!(
            hex_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
