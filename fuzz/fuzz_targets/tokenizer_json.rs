//! A checkpoint's `tokenizer.json` on arbitrary bytes, read as `score`, `generate` and
//! `train` read it (`omniopsd_decoder::check_tokenizer`, against an embedding of 512 rows),
//! then used: encode and decode a short text. No input may panic or hang (a panic inside the
//! tokenizers library that the product catches and reports is not a crash).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys's panic hook aborts before any unwinding, so a panic the product catches
    // (`load_tokenizer` catches the tokenizers library's panics on some malformed files) would
    // count as a crash. Back to Rust's default hook: a panic that escapes the target still
    // aborts, through libfuzzer-sys's own catch_unwind around every input.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
    let dir = omniopsd_fuzz::scratch_dir("tokenizer");
    let path = dir.join("tokenizer.json");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(tokenizer) = omniopsd_decoder::check_tokenizer(&path, 512) {
        if let Ok(encoding) = tokenizer.encode("Hello, I'm fine. 你好", false) {
            let _ = tokenizer.decode(encoding.get_ids(), false);
        }
    }
});
