//! Whole-file writes that readers and crashes never see half done.
//!
//! Invariant: every file the project writes for others to read (configs, reports, predictions,
//! checkpoints, exported weights and their configs, manifests, metrics rewrites, plots) goes
//! through [`write_atomic`]: the bytes go to a hidden temp file beside the target, which is fsynced,
//! renamed over the target, and the directory fsynced. After a crash (kill -9, power loss) at
//! any moment the target holds either its old bytes or the new ones, never a torn file.
//!
//! Standard library only; it lives here, the lowest crate that writes files, so the model
//! crates' exports and the CLI share it.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed [`write_atomic`]: the file it was writing and why. The target is unchanged.
#[derive(Debug)]
pub struct WriteError {
    /// The file being written.
    pub path: PathBuf,
    /// What failed.
    pub source: io::Error,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writing {}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Writes `bytes` to `path` atomically. The parent directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic_with(path, bytes, |p| File::create(p))
}

/// [`write_atomic`] with `open` creating the temp file (a seam for tests that simulate a full
/// disk). On any failure the temp file is removed and the target is left as it was.
pub fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    open: impl FnOnce(&Path) -> io::Result<File>,
) -> Result<(), WriteError> {
    let fail = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        fail(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Unique per process and call, so concurrent writers of one target never share a temp file.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    let result = (|| -> io::Result<()> {
        let mut f = open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is on disk.
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        fail(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.md");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failure_names_the_file_and_keeps_the_old_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.md");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, b"new", |_| {
            fs::OpenOptions::new().write(true).open("/dev/full")
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("report.md") && !msg.contains("checkpoint"),
            "{msg}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("x.json");
        let msg = write_atomic(&path, b"x").unwrap_err().to_string();
        assert!(msg.contains("x.json"), "{msg}");
    }
}
