//! JSON helpers the broker's answers and audit data share.

/// Sets `key` on a JSON object (a no-op on anything else, which callers never pass).
pub fn set_field(v: &mut serde_json::Value, key: &str, value: serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert(key.to_owned(), value);
    }
}
