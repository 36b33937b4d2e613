//! An exported audit log (`lapse audit export`, JSON Lines) read back and verified:
//! entry parsing, the hash chain, the checkpoint.
#![no_main]

use lapse_store::audit::{AuditEntry, ChainVerifier, Checkpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    let checkpoint: Option<Checkpoint> = lines.next().and_then(|l| serde_json::from_str(l).ok());
    let mut v = ChainVerifier::new(checkpoint);
    for line in lines {
        if let Ok(e) = serde_json::from_str::<AuditEntry>(line) {
            v.push(&e);
        }
    }
    let report = v.finish(|_, _, _| false);
    // Nothing the fuzzer writes carries a valid checkpoint signature.
    assert!(!report.ok() || report.entries == 0);
});
