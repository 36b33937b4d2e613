//! The approver console at `/ui/`: server-rendered pages over the same service
//! calls as the `/v1` API, so a decision made here is checked, audited and
//! notified exactly like one made with `lapse approvals`.
//!
//! Every POST needs a valid session, the session's CSRF value in the form, and,
//! when the browser names one, a same-origin `Origin`. Every answer carries a
//! strict Content-Security-Policy (own script and style only), `no-store`, and
//! refuses framing.

pub mod pages;
pub mod session;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lapse_api::ApiError;
use lapse_broker::BrokerError;
use lapse_broker::Lapse;
use lapse_broker::config::Role;
use lapse_core::{GrantId, GrantState, Narrowing, TtlDuration};
use lapse_store::{GrantCursor, GrantFilter};
use maud::Markup;
use pages::{Banner, Frame, Nav};
use serde_json::json;
use session::Session;
use std::net::SocketAddr;
use std::sync::Arc;

type AppState = Arc<Lapse>;

/// Rows per page of the pending and active lists.
pub const PAGE: usize = 50;
const LOGIN_COOKIE: &str = "lapse_login";

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/ui", get(|| async { see_other("/ui/") }))
        .route("/ui/", get(pending_page))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/requests/{id}", get(request_page))
        .route("/ui/requests/{id}/approve", post(approve))
        .route("/ui/requests/{id}/deny", post(deny))
        .route("/ui/grants", get(grants_page))
        .route("/ui/grants/{id}", get(grant_page))
        .route("/ui/grants/{id}/revoke", post(revoke))
        .route("/ui/reviews", get(reviews_page))
        .route("/ui/reviews/{id}/close", post(close_review))
        .route(
            "/ui/assets/console.css",
            get(|| async { asset("text/css; charset=utf-8", pages::CSS) }),
        )
        .route(
            "/ui/assets/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", pages::JS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Headers every console page carries.
fn harden(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: under it browsers send `Origin: null` with form posts,
    // and the same-origin check below could not tell them from a sandboxed attacker.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn html(status: StatusCode, m: Markup) -> Response {
    harden(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            m.into_string(),
        )
            .into_response(),
    )
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    harden(r)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn secure_cookies(s: &Lapse) -> bool {
    s.issuer.starts_with("https://")
}

/// The session cookie's name: `__Host-` (Secure, whole host, no Domain) over HTTPS.
fn session_cookie_name(s: &Lapse) -> &'static str {
    if secure_cookies(s) {
        "__Host-lapse_session"
    } else {
        "lapse_session"
    }
}

