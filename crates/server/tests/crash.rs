//! Crash test: a `flowline serve` taking writes over HTTP and consuming them is
//! killed with SIGKILL at random moments, several times, then restarted. Every
//! acknowledged write survives; every committed event reaches every consumer
//! group exactly once in effect, in per-key order.

mod common;

use common::*;
use rand::Rng;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WRITERS: usize = 4;
const ROUNDS: usize = 5;

#[test]
fn sigkill_under_load_loses_no_acknowledged_write_and_applies_no_effect_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // (key, seq, event_id) of every 201 the clients saw.
    let acked: Arc<Mutex<Vec<(String, i64, String)>>> = Arc::default();
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
        let s = Server::start(&data, &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let url = s.url("/api/v1/probe/writes");
                let acked = acked.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let a = agent();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{w}-k{}", i % 5);
                        i += 1;
                        match a.post(&url).send_json(
                            serde_json::json!({ "key": key, "value": format!("r{round}") }),
                        ) {
                            Ok(res) => match res.into_json::<serde_json::Value>() {
                                // Only a complete response is an acknowledgement.
                                Ok(v) => acked.lock().unwrap().push((
                                    key,
                                    v["seq"].as_i64().unwrap(),
                                    v["event_id"].as_str().unwrap().to_owned(),
                                )),
                                Err(_) => break,
                            },
                            // The server died under us: this write was never acknowledged.
                            Err(_) => break,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
        s.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the load was real: {} acknowledged writes",
        acked.len()
    );

    // Restart once more and let it catch up.
    let s = Server::start(&data, &[]);
    let a = agent();
    wait_until("consumers caught up", Duration::from_secs(60), || {
        let (_, _, m) = call(a.get(&s.url("/metrics")), None);
        let lag: Vec<&str> = m
            .lines()
            .filter(|l| {
                l.starts_with("flowline_consumer_lag{") && l.contains("topic=\"probe.events\"")
            })
            .collect();
        lag.len() == 2 && lag.iter().all(|l| l.ends_with(" 0"))
    });
    let log_path = s.data_dir.with_extension("log");
    let status = s.terminate();
    assert!(
        status.success(),
        "SIGTERM should exit 0, got {status:?}; server log:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(verify(&data, &acked));
}

async fn open(path: &Path) -> sqlx::SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .unwrap()
}

async fn verify(data: &Path, acked: &[(String, i64, String)]) {
    let mut probe = open(&data.join("probe.db")).await;
    let mut log = open(&data.join("eventlog.db")).await;

    let writes: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT key, seq, event_id FROM probe_writes")
            .fetch_all(&mut probe)
            .await
            .unwrap();
    let stored: BTreeMap<(String, i64), String> = writes
        .iter()
        .map(|(k, s, e)| ((k.clone(), *s), e.clone()))
        .collect();
    for (k, seq, id) in acked {
        assert_eq!(
            stored.get(&(k.clone(), *seq)),
            Some(id),
            "acknowledged write {k}#{seq} lost"
        );
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut probe)
        .await
        .unwrap();
    assert_eq!(left, 0, "outbox fully relayed");

    // Every committed write's event is in the log exactly once.
    let logged: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_id, count(*) FROM log_events WHERE topic = 'probe.events' GROUP BY event_id",
    )
    .fetch_all(&mut log)
    .await
    .unwrap();
    let logged: BTreeMap<String, i64> = logged.into_iter().collect();
    assert_eq!(
        logged.len(),
        writes.len(),
        "one log event per committed write"
    );
    for (_, _, id) in &writes {
        assert_eq!(logged.get(id), Some(&1), "event {id} in the log once");
    }

    // Each group applied each key's writes once, in order.
    let mut expected: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (k, s, _) in &writes {
        expected.entry(k.clone()).or_default().push(*s);
    }
    for v in expected.values_mut() {
        v.sort();
    }
    for group in ["probe.applier", "probe.auditor"] {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT key, seq FROM probe_applied WHERE consumer = $1 ORDER BY apply_no",
        )
        .bind(group)
        .fetch_all(&mut probe)
        .await
        .unwrap();
        let mut applied: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (k, s) in rows {
            applied.entry(k).or_default().push(s);
        }
        assert_eq!(
            applied, expected,
            "group {group}: exactly once, in per-key order"
        );
    }
    probe.close().await.unwrap();
    log.close().await.unwrap();
}
