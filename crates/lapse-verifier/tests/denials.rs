#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Every reason the verifier refuses a request, each shown with real signatures:
//! tokens signed with an Ed25519 broker key made here, proofs from real DPoP keys.

use lapse_token::{AccessClaims, Confirmation, DpopFault, DpopKey, SigningKey};
use lapse_verifier::{Denial, FeedEntry, OnStale, Request, Verifier, VerifierConfig};
use std::collections::HashMap;
use std::time::Duration;

const ISS: &str = "http://broker.test";
const AUD: &str = "orders-api";
const URL: &str = "https://orders.example/orders/7";
const NOW: i64 = 1_900_000_000;

struct World {
    broker: SigningKey,
    key: DpopKey,
    v: Verifier,
}

fn config() -> VerifierConfig {
    VerifierConfig {
        broker: ISS.into(),
        issuer: ISS.into(),
        audience: AUD.into(),
        token: "gate-token".into(),
        staleness: Duration::from_secs(5),
        on_stale: OnStale::Deny,
        dpop_max_age_secs: 60,
    }
}

fn world() -> World {
    let broker = SigningKey::generate();
    let mut keys = HashMap::new();
    keys.insert(broker.kid().to_owned(), broker.public().clone());
    let v = Verifier::offline(config(), keys);
    v.heard(NOW * 1000);
    World {
        broker,
        key: DpopKey::generate(),
        v,
    }
}

fn claims(w: &World) -> AccessClaims {
    AccessClaims {
        iss: ISS.into(),
        sub: "spiffe://t/ci/deploy".into(),
        aud: AUD.into(),
        exp: NOW + 300,
        iat: NOW,
        nbf: NOW,
        jti: "j1".into(),
        client_id: "spiffe://t/ci/deploy".into(),
        scope: "read write".into(),
        cnf: Confirmation {
            jkt: w.key.jkt().to_owned(),
            x5t_s256: None,
        },
        task: "T-1".into(),
        grant_id: "gr_1".into(),
        break_glass: false,
        ctx: None,
        tools: Vec::new(),
        act: None,
    }
}

fn token(w: &World, c: &AccessClaims) -> String {
    w.broker.sign_jwt("at+jwt", c).unwrap()
}

/// Checks a GET of URL needing `read`, with `auth` and `proofs`, at NOW.
fn check(w: &World, auth: Option<&str>, proofs: &[&str], action: &str) -> Result<(), Denial> {
    w.v.check(&Request {
        method: "GET",
        url: URL,
        authorization: auth,
        dpop: proofs,
        action,
        client_cert: None,
        now_secs: NOW,
    })
    .map(|a| assert_eq!(a.claims.grant_id, "gr_1"))
}

fn good(w: &World) -> (String, String) {
    let t = token(w, &claims(w));
    let p = w.key.proof("GET", URL, Some(&t), NOW);
    (format!("DPoP {t}"), p)
}

#[test]
fn a_bound_token_with_its_proof_for_a_granted_action_passes() {
    let w = world();
    let (auth, proof) = good(&w);
    assert_eq!(check(&w, Some(&auth), &[&proof], "read"), Ok(()));
}

#[test]
fn missing_or_misused_tokens() {
    let w = world();
    let (auth, proof) = good(&w);
    assert_eq!(
        check(&w, None, &[&proof], "read"),
        Err(Denial::MissingToken)
    );
    let bearer = auth.replacen("DPoP", "Bearer", 1);
    assert_eq!(
        check(&w, Some(&bearer), &[&proof], "read"),
        Err(Denial::NotDpopScheme)
    );
    assert!(matches!(
        check(&w, Some("DPoP not-a-jwt"), &[&proof], "read"),
        Err(Denial::MalformedToken(_))
    ));
    assert!(matches!(
        check(&w, Some("garbage"), &[&proof], "read"),
        Err(Denial::MalformedToken(_))
    ));
}

