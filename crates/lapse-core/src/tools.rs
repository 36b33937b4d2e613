//! Declared intent of an agent's task: the tools it may call and what their
//! arguments may be.
//!
//! A task declares its tools when it asks for access; policy decides on that
//! declaration and the grant records it. At every tool call a gate (the MCP proxy)
//! checks the call against the declaration here, then asks Cedar. Constraints are
//! conjunctive: an argument must satisfy every part given (`prefix`, `one_of`,
//! `maximum`, `pattern`). A constrained argument that is missing from a call fails
//! its constraint (a tool's default could be anything).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Most tools one task may declare, and most constrained arguments per tool.
pub const MAX_TOOLS: usize = 64;
pub const MAX_ARGS: usize = 16;
/// Longest tool or argument name, prefix, pattern or `one_of` entry.
const MAX_TEXT: usize = 256;
/// Compiled regex size limit: a pattern is user input and must not cost the gate
/// unbounded memory or time.
const REGEX_SIZE_LIMIT: usize = 1 << 16;

/// One tool a task may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolDecl {
    pub name: String,
    /// Constraints by argument name; arguments not named are unconstrained.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, ArgConstraint>,
}

/// What one argument may be. Every part given must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgConstraint {
    /// A string that starts with this. When the prefix holds a `/`, the value may
    /// not contain a `..` path segment (it would climb out of the prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Exactly one of these JSON values (strings, numbers, booleans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    /// A number no greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    /// A string the whole of which matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    #[error("`tools` is not a valid declaration: {0}")]
    Malformed(String),
    #[error("tool `{tool}`, argument `{arg}`: {why}")]
    BadConstraint {
        tool: String,
        arg: String,
        why: String,
    },
    #[error("tool `{0}` is declared twice")]
    Duplicate(String),
    #[error("tool `{0}` is not among the parent grant's tools")]
    NotInParent(String),
    #[error("tool `{tool}`, argument `{arg}`: {why}")]
    Wider {
        tool: String,
        arg: String,
        why: String,
    },
}

/// Why a call is outside the declared intent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("tool `{0}` is not declared for this task")]
    Undeclared(String),
    #[error("argument `{arg}` of `{tool}` {why}")]
    Argument {
        tool: String,
        arg: String,
        why: String,
    },
}

fn text_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TEXT && !s.chars().any(char::is_control)
}

fn compile(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("`pattern` does not compile: {e}"))
}

/// Parses and checks a declaration (`tools` of a request): names, sizes, and that
/// every pattern compiles.
pub fn parse(text: &str) -> Result<Vec<ToolDecl>, ToolError> {
    let tools: Vec<ToolDecl> =
        serde_json::from_str(text).map_err(|e| ToolError::Malformed(e.to_string()))?;
    validate(&tools)?;
    Ok(tools)
}

