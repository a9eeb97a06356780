//! Hugging Face checkpoint directories: `config.json`, one or more `*.safetensors` files
//! (sharded with `model.safetensors.index.json`) and an optional `tokenizer.json`.
//!
//! Every safetensors header is validated when the checkpoint is opened (by the `safetensors`
//! crate: header length within the file, JSON, offsets contiguous and inside the data section,
//! byte size = dtype size x shape product), so later reads cannot run past a buffer. Stored
//! f32 / bf16 / f16 tensors are converted to `f32` and handed to the backend, which casts to
//! its own float type.
//!
//! Which layout the directory has (a text-only causal LM, a multimodal thinker, or a thinker
//! nested in a larger model) is decided once, at [`Checkpoint::open`], and handed down as a
//! weight view and a config view at the model's own level ([`Checkpoint::model_weights`],
//! [`Checkpoint::model_config`]); below that level the model crates name their own parts
//! with [`Weights::pp`] and [`ConfigView::get`].
//!
//! [`atomic`] is the project's one way to write a file others read; the exports here and
//! every file of the CLI go through it.

pub mod atomic;
mod config;
mod layout;

pub use config::ConfigView;
pub use layout::Layout;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use serde::Deserialize;

/// Everything that can be wrong with a checkpoint; each variant names the file and, where
/// one is involved, the tensor or config key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: invalid safetensors file: {reason}")]
    InvalidSafetensors { file: PathBuf, reason: String },
    #[error("{file}: invalid JSON: {reason}")]
    InvalidJson { file: PathBuf, reason: String },
    #[error("{file}: config key `{key}`: {reason}")]
    Config {
        file: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    Layout { file: PathBuf, reason: String },
    #[error("{dir}: no *.safetensors file found")]
    NoWeights { dir: PathBuf },
    #[error("{file}: index names tensor `{tensor}` in shard `{shard}`, which {reason}")]
    Index {
        file: PathBuf,
        tensor: String,
        shard: String,
        reason: String,
    },
    #[error("tensor `{tensor}` is defined in both {first} and {second}")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{dir}: tensor `{tensor}` not found in the checkpoint")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error("{file}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape {
        file: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{file}: tensor `{tensor}` has unsupported dtype {dtype} (f32, bf16, f16 are read)")]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{file}: tensor `{tensor}` holds {value} at index {index:?} (first non-finite value); the checkpoint is corrupt or was saved after training diverged")]
    NonFinite {
        file: PathBuf,
        tensor: String,
        index: Vec<usize>,
        value: f32,
    },
    #[error("{file}: export failed: {reason}")]
    Export { file: PathBuf, reason: String },
}

/// Stored floating-point types the reader converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

/// A tensor's location: which shard, its dtype, shape and byte range in that shard's buffer.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    bytes: Vec<u8>,
}

/// An opened checkpoint directory (or a bare safetensors file).
pub struct Checkpoint {
    dir: PathBuf,
    config_path: PathBuf,
    config: serde_json::Value,
    tokenizer: Option<PathBuf>,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
    layout: Layout,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Io {
        file: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value, Error> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::InvalidJson {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// One tensor listed in a validated header: name, dtype, shape, byte range in the buffer.
type HeaderEntry = (String, StDtype, Vec<usize>, usize, usize);

/// Validates a safetensors buffer and lists its tensors with their absolute byte ranges.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<HeaderEntry>, Error> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::InvalidSafetensors {
        file: path.to_path_buf(),
        reason: diagnose_header(bytes).unwrap_or_else(|| e.to_string()),
    })?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            // The view borrows from `bytes`, so its offset is the distance between pointers.
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            let end = start + view.data().len();
            (name, view.dtype(), view.shape().to_vec(), start, end)
        })
        .collect())
}

