//! The media readers on arbitrary bytes: the same file as a WAV (`read_wav` at 16 kHz with
//! the manifest's default 30 s bound, then the thinker's log-mel features) and as a PNG frame
//! (`read_png`). No input may panic or allocate without bound: a header may claim any size,
//! but only what the file holds, up to the bound, is read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use omniopsd_cli::data::media::{read_png, read_wav, SAMPLE_RATE};

fuzz_target!(|data: &[u8]| {
    let dir = omniopsd_fuzz::scratch_dir("media");
    let wav = dir.join("clip.wav");
    let png = dir.join("frame.png");
    if std::fs::write(&wav, data).is_err() || std::fs::write(&png, data).is_err() {
        return;
    }
    if let Ok(audio) = read_wav(&wav, SAMPLE_RATE, 30.0) {
        assert!(audio.samples.len() as f64 <= 30.0 * f64::from(SAMPLE_RATE));
        let (mel, seconds) = omniopsd_cli::inputs::audio_features(&wav, 30.0)
            .expect("a WAV read_wav accepts has features");
        assert!(seconds > 0.0 && mel.valid_frames <= mel.n_frames);
        assert!(
            mel.data.iter().all(|v| v.is_finite()),
            "non-finite features"
        );
    }
    if let Ok(frame) = read_png(&png) {
        assert_eq!(
            frame.rgb.len(),
            frame.width as usize * frame.height as usize * 3
        );
    }
});