#[test]
fn tokens_the_broker_did_not_sign_or_not_for_now_or_here() {
    let w = world();
    let c = claims(&w);
    let other = SigningKey::generate();
    let forged = other.sign_jwt("at+jwt", &c).unwrap();
    let d = check(
        &w,
        Some(&format!("DPoP {forged}")),
        &[&w.key.proof("GET", URL, Some(&forged), NOW)],
        "read",
    );
    assert_eq!(
        d,
        Err(Denial::UnknownKey),
        "a key the broker does not publish"
    );

    // Same kid, another key: the signature does not verify.
    let t = token(&w, &c);
    let (head, rest) = t.split_once('.').unwrap();
    let (payload, _) = rest.split_once('.').unwrap();
    let sig = lapse_token::b64::encode(other.sign(format!("{head}.{payload}").as_bytes()));
    let tampered = format!("{head}.{payload}.{sig}");
    let d = check(
        &w,
        Some(&format!("DPoP {tampered}")),
        &[&w.key.proof("GET", URL, Some(&tampered), NOW)],
        "read",
    );
    assert_eq!(d, Err(Denial::BadSignature));

    let cases: Vec<(AccessClaims, Denial)> = vec![
        (
            AccessClaims {
                iss: "http://evil.test".into(),
                ..c.clone()
            },
            Denial::WrongIssuer,
        ),
        (
            AccessClaims {
                exp: NOW - 1,
                ..c.clone()
            },
            Denial::Expired,
        ),
        (
            AccessClaims {
                nbf: NOW + 60,
                ..c.clone()
            },
            Denial::NotYetValid,
        ),
        (
            AccessClaims {
                aud: "payments-api".into(),
                ..c.clone()
            },
            Denial::WrongAudience {
                expected: AUD.into(),
                got: "payments-api".into(),
            },
        ),
    ];
    for (c, want) in cases {
        let t = token(&w, &c);
        let p = w.key.proof("GET", URL, Some(&t), NOW);
        assert_eq!(
            check(&w, Some(&format!("DPoP {t}")), &[&p], "read"),
            Err(want)
        );
    }
}

#[test]
fn an_action_the_token_does_not_carry() {
    let w = world();
    let (auth, proof) = good(&w);
    assert_eq!(
        check(&w, Some(&auth), &[&proof], "admin"),
        Err(Denial::ActionNotGranted("admin".into()))
    );
}