pub fn validate(tools: &[ToolDecl]) -> Result<(), ToolError> {
    if tools.len() > MAX_TOOLS {
        return Err(ToolError::Malformed(format!(
            "at most {MAX_TOOLS} tools per task"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in tools {
        if !text_ok(&t.name) {
            return Err(ToolError::Malformed(format!(
                "tool names are 1 to {MAX_TEXT} characters without control characters"
            )));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(ToolError::Duplicate(t.name.clone()));
        }
        if t.args.len() > MAX_ARGS {
            return Err(ToolError::Malformed(format!(
                "tool `{}`: at most {MAX_ARGS} constrained arguments",
                t.name
            )));
        }
        for (arg, c) in &t.args {
            let bad = |why: String| ToolError::BadConstraint {
                tool: t.name.clone(),
                arg: arg.clone(),
                why,
            };
            if !text_ok(arg) {
                return Err(bad("argument names are 1 to 256 characters".into()));
            }
            if c.prefix.is_none()
                && c.one_of.is_none()
                && c.maximum.is_none()
                && c.pattern.is_none()
            {
                return Err(bad(
                    "a constraint needs at least one of `prefix`, `one_of`, `maximum`, `pattern`"
                        .into(),
                ));
            }
            if let Some(p) = &c.prefix
                && !text_ok(p)
            {
                return Err(bad("`prefix` must be 1 to 256 characters".into()));
            }
            if let Some(set) = &c.one_of {
                if set.is_empty() || set.len() > MAX_ARGS * 4 {
                    return Err(bad("`one_of` takes 1 to 64 values".into()));
                }
                if set
                    .iter()
                    .any(|v| !matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)))
                {
                    return Err(bad(
                        "`one_of` values are strings, numbers or booleans".into()
                    ));
                }
                if set
                    .iter()
                    .any(|v| v.as_str().is_some_and(|s| s.len() > MAX_TEXT))
                {
                    return Err(bad("`one_of` strings are at most 256 characters".into()));
                }
            }
            if let Some(m) = c.maximum
                && !m.is_finite()
            {
                return Err(bad("`maximum` must be a finite number".into()));
            }
            if let Some(p) = &c.pattern {
                if !text_ok(p) {
                    return Err(bad("`pattern` must be 1 to 256 characters".into()));
                }
                compile(p).map_err(bad)?;
            }
        }
    }
    Ok(())
}

/// Checks that `child` asks for no more than `parent`: every tool is the parent's,
/// and every constraint of the parent's tool is kept or tightened.
pub fn narrows(child: &[ToolDecl], parent: &[ToolDecl]) -> Result<(), ToolError> {
    for t in child {
        let p = parent
            .iter()
            .find(|p| p.name == t.name)
            .ok_or_else(|| ToolError::NotInParent(t.name.clone()))?;
        for (arg, pc) in &p.args {
            let wider = |why: &str| ToolError::Wider {
                tool: t.name.clone(),
                arg: arg.clone(),
                why: why.to_owned(),
            };
            let Some(cc) = t.args.get(arg) else {
                return Err(wider("the parent constrains it and this does not"));
            };
            if let Some(pp) = &pc.prefix {
                match &cc.prefix {
                    Some(cp) if cp.starts_with(pp.as_str()) => {}
                    _ => return Err(wider("`prefix` must extend the parent's")),
                }
            }
            if let Some(ps) = &pc.one_of {
                match &cc.one_of {
                    Some(cs) if cs.iter().all(|v| ps.contains(v)) => {}
                    _ => return Err(wider("`one_of` must be a subset of the parent's")),
                }
            }
            if let Some(pm) = pc.maximum {
                match cc.maximum {
                    Some(cm) if cm <= pm => {}
                    _ => return Err(wider("`maximum` must not exceed the parent's")),
                }
            }
            if let Some(pp) = &pc.pattern
                && cc.pattern.as_ref() != Some(pp)
            {
                return Err(wider("`pattern` must be the parent's, unchanged"));
            }
        }
    }
    Ok(())
}

/// A declaration ready to check calls against (patterns compiled once).
#[derive(Debug, Clone)]
pub struct ToolSet {
    tools: Vec<(ToolDecl, BTreeMap<String, regex::Regex>)>,
}

impl ToolSet {
    pub fn compile(tools: &[ToolDecl]) -> Result<Self, ToolError> {
        validate(tools)?;
        let mut out = Vec::with_capacity(tools.len());
        for t in tools {
            let mut patterns = BTreeMap::new();
            for (arg, c) in &t.args {
                if let Some(p) = &c.pattern {
                    let re = compile(p).map_err(|why| ToolError::BadConstraint {
                        tool: t.name.clone(),
                        arg: arg.clone(),
                        why,
                    })?;
                    patterns.insert(arg.clone(), re);
                }
            }
            out.push((t.clone(), patterns));
        }
        Ok(Self { tools: out })
    }

    pub fn declares(&self, name: &str) -> bool {
        self.tools.iter().any(|(t, _)| t.name == name)
    }

    /// Checks one call: the tool is declared and its arguments satisfy every
    /// constraint.
    pub fn check(&self, name: &str, args: &Map<String, Value>) -> Result<(), Violation> {
        let (decl, patterns) = self
            .tools
            .iter()
            .find(|(t, _)| t.name == name)
            .ok_or_else(|| Violation::Undeclared(name.to_owned()))?;
        for (arg, c) in &decl.args {
            let fail = |why: String| Violation::Argument {
                tool: name.to_owned(),
                arg: arg.clone(),
                why,
            };
            let Some(v) = args.get(arg) else {
                return Err(fail("is constrained and missing".into()));
            };
            if let Some(p) = &c.prefix {
                let Some(s) = v.as_str() else {
                    return Err(fail(
                        "must be a string (it has a `prefix` constraint)".into(),
                    ));
                };
                if !s.starts_with(p.as_str()) {
                    return Err(fail(format!("must start with `{p}`")));
                }
                if p.contains('/') && s.split(['/', '\\']).any(|seg| seg == "..") {
                    return Err(fail("may not contain a `..` path segment".into()));
                }
            }
            if let Some(set) = &c.one_of
                && !set.iter().any(|o| same_value(o, v))
            {
                return Err(fail(format!(
                    "must be one of {}",
                    Value::Array(set.clone())
                )));
            }
            if let Some(m) = c.maximum {
                match v.as_f64() {
                    Some(n) if n <= m => {}
                    Some(_) => return Err(fail(format!("must be at most {m}"))),
                    None => return Err(fail("must be a number (it has a `maximum`)".into())),
                }
            }
            if let Some(re) = patterns.get(arg) {
                let Some(s) = v.as_str() else {
                    return Err(fail("must be a string (it has a `pattern`)".into()));
                };
                if !re.is_match(s) {
                    return Err(fail(format!(
                        "does not match `{}`",
                        c.pattern.as_deref().unwrap_or_default()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// JSON equality where 5 and 5.0 are the same number.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// One tool call as policy sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub args: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(v: Value) -> ToolSet {
        let tools: Vec<ToolDecl> = serde_json::from_value(v).expect("decl");
        ToolSet::compile(&tools).expect("compiles")
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn calls_are_checked_against_every_constraint() {
        let s = set(json!([
            { "name": "read_file", "args": { "path": { "prefix": "/data/" } } },
            { "name": "query", "args": { "table": { "one_of": ["orders", "items"] }, "limit": { "maximum": 100 } } },
            { "name": "ticket", "args": { "id": { "pattern": "[A-Z]+-[0-9]+" } } },
            { "name": "echo" }
        ]));
        assert_eq!(
            s.check("read_file", &args(json!({ "path": "/data/a.csv" }))),
            Ok(())
        );
        assert_eq!(
            s.check("echo", &args(json!({ "anything": [1, 2] }))),
            Ok(())
        );
        assert_eq!(
            s.check("query", &args(json!({ "table": "orders", "limit": 100.0 }))),
            Ok(())
        );
        assert_eq!(s.check("ticket", &args(json!({ "id": "OPS-12" }))), Ok(()));
        let refused = [
            ("delete", json!({})),
            ("read_file", json!({ "path": "/etc/passwd" })),
            ("read_file", json!({ "path": "/data/../etc/passwd" })),
            ("read_file", json!({ "path": 7 })),
            ("read_file", json!({})),
            ("query", json!({ "table": "users", "limit": 1 })),
            ("query", json!({ "table": "orders", "limit": 101 })),
            ("query", json!({ "table": "orders", "limit": "1" })),
            ("ticket", json!({ "id": "OPS-12; drop" })),
            ("ticket", json!({ "id": "xOPS-12" })),
        ];
        for (tool, a) in refused {
            assert!(s.check(tool, &args(a.clone())).is_err(), "{tool} {a}");
        }
        assert!(matches!(
            s.check("delete", &Map::new()),
            Err(Violation::Undeclared(_))
        ));
    }

    #[test]
    fn bad_declarations_are_named() {
        for (text, want) in [
            ("{}", "not a valid declaration"),
            (r#"[{"name":"a","args":{"x":{}}}]"#, "at least one of"),
            (
                r#"[{"name":"a","args":{"x":{"pattern":"("}}}]"#,
                "does not compile",
            ),
            (
                r#"[{"name":"a","args":{"x":{"one_of":[{"k":1}]}}}]"#,
                "strings, numbers",
            ),
            (r#"[{"name":"a"},{"name":"a"}]"#, "declared twice"),
            (r#"[{"name":"a","extra":1}]"#, "unknown field"),
            (r#"[{"name":""}]"#, "tool names"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        // A pathological pattern is refused by size, not run.
        assert!(parse(r#"[{"name":"a","args":{"x":{"pattern":"(a{1,100}){1,100}"}}}]"#).is_err());
    }

    #[test]
    fn a_child_may_only_narrow() {
        let parent: Vec<ToolDecl> = serde_json::from_value(json!([
            { "name": "read_file", "args": { "path": { "prefix": "/data/" } } },
            { "name": "query", "args": { "table": { "one_of": ["orders", "items"] }, "limit": { "maximum": 100 } } },
        ]))
        .expect("parent");
        let ok: Vec<ToolDecl> = serde_json::from_value(json!([
            { "name": "read_file", "args": { "path": { "prefix": "/data/reports/", "pattern": ".*\\.csv" } } },
            { "name": "query", "args": { "table": { "one_of": ["orders"] }, "limit": { "maximum": 10 } } },
        ]))
        .expect("child");
        assert_eq!(narrows(&ok, &parent), Ok(()));
        assert_eq!(narrows(&[], &parent), Ok(()));
        for wider in [
            json!([{ "name": "transfer" }]),
            json!([{ "name": "read_file" }]),
            json!([{ "name": "read_file", "args": { "path": { "prefix": "/" } } }]),
            json!([{ "name": "query", "args": { "table": { "one_of": ["users"] }, "limit": { "maximum": 10 } } }]),
            json!([{ "name": "query", "args": { "table": { "one_of": ["orders"] }, "limit": { "maximum": 1000 } } }]),
            json!([{ "name": "query", "args": { "table": { "one_of": ["orders"] } } }]),
        ] {
            let child: Vec<ToolDecl> = serde_json::from_value(wider.clone()).expect("child");
            assert!(narrows(&child, &parent).is_err(), "{wider}");
        }
    }
}