fn set_cookie(s: &Lapse, name: &str, value: &str, max_age: u64) -> Option<HeaderValue> {
    let secure = if secure_cookies(s) { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .ok()
}

fn console_session(s: &Lapse, headers: &HeaderMap) -> Option<Session> {
    cookie(headers, session_cookie_name(s)).and_then(|c| session::open(s, c).ok())
}

async fn frame_counts(s: &Lapse) -> Result<u64, BrokerError> {
    Ok(s.store.count(GrantState::Pending).await?)
}

/// Where a signed-out visitor of `path` is sent.
fn to_login(path: &str) -> Response {
    let next: String = url::form_urlencoded::byte_serialize(path.as_bytes()).collect();
    see_other(&format!("/ui/login?next={next}"))
}

/// Only console paths are valid after sign-in; anything else goes to the start page.
fn safe_next(next: &str) -> &str {
    let ok = next.starts_with("/ui/")
        && !next.contains("//")
        && !next.contains('\\')
        && next.bytes().all(|b| b.is_ascii_graphic());
    if ok { next } else { "/ui/" }
}

/// A page for a signed-in operator, or the way to the sign-in form.
struct Viewer {
    session: Session,
    pending: u64,
}

async fn viewer(s: &Lapse, headers: &HeaderMap, path: &str) -> Result<Viewer, Response> {
    let Some(session) = console_session(s, headers) else {
        return Err(to_login(path));
    };
    let pending = frame_counts(s)
        .await
        .map_err(|e| problem_page(s, &session, 0, &ApiError::from(e)))?;
    Ok(Viewer { session, pending })
}

impl Viewer {
    fn frame(&self, s: &Lapse) -> Frame<'_> {
        Frame {
            operator: &self.session.operator.name,
            csrf: &self.session.csrf,
            pending: self.pending,
            now: s.now(),
        }
    }

    fn page(
        &self,
        s: &Lapse,
        status: StatusCode,
        nav: Nav,
        title: &str,
        banner: Option<&Banner>,
        body: impl FnOnce(&Frame<'_>) -> Markup,
    ) -> Response {
        let f = self.frame(s);
        let b = body(&f);
        html(status, pages::layout(&f, nav, title, banner, b))
    }

    /// Read access to requests and grants: the `read` or the `approve` role.
    fn may_view(&self) -> Result<(), BrokerError> {
        let op = &self.session.operator;
        op.require(Role::Approve)
            .or_else(|_| op.require(Role::Read))
    }
}

fn problem_page(s: &Lapse, session: &Session, pending: u64, e: &ApiError) -> Response {
    let v = Viewer {
        session: session.clone(),
        pending,
    };
    v.page(s, e.status(), Nav::None, "Cannot do that", None, |_| {
        pages::problem(&e.to_string())
    })
}

fn problem(s: &Lapse, v: &Viewer, e: &ApiError) -> Response {
    problem_page(s, &v.session, v.pending, e)
}

/// The form of a console POST: fields in order, repeats kept (checkboxes).
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(headers: &HeaderMap, b: Result<Bytes, BytesRejection>) -> Result<Self, ApiError> {
        let b = b.map_err(|e| BrokerError::InvalidRequest(format!("cannot read the form: {e}")))?;
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = ct.split(';').next().unwrap_or_default().trim();
        if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(ApiError::UnsupportedMediaType(
                "expected a form (`application/x-www-form-urlencoded`)".into(),
            ));
        }
        Ok(Self(
            url::form_urlencoded::parse(&b)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }

    fn get(&self, k: &str) -> &str {
        self.0
            .iter()
            .find(|(n, _)| n == k)
            .map_or("", |(_, v)| v.as_str())
    }

    fn all(&self, k: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Whether the browser says the request came from this origin. Browsers send
/// `Origin` on every form POST; a request without one (curl) still needs the
/// session's CSRF value, which only a page of this origin can read.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let authority = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            !host.is_empty() && authority.is_some_and(|a| a.eq_ignore_ascii_case(host))
        }
    }
}

/// A POST by a signed-in operator whose form carries the session's CSRF value.
async fn guarded(
    s: &Lapse,
    headers: &HeaderMap,
    b: Result<Bytes, BytesRejection>,
    back: &str,
) -> Result<(Viewer, Form), Response> {
    let v = viewer(s, headers, back).await?;
    let form = Form::parse(headers, b).map_err(|e| problem(s, &v, &e))?;
    if !same_origin(headers) || !v.session.csrf_matches(form.get("csrf")) {
        tracing::warn!(operator = %v.session.operator.name, "console form refused: cross-site or stale CSRF value");
        return Err(problem(
            s,
            &v,
            &ApiError::from(BrokerError::Forbidden(
                "this form did not come from your console session (CSRF check failed); reload the page and try again".into(),
            )),
        ));
    }
    Ok((v, form))
}

fn parse_id(raw: &str) -> Result<GrantId, BrokerError> {
    raw.parse()
        .map_err(|e: lapse_core::IdParseError| BrokerError::NotFound(e.to_string()))
}

/// `?key=value` pairs of a page URL.
fn query(q: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> &'a str {
    q.iter()
        .find(|(n, _)| n == k)
        .map_or("", |(_, v)| v.as_str())
}

/// Paging cursor `CREATED_MS.ID` ([`GrantCursor`]'s text form).
fn parse_cursor(raw: &str) -> Result<Option<GrantCursor>, BrokerError> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse()
        .map(Some)
        .map_err(|_| BrokerError::InvalidRequest("`before` is not a paging cursor".into()))
}

fn cursor_of(g: &lapse_core::Grant) -> String {
    GrantCursor::of(g).to_string()
}