#[test]
fn a_certificate_bound_token_needs_its_certificate() {
    let w = world();
    let mut c = claims(&w);
    c.cnf.x5t_s256 = Some("thumb-of-the-svid".into());
    let t = token(&w, &c);
    let auth = format!("DPoP {t}");
    let at = |cert: Option<&str>| {
        let p = w.key.proof("GET", URL, Some(&t), NOW);
        w.v.check(&Request {
            method: "GET",
            url: URL,
            authorization: Some(&auth),
            dpop: &[p.as_str()],
            action: "read",
            client_cert: cert,
            now_secs: NOW,
        })
        .map(|_| ())
    };
    assert_eq!(at(None), Err(Denial::CertificateMissing));
    assert_eq!(
        at(Some("thumb-of-another")),
        Err(Denial::CertificateMismatch)
    );
    assert_eq!(at(Some("thumb-of-the-svid")), Ok(()));
    assert_eq!(Denial::CertificateMismatch.status(), 401);
    assert_eq!(Denial::CertificateMissing.code(), "invalid_token");
    // A token without the binding does not care which certificate came along.
    let (auth, proof) = good(&w);
    let r = w.v.check(&Request {
        method: "GET",
        url: URL,
        authorization: Some(&auth),
        dpop: &[proof.as_str()],
        action: "read",
        client_cert: Some("anything"),
        now_secs: NOW,
    });
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn every_kind_of_bad_proof() {
    let w = world();
    let t = token(&w, &claims(&w));
    let auth = format!("DPoP {t}");
    assert_eq!(
        check(&w, Some(&auth), &[], "read"),
        Err(Denial::MissingProof)
    );
    let p1 = w.key.proof("GET", URL, Some(&t), NOW);
    let p2 = w.key.proof("GET", URL, Some(&t), NOW);
    assert_eq!(
        check(&w, Some(&auth), &[&p1, &p2], "read"),
        Err(Denial::MultipleProofs)
    );

    let fault = |proof: &str| match check(&w, Some(&auth), &[proof], "read") {
        Err(Denial::InvalidProof { fault, .. }) => fault,
        other => panic!("expected an invalid proof, got {other:?}"),
    };
    assert_eq!(
        fault(&w.key.proof("POST", URL, Some(&t), NOW)),
        DpopFault::Method
    );
    assert_eq!(
        fault(
            &w.key
                .proof("GET", "https://orders.example/other", Some(&t), NOW)
        ),
        DpopFault::Url
    );
    assert_eq!(
        fault(&w.key.proof("GET", URL, Some(&t), NOW - 120)),
        DpopFault::Stale
    );
    assert_eq!(
        fault(&w.key.proof("GET", URL, Some(&t), NOW + 120)),
        DpopFault::Future
    );
    assert_eq!(
        fault(&w.key.proof("GET", URL, None, NOW)),
        DpopFault::AccessTokenHash
    );
    assert_eq!(
        fault(&w.key.proof("GET", URL, Some("another token"), NOW)),
        DpopFault::AccessTokenHash
    );
    assert_eq!(fault("not.a.proof"), DpopFault::Malformed);
    let good = w.key.proof("GET", URL, Some(&t), NOW);
    let (rest, _) = good.rsplit_once('.').unwrap();
    let resigned = format!(
        "{rest}.{}",
        lapse_token::b64::encode(SigningKey::generate().sign(rest.as_bytes()))
    );
    assert_eq!(fault(&resigned), DpopFault::Signature);

    // A proof from another key than the token is bound to.
    let thief = DpopKey::generate();
    assert_eq!(
        check(
            &w,
            Some(&auth),
            &[&thief.proof("GET", URL, Some(&t), NOW)],
            "read"
        ),
        Err(Denial::ProofKeyMismatch)
    );
    // A proof used twice.
    let once = w.key.proof("GET", URL, Some(&t), NOW);
    assert_eq!(check(&w, Some(&auth), &[&once], "read"), Ok(()));
    assert_eq!(
        check(&w, Some(&auth), &[&once], "read"),
        Err(Denial::ProofReplayed)
    );
}

#[test]
fn an_ended_grant_and_a_silent_feed() {
    let w = world();
    let (auth, proof) = good(&w);
    assert_eq!(check(&w, Some(&auth), &[&proof], "read"), Ok(()));
    w.v.apply(
        &FeedEntry {
            seq: 1,
            at: NOW * 1000,
            grant_id: "gr_1".into(),
            state: "revoked".into(),
            audience: AUD.into(),
            jti: Some("j1".into()),
            exp: (NOW + 300) * 1000,
            reason: "gone".into(),
        },
        NOW * 1000,
    );
    assert_eq!(w.v.seq(), 1);
    let (auth, proof) = good(&w);
    assert_eq!(
        check(&w, Some(&auth), &[&proof], "read"),
        Err(Denial::GrantEnded("revoked".into()))
    );

    // Another grant, but the feed was last heard 6 s ago (bound 5 s).
    let w = world();
    let late = Request {
        method: "GET",
        url: URL,
        authorization: None,
        dpop: &[],
        action: "read",
        client_cert: None,
        now_secs: NOW + 6,
    };
    let t = token(
        &w,
        &AccessClaims {
            exp: NOW + 600,
            ..claims(&w)
        },
    );
    let p = w.key.proof("GET", URL, Some(&t), NOW + 6);
    let auth = format!("DPoP {t}");
    let proofs = [p.as_str()];
    let r = w.v.check(&Request {
        authorization: Some(&auth),
        dpop: &proofs,
        ..late
    });
    assert_eq!(r.map(|_| ()), Err(Denial::FeedStale(6)));
}

#[tokio::test]
async fn caught_up_waits_for_the_feed_to_be_heard_once() {
    let v = std::sync::Arc::new(Verifier::offline(config(), HashMap::new()));
    assert!(
        !v.caught_up(Duration::from_millis(50)).await,
        "never heard: not caught up"
    );
    let later = v.clone();
    let hears = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        later.heard(NOW * 1000);
    });
    assert!(v.caught_up(Duration::from_secs(10)).await);
    hears.await.expect("task");
}

