//! Identity and the gateway, end to end against the real binary: the flows a
//! user relies on, and the attacks a token must survive.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const PW: &str = "correct horse battery";

fn post(a: &ureq::Agent, url: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = a.post(url);
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
    }
    let (st, _, b) = call(req, Some(&body.to_string()));
    (st, if b.is_empty() { Value::Null } else { json(&b) })
}

fn get(a: &ureq::Agent, url: &str, token: &str) -> (u16, Value) {
    let (st, _, b) = call(
        a.get(url).set("authorization", &format!("Bearer {token}")),
        None,
    );
    (st, if b.is_empty() { Value::Null } else { json(&b) })
}

fn login(a: &ureq::Agent, s: &Server, email: &str, pw: &str) -> (u16, Value) {
    post(
        a,
        &s.url("/api/v1/auth/login"),
        None,
        json!({ "email": email, "password": pw }),
    )
}

fn token(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
        .to_owned()
}

#[test]
fn account_lifecycle_sessions_refresh_reuse_logout_password_and_ban() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let a = agent();
    let reg = s.url("/api/v1/auth/register");

    // Bad input changes nothing and says what was wrong.
    let (st, body) = post(
        &a,
        &reg,
        None,
        json!({ "email": "ana@example.com", "password": "short", "display_name": "Ana" }),
    );
    assert_eq!(
        (st, body["code"].as_str()),
        (422, Some("weak_password")),
        "{body}"
    );
    let (st, body) = post(
        &a,
        &reg,
        None,
        json!({ "email": "not-an-email", "password": PW, "display_name": "Ana" }),
    );
    assert_eq!(
        (st, body["code"].as_str()),
        (422, Some("invalid_email")),
        "{body}"
    );
    let (st, body) = post(
        &a,
        &reg,
        None,
        json!({ "email": "ana@example.com", "password": PW }),
    );
    assert_eq!(
        (st, body["code"].as_str()),
        (422, Some("validation_failed")),
        "{body}"
    );
    let (st, _, body) = call(a.post(&reg), Some("{\"email\":"));
    assert_eq!(
        (st, json(&body)["code"].as_str()),
        (400, Some("malformed_request"))
    );

    // Register: 201 with tokens, like a login.
    let (st, ana) = post(
        &a,
        &reg,
        None,
        json!({ "email": "Ana@Example.com", "password": PW, "display_name": "Ana" }),
    );
    assert_eq!(st, 201, "{ana}");
    assert_eq!(ana["user"]["email"], "ana@example.com");
    assert_eq!(ana["token_type"], "Bearer");
    assert_eq!(ana["expires_in"], 900);
    let (st, body) = post(
        &a,
        &reg,
        None,
        json!({ "email": "ana@example.com", "password": PW, "display_name": "Again" }),
    );
    assert_eq!((st, body["code"].as_str()), (409, Some("email_taken")));

    // No account enumeration: unknown email and wrong password look the same.
    let (st1, b1) = login(&a, &s, "nobody@example.com", PW);
    let (st2, b2) = login(&a, &s, "ana@example.com", "wrong password!!");
    assert_eq!((st1, st2), (401, 401));
    assert_eq!(b1, b2, "same body for unknown user and wrong password");

    // Login → me.
    let (st, l1) = login(&a, &s, "ana@example.com", PW);
    assert_eq!(st, 200, "{l1}");
    let at1 = token(&l1, "access_token");
    let (st, me) = get(&a, &s.url("/api/v1/users/me"), &at1);
    assert_eq!((st, me["display_name"].as_str()), (200, Some("Ana")));
    let (st, _, body) = call(a.get(&s.url("/api/v1/users/me")), None);
    assert_eq!(
        (st, json(&body)["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let mut patch = a
        .request("PATCH", &s.url("/api/v1/users/me"))
        .set("authorization", &format!("Bearer {at1}"));
    patch = patch.set("content-type", "application/json");
    let (st, _, body) = call(patch, Some(r#"{"display_name": "Ana Souza"}"#));
    assert_eq!(
        (st, json(&body)["display_name"].as_str()),
        (200, Some("Ana Souza"))
    );

    // Refresh rotates; presenting the old refresh token again revokes the family.
    let (st, r1) = post(
        &a,
        &s.url("/api/v1/auth/refresh"),
        None,
        json!({ "refresh_token": token(&l1, "refresh_token") }),
    );
    assert_eq!(st, 200, "{r1}");
    assert_ne!(token(&r1, "refresh_token"), token(&l1, "refresh_token"));
    let at2 = token(&r1, "access_token");
    assert_eq!(get(&a, &s.url("/api/v1/users/me"), &at2).0, 200);
    let (st, body) = post(
        &a,
        &s.url("/api/v1/auth/refresh"),
        None,
        json!({ "refresh_token": token(&l1, "refresh_token") }),
    );
    assert_eq!(
        (st, body["code"].as_str()),
        (401, Some("refresh_token_reused"))
    );
    assert_eq!(
        get(&a, &s.url("/api/v1/users/me"), &at2).0,
        401,
        "family revoked: access token dead at once"
    );
    let (st, _) = post(
        &a,
        &s.url("/api/v1/auth/refresh"),
        None,
        json!({ "refresh_token": token(&r1, "refresh_token") }),
    );
    assert_eq!(
        st, 401,
        "the newest refresh token of the family is dead too"
    );

    // Sessions: list, end one; logout kills the access token at once.
    let (_, l2) = login(&a, &s, "ana@example.com", PW);
    let (_, l3) = login(&a, &s, "ana@example.com", PW);
    let at3 = token(&l3, "access_token");
    let (st, list) = get(&a, &s.url("/api/v1/auth/sessions"), &at3);
    assert_eq!(st, 200);
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(
        sessions.len(),
        3,
        "registration's session and two logins: {list}"
    );
    assert_eq!(sessions.iter().filter(|x| x["current"] == true).count(), 1);
    let (st, _, _) = call(
        a.delete(&s.url(&format!(
            "/api/v1/auth/sessions/{}",
            token(&l2, "session_id")
        )))
        .set("authorization", &format!("Bearer {at3}")),
        None,
    );
    assert_eq!(st, 204);
    assert_eq!(
        get(&a, &s.url("/api/v1/users/me"), &token(&l2, "access_token")).0,
        401
    );
    let (st, _) = post(&a, &s.url("/api/v1/auth/logout"), Some(&at3), json!({}));
    assert_eq!(st, 204);
    assert_eq!(
        get(&a, &s.url("/api/v1/users/me"), &at3).0,
        401,
        "logged-out token refused at once"
    );

    // Password change ends the other sessions, keeps this one.
    let (_, la) = login(&a, &s, "ana@example.com", PW);
    let (_, lb) = login(&a, &s, "ana@example.com", PW);
    let (ata, atb) = (token(&la, "access_token"), token(&lb, "access_token"));
    let new_pw = "another long passphrase";
    let (st, body) = post(
        &a,
        &s.url("/api/v1/users/me/password"),
        Some(&ata),
        json!({ "current_password": "nope nope nope", "new_password": new_pw }),
    );
    assert_eq!(
        (st, body["code"].as_str()),
        (401, Some("invalid_credentials"))
    );
    let (st, body) = post(
        &a,
        &s.url("/api/v1/users/me/password"),
        Some(&ata),
        json!({ "current_password": PW, "new_password": new_pw }),
    );
    // The other ones: session B and the one registration opened.
    assert_eq!(
        (st, body["other_sessions_ended"].as_u64()),
        (200, Some(2)),
        "{body}"
    );
    assert_eq!(get(&a, &s.url("/api/v1/users/me"), &atb).0, 401);
    assert_eq!(get(&a, &s.url("/api/v1/users/me"), &ata).0, 200);
    assert_eq!(login(&a, &s, "ana@example.com", PW).0, 401);
    assert_eq!(login(&a, &s, "ana@example.com", new_pw).0, 200);

    // Admin from the CLI (password on stdin), then a ban.
    let d = data.to_str().unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "users",
            "create",
            "--email",
            "root@example.com",
            "--admin",
            "--data-dir",
            d,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"admin passphrase 42\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("role admin"));
    let (st, root) = login(&a, &s, "root@example.com", "admin passphrase 42");
    assert_eq!(st, 200, "{root}");
    let admin = token(&root, "access_token");
    let ana_id = ana["user"]["id"].as_str().unwrap().to_owned();
    let ban_url = s.url(&format!("/api/v1/admin/users/{ana_id}/ban"));
    let (st, body) = post(&a, &ban_url, Some(&ata), json!({}));
    assert_eq!(
        (st, body["code"].as_str()),
        (403, Some("permission_denied")),
        "a user cannot ban"
    );
    let (st, body) = post(&a, &ban_url, Some(&admin), json!({}));
    assert_eq!(
        (st, body["status"].as_str()),
        (200, Some("banned")),
        "{body}"
    );
    assert_eq!(
        get(&a, &s.url("/api/v1/users/me"), &ata).0,
        401,
        "ban ends every session"
    );
    let (st, body) = login(&a, &s, "ana@example.com", new_pw);
    assert_eq!((st, body["code"].as_str()), (403, Some("account_banned")));
    let (st, _) = post(
        &a,
        &s.url("/api/v1/admin/users/no-such-user/ban"),
        Some(&admin),
        json!({}),
    );
    assert_eq!(st, 404);

    // Events: registration, ban, and the audit trail, with correlation ids.
    wait_until("events relayed", Duration::from_secs(10), || {
        let (_, out, _) = cli(&["events", "tail", "user.events", "--data-dir", d], &[]);
        out.contains("user.banned")
    });
    let (_, out, _) = cli(&["events", "tail", "user.events", "--data-dir", d], &[]);
    let types: Vec<String> = out
        .lines()
        .map(|l| json(l)["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types.iter().filter(|t| *t == "user.registered").count(),
        2,
        "{types:?}"
    );
    let (_, out, _) = cli(
        &[
            "events",
            "tail",
            "audit.events",
            "--limit",
            "1000",
            "--data-dir",
            d,
        ],
        &[],
    );
    for t in [
        "auth.login_succeeded",
        "auth.login_failed",
        "auth.refresh_token_reused",
        "auth.permission_denied",
        "admin.user_banned",
        "auth.password_changed",
    ] {
        assert!(
            out.contains(&format!("\"type\":\"{t}\"")),
            "missing audit event {t}"
        );
    }
    assert!(
        !out.contains(PW) && !out.contains(new_pw),
        "no password in any event"
    );
    assert!(s.terminate().success());
}

#[test]
fn token_attacks_are_refused_and_an_external_library_verifies_our_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let a = agent();
    let (st, reg) = post(
        &a,
        &s.url("/api/v1/auth/register"),
        None,
        json!({ "email": "eve@example.com", "password": PW, "display_name": "Eve" }),
    );
    assert_eq!(st, 201);
    let good = token(&reg, "access_token");
    let me = s.url("/api/v1/users/me");
    assert_eq!(get(&a, &me, &good).0, 200);

    let (_, _, jwks) = call(a.get(&s.url("/.well-known/jwks.json")), None);
    let jwks = json(&jwks);
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["crv"].as_str(),
            key["alg"].as_str()
        ),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
    );
    let kid = key["kid"].as_str().unwrap().to_owned();
    let raw = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();

    // An independent implementation (jwt-compact) verifies the signature with the published key.
    {
        use jwt_compact::alg::Ed25519;
        use jwt_compact::prelude::*;
        use jwt_compact::{alg::VerifyingKey as _, Algorithm};
        let vk = <Ed25519 as Algorithm>::VerifyingKey::from_slice(&raw).unwrap();
        let untrusted = UntrustedToken::new(&good).unwrap();
        assert_eq!(untrusted.algorithm(), "EdDSA");
        assert_eq!(untrusted.header().key_id.as_deref(), Some(kid.as_str()));
        let t: Token<Value> = Ed25519
            .validator::<Value>(&vk)
            .validate(&untrusted)
            .expect("external verify");
        let c = &t.claims().custom;
        assert_eq!(c["sub"], reg["user"]["id"]);
        assert_eq!(
            (c["iss"].as_str(), c["aud"].as_str()),
            (Some("flowline"), Some("flowline-api"))
        );
        assert!(
            c["sid"].as_str().is_some_and(|x| x.len() >= 22),
            "session id of 128+ bits"
        );
        assert!(c["jti"].as_str().is_some());
        let (iat, nbf, exp) = (
            t.claims().issued_at.unwrap(),
            t.claims().not_before.unwrap(),
            t.claims().expiration.unwrap(),
        );
        assert_eq!((exp - iat).num_seconds(), 900, "15-minute access token");
        assert!(nbf <= exp);
    }

    let parts: Vec<&str> = good.split('.').collect();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let now = claims["iat"].as_i64().unwrap();
    let hs256 = |c: &Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(&h, c, &jsonwebtoken::EncodingKey::from_secret(&raw)).unwrap()
    };
    let mut tampered_claims = claims.clone();
    tampered_claims["sub"] = json!("someone-else");
    let mut expired = claims.clone();
    expired["exp"] = json!(now - 10);
    expired["iat"] = json!(now - 1000);
    expired["nbf"] = json!(now - 1000);
    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("another-api");
    let attacks: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({ "alg": "none", "typ": "JWT", "kid": kid })),
                parts[1]
            ),
        ),
        (
            "alg none, signature kept",
            format!(
                "{}.{}.{}",
                b64(&json!({ "alg": "none", "kid": kid })),
                parts[1],
                parts[2]
            ),
        ),
        ("HS256 with the public key (key confusion)", hs256(&claims)),
        (
            "tampered payload",
            format!("{}.{}.{}", parts[0], b64(&tampered_claims), parts[2]),
        ),
        (
            "expired claims under the original signature",
            format!("{}.{}.{}", parts[0], b64(&expired), parts[2]),
        ),
        (
            "wrong audience",
            format!("{}.{}.{}", parts[0], b64(&wrong_aud), parts[2]),
        ),
        (
            "unknown kid",
            format!(
                "{}.{}.{}",
                b64(&json!({ "alg": "EdDSA", "typ": "JWT", "kid": "not-a-key" })),
                parts[1],
                parts[2]
            ),
        ),
        ("garbage", "abc.def.ghi".to_owned()),
    ];
    for (what, t) in attacks {
        let (st, body) = get(&a, &me, &t);
        assert_eq!(st, 401, "{what}: {body}");
        assert_eq!(body["code"], "token_invalid", "{what}");
    }
    // A correctly signed but expired token: issue with a 1 s TTL server and wait.
    let (st, _) = post(&a, &s.url("/api/v1/auth/logout"), Some(&good), json!({}));
    assert_eq!(st, 204);
    let (st, body) = get(&a, &me, &good);
    assert_eq!(
        (st, body["code"].as_str()),
        (401, Some("token_invalid")),
        "token of a logged-out session"
    );
    assert!(s.terminate().success());

    let s = Server::start(&data, &[("FLOWLINE__AUTH__ACCESS_TTL", "1s")]);
    let (_, l) = login(&a, &s, "eve@example.com", PW);
    let short = token(&l, "access_token");
    assert_eq!(get(&a, &s.url("/api/v1/users/me"), &short).0, 200);
    std::thread::sleep(Duration::from_millis(7_200)); // TTL 1 s + 5 s leeway + margin
    let (st, body) = get(&a, &s.url("/api/v1/users/me"), &short);
    assert_eq!(
        (st, body["code"].as_str()),
        (401, Some("token_invalid")),
        "expired"
    );

    // Key rotation from the CLI: new tokens use the new key, old ones still verify.
    let (_, l_old) = login(&a, &s, "eve@example.com", PW);
    let (ok, out, err) = cli(
        &["keys", "rotate", "--data-dir", data.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("new signing key"));
    wait_until(
        "server picked up the new key",
        Duration::from_secs(10),
        || {
            let (_, _, j) = call(a.get(&s.url("/.well-known/jwks.json")), None);
            json(&j)["keys"].as_array().unwrap().len() == 2
        },
    );
    let (_, l_new) = login(&a, &s, "eve@example.com", PW);
    let kid_of = |t: &str| -> String {
        let h: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(t.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        h["kid"].as_str().unwrap().to_owned()
    };
    assert_ne!(
        kid_of(&token(&l_old, "access_token")),
        kid_of(&token(&l_new, "access_token"))
    );
    assert_eq!(
        get(
            &a,
            &s.url("/api/v1/users/me"),
            &token(&l_old, "access_token")
        )
        .0,
        200,
        "old key still valid"
    );
    assert_eq!(
        get(
            &a,
            &s.url("/api/v1/users/me"),
            &token(&l_new, "access_token")
        )
        .0,
        200
    );
    assert!(s.terminate().success());
}

#[test]
fn rate_limits_answer_429_with_retry_after_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(
        &data,
        &[
            ("FLOWLINE__RATELIMIT__AUTH_PER_MINUTE", "60"),
            ("FLOWLINE__RATELIMIT__AUTH_BURST", "3"),
            ("FLOWLINE__AUTH__LOCKOUT_THRESHOLD", "100"),
        ],
    );
    let a = agent();
    let url = s.url("/api/v1/auth/login");
    let body = json!({ "email": "x@example.com", "password": "whatever whatever" });
    for _ in 0..3 {
        assert_eq!(post(&a, &url, None, body.clone()).0, 401);
    }
    let res = a
        .post(&url)
        .set("content-type", "application/json")
        .send_string(&body.to_string());
    let res = match res {
        Err(ureq::Error::Status(429, r)) => r,
        other => panic!("expected 429, got {other:?}"),
    };
    let wait: u64 = res
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    assert_eq!(json(&res.into_string().unwrap())["code"], "rate_limited");
    // Other routes are not under the login limit.
    assert_eq!(call(a.get(&s.url("/healthz")), None).0, 200);
    std::thread::sleep(Duration::from_secs(wait));
    assert_eq!(
        post(&a, &url, None, body).0,
        401,
        "recovered after Retry-After"
    );
    assert!(s.terminate().success());
}

