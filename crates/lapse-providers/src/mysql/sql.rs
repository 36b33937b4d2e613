//! Quoting for MariaDB/MySQL statements that cannot take parameters: account
//! management (`CREATE USER`, `GRANT`, `ALTER USER`, `DROP USER`) accepts no `?`
//! for names, and MariaDB 10.11 refuses `IDENTIFIED BY ?` too (a syntax error,
//! checked). Everything else the provider sends binds its values as parameters.
//!
//! Identifiers are always backtick-quoted with backticks doubled. Inside
//! backticks a backslash is an ordinary character whatever `sql_mode` says, so
//! quoting does not depend on `ANSI_QUOTES` or `NO_BACKSLASH_ESCAPES`.
//!
//! String literals are single-quoted with `'` doubled, which means the same in
//! every `sql_mode`. A backslash would not (it escapes unless
//! `NO_BACKSLASH_ESCAPES` is set), and bytes outside printable ASCII could combine
//! with a quote in a multi-byte connection character set, so literals holding
//! either are refused rather than escaped. The provider only ever quotes values it
//! made (password hashes, generated passwords), which never hold them.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("SQL names and values cannot contain NUL")]
    Nul,
    #[error("SQL name is empty")]
    Empty,
    #[error("SQL name `{shown}…` is longer than {max} characters")]
    TooLong { shown: String, max: usize },
    #[error("database name `{0}` contains `\\` or `%`, which MariaDB reads as a pattern in grants")]
    Pattern(String),
    #[error("SQL value holds a backslash or a character outside printable ASCII")]
    Unquotable,
}

/// Databases and tables: MariaDB and MySQL allow 64 characters.
pub const MAX_NAME_CHARS: usize = 64;
/// User names: MariaDB 10.6+ allows 128 characters, MySQL 32 (the provider checks
/// the server's own limit at prepare).
pub const MAX_USER_CHARS: usize = 128;
/// The host part of an account.
pub const MAX_HOST_CHARS: usize = 255;

fn checked(name: &str, max: usize) -> Result<&str, QuoteError> {
    if name.is_empty() {
        return Err(QuoteError::Empty);
    }
    if name.contains('\0') {
        return Err(QuoteError::Nul);
    }
    // The server refuses (or silently truncates, in some versions) longer names;
    // two truncated names could then collide.
    if name.chars().count() > max {
        return Err(QuoteError::TooLong {
            shown: name.chars().take(16).collect(),
            max,
        });
    }
    Ok(name)
}

fn backticks(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A database or table name.
pub fn ident(name: &str) -> Result<String, QuoteError> {
    checked(name, MAX_NAME_CHARS).map(backticks)
}

/// A database name in `GRANT … ON db.*`. At the database level MariaDB and MySQL
/// read `_` and `%` in the name as `LIKE` wildcards (a grant on `app_db` would also
/// cover `appXdb`; checked), so `_` is escaped as `\_`. `%` and `\` are refused:
/// Lapse never hands out a pattern, and a literal backslash cannot be told from
/// an escape there.
pub fn grant_database(name: &str) -> Result<String, QuoteError> {
    let name = checked(name, MAX_NAME_CHARS)?;
    if name.contains(['\\', '%']) {
        return Err(QuoteError::Pattern(name.chars().take(16).collect()));
    }
    Ok(backticks(&name.replace('_', "\\_")))
}

/// An account: `` `user`@`host` ``.
pub fn account(user: &str, host: &str) -> Result<String, QuoteError> {
    let user = checked(user, MAX_USER_CHARS)?;
    let host = checked(host, MAX_HOST_CHARS)?;
    Ok(format!("{}@{}", backticks(user), backticks(host)))
}

/// A string literal, for the one value a statement cannot bind (the password of
/// `CREATE USER`).
pub fn literal(value: &str) -> Result<String, QuoteError> {
    if value.contains('\0') {
        return Err(QuoteError::Nul);
    }
    if !value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        return Err(QuoteError::Unquotable);
    }
    Ok(format!("'{}'", value.replace('\'', "''")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_escaped() {
        assert_eq!(ident("orders").unwrap(), "`orders`");
        assert_eq!(
            ident("x`; DROP DATABASE mysql; --").unwrap(),
            "`x``; DROP DATABASE mysql; --`"
        );
        assert_eq!(ident("o'brien\"").unwrap(), "`o'brien\"`");
        assert_eq!(ident("a\\b").unwrap(), "`a\\b`");
        assert_eq!(ident(""), Err(QuoteError::Empty));
        assert_eq!(ident("a\0b"), Err(QuoteError::Nul));
        assert!(ident(&"a".repeat(64)).is_ok());
        assert!(matches!(
            ident(&"a".repeat(65)),
            Err(QuoteError::TooLong { max: 64, .. })
        ));
        // The limit is in characters, as the server counts.
        assert!(ident(&"é".repeat(64)).is_ok());
        let e = ident(&"x".repeat(10 * 1024)).unwrap_err();
        assert!(e.to_string().len() < 100, "errors do not echo 10 KB: {e}");
    }

    #[test]
    fn grant_databases_are_not_patterns() {
        assert_eq!(grant_database("app_db").unwrap(), "`app\\_db`");
        assert_eq!(grant_database("a`b_c").unwrap(), "`a``b\\_c`");
        assert!(matches!(
            grant_database("app%"),
            Err(QuoteError::Pattern(_))
        ));
        assert!(matches!(
            grant_database("app\\_x"),
            Err(QuoteError::Pattern(_))
        ));
        assert_eq!(grant_database("x\0"), Err(QuoteError::Nul));
    }

    #[test]
    fn accounts_quote_both_parts() {
        assert_eq!(account("lapse_abc", "%").unwrap(), "`lapse_abc`@`%`");
        assert_eq!(
            account("a`@`%` IDENTIFIED BY 'x", "10.0.0.%").unwrap(),
            "`a``@``%`` IDENTIFIED BY 'x`@`10.0.0.%`"
        );
        assert!(account(&"u".repeat(128), "%").is_ok());
        assert!(matches!(
            account(&"u".repeat(129), "%"),
            Err(QuoteError::TooLong { max: 128, .. })
        ));
        assert_eq!(account("u", ""), Err(QuoteError::Empty));
        assert_eq!(account("u\0", "%"), Err(QuoteError::Nul));
    }

    #[test]
    fn literals_mean_the_same_in_every_sql_mode() {
        assert_eq!(literal("plain").unwrap(), "'plain'");
        assert_eq!(literal("o'brien").unwrap(), "'o''brien'");
        assert_eq!(
            literal("x'; DROP USER root; --").unwrap(),
            "'x''; DROP USER root; --'"
        );
        assert_eq!(literal(""), Ok("''".into()));
        assert_eq!(literal("a\\'"), Err(QuoteError::Unquotable));
        assert_eq!(literal("caf\u{e9}"), Err(QuoteError::Unquotable));
        assert_eq!(literal("tab\t"), Err(QuoteError::Unquotable));
        assert_eq!(literal("nul\0"), Err(QuoteError::Nul));
        // What the provider quotes: `*` + 40 hex digits, base64url passwords.
        assert!(literal("*7B9EBEED26AA52ED10C0F549FA863F13C39E0209").is_ok());
        assert!(literal("aZ09-_").is_ok());
    }
}