#[test]
fn denials_map_to_statuses_and_error_codes() {
    assert_eq!(Denial::MissingToken.status(), 401);
    assert_eq!(Denial::ProofReplayed.code(), "invalid_dpop_proof");
    assert_eq!(Denial::ActionNotGranted("x".into()).status(), 403);
    assert_eq!(
        Denial::ActionNotGranted("x".into()).code(),
        "insufficient_scope"
    );
    assert_eq!(Denial::FeedStale(9).status(), 503);
    assert_eq!(Denial::GrantEnded("revoked".into()).code(), "invalid_token");
    let h = Denial::WrongAudience {
        expected: "a\"b".into(),
        got: "c".into(),
    }
    .www_authenticate();
    assert!(h.starts_with("DPoP error=\"insufficient_scope\""), "{h}");
    assert_eq!(h.matches('"').count(), 6, "quotes inside are dropped: {h}");
    // Header values are visible ASCII, whatever a denial quotes.
    let h = Denial::WrongAudience {
        expected: "orders-db".into(),
        got: "caf\u{e9}\n\u{2026}".into(),
    }
    .www_authenticate();
    assert!(h.bytes().all(|b| b == b' ' || b.is_ascii_graphic()), "{h}");
    assert!(Denial::MissingToken.www_authenticate().is_ascii());
    // No credentials at all: the bare challenge, no error code (RFC 6750 3.1).
    assert_eq!(
        Denial::MissingToken.www_authenticate(),
        "DPoP algs=\"EdDSA ES256 RS256\""
    );
    assert!(
        Denial::MissingProof
            .www_authenticate()
            .contains("error=\"invalid_dpop_proof\"")
    );
}

#[test]
fn a_token_verified_once_still_expires_on_time() {
    let w = world();
    let t = token(&w, &claims(&w));
    let auth = format!("DPoP {t}");
    assert_eq!(
        check(
            &w,
            Some(&auth),
            &[&w.key.proof("GET", URL, Some(&t), NOW)],
            "read"
        ),
        Ok(())
    );
    let later = NOW + 301;
    w.v.heard(later * 1000);
    let proof = w.key.proof("GET", URL, Some(&t), later);
    let r = w.v.check(&Request {
        method: "GET",
        url: URL,
        authorization: Some(&auth),
        dpop: &[&proof],
        action: "read",
        client_cert: None,
        now_secs: later,
    });
    assert_eq!(
        r.map(|_| ()),
        Err(Denial::Expired),
        "the cached claims are checked against the clock"
    );
}

/// A request's `Authorization`, `DPoP` headers and action, owned.
type Owned = (String, Vec<String>, &'static str);

/// What a check answered, comparable: the grant allowed, or the denial.
fn outcome(r: Result<lapse_verifier::Allowed, Denial>) -> Result<String, Denial> {
    r.map(|a| a.claims.grant_id.clone())
}

/// Requests of every kind, good and bad, in one list: the same list checked in one
/// batch and one by one (on a second verifier with the same keys, so that replay
/// caches start alike) answers the same, and each answer is the right one.
fn mixed_requests(w: &World) -> (Vec<Owned>, Vec<Result<String, Denial>>) {
    let t = token(w, &claims(w));
    let auth = format!("DPoP {t}");
    let proof = |at: i64| w.key.proof("GET", URL, Some(&t), at);
    let first = proof(NOW);
    let (rest, _) = first.rsplit_once('.').unwrap();
    let resigned = format!(
        "{rest}.{}",
        lapse_token::b64::encode(SigningKey::generate().sign(rest.as_bytes()))
    );
    let thief = DpopKey::generate();
    let reqs = vec![
        (auth.clone(), vec![first.clone()], "read"),
        (auth.clone(), vec![resigned], "read"),
        (auth.clone(), vec![proof(NOW)], "write"),
        (auth.clone(), vec![first], "read"),
        (auth.clone(), vec![], "read"),
        (
            auth.clone(),
            vec![
                w.key
                    .proof("GET", "https://orders.example/x", Some(&t), NOW),
            ],
            "read",
        ),
        (
            auth.clone(),
            vec![thief.proof("GET", URL, Some(&t), NOW)],
            "read",
        ),
        (auth.clone(), vec![proof(NOW)], "admin"),
        (auth.clone(), vec![proof(NOW - 1)], "read"),
        ("DPoP not-a-jwt".into(), vec![proof(NOW)], "read"),
        (auth, vec![proof(NOW)], "read"),
    ];
    let ok = || Ok("gr_1".to_owned());
    let expected = vec![
        ok(),
        Err(Denial::InvalidProof {
            fault: DpopFault::Signature,
            detail: String::new(),
        }),
        ok(),
        Err(Denial::ProofReplayed),
        Err(Denial::MissingProof),
        Err(Denial::InvalidProof {
            fault: DpopFault::Url,
            detail: String::new(),
        }),
        Err(Denial::ProofKeyMismatch),
        Err(Denial::ActionNotGranted("admin".into())),
        ok(),
        Err(Denial::MalformedToken(String::new())),
        ok(),
    ];
    (reqs, expected)
}

/// Equal, except that details (free text) are not compared.
fn same_kind(a: &Result<String, Denial>, b: &Result<String, Denial>) -> bool {
    match (a, b) {
        (
            Err(Denial::InvalidProof { fault: x, .. }),
            Err(Denial::InvalidProof { fault: y, .. }),
        ) => x == y,
        (Err(Denial::MalformedToken(_)), Err(Denial::MalformedToken(_))) => true,
        _ => a == b,
    }
}

fn view<'a>(r: &'a Owned, proofs: &'a [&'a str]) -> Request<'a> {
    Request {
        method: "GET",
        url: URL,
        authorization: Some(&r.0),
        dpop: proofs,
        action: r.2,
        client_cert: None,
        now_secs: NOW,
    }
}

