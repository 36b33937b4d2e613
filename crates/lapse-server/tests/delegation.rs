#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
//! Sub-agent tokens over real HTTP: RFC 8693 exchange of a Lapse token for a
//! narrower one, the `act` chain, the depth limit, widening refused, and the
//! cascade: ending a parent ends every grant delegated from it, in the same commit
//! (the feed carries each), and the child's token is dead at once.

mod common;

use common::Server;
use lapse_server::dev;
use lapse_token::DpopKey;
use serde_json::{Value, json};

const AGENT: &str = "spiffe://dev.lapse.local/agent/research";
const TOOLS: &str = r#"[{"name":"read_file","args":{"path":{"prefix":"/data/"}}},{"name":"query","args":{"limit":{"maximum":100}}}]"#;

async fn agent_token(s: &Server, key: &DpopKey) -> Value {
    let url = format!("{}/oauth/token", s.url);
    let identity = dev::dev_token(&s.dir, AGENT, 3600, &[], s.now()).unwrap();
    let form = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", identity.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", "mcp-tools"),
        ("scope", "call"),
        ("task", "research-42"),
        ("purpose", "summarise the reports"),
        ("tools", TOOLS),
    ];
    let proof = key.proof("POST", &url, None, s.now());
    let (st, v) = s
        .send(s.http.post(&url).header("DPoP", proof).form(&form))
        .await;
    assert_eq!(st, 200, "{v}");
    v
}

