//! Quoting for SQL that cannot take bind parameters (DDL such as `CREATE ROLE`).
//!
//! These follow PostgreSQL's own `quote_ident` and `quote_literal`: identifiers are
//! always double-quoted with `"` doubled; literals are single-quoted with `'` doubled,
//! and when they contain a backslash they use the `E''` form with backslashes
//! doubled, so they mean the same whatever `standard_conforming_strings` says. NUL
//! cannot appear in either and is refused.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("SQL names and values cannot contain NUL")]
    Nul,
    #[error("SQL identifier is empty")]
    Empty,
    #[error("SQL identifier `{0}` is longer than 63 bytes")]
    TooLong(String),
}

/// The longest identifier PostgreSQL keeps without truncating (NAMEDATALEN - 1).
pub const MAX_IDENT_BYTES: usize = 63;

pub fn ident(name: &str) -> Result<String, QuoteError> {
    if name.is_empty() {
        return Err(QuoteError::Empty);
    }
    if name.contains('\0') {
        return Err(QuoteError::Nul);
    }
    // PostgreSQL would silently truncate, and two names could then collide.
    if name.len() > MAX_IDENT_BYTES {
        return Err(QuoteError::TooLong(name.to_owned()));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

pub fn literal(value: &str) -> Result<String, QuoteError> {
    if value.contains('\0') {
        return Err(QuoteError::Nul);
    }
    let body = value.replace('\'', "''");
    if value.contains('\\') {
        Ok(format!("E'{}'", body.replace('\\', "\\\\")))
    } else {
        Ok(format!("'{body}'"))
    }
}

/// A readable, safe fragment for generated names: lowercase ASCII letters, digits
/// and `_`; everything else becomes `_`.
pub fn slug(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(max);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_escaped() {
        assert_eq!(ident("orders").unwrap(), "\"orders\"");
        assert_eq!(
            ident("x\"; DROP TABLE t; --").unwrap(),
            "\"x\"\"; DROP TABLE t; --\""
        );
        assert_eq!(ident(""), Err(QuoteError::Empty));
        assert_eq!(ident("a\0b"), Err(QuoteError::Nul));
        assert!(matches!(
            ident(&"a".repeat(64)),
            Err(QuoteError::TooLong(_))
        ));
        assert!(ident(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(literal("plain").unwrap(), "'plain'");
        assert_eq!(literal("o'brien").unwrap(), "'o''brien'");
        assert_eq!(literal("a\\'; x").unwrap(), "E'a\\\\''; x'");
        assert_eq!(literal("nul\0"), Err(QuoteError::Nul));
    }

    #[test]
    fn slugs_are_plain() {
        assert_eq!(slug("Orders-DB.prod", 63), "orders_db_prod");
        assert_eq!(slug("x\"; DROP", 4), "x___");
    }
}