/// The `?done=` banners a redirect after a POST may ask for; nothing from the
/// URL is echoed.
fn done_banner(q: &[(String, String)]) -> Option<Banner> {
    let (what, id) = param(q, "done").split_once(':')?;
    let id: GrantId = id.parse().ok()?;
    let text = match what {
        "approved" => format!("You approved request {id}."),
        "denied" => format!("You denied request {id}."),
        "revoked" => format!("Grant {id} is revoked."),
        "reviewed" => format!("The review of grant {id} is closed."),
        _ => return None,
    };
    Some(Banner::Done(text))
}

async fn login_page(State(s): State<AppState>, RawQuery(q): RawQuery) -> Response {
    let q = query(q.as_deref());
    let nonce = lapse_token::b64::encode(rand::random::<[u8; 24]>());
    let mut r = html(
        StatusCode::OK,
        pages::login(None, &nonce, safe_next(param(&q, "next")), ""),
    );
    if let Some(c) = set_cookie(&s, LOGIN_COOKIE, &nonce, 600) {
        r.headers_mut().append(header::SET_COOKIE, c);
    }
    r
}

async fn login(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let again = |status: StatusCode, msg: &str, next: &str, name: &str| {
        let nonce = lapse_token::b64::encode(rand::random::<[u8; 24]>());
        let mut r = html(status, pages::login(Some(msg), &nonce, next, name));
        if let Some(c) = set_cookie(&s, LOGIN_COOKIE, &nonce, 600) {
            r.headers_mut().append(header::SET_COOKIE, c);
        }
        r
    };
    // Before the password hash is computed: guessing costs the guesser, not us.
    let slow_down = |wait: std::time::Duration, msg: &str, next: &str, name: &str| {
        let mut r = again(StatusCode::TOO_MANY_REQUESTS, msg, next, name);
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        r.headers_mut().insert(
            header::RETRY_AFTER,
            axum::http::HeaderValue::from(secs.max(1)),
        );
        r
    };
    if let Err(wait) = s.limits.login_source.check(&peer.ip().to_string()) {
        return slow_down(
            wait,
            "Too many sign-in attempts from this address. Wait a minute and try again.",
            "/ui/",
            "",
        );
    }
    let form = match Form::parse(&headers, b) {
        Ok(f) => f,
        Err(e) => return again(e.status(), &e.to_string(), "/ui/", ""),
    };
    let next = safe_next(form.get("next")).to_owned();
    let name = form.get("name").trim().to_owned();
    let nonce_ok = cookie(&headers, LOGIN_COOKIE).is_some_and(|c| {
        let sent = form.get("login_csrf");
        !sent.is_empty()
            && c.len() == sent.len()
            && bool::from(subtle::ConstantTimeEq::ct_eq(c.as_bytes(), sent.as_bytes()))
    });
    if !nonce_ok || !same_origin(&headers) {
        return again(
            StatusCode::FORBIDDEN,
            "The sign-in form expired or did not come from this console; try again.",
            &next,
            &name,
        );
    }
    // Guesses spread over many addresses still meet one bucket per name. Every
    // name has one, known or not, so the limit does not tell which names exist.
    if let Err(wait) = s.limits.login_operator.check(&name) {
        return slow_down(
            wait,
            "Too many sign-in attempts for this operator. Wait a minute and try again.",
            &next,
            &name,
        );
    }
    match session::sign_in(&s, &name, form.get("secret")).await {
        Ok((op, method)) => {
            let cookie_value = match session::new_session(&s, &op.name) {
                Ok(c) => c,
                Err(e) => {
                    let e = ApiError::from(e);
                    return again(e.status(), &e.to_string(), &next, &name);
                }
            };
            let audit = s
                .commit(lapse_store::WriteBatch {
                    grants: vec![],
                    events: vec![lapse_broker::audit::event(
                        s.now(),
                        "operator.signed_in",
                        None,
                        &op.name,
                        json!({ "method": method.as_str(), "source": peer.ip().to_string() }),
                    )],
                    ..Default::default()
                })
                .await;
            if let Err(e) = audit {
                // No session without its record.
                let e = ApiError::from(e);
                return again(e.status(), &e.to_string(), &next, &name);
            }
            tracing::info!(operator = %op.name, method = method.as_str(), "console sign-in");
            let mut r = see_other(&next);
            let h = r.headers_mut();
            if let Some(c) = set_cookie(
                &s,
                session_cookie_name(&s),
                &cookie_value,
                s.cfg.console_session.secs(),
            ) {
                h.append(header::SET_COOKIE, c);
            }
            if let Some(c) = set_cookie(&s, LOGIN_COOKIE, "", 0) {
                h.append(header::SET_COOKIE, c);
            }
            r
        }
        Err(e) => {
            // Logged (rate-limited) and audited there; the name only when it is a
            // configured one, since people type passwords into name fields.
            let known = s.cfg.operators.iter().any(|o| o.name == name);
            let f = lapse_broker::auth_failures::AuthFailure {
                operator: known.then(|| name.clone()),
                ..lapse_broker::auth_failures::AuthFailure::new(
                    lapse_broker::auth_failures::Credential::ConsolePassword,
                    if known {
                        "wrong_secret"
                    } else {
                        "unknown_operator"
                    },
                )
            };
            if matches!(e, BrokerError::Unauthorized(_)) {
                s.auth_failed(Some(peer.ip()), f).await;
            }
            again(StatusCode::UNAUTHORIZED, &e.to_string(), &next, &name)
        }
    }
}

