#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::type_complexity
)]
//! The policy crate against the shipped example folder and against broken folders.

use lapse_core::{
    AccessRequest, DecisionOutcome, RequestContext, Task, Timestamp, WorkloadIdentity,
};
use lapse_policy::{PolicyBundle, PolicyError, SourceFile, cases};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies")
}

fn bundle() -> PolicyBundle {
    match PolicyBundle::load_dir(&examples()) {
        Ok(b) => b,
        Err(e) => panic!("example policies must load: {e}"),
    }
}

fn request(workload: &str, audience: &str, actions: &[&str]) -> AccessRequest {
    AccessRequest {
        workload: WorkloadIdentity {
            id: workload.into(),
            issuer: "https://issuer.test".into(),
            subject: workload.into(),
            claims: BTreeMap::from([("repository".to_owned(), "acme/shop".to_owned())]),
        },
        task: Task {
            id: "T-1".into(),
            purpose: "test".into(),
            ticket: String::new(),
        },
        audience: audience.into(),
        actions: actions.iter().map(|s| s.to_string()).collect(),
        requested_ttl_secs: 3600,
        context: RequestContext {
            environment: String::new(),
            source: std::net::IpAddr::from([10, 0, 0, 1]),
            time: Timestamp::from_unix_seconds(1_795_000_000),
            break_glass: false,
            depth: 0,
            tool: None,
        },
        tools: Vec::new(),
    }
}

/// A bundle of one schema fragment and one policy file.
fn bundle_of(schema: &str, policies: &str) -> Result<PolicyBundle, PolicyError> {
    PolicyBundle::from_sources(&[
        SourceFile {
            name: "a.cedarschema".into(),
            text: schema.into(),
        },
        SourceFile {
            name: "p.cedar".into(),
            text: policies.into(),
        },
    ])
}

#[test]
fn example_policy_tests_pass() -> Result<(), Box<dyn std::error::Error>> {
    let b = bundle();
    let text = std::fs::read_to_string(examples().join("policy-tests.toml"))?;
    let file = cases::parse(&text)?;
    let results = cases::run(&b, &file)?;
    assert!(results.len() >= 10);
    for r in &results {
        assert!(r.passed, "case `{}` failed: {:?}", r.name, r.failures);
    }
    Ok(())
}

#[test]
fn a_wrong_expectation_fails_its_case() -> Result<(), Box<dyn std::error::Error>> {
    let b = bundle();
    let file = cases::parse(
        r#"
[[case]]
name = "wrongly expects allow"
workload = "spiffe://elsewhere/x"
audience = "orders-db"
actions = ["read"]
expect = "allow"
"#,
    )?;
    let results = cases::run(&b, &file)?;
    assert_eq!(results.len(), 1);
    assert!(!results[0].passed);
    assert_eq!(
        results[0].failures,
        vec!["expected allow, got deny".to_owned()]
    );
    Ok(())
}

#[test]
fn default_deny_names_no_policy_and_forbid_names_itself() {
    let b = bundle();
    let d = b.decide(&request("spiffe://elsewhere/x", "orders-db", &["read"]));
    assert_eq!(d.outcome_label(), "deny");
    assert!(d.policies.is_empty());
    let mut r = request("spiffe://dev.lapse.local/ci/deploy", "orders-db", &["read"]);
    r.context.source = std::net::IpAddr::from([8, 8, 8, 8]);
    let d = b.decide(&r);
    assert_eq!(d.policies, vec!["private-networks-only".to_owned()]);
}

#[test]
fn all_actions_must_be_allowed() {
    let b = bundle();
    // read is allowed, write lacks a ticket: the whole request is denied.
    let d = b.decide(&request(
        "spiffe://dev.lapse.local/ci/deploy",
        "orders-db",
        &["read", "write"],
    ));
    match d.outcome {
        DecisionOutcome::Deny { reasons } => assert!(reasons[0].contains("`write`"), "{reasons:?}"),
        other => panic!("expected deny, got {other:?}"),
    }
}

#[test]
fn unknown_action_is_denied() {
    let b = bundle();
    assert!(!b.has_action("delete"));
    let d = b.decide(&request(
        "spiffe://dev.lapse.local/ci/deploy",
        "orders-db",
        &["delete"],
    ));
    assert_eq!(d.outcome_label(), "deny");
}