#[test]
fn failed_logins_slow_the_guesser_but_never_lock_the_owner_out() {
    let dir = tempfile::tempdir().unwrap();
    // Behind a trusted proxy: X-Forwarded-For names the client.
    let s = Server::start(
        &dir.path().join("data"),
        &[
            ("FLOWLINE__AUTH__LOCKOUT_THRESHOLD", "3"),
            ("FLOWLINE__AUTH__LOCKOUT_MAX_DELAY", "2s"),
            ("FLOWLINE__SERVER__TRUSTED_PROXIES", r#"["127.0.0.1"]"#),
        ],
    );
    let a = agent();
    let (st, _) = post(
        &a,
        &s.url("/api/v1/auth/register"),
        None,
        json!({ "email": "bob@example.com", "password": PW, "display_name": "Bob" }),
    );
    assert_eq!(st, 201);
    let login_from = |ip: &str, pw: &str| {
        let body = json!({ "email": "bob@example.com", "password": pw }).to_string();
        let (st, _, b) = call(
            a.post(&s.url("/api/v1/auth/login"))
                .set("x-forwarded-for", ip),
            Some(&body),
        );
        (st, json(&b))
    };
    let attacker = "198.51.100.7";
    for _ in 0..3 {
        assert_eq!(login_from(attacker, "guess guess guess").0, 401);
    }
    let (st, body) = login_from(attacker, PW);
    assert_eq!(
        (st, body["code"].as_str()),
        (429, Some("rate_limited")),
        "the guessing client waits, even with the right password"
    );
    // The owner, elsewhere, is not held up by someone else's guesses.
    let (st, body) = login_from("203.0.113.5", PW);
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["user"]["email"], "bob@example.com");
    // Its session records the forwarded client address.
    let t = body["access_token"].as_str().unwrap().to_owned();
    let (_, list) = get(&a, &s.url("/api/v1/auth/sessions"), &t);
    assert!(
        list["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["ip"] == "203.0.113.5"),
        "{list}"
    );
    // And the delay is bounded: the guesser's own wait ends too.
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(
        login_from(attacker, PW).0,
        200,
        "the wait is never permanent"
    );
    assert!(s.terminate().success());
}

#[test]
fn me_is_cached_per_user_dropped_by_user_events_and_never_served_after_logout() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]);
    let a = agent();
    let reg = s.url("/api/v1/auth/register");
    let (_, ana) = post(
        &a,
        &reg,
        None,
        json!({ "email": "ana@example.com", "password": PW, "display_name": "Ana" }),
    );
    let (_, bob) = post(
        &a,
        &reg,
        None,
        json!({ "email": "bob@example.com", "password": PW, "display_name": "Bob" }),
    );
    let (ta, tb) = (token(&ana, "access_token"), token(&bob, "access_token"));
    let me = s.url("/api/v1/users/me");
    let fetch = |t: &str| {
        let res = a
            .get(&me)
            .set("authorization", &format!("Bearer {t}"))
            .call()
            .unwrap();
        let cache = res.header("x-cache").unwrap_or("").to_owned();
        (cache, json(&res.into_string().unwrap()))
    };
    // Both registrations' user.events must reach the gateway's invalidation
    // consumer first, or they would drop entries this test expects to hit.
    wait_until(
        "registration events consumed",
        Duration::from_secs(10),
        || {
            let m = call(a.get(&s.url("/metrics")), None).2;
            m.contains("flowline_events_appended_total{topic=\"user.events\"} 2")
                && m.contains(
                    "flowline_consumer_lag{group=\"gateway.cache.local\",topic=\"user.events\"} 0",
                )
        },
    );
    let (c1, v1) = fetch(&ta);
    let (c2, v2) = fetch(&ta);
    assert_eq!((c1.as_str(), c2.as_str()), ("miss", "hit"));
    assert_eq!(v1, v2);
    let (c3, v3) = fetch(&tb);
    assert_eq!(c3, "miss", "keyed per user");
    assert_eq!(v3["display_name"], "Bob", "never another user's response");

    // A change publishes user.updated; the gateway's consumer drops Ana's entry.
    let patch = a
        .request("PATCH", &me)
        .set("authorization", &format!("Bearer {ta}"))
        .set("content-type", "application/json");
    assert_eq!(call(patch, Some(r#"{"display_name": "Ana S."}"#)).0, 200);
    wait_until(
        "invalidation event processed",
        Duration::from_secs(5),
        || fetch(&ta).1["display_name"] == "Ana S.",
    );
    assert_eq!(fetch(&tb).0, "hit", "Bob's entry untouched");

    let (_, _, m) = call(a.get(&s.url("/metrics")), None);
    assert!(m.contains("flowline_response_cache_hits_total"), "{m}");
    assert!(
        m.lines().any(
            |l| l.starts_with("flowline_response_cache_invalidations_total") && !l.ends_with(" 0")
        ),
        "{m}"
    );

    // Authentication runs before the cache: a logged-out token gets nothing.
    assert_eq!(
        post(&a, &s.url("/api/v1/auth/logout"), Some(&ta), json!({})).0,
        204
    );
    assert_eq!(get(&a, &me, &ta).0, 401);
    assert!(s.terminate().success());
}
