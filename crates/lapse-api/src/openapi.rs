//! The OpenAPI 3.1 document for the native API and the OAuth endpoints, served at
//! `/openapi.json`. Written by hand next to the handlers it describes; the
//! integration tests check every path it names is routed.

use serde_json::{Map, Value, json};

pub fn document() -> Value {
    let mut doc = json!({
      "openapi": "3.1.0",
      "info": { "title": "Lapse", "version": env!("CARGO_PKG_VERSION"), "description": "Just-in-time access for non-human identities: task-scoped, DPoP-bound, short-lived credentials decided by Cedar policy." },
      "paths": paths(),
      "components": {
        "securitySchemes": {
          "operatorToken": { "type": "http", "scheme": "bearer", "description": "operator API token from the config" },
          "dpopToken": { "type": "http", "scheme": "DPoP", "description": "the grant's own access token with a DPoP proof (RFC 9449)" }
        },
        "schemas": schemas()
      }
    });
    with_common_errors(&mut doc);
    doc
}

/// Answers any operation can give besides its own: malformed input, the limits,
/// and failing closed. Added where an operation does not describe them itself.
fn with_common_errors(doc: &mut Value) {
    const COMMON: &[(&str, &str)] = &[
        (
            "400",
            "invalid_request: a missing, repeated or malformed parameter, query or body",
        ),
        ("401", "credentials missing or not valid"),
        ("403", "not allowed"),
        ("404", "no such object, or a malformed id"),
        (
            "409",
            "changed concurrently, or not in a state that allows this",
        ),
        ("413", "body larger than 64 KiB"),
        ("415", "wrong content type"),
        (
            "429",
            "slow_down: over a rate limit or cap; see Retry-After",
        ),
        ("431", "request headers too many or too large"),
        (
            "503",
            "temporarily_unavailable: store, policy or keys unavailable; nothing changed",
        ),
    ];
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for ops in paths.values_mut().filter_map(Value::as_object_mut) {
        for op in ops.values_mut() {
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            for (code, what) in COMMON {
                responses.entry((*code).to_owned()).or_insert_with(|| {
                    json!({ "description": what, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
                });
            }
        }
    }
}

/// Every path, in the order the document has always listed them.
fn paths() -> Value {
    let mut paths = Map::new();
    for area in [
        oauth_paths(),
        grant_paths(),
        approval_paths(),
        audit_paths(),
        operations_paths(),
        service_paths(),
    ] {
        let Value::Object(area) = area else {
            unreachable!("each area is a JSON object of paths")
        };
        paths.extend(area);
    }
    Value::Object(paths)
}

/// A response with the `Error` body.
fn e(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// Security: an operator API token.
fn op_auth() -> Value {
    json!([{ "operatorToken": [] }])
}

/// Security: the grant's own DPoP-bound access token.
fn wl_auth() -> Value {
    json!([{ "dpopToken": [] }])
}

/// The `{id}` path parameter: a grant id.
fn gid() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^gr_[0-9a-f]{32}$" } })
}

/// The `DPoP` proof header.
fn dpop() -> Value {
    json!({ "name": "DPoP", "in": "header", "required": true, "schema": { "type": "string" }, "description": "RFC 9449 proof for this request" })
}

/// The OAuth endpoints: RFC 8693 token exchange, RFC 7662 introspection, RFC 7009 revocation.
fn oauth_paths() -> Value {
    json!({
      "/oauth/token": { "post": {
        "summary": "RFC 8693 token exchange: identity token in, task-scoped DPoP-bound access token out",
        "parameters": [dpop()],
        "requestBody": { "required": true, "content": { "application/x-www-form-urlencoded": { "schema": { "$ref": "#/components/schemas/TokenExchange" } } } },
        "responses": {
          "200": { "description": "issued", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/TokenResponse" } } } },
          "400": e("invalid_request, invalid_grant, invalid_target, invalid_scope, invalid_dpop_proof, unsupported_grant_type, or authorization_pending with request_id"),
          "403": e("access_denied by policy"), "413": e("body too large"), "415": e("wrong content type"), "503": e("store, policy or keys unavailable: nothing issued")
        } } },
      "/oauth/introspect": { "post": {
        "summary": "RFC 7662 introspection", "security": op_auth(),
        "requestBody": { "required": true, "content": { "application/x-www-form-urlencoded": { "schema": { "type": "object", "required": ["token"], "properties": { "token": { "type": "string", "minLength": 1 }, "token_type_hint": { "type": "string" } } } } } },
        "responses": { "200": { "description": "introspection result", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Introspection" } } } },
          "400": e("invalid_request"), "401": e("operator token missing or unknown"), "403": e("operator lacks the introspect role"), "503": { "description": "store unavailable: inactive", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Introspection" } } } } } } },
      "/oauth/revoke": { "post": {
        "summary": "RFC 7009 revocation: ends the token's grant",
        "requestBody": { "required": true, "content": { "application/x-www-form-urlencoded": { "schema": { "type": "object", "required": ["token"], "properties": { "token": { "type": "string", "minLength": 1 }, "token_type_hint": { "type": "string" } } } } } },
        "responses": { "200": { "description": "revoked, or the token was not valid" }, "400": e("invalid_request"), "503": e("store unavailable") } } }
    })
}

/// Requesting a grant natively, and what operators and the grant's own workload do with it.
fn grant_paths() -> Value {
    json!({
      "/v1/access-requests": { "post": {
        "summary": "Native access request (same semantics as token exchange)",
        "parameters": [dpop()],
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/AccessRequest" } } } },
        "responses": {
          "201": { "description": "allowed and issued", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Issued" } } } },
          "202": { "description": "waiting for approval", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Pending" } } } },
          "400": e("invalid request, identity token or DPoP proof"), "403": e("access_denied by policy"), "413": e("body too large"), "415": e("wrong content type"), "503": e("unavailable: nothing issued")
        } } },
      "/v1/grants": { "get": {
        "summary": "List grants, newest first", "security": op_auth(),
        "parameters": [
          { "name": "state", "in": "query", "schema": { "type": "string", "enum": ["pending", "active", "completed", "expired", "revoked", "denied"] } },
          { "name": "workload", "in": "query", "schema": { "type": "string" } },
          { "name": "task", "in": "query", "schema": { "type": "string" } },
          { "name": "audience", "in": "query", "schema": { "type": "string" } },
          { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 0 }, "description": "at most this many (default 100; larger than 1000 is clamped)" },
          { "name": "before", "in": "query", "schema": { "type": "string" }, "description": "a page's `next`: the grants older than it (keyset paging, stable while grants are added)" } ],
        "responses": { "200": { "description": "one page of grants", "content": { "application/json": { "schema": { "type": "object", "required": ["grants", "next"], "properties": { "grants": { "type": "array", "items": { "$ref": "#/components/schemas/Grant" } }, "next": { "type": ["string", "null"], "description": "pass as `before` for the next page; null on the last" } } } } } },
          "400": e("bad query"), "401": e("operator token required"), "403": e("role missing") } } },
      "/v1/grants/{id}": { "get": {
        "summary": "One grant with its audit entries", "security": op_auth(), "parameters": [gid()],
        "responses": { "200": { "description": "the grant", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Grant" } } } }, "401": e("operator token required"), "403": e("role missing"), "404": e("no such grant") } } },
      "/v1/grants/{id}/complete": { "post": {
        "summary": "The workload ends its own grant (task over)", "security": wl_auth(), "parameters": [gid(), dpop()],
        "requestBody": { "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "properties": {
          "reason": { "type": "string" }, "exit_status": { "type": "integer", "minimum": -2147483648, "maximum": 2147483647, "description": "the task's process exit code, recorded in the audit entry" },
          "signal": { "type": "integer", "description": "the signal that ended the task's process" } } } } } },
        "responses": { "200": { "description": "completed", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Grant" } } } },
          "400": e("invalid DPoP proof or body"), "401": e("invalid token"), "403": e("token of another grant"), "404": e("no such grant"), "409": e("grant already ended") } } },
      "/v1/grants/{id}/revoke": { "post": {
        "summary": "An operator ends a grant", "security": op_auth(), "parameters": [gid()],
        "requestBody": { "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Reason" } } } },
        "responses": { "200": { "description": "revoked; `feed_position`: a gate whose `/readyz` `feed_position` has reached it has applied the ending", "content": { "application/json": { "schema": { "allOf": [ { "$ref": "#/components/schemas/Grant" }, { "type": "object", "required": ["feed_position"], "properties": { "feed_position": { "type": "integer", "minimum": 0 } } } ] } } } },
          "401": e("operator token required"), "403": e("role missing"), "404": e("no such grant"), "409": e("grant already ended") } } },
      "/v1/grants/{id}/renew": { "post": {
        "summary": "Explicit renewal: policy is decided again now; capped by the grant's maximum lifetime", "security": wl_auth(), "parameters": [gid(), dpop()],
        "requestBody": { "content": { "application/json": { "schema": { "type": "object", "properties": { "ttl": { "type": "string", "pattern": "^[0-9]+[smhd]$", "examples": ["10m"] } } } } } },
        "responses": { "200": { "description": "a new token", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Issued" } } } },
          "400": e("invalid proof"), "401": e("invalid token"), "403": e("renewal refused: the grant is ended"), "409": e("ended or at maximum lifetime") } } },
      "/v1/grants/{id}/status": { "get": {
        "summary": "The workload asks whether its own grant still holds (polled by `lapse run`)", "security": wl_auth(), "parameters": [gid(), dpop()],
        "responses": { "200": { "description": "the grant's state", "content": { "application/json": { "schema": { "type": "object", "required": ["id", "state", "live"], "properties": {
            "id": { "type": "string" }, "state": { "type": "string" }, "live": { "type": "boolean" }, "expires_at": { "type": "integer" }, "max_expires_at": { "type": "integer" },
            "expires_in": { "type": "integer" }, "end": { "type": ["object", "null"] } } } } } },
          "400": e("invalid DPoP proof"), "401": e("invalid or expired token"), "403": e("token of another grant"), "404": e("no such grant") } } }
    })
}

/// Requests waiting for approval, and the mandatory reviews of break-glass grants.
fn approval_paths() -> Value {
    json!({
      "/v1/approvals": { "get": {
        "summary": "Requests waiting for approval, newest first", "security": op_auth(),
        "parameters": [ { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 0 }, "description": "at most this many (larger values are clamped)" } ],
        "responses": { "200": { "description": "pending requests", "content": { "application/json": { "schema": { "type": "object", "properties": { "requests": { "type": "array", "items": { "$ref": "#/components/schemas/PendingRequest" } } } } } } },
          "400": e("bad query"), "401": e("operator token required"), "403": e("role missing (approve or read)") } } },
      "/v1/approvals/{id}": { "get": {
        "summary": "One request with its audit entries and the workload's recent grants", "security": op_auth(), "parameters": [gid()],
        "responses": { "200": { "description": "the request", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/PendingRequest" } } } },
          "401": e("operator token required"), "403": e("role missing"), "404": e("no such request") } } },
      "/v1/approvals/{id}/approve": { "post": {
        "summary": "Approve (optionally narrowed: fewer actions, shorter lifetime); the last required approval activates the grant", "security": op_auth(), "parameters": [gid()],
        "requestBody": { "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ApprovalDecision" } } } },
        "responses": { "200": { "description": "recorded", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/PendingRequest" } } } },
          "400": e("widening, or a bad body"), "401": e("operator token required"), "403": e("no approve role, outside the approver group, or the workload's owner (audited)"),
          "404": e("no such request"), "409": e("already approved by this approver, decided, or past its approval window") } } },
      "/v1/approvals/{id}/deny": { "post": {
        "summary": "Deny, with a reason the workload sees", "security": op_auth(), "parameters": [gid()],
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "required": ["reason"], "properties": { "reason": { "type": "string", "minLength": 1 } } } } } },
        "responses": { "200": { "description": "denied", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/PendingRequest" } } } },
          "400": e("reason missing"), "401": e("operator token required"), "403": e("not allowed to decide (audited)"), "404": e("no such request"), "409": e("already decided or expired") } } },
      "/v1/reviews": { "get": {
        "summary": "Break-glass grants and their mandatory reviews (open ones by default)", "security": op_auth(),
        "parameters": [ { "name": "state", "in": "query", "schema": { "enum": ["open", "all"] } } ],
        "responses": { "200": { "description": "reviews", "content": { "application/json": { "schema": { "type": "object", "properties": { "reviews": { "type": "array", "items": { "$ref": "#/components/schemas/Grant" } } } } } } },
          "400": e("bad state"), "401": e("operator token required"), "403": e("role missing") } } },
      "/v1/reviews/{id}/close": { "post": {
        "summary": "Close a break-glass review with a verdict", "security": op_auth(), "parameters": [gid()],
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "required": ["verdict"], "properties": {
          "verdict": { "enum": ["justified", "unjustified"] }, "note": { "type": "string" } } } } } },
        "responses": { "200": { "description": "closed", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Grant" } } } },
          "400": e("bad verdict"), "401": e("operator token required"), "403": e("no approve role, or the workload's owner (audited)"), "404": e("no such grant"), "409": e("no review, or already closed") } } }
    })
}