async fn logout(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let (v, _) = match guarded(&s, &headers, b, "/ui/").await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let _ = s
        .commit(lapse_store::WriteBatch {
            grants: vec![],
            events: vec![lapse_broker::audit::event(
                s.now(),
                "operator.signed_out",
                None,
                &v.session.operator.name,
                json!({}),
            )],
            ..Default::default()
        })
        .await;
    let mut r = see_other("/ui/login");
    if let Some(c) = set_cookie(&s, session_cookie_name(&s), "", 0) {
        r.headers_mut().append(header::SET_COOKIE, c);
    }
    r
}

async fn pending_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let v = match viewer(&s, &headers, "/ui/").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let q = query(raw.as_deref());
    let result = async {
        v.may_view()?;
        let workload = param(&q, "workload").trim();
        let audience = param(&q, "audience").trim();
        let filter = GrantFilter {
            state: Some(GrantState::Pending),
            workload: (!workload.is_empty()).then(|| workload.to_owned()),
            audience: (!audience.is_empty()).then(|| audience.to_owned()),
            before: parse_cursor(param(&q, "before"))?,
            limit: PAGE,
            ..Default::default()
        };
        let list = s.store.grants(filter).await?;
        let next = (list.len() == PAGE)
            .then(|| list.last().map(|g| next_link("/ui/", &q, &cursor_of(g))))
            .flatten();
        Ok::<_, ApiError>((list, next))
    }
    .await;
    match result {
        Ok((list, next)) => v.page(
            &s,
            StatusCode::OK,
            Nav::Pending,
            "Requests waiting for approval",
            done_banner(&q).as_ref(),
            |f| {
                pages::pending(
                    f,
                    &pages::PendingPage {
                        requests: &list,
                        max_ttl: s.cfg.max_ttl.secs(),
                        next,
                        filter_workload: param(&q, "workload"),
                        filter_audience: param(&q, "audience"),
                    },
                )
            },
        ),
        Err(e) => problem(&s, &v, &e),
    }
}

/// The same page one step older, keeping its filters.
fn next_link(path: &str, q: &[(String, String)], cursor: &str) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, val) in q {
        if k != "before" && k != "done" {
            ser.append_pair(k, val);
        }
    }
    ser.append_pair("before", cursor);
    format!("{path}?{}", ser.finish())
}

async fn request_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/ui/requests/{}", lapse_broker::error::clip(&id));
    let v = match viewer(&s, &headers, &path).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    render_request(&s, &v, &id, StatusCode::OK, None).await
}

