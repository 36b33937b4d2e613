//! The console's HTML. maud escapes every interpolated value, so request data
//! (task names, purposes, claims) can never become markup.

use lapse_core::{Grant, GrantState, Timestamp};
use lapse_store::AuditEntry;
use maud::{DOCTYPE, Markup, html};

/// What every page needs from the session.
pub struct Frame<'a> {
    pub operator: &'a str,
    pub csrf: &'a str,
    pub pending: u64,
    pub now: Timestamp,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Pending,
    Grants,
    Reviews,
    None,
}

/// A banner above the page's content.
pub enum Banner {
    Done(String),
    Error(String),
}

pub fn layout(
    f: &Frame<'_>,
    nav: Nav,
    title: &str,
    banner: Option<&Banner>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Lapse" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { "Lapse" }
                    nav aria-label="Console" {
                        a href="/ui/" aria-current=[(nav == Nav::Pending).then_some("page")] {
                            "Pending " span.count id="pending-count" { (f.pending) }
                        }
                        a href="/ui/grants" aria-current=[(nav == Nav::Grants).then_some("page")] { "Active grants" }
                        a href="/ui/reviews" aria-current=[(nav == Nav::Reviews).then_some("page")] { "Break-glass reviews" }
                    }
                    form.signout method="post" action="/ui/logout" {
                        input type="hidden" name="csrf" value=(f.csrf);
                        span.who { "Signed in as " strong id="operator" { (f.operator) } }
                        button type="submit" { "Sign out" }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    @match banner {
                        Some(Banner::Done(m)) => p.banner.done role="status" id="banner" { (m) },
                        Some(Banner::Error(m)) => p.banner.error role="alert" id="banner" { (m) },
                        None => {}
                    }
                    (body)
                }
            }
        }
    }
}

