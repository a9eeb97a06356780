//! Where tests find the benchmark's reference directory: `$MER_UNIBENCH_DIR` when set, else
//! `../shared/mer-unibench` beside the repository (where CI has it). The scoring data itself
//! ships with `omniopsd-mer`; this directory is needed only for its fixtures (expected scores)
//! and for checking the shipped copy against it.

#![allow(dead_code)]

use std::path::PathBuf;

pub fn shared_dir() -> PathBuf {
    match std::env::var_os("MER_UNIBENCH_DIR") {
        Some(dir) => PathBuf::from(dir),
        // Both crates that use this sit two levels below the repository root.
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/mer-unibench"),
    }
}

/// The reference fixture directory; panics, saying where it was looked for, when absent.
pub fn fixtures_dir() -> PathBuf {
    let dir = shared_dir().join("fixtures");
    assert!(
        dir.is_dir(),
        "MER-UniBench reference fixtures not found at {} (put the benchmark's directory at \
         ../shared/mer-unibench beside the repository, or set MER_UNIBENCH_DIR)",
        dir.display()
    );
    dir
}