async fn render_request(
    s: &Lapse,
    v: &Viewer,
    id: &str,
    status: StatusCode,
    banner: Option<Banner>,
) -> Response {
    let result = async {
        v.may_view()?;
        let id = parse_id(id)?;
        let g = s.find(id, "request").await?;
        let history: Vec<_> = s
            .workload_history(&g.request.workload.id, 11)
            .await?
            .into_iter()
            .filter(|h| h.id != g.id)
            .take(10)
            .collect();
        Ok::<_, ApiError>((g, history))
    }
    .await;
    match result {
        Ok((g, history)) => {
            let description = s
                .cfg
                .audiences
                .iter()
                .find(|a| a.id == g.request.audience)
                .map_or("", |a| a.description.as_str());
            let title = format!("Request from {}", g.request.workload.id);
            v.page(s, status, Nav::Pending, &title, banner.as_ref(), |f| {
                pages::request(
                    f,
                    &pages::RequestPage {
                        g: &g,
                        max_ttl: s.cfg.max_ttl.secs(),
                        audience_description: description,
                        history: &history,
                    },
                )
            })
        }
        Err(e) => problem(s, v, &e),
    }
}

/// After a refused decision: the request page again, saying why, with the
/// refusal's status.
async fn refused(s: &Lapse, v: &Viewer, id: &str, e: &ApiError) -> Response {
    render_request(s, v, id, e.status(), Some(Banner::Error(e.to_string()))).await
}

async fn approve(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let (v, form) = match guarded(&s, &headers, b, "/ui/").await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let gid = parse_id(&id)?;
        let grant = s.find(gid, "request").await?;
        let mut picked = form.all("actions");
        picked.sort();
        picked.dedup();
        if picked.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "tick at least one action to approve, or deny the request".into(),
            ));
        }
        // Compared with what is still on offer, as the form showed it: after an
        // earlier approver narrowed, the request's own list would read an
        // unchanged form as a narrowing (or as asking back what was removed).
        let mut asked = grant.actions.clone();
        asked.sort();
        let ttl_field = form.get("ttl").trim();
        let ttl = if ttl_field.is_empty() {
            None
        } else {
            let t: TtlDuration = ttl_field
                .parse()
                .map_err(|e| BrokerError::InvalidRequest(format!("lifetime: {e}")))?;
            Some(t.secs())
        };
        let asked_ttl = grant.effective_ttl_secs(s.cfg.max_ttl.secs());
        let narrowing = Narrowing {
            actions: (picked != asked).then_some(picked),
            ttl_secs: ttl.filter(|t| *t != asked_ttl),
        };
        let reason = lapse_broker::error::clip(form.get("reason").trim());
        s.approve(&v.session.operator, gid, &reason, narrowing)
            .await
    }
    .await;
    match result {
        Ok(g) => see_other(&format!("/ui/?done=approved:{}", g.id)),
        Err(e) => refused(&s, &v, &id, &ApiError::from(e)).await,
    }
}

async fn deny(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let (v, form) = match guarded(&s, &headers, b, "/ui/").await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let gid = parse_id(&id)?;
        let reason = lapse_broker::error::clip(form.get("reason").trim());
        s.deny_request(&v.session.operator, gid, &reason).await
    }
    .await;
    match result {
        Ok(g) => see_other(&format!("/ui/?done=denied:{}", g.id)),
        Err(e) => refused(&s, &v, &id, &ApiError::from(e)).await,
    }
}

async fn grants_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let v = match viewer(&s, &headers, "/ui/grants").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let q = query(raw.as_deref());
    let result = async {
        v.session.operator.require(Role::Read)?;
        let list = s
            .store
            .grants(GrantFilter {
                state: Some(GrantState::Active),
                before: parse_cursor(param(&q, "before"))?,
                limit: PAGE,
                ..Default::default()
            })
            .await?;
        let next = (list.len() == PAGE)
            .then(|| {
                list.last()
                    .map(|g| next_link("/ui/grants", &q, &cursor_of(g)))
            })
            .flatten();
        let quarantined = s.store.quarantines().await?;
        Ok::<_, ApiError>((list, next, quarantined))
    }
    .await;
    match result {
        Ok((list, next, quarantined)) => v.page(
            &s,
            StatusCode::OK,
            Nav::Grants,
            "Active grants",
            done_banner(&q).as_ref(),
            |f| pages::grants(f, &list, next.as_deref(), &quarantined),
        ),
        Err(e) => problem(&s, &v, &e),
    }
}

