//! `omniopsd train --config` on arbitrary TOML: parsing, every range check (the core's own
//! `validate` through each section's conversion), the conversions to the core's configs, and
//! the resolved config's round trip. No input may panic; a config that parses must re-parse
//! from its own `to_toml` to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use omniopsd_cli::train::config::TrainConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = TrainConfig::from_toml(text, "fuzz.toml") else {
        return;
    };
    let _ = cfg.opsd.trainer(0, 0);
    let _ = cfg.opsd.label_sft();
    let _ = cfg.warmup_sft();
    let resolved = cfg.to_toml().expect("a valid config serializes");
    let again = TrainConfig::from_toml(&resolved, "resolved.toml").expect("its own TOML parses");
    assert_eq!(
        again.to_toml().ok(),
        Some(resolved),
        "round trip changed the config"
    );
});