/// The audit chain and the standing-privilege report.
fn audit_paths() -> Value {
    json!({
      "/v1/audit": { "get": {
        "summary": "Audit entries after a sequence number", "security": op_auth(),
        "parameters": [ { "name": "after", "in": "query", "schema": { "type": "integer", "minimum": 0 } }, { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 0 } } ],
        "responses": { "200": { "description": "entries", "content": { "application/json": { "schema": { "type": "object", "properties": { "entries": { "type": "array", "items": { "$ref": "#/components/schemas/AuditEntry" } } } } } } }, "401": e("operator token required"), "403": e("role missing") } } },
      "/v1/audit/verify": { "get": {
        "summary": "Verify the whole audit chain and its signed checkpoint", "security": op_auth(),
        "responses": { "200": { "description": "the chain verifies" }, "409": { "description": "tampering found; names the first bad entry" }, "401": e("operator token required"), "403": e("role missing") } } },
      "/v1/reports/standing": { "get": {
        "summary": "Standing-privilege report: everything that looks like access outliving its task, and the proof that every grant issued in the window ended", "security": op_auth(),
        "parameters": [ { "name": "window", "in": "query", "schema": { "type": "string", "pattern": "^[0-9]+[smhd]$", "examples": ["24h"] }, "description": "how far back (default 24h)" } ],
        "responses": { "200": { "description": "the report; `ok` is false when anything was found", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/StandingReport" } } } },
          "400": e("bad window"), "401": e("operator token required"), "403": e("role missing"), "503": e("store unavailable") } } }
    })
}

