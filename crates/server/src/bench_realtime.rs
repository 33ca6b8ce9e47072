//! Realtime fan-out: `flowline serve` runs as its own process (so its memory
//! is its own), this process holds the WebSocket clients. One channel has
//! `members` members, each with one subscribed connection; every user has
//! further idle connections up to `clients` in all. A sender posts over its
//! socket at a fixed rate; every subscriber records the delay from send to
//! receipt (same clock). The peer, in the same run: a bare broadcast server
//! on the same WebSocket library (no auth, storage, bus or ordering), fed
//! the same frames at the same rate to as many receivers.

use crate::bench::{machine_description, percentile, post_json, Conn, Report};
use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message as Ws, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, serde::Serialize)]
pub struct RealtimeReport {
    pub machine: String,
    pub clients: usize,
    pub members: usize,
    pub messages: usize,
    pub rate_per_sec: f64,
    /// Server RSS growth per idle authenticated connection.
    pub idle_kib_per_connection: f64,
    pub server_rss_mib: f64,
    pub deliveries: usize,
    pub expected_deliveries: usize,
    pub deliveries_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Subscribers the server disconnected as slow consumers.
    pub slow_consumers: usize,
    /// The bare broadcast server, same frames, same rate, same receivers.
    pub bare_deliveries_per_sec: f64,
    pub bare_p50_ms: f64,
    pub bare_p99_ms: f64,
}

impl Report for RealtimeReport {
    fn print(&self) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "scenario   realtime: WebSocket fan-out to one channel");
        let _ = writeln!(o, "machine    {}", self.machine);
        let _ = writeln!(
            o,
            "setup      clients={} members={} messages={} rate={}/s",
            self.clients, self.members, self.messages, self.rate_per_sec
        );
        let _ = writeln!(
            o,
            "memory     {:.1} KiB per idle connection; server RSS {:.0} MiB",
            self.idle_kib_per_connection, self.server_rss_mib
        );
        let _ = writeln!(
            o,
            "flowline   {}/{} deliveries, {:.0}/s; p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; {} slow consumers",
            self.deliveries,
            self.expected_deliveries,
            self.deliveries_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.slow_consumers
        );
        let _ = writeln!(
            o,
            "bare       {:.0}/s; p50 {:.2} ms, p99 {:.2} ms; flowline = {:.2} × bare",
            self.bare_deliveries_per_sec,
            self.bare_p50_ms,
            self.bare_p99_ms,
            self.deliveries_per_sec / self.bare_deliveries_per_sec.max(1e-9)
        );
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Raises the open-files limit to its hard maximum (children inherit it).
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    1024
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// The server under test, in its own process.
struct Child {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(dir: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("FLOWLINE_LOG", "error")
        .env("FLOWLINE__RATELIMIT__ENABLED", "false")
        .env("FLOWLINE__MESSAGING__CLIENT_RATE_PER_SEC", "100000")
        .env("FLOWLINE__MESSAGING__CLIENT_BURST", "100000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut reader = std::io::BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("flowline listening on http://")
        .ok_or_else(|| anyhow::anyhow!("server did not start: {line:?}"))?
        .to_owned();
    std::thread::spawn(move || for _ in reader.lines() {});
    Ok(Child {
        child,
        addr: url.parse()?,
    })
}

/// One authenticated HTTP call: (status, JSON body).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = Conn::open(addr).await?.send(req.as_bytes()).await?;
    let v = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body)?
    };
    Ok((status, v))
}

async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Socket> {
    let mut req = format!("ws://{addr}/api/v1/ws").into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(req, Some(client_config()), false).await?;
    // `ready`
    ws.next().await;
    Ok(ws)
}

/// Small read buffers: the library's default (128 KiB, zeroed as it grows)
/// would make the load generator, not the server, the bottleneck.
fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 * 1024)
}

