//! Atomic, checksummed checkpoint files.
//!
//! A checkpoint is one file of named sections (model record, optimizer record, teacher record,
//! trainer state as JSON) followed by the SHA-256 of everything before it:
//!
//! ```text
//! "OMNIOPSD-CKPT\0\0\x01" | u32 n | n × (u32 name_len, name, u64 len, bytes) | sha256[32]
//! ```
//! (integers little-endian). It is written with [`omniopsd_checkpoint::atomic::write_atomic`], so a crash (kill -9, power
//! loss) at any moment leaves either the old set of checkpoints or the new one, never a torn
//! file under a final name. Loading verifies the checksum; the newest file that verifies is
//! used, so a damaged newest file falls back to the previous one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 16] = b"OMNIOPSD-CKPT\0\0\x01";

/// Named byte sections, in name order.
pub type Sections = BTreeMap<String, Vec<u8>>;

/// Serializes sections with the trailing checksum.
pub fn encode(sections: &Sections) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (name, data) in sections {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Parses and verifies a checkpoint; `origin` names it in errors.
pub fn decode(bytes: &[u8], origin: &Path) -> Result<Sections> {
    let name = origin.display();
    if bytes.len() < MAGIC.len() + 4 + 32 {
        bail!(
            "checkpoint {name}: {} bytes, too short to be a checkpoint",
            bytes.len()
        );
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        bail!("checkpoint {name}: not an omniopsd checkpoint (bad magic)");
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        bail!("checkpoint {name}: checksum mismatch (truncated or corrupted file)");
    }
    let mut pos = MAGIC.len();
    let mut take = |n: usize| -> Result<&[u8]> {
        let end = pos
            .checked_add(n)
            .filter(|e| *e <= body.len())
            .with_context(|| format!("checkpoint {name}: section table runs past the end"))?;
        let s = &body[pos..end];
        pos = end;
        Ok(s)
    };
    let count = u32::from_le_bytes(take(4)?.try_into()?);
    let mut sections = Sections::new();
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into()?) as usize;
        let key = std::str::from_utf8(take(len)?)
            .with_context(|| format!("checkpoint {name}: section name is not UTF-8"))?
            .to_string();
        let len = u64::from_le_bytes(take(8)?.try_into()?);
        let len = usize::try_from(len)
            .with_context(|| format!("checkpoint {name}: section `{key}` too large"))?;
        sections.insert(key, take(len)?.to_vec());
    }
    Ok(sections)
}

/// The file name of the checkpoint after `step` updates.
pub fn file_name(step: u64) -> String {
    format!("step-{step:010}.ckpt")
}

fn step_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .strip_suffix(".ckpt")?
        .parse()
        .ok()
}

/// Saves the checkpoint of `step` and deletes all but the newest `keep` checkpoints.
pub fn save(dir: &Path, step: u64, sections: &Sections, keep: usize) -> Result<PathBuf> {
    save_with(dir, step, sections, keep, |p| File::create(p))
}

/// [`save`] with `open` creating the temp file (a seam for tests that simulate a full disk).
fn save_with(
    dir: &Path,
    step: u64,
    sections: &Sections,
    keep: usize,
    open: impl FnOnce(&Path) -> io::Result<File>,
) -> Result<PathBuf> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating checkpoint directory {}", dir.display()))?;
    let path = dir.join(file_name(step));
    omniopsd_checkpoint::atomic::write_atomic_with(&path, &encode(sections), open).with_context(
        || format!("saving the checkpoint of step {step}; the previous checkpoints are unchanged"),
    )?;
    let all = list(dir)?;
    for (_, old) in all.iter().rev().skip(keep.max(1)) {
        fs::remove_file(old)
            .with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(path)
}

/// Checkpoints in `dir`, oldest first (a missing directory has none).
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in entries {
        let p = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if let Some(step) = step_of(&p) {
            out.push((step, p));
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint that verified, and the newer ones that did not (with why).
pub struct Loaded {
    /// Updates done when it was saved.
    pub step: u64,
    /// Its file.
    pub path: PathBuf,
    /// Its sections.
    pub sections: Sections,
    /// Newer checkpoint files that failed to verify.
    pub rejected: Vec<String>,
}

/// The newest checkpoint in `dir` whose checksum verifies, or `None` if there is none.
pub fn load_latest(dir: &Path) -> Result<Option<Loaded>> {
    let mut rejected = Vec::new();
    for (step, path) in list(dir)?.into_iter().rev() {
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                rejected.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        match decode(&bytes, &path) {
            Ok(sections) => {
                return Ok(Some(Loaded {
                    step,
                    path,
                    sections,
                    rejected,
                }))
            }
            Err(e) => rejected.push(format!("{e:#}")),
        }
    }
    if rejected.is_empty() {
        Ok(None)
    } else {
        bail!(
            "no valid checkpoint in {}: {}",
            dir.display(),
            rejected.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(tag: u8) -> Sections {
        let mut s = Sections::new();
        s.insert("model".into(), vec![tag; 100]);
        s.insert("state".into(), b"{\"step\":3}".to_vec());
        s
    }

    #[test]
    fn encode_decode_round_trips() {
        let s = sections(7);
        assert_eq!(decode(&encode(&s), Path::new("x")).unwrap(), s);
    }

    #[test]
    fn any_flipped_byte_fails_the_checksum() {
        let bytes = encode(&sections(1));
        for i in [0, 17, 40, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b, Path::new("x")).is_err(), "byte {i}");
        }
        assert!(decode(&bytes[..bytes.len() - 5], Path::new("x")).is_err());
    }

    #[test]
    fn keeps_only_the_newest_k() {
        let dir = tempfile::tempdir().unwrap();
        for step in [10, 20, 30, 40] {
            save(dir.path(), step, &sections(step as u8), 2).unwrap();
        }
        let steps: Vec<u64> = list(dir.path()).unwrap().iter().map(|x| x.0).collect();
        assert_eq!(steps, vec![30, 40]);
        let loaded = load_latest(dir.path()).unwrap().unwrap();
        assert_eq!((loaded.step, loaded.sections), (40, sections(40)));
    }

    #[test]
    fn corrupt_newest_falls_back_to_previous() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), 1, &sections(1), 3).unwrap();
        let p = save(dir.path(), 2, &sections(2), 3).unwrap();
        let mut b = fs::read(&p).unwrap();
        b.truncate(b.len() - 10);
        fs::write(&p, b).unwrap();
        let loaded = load_latest(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.step, 1);
        assert_eq!(loaded.rejected.len(), 1);
        assert!(
            loaded.rejected[0].contains("checksum mismatch"),
            "{:?}",
            loaded.rejected
        );
    }

    #[test]
    fn full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), 5, &sections(5), 2).unwrap();
        let err = save_with(dir.path(), 6, &sections(6), 2, |_| {
            fs::OpenOptions::new().write(true).open("/dev/full")
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("step-0000000006.ckpt"), "{msg}");
        assert!(msg.contains("previous checkpoints are unchanged"), "{msg}");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![file_name(5)], "no temp file left behind");
        assert_eq!(load_latest(dir.path()).unwrap().unwrap().step, 5);
    }

    #[test]
    fn unwritable_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = save(&file.join("ckpts"), 1, &sections(1), 1).unwrap_err();
        assert!(
            format!("{err:#}").contains("creating checkpoint directory"),
            "{err:#}"
        );
    }
}