#[test]
fn claims_are_visible_as_tags() -> Result<(), PolicyError> {
    let b = PolicyBundle::from_sources(&[
        SourceFile { name: "a.cedarschema".into(), text: r#"action "read" appliesTo { principal: Workload, resource: Resource, context: RequestContext };"#.into() },
        SourceFile {
            name: "p.cedar".into(),
            text: r#"permit (principal, action, resource) when { principal.hasTag("repository") && principal.getTag("repository") == "acme/shop" };"#.into(),
        },
    ])?;
    assert!(
        b.decide(&request("spiffe://x/y", "r", &["read"]))
            .is_allow()
    );
    let mut r = request("spiffe://x/y", "r", &["read"]);
    r.workload.claims.clear();
    assert!(!b.decide(&r).is_allow());
    Ok(())
}

fn load_err(files: &[(&str, &str)]) -> String {
    let files: Vec<SourceFile> = files
        .iter()
        .map(|(n, t)| SourceFile {
            name: n.to_string(),
            text: t.to_string(),
        })
        .collect();
    match PolicyBundle::from_sources(&files) {
        Ok(_) => panic!("expected the folder to be refused"),
        Err(e) => e.to_string(),
    }
}

const ACTIONS: (&str, &str) = (
    "a.cedarschema",
    r#"action "read" appliesTo { principal: Workload, resource: Resource, context: RequestContext };"#,
);

#[test]
fn syntax_errors_name_file_and_line() {
    let e = load_err(&[
        ACTIONS,
        (
            "bad.cedar",
            "permit (principal, action, resource);\n\npermit (principal, action resource);\n",
        ),
    ]);
    assert!(e.starts_with("bad.cedar:3:"), "{e}");
}

#[test]
fn validation_errors_name_file_line_and_policy() {
    let e = load_err(&[
        ACTIONS,
        (
            "v.cedar",
            "// comment\npermit (principal, action, resource)\nwhen { context.nosuch == 1 };\n",
        ),
    ]);
    assert!(e.starts_with("v.cedar:3:"), "{e}");
    assert!(e.contains("v.cedar#1"), "{e}");
}

#[test]
fn bad_annotations_are_refused() {
    let e = load_err(&[
        ACTIONS,
        (
            "t.cedar",
            "\n@max_ttl(\"15 minutes\")\npermit (principal, action, resource);",
        ),
    ]);
    assert!(e.starts_with("t.cedar:2:"), "{e}");
    assert!(e.contains("15 minutes"), "{e}");
    let e = load_err(&[
        ACTIONS,
        (
            "t.cedar",
            "@approval(\"0\")\npermit (principal, action, resource);",
        ),
    ]);
    assert!(e.contains("1 to 10"), "{e}");
    let e = load_err(&[
        ACTIONS,
        (
            "t.cedar",
            "@max_ttl(\"5m\")\nforbid (principal, action, resource);",
        ),
    ]);
    assert!(e.contains("only applies to permit"), "{e}");
    let e = load_err(&[
        ACTIONS,
        (
            "t.cedar",
            "@maxttl(\"5m\")\npermit (principal, action, resource);",
        ),
    ]);
    assert!(e.contains("unknown annotation `@maxttl`"), "{e}");
}

#[test]
fn duplicate_ids_are_refused() {
    let e = load_err(&[
        ACTIONS,
        (
            "a.cedar",
            "@id(\"x\")\npermit (principal, action, resource);",
        ),
        (
            "b.cedar",
            "@id(\"x\")\npermit (principal, action, resource);",
        ),
    ]);
    assert!(e.contains("duplicate policy id `x`"), "{e}");
}

#[test]
fn policy_errors_fail_closed() -> Result<(), PolicyError> {
    // Validation rules out most evaluation errors, not overflow. Cedar skips a forbid
    // that errors and would allow; Lapse must deny instead.
    let b = PolicyBundle::from_sources(&[
        SourceFile { name: "a.cedarschema".into(), text: ACTIONS.1.into() },
        SourceFile {
            name: "p.cedar".into(),
            text: "@id(\"allow\")\npermit (principal, action, resource);\n@id(\"risky\")\nforbid (principal, action, resource) when { context.ttl * 9223372036854775807 > 0 };".into(),
        },
    ])?;
    let d = b.decide(&request("spiffe://x/y", "r", &["read"]));
    assert_eq!(d.outcome_label(), "deny");
    assert_eq!(d.policies, vec!["risky".to_owned()]);
    let mut r = request("spiffe://x/y", "r", &["read"]);
    r.requested_ttl_secs = 0;
    assert!(
        b.decide(&r).is_allow(),
        "without the overflow the permit stands"
    );
    Ok(())
}

/// The index must never change a decision: compare it with evaluating a bundle whose
/// policies all use unconstrained scopes (which the index cannot prune).
#[test]
fn index_matches_unindexed_evaluation() -> Result<(), PolicyError> {
    let schema = r#"action "read", "write", "admin" appliesTo { principal: Workload, resource: Resource, context: RequestContext };"#;
    let mut scoped = String::new();
    let mut unscoped = String::new();
    let actions = ["read", "write", "admin"];
    let resources = ["r0", "r1", "r2", "r3"];
    for i in 0..60 {
        let a = actions[i % 3];
        let r = resources[i % 4];
        let effect = if i % 7 == 0 { "forbid" } else { "permit" };
        let cond = format!("principal.uri like \"spiffe://t/{}*\"", i % 5);
        scoped.push_str(&format!(
            "@id(\"p{i}\")\n{effect} (principal, action == Action::\"{a}\", resource == Resource::\"{r}\") when {{ {cond} }};\n"
        ));
        unscoped.push_str(&format!(
            "@id(\"p{i}\")\n{effect} (principal, action, resource) when {{ action == Action::\"{a}\" && resource == Resource::\"{r}\" && {cond} }};\n"
        ));
    }
    let indexed = bundle_of(schema, &scoped)?;
    let flat = bundle_of(schema, &unscoped)?;
    let mut compared = 0;
    for w in 0..5 {
        for r in resources.iter().chain(["elsewhere"].iter()) {
            for a in actions {
                let req = request(&format!("spiffe://t/{w}/job"), r, &[a]);
                assert_eq!(indexed.decide(&req), flat.decide(&req), "w{w} {r} {a}");
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 75);
    Ok(())
}

/// A request carries only its own actions' entities: groups must still hold, through
/// more than one level, in a policy's scope and in its conditions alike.
#[test]
fn action_groups_hold_through_levels() -> Result<(), PolicyError> {
    let schema = r#"
        action "mutate";
        action "write", "delete" in ["mutate"] appliesTo { principal: Workload, resource: Resource, context: RequestContext };
        action "purge" in ["delete"] appliesTo { principal: Workload, resource: Resource, context: RequestContext };
        action "read" appliesTo { principal: Workload, resource: Resource, context: RequestContext };
    "#;
    for policy in [
        "@id(\"g\")\npermit (principal, action in Action::\"mutate\", resource);",
        "@id(\"g\")\npermit (principal, action, resource) when { action in Action::\"mutate\" };",
    ] {
        let b = bundle_of(schema, policy)?;
        for a in ["write", "delete", "purge"] {
            let d = b.decide(&request("spiffe://t/job", "r", &[a]));
            assert!(d.is_allow(), "{a} is in `mutate` under {policy}: {d:?}");
            assert_eq!(d.policies, vec!["g".to_owned()]);
        }
        assert!(
            b.decide(&request(
                "spiffe://t/job",
                "r",
                &["write", "purge", "write"]
            ))
            .is_allow(),
            "a repeated action is still one action"
        );
        for actions in [&["read"][..], &["write", "read"]] {
            let d = b.decide(&request("spiffe://t/job", "r", actions));
            assert_eq!(d.outcome_label(), "deny", "{actions:?} under {policy}");
        }
    }
    Ok(())
}

/// Decisions on one thread reuse the policy input built for the previous request
/// only when nothing differs: each variation below, decided right after the request
/// it varies, must get its own answer, and so must the same request to another
/// bundle.
#[test]
fn each_decision_sees_its_own_request_and_bundle() -> Result<(), PolicyError> {
    let schema = r#"
        action "mutate";
        action "write" in ["mutate"] appliesTo { principal: Workload, resource: Resource, context: RequestContext };
        action "read" appliesTo { principal: Workload, resource: Resource, context: RequestContext };
    "#;
    let flat = schema.replace(r#"action "write" in ["mutate"]"#, r#"action "write""#);
    let policy = r#"@id("p")
permit (principal, action, resource == Resource::"r") when {
  action in Action::"mutate" &&
  principal.hasTag("repository") && principal.getTag("repository") == "acme/shop" &&
  context.source.isInRange(ip("10.0.0.0/8")) &&
  context.time < datetime("2026-11-19T00:00:00Z") &&
  context.ttl <= 3600 && context.task == "T-1"
};"#;
    let (grouped, flat) = (bundle_of(schema, policy)?, bundle_of(&flat, policy)?);
    let base = request("spiffe://t/job", "r", &["write"]);
    let variations: Vec<(&str, Box<dyn Fn(&mut AccessRequest)>)> = vec![
        (
            "claim",
            Box::new(|r| {
                r.workload
                    .claims
                    .insert("repository".into(), "acme/other".into());
            }),
        ),
        (
            "source",
            Box::new(|r| r.context.source = [192, 168, 0, 1].into()),
        ),
        (
            "time",
            Box::new(|r| {
                r.context.time = Timestamp::from_unix_seconds(1_795_000_000 + 3 * 86_400);
            }),
        ),
        ("ttl", Box::new(|r| r.requested_ttl_secs = 3601)),
        ("task", Box::new(|r| r.task.id = "T-2".into())),
        ("audience", Box::new(|r| r.audience = "r2".into())),
        ("action", Box::new(|r| r.actions = vec!["read".into()])),
    ];
    for (what, vary) in &variations {
        assert!(
            grouped.decide(&base).is_allow(),
            "the base request is allowed"
        );
        let mut r = base.clone();
        vary(&mut r);
        assert_eq!(grouped.decide(&r).outcome_label(), "deny", "{what} differs");
        assert!(grouped.decide(&base).is_allow(), "and back after {what}");
    }
    assert!(grouped.decide(&base).is_allow());
    assert_eq!(
        flat.decide(&base).outcome_label(),
        "deny",
        "another bundle, where `write` is not in `mutate`"
    );
    assert!(grouped.decide(&base).is_allow());
    Ok(())
}