async fn grant_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/ui/grants/{}", lapse_broker::error::clip(&id));
    let v = match viewer(&s, &headers, &path).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let result = async {
        v.may_view()?;
        let id = parse_id(&id)?;
        let g = s.find(id, "grant").await?;
        let audit = s.store.audit_for(id).await?;
        Ok::<_, ApiError>((g, audit))
    }
    .await;
    match result {
        Ok((g, audit)) => {
            let title = format!("Grant {}", g.id);
            v.page(&s, StatusCode::OK, Nav::Grants, &title, None, |f| {
                pages::grant(f, &g, &audit)
            })
        }
        Err(e) => problem(&s, &v, &e),
    }
}

async fn revoke(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let (v, form) = match guarded(&s, &headers, b, "/ui/grants").await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let op = &v.session.operator;
        op.require(Role::Revoke)?;
        let gid = parse_id(&id)?;
        let g = s.find(gid, "grant").await?;
        let reason = form.get("reason").trim();
        let reason = if reason.is_empty() {
            "revoked from the console".to_owned()
        } else {
            lapse_broker::error::clip(reason)
        };
        s.revoke(g, &op.name, &reason).await
    }
    .await;
    match result {
        Ok(g) => see_other(&format!("/ui/grants?done=revoked:{}", g.id)),
        Err(e) => problem(&s, &v, &ApiError::from(e)),
    }
}

async fn reviews_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let v = match viewer(&s, &headers, "/ui/reviews").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let q = query(raw.as_deref());
    let all = param(&q, "state") == "all";
    let result = async {
        v.may_view()?;
        s.reviews(!all).await
    }
    .await;
    match result {
        Ok(list) => v.page(
            &s,
            StatusCode::OK,
            Nav::Reviews,
            "Break-glass reviews",
            done_banner(&q).as_ref(),
            |f| pages::reviews(f, &list, all),
        ),
        Err(e) => problem(&s, &v, &ApiError::from(e)),
    }
}

async fn close_review(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let (v, form) = match guarded(&s, &headers, b, "/ui/reviews").await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let gid = parse_id(&id)?;
        let verdict = lapse_core::Verdict::parse(form.get("verdict")).ok_or_else(|| {
            BrokerError::InvalidRequest("choose a verdict: justified or unjustified".into())
        })?;
        let note = lapse_broker::error::clip(form.get("note").trim());
        s.close_review(&v.session.operator, gid, verdict, &note)
            .await
    }
    .await;
    match result {
        Ok(g) => see_other(&format!("/ui/reviews?done=reviewed:{}", g.id)),
        Err(e) => problem(&s, &v, &ApiError::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_inside_the_console() {
        assert_eq!(safe_next("/ui/requests/abc"), "/ui/requests/abc");
        for evil in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/ui//evil",
            "/ui/\\evil",
            "/oauth/token",
            "/ui/a b",
            "",
        ] {
            assert_eq!(safe_next(evil), "/ui/", "{evil}");
        }
    }

    #[test]
    fn origin_must_match_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7800"));
        assert!(same_origin(&h), "no Origin: the CSRF value decides");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7800"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7800"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn done_banners_never_echo_the_url() {
        let q = vec![("done".to_owned(), "<script>:x".to_owned())];
        assert!(done_banner(&q).is_none());
        let id = GrantId::generate();
        let q = vec![("done".to_owned(), format!("approved:{id}"))];
        assert!(
            matches!(done_banner(&q), Some(Banner::Done(t)) if t == format!("You approved request {id}."))
        );
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let id = GrantId::generate();
        let c = parse_cursor(&format!("1700000000000.{id}"))
            .ok()
            .flatten()
            .map(|c| (c.created_at.millis(), c.id));
        assert_eq!(c, Some((1_700_000_000_000, id)));
        assert!(parse_cursor("nonsense").is_err());
        assert!(parse_cursor("12.not-an-id").is_err());
        assert!(matches!(parse_cursor(""), Ok(None)));
    }
}
