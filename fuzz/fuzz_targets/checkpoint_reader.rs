//! The safetensors header reader on arbitrary bytes (`Checkpoint::from_bytes`), then every
//! tensor it lists read as f32. `checkpoint_open` covers the whole directory. No input may panic, hang or allocate
//! without bound; errors are fine.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use omniopsd_checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(ckpt) = Checkpoint::from_bytes(Path::new("fuzz.safetensors"), data.to_vec()) {
        let names: Vec<String> = ckpt.tensor_names().map(str::to_string).collect();
        for name in names {
            let _ = ckpt.read_f32(&name);
        }
    }
});