/// What gates, the MCP proxy and outside systems call: the revocation feed, policies,
/// signals, quarantine, usage and tool-call reports.
fn operations_paths() -> Value {
    json!({
      "/v1/feed": { "get": {
        "summary": "The revocation feed: every grant that ended while active, gap-free and in commit order. Server-sent events (`grant.ended` with `id` = sequence; `head` heartbeat every second), resumable with `Last-Event-ID`; with `Accept: application/json`, one page", "security": op_auth(),
        "parameters": [ { "name": "after", "in": "query", "schema": { "type": "integer", "minimum": 0 } }, { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 0 } },
          { "name": "Last-Event-ID", "in": "header", "schema": { "type": "string" }, "description": "resume after this sequence number" } ],
        "responses": { "200": { "description": "the stream, or a page", "content": {
            "text/event-stream": { "schema": { "type": "object", "description": "one server-sent event: `grant.ended` (data: a FeedEntry, id: its seq) or `head` (data: {seq, store, at})", "properties": { "event": { "type": "string", "enum": ["grant.ended", "head"] }, "data": { "type": "string" }, "id": { "type": "string" }, "retry": { "type": "integer" } } } },
            "application/json": { "schema": { "type": "object", "properties": { "head": { "type": "integer" }, "entries": { "type": "array", "items": { "$ref": "#/components/schemas/FeedEntry" } } } } } } },
          "400": e("bad Last-Event-ID or query"), "401": e("operator token required"), "403": e("gate or read role missing"), "503": e("store unavailable") } } },
      "/v1/policies": { "get": {
        "summary": "The loaded policy files (for gates); `digest` changes exactly when they do", "security": op_auth(),
        "responses": { "200": { "description": "files", "content": { "application/json": { "schema": { "type": "object", "properties": { "digest": { "type": "string" }, "files": { "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "text": { "type": "string" } } } } } } } } },
          "401": e("operator token required"), "403": e("gate or read role missing"), "503": e("no policy loaded") } } },
      "/v1/signals": { "post": {
        "summary": "A context change or task ending from an outside system (OpenID CAEP types, or task-ended, workload-quarantined, risk-raised): ends every matching pending or active grant at once", "security": op_auth(),
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "required": ["type", "subject"], "properties": {
          "type": { "type": "string", "examples": ["task-ended", "https://schemas.openid.net/secevent/caep/event-type/session-revoked"] },
          "subject": { "type": "object", "additionalProperties": false, "properties": { "workload": { "type": ["string", "null"] }, "task": { "type": ["string", "null"] }, "grant": { "type": ["string", "null"] } } },
          "reason": { "type": "string" }, "event_timestamp": { "type": "integer" } } } } } },
        "responses": { "200": { "description": "the grants it ended", "content": { "application/json": { "schema": { "type": "object", "properties": { "type": { "type": "string" }, "ended": { "type": "array", "items": { "type": "string" } } } } } } },
          "400": e("unknown type or empty subject"), "401": e("operator token required"), "403": e("signal role missing"), "415": e("wrong content type"), "503": e("store unavailable") } } },
      "/v1/workloads/quarantined": { "get": {
        "summary": "Workloads under quarantine (set by a `workload-quarantined` signal): no new grants or renewals on the audiences named (all when empty) until released", "security": op_auth(),
        "responses": { "200": { "description": "the quarantines standing", "content": { "application/json": { "schema": { "type": "object", "required": ["quarantined"], "properties": { "quarantined": { "type": "array", "items": { "$ref": "#/components/schemas/Quarantine" } } } } } } },
          "401": e("operator token required"), "403": e("read role missing"), "503": e("store unavailable") } } },
      "/v1/workloads/release": { "post": {
        "summary": "Lift a workload's quarantine (admin)", "security": op_auth(),
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "required": ["workload", "reason"], "properties": { "workload": { "type": "string" }, "reason": { "type": "string", "minLength": 1 } } } } } },
        "responses": { "200": { "description": "the quarantine lifted", "content": { "application/json": { "schema": { "type": "object", "required": ["released"], "properties": { "released": { "$ref": "#/components/schemas/Quarantine" } } } } } },
          "400": e("bad body or empty reason"), "401": e("operator token required"), "403": e("admin role missing"), "404": e("not quarantined"), "413": e("body too large"), "415": e("wrong content type"), "503": e("store unavailable") } } },
      "/v1/usage": { "post": {
        "summary": "Gates report which grants they saw used (for `@idle` windows); a use (grant and `at` as sent) is recorded once per sender, so a resent report records nothing again", "security": op_auth(),
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "required": ["uses"], "properties": {
          "uses": { "type": "array", "maxItems": 1000, "items": { "type": "object", "additionalProperties": false, "required": ["grant", "at"], "properties": { "grant": { "type": "string" }, "at": { "type": "integer", "description": "unix ms" } } } } } } } } },
        "responses": { "200": { "description": "how many grants got a new last use", "content": { "application/json": { "schema": { "type": "object", "properties": { "recorded": { "type": "integer" } } } } } },
          "400": e("bad body"), "401": e("operator token required"), "403": e("gate role missing"), "503": e("store unavailable") } } },
      "/v1/tool-calls": { "post": {
        "summary": "The MCP proxy records the tool calls it decided: one `tool.called` audit entry per attempted call, all in one commit", "security": op_auth(),
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "required": ["calls"], "properties": {
          "calls": { "type": "array", "maxItems": 200, "items": { "type": "object", "additionalProperties": false, "required": ["grant", "at", "tool", "args_sha256", "decision"], "properties": {
            "grant": { "type": "string" }, "at": { "type": "integer", "description": "unix ms" }, "tool": { "type": "string", "maxLength": 256 },
            "args_sha256": { "type": "string", "pattern": "^[0-9a-fA-F]{64}$" }, "decision": { "enum": ["allow", "deny"] },
            "reason": { "type": "string", "maxLength": 2000 }, "policies": { "type": "array", "maxItems": 64, "items": { "type": "string" } },
            "drift": { "type": "boolean", "description": "refused as outside the task's declared intent" }, "latency_us": { "type": "integer", "minimum": 0 },
            "key": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$", "description": "the sender's idempotency key for this call: a call whose key this sender already spent (kept 24 h) is not recorded again; without one, every copy is recorded" } } } } } } } } },
        "responses": { "200": { "description": "how many calls were recorded now, and how many had been recorded before (their key was spent)", "content": { "application/json": { "schema": { "type": "object", "properties": { "recorded": { "type": "integer" }, "already_recorded": { "type": "integer" } } } } } },
          "400": e("bad body"), "401": e("operator token required"), "403": e("gate role missing, or a grant of an audience this gate does not guard"), "404": e("no such grant"), "413": e("body over 64 KiB"), "415": e("wrong content type"), "503": e("store unavailable") } } }
    })
}

/// Discovery, health, metrics and this document.
fn service_paths() -> Value {
    json!({
      "/.well-known/oauth-authorization-server": { "get": { "summary": "RFC 8414 metadata", "responses": { "200": { "description": "metadata" } } } },
      "/.well-known/jwks.json": { "get": { "summary": "Keys that sign access tokens", "responses": { "200": { "description": "JWKS" } } } },
      "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "alive" } } } },
      "/readyz": { "get": { "summary": "Readiness: policy loaded and store writable", "responses": { "200": { "description": "ready" }, "503": { "description": "not ready, with the reason" } } } },
      "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "OpenMetrics text" } } } },
      "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI" } } } }
    })
}

