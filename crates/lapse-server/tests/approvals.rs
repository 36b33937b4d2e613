#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Human approval over real HTTP: the dev policies ask two people of the `dba`
//! group to approve `admin` on `orders-db`. Approvers are operator accounts made
//! here; the waiting workload polls the token endpoint with its `request_id`.

mod common;

use common::{CI, ONCALL, start, token_of};
use lapse_server::dev;
use lapse_token::DpopKey;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_distinct_approvers_of_the_group_release_the_token_once() {
    let s = start().await;
    let key = DpopKey::generate();
    let id = s.ask(&key, "admin", "3600").await;

    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("authorization_pending")),
        "{v}"
    );
    assert_eq!(v["approvals_required"], 2);
    assert_eq!(v["approvers"], "dba");

    // The list shows it with what an approver needs to decide.
    let (st, list) = s
        .send(
            s.http
                .get(format!("{}/v1/approvals", s.url))
                .bearer_auth(token_of("alice")),
        )
        .await;
    assert_eq!(st, 200, "{list}");
    let r = list["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap();
    assert_eq!(r["workload"], CI);
    assert_eq!(r["actions"], json!(["admin"]));
    assert_eq!(
        r["ttl"], 900,
        "the policy allows 30m; the dev max_ttl caps it at 15m"
    );
    assert_eq!(r["approvers"], "dba");
    assert_eq!(r["task"]["purpose"], "rebuild an index");

    let (st, v) = s
        .decide("alice", &id, "approve", json!({ "reason": "change CHG-7" }))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "pending");
    // One approver counts once.
    let (st, v) = s.decide("alice", &id, "approve", json!({})).await;
    assert_eq!(st, 409, "{v}");
    // Outside the group: refused and audited.
    let (st, v) = s.decide("carol", &id, "approve", json!({})).await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error_description"].as_str().unwrap().contains("`dba`"),
        "{v}"
    );
    // The owner of the workload: separation of duties.
    let (st, v) = s.decide("dave", &id, "approve", json!({})).await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("separation of duties")
    );
    // No approve role.
    let (st, _) = s.decide("erin", &id, "approve", json!({})).await;
    assert_eq!(st, 403);
    // Still waiting for one more.
    let (_, v) = s.poll(&key, &id).await;
    assert_eq!(v["error"], "authorization_pending");
    assert_eq!(v["approvals_required"], 1, "one approval left: {v}");

    // Bob approves a shorter lifetime: the token is released with it.
    let (st, v) = s
        .decide("bob", &id, "approve", json!({ "ttl": "10m" }))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "active");
    // Another key learns nothing.
    let (st, v) = s.poll(&DpopKey::generate(), &id).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["expires_in"], 600);
    assert_eq!(v["scope"], "admin");
    assert_eq!(v["grant_id"], id.as_str());
    // Once.
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );

    let kinds = s.audit_kinds(&id).await;
    let has = |k: &str, who: &str| kinds.iter().any(|(a, b)| a == k && b == who);
    assert!(
        has("approval.granted", "alice") && has("approval.granted", "bob"),
        "{kinds:?}"
    );
    assert!(
        has("approval.refused", "carol") && has("approval.refused", "dave"),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|(k, _)| k == "grant.issued"));
    assert!(kinds.iter().any(|(k, _)| k == "grant.delivered"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_narrow_but_never_widen() {
    let s = start().await;
    let key = DpopKey::generate();
    // read is allowed alone; with admin the whole request waits for approval.
    let id = s.ask(&key, "admin read", "600").await;
    for body in [
        json!({ "actions": ["admin", "write"] }),
        json!({ "actions": [] }),
        json!({ "ttl": "11m" }),
        json!({ "scope": "admin" }),
    ] {
        let (st, v) = s.decide("alice", &id, "approve", body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
    }
    let (st, v) = s
        .decide("alice", &id, "approve", json!({ "actions": ["read"] }))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .decide("bob", &id, "approve", json!({ "ttl": "2m" }))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["scope"], "read", "narrowed to read");
    assert_eq!(v["expires_in"], 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_needs_a_reason_and_reaches_the_workload() {
    let s = start().await;
    let key = DpopKey::generate();
    let id = s.ask(&key, "admin", "600").await;
    let (st, v) = s.decide("alice", &id, "deny", json!({})).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = s
        .decide("carol", &id, "deny", json!({ "reason": "no" }))
        .await;
    assert_eq!(st, 403, "outside the group cannot deny either: {v}");
    let (st, v) = s
        .decide(
            "alice",
            &id,
            "deny",
            json!({ "reason": "not during the sale" }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "denied");
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (403, Some("access_denied")),
        "{v}"
    );
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("not during the sale")
    );
    let (st, _) = s.decide("bob", &id, "approve", json!({})).await;
    assert_eq!(st, 409, "a decided request takes no approval");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_request_expires_and_can_no_longer_be_approved() {
    let s = start().await;
    let key = DpopKey::generate();
    let id = s.ask(&key, "admin", "600").await;
    let (st, _) = s.decide("alice", &id, "approve", json!({})).await;
    assert_eq!(st, 200);
    // The dev approval window is 15 minutes.
    s.clock.advance_secs(15 * 60 + 1);
    let (st, v) = s.decide("bob", &id, "approve", json!({})).await;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("approval window"),
        "{v}"
    );
    let (st, v) = s.poll(&key, &id).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (403, Some("access_denied")),
        "{v}"
    );
    assert!(
        v["error_description"].as_str().unwrap().contains("expired"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_decisions_get_precise_errors() {
    let s = start().await;
    let (st, _) = s
        .decide(
            "alice",
            "gr_00000000000000000000000000000000",
            "approve",
            json!({}),
        )
        .await;
    assert_eq!(st, 404);
    let (st, _) = s.decide("alice", "not-an-id", "approve", json!({})).await;
    assert_eq!(st, 404, "no request has that id");
    let (st, _) = s
        .send(
            s.http
                .post(format!(
                    "{}/v1/approvals/gr_00000000000000000000000000000000/approve",
                    s.url
                ))
                .bearer_auth("lapse_op_nobody")
                .json(&json!({})),
        )
        .await;
    assert_eq!(st, 401);
    let (st, v) = s.poll(&DpopKey::generate(), "garbage").await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    // An active grant issued directly is not a request to approve.
    let key = DpopKey::generate();
    let url = format!("{}/oauth/token", s.url);
    let identity = dev::dev_token(&s.dir, CI, 600, &[], s.now()).unwrap();
    let proof = key.proof("POST", &url, None, s.now());
    let (st, v) = s
        .send(s.http.post(&url).header("DPoP", proof).form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", "read"),
            ("task", "T-1"),
            ("purpose", "p"),
        ]))
        .await;
    assert_eq!(st, 200, "{v}");
    let gid = v["grant_id"].as_str().unwrap();
    let (st, v) = s.decide("alice", gid, "approve", json!({})).await;
    assert_eq!(st, 409, "{v}");
    // And its token cannot be collected again by polling.
    let (st, v) = s.poll(&key, gid).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_is_issued_at_once_short_marked_and_reviewed() {
    let s = start().await;
    let (st, v) = s.break_glass(ONCALL, None).await;
    assert_eq!(st, 400, "a justification is required: {v}");
    let (st, v) = s.break_glass(ONCALL, Some("short")).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = s.break_glass(CI, Some("the CI job wants in")).await;
    assert_eq!(st, 403, "only break-glass policies decide: {v}");

    let (st, v) = s
        .break_glass(ONCALL, Some("orders API down, INC-77, restoring the index"))
        .await;
    assert_eq!(st, 200, "issued at once, no approval: {v}");
    assert_eq!(
        v["expires_in"], 300,
        "the hard break-glass ceiling (policy says 10m)"
    );
    let id = v["grant_id"].as_str().unwrap().to_owned();
    // Marked in the token…
    let token = v["access_token"].as_str().unwrap();
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value =
        serde_json::from_slice(&lapse_token::b64::decode(payload).unwrap()).unwrap();
    assert_eq!(claims["break_glass"], true, "{claims}");
    // …in the grant and every audit entry.
    let g = s.admin_get(&format!("/v1/grants/{id}")).await;
    assert_eq!(g["break_glass"], true);
    let audit = g["audit"].as_array().unwrap();
    assert!(audit.len() >= 2);
    for e in audit {
        let data: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
        let marked =
            data["break_glass"] == true || data["request"]["context"]["break_glass"] == true;
        assert!(marked, "unmarked audit entry: {e}");
    }
    // A review is open, and the standing report says so.
    let r = s.admin_get("/v1/reviews").await;
    let open: Vec<&Value> = r["reviews"].as_array().unwrap().iter().collect();
    assert_eq!(open.len(), 1, "{r}");
    assert_eq!(
        open[0]["review"]["justification"],
        "orders API down, INC-77, restoring the index"
    );
    let report = s.admin_get("/v1/reports/standing").await;
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "break_glass_review_open" && f["grant_id"] == id.as_str()),
        "{report}"
    );

    // Closing: an approver who does not own the workload, once, with a verdict.
    let close = |who: &'static str, body: Value| {
        let s = &s;
        let id = id.clone();
        async move {
            s.send(
                s.http
                    .post(format!("{}/v1/reviews/{id}/close", s.url))
                    .bearer_auth(token_of(who))
                    .json(&body),
            )
            .await
        }
    };
    let (st, _) = close("alice", json!({ "verdict": "maybe" })).await;
    assert_eq!(st, 400);
    let (st, v) = close("bob", json!({ "verdict": "justified" })).await;
    assert_eq!(st, 403, "bob owns the on-call workloads: {v}");
    let (st, _) = close("erin", json!({ "verdict": "justified" })).await;
    assert_eq!(st, 403, "no approve role");
    let (st, v) = close(
        "alice",
        json!({ "verdict": "justified", "note": "INC-77 confirmed" }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["review"]["verdict"], "justified");
    assert_eq!(v["review"]["closed_by"], "alice");
    let (st, _) = close("carol", json!({ "verdict": "unjustified" })).await;
    assert_eq!(st, 409, "closed once");
    let r = s.admin_get("/v1/reviews").await;
    assert_eq!(r["reviews"], json!([]));
    let all = s.admin_get("/v1/reviews?state=all").await;
    assert_eq!(all["reviews"].as_array().unwrap().len(), 1);
    let report = s.admin_get("/v1/reports/standing").await;
    assert!(
        !report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "break_glass_review_open"),
        "{report}"
    );
    let kinds = s.audit_kinds(&id).await;
    assert!(
        kinds
            .iter()
            .any(|(k, who)| k == "review.closed" && who == "alice"),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|(k, who)| k == "approval.refused" && who == "bob"),
        "{kinds:?}"
    );
    // Every entry about the grant is marked, the refusal (which writes no grant
    // row) included.
    let g = s.admin_get(&format!("/v1/grants/{id}")).await;
    for e in g["audit"].as_array().unwrap() {
        let data: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
        let marked =
            data["break_glass"] == true || data["request"]["context"]["break_glass"] == true;
        assert!(marked, "unmarked audit entry: {e}");
    }
}
