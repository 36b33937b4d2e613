#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The GitHub Actions example is allowed by its own example policy: the claims
//! GitHub issues to the job of `examples/ci/github-actions-migrate.yml` (which calls
//! the reusable `examples/ci/github-actions-deploy.yml`), built from what the YAML
//! files say, go through `examples/identity/github-actions` and are allowed; the
//! same job in another repository is denied.
//!
//! The claims follow GitHub's documentation of its OIDC token ("About security
//! hardening with OpenID Connect", and "Using OpenID Connect with reusable
//! workflows"): in a called workflow, `repository`, `ref`, `event_name`,
//! `workflow` and `workflow_ref` are the caller's, `environment` is the called
//! job's, and `job_workflow_ref` names the called workflow at the ref the caller
//! wrote (`@main` becomes `@refs/heads/main`).

use lapse_core::{
    AccessRequest, DecisionOutcome, RequestContext, Task, Timestamp, WorkloadIdentity,
};
use lapse_policy::PolicyBundle;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(examples().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The value of the first line `<key>: <value>` (after indentation, or after `# `
/// for the comment header), without quotes.
fn field(yaml: &str, key: &str) -> String {
    yaml.lines()
        .map(|l| l.trim_start().trim_start_matches("# ").trim_start())
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no `{key}:` in\n{yaml}"))
}

/// What the two workflow files say about where they live and how they run.
struct Workflows {
    /// The caller: `acme/orders`, `.github/workflows/migrate.yml`, its `name`.
    repository: String,
    path: String,
    name: String,
    /// The branch a push to which runs it.
    branch: String,
    /// `uses:` of its job: `<owner>/<repo>/<path>@<ref>`.
    uses: String,
    /// The called job's environment.
    environment: String,
}

fn workflows() -> Workflows {
    let caller = read("ci/github-actions-migrate.yml");
    let called = read("ci/github-actions-deploy.yml");
    let branches = field(&caller, "branches");
    let branch = branches
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .next()
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        caller.contains("\non:\n  push:\n"),
        "the example runs on push"
    );
    let uses = field(&caller, "uses");
    // The two files agree: the caller uses the reusable workflow where it says it
    // lives, and that one is callable.
    let (target, _) = uses.split_once('@').unwrap();
    assert_eq!(
        target,
        format!(
            "{}/{}",
            field(&called, "Repository"),
            field(&called, "File")
        ),
        "github-actions-migrate.yml must call github-actions-deploy.yml"
    );
    assert!(called.contains("\n  workflow_call:\n"), "{called}");
    Workflows {
        repository: field(&caller, "Repository"),
        path: field(&caller, "File"),
        name: field(&caller, "name"),
        branch,
        uses,
        environment: field(&called, "environment"),
    }
}

/// The claims GitHub puts in the token of the called job when `w` runs in
/// `repository` on a push to its branch.
fn github_claims(w: &Workflows, repository: &str) -> BTreeMap<String, String> {
    let git_ref = format!("refs/heads/{}", w.branch);
    let (called, called_ref) = w.uses.split_once('@').unwrap();
    let called_ref = if called_ref.starts_with("refs/") {
        called_ref.to_owned()
    } else {
        format!("refs/heads/{called_ref}")
    };
    let owner = repository.split('/').next().unwrap();
    let claims = [
        (
            "iss",
            "https://token.actions.githubusercontent.com".to_owned(),
        ),
        ("aud", "lapse".to_owned()),
        (
            "sub",
            format!("repo:{repository}:environment:{}", w.environment),
        ),
        ("repository", repository.to_owned()),
        ("repository_owner", owner.to_owned()),
        ("repository_visibility", "private".to_owned()),
        ("ref", git_ref.clone()),
        ("ref_type", "branch".to_owned()),
        ("ref_protected", "true".to_owned()),
        ("event_name", "push".to_owned()),
        ("environment", w.environment.clone()),
        ("workflow", w.name.clone()),
        ("workflow_ref", format!("{repository}/{}@{git_ref}", w.path)),
        ("job_workflow_ref", format!("{called}@{called_ref}")),
        ("actor", "octocat".to_owned()),
        ("run_id", "9001".to_owned()),
        ("run_number", "42".to_owned()),
        ("run_attempt", "1".to_owned()),
        ("runner_environment", "github-hosted".to_owned()),
    ];
    claims.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The example issuer's `workload` template over `claims`.
fn workload_of(claims: &BTreeMap<String, String>) -> (String, String) {
    let issuer: toml::Value = toml::from_str(&read("identity/github-actions/issuer.toml")).unwrap();
    let issuer = &issuer["issuer"][0];
    let mut id = issuer["workload"].as_str().unwrap().to_owned();
    for (k, v) in claims {
        id = id.replace(&format!("{{{k}}}"), v);
    }
    assert!(!id.contains('{'), "template left unfilled: {id}");
    (issuer["issuer"].as_str().unwrap().to_owned(), id)
}

fn request(claims: BTreeMap<String, String>, environment: &str) -> AccessRequest {
    let (issuer, id) = workload_of(&claims);
    AccessRequest {
        workload: WorkloadIdentity {
            id,
            issuer,
            subject: claims["sub"].clone(),
            claims,
        },
        task: Task {
            id: "gh-9001-1".into(),
            purpose: "schema migration".into(),
            ticket: String::new(),
        },
        // What the example's `lapse run` asks for.
        audience: "orders-db".into(),
        actions: vec!["migrate".into()],
        requested_ttl_secs: 15 * 60,
        context: RequestContext {
            environment: environment.into(),
            source: std::net::IpAddr::from([10, 0, 0, 7]),
            time: Timestamp::from_unix_seconds(1_795_000_000),
            break_glass: false,
            depth: 0,
            tool: None,
        },
        tools: Vec::new(),
    }
}

#[test]
fn the_github_actions_example_is_allowed_by_its_example_policy() {
    let w = workflows();
    assert!(
        read("ci/github-actions-deploy.yml").contains("--scope migrate")
            && read("ci/github-actions-deploy.yml").contains("--audience orders-db"),
        "the request below is the one the example makes"
    );
    let bundle = PolicyBundle::load_dir(&examples().join("identity/github-actions"))
        .unwrap_or_else(|e| panic!("the example policy must load: {e}"));

    let d = bundle.decide(&request(github_claims(&w, &w.repository), &w.environment));
    assert!(
        matches!(
            d.outcome,
            DecisionOutcome::Allow {
                ttl_cap_secs: Some(900)
            }
        ),
        "{d:?}"
    );
    assert_eq!(d.policies, ["github-migrate-orders-from-main"], "{d:?}");

    // The same workflow files in another repository get nothing.
    let d = bundle.decide(&request(github_claims(&w, "acme/website"), &w.environment));
    assert_eq!(d.outcome_label(), "deny", "{d:?}");

    // Nor does a migration workflow of acme/orders' own (not the reusable one).
    let mut own = github_claims(&w, &w.repository);
    own.insert("job_workflow_ref".into(), own["workflow_ref"].clone());
    assert_eq!(
        bundle.decide(&request(own, &w.environment)).outcome_label(),
        "deny"
    );
}
