//! `lapse.toml` parsing and validation: unknown keys, durations, URLs, tables.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lapse_broker::config::Config::parse(text);
        let _ = text.parse::<lapse_broker::limits::Rate>();
        let _ = text.parse::<lapse_core::TtlDuration>();
    }
});
