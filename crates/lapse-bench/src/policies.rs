//! A synthetic policy set of exactly 100 policies over 20 services and 5 actions,
//! written the way teams write them: per-service permits scoped by action and
//! resource, a few organisation-wide forbids and permits that name no resource.

use lapse_core::{AccessRequest, RequestContext, Task, Timestamp, WorkloadIdentity};
use lapse_policy::SourceFile;
use rand::Rng;
use rand::seq::SliceRandom;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const SERVICES: usize = 20;
pub const ACTIONS: &[&str] = &["read", "write", "admin", "deploy", "delete"];
const DOMAIN: &str = "spiffe://corp.example";

fn service(i: usize) -> String {
    format!("svc-{i:02}")
}

/// The policy folder: one schema fragment and one `.cedar` file per service plus a
/// shared guardrails file. `policy_count` of the loaded bundle is 100: 80 service
/// permits, 14 service-scoped forbids, 6 organisation-wide policies (4 of them
/// unscoped by resource, so they are evaluated for every request they could match).
pub fn sources() -> Vec<SourceFile> {
    let mut files = vec![SourceFile {
        name: "actions.cedarschema".into(),
        text: format!(
            "action {} appliesTo {{ principal: Workload, resource: Resource, context: RequestContext }};\n",
            ACTIONS
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }];
    // 4 per service = 80.
    for i in 0..SERVICES {
        let s = service(i);
        let text = format!(
            r#"@id("{s}-team-read")
@max_ttl("15m")
permit (principal, action == Action::"read", resource == Resource::"{s}")
when {{ principal.uri like "{DOMAIN}/team-{i:02}/*" }};

@id("{s}-team-write-with-ticket")
@max_ttl("10m")
permit (principal, action == Action::"write", resource == Resource::"{s}")
when {{
  principal.uri like "{DOMAIN}/team-{i:02}/*" &&
  context.ticket like "CHG-*" &&
  context.environment != ""
}};

@id("{s}-deploy-in-window")
@max_ttl("30m")
permit (principal, action == Action::"deploy", resource == Resource::"{s}")
when {{
  principal.uri like "{DOMAIN}/team-{i:02}/deploy/*" &&
  principal.hasTag("repository") && principal.getTag("repository") == "corp/{s}" &&
  context.time.toTime() >= duration("6h") && context.time.toTime() < duration("20h")
}};

@id("{s}-admin-needs-approval")
@max_ttl("30m")
@approval("2")
@approvers("{s}-owners")
permit (principal, action == Action::"admin", resource == Resource::"{s}")
when {{ principal.uri like "{DOMAIN}/team-{i:02}/*" }};
"#
        );
        files.push(SourceFile {
            name: format!("{s}.cedar"),
            text,
        });
    }
    let mut org = String::new();
    org.push_str(
        r#"@id("private-networks-only")
forbid (principal, action, resource)
unless {
  context.source.isLoopback() ||
  context.source.isInRange(ip("10.0.0.0/8")) ||
  context.source.isInRange(ip("172.16.0.0/12")) ||
  context.source.isInRange(ip("192.168.0.0/16"))
};

@id("no-deletes-in-prod")
forbid (principal, action == Action::"delete", resource)
when { context.environment == "prod" };

@id("year-end-freeze")
forbid (principal, action in [Action::"write", Action::"deploy", Action::"delete"], resource)
when {
  context.environment == "prod" &&
  context.time >= datetime("2026-12-24T00:00:00Z") &&
  context.time < datetime("2027-01-02T00:00:00Z")
};

@id("auditors-read-anything")
@max_ttl("5m")
permit (principal, action == Action::"read", resource)
when { principal.uri like "spiffe://corp.example/audit/*" };

@id("long-ttl-needs-ticket")
forbid (principal, action, resource)
when { context.ttl > 3600 && context.ticket == "" };

@id("oncall-break-glass")
@break_glass("true")
@max_ttl("10m")
permit (principal, action in [Action::"read", Action::"write", Action::"admin"], resource)
when { principal.uri like "spiffe://corp.example/oncall/*" };
"#,
    );
    // 14 service guardrails: no changes to a service from its build network. Teams
    // scope these to their resource, so the index can leave them out elsewhere.
    for r in 0..14 {
        org.push_str(&format!(
            r#"
@id("{s}-no-changes-from-build-net")
forbid (principal, action in [Action::"write", Action::"admin", Action::"delete"], resource == Resource::"{s}")
when {{ context.source.isInRange(ip("10.{net}.0.0/16")) && context.environment == "prod" }};
"#,
            s = service(r),
            net = 200 + r
        ));
    }
    files.push(SourceFile {
        name: "org.cedar".into(),
        text: org,
    });
    files
}

/// `n` requests, mixed the way traffic mixes: most are a team reading or writing its
/// own service, some cross-team (denied), some admin (approval), some audit reads.
pub fn requests(n: usize, seed: u64) -> Vec<AccessRequest> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let time =
        Timestamp::parse_rfc3339("2026-11-24T10:30:00Z").unwrap_or(Timestamp::from_millis(0));
    (0..n)
        .map(|k| {
            let team = rng.gen_range(0..SERVICES);
            let target = if rng.gen_bool(0.8) {
                team
            } else {
                rng.gen_range(0..SERVICES)
            };
            let action = *ACTIONS.choose(&mut rng).unwrap_or(&"read");
            let path = match rng.gen_range(0..10) {
                0 => format!("audit/scanner-{k}"),
                1 => format!("team-{team:02}/deploy/job-{k}"),
                _ => format!("team-{team:02}/ci/job-{k}"),
            };
            let id = format!("{DOMAIN}/{path}");
            let mut claims = BTreeMap::new();
            claims.insert("repository".into(), format!("corp/{}", service(team)));
            claims.insert("sub".into(), id.clone());
            let source: IpAddr = if rng.gen_bool(0.9) {
                [10, rng.gen_range(0..=255), 1, 2].into()
            } else {
                [203, 0, 113, 7].into()
            };
            AccessRequest {
                workload: WorkloadIdentity {
                    id: id.clone(),
                    issuer: "https://issuer.corp.example".into(),
                    subject: id,
                    claims,
                },
                task: Task {
                    id: format!("T-{k}"),
                    purpose: "benchmark".into(),
                    ticket: if rng.gen_bool(0.5) {
                        format!("CHG-{k}")
                    } else {
                        String::new()
                    },
                },
                audience: service(target),
                actions: vec![action.to_owned()],
                requested_ttl_secs: rng.gen_range(60..7200),
                context: RequestContext {
                    environment: (*["prod", "staging", ""].choose(&mut rng).unwrap_or(&"")).into(),
                    source,
                    time,
                    break_glass: rng.gen_bool(0.02),
                    depth: 0,
                    tool: None,
                },
                tools: Vec::new(),
            }
        })
        .collect()
}