#[test]
fn requests_checked_in_one_batch_answer_as_each_alone() {
    let w = world();
    let twin = Verifier::offline(config(), {
        let mut keys = HashMap::new();
        keys.insert(w.broker.kid().to_owned(), w.broker.public().clone());
        keys
    });
    twin.heard(NOW * 1000);
    let (reqs, expected) = mixed_requests(&w);
    let proofs: Vec<Vec<&str>> = reqs
        .iter()
        .map(|r| r.1.iter().map(String::as_str).collect())
        .collect();
    let views: Vec<Request<'_>> = reqs.iter().zip(&proofs).map(|(r, p)| view(r, p)).collect();
    let together: Vec<_> = w.v.check_many(&views).into_iter().map(outcome).collect();
    let alone: Vec<_> = views.iter().map(|r| outcome(twin.check(r))).collect();
    assert_eq!(together.len(), reqs.len());
    for (i, ((t, a), e)) in together.iter().zip(&alone).zip(&expected).enumerate() {
        assert_eq!(t, a, "request {i}: in a batch and alone");
        assert!(same_kind(t, e), "request {i}: {t:?}, expected {e:?}");
    }
}

/// Concurrent requests through a [`Batcher`] get their own answers, and do share
/// batches: on one thread, 40 requests started together take fewer than 40 calls.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_requests_share_batches_and_keep_their_answers() {
    let w = world();
    let (reqs, expected) = mixed_requests(&w);
    // The mixed list, then 29 more good requests of their own.
    let t = token(&w, &claims(&w));
    let mut all = reqs;
    let mut want = expected;
    for _ in 0..29 {
        all.push((
            format!("DPoP {t}"),
            vec![w.key.proof("GET", URL, Some(&t), NOW)],
            "read",
        ));
        want.push(Ok("gr_1".into()));
    }
    let batcher = std::sync::Arc::new(lapse_verifier::Batcher::new(std::sync::Arc::new(w.v)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in all.into_iter().enumerate() {
        let b = std::sync::Arc::clone(&batcher);
        // Tasks start in the order spawned, so request 3 (request 0's proof again)
        // queues after request 0 and is the replay.
        tasks.spawn(async move {
            let proofs: Vec<&str> = r.1.iter().map(String::as_str).collect();
            (i, outcome(b.verify(&view(&r, &proofs)).await))
        });
    }
    let mut got = 0;
    while let Some(done) = tasks.join_next().await {
        let (i, answer) = done.unwrap();
        assert!(
            same_kind(&answer, &want[i]),
            "request {i}: {answer:?}, expected {:?}",
            want[i]
        );
        got += 1;
    }
    assert_eq!(got, 40);
    let (batches, requests) = batcher.counts();
    assert_eq!(requests, 40);
    assert!(
        batches < 10,
        "40 concurrent requests took {batches} batches"
    );
}
