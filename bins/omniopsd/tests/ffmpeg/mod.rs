//! Tests that need the `ffmpeg` / `ffprobe` programs fail without them, unless
//! `OMNIOPSD_SKIP_FFMPEG_TESTS=1` says skipping is fine on this machine (CI installs FFmpeg and
//! never sets it).

/// True when FFmpeg is here; false (the test returns early, said on stderr) when it is not and
/// skipping is allowed; a failure otherwise.
pub fn required() -> bool {
    if omniopsd_cli::data::video::available() {
        return true;
    }
    let skip = std::env::var("OMNIOPSD_SKIP_FFMPEG_TESTS").is_ok_and(|v| v == "1");
    assert!(
        skip,
        "this test needs the ffmpeg and ffprobe programs (apt-get install ffmpeg); set \
         OMNIOPSD_SKIP_FFMPEG_TESTS=1 to skip it on a machine without them"
    );
    eprintln!("skipped: no ffmpeg/ffprobe and OMNIOPSD_SKIP_FFMPEG_TESTS=1");
    false
}
