//! The issuer's `workload` template: `{sub}` by default, or e.g.
//! `spiffe://ci.example/{repository}/{ref}` over the identity token's claims.

use std::collections::BTreeMap;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Claim(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadTemplate(Vec<Part>);

impl Default for WorkloadTemplate {
    fn default() -> Self {
        Self(vec![Part::Claim("sub".into())])
    }
}

impl FromStr for WorkloadTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let (lit, after) = rest.split_at(open);
            if lit.contains('}') {
                return Err(format!("unbalanced `}}` in workload template `{s}`"));
            }
            if !lit.is_empty() {
                parts.push(Part::Lit(lit.to_owned()));
            }
            let after = after.get(1..).unwrap_or_default();
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in workload template `{s}`"))?;
            let (name, tail) = after.split_at(close);
            if name.is_empty()
                || !name.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' || c == ':'
                })
            {
                return Err(format!(
                    "invalid claim name `{name}` in workload template `{s}`"
                ));
            }
            parts.push(Part::Claim(name.to_owned()));
            rest = tail.get(1..).unwrap_or_default();
        }
        if rest.contains('}') {
            return Err(format!("unbalanced `}}` in workload template `{s}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_owned()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Claim(_))) {
            return Err(format!(
                "workload template `{s}` uses no claim; every workload would get the same name"
            ));
        }
        Ok(Self(parts))
    }
}

impl WorkloadTemplate {
    /// Fills the template. A missing or empty claim is an error: a workload is never
    /// named by a partial template. Claim values may not contain `/` unless the
    /// template puts them last, so one claim cannot impersonate a longer path.
    pub fn render(&self, claims: &BTreeMap<String, String>) -> Result<String, String> {
        let mut out = String::new();
        let last = self.0.len().saturating_sub(1);
        for (i, p) in self.0.iter().enumerate() {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Claim(c) => {
                    let v = claims
                        .get(c)
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| format!("claim `{c}` is missing"))?;
                    if v.chars().any(char::is_control) {
                        return Err(format!("claim `{c}` holds control characters"));
                    }
                    if i != last && self.0.len() > 1 && v.contains('/') {
                        return Err(format!(
                            "claim `{c}` contains `/` inside a workload template"
                        ));
                    }
                    out.push_str(v);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn renders_claims() -> Result<(), String> {
        let t: WorkloadTemplate = "spiffe://ci.example/{project}/{job}".parse()?;
        assert_eq!(
            t.render(&claims(&[("project", "shop"), ("job", "deploy")]))?,
            "spiffe://ci.example/shop/deploy"
        );
        assert!(t.render(&claims(&[("project", "shop")])).is_err());
        assert!(
            t.render(&claims(&[("project", "a/b"), ("job", "x")]))
                .is_err()
        );
        assert_eq!(
            WorkloadTemplate::default().render(&claims(&[("sub", "spiffe://x/y")]))?,
            "spiffe://x/y"
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["{", "}", "a{b", "{}", "static", "{a b}"] {
            assert!(bad.parse::<WorkloadTemplate>().is_err(), "{bad}");
        }
    }
}