/// Why a header the safetensors crate refused is wrong, naming the tensor, when one tensor's
/// entry is to blame: its byte range runs past the data section, overlaps or leaves a gap
/// after the previous tensor, or disagrees with its dtype and shape. `None` when the header
/// cannot be read far enough to say (the crate's own message is used then).
fn diagnose_header(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let n = usize::try_from(n).ok()?;
    let data_len = bytes.len().checked_sub(8)?.checked_sub(n)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    let mut entries: Vec<(&str, u64, u64, Option<u64>)> = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets")?.as_array()?;
        let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
        let bits = info
            .get("dtype")
            .and_then(|d| StDtype::deserialize(d).ok())
            .map(|d| d.bitsize() as u64);
        let count = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| {
                dims.iter()
                    .try_fold(1u64, |acc, d| acc.checked_mul(d.as_u64()?))
            });
        let size = bits
            .zip(count)
            .and_then(|(b, c)| b.checked_mul(c))
            .map(|b| b / 8);
        entries.push((name, start, end, size));
    }
    entries.sort_by_key(|&(_, start, end, _)| (start, end));
    let sizes = format!(
        "the data section holds {data_len} bytes (file {} bytes, header {n} bytes)",
        bytes.len()
    );
    let mut covered = 0u64;
    for &(name, start, end, size) in &entries {
        if end < start {
            return Some(format!(
                "tensor `{name}` has data_offsets [{start}, {end}], which end before they start"
            ));
        }
        if end > data_len as u64 {
            return Some(format!(
                "tensor `{name}` has data_offsets [{start}, {end}], past the end of the data: {sizes}"
            ));
        }
        if let Some(size) = size.filter(|&size| size != end - start) {
            return Some(format!(
                "tensor `{name}` has data_offsets [{start}, {end}] ({} bytes), but its dtype and shape need {size} bytes",
                end - start
            ));
        }
        if start != covered {
            let what = if start < covered { "overlap" } else { "gap" };
            return Some(format!(
                "tensor `{name}` starts at byte {start} of the data, where the previous tensor ends at {covered} (a {what})"
            ));
        }
        covered = end;
    }
    (covered != data_len as u64).then(|| {
        format!(
            "the tensors cover {covered} bytes of data, but {sizes}: the file has trailing bytes"
        )
    })
}

