//! Benchmark scenarios. Each prints its figure next to a ceiling measured in
//! the same run on the same disk, so results compare across machines.

use crate::config::Settings;
use clap::Subcommand;
use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_store::{Backend, ConsumerOptions, EventLog, Handler, HandlerError};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Reservations on hot products, payments authorized and captured by the
    /// sandbox at zero latency, and ledger postings, next to the fsync ceiling.
    Commerce {
        /// Seconds per phase.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent callers.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Products every reservation competes for.
        #[arg(long, default_value_t = 4)]
        hot_products: usize,
        #[arg(long)]
        json: bool,
    },
    /// Orders over HTTP on the whole app: POST /orders → saga → CONFIRMED,
    /// next to the fsync ceiling and the payments service alone.
    Orders {
        /// Orders to place.
        #[arg(long, default_value_t = 2000)]
        orders: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
    /// WebSocket fan-out: one channel of `members` subscribers among
    /// `clients` connections, a sender at `rate` messages/s, delivery
    /// latency, memory per idle connection, and a bare broadcast server on
    /// the same library as the peer. The server runs as its own process.
    Realtime {
        /// Connections in all (subscribers plus idle ones).
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Members of the channel, each with one subscribed connection.
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Messages sent.
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        /// Messages per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long)]
        json: bool,
    },
    /// Product search on a generated catalog: the tantivy index next to SQLite
    /// FTS5 (bm25, same data, same filters) in the same run.
    Search {
        #[arg(long, default_value_t = 100_000)]
        products: u64,
        /// Queries in the mixed set.
        #[arg(long, default_value_t = 400)]
        queries: usize,
        /// Seconds per throughput phase.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long)]
        json: bool,
    },
    /// Login throughput next to raw Argon2id verification, and authenticated
    /// `GET /users/me` through the whole gateway next to a bare handler.
    Auth {
        /// Seconds per phase.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent connections for the GET phases.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Skip the login phase (profiling the GET phases alone).
        #[arg(long)]
        skip_login: bool,
        #[arg(long)]
        json: bool,
    },
    /// What seeing the data flow costs: traced writes next to untraced ones,
    /// audit chain appends and analytics applies next to the inbox floor.
    Observe {
        /// Seconds of the traced/untraced phase.
        #[arg(long, default_value_t = 12)]
        seconds: u64,
        /// Concurrent connections writing.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Events applied to the audit chain and to analytics.
        #[arg(long, default_value_t = 2000)]
        events: usize,
        #[arg(long)]
        json: bool,
    },
    /// Append events in batches and deliver them to one consumer group (SQLite).
    Events {
        /// Events in the throughput phase.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Events per append transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 200)]
        payload_bytes: usize,
        /// Offered load (events/s) in the latency phase; 0 skips it.
        #[arg(long, default_value_t = 20_000)]
        latency_rate: u64,
        /// Length of the latency phase.
        #[arg(long, default_value_t = 5)]
        latency_seconds: u64,
        /// Print one JSON object instead of a report.
        #[arg(long)]
        json: bool,
    },
}

/// A scenario's result: a report for people, or JSON with `--json`.
pub trait Report: serde::Serialize {
    fn print(&self);
}

/// Runs a scenario in a fresh directory under the data dir (removed after),
/// then prints its report.
async fn in_fresh_dir<R, F, Fut>(settings: &Settings, json: bool, scenario: F) -> anyhow::Result<()>
where
    R: Report,
    F: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<R>>,
{
    let dir = settings
        .data_dir
        .join(format!("bench-{}", flowline_core::id::new_id()));
    std::fs::create_dir_all(&dir)?;
    let result = scenario(dir.clone()).await;
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(())
}

