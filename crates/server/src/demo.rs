//! `flowline demo`: drives every flow through the public HTTP/WebSocket API
//! — register, login, search, an order that succeeds and one that is
//! compensated, chat, a notification — and prints, per flow, the sequence
//! diagram of the trace it caused, then a summary. Against an embedded server
//! on a fresh temporary data dir, or a running one (`--url`). Any flow that
//! does not behave stops the demo with a one-line error naming the step, so
//! it doubles as a smoke test.

use crate::app::App;
use crate::config::Settings;
use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What `flowline demo` was asked to do.
pub struct Options {
    /// A running server; `None`: start an embedded one.
    pub url: Option<String>,
    /// Keep the embedded server's data dir (and print its path).
    pub keep: bool,
    /// An admin of the server at `url`.
    pub admin_email: Option<String>,
    pub admin_password: Option<String>,
}

const STEPS: usize = 8;
/// The endpoints whose hops the summary lists one by one.
const FLOW_ENDPOINTS: &[&str] = &[
    "POST /api/v1/auth/register",
    "POST /api/v1/auth/login",
    "GET /api/v1/search",
    "POST /api/v1/orders",
    "POST /api/v1/workspaces",
    "POST /api/v1/channels/{id}/messages",
];
/// Products generated into the embedded server's catalog, for search.
const SEEDED_PRODUCTS: u64 = 200;
const PASSWORD: &str = "correct horse battery staple";
const GOOD_CARD: &str = "4242 4242 4242 4242";
const DECLINED_CARD: &str = "4000 0000 0000 0002";

pub async fn run(settings: Settings, opts: Options) -> anyhow::Result<()> {
    // Errors only: the demo's own output is the report.
    let mut log = settings.log.clone();
    log.level = "error".into();
    crate::telemetry::init(&log, true);
    match opts.url.clone() {
        Some(url) => remote(url, opts).await,
        None => embedded(settings, opts).await,
    }
}

async fn remote(url: String, opts: Options) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/').to_owned();
    if !base.starts_with("http://") {
        bail!("--url must be http://HOST:PORT (got `{url}`)");
    }
    let api = Api::new(&base);
    // Reachable first: the commonest mistake, and the clearest error.
    api.get("/healthz", None)
        .with_context(|| format!("cannot reach a flowline server at {base}"))?;
    let (Some(email), Some(password)) = (opts.admin_email, opts.admin_password) else {
        bail!("a remote server needs its admin: pass --admin-email and --admin-password");
    };
    let admin = Admin { email, password };
    let header = format!("flowline demo: server at {base}");
    tokio::task::spawn_blocking(move || drive(api, admin, header, false))
        .await
        .map_err(|e| anyhow!("the demo panicked: {e}"))?
}

async fn embedded(mut settings: Settings, opts: Options) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("flowline-demo-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    settings.data_dir = dir.clone();
    settings.telemetry.traces = true;
    // Self-contained whatever flowline.toml says: a demo must never write its
    // users and orders into a real deployment's database, bus or cache.
    settings.database.url = "sqlite://".into();
    settings.bus.url = "embedded".into();
    settings.cache.url = "memory".into();
    let result = serve_and_drive(settings, &dir).await;
    if opts.keep {
        println!("data dir kept: {}", dir.display());
    } else if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("warning: cannot remove {}: {e}", dir.display());
        }
    }
    result
}

async fn serve_and_drive(settings: Settings, dir: &std::path::Path) -> anyhow::Result<()> {
    let app = App::start(settings)
        .await
        .context("starting the embedded server")?;
    let prepared = prepare(&app).await;
    let admin = match prepared {
        Ok(a) => a,
        Err(e) => {
            app.stop().await;
            return Err(e);
        }
    };
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            app.stop().await;
            return Err(anyhow!("cannot listen on 127.0.0.1: {e}"));
        }
    };
    let addr = listener.local_addr()?;
    let router = crate::cli::app_router(&app.state);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stop_rx.await;
        })
        .await
    });
    let base = format!("http://{addr}");
    let header = format!(
        "flowline demo: embedded server at {base}, data in {} ({SEEDED_PRODUCTS} products seeded)",
        dir.display()
    );
    let api = Api::new(&base);
    let driver = tokio::task::spawn_blocking(move || drive(api, admin, header, true));
    // Interrupted: still stop the server and remove the data dir.
    let result = tokio::select! {
        r = driver => r.map_err(|e| anyhow!("the demo panicked: {e}")).and_then(|r| r),
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let _ = stop_tx.send(());
    let mut server = server;
    if tokio::time::timeout(Duration::from_secs(5), &mut server)
        .await
        .is_err()
    {
        server.abort();
    }
    app.stop().await;
    result
}