pub fn login(error: Option<&str>, nonce: &str, next: &str, name: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sign in · Lapse" }
                link rel="stylesheet" href="/ui/assets/console.css";
            }
            body.login {
                main id="main" {
                    h1 { "Lapse approver console" }
                    @if let Some(e) = error {
                        p.banner.error role="alert" id="banner" { (e) }
                    }
                    form method="post" action="/ui/login" {
                        input type="hidden" name="login_csrf" value=(nonce);
                        input type="hidden" name="next" value=(next);
                        label for="name" { "Operator name" }
                        input id="name" name="name" type="text" autocomplete="username" required autofocus value=(name);
                        label for="secret" { "Password or API token" }
                        input id="secret" name="secret" type="password" autocomplete="current-password" required;
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

/// `4m 12s`, `15m`, `1h 3m`, `2d`: the two largest units, a zero second one left out.
pub fn human(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let (big, small) = if d > 0 {
        ((d, 'd'), (h, 'h'))
    } else if h > 0 {
        ((h, 'h'), (m, 'm'))
    } else if m > 0 {
        ((m, 'm'), (s, 's'))
    } else {
        return format!("{s}s");
    };
    if small.0 == 0 {
        format!("{}{}", big.0, big.1)
    } else {
        format!("{}{} {}{}", big.0, big.1, small.0, small.1)
    }
}

fn when(t: Timestamp) -> Markup {
    let iso = t.rfc3339();
    html! { time datetime=(iso) { (iso.replace('T', " ")) } }
}

/// Time left until `t`, counted down by the page's script.
fn left(now: Timestamp, t: Timestamp) -> Markup {
    html! {
        time.left datetime=(t.rfc3339()) data-until=(t.millis()) { (human(now.secs_until(t))) }
    }
}

fn actions(a: &[String]) -> Markup {
    html! { @for x in a { code.action { (x) } " " } }
}

fn state(s: GrantState) -> Markup {
    html! { span class={"state state-" (s.as_str())} { (s.as_str()) } }
}

fn csrf(f: &Frame<'_>) -> Markup {
    html! { input type="hidden" name="csrf" value=(f.csrf); }
}

pub struct PendingPage<'a> {
    pub requests: &'a [Grant],
    pub max_ttl: u64,
    pub next: Option<String>,
    pub filter_workload: &'a str,
    pub filter_audience: &'a str,
}

pub fn pending(f: &Frame<'_>, p: &PendingPage<'_>) -> Markup {
    html! {
        form.filter method="get" action="/ui/" role="search" {
            label for="f-workload" { "Workload" }
            input id="f-workload" name="workload" type="text" value=(p.filter_workload);
            label for="f-audience" { "Audience" }
            input id="f-audience" name="audience" type="text" value=(p.filter_audience);
            button type="submit" { "Filter" }
        }
        @if p.requests.is_empty() {
            p.empty id="no-pending" { "No request is waiting for approval." }
        } @else {
            table.list id="pending" {
                caption { (f.pending) " waiting in all; newest first" }
                thead { tr {
                    th scope="col" { "Request" } th scope="col" { "Workload" } th scope="col" { "Task" }
                    th scope="col" { "Audience" } th scope="col" { "Actions" } th scope="col" { "TTL" }
                    th scope="col" { "Approvals" } th scope="col" { "Approvable for" }
                } }
                tbody {
                    @for g in p.requests {
                        tr data-request=(g.id) {
                            td data-label="Request" {
                                a href={"/ui/requests/" (g.id)} { "Review " (short(&g.id.to_string())) }
                                @if g.request.context.break_glass { " " span.badge.bg { "break-glass" } }
                                br; small { (when(g.created_at)) }
                            }
                            td data-label="Workload" { code { (g.request.workload.id) } }
                            td data-label="Task" { (g.request.task.id) br; small { (g.request.task.purpose) } }
                            td data-label="Audience" { (g.request.audience) }
                            td data-label="Actions" { (actions(&g.actions)) }
                            td data-label="TTL" { (human(g.effective_ttl_secs(p.max_ttl))) }
                            td data-label="Approvals" {
                                (g.approvals.len()) " of " (g.approvals_required)
                                @if let Some(grp) = &g.approvers { br; small { "group " (grp) } }
                            }
                            td data-label="Approvable for" { (left(f.now, g.expires_at)) }
                        }
                    }
                }
            }
            @if let Some(next) = &p.next {
                p { a id="older" href=(next) { "Older requests →" } }
            }
        }
    }
}

/// Enough of a grant id to tell rows apart (`gr_` and the UUIDv7's time part
/// would be the same for requests made together).
fn short(id: &str) -> &str {
    id.get(id.len().saturating_sub(10)..).unwrap_or(id)
}

pub struct RequestPage<'a> {
    pub g: &'a Grant,
    pub max_ttl: u64,
    pub audience_description: &'a str,
    pub history: &'a [Grant],
}

/// The actions asked for that earlier approvers took away, each with who took
/// it (`None`: a record from before approvals said so).
fn removed_actions(g: &Grant) -> Vec<(&str, Option<&str>)> {
    g.request
        .actions
        .iter()
        .filter(|a| !g.actions.contains(a))
        .map(|a| {
            let by = g
                .approvals
                .iter()
                .find(|x| x.removed.contains(a))
                .map(|x| x.by.as_str());
            (a.as_str(), by)
        })
        .collect()
}

fn removed_by(by: Option<&str>) -> Markup {
    html! { "removed by " @match by { Some(b) => strong { (b) }, None => "an earlier approver" } }
}

pub fn request(f: &Frame<'_>, p: &RequestPage<'_>) -> Markup {
    let g = p.g;
    let r = &g.request;
    let ttl = g.effective_ttl_secs(p.max_ttl);
    let open = g.state == GrantState::Pending && f.now < g.expires_at;
    // What an approval now covers: the request after earlier approvers narrowed it.
    let removed = removed_actions(g);
    html! {
        section aria-labelledby="what" {
            h2 id="what" { "What is asked" }
            dl.facts {
                dt { "State" } dd { (state(g.state)) @if g.state == GrantState::Pending && !open { " (no longer approvable)" } }
                dt { "Workload" } dd { code id="workload" { (r.workload.id) } }
                dt { "Identity issuer" } dd { code { (r.workload.issuer) } }
                dt { "Task" } dd id="task" { (r.task.id) }
                dt { "Purpose" } dd id="purpose" { (r.task.purpose) }
                @if !r.task.ticket.is_empty() { dt { "Ticket" } dd { (r.task.ticket) } }
                dt { "Audience" } dd id="audience" { (r.audience) @if !p.audience_description.is_empty() { " — " (p.audience_description) } }
                dt { "Actions" } dd id="actions" { (actions(&g.actions)) }
                @if !removed.is_empty() {
                    dt { "Removed by approvers" }
                    dd id="removed" { @for (a, by) in &removed {
                        span.removed { del { code.action { (a) } } " (" (removed_by(*by)) ")" } " "
                    } }
                }
                dt { "Lifetime" } dd id="ttl" { (human(ttl)) " (asked " (human(r.requested_ttl_secs)) ")" }
                dt { "Environment" } dd id="environment" { @if r.context.environment.is_empty() { "—" } @else { (r.context.environment) } }
                dt { "Source" } dd { (r.context.source) }
                dt { "Requested at" } dd { (when(g.created_at)) }
                @if r.context.break_glass {
                    dt { "Break-glass" } dd { span.badge.bg { "yes" } @if let Some(rv) = &g.review { " — " (rv.justification) } }
                }
                dt { "Approvable for" } dd { (left(f.now, g.expires_at)) " (until " (when(g.expires_at)) ")" }
            }
        }
        section aria-labelledby="why" {
            h2 id="why" { "Why it waits" }
            dl.facts {
                dt { "Policies asking for approval" } dd id="policies" { @for pol in &g.policies { code { (pol) } " " } }
                dt { "Approvals" } dd id="approvals" { (g.approvals.len()) " of " (g.approvals_required) " given" }
                dt { "Approver group" } dd { (g.approvers.as_deref().unwrap_or("any approver")) }
            }
            @if !g.approvals.is_empty() {
                ul.approvals { @for a in &g.approvals {
                    li {
                        strong { (a.by) } " approved at " (when(a.at)) @if !a.reason.is_empty() { ": " (a.reason) }
                        @if !a.removed.is_empty() { " — removed " (actions(&a.removed)) }
                    }
                } }
            }
        }
        @if !r.workload.claims.is_empty() {
            details.claims {
                summary { "Identity token claims" }
                table.kv { tbody { @for (k, v) in &r.workload.claims { tr { th scope="row" { code { (k) } } td { (v) } } } } }
            }
        }
        @if open {
            section.decide aria-labelledby="decide" {
                h2 id="decide" { "Decide" }
                form id="approve-form" method="post" action={"/ui/requests/" (g.id) "/approve"} {
                    (csrf(f))
                    fieldset {
                        legend { "Actions to approve (untick to narrow)" }
                        @for a in &g.actions {
                            label.check { input type="checkbox" name="actions" value=(a) checked; " " code { (a) } }
                        }
                        // Shown so the approver knows they were asked, never sent:
                        // no longer on offer.
                        @for (a, by) in &removed {
                            label.check.removed { input type="checkbox" disabled; " " del { code { (a) } } " " small { (removed_by(*by)) } }
                        }
                    }
                    label for="approve-ttl" { "Lifetime (at most " (human(ttl)) ", e.g. 5m)" }
                    input id="approve-ttl" name="ttl" type="text" inputmode="text" value=(lapse_core::TtlDuration::from_secs(ttl)) pattern="[0-9]+[smhd]";
                    label for="approve-reason" { "Reason (optional)" }
                    input id="approve-reason" name="reason" type="text" maxlength="500";
                    button.primary type="submit" id="approve" { "Approve" }
                }
                form id="deny-form" method="post" action={"/ui/requests/" (g.id) "/deny"} {
                    (csrf(f))
                    label for="deny-reason" { "Reason for denial (required)" }
                    input id="deny-reason" name="reason" type="text" required maxlength="500";
                    button.danger type="submit" id="deny" { "Deny" }
                }
            }
        }
        section aria-labelledby="history" {
            h2 id="history" { "This workload's recent requests" }
            @if p.history.is_empty() {
                p { "None before this one." }
            } @else {
                table.list { thead { tr { th scope="col" { "When" } th scope="col" { "State" } th scope="col" { "Audience" } th scope="col" { "Actions" } th scope="col" { "Task" } } }
                tbody { @for h in p.history { tr {
                    td data-label="When" { a href={"/ui/grants/" (h.id)} { (when(h.created_at)) } }
                    td data-label="State" { (state(h.state)) }
                    td data-label="Audience" { (h.request.audience) }
                    td data-label="Actions" { (actions(&h.actions)) }
                    td data-label="Task" { (h.request.task.id) }
                } } } }
            }
        }
        p { a href={"/ui/grants/" (g.id)} { "Audit timeline of this request" } }
    }
}

pub fn grants(
    f: &Frame<'_>,
    list: &[Grant],
    next: Option<&str>,
    quarantined: &[lapse_store::Quarantine],
) -> Markup {
    html! {
        @if !quarantined.is_empty() {
            table.list id="quarantined" {
                caption { "Quarantined workloads: no new grants until released (lapse workloads release)" }
                thead { tr {
                    th scope="col" { "Workload" } th scope="col" { "Audiences" } th scope="col" { "By" }
                    th scope="col" { "Reason" } th scope="col" { "Since" }
                } }
                tbody { @for q in quarantined { tr data-quarantined=(q.workload) {
                    td data-label="Workload" { code { (q.workload) } }
                    td data-label="Audiences" {
                        @if q.audiences.is_empty() { "every audience" } @else { (q.audiences.join(", ")) }
                    }
                    td data-label="By" { (q.by) }
                    td data-label="Reason" { (q.reason) }
                    td data-label="Since" { (when(Timestamp::from_millis(q.since))) }
                } } }
            }
        }
        @if list.is_empty() {
            p.empty id="no-grants" { "No grant is active." }
        } @else {
            table.list id="grants" {
                caption { "Active grants, newest first" }
                thead { tr {
                    th scope="col" { "Grant" } th scope="col" { "Workload" } th scope="col" { "Task" }
                    th scope="col" { "Audience" } th scope="col" { "Actions" } th scope="col" { "Time left" } th scope="col" { "Revoke" }
                } }
                tbody { @for g in list { tr data-grant=(g.id) {
                    td data-label="Grant" {
                        a href={"/ui/grants/" (g.id)} { (short(&g.id.to_string())) }
                        @if g.request.context.break_glass { " " span.badge.bg { "break-glass" } }
                    }
                    td data-label="Workload" { code { (g.request.workload.id) } }
                    td data-label="Task" { (g.request.task.id) }
                    td data-label="Audience" { (g.request.audience) }
                    td data-label="Actions" { (actions(&g.actions)) }
                    td data-label="Time left" { (left(f.now, g.expires_at)) }
                    td data-label="Revoke" { (revoke_form(f, g)) }
                } } }
            }
            @if let Some(next) = next { p { a id="older" href=(next) { "Older grants →" } } }
        }
    }
}

fn revoke_form(f: &Frame<'_>, g: &Grant) -> Markup {
    html! {
        form.inline method="post" action={"/ui/grants/" (g.id) "/revoke"} {
            (csrf(f))
            label.visually-hidden for={"reason-" (g.id)} { "Reason for revoking " (g.id) }
            input id={"reason-" (g.id)} name="reason" type="text" placeholder="reason" maxlength="500";
            button.danger type="submit" data-revoke=(g.id) { "Revoke" }
        }
    }
}

pub fn grant(f: &Frame<'_>, g: &Grant, audit: &[AuditEntry]) -> Markup {
    let r = &g.request;
    html! {
        dl.facts {
            dt { "State" } dd id="state" { (state(g.state)) }
            dt { "Workload" } dd { code { (r.workload.id) } }
            dt { "Task" } dd { (r.task.id) " — " (r.task.purpose) }
            dt { "Audience" } dd { (r.audience) }
            dt { "Actions" } dd { (actions(&g.actions)) }
            dt { "Created" } dd { (when(g.created_at)) }
            @if g.state == GrantState::Active {
                dt { "Time left" } dd { (left(f.now, g.expires_at)) }
            }
            dt { "Maximum lifetime until" } dd { (when(g.max_expires_at)) }
            dt { "Renewals" } dd { (g.renewals) }
            @if let Some(e) = &g.end {
                dt { "Ended" } dd { @if let Some(t) = g.ended_at { (when(t)) " " } "by " strong { (e.by) } ": " (e.reason) }
            }
            @for c in &g.credentials {
                dt { "Credential" } dd { (c.provider) " " code { (c.name) } " on " (c.target) ": " (c.state.as_str())
                    @if let Some(err) = &c.last_error { " — last error: " (err) } }
            }
            @if let Some(rv) = &g.review {
                dt { "Break-glass justification" } dd { (rv.justification) }
                dt { "Review" } dd { @if rv.is_open() { "open" } @else { "closed" @if let Some(b) = &rv.closed_by { " by " (b) } } }
            }
        }
        @if g.state == GrantState::Active {
            section aria-labelledby="end" { h2 id="end" { "Revoke" } (revoke_form(f, g)) }
        }
        section aria-labelledby="timeline" {
            h2 id="timeline" { "Audit timeline" }
            ol.timeline id="audit" {
                @for e in audit {
                    li {
                        (when(Timestamp::from_millis(e.at))) " "
                        strong.kind { (e.kind) } " by " code { (e.actor) }
                        " " small.seq { "#" (e.seq) }
                        pre.data { (e.data) }
                    }
                }
            }
        }
    }
}

pub fn reviews(f: &Frame<'_>, list: &[Grant], all: bool) -> Markup {
    html! {
        p { @if all { a href="/ui/reviews" { "Show open reviews only" } } @else { a href="/ui/reviews?state=all" { "Show closed reviews too" } } }
        @if list.is_empty() {
            p.empty id="no-reviews" { "No break-glass review is open." }
        } @else {
            @for g in list {
                @if let Some(rv) = &g.review {
                    article.review data-review=(g.id) {
                        h2 { a href={"/ui/grants/" (g.id)} { (g.request.workload.id) } " → " (g.request.audience) }
                        dl.facts {
                            dt { "Actions" } dd { (actions(&g.actions)) }
                            dt { "Justification" } dd { (rv.justification) }
                            dt { "Broke glass at" } dd { (when(rv.opened_at)) }
                            dt { "Grant" } dd { (state(g.state)) }
                        }
                        @if rv.is_open() {
                            form method="post" action={"/ui/reviews/" (g.id) "/close"} {
                                (csrf(f))
                                fieldset {
                                    legend { "Verdict" }
                                    label.check { input type="radio" name="verdict" value="justified" required; " justified" }
                                    label.check { input type="radio" name="verdict" value="unjustified"; " unjustified" }
                                }
                                label for={"note-" (g.id)} { "Note" }
                                input id={"note-" (g.id)} name="note" type="text" maxlength="2000";
                                button.primary type="submit" { "Close review" }
                            }
                        } @else {
                            p { "Closed" @if let Some(b) = &rv.closed_by { " by " strong { (b) } }
                                @if let Some(v) = rv.verdict { ": " (format!("{v:?}").to_lowercase()) }
                                @if !rv.note.is_empty() { " — " (rv.note) } }
                        }
                    }
                }
            }
        }
    }
}

/// A page that only says what went wrong.
pub fn problem(message: &str) -> Markup {
    html! { p.banner.error role="alert" id="banner" { (message) } p { a href="/ui/" { "Back to the console" } } }
}

pub const CSS: &str = include_str!("console.css");
pub const JS: &str = include_str!("console.js");

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(60), "1m");
        assert_eq!(human(252), "4m 12s");
        assert_eq!(human(900), "15m");
        assert_eq!(human(3600 + 180), "1h 3m");
        assert_eq!(human(2 * 86_400), "2d");
        assert_eq!(human(2 * 86_400 + 3600 + 59), "2d 1h");
    }
}
