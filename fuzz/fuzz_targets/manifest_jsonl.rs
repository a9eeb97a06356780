//! `omniopsd data check` (and every manifest reader) on arbitrary JSONL. The manifest sits in
//! a directory holding one valid WAV (`a.wav`) and one valid frames directory (`v/`), so
//! records that name them reach the media checks. No input may panic; every problem carries
//! a line number inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use omniopsd_cli::data::manifest::{check_manifest, Limits};

fuzz_target!(|data: &[u8]| {
    let dir = omniopsd_fuzz::media_dir();
    let path = dir.join("manifest.jsonl");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let lines = data.split(|&b| b == b'\n').count();
    for limits in [
        Limits::default(),
        Limits {
            require_rationale: true,
            ..Limits::default()
        },
    ] {
        if let Ok(checked) = check_manifest(&path, &limits) {
            for problem in &checked.problems {
                assert!(
                    problem.line >= 1 && problem.line <= lines,
                    "line {}",
                    problem.line
                );
            }
        }
    }
});
