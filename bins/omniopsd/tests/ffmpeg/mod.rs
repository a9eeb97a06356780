//! Tests that need the `ffmpeg` / `ffprobe` programs. Without them a test is skipped with a
//! notice on a developer's machine (the README's `cargo test --workspace` works without
//! FFmpeg), and FAILS where `OMNIOPSD_REQUIRE_FFMPEG=1` or `CI` is set: `.ci/run` sets the
//! first and installs FFmpeg, so CI can never skip them.

/// True when FFmpeg is here; false (the test returns early, said on stderr) when it is not
/// and it is not required; a failure when it is required.
pub fn required() -> bool {
    omniopsd_cli::data::video::required_in_tests()
}