/// `components.schemas`: the bodies the paths refer to.
fn schemas() -> Value {
    json!({
      "Error": { "type": "object", "required": ["error", "error_description"], "properties": {
        "error": { "type": "string" }, "error_description": { "type": "string" }, "policies": { "type": "array", "items": { "type": "string" } },
        "request_id": { "type": "string" }, "approvals_required": { "type": "integer" }, "interval": { "type": "integer" } } },
      "TokenExchange": { "type": "object", "required": ["grant_type"], "properties": {
        "grant_type": { "const": "urn:ietf:params:oauth:grant-type:token-exchange" },
        "subject_token": { "type": "string", "description": "identity token (OIDC workload JWT or SPIFFE JWT-SVID), or for a sub-agent the parent's Lapse access token (with a DPoP proof of its key)" },
        "subject_token_type": { "enum": ["urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token", "urn:ietf:params:oauth:token-type:access_token"] },
        "actor_token": { "type": "string", "description": "sub-agent only: the sub-agent's own identity token; its workload becomes `act.sub`" },
        "actor_token_type": { "enum": ["urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token"] },
        "dpop_jkt": { "type": "string", "pattern": "^[A-Za-z0-9_-]{43}$", "description": "sub-agent only: the RFC 7638 thumbprint of the sub-agent's DPoP key, which the new token is bound to" },
        "tools": { "type": "string", "description": "the task's declared tools as JSON: an array of ToolDecl" },
        "audience": { "type": "string" }, "resource": { "type": "string", "description": "RFC 8707; the same as `audience`" },
        "scope": { "type": "string", "description": "space-separated actions" },
        "task": { "type": "string" }, "purpose": { "type": "string" }, "ticket": { "type": "string" }, "environment": { "type": "string" },
        "expires_in": { "type": "integer", "minimum": 1 },
        "break_glass": { "enum": ["true", "false"], "description": "decided by @break_glass policies only; issued at once with a hard short lifetime and a mandatory review" },
        "justification": { "type": "string", "minLength": 10, "description": "required with break_glass" },
        "request_id": { "type": "string", "description": "collect the outcome of a request that waited for approval (with a proof from the same DPoP key); the other parameters are then not needed" } } },
      "TokenResponse": { "type": "object", "required": ["access_token", "token_type", "expires_in", "scope", "grant_id"], "properties": {
        "access_token": { "type": "string" }, "issued_token_type": { "type": "string" }, "token_type": { "const": "DPoP" },
        "expires_in": { "type": "integer" }, "scope": { "type": "string" }, "grant_id": { "type": "string" }, "task": { "type": "string" } } },
      "Issued": { "allOf": [ { "$ref": "#/components/schemas/TokenResponse" }, { "type": "object", "properties": { "grant": { "$ref": "#/components/schemas/Grant" }, "status": { "type": "string" } } } ] },
      "Quarantine": { "type": "object", "required": ["workload", "audiences", "reason", "by", "since"], "properties": { "workload": { "type": "string" }, "audiences": { "type": "array", "items": { "type": "string" }, "description": "empty: every audience" }, "reason": { "type": "string" }, "by": { "type": "string" }, "since": { "type": "integer", "description": "ms since the epoch" } } },
      "Pending": { "type": "object", "required": ["status", "request_id"], "properties": { "status": { "const": "pending" }, "request_id": { "type": "string" }, "approvals_required": { "type": "integer" }, "approvers": { "type": ["string", "null"] } } },
      "AccessRequest": { "type": "object", "additionalProperties": false, "required": ["identity_token", "audience", "actions", "task"], "properties": {
        "identity_token": { "type": "string" }, "audience": { "type": "string" }, "actions": { "type": "array", "items": { "type": "string" }, "minItems": 1 },
        "task": { "type": "object", "additionalProperties": false, "required": ["id", "purpose"], "properties": { "id": { "type": "string" }, "purpose": { "type": "string" }, "ticket": { "type": "string" } } },
        "ttl": { "type": "string", "pattern": "^[0-9]+[smhd]$", "examples": ["10m"] }, "environment": { "type": "string" }, "break_glass": { "type": "boolean" }, "justification": { "type": "string" },
        "tools": { "type": "array", "maxItems": 64, "items": { "$ref": "#/components/schemas/ToolDecl" } } } },
      "ToolDecl": { "type": "object", "additionalProperties": false, "required": ["name"], "description": "a tool an agent's task may call through `lapse mcp-proxy`, with constraints on its arguments (every part given must hold)", "properties": {
        "name": { "type": "string", "minLength": 1, "maxLength": 256 },
        "args": { "type": "object", "maxProperties": 16, "additionalProperties": { "type": "object", "additionalProperties": false, "minProperties": 1, "properties": {
          "prefix": { "type": "string", "minLength": 1, "maxLength": 256 }, "one_of": { "type": "array", "minItems": 1, "maxItems": 64, "items": { "type": ["string", "number", "boolean"] } },
          "maximum": { "type": "number" }, "pattern": { "type": "string", "minLength": 1, "maxLength": 256, "description": "a regular expression the whole value must match" } } } } } },
      "PendingRequest": { "allOf": [ { "$ref": "#/components/schemas/Grant" }, { "type": "object", "properties": {
        "approvals_required": { "type": "integer" }, "approvers": { "type": ["string", "null"] },
        "approvals": { "type": "array", "items": { "type": "object", "properties": { "by": { "type": "string" }, "at": { "type": "integer" }, "reason": { "type": "string" }, "removed": { "type": "array", "items": { "type": "string" }, "description": "actions this approval took away from what was still on offer" } } } },
        "ttl": { "type": "integer", "description": "seconds the grant gets if approved now" }, "context": { "type": "object" },
        "approvable_until": { "type": "integer" }, "history": { "type": "array", "items": { "type": "object" } } } } ] },
      "ApprovalDecision": { "type": "object", "additionalProperties": false, "properties": {
        "reason": { "type": "string" }, "actions": { "type": "array", "items": { "type": "string" }, "minItems": 1, "description": "keep only these of the requested actions" },
        "ttl": { "type": "string", "pattern": "^[0-9]+[smhd]$", "examples": ["10m"], "description": "a shorter lifetime" } } },
      "Reason": { "type": "object", "additionalProperties": false, "properties": { "reason": { "type": "string" } } },
      "Grant": { "type": "object", "required": ["id", "state", "workload", "audience", "actions"], "properties": {
        "id": { "type": "string" }, "state": { "enum": ["pending", "active", "completed", "expired", "revoked", "denied"] },
        "workload": { "type": "string" }, "issuer": { "type": "string" }, "audience": { "type": "string" }, "actions": { "type": "array", "items": { "type": "string" } },
        "task": { "type": "object" }, "policies": { "type": "array", "items": { "type": "string" } }, "created_at": { "type": "integer", "description": "ms since epoch" },
        "expires_at": { "type": "integer" }, "max_expires_at": { "type": "integer" }, "ended_at": { "type": ["integer", "null"] }, "end": { "type": ["object", "null"] },
        "jkt": { "type": "string" }, "renewals": { "type": "integer" }, "idle_secs": { "type": ["integer", "null"] }, "last_used_at": { "type": ["integer", "null"], "description": "unix ms of the latest use a gate reported" },
        "tools": { "type": "array", "items": { "$ref": "#/components/schemas/ToolDecl" } }, "depth": { "type": "integer", "description": "hops of delegation (0: the workload's own grant)" },
        "parent": { "type": ["string", "null"], "description": "the grant this one was delegated from" }, "act": { "description": "RFC 8693 actor chain" }, "delegations": { "type": "integer" }, "audit": { "type": "array", "items": { "$ref": "#/components/schemas/AuditEntry" } } } },
      "Introspection": { "type": "object", "required": ["active"], "properties": { "active": { "type": "boolean" }, "scope": { "type": "string" }, "sub": { "type": "string" }, "aud": { "type": "string" }, "exp": { "type": "integer" }, "grant_id": { "type": "string" }, "task": { "type": "string" }, "cnf": { "type": "object" } } },
      "StandingReport": { "type": "object", "required": ["generated_at", "window", "ok", "findings", "proof", "targets"], "properties": {
        "generated_at": { "type": "integer" }, "window": { "type": "object", "properties": { "from": { "type": "integer" }, "to": { "type": "integer" } } },
        "ok": { "type": "boolean" },
        "quarantined": { "type": "array", "items": { "$ref": "#/components/schemas/Quarantine" } },
        "findings": { "type": "array", "items": { "type": "object", "required": ["kind", "detail"], "properties": {
          "kind": { "enum": ["break_glass_review_open", "audit_chain_broken", "active_past_expiry", "renewed_beyond_span", "credential_not_yet_destroyed", "near_continuous_access", "orphan_credential", "target_unreachable", "issue_without_end", "credential_without_destroy", "look_alike_role", "unexpected_group_member"] },
          "grant_id": { "type": "string" }, "workload": { "type": "string" }, "target": { "type": "string" }, "credential": { "type": "string" }, "detail": { "type": "string" } } } },
        "proof": { "type": "object", "properties": { "audit_chain_verified": { "type": "boolean" }, "audit_entries": { "type": "integer" }, "issued_in_window": { "type": "integer" },
          "ended": { "type": "integer" }, "still_active_within_lifetime": { "type": "integer" }, "unended": { "type": "integer" } } },
        "targets": { "type": "array", "items": { "type": "object" } } } },
      "FeedEntry": { "type": "object", "required": ["seq", "at", "grant_id", "state", "audience", "exp", "reason"], "properties": {
        "seq": { "type": "integer" }, "at": { "type": "integer", "description": "unix ms the grant ended" }, "grant_id": { "type": "string" },
        "state": { "type": "string", "enum": ["completed", "expired", "revoked"] }, "audience": { "type": "string" }, "jti": { "type": ["string", "null"] },
        "exp": { "type": "integer", "description": "unix ms the grant's newest token expires; keep the entry until then" }, "reason": { "type": "string" } } },
      "AuditEntry": { "type": "object", "required": ["seq", "at", "kind", "actor", "data", "prev_hash", "hash"], "properties": {
        "seq": { "type": "integer" }, "at": { "type": "integer" }, "kind": { "type": "string" }, "grant_id": { "type": ["string", "null"] }, "actor": { "type": "string" },
        "data": { "type": "string", "description": "event JSON exactly as hashed" }, "prev_hash": { "type": "string" }, "hash": { "type": "string" } } }
    })
}
