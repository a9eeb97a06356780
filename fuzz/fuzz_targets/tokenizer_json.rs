//! A checkpoint's `tokenizer.json` on arbitrary bytes, read as `score`, `generate` and
//! `train` read it (`omniopsd_decoder::check_tokenizer`, against an embedding of 512 rows),
//! then used: encode and decode a short text. No input may panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