pub async fn run(settings: Settings, cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Commerce {
            seconds,
            concurrency,
            hot_products,
            json,
        } => {
            let s = settings.clone();
            in_fresh_dir(&settings, json, |dir| async move {
                crate::bench_commerce::run(
                    &s,
                    &dir,
                    Duration::from_secs(seconds),
                    concurrency.max(1),
                    hot_products,
                )
                .await
            })
            .await
        }
        BenchCommand::Orders {
            orders,
            concurrency,
            json,
        } => {
            let s = settings.clone();
            in_fresh_dir(&settings, json, |dir| async move {
                crate::bench_orders::run(s, &dir, orders.max(1), concurrency.max(1)).await
            })
            .await
        }
        BenchCommand::Realtime {
            clients,
            members,
            messages,
            rate,
            json,
        } => {
            in_fresh_dir(&settings, json, |dir| async move {
                crate::bench_realtime::run(&dir, clients, members, messages.max(1), rate).await
            })
            .await
        }
        BenchCommand::Search {
            products,
            queries,
            seconds,
            json,
        } => {
            let s = settings.clone();
            in_fresh_dir(&settings, json, |dir| async move {
                crate::bench_search::run(&s, &dir, products, queries, Duration::from_secs(seconds))
                    .await
            })
            .await
        }
        BenchCommand::Observe {
            seconds,
            connections,
            events,
            json,
        } => {
            let s = settings.clone();
            in_fresh_dir(&settings, json, |dir| async move {
                crate::bench_observe::run(
                    s,
                    &dir,
                    Duration::from_secs(seconds.max(1)),
                    connections.max(1),
                    events.max(10),
                )
                .await
            })
            .await
        }
        BenchCommand::Auth {
            seconds,
            connections,
            skip_login,
            json,
        } => {
            let s = settings.clone();
            in_fresh_dir(&settings, json, |dir| async move {
                auth_scenario(
                    s,
                    &dir,
                    Duration::from_secs(seconds),
                    connections.max(1),
                    skip_login,
                )
                .await
            })
            .await
        }
        BenchCommand::Events {
            events,
            batch,
            payload_bytes,
            latency_rate,
            latency_seconds,
            json,
        } => {
            let s = settings.clone();
            in_fresh_dir(&settings, json, |dir| async move {
                let lat = Duration::from_secs(latency_seconds);
                events_scenario(
                    &s,
                    &dir,
                    events,
                    batch.max(1),
                    payload_bytes,
                    latency_rate,
                    lat,
                )
                .await
            })
            .await
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct EventsReport {
    pub machine: String,
    pub durability: String,
    pub partitions: u32,
    pub batch: usize,
    pub payload_bytes: usize,
    pub fsync_per_sec: f64,
    pub events: u64,
    pub events_per_sec: f64,
    pub events_per_fsync: f64,
    pub saturated_p50_ms: f64,
    pub saturated_p99_ms: f64,
    pub latency_rate: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// `sqlite+embedded`, `postgres+embedded`, `postgres+nats`…
    pub store: String,
    /// Bare JetStream publish + consume of the same events, same run (the
    /// mean of a run before and one after flowline's).
    pub nats_bare_per_sec: Option<f64>,
    pub nats_bare_runs: Vec<f64>,
    pub vs_nats_bare: Option<f64>,
}

impl Report for EventsReport {
    fn print(&self) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(
            o,
            "scenario   event log: append + deliver to one consumer group ({})",
            self.store
        );
        let _ = writeln!(o, "machine    {}", self.machine);
        let _ = writeln!(
            o,
            "setup      durability={} partitions={} batch={} payload={}B",
            self.durability, self.partitions, self.batch, self.payload_bytes
        );
        let _ = writeln!(
            o,
            "ceiling    {:.0} fsync/s (4 KiB write + fdatasync, same disk)",
            self.fsync_per_sec
        );
        let _ = writeln!(
            o,
            "throughput {:.0} events/s delivered ({} events) = {:.1} events per fsync",
            self.events_per_sec, self.events, self.events_per_fsync
        );
        let _ = writeln!(
            o,
            "           end-to-end latency at saturation: p50 {:.1} ms, p99 {:.1} ms",
            self.saturated_p50_ms, self.saturated_p99_ms
        );
        if let (Some(bare), Some(r)) = (self.nats_bare_per_sec, self.vs_nats_bare) {
            let _ = writeln!(
                o,
                "peer       {bare:.0} events/s bare JetStream publish + consume (mean of {:.0} before, {:.0} after): flowline = {r:.2} × bare",
                self.nats_bare_runs.first().copied().unwrap_or(0.0),
                self.nats_bare_runs.last().copied().unwrap_or(0.0),
            );
        }
        if let (Some(p50), Some(p99)) = (self.latency_p50_ms, self.latency_p99_ms) {
            let _ = writeln!(
                o,
                "latency    at {} events/s offered: p50 {:.2} ms, p99 {:.2} ms (append → handler)",
                self.latency_rate, p50, p99
            );
        }
    }
}

pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cores} cores, {cpu}, {}", std::env::consts::OS)
}