/// The admin and the seeded catalog, in-process (as `flowline users create
/// --admin` and `flowline seed catalog` do).
async fn prepare(app: &App) -> anyhow::Result<Admin> {
    let ctx = flowline_http::RequestContext::detached();
    let problem = |e: flowline_http::ApiError| {
        anyhow!(
            "{}",
            e.0.detail.clone().unwrap_or_else(|| e.0.title.to_owned())
        )
    };
    let admin = Admin {
        email: "admin@example.com".into(),
        password: format!("demo-{}", uuid::Uuid::new_v4().simple()),
    };
    app.state
        .identity
        .create_user(&ctx, &admin.email, &admin.password, "Demo Admin", true)
        .await
        .map_err(problem)
        .context("creating the demo admin")?;
    let products = (0..SEEDED_PRODUCTS)
        .map(|i| flowline_catalog::seed::product(42, i))
        .collect();
    app.state
        .catalog
        .create_many(&ctx, products)
        .await
        .map_err(problem)
        .context("seeding the catalog")?;
    Ok(admin)
}

struct Admin {
    email: String,
    password: String,
}

// --- HTTP ---

struct Api {
    base: String,
    agent: ureq::Agent,
}

struct Resp {
    status: u16,
    trace: Option<String>,
    request_id: Option<String>,
    body: Value,
}

impl Resp {
    fn str(&self, k: &str) -> anyhow::Result<String> {
        self.body[k]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no `{k}` in {}", short(&self.body)))
    }
    fn trace(&self) -> anyhow::Result<String> {
        self.trace
            .clone()
            .ok_or_else(|| anyhow!("no x-trace-id header on the response"))
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s
    }
}

