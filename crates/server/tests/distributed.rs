//! Distributed mode end to end: three `flowline serve` processes sharing
//! PostgreSQL, Redis and NATS JetStream, behind nginx running the
//! repository's own `deploy/nginx/flowline.conf`. Sessions and rate limits
//! hold across instances; 500 orders placed through nginx all complete once
//! while one instance is SIGKILLed and the NATS server restarts; realtime
//! messages still cross instances afterwards, directly and through nginx.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const NATS: &str = "/usr/sbin/nats-server";
const NGINX: &str = "/usr/sbin/nginx";
const ORDERS: usize = 500;
/// Concurrent shoppers placing the orders.
const SHOPPERS: usize = 6;
const KILL_AFTER: usize = 150;
const NATS_RESTART_AFTER: usize = 300;
/// Logins one client address gets (the rate is 1 per minute after that).
const AUTH_BURST: usize = 5;
const PW: &str = "a long enough passphrase";

// ---------------------------------------------------------------------------
// Helper processes: nats-server and nginx.

/// A child process that never outlives the test: SIGTERM, then SIGKILL.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    /// SIGTERM and wait for the exit.
    fn stop(&mut self) {
        if self.child.try_wait().expect("wait").is_some() {
            return;
        }
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not exit within 15 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: nginx's workers outlive a SIGKILLed master.
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's directory (node logs `a.log`, `b.log`, `c.log`, `nats.log`,
/// `nginx/`), kept when the test fails.
struct Workdir(Option<tempfile::TempDir>);

impl Workdir {
    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = self.0.take().unwrap().keep();
            eprintln!("logs kept in {}", kept.display());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn append_to(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn occurrences(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// nats-server with JetStream on `port`, its store in `dir/nats`; its log is
/// `dir/nats.log` (appended to across restarts).
fn start_nats(dir: &Path, port: u16) -> Proc {
    let log = dir.join("nats.log");
    let ready_before = occurrences(&log, "Server is ready");
    let child = Command::new(NATS)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.join("nats"))
        .stdin(Stdio::null())
        .stdout(append_to(&log))
        .stderr(append_to(&log))
        .spawn()
        .expect("spawn nats-server");
    let mut p = Proc {
        child,
        name: "nats-server",
    };
    wait_until("nats-server ready", Duration::from_secs(20), || {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!(
                "nats-server exited ({st}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        occurrences(&log, "Server is ready") > ready_before
    });
    p
}

/// nginx with `deploy/nginx/flowline.conf`, its upstreams rewritten to the
/// nodes and its listener to `port`, inside a minimal main config in `dir`.
fn start_nginx(dir: &Path, nodes: &[&Server], port: u16) -> Proc {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx/flowline.conf");
    let mut conf =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (i, node) in nodes.iter().enumerate() {
        let from = format!("server 127.0.0.1:808{} ", i + 1);
        assert_eq!(conf.matches(&from).count(), 1, "`{from}` in {conf}");
        let addr = node.base.trim_start_matches("http://");
        conf = conf.replace(&from, &format!("server {addr} "));
    }
    assert_eq!(conf.matches("listen 8080;").count(), 1, "{conf}");
    let conf = conf.replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
    let dir = dir.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("flowline.conf"), conf).unwrap();
    // As root, workers would run as `nobody` and could not use the temp dirs.
    // SAFETY: no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;"
    } else {
        ""
    };
    let d = dir.display();
    let main = format!(
        "{user}
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$upstream_addr $upstream_status $status $request_method $uri';
    access_log {d}/access.log upstreams;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/flowline.conf;
}}
"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let child = Command::new(NGINX)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(append_to(&dir.join("stdout.log")))
        .stderr(append_to(&dir.join("stdout.log")))
        .spawn()
        .expect("spawn nginx");
    let mut p = Proc {
        child,
        name: "nginx",
    };
    let health = format!("http://127.0.0.1:{port}/healthz");
    wait_until("nginx up", Duration::from_secs(20), || {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!(
                "nginx exited ({st}):\n{}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        matches!(agent().get(&health).call(), Ok(r) if r.status() == 200)
    });
    p
}

// ---------------------------------------------------------------------------
// PostgreSQL, read directly (every instance's schemas are in one database).

fn psql(url: &str, sql: &str) -> Vec<Vec<String>> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-F",
            "\t",
            "-d",
            url,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run psql (the PostgreSQL client)");
    assert!(
        out.status.success(),
        "psql failed: {}\n{sql}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

fn psql_count(url: &str, sql: &str) -> i64 {
    let rows = psql(url, sql);
    rows[0][0]
        .parse()
        .unwrap_or_else(|_| panic!("{rows:?}: {sql}"))
}

/// Polls `f` every `every` until it is `Ok`; on the deadline, panics with its
/// last explanation.
fn eventually(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {why}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP. Every auth request of the test's own comes from an address of its
// own (X-Forwarded-For, believed from 127.0.0.1), so the strict auth limit
// counts only what the rate-limit scenario sends from 203.0.113.7.

static NEXT_IP: AtomicUsize = AtomicUsize::new(1);

fn own_ip() -> String {
    let n = NEXT_IP.fetch_add(1, SeqCst);
    assert!(n < 255, "out of test addresses");
    format!("198.51.100.{n}")
}

fn auth_post(base: &str, path: &str, token: Option<&str>, body: Value, ip: &str) -> (u16, Value) {
    let mut req = agent()
        .post(&format!("{base}{path}"))
        .set("x-forwarded-for", ip);
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
    }
    let (st, _, b) = call(req, Some(&body.to_string()));
    (st, if b.is_empty() { Value::Null } else { json(&b) })
}

fn register_as(base: &str, email: &str) -> String {
    let (st, b) = auth_post(
        base,
        "/api/v1/auth/register",
        None,
        json!({ "email": email, "password": PW, "display_name": "Shopper" }),
        &own_ip(),
    );
    assert_eq!(st, 201, "{b}");
    b["access_token"].as_str().unwrap().to_owned()
}

fn login_as(base: &str, email: &str, pw: &str, ip: &str) -> (u16, Value) {
    auth_post(
        base,
        "/api/v1/auth/login",
        None,
        json!({ "email": email, "password": pw }),
        ip,
    )
}

fn field(v: &Value, f: &str) -> String {
    v[f].as_str()
        .unwrap_or_else(|| panic!("no {f} in {v}"))
        .to_owned()
}

/// GET /users/me: (status, body).
fn me(base: &str, token: &str) -> (u16, Value) {
    let (st, _, b) = send(agent().get(&format!("{base}/api/v1/users/me")), token, None);
    (st, b)
}

fn ok(base: &str, method: &str, path: &str, token: &str, body: Option<Value>, want: u16) -> Value {
    let (st, _, b) = send(
        agent().request(method, &format!("{base}{path}")),
        token,
        body,
    );
    assert_eq!(st, want, "{method} {path}: {b}");
    b
}

/// A request that may meet a dead instance: transport errors come back as
/// `Err`, every status as `Ok` (the body as text: nginx's 502 is HTML).
fn attempt(
    req: ureq::Request,
    token: &str,
    body: &Value,
) -> Result<(u16, Option<String>, String), String> {
    let res = req
        .set("authorization", &format!("Bearer {token}"))
        .set("content-type", "application/json")
        .send_string(&body.to_string());
    match res {
        Ok(r) | Err(ureq::Error::Status(_, r)) => {
            let st = r.status();
            let replayed = r.header("idempotent-replayed").map(str::to_owned);
            Ok((st, replayed, r.into_string().unwrap_or_default()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// What the shoppers saw.
#[derive(Default)]
struct Tally {
    accepted: AtomicUsize,
    /// Requests sent again after a transport error or a 502/503/504.
    retried: AtomicUsize,
    /// Orders whose retry was answered from the first attempt's record.
    replayed: AtomicUsize,
}

struct Shop {
    front: String,
    user: String,
    address: String,
    card: String,
    product: String,
}

impl Shop {
    /// Cart with one item, then the order under `key`, retrying across a dead
    /// instance: the order with the same key (so never twice), the cart from
    /// scratch (adding an item is not idempotent). Returns the order id.
    fn checkout(&self, key: &str, tally: &Tally) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let retry = |what: &str, why: String| {
            tally.retried.fetch_add(1, SeqCst);
            assert!(
                Instant::now() < deadline,
                "{key}: {what} kept failing: {why}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let carts = format!("{}/api/v1/carts", self.front);
        let cart = loop {
            let id = match attempt(agent().post(&carts), &self.user, &json!({})) {
                Ok((201, _, b)) => field(&json(&b), "id"),
                Ok((st @ 502..=504, _, b)) => {
                    retry("cart", format!("{st} {b}"));
                    continue;
                }
                Ok((st, _, b)) => panic!("{key}: POST /carts {st}: {b}"),
                Err(e) => {
                    retry("cart", e);
                    continue;
                }
            };
            let items = format!("{carts}/{id}/items");
            let item = json!({ "product_id": self.product, "quantity": 1 });
            match attempt(agent().post(&items), &self.user, &item) {
                Ok((200, _, _)) => break id,
                Ok((st @ 502..=504, _, b)) => retry("cart item", format!("{st} {b}")),
                Ok((st, _, b)) => panic!("{key}: POST {items} {st}: {b}"),
                Err(e) => retry("cart item", e),
            }
        };
        let order = json!({ "cart_id": cart, "shipping_address_id": self.address,
            "payment": { "method": "credit_card", "card_token": self.card } });
        let orders = format!("{}/api/v1/orders", self.front);
        loop {
            let req = agent().post(&orders).set("idempotency-key", key);
            match attempt(req, &self.user, &order) {
                Ok((202, replayed, b)) => {
                    tally.accepted.fetch_add(1, SeqCst);
                    if replayed.as_deref() == Some("true") {
                        tally.replayed.fetch_add(1, SeqCst);
                    }
                    return field(&json(&b), "id");
                }
                Ok((st @ 502..=504, _, b)) => retry("order", format!("{st} {b}")),
                Ok((st, _, b)) => panic!("{key}: POST /orders {st}: {b}"),
                Err(e) => retry("order", e),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// WebSocket clients (as in messaging.rs).

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    async fn connect(base: &str, token: &str) -> Client {
        let url = format!("{base}/api/v1/ws").replacen("http://", "ws://", 1);
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let mut c = Client { ws };
        let ready = c.next().await.expect("ready frame");
        assert_eq!(ready["type"], "ready", "{ready}");
        c
    }

    async fn next(&mut self) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match m.ok()? {
                Ws::Text(t) => return Some(serde_json::from_str(&t).expect("frames are JSON")),
                Ws::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Subscribes to `channel`; then a task reads the socket for good (which
    /// also answers the server's pings) and hands every frame over.
    async fn subscribe_and_follow(
        mut self,
        channel: &str,
    ) -> (i64, tokio::sync::mpsc::UnboundedReceiver<Value>) {
        self.ws
            .send(Ws::text(
                json!({"v": 1, "type": "subscribe", "channel_id": channel, "ref": "s1"})
                    .to_string(),
            ))
            .await
            .expect("send");
        let last_seq = loop {
            let f = self.next().await.expect("a `subscribed` frame");
            assert_ne!(f["type"], "error", "{f}");
            if f["type"] == "subscribed" {
                break f["last_seq"].as_i64().unwrap();
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(m)) = self.ws.next().await {
                if let Ws::Text(t) = m {
                    let v: Value = serde_json::from_str(&t).expect("frames are JSON");
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        (last_seq, rx)
    }
}

/// The next `n` message frames a follower got (within 15 s each).
async fn messages(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>,
    n: usize,
) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = match tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(format!(
                    "{} of {n} messages, then the socket closed",
                    out.len()
                ))
            }
            Err(_) => {
                return Err(format!(
                    "{} of {n} messages, then nothing for 15 s",
                    out.len()
                ))
            }
        };
        if f["type"] == "message" {
            out.push(f);
        }
    }
    Ok(out)
}

/// Consumer-group partitions whose owner on a live node (A or C) stopped
/// renewing its lease: a worker that is stuck, not dead.
fn stalled_partitions(pg: &str, p: &str) -> Vec<String> {
    psql(
        pg,
        &format!(
            "SELECT group_name || ' ' || topic || '/' || partition_no || ' ' || owner \
             || ' expired ' || to_timestamp(expires_at / 1e6)::time \
             FROM {p}eventlog.log_leases WHERE owner NOT LIKE 'b-%' \
             AND expires_at < (extract(epoch FROM clock_timestamp()) * 1e6) ORDER BY 1"
        ),
    )
    .into_iter()
    .map(|r| r.join(" "))
    .collect()
}

/// A workspace of `owner` with `member` in it; its #general channel.
fn workspace(base: &str, owner: &str, member: &str) -> String {
    let w = ok(
        base,
        "POST",
        "/api/v1/workspaces",
        owner,
        Some(json!({"name": "Acme"})),
        201,
    );
    let id = field(&w, "id");
    let url = format!("{base}/api/v1/workspaces/{id}/members/{member}");
    // The directory learns users from user.events: retry until it has.
    wait_until("member added", Duration::from_secs(20), || {
        send(agent().put(&url), owner, Some(json!({"role": "member"}))).0 == 200
    });
    let chans = ok(
        base,
        "GET",
        &format!("/api/v1/workspaces/{id}/channels"),
        owner,
        None,
        200,
    );
    chans["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "general")
        .map(|c| field(c, "id"))
        .expect("#general")
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_behind_nginx_on_postgres_redis_and_nats() {
    let (Ok(pg), Ok(redis)) = (
        std::env::var("FLOWLINE_TEST_POSTGRES_URL"),
        std::env::var("FLOWLINE_TEST_REDIS_URL"),
    ) else {
        eprintln!(
            "FLOWLINE_TEST_POSTGRES_URL and FLOWLINE_TEST_REDIS_URL are not both set: \
             distributed mode not tested"
        );
        return;
    };
    for bin in [NATS, NGINX] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: the distributed test needs nats-server and nginx \
             (Debian: apt-get install nats-server nginx)"
        );
    }
    let t0 = Instant::now();
    let dir = Workdir(Some(tempfile::tempdir().unwrap()));
    let id = uuid::Uuid::now_v7().simple().to_string();
    let schema_prefix = format!("d{id}_");
    let nats_port = free_port();
    let mut nats = start_nats(dir.path(), nats_port);
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let bus_prefix = format!("d{id}");
    let key_prefix = format!("d{id}:");
    let auth_burst = AUTH_BURST.to_string();
    let shared: Vec<(&str, &str)> = vec![
        ("FLOWLINE__DATABASE__URL", &pg),
        ("FLOWLINE__DATABASE__SCHEMA_PREFIX", &schema_prefix),
        // Three nodes of ~13 pools within PostgreSQL's 100 connections.
        ("FLOWLINE__DATABASE__MAX_CONNECTIONS", "2"),
        ("FLOWLINE__BUS__URL", &nats_url),
        ("FLOWLINE__BUS__PREFIX", &bus_prefix),
        ("FLOWLINE__CACHE__URL", &redis),
        ("FLOWLINE__CACHE__KEY_PREFIX", &key_prefix),
        ("FLOWLINE__SERVER__TRUSTED_PROXIES", r#"["127.0.0.1"]"#),
        // A dead node's partitions and sagas move on 2 s after it stops renewing.
        ("FLOWLINE__EVENTLOG__LEASE", "2s"),
        ("FLOWLINE__ORDERS__SAGA_LEASE", "2s"),
        ("FLOWLINE__NOTIFICATIONS__SEND_LEASE", "3s"),
        // Production's attempts before a dead letter (base_env has 2).
        ("FLOWLINE__EVENTLOG__MAX_ATTEMPTS", "5"),
        ("FLOWLINE__EVENTLOG__BACKOFF_MAX", "500ms"),
        // All orders come from one address and one shopper.
        ("FLOWLINE__RATELIMIT__IP_PER_MINUTE", "1000000"),
        ("FLOWLINE__RATELIMIT__IP_BURST", "100000"),
        ("FLOWLINE__RATELIMIT__USER_PER_MINUTE", "1000000"),
        ("FLOWLINE__RATELIMIT__USER_BURST", "100000"),
        // The strict one, shared through Redis: AUTH_BURST, then 1 a minute.
        ("FLOWLINE__RATELIMIT__AUTH_PER_MINUTE", "1"),
        ("FLOWLINE__RATELIMIT__AUTH_BURST", &auth_burst),
        ("FLOWLINE__PAYMENTS__FRAUD_MAX_PER_USER", "100000"),
        ("FLOWLINE__PAYMENTS__FRAUD_MAX_PER_CARD", "100000"),
        // Provider calls take time, as real ones do.
        ("FLOWLINE__PAYMENTS__SANDBOX_LATENCY", "50ms"),
        ("FLOWLINE__PAYMENTS__IDEMPOTENCY_LEASE", "1s"),
        ("FLOWLINE__PAYMENTS__IDEMPOTENCY_WAIT", "3s"),
    ];
    let node_env = |n: &'static str| {
        let mut e = shared.clone();
        e.push(("FLOWLINE__SERVER__NODE_ID", n));
        e
    };
    let a = Server::start(&dir.path().join("a"), &node_env("a"));
    // B is slow to confirm stock, so it always holds sagas mid-flight (each
    // under its lease: the step's 5 s timeout plus the 2 s margin) when it
    // is killed; A and C must finish them.
    let mut b_env = node_env("b");
    b_env.push((
        "FLOWLINE__ORDERS__FAILPOINTS",
        "confirm_stock:do=delay:1500",
    ));
    let b = Server::start(&dir.path().join("b"), &b_env);
    let c = Server::start(&dir.path().join("c"), &node_env("c"));
    let nginx_port = free_port();
    let _nginx = start_nginx(dir.path(), &[&a, &b, &c], nginx_port);
    let front = format!("http://127.0.0.1:{nginx_port}");
    let (a_url, c_url) = (a.base.clone(), c.base.clone());
    let b_url = b.base.clone();
    let mut b = Some(b);
    let started = t0.elapsed();

    // 5 (plain requests): the front answers (where the orders went is
    // checked in its access log below).
    for _ in 0..6 {
        let (st, _, body) = call(agent().get(&format!("{front}/readyz")), None);
        assert_eq!(st, 200, "{body}");
    }

    // 1. Sessions are shared: a token from A works on B and C, a refresh on B
    // rotates for everyone, and a logout on C is seen by A and B at once.
    let dora = "dora@example.com";
    register_as(&a_url, dora);
    let (st, l1) = login_as(&a_url, dora, PW, &own_ip());
    assert_eq!(st, 200, "{l1}");
    let at1 = field(&l1, "access_token");
    for node in [&b_url, &c_url] {
        let (st, m) = me(node, &at1);
        assert_eq!((st, m["email"].as_str()), (200, Some(dora)), "{node}: {m}");
    }
    let (st, r1) = auth_post(
        &b_url,
        "/api/v1/auth/refresh",
        None,
        json!({ "refresh_token": field(&l1, "refresh_token") }),
        &own_ip(),
    );
    assert_eq!(st, 200, "{r1}");
    let at2 = field(&r1, "access_token");
    for node in [&a_url, &c_url] {
        assert_eq!(me(node, &at2).0, 200, "{node}");
    }
    // The first refresh token was used on B: presenting it on A is a reuse.
    let (st, e) = auth_post(
        &a_url,
        "/api/v1/auth/refresh",
        None,
        json!({ "refresh_token": field(&l1, "refresh_token") }),
        &own_ip(),
    );
    assert_eq!(
        (st, e["code"].as_str()),
        (401, Some("refresh_token_reused")),
        "{e}"
    );
    // That revoked the family everywhere; a fresh login, then logout on C.
    assert_eq!(me(&c_url, &at2).0, 401, "family revoked on C");
    let (st, l2) = login_as(&b_url, dora, PW, &own_ip());
    assert_eq!(st, 200, "{l2}");
    let at3 = field(&l2, "access_token");
    for node in [&a_url, &b_url, &c_url] {
        assert_eq!(me(node, &at3).0, 200, "{node}");
    }
    let (st, body) = auth_post(
        &c_url,
        "/api/v1/auth/logout",
        Some(&at3),
        json!({}),
        &own_ip(),
    );
    assert_eq!(st, 204, "{body}");
    // No waiting: A and B read the session from Redis on every request (and
    // their cached /users/me answer is not served either).
    for node in [&a_url, &b_url] {
        let (st, body) = me(node, &at3);
        assert_eq!(
            st, 401,
            "{node} still accepts a token logged out on C: {body}"
        );
    }
    let (st, _) = auth_post(
        &a_url,
        "/api/v1/auth/refresh",
        None,
        json!({ "refresh_token": field(&l2, "refresh_token") }),
        &own_ip(),
    );
    assert_eq!(st, 401, "the logged-out session's refresh token on A");

    // 2. The auth rate limit is one budget across the instances: 3 × burst
    // logins from one client address, round-robin over A, B, C.
    let mut answers = Vec::new();
    for i in 0..3 * AUTH_BURST {
        let node = [&a_url, &b_url, &c_url][i % 3];
        let (st, body) = login_as(node, dora, PW, "203.0.113.7");
        assert!(st == 200 || st == 429, "{st} {body}");
        if st == 429 {
            assert_eq!(body["code"], "rate_limited", "{body}");
        }
        answers.push((["a", "b", "c"][i % 3], st));
    }
    let allowed = answers.iter().filter(|(_, st)| *st != 429).count();
    assert_eq!(allowed, AUTH_BURST, "one budget for all three: {answers:?}");
    // Another address is not held up by it.
    assert_eq!(login_as(&c_url, dora, PW, &own_ip()).0, 200);

    // Messaging: Bob listens on A, directly, from before the kill and the
    // NATS restart until after them.
    let alice = register_as(&front, "alice@example.com");
    let bob = register_as(&front, "bob@example.com");
    let bob_id = field(&me(&front, &bob).1, "id");
    let general = workspace(&b_url, &alice, &bob_id);
    let (start_seq, mut bob_on_a) = Client::connect(&a_url, &bob)
        .await
        .subscribe_and_follow(&general)
        .await;

    // 3. The shop, set up through the front.
    let cli_env = node_env("cli");
    let cli_dir = dir.path().join("cli");
    let (ok_, _, err) = cli(
        &[
            "users",
            "create",
            "--email",
            "admin@example.com",
            "--password",
            "admin passphrase 42",
            "--admin",
            "--data-dir",
            cli_dir.to_str().unwrap(),
        ],
        &cli_env,
    );
    assert!(ok_, "{err}");
    let (st, l) = login_as(
        &front,
        "admin@example.com",
        "admin passphrase 42",
        &own_ip(),
    );
    assert_eq!(st, 200, "{l}");
    let admin = field(&l, "access_token");
    let shopper_email = "ana@example.com";
    let user = register_as(&front, shopper_email);
    let addr = ok(
        &front,
        "POST",
        "/api/v1/users/me/addresses",
        &user,
        Some(
            json!({ "name": "Ana Souza", "line1": "Rua das Flores, 100", "city": "São Paulo",
            "postal_code": "01310-100", "country": "BR" }),
        ),
        201,
    );
    let card = ok(
        &front,
        "POST",
        "/api/v1/payments/tokens",
        &user,
        Some(
            json!({ "number": "4242 4242 4242 4242", "exp_month": 12, "exp_year": 2040, "cvc": "123" }),
        ),
        201,
    );
    let mug = ok(
        &front,
        "POST",
        "/api/v1/products",
        &admin,
        Some(
            json!({ "sku": "MUG-1", "title": "Mug", "price": { "amount": 1250, "currency": "BRL" },
            "category": "tools", "brand": "acme" }),
        ),
        201,
    );
    let mug = field(&mug, "id");
    let stock = 2 * ORDERS as i64;
    ok(
        &front,
        "PUT",
        &format!("/api/v1/inventory/{mug}"),
        &admin,
        Some(json!({ "on_hand": stock })),
        200,
    );
    let shop = Arc::new(Shop {
        front: front.clone(),
        user,
        address: field(&addr, "id"),
        card: field(&card, "id"),
        product: mug.clone(),
    });
    let setup_done = t0.elapsed();

    // Shoppers place ORDERS orders through nginx. B dies after KILL_AFTER,
    // the NATS server restarts after NATS_RESTART_AFTER.
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let orders_started = Instant::now();
    let shoppers: Vec<_> = (0..SHOPPERS)
        .map(|_| {
            let (shop, tally, next) = (shop.clone(), tally.clone(), next.clone());
            std::thread::spawn(move || {
                let mut placed = Vec::new();
                loop {
                    let i = next.fetch_add(1, SeqCst);
                    if i >= ORDERS {
                        return placed;
                    }
                    placed.push((i, shop.checkout(&format!("dist-{i}"), &tally)));
                }
            })
        })
        .collect();
    let accepted_or_stopped = |n: usize| {
        let what = format!("{n} orders accepted");
        wait_until(&what, Duration::from_secs(90), || {
            tally.accepted.load(SeqCst) >= n || shoppers.iter().any(|t| t.is_finished())
        });
        tally.accepted.load(SeqCst) >= n
    };
    let sagas_sql = format!(
        "SELECT id, version, locked_until FROM {schema_prefix}orders.saga_instances
         WHERE status IN ('RUNNING', 'COMPENSATING') AND locked_until IS NOT NULL"
    );
    let leased = |rows: Vec<Vec<String>>| -> HashMap<String, (String, String)> {
        rows.into_iter()
            .map(|r| (r[0].clone(), (r[1].clone(), r[2].clone())))
            .collect()
    };
    let mut orphaned = HashSet::new();
    let mut retried_before_kill = 0;
    let mut killed_at = None;
    let mut kill_us = None;
    if accepted_or_stopped(KILL_AFTER) {
        retried_before_kill = tally.retried.load(SeqCst);
        b.take().unwrap().kill9();
        kill_us = Some(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros(),
        );
        let at_kill = leased(psql(&pg, &sagas_sql));
        killed_at = Some(orders_started.elapsed());
        // A second later (well within their leases): sagas leased at the
        // kill and untouched since are the dead node's; the live nodes' move
        // on within milliseconds.
        std::thread::sleep(Duration::from_secs(1));
        let later = leased(psql(&pg, &sagas_sql));
        orphaned = at_kill
            .into_iter()
            .filter(|(id, v)| later.get(id) == Some(v))
            .map(|(id, _)| id)
            .collect();
    }
    let mut nats_restarted_at = None;
    if accepted_or_stopped(NATS_RESTART_AFTER) {
        nats.stop();
        nats = start_nats(dir.path(), nats_port);
        nats_restarted_at = Some(orders_started.elapsed());
    }
    let mut order_ids = HashMap::new();
    for t in shoppers {
        for (i, id) in t.join().expect("a shopper failed") {
            order_ids.insert(i, id);
        }
    }
    let placing = orders_started.elapsed();
    assert!(killed_at.is_some() && nats_restarted_at.is_some());
    assert_eq!(order_ids.len(), ORDERS);
    let distinct: HashSet<&String> = order_ids.values().collect();
    assert_eq!(distinct.len(), ORDERS, "one order per idempotency key");

    // Every order's saga ends, each COMPLETED and its order CONFIRMED; B's
    // in-flight ones were finished by A or C once their leases ran out.
    let p = &schema_prefix;
    eventually(
        "every saga to finish",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let open = psql_count(
                &pg,
                &format!(
                    "SELECT count(*) FROM {p}orders.saga_instances
                 WHERE name = 'order.place' AND status IN ('RUNNING', 'COMPENSATING')"
                ),
            );
            (open == 0)
                .then_some(())
                .ok_or_else(|| format!("{open} still running"))
        },
    );
    let done = Instant::now();
    let sagas = psql(
        &pg,
        &format!(
            "SELECT s.status, o.status, count(*) FROM {p}orders.saga_instances s
             JOIN {p}orders.orders o ON o.id = s.id
             WHERE s.name = 'order.place' GROUP BY 1, 2"
        ),
    );
    assert_eq!(
        sagas,
        vec![vec![
            "COMPLETED".to_owned(),
            "CONFIRMED".to_owned(),
            ORDERS.to_string()
        ]],
        "(saga, order) statuses; failures: {:?}",
        psql(
            &pg,
            &format!(
                "SELECT id, status, failure FROM {p}orders.saga_instances
                 WHERE name = 'order.place' AND status <> 'COMPLETED' LIMIT 5"
            )
        )
    );
    let ours: HashSet<String> = psql(&pg, &format!("SELECT id FROM {p}orders.orders"))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(
        ours,
        distinct.into_iter().cloned().collect(),
        "no order besides ours"
    );
    assert!(
        orphaned.iter().all(|id| ours.contains(id)),
        "the dead node's sagas are orders"
    );
    assert!(
        !orphaned.is_empty(),
        "no saga was in flight on B when it was killed: the takeover went untested"
    );

    // Exactly once per consumer group: billing (ledger) and notifications
    // each acted once per order, whichever node held the partition. A
    // delivery B had claimed when it died is sent by A or C once its lease
    // (`notifications.send_lease`, 3 s here) lapses: nothing may stay held.
    let _ = kill_us.expect("B was killed");
    let deliveries = format!(
        "WITH d AS (
             SELECT vars::json->>'order_id' AS order_id, channel, status, FALSE AS held
             FROM {p}notifications.deliveries WHERE event_type = 'order.confirmed')"
    );
    let mut held = Vec::new();
    eventually(
        "billing and notifications to catch up",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let rows = psql(
                &pg,
                &format!(
                    "{deliveries}
                     SELECT (SELECT count(*) FROM {p}ledger.invoices),
                         (SELECT count(*) FROM d WHERE channel = 'email' AND status = 'SENT'),
                         (SELECT count(*) FROM d WHERE channel = 'in_app' AND status = 'SENT'),
                         (SELECT count(*) FROM d WHERE held),
                         (SELECT count(*) FROM {p}notifications.deliveries
                          WHERE status IN ('QUEUED', 'RETRY'))"
                ),
            );
            let n: Vec<i64> = rows[0].iter().map(|v| v.parse().unwrap()).collect();
            let want = ORDERS as i64;
            held = psql(
                &pg,
                &format!("{deliveries} SELECT order_id, channel FROM d WHERE held"),
            );
            let sent_or_held = |channel: &str, sent: i64| {
                sent + held.iter().filter(|h| h[1] == channel).count() as i64 >= want
            };
            (n[0] >= want
                && sent_or_held("email", n[1])
                && sent_or_held("in_app", n[2])
                && n[4] == n[3])
                .then_some(())
                .ok_or_else(|| {
                    let stalled = stalled_partitions(&pg, p);
                    format!(
                        "invoices {}, confirmation emails sent {}, in-app sent {}, \
                         deliveries pending {} of which {} held by the dead node; \
                         partitions of A and C not renewed: {stalled:?}",
                        n[0], n[1], n[2], n[4], n[3]
                    )
                })
        },
    );
    let caught_up = done.elapsed();
    // Per order: payments, capture entries, invoices; confirmation
    // deliveries, emails and in-app notes.
    let per_order = psql(
        &pg,
        &format!(
            "{deliveries}
             SELECT o.id, o.number,
                (SELECT count(*) FROM {p}payments.transactions t
                  WHERE t.order_id = o.id AND t.status = 'CAPTURED'),
                (SELECT count(*) FROM {p}payments.transactions t
                  JOIN {p}ledger.journal j ON j.reference = 'capture:' || t.id
                  WHERE t.order_id = o.id),
                (SELECT count(*) FROM {p}payments.transactions t
                  JOIN {p}ledger.invoices i ON i.payment_id = t.id
                  WHERE t.order_id = o.id),
                (SELECT count(*) FROM d WHERE d.order_id = o.id AND channel = 'email'),
                (SELECT count(*) FROM d WHERE d.order_id = o.id AND channel = 'in_app'),
                (SELECT count(*) FROM {p}notifications.mailbox m
                  WHERE m.subject = 'Order ' || o.number || ' confirmed'
                    AND m.to_address = '{shopper_email}')
                  + (SELECT count(*) FROM d WHERE d.order_id = o.id AND channel = 'email' AND held),
                (SELECT count(*) FROM {p}notifications.in_app_notifications n
                  WHERE n.kind = 'order_confirmed' AND n.data::json->>'order_id' = o.id)
                  + (SELECT count(*) FROM d WHERE d.order_id = o.id AND channel = 'in_app' AND held),
                (SELECT coalesce(max(c), 0) FROM (SELECT count(*) AS c FROM d
                  WHERE d.order_id = o.id GROUP BY channel) x)
             FROM {p}orders.orders o"
        ),
    );
    assert_eq!(per_order.len(), ORDERS);
    let wrong: Vec<&Vec<String>> = per_order
        .iter()
        .filter(|r| r[2..].iter().any(|n| n != "1"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} orders without exactly one (captured payment, capture entry, invoice, email \
         delivery, in-app delivery, email sent or held, in-app note or held, deliveries per \
         channel), e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    let totals = psql(
        &pg,
        &format!(
            "SELECT (SELECT count(*) FROM {p}payments.transactions),
                    (SELECT count(*) FROM {p}ledger.journal),
                    (SELECT count(*) FROM {p}ledger.invoices),
                    (SELECT count(*) FROM {p}notifications.deliveries WHERE status = 'DEAD'),
                    (SELECT count(*) FROM {p}eventlog.log_dead_letters)"
        ),
    );
    // The relays published everything, NATS restart or not.
    let outboxes: Vec<String> = psql(
        &pg,
        &format!(
            "SELECT table_schema FROM information_schema.tables
             WHERE table_name = 'outbox' AND table_schema LIKE '{p}%' ORDER BY 1"
        ),
    )
    .into_iter()
    .map(|r| format!("SELECT '{0}', count(*) FROM {0}.outbox", r[0]))
    .collect();
    assert!(outboxes.len() >= 8, "{outboxes:?}");
    eventually(
        "every outbox relayed",
        Duration::from_secs(10),
        Duration::from_millis(250),
        || {
            let left: Vec<Vec<String>> = psql(&pg, &outboxes.join(" UNION ALL "))
                .into_iter()
                .filter(|r| r[1] != "0")
                .collect();
            left.is_empty()
                .then_some(())
                .ok_or_else(|| format!("{left:?}"))
        },
    );
    let n = ORDERS.to_string();
    assert_eq!(
        totals[0],
        [n.as_str(), &n, &n, "0", "0"],
        "(payments, journal entries, invoices, dead deliveries, dead letters)"
    );
    let level = ok(
        &front,
        "GET",
        &format!("/api/v1/inventory/{mug}"),
        &admin,
        None,
        200,
    );
    assert_eq!(
        (level["on_hand"].as_i64(), level["reserved"].as_i64()),
        (Some(stock - ORDERS as i64), Some(0)),
        "{level}"
    );

    // nginx spread the orders over the three and sent nothing to B after it
    // died except the attempts that found it dead.
    let access = std::fs::read_to_string(dir.path().join("nginx/access.log")).unwrap();
    let mut per_upstream: HashMap<&str, usize> = HashMap::new();
    for line in access.lines().filter(|l| l.contains("POST /api/v1/orders")) {
        if let Some(up) = line.split(' ').next() {
            *per_upstream.entry(up.trim_end_matches(',')).or_default() += 1;
        }
    }
    for node in [&a_url, &b_url, &c_url] {
        let addr = node.trim_start_matches("http://");
        assert!(
            per_upstream.get(addr).copied().unwrap_or(0) > 0,
            "no order went to {addr}: {per_upstream:?}"
        );
    }

    // 4. After the kill and the NATS restart, Bob's socket on A (open since
    // before them) gets what Alice posts through C; 5. so does a socket
    // through nginx.
    let (via_front_seq, mut bob_via_front) = Client::connect(&front, &bob)
        .await
        .subscribe_and_follow(&general)
        .await;
    for i in 0..3 {
        ok(
            &c_url,
            "POST",
            &format!("/api/v1/channels/{general}/messages"),
            &alice,
            Some(json!({ "body": format!("after the storm {i}") })),
            201,
        );
    }
    for (rx, from) in [
        (&mut bob_on_a, start_seq),
        (&mut bob_via_front, via_front_seq),
    ] {
        let got = messages(rx, 3).await.unwrap_or_else(|e| {
            panic!(
                "{e}; consumer partitions of A and C not renewed: {:?}",
                stalled_partitions(&pg, p)
            )
        });
        let seqs: Vec<i64> = got.iter().map(|f| f["seq"].as_i64().unwrap()).collect();
        assert_eq!(seqs, (from + 1..=from + 3).collect::<Vec<_>>(), "{got:?}");
        assert_eq!(got[2]["message"]["body"], "after the storm 2");
    }

    let took_over = [&a, &c]
        .iter()
        .map(|s| occurrences(&s.data_dir.with_extension("log"), "partition taken over"))
        .sum::<usize>();
    let rate = ORDERS as f64 / placing.as_secs_f64();
    let (orphans, held_n) = (orphaned.len(), held.len());
    let (retried, replayed) = (tally.retried.load(SeqCst), tally.replayed.load(SeqCst));
    let sagas_after = done.duration_since(orders_started + placing);
    let setup = setup_done - started;
    let total = t0.elapsed();
    eprintln!(
        "distributed: {ORDERS} orders through nginx in {placing:.1?} ({rate:.0} orders/s, \
         {SHOPPERS} shoppers); B killed at {killed_at:.1?} holding {orphans} sagas, NATS \
         restarted at {nats_restarted_at:.1?}; {retried} requests retried \
         ({retried_before_kill} before the kill), {replayed} orders answered from their first \
         attempt; all sagas done {sagas_after:.1?} after the last order was placed, billing and \
         notifications {caught_up:.1?} later; {took_over} consumer partitions taken over with \
         unacknowledged deliveries; {held_n} confirmation deliveries held by the dead node \
         {held:?}; orders per upstream {per_upstream:?}; start-up {started:.1?}, setup \
         {setup:.1?}, total {total:.1?}"
    );
    drop(nats);
}