/// Write-then-fdatasync loop: the most commits per second this disk allows
/// for a durable single writer.
pub fn fsync_ceiling(dir: &Path, for_how_long: Duration) -> anyhow::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0x5au8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_how_long {
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok(rate)
}

struct Recorder {
    received: AtomicU64,
    target: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    done: Notify,
}

impl Handler for Recorder {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let lat = Timestamp::now().as_micros() - ev.envelope.occurred_at.as_micros();
        self.latencies_us
            .lock()
            .expect("poisoned")
            .push(lat.clamp(0, u32::MAX as i64) as u32);
        let n = self.received.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.target.load(Ordering::Relaxed) {
            self.done.notify_one();
        }
        Ok(())
    }
}

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn drafts(n: usize, payload: &str, seq: &mut u64) -> Vec<Envelope> {
    (0..n)
        .map(|_| {
            *seq += 1;
            Envelope::stamp(
                EventDraft::new(
                    "bench.events",
                    "bench.tick",
                    format!("key-{}", *seq % 64),
                    serde_json::json!({ "seq": *seq, "data": payload }),
                ),
                "bench",
                None,
            )
        })
        .collect()
}

async fn events_scenario(
    settings: &Settings,
    dir: &Path,
    events: u64,
    batch: usize,
    payload_bytes: usize,
    latency_rate: u64,
    latency_for: Duration,
) -> anyhow::Result<EventsReport> {
    let fsync = fsync_ceiling(dir, Duration::from_secs(2))?;
    // The configured database and bus, under a scratch prefix (dropped after).
    let run_id = flowline_core::id::new_id().simple().to_string();
    let backend = if settings.database.url.starts_with("postgres") {
        let mut s = settings.clone();
        s.database.schema_prefix = format!("bench{run_id}_");
        s.backend()?
    } else {
        Backend::Sqlite {
            dir: dir.to_path_buf(),
            durability: settings.database.durability,
        }
    };
    let mut nats = settings.nats_config();
    if let Some(n) = &mut nats {
        n.prefix = format!("bench{run_id}");
    }
    let mut opts = settings.log_options();
    opts.fetch_batch = opts.fetch_batch.max(batch as i64);
    let log = EventLog::open_with(&backend, opts.clone(), nats.clone()).await?;
    let recorder = Arc::new(Recorder {
        received: AtomicU64::new(0),
        target: AtomicU64::new(events),
        latencies_us: Mutex::new(Vec::with_capacity(events as usize)),
        done: Notify::new(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let sub = log
        .subscribe(
            ConsumerOptions::new("bench", &["bench.events"]),
            recorder.clone(),
            stop_rx,
        )
        .await?;
    let payload = "x".repeat(payload_bytes);
    let mut seq = 0u64;
    // The bus peer runs before and after (the broker's disk is noisy on
    // shared VMs): the ratio is against the mean of both.
    let body = serde_json::to_vec(&drafts(1, &payload, &mut 0)[0])?.len();
    let bare_before = match &nats {
        Some(n) => Some(nats_bare(&n.url, &format!("{run_id}a"), events, batch, body).await?),
        None => None,
    };

    // Phase 1: saturate.
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < events {
        let n = batch.min((events - sent) as usize);
        log.append(&drafts(n, &payload, &mut seq)).await?;
        sent += n as u64;
    }
    recorder.done.notified().await;
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *recorder.latencies_us.lock().expect("poisoned"));
    lat.sort_unstable();
    let (sat50, sat99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));

    // Phase 2: a steady offered load below saturation, for latency.
    let (mut p50, mut p99) = (None, None);
    if latency_rate > 0 && !latency_for.is_zero() {
        let tick = Duration::from_millis(5);
        let per_tick = ((latency_rate as f64) * tick.as_secs_f64()).ceil().max(1.0) as usize;
        let ticks = (latency_for.as_secs_f64() / tick.as_secs_f64()) as u64;
        let expected = events + per_tick as u64 * ticks;
        recorder.target.store(expected, Ordering::Relaxed);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..ticks {
            interval.tick().await;
            log.append(&drafts(per_tick, &payload, &mut seq)).await?;
        }
        if recorder.received.load(Ordering::Relaxed) < expected {
            recorder.done.notified().await;
        }
        let mut lat = std::mem::take(&mut *recorder.latencies_us.lock().expect("poisoned"));
        lat.sort_unstable();
        p50 = Some(percentile(&lat, 0.50));
        p99 = Some(percentile(&lat, 0.99));
    }
    let _ = stop.send(true);
    let _ = sub.task.await;
    log.delete_bus_streams().await?;
    log.db().close().await;

    // The ceiling on the bus: JetStream's own publish + pull-consume of the
    // same events (same body size, same batches), in this run.
    let bare_after = match &nats {
        Some(n) => Some(nats_bare(&n.url, &format!("{run_id}b"), events, batch, body).await?),
        None => None,
    };
    let bare = bare_before.zip(bare_after).map(|(a, b)| (a + b) / 2.0);

    let eps = events as f64 / elapsed;
    Ok(EventsReport {
        machine: machine_description(),
        durability: format!("{:?}", settings.database.durability).to_lowercase(),
        partitions: opts.partitions,
        batch,
        payload_bytes,
        fsync_per_sec: fsync,
        events,
        events_per_sec: eps,
        events_per_fsync: eps / fsync,
        saturated_p50_ms: sat50,
        saturated_p99_ms: sat99,
        latency_rate,
        latency_p50_ms: p50,
        latency_p99_ms: p99,
        store: format!("{}+{}", backend.name(), log.kind()),
        nats_bare_per_sec: bare,
        nats_bare_runs: bare_before.into_iter().chain(bare_after).collect(),
        vs_nats_bare: bare.map(|b| eps / b),
    })
}

/// Events/s that bare JetStream sustains on this machine: publish in
/// batches with `Nats-Msg-Id` (waiting for every ack, as the relay does) while
/// a durable pull consumer fetches and acks each message.
async fn nats_bare(
    url: &str,
    run_id: &str,
    events: u64,
    batch: usize,
    body_bytes: usize,
) -> anyhow::Result<f64> {
    use async_nats::jetstream::{self, consumer::pull, stream};
    use futures_util::StreamExt;
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let name = format!("BENCHBARE{}", run_id.to_uppercase());
    let subject = format!("benchbare{run_id}.events");
    let s = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let consumer: jetstream::consumer::PullConsumer = s
        .create_consumer(pull::Config {
            durable_name: Some("bare".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    let body = bytes_of(body_bytes);
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        while got < events {
            let mut msgs = consumer
                .batch()
                .max_messages(batch)
                .expires(Duration::from_millis(50))
                .messages()
                .await?;
            while let Some(m) = msgs.next().await {
                m.map_err(|e| anyhow::anyhow!("{e}"))?
                    .ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                got += 1;
            }
        }
        anyhow::Ok(())
    });
    let mut sent = 0u64;
    while sent < events {
        let n = batch.min((events - sent) as usize);
        let mut acks = Vec::with_capacity(n);
        for _ in 0..n {
            sent += 1;
            let msg = jetstream::message::PublishMessage::build()
                .payload(body.clone())
                .message_id(format!("{run_id}-{sent}"));
            acks.push(js.send_publish(subject.clone(), msg).await?);
        }
        for a in acks {
            a.await?;
        }
    }
    reader.await??;
    let rate = events as f64 / start.elapsed().as_secs_f64();
    js.delete_stream(&name).await?;
    Ok(rate)
}

fn bytes_of(n: usize) -> bytes::Bytes {
    vec![b'x'; n].into()
}

#[derive(Debug, serde::Serialize)]
pub struct AuthReport {
    pub machine: String,
    pub hash_threads: usize,
    pub argon2_verify_per_sec: f64,
    pub logins_per_sec: f64,
    /// 1 - logins/verifies (median over interleaved slices): what the login
    /// path adds on top of hashing.
    pub login_overhead: f64,
    pub connections: usize,
    pub me_per_sec: f64,
    pub me_p50_ms: f64,
    pub me_p99_ms: f64,
    pub bare_per_sec: f64,
    pub bare_p50_ms: f64,
    pub bare_p99_ms: f64,
    /// Gateway rate as a share of the bare handler's (median over interleaved slices).
    pub me_vs_bare: f64,
}

impl Report for AuthReport {
    fn print(&self) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(
            o,
            "scenario   identity + gateway (embedded, one process, loopback)"
        );
        let _ = writeln!(o, "machine    {}", self.machine);
        let _ = writeln!(
            o,
            "argon2id   {:.1} verifies/s on {} threads (m=19456 KiB, t=2, p=1)",
            self.argon2_verify_per_sec, self.hash_threads
        );
        let _ = writeln!(
            o,
            "login      {:.1} logins/s = {:.1}% below raw verification",
            self.logins_per_sec,
            self.login_overhead * 100.0
        );
        let _ = writeln!(
            o,
            "users/me   {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms ({} connections, full pipeline)",
            self.me_per_sec, self.me_p50_ms, self.me_p99_ms, self.connections
        );
        let _ = writeln!(
            o,
            "bare       {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms (same server, no middleware)",
            self.bare_per_sec, self.bare_p50_ms, self.bare_p99_ms
        );
        let _ = writeln!(
            o,
            "ratio      gateway keeps {:.0}% of the bare rate",
            self.me_vs_bare * 100.0
        );
    }
}

/// Median of per-slice ratios: a burst of load from elsewhere on the machine
/// spoils one slice, not the figure.
fn median_of(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Raw Argon2id verification on `threads` threads for `d`.
fn argon2_rate(threads: usize, d: Duration) -> f64 {
    let phc = {
        use argon2_phc::hash;
        hash("bench passphrase 1")
    };
    let start = Instant::now();
    let counts: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let phc = phc.clone();
                s.spawn(move || {
                    let mut n = 0u64;
                    while start.elapsed() < d {
                        assert!(flowline_identity::PasswordHasher::verify_blocking(
                            &phc,
                            "bench passphrase 1"
                        ));
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    counts.iter().sum::<u64>() as f64 / start.elapsed().as_secs_f64()
}

mod argon2_phc {
    /// A PHC string for `pw` with the production parameters.
    pub fn hash(pw: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let h = flowline_identity::PasswordHasher::new(1);
        let p = flowline_identity::Password::parse(pw).expect("valid");
        rt.block_on(h.hash(&p)).expect("hash")
    }
}

/// The load of a benchmark comes from one address and one user: measure the
/// pipeline, not the limiter's refusals.
pub fn lift_rate_limits(settings: &mut Settings) {
    let r = &mut settings.ratelimit;
    for v in [
        &mut r.ip_per_minute,
        &mut r.ip_burst,
        &mut r.auth_per_minute,
        &mut r.auth_burst,
        &mut r.user_per_minute,
        &mut r.user_burst,
    ] {
        *v = u32::MAX / 2;
    }
}

/// Serves `router` on a free loopback port: (its address, the server task).
pub async fn serve_loopback(
    router: axum::Router,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    });
    Ok((addr, server))
}

/// Registers a user over HTTP (password `bench passphrase 1`): its access token.
pub async fn register(
    addr: std::net::SocketAddr,
    email: &str,
    name: &str,
) -> anyhow::Result<String> {
    let body = serde_json::json!({ "email": email, "password": "bench passphrase 1", "display_name": name });
    let (status, body) = Conn::open(addr)
        .await?
        .send(&post_json("/api/v1/auth/register", &body.to_string()))
        .await?;
    anyhow::ensure!(
        status == 201,
        "register failed: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(
        serde_json::from_slice::<serde_json::Value>(&body)?["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// A minimal HTTP/1.1 keep-alive client: enough for a load generator.
pub struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: std::net::SocketAddr) -> std::io::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Sends `req` (a full request) and reads one response; returns (status, body).
    pub async fn send(&mut self, req: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(req).await?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                return Ok((status, self.buf[end + 4..end + 4 + len].to_vec()));
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

pub fn post_json(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `connections` closed loops sending `req` for `d`: (requests/s, p50 ms, p99 ms).
async fn closed_loop(
    addr: std::net::SocketAddr,
    req: Vec<u8>,
    connections: usize,
    d: Duration,
) -> anyhow::Result<(f64, f64, f64)> {
    let req = Arc::new(req);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut c = Conn::open(addr).await?;
            while start.elapsed() < d {
                let t = Instant::now();
                let (status, _) = c.send(&req).await?;
                anyhow::ensure!(status == 200, "status {status}");
                lat.push(t.elapsed().as_micros() as u32);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok((
        all.len() as f64 / secs,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    ))
}

async fn auth_scenario(
    mut settings: Settings,
    dir: &Path,
    d: Duration,
    connections: usize,
    skip_login: bool,
) -> anyhow::Result<AuthReport> {
    settings.data_dir = dir.to_path_buf();
    settings.database.url = "sqlite://".into();
    settings.probe.enabled = false;
    lift_rate_limits(&mut settings);
    let threads = settings.auth.hash_concurrency;

    let app = crate::app::App::start(settings).await?;
    let bare = axum::Router::new().route(
        "/bench/bare",
        axum::routing::get(|| async {
            axum::Json(serde_json::json!({
                "id": "01a1fff7-b09c-73c7-abb8-6bf3b20cb96d", "email": "bench@example.com",
                "display_name": "Bench", "role": "user", "status": "active",
                "created_at": "2026-11-21T21:42:50.144218Z",
            }))
        }),
    );
    let (addr, server) = serve_loopback(crate::cli::app_router(&app.state).merge(bare)).await?;
    let token = register(addr, "bench@example.com", "Bench").await?;

    // Logins next to raw verification, interleaved in slices so that a change in
    // the machine's load affects both sides alike.
    let login = post_json(
        "/api/v1/auth/login",
        r#"{"email":"bench@example.com","password":"bench passphrase 1"}"#,
    );
    let slices = 8u32;
    let (mut verify_sum, mut login_sum, mut login_ratios) = (0.0, 0.0, Vec::new());
    for _ in 0..if skip_login { 0 } else { slices } {
        let slice = d / slices;
        let v = tokio::task::spawn_blocking(move || argon2_rate(threads, slice)).await?;
        // As many logins in flight as hashing threads, plus one queued each.
        let l = closed_loop(addr, login.clone(), threads * 2, slice)
            .await?
            .0;
        verify_sum += v;
        login_sum += l;
        login_ratios.push(l / v);
    }
    let (verify_rate, logins) = (
        verify_sum / f64::from(slices),
        login_sum / f64::from(slices),
    );

    let me = format!(
        "GET /api/v1/users/me HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes();
    let bare = b"GET /bench/bare HTTP/1.1\r\nhost: bench\r\n\r\n".to_vec();
    // Warm both paths, then measure them in alternating slices, so that a
    // change in the machine's load affects both sides alike.
    closed_loop(addr, me.clone(), connections, Duration::from_millis(500)).await?;
    closed_loop(addr, bare.clone(), connections, Duration::from_millis(500)).await?;
    let (mut me_r, mut me_l, mut bare_r, mut bare_l) = (0.0, Vec::new(), 0.0, Vec::new());
    let mut gateway_ratios = Vec::new();
    for _ in 0..slices {
        let slice = d / slices;
        let (me_slice, p50, p99) = closed_loop(addr, me.clone(), connections, slice).await?;
        me_r += me_slice;
        me_l.push((p50, p99));
        let (r, p50, p99) = closed_loop(addr, bare.clone(), connections, slice).await?;
        bare_r += r;
        bare_l.push((p50, p99));
        gateway_ratios.push(me_slice / r);
    }
    let n = f64::from(slices);
    let median = |v: &mut Vec<(f64, f64)>| {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v[v.len() / 2]
    };
    let (me_rate, (me50, me99)) = (me_r / n, median(&mut me_l));
    let (bare_rate, (b50, b99)) = (bare_r / n, median(&mut bare_l));

    server.abort();
    app.stop().await;
    Ok(AuthReport {
        machine: machine_description(),
        hash_threads: threads,
        argon2_verify_per_sec: verify_rate,
        logins_per_sec: logins,
        login_overhead: 1.0 - median_of(&mut login_ratios),
        connections,
        me_per_sec: me_rate,
        me_p50_ms: me50,
        me_p99_ms: me99,
        bare_per_sec: bare_rate,
        bare_p50_ms: b50,
        bare_p99_ms: b99,
        me_vs_bare: median_of(&mut gateway_ratios),
    })
}
