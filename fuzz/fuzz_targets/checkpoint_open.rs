//! The project's own checkpoint opening on arbitrary bytes: the input becomes a checkpoint
//! directory (`config.json`, optionally `model.safetensors.index.json`, one safetensors shard),
//! which goes through everything `score`, `generate` and `train` do before computing:
//! `Checkpoint::open` (headers, shard index, weight map, layout detection), every tensor read,
//! each model part's config (decoder, thinker, audio and vision towers), and the weight load of
//! the text decoder. No input may panic, hang or allocate without bound; errors are fine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use omniopsd_fuzz::{checkpoint_dir, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir("checkpoint");
    if checkpoint_dir(&dir, data).is_ok() {
        omniopsd_fuzz::open_checkpoint(&dir);
    }
});
