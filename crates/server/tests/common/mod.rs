//! Test harness: runs the real `flowline` binary on 127.0.0.1:0 with its own
//! data directory, and talks to it over HTTP.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_flowline");

pub struct Server {
    pub child: Child,
    pub base: String,
    pub data_dir: PathBuf,
}

/// Environment every test server gets: probe context on, fast retries, JSON logs.
pub fn base_env() -> Vec<(String, String)> {
    [
        ("FLOWLINE__PROBE__ENABLED", "true"),
        ("FLOWLINE__LOG__FORMAT", "json"),
        ("FLOWLINE__EVENTLOG__BACKOFF_BASE", "10ms"),
        ("FLOWLINE__EVENTLOG__BACKOFF_MAX", "50ms"),
        ("FLOWLINE__EVENTLOG__MAX_ATTEMPTS", "2"),
        // Story tests log in often; the rate-limit tests set their own limits.
        ("FLOWLINE__RATELIMIT__AUTH_PER_MINUTE", "100000"),
        ("FLOWLINE__RATELIMIT__AUTH_BURST", "1000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A test server never outlives its test, even one that fails.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("FLOWLINE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data_dir.with_extension("log"))
                    .expect("server log file"),
            ));
        for (k, v) in base_env() {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn flowline");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        reader.read_line(&mut line).expect("read listen line");
        let base = line
            .trim()
            .strip_prefix("flowline listening on ")
            .unwrap_or_else(|| {
                let log =
                    std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default();
                panic!("server did not start: {line:?}\n{log}")
            })
            .to_owned();
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        Server {
            child,
            base,
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }
}

/// A client with a fresh connection per request. The server answers some
/// requests (401, 403, 413) before reading their bodies and then closes the
/// connection, as HTTP allows; a pooled client would send its next POST down
/// that closed connection and fail where a real client would retry.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_idle_connections(0)
        .build()
}

/// (status, content-type, body) without treating 4xx/5xx as errors.
pub fn call(req: ureq::Request, body: Option<&str>) -> (u16, String, String) {
    let res = match body {
        Some(b) => req.set("content-type", "application/json").send_string(b),
        None => req.call(),
    };
    let res = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = res.status();
    let ct = res.header("content-type").unwrap_or("").to_owned();
    (status, ct, res.into_string().unwrap_or_default())
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Runs a `flowline` CLI command; returns (success, stdout, stderr).
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("FLOWLINE_LOG")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run flowline");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// An admin's access token: creates `admin@example.com` through the CLI (if it
/// is not there yet) and logs in.
pub fn admin_token(s: &Server, data: &Path) -> String {
    admin_token_env(s, data, &[])
}

/// [`admin_token`] for a server started with `env` (e.g. on PostgreSQL).
pub fn admin_token_env(s: &Server, data: &Path, env: &[(&str, &str)]) -> String {
    let (ok, _, err) = cli(
        &[
            "users",
            "create",
            "--email",
            "admin@example.com",
            "--password",
            "admin passphrase 42",
            "--admin",
            "--data-dir",
        ]
        .into_iter()
        .chain([data.to_str().unwrap()])
        .collect::<Vec<_>>(),
        env,
    );
    assert!(ok || err.contains("already exists"), "{err}");
    let body =
        serde_json::json!({ "email": "admin@example.com", "password": "admin passphrase 42" })
            .to_string();
    let (st, _, b) = call(agent().post(&s.url("/api/v1/auth/login")), Some(&body));
    assert_eq!(st, 200, "{b}");
    json(&b)["access_token"].as_str().unwrap().to_owned()
}

/// (status, `idempotent-replayed` header, body).
pub fn send(
    req: ureq::Request,
    token: &str,
    body: Option<serde_json::Value>,
) -> (u16, Option<String>, serde_json::Value) {
    let req = req.set("authorization", &format!("Bearer {token}"));
    let res = match body {
        Some(b) => req
            .set("content-type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let res = match res {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = res.status();
    let replayed = res.header("idempotent-replayed").map(str::to_owned);
    let text = res.into_string().unwrap_or_default();
    let v = if text.is_empty() {
        serde_json::Value::Null
    } else {
        json(&text)
    };
    (status, replayed, v)
}

/// (status, the response's `header`, body) of a JSON request, signed in or not.
pub fn send_reading(
    req: ureq::Request,
    token: Option<&str>,
    body: Option<serde_json::Value>,
    header: &str,
) -> (u16, Option<String>, serde_json::Value) {
    let req = match token {
        Some(t) => req.set("authorization", &format!("Bearer {t}")),
        None => req,
    };
    let res = match body {
        Some(b) => req
            .set("content-type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let res = match res {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = res.status();
    let value = res.header(header).map(str::to_owned);
    let text = res.into_string().unwrap_or_default();
    let v = if text.is_empty() {
        serde_json::Value::Null
    } else {
        json(&text)
    };
    (status, value, v)
}

pub fn register(s: &Server, email: &str) -> String {
    let body = serde_json::json!({ "email": email, "password": "a long enough passphrase", "display_name": "Shopper" });
    let (st, _, b) = call(
        agent().post(&s.url("/api/v1/auth/register")),
        Some(&body.to_string()),
    );
    assert_eq!(st, 201, "{b}");
    json(&b)["access_token"].as_str().unwrap().to_owned()
}

pub fn product(s: &Server, admin: &str, sku: &str, price: i64, currency: &str) -> String {
    let body = serde_json::json!({
        "sku": sku, "title": format!("Product {sku}"), "price": { "amount": price, "currency": currency },
        "category": "tools", "brand": "acme",
    });
    let (st, _, p) = send(agent().post(&s.url("/api/v1/products")), admin, Some(body));
    assert_eq!(st, 201, "{p}");
    p["id"].as_str().unwrap().to_owned()
}

pub fn set_stock(s: &Server, admin: &str, product: &str, n: i64) -> serde_json::Value {
    let url = s.url(&format!("/api/v1/inventory/{product}"));
    let (st, _, level) = send(
        agent().put(&url),
        admin,
        Some(serde_json::json!({ "on_hand": n })),
    );
    assert_eq!(st, 200, "{level}");
    level
}

pub fn tokenize(s: &Server, user: &str, number: &str) -> String {
    let body =
        serde_json::json!({ "number": number, "exp_month": 12, "exp_year": 2040, "cvc": "123" });
    let (st, _, t) = send(
        agent().post(&s.url("/api/v1/payments/tokens")),
        user,
        Some(body),
    );
    assert_eq!(st, 201, "{t}");
    assert!(
        !t.to_string().contains(&number[4..12]),
        "the number leaked: {t}"
    );
    t["id"].as_str().unwrap().to_owned()
}