/// `parent_key` asks for a sub-agent token from `parent` with `extra` fields.
async fn sub(
    s: &Server,
    parent_key: &DpopKey,
    parent: &str,
    extra: &[(&str, &str)],
) -> (u16, Value) {
    let url = format!("{}/oauth/token", s.url);
    let mut form = vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", parent),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
    ];
    form.extend_from_slice(extra);
    let proof = parent_key.proof("POST", &url, None, s.now());
    s.send(s.http.post(&url).header("DPoP", proof).form(&form))
        .await
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&lapse_token::b64::decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn a_sub_agent_gets_less_and_ends_with_its_parent() {
    let s = common::start().await;
    let key = DpopKey::generate();
    let parent = agent_token(&s, &key).await;
    let parent_token = parent["access_token"].as_str().unwrap();
    let pc = claims(parent_token);
    assert_eq!(pc["tools"][0]["name"], "read_file", "{pc}");
    assert!(pc.get("act").is_none());

    // The child's own key: the parent names it with `dpop_jkt`.
    let child_key = DpopKey::generate();
    let narrower = r#"[{"name":"read_file","args":{"path":{"prefix":"/data/reports/"}}}]"#;
    let (st, child) = sub(
        &s,
        &key,
        parent_token,
        &[
            ("tools", narrower),
            ("dpop_jkt", child_key.jkt()),
            ("expires_in", "99999"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{child}");
    let child_token = child["access_token"].as_str().unwrap();
    let cc = claims(child_token);
    assert_eq!(cc["sub"], AGENT);
    assert_eq!(cc["aud"], "mcp-tools");
    assert_eq!(cc["task"], "research-42");
    assert_eq!(
        cc["cnf"]["jkt"],
        child_key.jkt(),
        "bound to the sub-agent's key"
    );
    assert_eq!(
        cc["act"]["sub"],
        format!(
            "urn:ietf:params:oauth:jwk-thumbprint:sha-256:{}",
            child_key.jkt()
        )
    );
    assert_eq!(cc["tools"].as_array().unwrap().len(), 1);
    assert!(
        cc["exp"].as_i64().unwrap() <= pc["exp"].as_i64().unwrap(),
        "never outlives the parent"
    );
    assert_eq!(child["parent_grant_id"], parent["grant_id"]);

    // A grandchild, made by the child with its key: the act chain nests.
    let (st, grandchild) = sub(&s, &child_key, child_token, &[]).await;
    assert_eq!(st, 200, "{grandchild}");
    let gc = claims(grandchild["access_token"].as_str().unwrap());
    assert_eq!(gc["act"]["act"]["sub"], cc["act"]["sub"], "{gc}");

    // Widening is refused, and recorded; so is a request with someone else's key.
    for (extra, want) in [
        (vec![("scope", "call admin")], "invalid_scope"),
        (vec![("tools", r#"[{"name":"transfer"}]"#)], "invalid_scope"),
        (
            vec![("tools", r#"[{"name":"read_file"}]"#)],
            "invalid_scope",
        ),
        (
            vec![(
                "tools",
                r#"[{"name":"query","args":{"limit":{"maximum":1000}}}]"#,
            )],
            "invalid_scope",
        ),
        (vec![("audience", "orders-db")], "invalid_target"),
        (vec![("task", "another")], "invalid_request"),
        (vec![("tools", "not json")], "invalid_request"),
    ] {
        let (st, v) = sub(&s, &key, parent_token, &extra).await;
        assert_eq!(st, 400, "{extra:?}: {v}");
        assert_eq!(v["error"], want, "{extra:?}: {v}");
    }
    let (st, v) = sub(&s, &child_key, parent_token, &[]).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "{v}"
    );

    // The dev policy allows two hops below the agent; the third is refused.
    let (st, v) = sub(&s, &key, grandchild["access_token"].as_str().unwrap(), &[]).await;
    assert_eq!(st, 400, "only the grandchild's key may use its token: {v}");
    let gkey_owner = &child_key; // the grandchild is bound to the key that asked for it
    let (st, v) = sub(
        &s,
        gkey_owner,
        grandchild["access_token"].as_str().unwrap(),
        &[],
    )
    .await;
    assert_eq!(st, 403, "depth 3 is past the policy's limit: {v}");
    assert_eq!(v["error"], "access_denied", "{v}");

    // Completing the parent's task ends the whole family in one commit.
    assert!(s.active(child_token).await);
    let (st, v) = s
        .send(
            s.http
                .post(format!(
                    "{}/v1/grants/{}/revoke",
                    s.url,
                    parent["grant_id"].as_str().unwrap()
                ))
                .bearer_auth(&s.admin)
                .json(&json!({ "reason": "task abandoned" })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(!s.active(parent_token).await);
    assert!(
        !s.active(child_token).await,
        "the child ends with its parent"
    );
    assert!(!s.active(grandchild["access_token"].as_str().unwrap()).await);
    let (st, feed) = s
        .send(
            s.http
                .get(format!("{}/v1/feed", s.url))
                .header("Accept", "application/json")
                .bearer_auth(&s.admin),
        )
        .await;
    assert_eq!(st, 200);
    let ended: Vec<&str> = feed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["grant_id"].as_str().unwrap())
        .collect();
    for g in [
        &parent["grant_id"],
        &child["grant_id"],
        &grandchild["grant_id"],
    ] {
        assert!(
            ended.contains(&g.as_str().unwrap()),
            "{g} on the feed: {feed}"
        );
    }
    let kinds = s.audit_kinds(child["grant_id"].as_str().unwrap()).await;
    assert!(
        kinds
            .iter()
            .any(|(k, a)| k == "grant.revoked" && a == "lapse"),
        "{kinds:?}"
    );
    // An ended parent delegates nothing.
    let (st, v) = sub(&s, &key, parent_token, &[]).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
}

#[tokio::test]
async fn completing_the_task_ends_everything_it_spawned() {
    let s = common::start().await;
    let key = DpopKey::generate();
    let parent = agent_token(&s, &key).await;
    let parent_token = parent["access_token"].as_str().unwrap();
    let (st, child) = sub(
        &s,
        &key,
        parent_token,
        &[(
            "tools",
            r#"[{"name":"query","args":{"limit":{"maximum":10}}}]"#,
        )],
    )
    .await;
    assert_eq!(st, 200, "{child}");
    let child_token = child["access_token"].as_str().unwrap();
    // The child (bound to the parent's key here: no `dpop_jkt`) delegates again.
    let (st, grandchild) = sub(&s, &key, child_token, &[("scope", "call")]).await;
    assert_eq!(st, 200, "{grandchild}");
    // The agent completes its own grant, as `lapse run` does when its command exits.
    let id = parent["grant_id"].as_str().unwrap();
    let url = format!("{}/v1/grants/{id}/complete", s.url);
    let proof = key.proof("POST", &url, Some(parent_token), s.now());
    let (st, v) = s
        .send(
            s.http
                .post(&url)
                .header("Authorization", format!("DPoP {parent_token}"))
                .header("DPoP", proof)
                .json(&json!({ "reason": "report written" })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "completed");
    for (what, t) in [
        ("child", child_token),
        ("grandchild", grandchild["access_token"].as_str().unwrap()),
    ] {
        assert!(!s.active(t).await, "the {what} ends with the task");
    }
    let (st, g) = s
        .send(
            s.http
                .get(format!(
                    "{}/v1/grants/{}",
                    s.url,
                    grandchild["grant_id"].as_str().unwrap()
                ))
                .bearer_auth(&s.admin),
        )
        .await;
    assert_eq!(st, 200, "{g}");
    assert_eq!(g["state"], "revoked", "{g}");
    assert_eq!(g["depth"], 2, "{g}");
    assert_eq!(g["parent"], child["grant_id"], "{g}");
    assert!(
        g["end"]["reason"].as_str().unwrap().contains(id),
        "the reason names the grant whose end it followed: {g}"
    );
}

#[tokio::test]
async fn a_refused_renewal_ends_what_was_delegated_too() {
    let s = common::start().await;
    let key = DpopKey::generate();
    let parent = agent_token(&s, &key).await;
    let id = parent["grant_id"].as_str().unwrap().to_owned();
    let (st, child) = sub(&s, &key, parent["access_token"].as_str().unwrap(), &[]).await;
    assert_eq!(st, 200, "{child}");
    // Policy changes under the running task: agents may no longer call tools.
    std::fs::write(
        s.dir.join("policies").join("stop-agents.cedar"),
        "@id(\"stop-agents\")\nforbid (principal, action == Action::\"call\", resource);",
    )
    .unwrap();
    let url = format!("{}/v1/grants/{id}/renew", s.url);
    let mut token = parent["access_token"].as_str().unwrap().to_owned();
    let mut refused = None;
    // Renewals pass until the edit is loaded; the first one after is refused.
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let proof = key.proof("POST", &url, Some(&token), s.now());
        let (st, v) = s
            .send(
                s.http
                    .post(&url)
                    .header("Authorization", format!("DPoP {token}"))
                    .header("DPoP", proof)
                    .json(&json!({})),
            )
            .await;
        match st {
            200 => token = v["access_token"].as_str().unwrap().to_owned(),
            _ => {
                refused = Some((st, v));
                break;
            }
        }
    }
    let (st, v) = refused.expect("the policy edit was never loaded");
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("renewal refused"),
        "{v}"
    );
    assert!(
        !s.active(child["access_token"].as_str().unwrap()).await,
        "the child ends with its parent"
    );
    let (_, g) = s
        .send(
            s.http
                .get(format!(
                    "{}/v1/grants/{}",
                    s.url,
                    child["grant_id"].as_str().unwrap()
                ))
                .bearer_auth(&s.admin),
        )
        .await;
    assert_eq!(g["state"], "revoked", "{g}");
}

/// Issue 28 (27): a sub-agent that asked for longer than its parent has left was
/// silently given less. The answer says so: `expires_in` is what it got,
/// `requested_expires_in` what it asked, `ttl_capped_by` why; the audit entry too.
/// Within what the parent allows, nothing is said.
#[tokio::test]
async fn a_sub_agent_asking_beyond_its_parent_is_told_it_was_capped() {
    let s = common::start().await;
    let key = DpopKey::generate();
    let parent = agent_token(&s, &key).await;
    let parent_token = parent["access_token"].as_str().unwrap();
    let parent_left = parent["expires_in"].as_u64().unwrap();

    let (st, child) = sub(&s, &key, parent_token, &[("expires_in", "99999")]).await;
    assert_eq!(st, 200, "{child}");
    let got = child["expires_in"].as_u64().unwrap();
    assert!(got <= parent_left && got < 99_999, "{child}");
    assert_eq!(child["requested_expires_in"], 99_999, "{child}");
    assert_eq!(child["ttl_capped_by"], "parent_grant", "{child}");
    let issued = s.admin_get("/v1/audit?limit=10000").await["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "grant.issued" && e["grant_id"] == child["grant_id"])
        .map(|e| serde_json::from_str::<Value>(e["data"].as_str().unwrap()).unwrap())
        .next()
        .unwrap();
    assert_eq!(issued["ttl_capped_by"], "parent_grant", "{issued}");
    assert_eq!(issued["requested_ttl_secs"], 99_999, "{issued}");

    let (st, short) = sub(&s, &key, parent_token, &[("expires_in", "60")]).await;
    assert_eq!(st, 200, "{short}");
    assert_eq!(short["expires_in"], 60);
    assert!(short.get("ttl_capped_by").is_none(), "{short}");
    assert!(short.get("requested_expires_in").is_none(), "{short}");
}