impl Checkpoint {
    /// Opens `dir`: parses `config.json`, validates every safetensors header (and the shard
    /// index, when present) and records where each tensor lives.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(Error::InvalidJson {
                file: config_path,
                reason: "expected a JSON object".into(),
            });
        }
        let index_path = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = Vec::new();
        let mut index: Option<BTreeMap<String, String>> = None;
        if index_path.is_file() {
            let value = read_json(&index_path)?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::InvalidJson {
                    file: index_path.clone(),
                    reason: "missing object `weight_map`".into(),
                })?;
            let mut weight_map = BTreeMap::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| Error::Index {
                    file: index_path.clone(),
                    tensor: tensor.clone(),
                    shard: shard.to_string(),
                    reason: "is not a string".into(),
                })?;
                let bad_name = shard.is_empty()
                    || shard.contains('/')
                    || shard.contains('\\')
                    || shard == ".."
                    || shard == ".";
                if bad_name {
                    return Err(Error::Index {
                        file: index_path.clone(),
                        tensor: tensor.clone(),
                        shard: shard.to_string(),
                        reason: "is not a file name inside the checkpoint directory".into(),
                    });
                }
                let path = dir.join(shard);
                if !files.contains(&path) {
                    files.push(path);
                }
                weight_map.insert(tensor.clone(), shard.to_string());
            }
            index = Some(weight_map);
        } else {
            let listing = std::fs::read_dir(dir).map_err(|source| Error::Io {
                file: dir.to_path_buf(),
                source,
            })?;
            for item in listing {
                let item = item.map_err(|source| Error::Io {
                    file: dir.to_path_buf(),
                    source,
                })?;
                let path = item.path();
                if path.extension().is_some_and(|e| e == "safetensors") {
                    files.push(path);
                }
            }
            files.sort();
        }
        if files.is_empty() {
            return Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let mut ckpt = Self::from_files(dir, config_path, config, &files)?;
        if let Some(index) = index {
            for (tensor, shard) in &index {
                let entry = ckpt.entries.get(tensor).ok_or_else(|| Error::Index {
                    file: index_path.clone(),
                    tensor: tensor.clone(),
                    shard: shard.clone(),
                    reason: "does not contain it".into(),
                })?;
                if ckpt.shards[entry.shard].path != dir.join(shard) {
                    return Err(Error::Index {
                        file: index_path.clone(),
                        tensor: tensor.clone(),
                        shard: shard.clone(),
                        reason: "does not contain it (found in another shard)".into(),
                    });
                }
            }
        }
        ckpt.layout = Layout::detect(&ckpt.config_path, &ckpt.config, &ckpt.entries)?;
        let tokenizer = dir.join("tokenizer.json");
        ckpt.tokenizer = tokenizer.is_file().then_some(tokenizer);
        Ok(ckpt)
    }

    /// Opens a bare safetensors file (no config, no tokenizer); for tests and fixtures.
    pub fn open_file(path: &Path) -> Result<Self, Error> {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_files(
            &dir,
            PathBuf::new(),
            serde_json::Value::Object(Default::default()),
            &[path.to_path_buf()],
        )
    }

    /// Validates bytes as a safetensors file named `name` (used by the fuzz target).
    pub fn from_bytes(name: &Path, bytes: Vec<u8>) -> Result<Self, Error> {
        let mut ckpt = Self {
            dir: name.parent().unwrap_or(Path::new(".")).to_path_buf(),
            config_path: PathBuf::new(),
            config: serde_json::Value::Object(Default::default()),
            tokenizer: None,
            shards: Vec::new(),
            entries: BTreeMap::new(),
            layout: Layout::CausalLm,
        };
        ckpt.add_shard(name.to_path_buf(), bytes)?;
        Ok(ckpt)
    }

    fn from_files(
        dir: &Path,
        config_path: PathBuf,
        config: serde_json::Value,
        files: &[PathBuf],
    ) -> Result<Self, Error> {
        let mut ckpt = Self {
            dir: dir.to_path_buf(),
            config_path,
            config,
            tokenizer: None,
            shards: Vec::new(),
            entries: BTreeMap::new(),
            layout: Layout::CausalLm,
        };
        for path in files {
            let bytes = read(path)?;
            ckpt.add_shard(path.clone(), bytes)?;
        }
        Ok(ckpt)
    }

    fn add_shard(&mut self, path: PathBuf, bytes: Vec<u8>) -> Result<(), Error> {
        let shard = self.shards.len();
        for (name, dtype, shape, start, end) in parse_header(&path, &bytes)? {
            if let Some(prev) = self.entries.get(&name) {
                return Err(Error::DuplicateTensor {
                    tensor: name,
                    first: self.shards[prev.shard].path.clone(),
                    second: path,
                });
            }
            self.entries.insert(
                name,
                Entry {
                    shard,
                    dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        self.shards.push(Shard { path, bytes });
        Ok(())
    }

    /// The parsed `config.json`.
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config
    }

    /// Deserializes `config.json` into `T`; the error names the missing or invalid key.
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        self.config_view().deserialize()
    }

    /// A view of `config.json` from its root.
    pub fn config_view(&self) -> ConfigView<'_> {
        ConfigView::root(&self.config_path, &self.config)
    }

    /// How the directory nests its model, decided when it was opened.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The config object of the model the checkpoint holds: the root of `config.json`, or
    /// `thinker_config` in the [`Layout::Full`] layout.
    pub fn model_config(&self) -> ConfigView<'_> {
        let root = self.config_view();
        match self.layout {
            Layout::Full => root
                .get(layout::NESTED_CONFIG)
                .expect("Layout::Full is only detected with a `thinker_config` object"),
            Layout::CausalLm | Layout::Thinker => root,
        }
    }

    /// The tensors of the model the checkpoint holds: all of them, or those under `thinker.`
    /// in the [`Layout::Full`] layout.
    pub fn model_weights(&self) -> Weights<'_> {
        match self.layout {
            Layout::Full => self.weights().pp(layout::NESTED_PREFIX),
            Layout::CausalLm | Layout::Thinker => self.weights(),
        }
    }

    /// `tokenizer.json` in the checkpoint directory, when there is one.
    pub fn tokenizer_path(&self) -> Option<&Path> {
        self.tokenizer.as_deref()
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A view of all weights, with an empty prefix.
    pub fn weights(&self) -> Weights<'_> {
        Weights {
            ckpt: self,
            prefix: String::new(),
        }
    }

    /// Reads tensor `name` as `f32` values with its stored shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), Error> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            dir: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        let shard = &self.shards[entry.shard];
        let data = &shard.bytes[entry.start..entry.end];
        let values: Vec<f32> = match entry.dtype {
            StDtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StDtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::UnsupportedDtype {
                    file: shard.path.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        if let Some(flat) = values.iter().position(|v| !v.is_finite()) {
            let mut index = vec![0; entry.shape.len()];
            let mut rest = flat;
            for (i, &dim) in entry.shape.iter().enumerate().rev() {
                index[i] = rest % dim.max(1);
                rest /= dim.max(1);
            }
            return Err(Error::NonFinite {
                file: shard.path.clone(),
                tensor: name.to_string(),
                index,
                value: values[flat],
            });
        }
        Ok((values, entry.shape.clone()))
    }
}