/// The send time in a delivered frame's body (`t=<µs>`).
fn sent_at(frame: &str) -> Option<u64> {
    let i = frame.find("\"body\":\"t=")? + 10;
    let digits: String = frame[i..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// What one receiver saw: latencies (µs), when the last came, and whether
/// it was closed as a slow consumer.
type Received = (Vec<u32>, Option<Instant>, bool);

/// Reads until `expected` timed frames came, the socket closed, or `stop`.
/// (latencies in µs, receive time of the last, closed as slow consumer).
async fn receive(
    mut ws: impl futures_util::Stream<Item = Result<Ws, tokio_tungstenite::tungstenite::Error>> + Unpin,
    expected: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Received {
    let mut lat = Vec::with_capacity(expected);
    let mut last = None;
    let mut slow = false;
    while lat.len() < expected {
        let m = tokio::select! {
            m = ws.next() => m,
            _ = stop.changed() => break,
        };
        match m {
            Some(Ok(Ws::Text(t))) => {
                if let Some(at) = sent_at(&t) {
                    lat.push(now_us().saturating_sub(at).min(u32::MAX as u64) as u32);
                    last = Some(Instant::now());
                } else if t.contains("slow_consumer") {
                    slow = true;
                }
            }
            Some(Ok(Ws::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    (lat, last, slow)
}

struct Phase {
    deliveries: usize,
    per_sec: f64,
    p50: f64,
    p99: f64,
    max: f64,
    slow: usize,
}

/// Paces `messages` sends at `rate`, waits for the receivers, sums up.
async fn measure(
    receivers: Vec<tokio::task::JoinHandle<Received>>,
    stop: tokio::sync::watch::Sender<bool>,
    messages: usize,
    rate: f64,
    mut send: impl FnMut(usize) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>>,
) -> anyhow::Result<Phase> {
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    for i in 0..messages {
        let due = started + gap * i as u32;
        tokio::time::sleep_until(due.into()).await;
        send(i).await?;
    }
    let waiter = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            let _ = stop.send(true);
        })
    };
    let mut all = Vec::new();
    let mut last = started;
    let mut slow = 0;
    for r in receivers {
        let (lat, l, s) = r.await?;
        all.extend(lat);
        if let Some(l) = l {
            last = last.max(l);
        }
        slow += usize::from(s);
    }
    waiter.abort();
    all.sort_unstable();
    let secs = last.duration_since(started).as_secs_f64().max(1e-9);
    Ok(Phase {
        deliveries: all.len(),
        per_sec: all.len() as f64 / secs,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        max: all.last().map_or(0.0, |m| *m as f64 / 1000.0),
        slow,
    })
}

pub async fn run(
    dir: &Path,
    clients: usize,
    members: usize,
    messages: usize,
    rate: f64,
) -> anyhow::Result<RealtimeReport> {
    let limit = raise_fd_limit();
    anyhow::ensure!(
        (clients + 2 * members + 64) as u64 <= limit,
        "{clients} clients need more open files than the limit ({limit})"
    );
    let members = members.max(2);
    let clients = clients.max(members + 1);
    let server = spawn_server(&dir.join("server"))?;
    let addr = server.addr;

    // Users (registration hashes a password: a few at a time).
    eprintln!("registering {members} users…");
    let tokens: Vec<String> = futures_util::stream::iter(0..members)
        .map(|i| async move {
            let body = serde_json::json!({"email": format!("rt{i}@bench.local"),
                "password": "bench passphrase 1", "display_name": format!("User {i}")});
            let (st, b) = Conn::open(addr)
                .await?
                .send(&post_json("/api/v1/auth/register", &body.to_string()))
                .await?;
            anyhow::ensure!(st == 201, "register: {st} {}", String::from_utf8_lossy(&b));
            let v: serde_json::Value = serde_json::from_slice(&b)?;
            Ok::<_, anyhow::Error>(v["access_token"].as_str().unwrap_or_default().to_owned())
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let mut ids = Vec::new();
    for t in &tokens {
        let (_, me) = call(addr, "GET", "/api/v1/users/me", t, None).await?;
        ids.push(me["id"].as_str().unwrap_or_default().to_owned());
    }
    let (st, w) = call(
        addr,
        "POST",
        "/api/v1/workspaces",
        &tokens[0],
        Some(serde_json::json!({"name": "bench"})),
    )
    .await?;
    anyhow::ensure!(st == 201, "workspace: {st} {w}");
    let ws_id = w["id"].as_str().unwrap_or_default().to_owned();
    eprintln!("adding {} members…", members - 1);
    for id in &ids[1..] {
        let path = format!("/api/v1/workspaces/{ws_id}/members/{id}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (st, b) = call(
                addr,
                "PUT",
                &path,
                &tokens[0],
                Some(serde_json::json!({"role": "member"})),
            )
            .await?;
            if st == 200 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "member: {st} {b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (_, chans) = call(
        addr,
        "GET",
        &format!("/api/v1/workspaces/{ws_id}/channels"),
        &tokens[0],
        None,
    )
    .await?;
    let general = chans["items"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // One subscribed connection per member.
    eprintln!("connecting {members} subscribers…");
    let subscribers: Vec<Socket> = futures_util::stream::iter(tokens.clone())
        .map(|t| {
            let general = general.clone();
            async move {
                let mut ws = connect(addr, &t).await?;
                let sub = serde_json::json!({"type": "subscribe", "channel_id": general});
                ws.send(Ws::text(sub.to_string())).await?;
                while let Some(m) = ws.next().await {
                    if let Ws::Text(t) = m? {
                        if t.contains("\"subscribed\"") {
                            break;
                        }
                    }
                }
                Ok::<_, anyhow::Error>(ws)
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    // Idle connections: memory per connection from the server's RSS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_n = clients - members;
    let before = rss_kib(server.child.id());
    eprintln!("connecting {idle_n} idle clients…");
    let idle: Vec<Socket> = futures_util::stream::iter(0..idle_n)
        .map(|i| {
            let t = tokens[i % members].clone();
            async move { connect(addr, &t).await }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(server.child.id());
    let idle_kib = (after - before) / idle_n.max(1) as f64;
    // Idle sockets answer the server's pings.
    let idle_tasks: Vec<_> = idle
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
        .collect();

    // Fan-out.
    eprintln!("sending {messages} messages at {rate}/s…");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let receivers: Vec<_> = subscribers
        .into_iter()
        .map(|ws| tokio::spawn(receive(ws, messages, stop_rx.clone())))
        .collect();
    // The sender reads its acks, or its own queue would fill and stop it.
    let (sink, mut acks) = connect(addr, &tokens[0]).await?.split();
    let ack_reader = tokio::spawn(async move { while let Some(Ok(_)) = acks.next().await {} });
    let sender = Arc::new(tokio::sync::Mutex::new(sink));
    let phase = {
        let general = general.clone();
        let sender = sender.clone();
        measure(receivers, stop_tx, messages, rate, move |i| {
            let sender = sender.clone();
            let frame = serde_json::json!({"type": "send", "channel_id": general,
                "body": format!("t={}", now_us()), "client_id": format!("b{i}")});
            Box::pin(async move {
                sender
                    .lock()
                    .await
                    .send(Ws::text(frame.to_string()))
                    .await?;
                Ok(())
            })
        })
        .await?
    };
    let server_rss = rss_kib(server.child.id()) / 1024.0;
    for t in idle_tasks {
        t.abort();
    }
    drop(sender);
    ack_reader.abort();
    drop(server);

    // The bare peer.
    eprintln!("bare broadcast peer…");
    let bare = bare_peer(members, messages, rate).await?;
    Ok(RealtimeReport {
        machine: machine_description(),
        clients,
        members,
        messages,
        rate_per_sec: rate,
        idle_kib_per_connection: idle_kib,
        server_rss_mib: server_rss,
        deliveries: phase.deliveries,
        expected_deliveries: members * messages,
        deliveries_per_sec: phase.per_sec,
        p50_ms: phase.p50,
        p99_ms: phase.p99,
        max_ms: phase.max,
        slow_consumers: phase.slow,
        bare_deliveries_per_sec: bare.per_sec,
        bare_p50_ms: bare.p50,
        bare_p99_ms: bare.p99,
    })
}

/// A broadcast server with nothing but the WebSocket library: each
/// connection a writer task with a queue, frames pre-serialised once.
async fn bare_peer(receivers: usize, messages: usize, rate: f64) -> anyhow::Result<Phase> {
    use tokio::sync::mpsc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let conns: Arc<std::sync::Mutex<Vec<mpsc::Sender<Utf8Bytes>>>> = Arc::default();
    let accept = {
        let conns = conns.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conns = conns.clone();
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let (mut sink, mut stream) = ws.split();
                    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(512);
                    conns.lock().expect("poisoned").push(tx);
                    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
                    while let Some(f) = rx.recv().await {
                        if sink.feed(Ws::Text(f)).await.is_err() {
                            return;
                        }
                        while let Ok(f) = rx.try_recv() {
                            if sink.feed(Ws::Text(f)).await.is_err() {
                                return;
                            }
                        }
                        if sink.flush().await.is_err() {
                            return;
                        }
                    }
                });
            }
        })
    };
    let sockets: Vec<_> = futures_util::stream::iter(0..receivers)
        .map(|_| async move {
            tokio_tungstenite::connect_async_with_config(
                format!("ws://{addr}/"),
                Some(client_config()),
                false,
            )
            .await
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|r| r.map(|(ws, _)| ws))
        .collect::<Result<_, _>>()?;
    while conns.lock().expect("poisoned").len() < receivers {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(receive(ws, messages, stop_rx.clone())))
        .collect();
    let phase = measure(tasks, stop_tx, messages, rate, move |i| {
        // The frame flowline sends for a message of the same body.
        let frame = Utf8Bytes::from(
            serde_json::json!({"v": 1, "type": "message", "channel_id": "c",
            "seq": i + 1, "workspace_id": "w", "mentions": [], "direct": false,
            "message": {"id": "m", "channel_id": "c", "seq": i + 1, "author_id": "a",
                "body": format!("t={}", now_us()), "client_id": format!("b{i}"),
                "created_at": "2026-11-22T00:00:00Z", "deleted": false, "reactions": []}})
            .to_string(),
        );
        let list: Vec<_> = conns.lock().expect("poisoned").clone();
        Box::pin(async move {
            for c in list {
                let _ = c.try_send(frame.clone());
            }
            Ok(())
        })
    })
    .await?;
    accept.abort();
    Ok(phase)
}
