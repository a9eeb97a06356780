//! A path-prefix view of `config.json`, the config-side twin of [`crate::Weights`].

use std::path::Path;

use crate::Error;

/// One JSON object inside `config.json` and the dotted key path that leads to it
/// (`thinker_config.text_config`), so every error names the key as it sits in the file.
#[derive(Clone, Debug)]
pub struct ConfigView<'a> {
    file: &'a Path,
    path: String,
    value: &'a serde_json::Value,
}

impl<'a> ConfigView<'a> {
    pub(crate) fn root(file: &'a Path, value: &'a serde_json::Value) -> Self {
        Self {
            file,
            path: String::new(),
            value,
        }
    }

    /// The full dotted name of `key` inside this view.
    pub fn key(&self, key: &str) -> String {
        if key.is_empty() {
            self.path.clone()
        } else if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The object under `key`; an error naming the file and the full key when it is missing
    /// or not an object.
    pub fn get(&self, key: &str) -> Result<ConfigView<'a>, Error> {
        match self.value.get(key) {
            Some(value) if value.is_object() => Ok(ConfigView {
                file: self.file,
                path: self.key(key),
                value,
            }),
            Some(other) => Err(self.error(key, format!("expected a JSON object, found {other}"))),
            None => Err(self.error(key, "missing".into())),
        }
    }

    /// Whether this object has `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.value.get(key).is_some()
    }

    /// The JSON object itself.
    pub fn json(&self) -> &'a serde_json::Value {
        self.value
    }

    /// The dotted key path of this view (empty at the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The `config.json` this view reads.
    pub fn file(&self) -> &'a Path {
        self.file
    }

    /// Deserializes this object into `T`; the error names the missing or invalid key with
    /// its full path (`thinker_config.text_config.hidden_size`, `rope_scaling.mrope_section[2]`).
    pub fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_path_to_error::deserialize(self.value).map_err(|e| {
            let reason = e.inner().to_string();
            let mut key = e.path().to_string();
            if key == "." {
                key.clear();
            }
            // A missing field is reported at its parent; name the field itself.
            if let Some(field) = reason
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
            {
                key = if key.is_empty() {
                    field.to_string()
                } else {
                    format!("{key}.{field}")
                };
            }
            Error::Config {
                file: self.file.to_path_buf(),
                key: self.key(&key),
                reason,
            }
        })
    }

    /// A config error about `key` of this object, named with its full path.
    pub fn error(&self, key: &str, reason: String) -> Error {
        Error::Config {
            file: self.file.to_path_buf(),
            key: self.key(key),
            reason,
        }
    }
}
