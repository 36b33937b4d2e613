//! A task's declared tools (`tools` of a token exchange or access request) and a
//! call checked against them. The input is split at the first NUL byte: the
//! declaration, then a call as `name` NUL `arguments JSON`. Properties: parsing
//! never panics; a declaration that parses compiles; a call is decided either way;
//! a declaration always narrows itself.
#![no_main]

use lapse_core::tools;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (decl, call) = text.split_once('\0').unwrap_or((text, ""));
    let Ok(decl) = tools::parse(decl) else {
        return;
    };
    let set = tools::ToolSet::compile(&decl).expect("a parsed declaration compiles");
    assert!(tools::narrows(&decl, &decl).is_ok(), "a declaration narrows itself");
    let (name, args) = call.split_once('\0').unwrap_or((call, "{}"));
    if let Ok(serde_json::Value::Object(args)) = serde_json::from_str(args) {
        let _ = set.check(name, &args);
    }
});
