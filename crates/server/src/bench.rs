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

pub async fn run(settings: Settings, cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Events {
            events,
            batch,
            payload_bytes,
            latency_rate,
            latency_seconds,
            json,
        } => {
            let dir = settings
                .data_dir
                .join(format!("bench-{}", flowline_core::id::new_id()));
            std::fs::create_dir_all(&dir)?;
            let result = events_scenario(
                &settings,
                &dir,
                events,
                batch.max(1),
                payload_bytes,
                latency_rate,
                Duration::from_secs(latency_seconds),
            )
            .await;
            let _ = std::fs::remove_dir_all(&dir);
            let report = result?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print();
            }
            Ok(())
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
}

impl EventsReport {
    fn print(&self) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(
            o,
            "scenario   event log: append + deliver to one consumer group (embedded SQLite)"
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

fn percentile(sorted: &[u32], p: f64) -> f64 {
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
    let backend = Backend::Sqlite {
        dir: dir.to_path_buf(),
        durability: settings.database.durability,
    };
    let mut opts = settings.log_options();
    opts.fetch_batch = opts.fetch_batch.max(batch as i64);
    let log = EventLog::open(&backend, opts.clone()).await?;
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
    log.db().close().await;

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
    })
}