/// A path-prefix view of a checkpoint's tensors: `w.pp("model").pp("layers").pp(3)`.
#[derive(Clone)]
pub struct Weights<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// The view under `prefix.part`.
    pub fn pp(&self, part: impl core::fmt::Display) -> Weights<'a> {
        let prefix = if self.prefix.is_empty() {
            part.to_string()
        } else {
            format!("{}.{}", self.prefix, part)
        };
        Weights {
            ckpt: self.ckpt,
            prefix,
        }
    }

    /// The dotted prefix of this view.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether tensor `prefix.name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.entries.contains_key(&self.full(name))
    }

    /// Whether tensors `prefix.a` and `prefix.b` exist with the same shape and the same
    /// values (bit for bit when stored in the same dtype, after conversion to f32 otherwise).
    pub fn same_values(&self, a: &str, b: &str) -> Result<bool, Error> {
        let (fa, fb) = (self.full(a), self.full(b));
        let (Some(ea), Some(eb)) = (self.ckpt.entries.get(&fa), self.ckpt.entries.get(&fb)) else {
            return Ok(false);
        };
        if ea.shape != eb.shape {
            return Ok(false);
        }
        if ea.dtype == eb.dtype {
            let ckpt: &'a Checkpoint = self.ckpt;
            let shards = &ckpt.shards;
            let bytes = |e: &Entry| -> &'a [u8] { &shards[e.shard].bytes[e.start..e.end] };
            return Ok(bytes(ea) == bytes(eb));
        }
        Ok(self.ckpt.read_f32(&fa)?.0 == self.ckpt.read_f32(&fb)?.0)
    }

    /// Reads `prefix.name`, checks its shape is `shape` and converts it to the backend float.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, Error> {
        let full = self.full(name);
        if let Some(entry) = self.ckpt.entries.get(&full) {
            if entry.shape != shape {
                return Err(Error::Shape {
                    file: self.ckpt.shards[entry.shard].path.clone(),
                    tensor: full,
                    expected: shape.to_vec(),
                    found: entry.shape.clone(),
                });
            }
        }
        let (values, _) = self.ckpt.read_f32(&full)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// [`Weights::tensor`] wrapped as a trainable parameter.
    pub fn param<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>, Error> {
        Ok(Param::from_tensor(self.tensor(name, shape, device)?))
    }
}

/// Writes HF-named tensors to `path` as safetensors in `dtype` (f32, bf16 or f16), through
/// [`atomic::write_atomic`], so a crash never leaves a half-written file.
pub fn save_safetensors<B: Backend>(
    path: &Path,
    tensors: &[(String, TensorData)],
    dtype: Dtype,
) -> Result<(), Error> {
    let export = |reason: String| Error::Export {
        file: path.to_path_buf(),
        reason,
    };
    let mut buffers: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let values = data
            .clone()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| export(format!("tensor `{name}`: {e:?}")))?;
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        buffers.push((name.clone(), bytes, data.shape.to_vec()));
    }
    let st_dtype = match dtype {
        Dtype::F32 => StDtype::F32,
        Dtype::Bf16 => StDtype::BF16,
        Dtype::F16 => StDtype::F16,
    };
    let mut views = Vec::with_capacity(buffers.len());
    for (name, bytes, shape) in &buffers {
        let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
            .map_err(|e| export(format!("tensor `{name}`: {e}")))?;
        views.push((name.as_str(), view));
    }
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let serialized =
        safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| export(e.to_string()))?;
    atomic::write_atomic(path, &serialized).map_err(|e| Error::Io {
        file: e.path,
        source: e.source,
    })
}
