//! Operator-written `creation` and `revocation` statements with typed
//! placeholders. A placeholder is never pasted as text: `{{name}}` becomes the
//! role as a quoted identifier, `{{grant}}`, `{{audience}}` and `{{valid_until}}`
//! quoted literals (the last a `timestamptz`). Anything else between `{{` and
//! `}}`, or a lone `{{`, is refused when the config is read, with the statement
//! named. The values are Lapse's own (the grant id, the configured audience, the
//! expiry), never request text.

use super::sql::{self, QuoteError};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Name,
    Grant,
    Audience,
    ValidUntil,
}

/// One parsed statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

/// What the placeholders stand for, for one credential.
pub struct Values<'a> {
    pub name: &'a str,
    pub grant: &'a str,
    pub audience: &'a str,
    /// RFC 3339.
    pub valid_until: &'a str,
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("is empty".into());
        }
        if text.contains('\0') {
            return Err("contains NUL".into());
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err("has `{{` without `}}`".into());
            };
            let part = match after[..end].trim() {
                "name" => Part::Name,
                "grant" => Part::Grant,
                "audience" => Part::Audience,
                "valid_until" => Part::ValidUntil,
                other => {
                    return Err(format!(
                        "has the unknown placeholder `{{{{{}}}}}` (known: name, grant, audience, valid_until)",
                        other.chars().take(40).collect::<String>()
                    ));
                }
            };
            parts.push(part);
            rest = &after[end + 2..];
        }
        if rest.contains("}}") {
            return Err("has `}}` without `{{`".into());
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self(parts))
    }

    /// Whether the statement names the role (a creation statement that does not
    /// is legal, but usually a mistake; the caller decides).
    pub fn names_the_role(&self) -> bool {
        self.0.contains(&Part::Name)
    }

    pub fn render(&self, v: &Values<'_>) -> Result<String, QuoteError> {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Name => out.push_str(&sql::ident(v.name)?),
                Part::Grant => out.push_str(&sql::literal(v.grant)?),
                Part::Audience => out.push_str(&sql::literal(v.audience)?),
                Part::ValidUntil => {
                    out.push_str(&sql::literal(v.valid_until)?);
                    out.push_str("::timestamptz");
                }
            }
        }
        Ok(out)
    }
}

/// Renders `templates` as one script fragment, each statement ended by `;`.
pub fn script(templates: &[Template], v: &Values<'_>) -> Result<String, QuoteError> {
    let mut out = String::new();
    for t in templates {
        out.push_str(t.render(v)?.trim_end().trim_end_matches(';'));
        out.push_str(";\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: Values<'static> = Values {
        name: "lapse_gr_1",
        grant: "gr_1",
        audience: "orders-db",
        valid_until: "2026-12-07T18:00:00Z",
    };

    #[test]
    fn placeholders_are_typed_and_quoted() {
        let t = Template::parse(
            "ALTER ROLE {{name}} SET search_path = app; COMMENT ON ROLE {{ name }} IS {{grant}}",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(t.names_the_role());
        assert_eq!(
            t.render(&V).unwrap_or_default(),
            "ALTER ROLE \"lapse_gr_1\" SET search_path = app; COMMENT ON ROLE \"lapse_gr_1\" IS 'gr_1'"
        );
        let t = Template::parse("INSERT INTO audit.access VALUES ({{audience}}, {{valid_until}})")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.render(&V).unwrap_or_default(),
            "INSERT INTO audit.access VALUES ('orders-db', '2026-12-07T18:00:00Z'::timestamptz)"
        );
        let odd = Values {
            name: "x\"; DROP ROLE admin; --",
            audience: "o'; DROP TABLE t; --",
            ..V
        };
        let t = Template::parse("GRANT r TO {{name}}; SELECT {{audience}}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.render(&odd).unwrap_or_default(),
            "GRANT r TO \"x\"\"; DROP ROLE admin; --\"; SELECT 'o''; DROP TABLE t; --'"
        );
    }

    #[test]
    fn unknown_or_broken_placeholders_are_refused() {
        for (text, want) in [
            ("GRANT r TO {{user}}", "unknown placeholder `{{user}}`"),
            ("GRANT r TO {{name", "without `}}`"),
            ("GRANT r TO name}}", "without `{{`"),
            ("  ", "empty"),
            ("SELECT '\0'", "NUL"),
        ] {
            let e = Template::parse(text).err().unwrap_or_default();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_script_ends_each_statement() {
        let ts: Vec<Template> = ["SELECT 1;", "SELECT {{grant}}"]
            .iter()
            .map(|t| Template::parse(t).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(
            script(&ts, &V).unwrap_or_default(),
            "SELECT 1;\nSELECT 'gr_1';\n"
        );
    }
}
