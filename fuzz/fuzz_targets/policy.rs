//! A policy folder: Cedar text with Lapse's annotations (`@max_ttl`, `@approval`,
//! `@approvers`, `@break_glass`, `@idle`), validated against the schema and indexed.
//! The input is split into a `.cedar` file and an optional `.cedarschema` at the
//! first NUL byte.
#![no_main]

use lapse_policy::{PolicyBundle, SourceFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (policies, schema) = text.split_once('\0').unwrap_or((text, ""));
    let mut files = vec![SourceFile {
        name: "fuzz.cedar".into(),
        text: policies.into(),
    }];
    if !schema.is_empty() {
        files.push(SourceFile {
            name: "fuzz.cedarschema".into(),
            text: schema.into(),
        });
    }
    let _ = PolicyBundle::from_sources(&files);
});
