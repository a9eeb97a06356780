//! What the fuzz targets share: scratch directories (one per target and process, reused by
//! every input, so a run writes a few files, not one per input), the byte layout that turns
//! one input into a checkpoint directory, and a small directory of valid media.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::NdArray;
use omniopsd_checkpoint::Checkpoint;

/// `$TMPDIR/omniopsd-fuzz-<pid>/<name>`, created once; its files are overwritten per input.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("omniopsd-fuzz-{}", std::process::id()))
        .join(name);
    fs::create_dir_all(&dir).expect("the temporary directory is writable");
    dir
}

/// Splits `data` into a checkpoint directory at `dir`:
/// byte 0 flags (bit 0: a shard index), bytes 1-2 the length of `config.json` (little
/// endian), then the config, then (with an index) 2 length bytes and the index JSON, and the
/// rest is the one safetensors shard (`model.safetensors`, or the shard the index names
/// first when it names a plain file name). Files from the previous input are removed first.
pub fn checkpoint_dir(dir: &Path, data: &[u8]) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        fs::remove_file(entry?.path())?;
    }
    let (flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let (config, rest) = take_prefixed(rest);
    fs::write(dir.join("config.json"), config)?;
    let mut shard = String::from("model.safetensors");
    let mut rest = rest;
    if flags & 1 == 1 {
        let (index, tail) = take_prefixed(rest);
        rest = tail;
        fs::write(dir.join("model.safetensors.index.json"), index)?;
        if let Some(name) = first_shard(index) {
            shard = name;
        }
    }
    fs::write(dir.join(shard), rest)
}

/// A 2-byte little-endian length, then that many bytes (fewer when the input ends).
fn take_prefixed(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    data[2..].split_at(len)
}

/// The first shard an index names, when it is a plain file name the fuzzer may create.
fn first_shard(index: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(index).ok()?;
    let name = value
        .get("weight_map")?
        .as_object()?
        .values()
        .next()?
        .as_str()?;
    let plain = !name.is_empty()
        && name.len() < 64
        && name.ends_with(".safetensors")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    plain.then(|| name.to_string())
}

/// Everything the CLI does with a checkpoint directory before computing: open it, read
/// every tensor, parse each part's config, load the weights (the thinker's, or the decoder's).
pub fn open_checkpoint(dir: &Path) {
    let Ok(ckpt) = Checkpoint::open(dir) else {
        return;
    };
    let names: Vec<String> = ckpt.tensor_names().map(str::to_string).collect();
    for name in &names {
        let _ = ckpt.read_f32(name);
    }
    let device = Default::default();
    // The thinker's load includes its decoder's; a text checkpoint has only the decoder.
    if ckpt.layout().is_multimodal() {
        let _ = omniopsd_thinker::Thinker::<NdArray<f32>>::from_checkpoint(&ckpt, &device);
    } else {
        let _ = omniopsd_thinker::load_decoder::<NdArray<f32>>(&ckpt, &device);
    }
}

/// A directory with one valid 16 kHz WAV (`a.wav`, 0.1 s) and one frames directory (`v/`,
/// two 28x28 PNGs), for manifests that name them.
pub fn media_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir("manifest");
        let samples: Vec<i16> = (0..1600).map(|i| ((i % 40) * 200 - 4000) as i16).collect();
        omniopsd_cli::data::media::write_wav(&dir.join("a.wav"), &samples)
            .expect("writing the fixture WAV");
        fs::create_dir_all(dir.join("v")).expect("creating the frames directory");
        for (i, shade) in [40u8, 200].into_iter().enumerate() {
            let frame = omniopsd_cli::data::media::Frame {
                width: 28,
                height: 28,
                rgb: vec![shade; 28 * 28 * 3],
            };
            omniopsd_cli::data::media::write_png(&dir.join(format!("v/{i:02}.png")), &frame)
                .expect("writing a fixture frame");
        }
        dir
    })
}