impl Api {
    fn new(base: &str) -> Api {
        // A fresh connection per request: the server may answer some requests
        // (401) before reading their bodies and then close the connection.
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(Duration::from_secs(15))
            .max_idle_connections(0)
            .build();
        Api {
            base: base.to_owned(),
            agent,
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Resp> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.set("authorization", &format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let res = match body {
            Some(b) => req
                .set("content-type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let res = match res {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(anyhow!("{method} {path}: {}", transport(&e))),
        };
        let status = res.status();
        let trace = res.header("x-trace-id").map(str::to_owned);
        let request_id = res.header("x-request-id").map(str::to_owned);
        let text = res.into_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Resp {
            status,
            trace,
            request_id,
            body,
        })
    }

    /// The call, which must answer one of `want`.
    fn expect(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
        want: &[u16],
    ) -> anyhow::Result<Resp> {
        let r = self.call(method, path, token, body, headers)?;
        if !want.contains(&r.status) {
            let why = r.body["detail"]
                .as_str()
                .or(r.body["title"].as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| short(&r.body));
            bail!("{method} {path} answered {}: {why}", r.status);
        }
        Ok(r)
    }

    fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<Resp> {
        self.expect("GET", path, token, None, &[], &[200])
    }

    fn post(&self, path: &str, token: &str, body: Value) -> anyhow::Result<Resp> {
        self.expect("POST", path, Some(token), Some(body), &[], &[200, 201])
    }
}

/// A transport error in a few words: the cause (`Connection refused (os
/// error 111)`) rather than ureq's whole story.
fn transport(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Transport(t) => match std::error::Error::source(t) {
            Some(cause) => cause.to_string(),
            None => t
                .message()
                .map_or_else(|| t.kind().to_string(), str::to_owned),
        },
        other => other.to_string(),
    }
    .replace('\n', " ")
}

// --- progress ---

struct Progress {
    tty: bool,
    step: usize,
    title: String,
    started: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            step: 0,
            title: String::new(),
            started: Instant::now(),
        }
    }

    fn begin(&mut self, step: usize, title: &str) {
        self.step = step;
        self.title = title.to_owned();
        self.started = Instant::now();
        if self.tty {
            self.draw("");
        } else {
            eprintln!("[{step}/{STEPS}] {title}");
        }
    }

    /// What the current step waits for (terminals only).
    fn note(&self, what: &str) {
        if self.tty {
            self.draw(what);
        }
    }

    fn draw(&self, what: &str) {
        let width = 24;
        let done = (self.step.saturating_sub(1)) * width / STEPS;
        let mut line = format!(
            "\r\x1b[2K[{}{}] {}/{STEPS} {}",
            "#".repeat(done),
            ".".repeat(width - done),
            self.step,
            self.title
        );
        if !what.is_empty() {
            line.push_str(&format!(
                " · {what} ({:.1}s)",
                self.started.elapsed().as_secs_f64()
            ));
        }
        // One terminal line, or the carriage return cannot redraw it.
        let line: String = line.chars().take(5 + 79).collect();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }

    /// Clears the bar before a step prints its report.
    fn clear(&self) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(b"\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

// --- the flows ---

struct Demo {
    api: Api,
    admin: String,
    progress: RefCell<Progress>,
    /// Unique per run, so the demo can run again against the same server.
    run: String,
}

struct Shopper {
    email: String,
    token: String,
    id: String,
    address: String,
}

fn drive(api: Api, admin: Admin, header: String, seeded: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let login = json!({ "email": admin.email, "password": admin.password });
    let r = api
        .expect("POST", "/api/v1/auth/login", None, Some(login), &[], &[200])
        .context("logging in as the admin")?;
    let demo = Demo {
        admin: r.str("access_token")?,
        api,
        progress: RefCell::new(Progress::new()),
        run: uuid::Uuid::new_v4().simple().to_string()[..6].to_owned(),
    };
    let products = demo.products().context("creating the demo products")?;
    println!("{header}");
    println!(
        "Each step drives the public API and prints the trace it caused as a Mermaid \
         sequence diagram (paste one into https://mermaid.live).\n"
    );
    let step = |n: usize, title: &str| {
        println!("── {n}/{STEPS} {title} ──");
        std::io::stdout().flush().ok();
        demo.progress.borrow_mut().begin(n, title);
    };
    let named = |n: usize, title: &'static str| {
        move |e: anyhow::Error| e.context(format!("step {n} ({title})"))
    };

    step(1, "register two users");
    let (ana, bruno) = demo.register().map_err(named(1, "register"))?;
    step(2, "log in, and one failed login");
    demo.login(&ana).map_err(named(2, "login"))?;
    step(3, "search the catalog");
    demo.search(&products.0, seeded)
        .map_err(named(3, "search"))?;
    step(4, "an order that succeeds");
    let order = demo
        .order_confirmed(&ana, &products.0)
        .map_err(named(4, "order"))?;
    step(5, "an order that is compensated");
    demo.order_compensated(&bruno, &products.1)
        .map_err(named(5, "compensated order"))?;
    step(6, "chat: a workspace, a channel, messages");
    demo.chat(&ana, &bruno).map_err(named(6, "chat"))?;
    step(7, "the notification");
    demo.notification(&ana, &order)
        .map_err(named(7, "notification"))?;
    step(8, "summary");
    demo.summary().map_err(named(8, "summary"))?;
    demo.progress.borrow().clear();
    println!(
        "\ndemo ok: {STEPS} steps in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// An order the notification step looks for.
struct Placed {
    id: String,
    number: String,
    trace: String,
}

impl Demo {
    fn note(&self, what: &str) {
        self.progress.borrow().note(what);
    }

    /// Ends a step: the diagram, then its result line.
    fn report(&self, mermaid: &str, result: &str) {
        self.progress.borrow().clear();
        print!("{mermaid}");
        if !mermaid.ends_with('\n') {
            println!();
        }
        println!("  => {result}\n");
        std::io::stdout().flush().ok();
    }

    fn admin_get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.api.get(path, Some(&self.admin))?.body)
    }

    /// Polls `f` until it gives a value or `within` passes.
    fn wait<T>(
        &self,
        what: &str,
        within: Duration,
        mut f: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + within;
        loop {
            self.note(what);
            if let Some(v) = f()? {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {}s waiting for {what}", within.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The trace `id` once `complete` holds and it stopped growing (spans are
    /// flushed every 0.5 s; consumers and sagas add theirs later).
    fn trace(
        &self,
        id: &str,
        what: &str,
        complete: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Value> {
        let path = format!("/api/v1/admin/traces/{id}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last: Option<(usize, Instant, Value)> = None;
        loop {
            self.note(&format!("collecting the trace ({what})"));
            let r = self
                .api
                .expect("GET", &path, Some(&self.admin), None, &[], &[200, 404])?;
            if r.status == 200 {
                let spans = r.body["spans"].as_array().cloned().unwrap_or_default();
                let n = spans.len();
                let done = complete(&spans);
                match &last {
                    Some((m, since, _)) if *m == n => {
                        if done && since.elapsed() >= Duration::from_millis(1200) {
                            return Ok(r.body);
                        }
                    }
                    _ => last = Some((n, Instant::now(), r.body.clone())),
                }
                if let Some(l) = last.as_mut() {
                    l.2 = r.body;
                }
                if Instant::now() >= deadline {
                    if done {
                        return Ok(last.map(|l| l.2).unwrap_or_default());
                    }
                    bail!("trace {id} never showed {what}");
                }
            } else if Instant::now() >= deadline {
                bail!("trace {id} never reached the trace store (is telemetry.traces on?)");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Two products of our own, stocked: one to sell, one to fail to sell.
    fn products(&self) -> anyhow::Result<(String, String)> {
        let mut ids = Vec::new();
        for (sku, title, price, category) in [
            ("MUG", "Flowline demo espresso mug", 1250, "kitchen"),
            ("LAMP", "Flowline demo desk lamp", 8990, "home"),
        ] {
            let body = json!({
                "sku": format!("DEMO-{sku}-{}", self.run.to_uppercase()),
                "title": title,
                "description": "Made by `flowline demo`.",
                "price": { "amount": price, "currency": "BRL" },
                "category": category, "brand": "flowline",
            });
            let p = self.api.post("/api/v1/products", &self.admin, body)?;
            let id = p.str("id")?;
            self.api.expect(
                "PUT",
                &format!("/api/v1/inventory/{id}"),
                Some(&self.admin),
                Some(json!({ "on_hand": 10 })),
                &[],
                &[200],
            )?;
            ids.push(id);
        }
        Ok((ids[0].clone(), ids[1].clone()))
    }

    fn register(&self) -> anyhow::Result<(Shopper, Shopper)> {
        let mut out = Vec::new();
        let mut first_trace = None;
        for (name, full) in [("ana", "Ana Souza"), ("bruno", "Bruno Lima")] {
            let email = format!("{name}.{}@example.com", self.run);
            let body = json!({ "email": email, "password": PASSWORD, "display_name": full });
            let r = self.api.expect(
                "POST",
                "/api/v1/auth/register",
                None,
                Some(body),
                &[],
                &[201],
            )?;
            let token = r.str("access_token")?;
            first_trace.get_or_insert(r.trace()?);
            let me = self.api.get("/api/v1/users/me", Some(&token))?;
            let address = json!({ "name": full, "line1": "Rua das Flores, 100", "city": "São Paulo",
                "postal_code": "01310-100", "country": "BR", "latitude": -23.561, "longitude": -46.656 });
            let a = self
                .api
                .post("/api/v1/users/me/addresses", &token, address)?;
            out.push(Shopper {
                email,
                id: me.str("id")?,
                token,
                address: a.str("id")?,
            });
        }
        let trace = first_trace.unwrap_or_default();
        // The welcome email is the last thing a registration causes.
        let t = self.trace(&trace, "the welcome email", |spans| {
            consumed_by(spans, "notifications")
        })?;
        let bruno = out.pop().expect("two users");
        let ana = out.pop().expect("two users");
        self.report(
            t["mermaid"].as_str().unwrap_or_default(),
            &format!(
                "registered {} and {} (201 each, with an address); user.registered reached {}",
                ana.email,
                bruno.email,
                consumers(&t).join(", ")
            ),
        );
        Ok((ana, bruno))
    }

    fn login(&self, ana: &Shopper) -> anyhow::Result<()> {
        let ok = self.api.expect(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": ana.email, "password": PASSWORD })),
            &[],
            &[200],
        )?;
        ok.str("access_token")?;
        let bad = self.api.expect(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": ana.email, "password": "not the password" })),
            &[],
            &[401],
        )?;
        let t = self.trace(&bad.trace()?, "the audit consumer", |spans| {
            consumed_by(spans, "audit")
        })?;
        let correlation = bad.request_id.clone();
        let record = self.wait("the audit record", Duration::from_secs(15), || {
            let page = self.admin_get("/api/v1/admin/audit?action=auth.login_failed&limit=50")?;
            Ok(page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| {
                    correlation
                        .as_deref()
                        .is_none_or(|c| r["correlation_id"] == c)
                })
                .cloned())
        })?;
        self.report(
            t["mermaid"].as_str().unwrap_or_default(),
            &format!(
                "login 200; wrong password 401, audited as seq {} {} (actor {}, outcome {})",
                record["seq"],
                record["action"].as_str().unwrap_or_default(),
                record["actor"].as_str().unwrap_or("-"),
                record["outcome"].as_str().unwrap_or_default()
            ),
        );
        Ok(())
    }

    fn search(&self, mug: &str, seeded: bool) -> anyhow::Result<()> {
        // The index is fed from catalog.events: poll until our mug is in it.
        let q = "espresso mug";
        let path = format!("/api/v1/search?q={}&per_page=50", q.replace(' ', "+"));
        let r = self.wait(
            "the index to have the demo mug",
            Duration::from_secs(20),
            || {
                let r = self.api.get(&path, None)?;
                let found = r.body["hits"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|h| h["product"]["id"] == mug);
                Ok(found.then_some(r))
            },
        )?;
        let t = self.trace(&r.trace()?, "the search", |spans| {
            spans.iter().any(|s| s["name"] == "request")
        })?;
        let hits = r.body["hits"].as_array().cloned().unwrap_or_default();
        let top: Vec<String> = hits
            .iter()
            .take(3)
            .map(|h| format!("\"{}\"", h["product"]["title"].as_str().unwrap_or_default()))
            .collect();
        let all = self.api.get("/api/v1/search?per_page=1", None)?;
        self.report(
            t["mermaid"].as_str().unwrap_or_default(),
            &format!(
                "\"{q}\": {} hit{} of {} indexed products{}; top {}",
                r.body["total"],
                if r.body["total"] == 1 { "" } else { "s" },
                all.body["total"],
                if seeded {
                    " (seeded catalog + demo)"
                } else {
                    ""
                },
                top.join(", ")
            ),
        );
        Ok(())
    }

    fn tokenize(&self, who: &Shopper, number: &str) -> anyhow::Result<String> {
        let body = json!({ "number": number, "exp_month": 12, "exp_year": 2040, "cvc": "123" });
        self.api
            .post("/api/v1/payments/tokens", &who.token, body)?
            .str("id")
    }

    /// Cart with `qty` of `product`, then `POST /orders`: (order id, trace id).
    fn place(
        &self,
        who: &Shopper,
        product: &str,
        qty: i64,
        card: &str,
    ) -> anyhow::Result<(Value, String)> {
        let cart = self
            .api
            .expect("POST", "/api/v1/carts", Some(&who.token), None, &[], &[201])?
            .str("id")?;
        self.api.post(
            &format!("/api/v1/carts/{cart}/items"),
            &who.token,
            json!({ "product_id": product, "quantity": qty }),
        )?;
        let body = json!({ "cart_id": cart, "shipping_address_id": who.address,
            "payment": { "method": "credit_card", "card_token": card } });
        let key = format!("demo-{}", uuid::Uuid::new_v4().simple());
        let r = self.api.expect(
            "POST",
            "/api/v1/orders",
            Some(&who.token),
            Some(body),
            &[("idempotency-key", &key)],
            &[201, 202],
        )?;
        let trace = r.trace()?;
        Ok((r.body, trace))
    }

    /// The order once its status is final (CONFIRMED or CANCELLED).
    fn settle(&self, who: &Shopper, id: &str) -> anyhow::Result<Value> {
        let path = format!("/api/v1/orders/{id}");
        self.wait("the place saga", Duration::from_secs(30), || {
            let o = self.api.get(&path, Some(&who.token))?.body;
            let s = o["status"].as_str().unwrap_or_default();
            Ok(["CONFIRMED", "CANCELLED"].contains(&s).then_some(o))
        })
    }

    fn order_confirmed(&self, ana: &Shopper, mug: &str) -> anyhow::Result<Placed> {
        let card = self.tokenize(ana, GOOD_CARD)?;
        let (placed, trace) = self.place(ana, mug, 2, &card)?;
        let id = placed["id"]
            .as_str()
            .ok_or_else(|| anyhow!("no order id in {}", short(&placed)))?
            .to_owned();
        let o = self.settle(ana, &id)?;
        if o["status"] != "CONFIRMED" {
            bail!(
                "order {id} ended {} ({}), not CONFIRMED",
                o["status"],
                o["cancel_reason"].as_str().unwrap_or("no reason")
            );
        }
        let t = self.trace(&trace, "the saga and the notification", |spans| {
            saga_steps(spans, "do").iter().any(|s| s == "confirm_stock")
                && consumed_by(spans, "notifications")
        })?;
        let steps = saga_steps(t["spans"].as_array().map_or(&[][..], |v| v), "do");
        let payment = match o["payment"]["payment_id"].as_str() {
            Some(p) => self.admin_get(&format!("/api/v1/payments/{p}"))?["status"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
            None => bail!("order {id} is CONFIRMED without a payment"),
        };
        self.report(
            t["mermaid"].as_str().unwrap_or_default(),
            &format!(
                "order {} CONFIRMED: {}, payment {payment}, shipment {}; saga {}",
                o["number"].as_str().unwrap_or(&id),
                money(&o["total"]),
                o["shipment"]["tracking_number"].as_str().unwrap_or("-"),
                steps.join(" → ")
            ),
        );
        Ok(Placed {
            number: o["number"].as_str().unwrap_or_default().to_owned(),
            id,
            trace,
        })
    }

    fn order_compensated(&self, bruno: &Shopper, lamp: &str) -> anyhow::Result<()> {
        let card = self.tokenize(bruno, DECLINED_CARD)?;
        let before = self.admin_get(&format!("/api/v1/inventory/{lamp}"))?;
        let (placed, trace) = self.place(bruno, lamp, 1, &card)?;
        let id = placed["id"]
            .as_str()
            .ok_or_else(|| anyhow!("no order id in {}", short(&placed)))?
            .to_owned();
        let o = self.settle(bruno, &id)?;
        if o["status"] != "CANCELLED" {
            bail!(
                "order {id} with a declined card ended {}, not CANCELLED",
                o["status"]
            );
        }
        let saga = self.wait("the saga to compensate", Duration::from_secs(20), || {
            let s = self.admin_get(&format!("/api/v1/admin/sagas/{id}"))?;
            Ok((s["status"] == "COMPENSATED").then_some(s))
        })?;
        let undone: Vec<String> = saga["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["phase"] == "undo" && t["status"] == "ok")
            .filter_map(|t| t["step"].as_str().map(str::to_owned))
            .collect();
        if undone.is_empty() {
            bail!("saga {id} is COMPENSATED but its timeline shows no compensation step");
        }
        let failed: Vec<String> = saga["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["phase"] == "do" && t["status"] != "ok")
            .filter_map(|t| t["step"].as_str().map(str::to_owned))
            .collect();
        let after = self.admin_get(&format!("/api/v1/inventory/{lamp}"))?;
        if after["available"] != before["available"] {
            bail!(
                "stock of the lamp is {} after the compensation, was {}",
                after["available"],
                before["available"]
            );
        }
        let t = self.trace(&trace, "the compensation", |spans| {
            !saga_steps(spans, "undo").is_empty()
        })?;
        self.report(
            t["mermaid"].as_str().unwrap_or_default(),
            &format!(
                "order {} CANCELLED (\"{}\"): {} failed; saga COMPENSATED, compensation: undo {}; stock back to {}",
                o["number"].as_str().unwrap_or(&id),
                o["cancel_reason"].as_str().unwrap_or_default(),
                failed.first().map(String::as_str).unwrap_or("a step"),
                undone.join(", undo "),
                after["available"]
            ),
        );
        Ok(())
    }

    fn chat(&self, ana: &Shopper, bruno: &Shopper) -> anyhow::Result<()> {
        let w = self.api.expect(
            "POST",
            "/api/v1/workspaces",
            Some(&ana.token),
            Some(json!({ "name": format!("Demo {}", self.run) })),
            &[],
            &[201, 202],
        )?;
        let ws = w.str("id")?;
        self.wait("the create-workspace saga", Duration::from_secs(20), || {
            let w = self
                .api
                .get(&format!("/api/v1/workspaces/{ws}"), Some(&ana.token))?;
            match w.body["status"].as_str() {
                Some("ACTIVE") => Ok(Some(())),
                Some("FAILED") => bail!("workspace {ws} FAILED: {}", short(&w.body)),
                _ => Ok(None),
            }
        })?;
        // The workspace directory learns users from user.events: retry.
        let member = format!("/api/v1/workspaces/{ws}/members/{}", bruno.id);
        self.wait(
            "bruno in the workspace directory",
            Duration::from_secs(15),
            || {
                let r = self.api.call(
                    "PUT",
                    &member,
                    Some(&ana.token),
                    Some(json!({ "role": "member" })),
                    &[],
                )?;
                Ok((r.status == 200).then_some(()))
            },
        )?;
        let channel = self
            .api
            .post(
                &format!("/api/v1/workspaces/{ws}/channels"),
                &ana.token,
                json!({ "name": "demo", "topic": "flowline demo" }),
            )?
            .str("id")?;
        self.api.post(
            &format!("/api/v1/channels/{channel}/join"),
            &bruno.token,
            json!({}),
        )?;
        // Ana listens on a WebSocket; Bruno posts over REST.
        let ws_url = format!(
            "{}/api/v1/ws",
            self.api.base.replacen("http://", "ws://", 1)
        );
        let handle = tokio::runtime::Handle::current();
        let mut socket = handle.block_on(Socket::connect(&ws_url, &ana.token))?;
        let result = (|| {
            handle.block_on(socket.subscribe(&channel))?;
            handle.block_on(socket.say(&channel, "Olá! Is the lamp back in stock?"))?;
            let posted = self.api.post(
                &format!("/api/v1/channels/{channel}/messages"),
                &bruno.token,
                json!({ "body": "Not yet, the card was declined." }),
            )?;
            let mid = posted.str("id")?;
            self.note("the message over the WebSocket");
            let frame = handle.block_on(socket.message(&mid))?;
            Ok::<_, anyhow::Error>((posted, frame))
        })();
        handle.block_on(socket.close());
        let (posted, frame) = result?;
        let t = self.trace(&posted.trace()?, "the message fan-out", |spans| {
            spans.iter().any(|s| s["name"] == "request")
        })?;
        let history = self.api.get(
            &format!("/api/v1/channels/{channel}/messages"),
            Some(&bruno.token),
        )?;
        let n = history.body["items"].as_array().map_or(0, Vec::len);
        self.report(
            t["mermaid"].as_str().unwrap_or_default(),
            &format!(
                "workspace ACTIVE (create-workspace saga), #demo with 2 members, {n} messages; \
                 Bruno's REST post reached Ana's WebSocket as seq {}",
                frame["seq"]
            ),
        );
        Ok(())
    }

    fn notification(&self, ana: &Shopper, order: &Placed) -> anyhow::Result<()> {
        let subject = format!("Order {} confirmed", order.number);
        let path = format!("/api/v1/admin/mailbox?to={}", ana.email);
        let mail = self.wait("the confirmation email", Duration::from_secs(20), || {
            let page = self.admin_get(&path)?;
            Ok(page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["subject"] == subject.as_str())
                .cloned())
        })?;
        let inbox = self.wait("the in-app notification", Duration::from_secs(15), || {
            let page = self
                .api
                .get("/api/v1/notifications", Some(&ana.token))?
                .body;
            Ok(page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["type"] == "order_confirmed")
                .cloned())
        })?;
        let _ = inbox;
        // The part of the order's trace that delivered it.
        let t = self.admin_get(&format!("/api/v1/admin/traces/{}", order.trace))?;
        let mermaid = sub_diagram(&t["diagram"], "notifications");
        self.report(
            &mermaid,
            &format!(
                "email \"{}\" to {} (sent {}), and an in-app order_confirmed notification (order {})",
                mail["subject"].as_str().unwrap_or_default(),
                mail["to"].as_str().unwrap_or_default(),
                mail["sent_at"].as_str().unwrap_or_default(),
                order.id
            ),
        );
        Ok(())
    }

    fn summary(&self) -> anyhow::Result<()> {
        self.note("reading the flows summary");
        let flows = self.admin_get("/api/v1/admin/flows/summary?limit=500")?;
        let verify = self.admin_get("/api/v1/admin/audit/verify")?;
        let orders = self.wait("orders_per_minute", Duration::from_secs(10), || {
            let w = self.admin_get("/api/v1/admin/analytics/orders_per_minute")?;
            Ok((w["job"]["events"].as_i64().unwrap_or(0) > 0).then_some(w))
        })?;
        let failures = self.wait("login_failures_per_minute", Duration::from_secs(10), || {
            let w = self.admin_get("/api/v1/admin/analytics/login_failures_per_minute")?;
            Ok((w["job"]["events"].as_i64().unwrap_or(0) > 0).then_some(w))
        })?;
        let events = self.admin_get("/api/v1/admin/events?limit=1")?;
        let groups = self.admin_get("/api/v1/admin/consumer-groups")?;
        self.progress.borrow().clear();

        let endpoints = flows["endpoints"].as_array().cloned().unwrap_or_default();
        println!("Data flow per endpoint, from the trace store (hop  p50 / p99 ms):");
        let (mut admin_reads, mut admin_traces) = (0, 0);
        let mut others = Vec::new();
        for e in &endpoints {
            let name = e["endpoint"].as_str().unwrap_or_default();
            let hops: Vec<&Value> = e["hops"].as_array().into_iter().flatten().collect();
            if name.contains(" /api/v1/admin/") {
                // The demo's own look-ups.
                admin_reads += 1;
                admin_traces += e["traces"].as_i64().unwrap_or(0);
                continue;
            }
            if !FLOW_ENDPOINTS.contains(&name) {
                let slowest = hops
                    .iter()
                    .filter_map(|h| h["p99_ms"].as_f64())
                    .fold(0.0, f64::max);
                others.push(format!(
                    "{name} ({} hops, p99 ≤ {slowest:.2} ms)",
                    hops.len()
                ));
                continue;
            }
            println!("  {name}  ({} traces)", e["traces"]);
            // `event → group` labels: the arrow already names the group.
            let rows: Vec<(String, f64, f64)> = hops
                .iter()
                .map(|h| {
                    let (from, to) = (
                        h["from"].as_str().unwrap_or_default(),
                        h["to"].as_str().unwrap_or_default(),
                    );
                    let label = h["label"].as_str().unwrap_or_default();
                    let label = match label.split_once(" → ") {
                        Some((event, group)) if group == to => event.to_owned(),
                        Some((event, group)) => format!("{event} ({group})"),
                        None => label.to_owned(),
                    };
                    (
                        format!("{from} → {to}: {label}"),
                        h["p50_ms"].as_f64().unwrap_or(0.0),
                        h["p99_ms"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect();
            let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
            for (hop, p50, p99) in rows {
                println!("      {hop:<width$}  {p50:>7.2} / {p99:>7.2}");
            }
        }
        for o in &others {
            println!("  {o}");
        }
        if admin_reads > 0 {
            println!("  (and the demo's own admin reads: {admin_reads} endpoints, {admin_traces} traces)");
        }
        let ok = verify["ok"].as_bool().unwrap_or(false)
            && verify["findings"].as_array().is_none_or(Vec::is_empty);
        println!(
            "Audit: {}, {} records, head seq {}",
            if ok { "chain intact" } else { "CHAIN BROKEN" },
            verify["records"],
            verify["head_seq"]
        );
        println!(
            "Analytics: orders_per_minute {}; login_failures_per_minute {}",
            windows(&orders),
            windows(&failures)
        );
        let mut topics: Vec<String> = events["topics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["events"].as_i64().unwrap_or(0) > 0)
            .map(|t| {
                format!(
                    "{} {}",
                    t["topic"].as_str().unwrap_or_default(),
                    t["events"]
                )
            })
            .collect();
        topics.sort();
        let total: i64 = events["topics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["events"].as_i64())
            .sum();
        println!(
            "Events: {total} in {} topics: {}",
            topics.len(),
            topics.join(", ")
        );
        let group_rows = groups["groups"].as_array().cloned().unwrap_or_default();
        let lag: i64 = group_rows.iter().filter_map(|g| g["lag"].as_i64()).sum();
        let names: std::collections::BTreeSet<&str> = group_rows
            .iter()
            .filter_map(|g| g["group"].as_str())
            .collect();
        println!("Consumer groups: {} (total lag {lag})", names.len());
        if !ok {
            bail!(
                "the audit chain does not verify: {}",
                short(&verify["findings"])
            );
        }
        Ok(())
    }
}

/// `2 windows, 3 elements, sum BRL 117.30` of an analytics page.
fn windows(page: &Value) -> String {
    let items = page["items"].as_array().cloned().unwrap_or_default();
    let count: i64 = items.iter().filter_map(|w| w["count"].as_i64()).sum();
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    for w in &items {
        if let Some(s) = w["sum"].as_i64() {
            *sums
                .entry(w["key"].as_str().unwrap_or_default().to_owned())
                .or_default() += s;
        }
    }
    let mut out = format!(
        "{count} in {} window{}",
        items.len(),
        if items.len() == 1 { "" } else { "s" }
    );
    for (k, s) in sums {
        out.push_str(&format!(", {k} {}.{:02}", s / 100, s % 100));
    }
    out
}

fn money(v: &Value) -> String {
    let a = v["amount"].as_i64().unwrap_or(0);
    format!(
        "{} {}.{:02}",
        v["currency"].as_str().unwrap_or(""),
        a / 100,
        a % 100
    )
}

/// Whether a consumer group of `context` handled an event in the trace.
fn consumed_by(spans: &[Value], context: &str) -> bool {
    spans.iter().any(|s| {
        s["name"] == "event"
            && s["attrs"]["group"]
                .as_str()
                .is_some_and(|g| g.split('.').next() == Some(context))
    })
}

/// The consumer groups' contexts that handled events of the trace.
fn consumers(trace: &Value) -> Vec<String> {
    let mut out: Vec<String> = trace["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "event")
        .filter_map(|s| s["attrs"]["group"].as_str())
        .map(|g| g.split('.').next().unwrap_or(g).to_owned())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The saga steps of `phase` (`do`, `undo`) that ran, in order, once each.
fn saga_steps(spans: &[Value], phase: &str) -> Vec<String> {
    let mut steps: Vec<&Value> = spans
        .iter()
        .filter(|s| s["name"] == "saga.step" && s["attrs"]["phase"] == phase)
        .collect();
    steps.sort_by_key(|s| s["start_us"].as_i64().unwrap_or(0));
    let mut out: Vec<String> = Vec::new();
    for s in steps {
        if let Some(name) = s["attrs"]["step"].as_str() {
            if !out.iter().any(|o| o == name) {
                out.push(name.to_owned());
            }
        }
    }
    out
}

/// The messages of a trace's diagram to and from `participant` (and the
/// topics feeding it), as Mermaid.
fn sub_diagram(diagram: &Value, participant: &str) -> String {
    let messages: Vec<crate::flows::Message> = diagram["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| crate::flows::Message {
            from: m["from"].as_str().unwrap_or_default().to_owned(),
            to: m["to"].as_str().unwrap_or_default().to_owned(),
            label: m["label"].as_str().unwrap_or_default().to_owned(),
            reply: m["reply"].as_bool().unwrap_or(false),
            at_ms: m["at_ms"].as_f64().unwrap_or(0.0),
            duration_ms: m["duration_ms"].as_f64().unwrap_or(0.0),
        })
        .filter(|m| m.from == participant || m.to == participant)
        .collect();
    let mut participants: Vec<String> = Vec::new();
    for p in diagram["participants"].as_array().into_iter().flatten() {
        let p = p.as_str().unwrap_or_default();
        if messages.iter().any(|m| m.from == p || m.to == p) {
            participants.push(p.to_owned());
        }
    }
    crate::flows::mermaid(&crate::flows::Diagram {
        participants,
        messages,
    })
}

// --- the WebSocket client ---

struct Socket {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Socket {
    async fn connect(url: &str, token: &str) -> anyhow::Result<Socket> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .map_err(|_| anyhow!("WebSocket {url}: no answer within 10s"))?
        .with_context(|| format!("WebSocket {url}"))?;
        let mut s = Socket { ws };
        s.until(|f| f["type"] == "ready", "the ready frame").await?;
        Ok(s)
    }

    async fn send(&mut self, v: Value) -> anyhow::Result<()> {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::text(v.to_string()))
            .await
            .context("WebSocket send")
    }

    /// Frames until one matches (an `error` frame fails).
    async fn until(&mut self, want: impl Fn(&Value) -> bool, what: &str) -> anyhow::Result<Value> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message as Ws;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no {what} on the WebSocket within 10s"))?;
            match m {
                Some(Ok(Ws::Text(t))) => {
                    let f: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if want(&f) {
                        return Ok(f);
                    }
                    if f["type"] == "error" {
                        bail!("WebSocket error frame: {}", short(&f));
                    }
                }
                Some(Ok(Ws::Close(c))) => bail!("the WebSocket closed ({c:?}) before {what}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("WebSocket: {e}"),
                None => bail!("the WebSocket closed before {what}"),
            }
        }
    }

    async fn subscribe(&mut self, channel: &str) -> anyhow::Result<()> {
        self.send(json!({"v": 1, "type": "subscribe", "channel_id": channel, "ref": "sub"}))
            .await?;
        self.until(|f| f["type"] == "subscribed", "the subscription")
            .await
            .map(|_| ())
    }

    async fn say(&mut self, channel: &str, body: &str) -> anyhow::Result<()> {
        self.send(
            json!({"v": 1, "type": "send", "channel_id": channel, "body": body,
            "client_id": format!("demo-{}", uuid::Uuid::new_v4().simple()), "ref": "say"}),
        )
        .await?;
        self.until(|f| f["type"] == "ack", "the ack of the message sent")
            .await
            .map(|_| ())
    }

    /// The `message` frame of message `id`.
    async fn message(&mut self, id: &str) -> anyhow::Result<Value> {
        self.until(
            |f| f["type"] == "message" && f["message"]["id"] == id,
            "the posted message",
        )
        .await
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }
}
