//! Property: for random interleavings of appends, consumer crashes (a consumer
//! killed mid-batch, after some effects committed but before its position did)
//! and replays, each group's applied sequence equals the committed sequence per key.

mod support;

use flowline_core::{Envelope, EventDraft, RecordedEvent};
use flowline_store::{
    inbox, ConsumerOptions, Db, Durability, EventLog, Handler, HandlerError, LogOptions, ReplayFrom,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const GROUPS: [&str; 2] = ["g0", "g1"];
const TOPIC: &str = "prop";

#[derive(Debug, Clone)]
enum Op {
    Append {
        key: u8,
        count: u8,
    },
    /// Run a group's consumer; with `Some(k)` it dies after k handler calls.
    Consume {
        group: usize,
        crash_after: Option<u8>,
    },
    Replay {
        group: usize,
        offset: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4, 1u8..15).prop_map(|(key, count)| Op::Append { key, count }),
        3 => (0usize..2, proptest::option::weighted(0.7, 0u8..12))
            .prop_map(|(group, crash_after)| Op::Consume { group, crash_after }),
        1 => (0usize..2, 0u8..20).prop_map(|(group, offset)| Op::Replay { group, offset }),
    ]
}

/// Applies each event through the inbox; after `crash_after` calls it hangs,
/// so the task can be killed with effects committed and the position not.
struct Applier {
    db: Db,
    group: &'static str,
    calls: Arc<AtomicUsize>,
    crash_after: Option<usize>,
}

impl Handler for Applier {
    async fn handle(&self, e: &RecordedEvent) -> Result<(), HandlerError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.crash_after.is_some_and(|k| call >= k) {
            std::future::pending::<()>().await;
        }
        let mut tx = self.db.begin().await?;
        if inbox::claim(&mut tx, self.group, e.envelope.id).await? {
            let key = e.envelope.key.clone();
            let n = e.envelope.payload["n"].as_i64().unwrap();
            flowline_store::on_tx!(&mut tx, |c| sqlx::query(
                "INSERT INTO applied (grp, key, n) VALUES ($1, $2, $3)"
            )
            .bind(self.group)
            .bind(&key)
            .bind(n)
            .execute(c)
            .await
            .map(|_| ()))?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn consume(log: &EventLog, db: &Db, group: usize, crash_after: Option<usize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let h = Applier {
        db: db.clone(),
        group: GROUPS[group],
        calls: calls.clone(),
        crash_after,
    };
    let (stop, rx) = watch::channel(false);
    let sub = log
        .subscribe(ConsumerOptions::new(GROUPS[group], &[TOPIC]), h, rx)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lag: i64 = log
            .groups()
            .await
            .unwrap()
            .iter()
            .filter(|g| g.group == GROUPS[group])
            .map(|g| g.lag)
            .sum();
        let hung = crash_after.is_some_and(|k| calls.load(Ordering::SeqCst) > k);
        if lag == 0 || hung {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer made no progress"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if crash_after.is_some() {
        sub.task.abort(); // the crash: no graceful stop, no final commit
        let _ = sub.task.await;
    } else {
        stop.send(true).unwrap();
        sub.task.await.unwrap();
    }
}

async fn scenario(ops: Vec<Op>) {
    let b = &support::backends(Durability::Relaxed)[0];
    let opts = LogOptions {
        partitions: 3,
        fetch_batch: 7,
        idle_poll: Duration::from_millis(5),
        ..Default::default()
    };
    let log = EventLog::open(&b.backend, opts).await.unwrap();
    let db = support::service_db(b, "prop").await;
    flowline_store::on_pool!(write &db, |p| sqlx::raw_sql(
        "CREATE TABLE applied (seq INTEGER PRIMARY KEY AUTOINCREMENT, grp TEXT, key TEXT, n INTEGER)"
    )
    .execute(p)
    .await
    .map(|_| ()))
    .unwrap();
    for g in GROUPS {
        log.ensure_group(g, TOPIC, ReplayFrom::Earliest)
            .await
            .unwrap();
    }

    let mut committed: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut n = 0i64;
    for op in ops {
        match op {
            Op::Append { key, count } => {
                let key = format!("k{key}");
                let batch: Vec<Envelope> = (0..count)
                    .map(|_| {
                        n += 1;
                        committed.entry(key.clone()).or_default().push(n);
                        Envelope::stamp(
                            EventDraft::new(TOPIC, "p.e", &key, serde_json::json!({ "n": n })),
                            "c",
                            None,
                        )
                    })
                    .collect();
                log.append(&batch).await.unwrap();
            }
            Op::Consume { group, crash_after } => {
                consume(&log, &db, group, crash_after.map(usize::from)).await
            }
            Op::Replay { group, offset } => {
                // Rewind only (a forward move skips events by design): to a
                // fraction of the lowest committed position.
                let lowest = log
                    .positions(GROUPS[group], TOPIC)
                    .await
                    .unwrap()
                    .iter()
                    .map(|p| p.1)
                    .min()
                    .unwrap_or(0);
                let to = lowest * i64::from(offset) / 20;
                log.replay(GROUPS[group], None, ReplayFrom::Offset(to))
                    .await
                    .unwrap();
            }
        }
    }
    for g in 0..2 {
        consume(&log, &db, g, None).await;
    }
    for g in GROUPS {
        let rows: Vec<(String, i64)> = flowline_store::on_pool!(&db, |p| sqlx::query_as(
            "SELECT key, n FROM applied WHERE grp = $1 ORDER BY seq"
        )
        .bind(g)
        .fetch_all(p)
        .await)
        .unwrap();
        let mut applied: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (k, n) in rows {
            applied.entry(k).or_default().push(n);
        }
        assert_eq!(applied, committed, "group {g}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn applied_sequence_equals_committed_sequence_per_key(ops in proptest::collection::vec(op(), 1..20)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(scenario(ops));
    }
}
