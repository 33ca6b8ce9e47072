//! The store and event-log conformance suite. Every test runs against SQLite,
//! and against PostgreSQL when `FLOWLINE_TEST_POSTGRES_URL` is set.

mod support;

use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_store::outbox::{self, Relay};
use flowline_store::{
    inbox, ConsumerOptions, Db, Durability, Handler, HandlerError, LogOptions, ReplayFrom,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{backends, service_db};
use tokio::sync::watch;

fn ev(topic: &str, key: &str, n: i64) -> Envelope {
    Envelope::stamp(
        EventDraft::new(
            topic,
            "test.happened",
            key,
            serde_json::json!({ "key": key, "n": n }),
        ),
        "corr-test",
        None,
    )
}

fn opts() -> LogOptions {
    LogOptions {
        partitions: 4,
        max_attempts: 3,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        fetch_batch: 50,
        idle_poll: Duration::from_millis(50),
        ..LogOptions::default()
    }
}

/// Records (key, n) per event, in delivery order.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<(String, i64)>>>);

impl Handler for Collect {
    async fn handle(&self, e: &RecordedEvent) -> Result<(), HandlerError> {
        let p = &e.envelope.payload;
        self.0.lock().unwrap().push((
            p["key"].as_str().unwrap().to_owned(),
            p["n"].as_i64().unwrap(),
        ));
        Ok(())
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn append_assigns_dense_offsets_per_partition_and_skips_known_ids() {
    for b in backends(Durability::Full) {
        let log = b.log(opts()).await;
        let events: Vec<Envelope> = (0..40)
            .map(|i| ev("orders", &format!("k{}", i % 5), i))
            .collect();
        assert_eq!(log.append(&events).await.unwrap(), 40, "{}", b.name());
        // The relay may resend after a crash: known ids are skipped, in and across batches.
        let mut again = events[..10].to_vec();
        again.push(events[0].clone());
        assert_eq!(log.append(&again).await.unwrap(), 0, "{}", b.name());

        let mut total = 0;
        let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for p in 0..4 {
            let got = log.read("orders", p, 0, 1000).await.unwrap();
            let offsets: Vec<i64> = got.iter().map(|e| e.offset).collect();
            if b.nats.is_some() {
                // Offsets are stream sequences, shared by a stream's partitions.
                assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{}", b.name());
            } else {
                assert_eq!(
                    offsets,
                    (0..got.len() as i64).collect::<Vec<_>>(),
                    "dense offsets, {}",
                    b.name()
                );
            }
            for e in &got {
                assert_eq!(e.envelope.topic, "orders");
                assert_eq!(e.envelope.correlation_id, "corr-test");
                by_key
                    .entry(e.envelope.key.clone())
                    .or_default()
                    .push(e.envelope.payload["n"].as_i64().unwrap());
            }
            total += got.len();
        }
        assert_eq!(total, 40);
        for (k, ns) in by_key {
            let mut sorted = ns.clone();
            sorted.sort();
            assert_eq!(ns, sorted, "key {k} kept its order, {}", b.name());
        }
        let first = &log
            .read("orders", flowline_core::event::partition_for("k0", 4), 0, 1)
            .await
            .unwrap()[0];
        assert_eq!(
            first.envelope,
            events[0],
            "the envelope round-trips, {}",
            b.name()
        );
        let topics = log.topics().await.unwrap();
        assert_eq!(topics.len(), 1);
        assert_eq!(topics[0].events, 40);
        assert!(topics[0].bytes > 0);
    }
}

#[tokio::test]
async fn outbox_commits_with_the_state_change_and_relays_in_order() {
    for b in backends(Durability::Full) {
        let log = b.log(opts()).await;
        let db = service_db(&b, "svc").await;
        flowline_store::on_pool!(write & db, |p| sqlx::raw_sql(
            "CREATE TABLE things (id TEXT PRIMARY KEY)"
        )
        .execute(p)
        .await
        .map(|_| ()))
        .unwrap();

        // A rolled-back transaction leaves neither the row nor the event.
        let mut tx = db.begin().await.unwrap();
        insert_thing(&mut tx, "rolled-back").await;
        outbox::enqueue(&mut tx, &ev("things", "rolled-back", 0))
            .await
            .unwrap();
        tx.rollback().await.unwrap();

        let mut committed = Vec::new();
        for i in 0..30 {
            let mut tx = db.begin().await.unwrap();
            let key = format!("t{}", i % 3);
            insert_thing(&mut tx, &format!("thing-{i}")).await;
            let e = ev("things", &key, i);
            outbox::enqueue(&mut tx, &e).await.unwrap();
            tx.commit().await.unwrap();
            committed.push(e);
        }
        let relay = Relay::new(db.clone(), log.clone());
        assert_eq!(relay.drain().await.unwrap(), 30, "{}", b.name());
        assert_eq!(
            relay.drain().await.unwrap(),
            0,
            "outbox is empty after relaying"
        );

        let got = log
            .tail("things", ReplayFrom::Earliest, 1000)
            .await
            .unwrap();
        assert_eq!(got.len(), 30, "{}", b.name());
        assert!(got.iter().all(|e| e.envelope.key != "rolled-back"));
        for key in ["t0", "t1", "t2"] {
            let want: Vec<i64> = committed
                .iter()
                .filter(|e| e.key == key)
                .map(|e| e.payload["n"].as_i64().unwrap())
                .collect();
            let mut have: Vec<&RecordedEvent> =
                got.iter().filter(|e| e.envelope.key == key).collect();
            have.sort_by_key(|e| e.offset);
            let have: Vec<i64> = have
                .iter()
                .map(|e| e.envelope.payload["n"].as_i64().unwrap())
                .collect();
            assert_eq!(have, want, "commit order per key, {}", b.name());
        }

        // A relay that crashed after appending but before deleting resends: no duplicates.
        let mut tx = db.begin().await.unwrap();
        let e = ev("things", "t0", 99);
        outbox::enqueue(&mut tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        log.append(std::slice::from_ref(&e)).await.unwrap();
        assert_eq!(relay.drain().await.unwrap(), 1);
        let n = log
            .tail("things", ReplayFrom::Earliest, 1000)
            .await
            .unwrap()
            .iter()
            .filter(|x| x.envelope.id == e.id)
            .count();
        assert_eq!(n, 1, "resent event appended once, {}", b.name());
    }
}

async fn insert_thing(tx: &mut flowline_store::Tx, id: &str) {
    flowline_store::on_tx!(tx, |c| sqlx::query("INSERT INTO things (id) VALUES ($1)")
        .bind(id)
        .execute(c)
        .await
        .map(|_| ()))
    .unwrap();
}

#[tokio::test]
async fn every_group_gets_every_event_in_key_order_and_lag_drains() {
    for b in backends(Durability::Full) {
        let log = b.log(opts()).await;
        let (stop, stop_rx) = watch::channel(false);
        let a = Collect::default();
        let c = Collect::default();
        let sa = log
            .subscribe(
                ConsumerOptions::new("group-a", &["orders"]),
                a.clone(),
                stop_rx.clone(),
            )
            .await
            .unwrap();
        let sc = log
            .subscribe(
                ConsumerOptions::new("group-c", &["orders"]),
                c.clone(),
                stop_rx.clone(),
            )
            .await
            .unwrap();
        let mut sent: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for round in 0..6 {
            let batch: Vec<Envelope> = (0..37)
                .map(|i| {
                    let n = round * 100 + i;
                    let key = format!("user-{}", n % 7);
                    sent.entry(key.clone()).or_default().push(n);
                    ev("orders", &key, n)
                })
                .collect();
            log.append(&batch).await.unwrap();
        }
        for (name, col) in [("group-a", &a), ("group-c", &c)] {
            wait_for(name, || col.0.lock().unwrap().len() >= 222).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let got = col.0.lock().unwrap().clone();
            assert_eq!(got.len(), 222, "{name} got each event once, {}", b.name());
            let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
            for (k, n) in got {
                per_key.entry(k).or_default().push(n);
            }
            assert_eq!(per_key, sent, "{name} saw every key in order, {}", b.name());
        }
        // Positions are committed: lag reaches zero.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let groups = log.groups().await.unwrap();
            if groups.iter().all(|g| g.lag == 0) {
                assert_eq!(groups.len(), 8, "two groups × four partitions");
                // SQL offsets are dense per partition (NATS's are stream-wide).
                if b.nats.is_none() {
                    assert_eq!(
                        groups
                            .iter()
                            .filter(|g| g.group == "group-a")
                            .map(|g| g.next_offset)
                            .sum::<i64>(),
                        222
                    );
                }
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "lag did not drain: {groups:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        log.refresh_lag().await.unwrap();
        stop.send(true).unwrap();
        sa.task.await.unwrap();
        sc.task.await.unwrap();

        // A restarted group resumes where it committed: nothing is redelivered.
        let again = Collect::default();
        let (stop, stop_rx) = watch::channel(false);
        let s = log
            .subscribe(
                ConsumerOptions::new("group-a", &["orders"]),
                again.clone(),
                stop_rx,
            )
            .await
            .unwrap();
        log.append(&[ev("orders", "user-1", 1000)]).await.unwrap();
        wait_for("new event", || !again.0.lock().unwrap().is_empty()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            again.0.lock().unwrap().clone(),
            vec![("user-1".to_owned(), 1000)],
            "{}",
            b.name()
        );
        stop.send(true).unwrap();
        s.task.await.unwrap();
    }
}

/// Fails events whose `n` is in `poison` until `healed` is set.
#[derive(Clone, Default)]
struct Flaky {
    seen: Arc<Mutex<Vec<i64>>>,
    attempts: Arc<Mutex<HashMap<i64, u32>>>,
    fail_first: Arc<Mutex<HashMap<i64, u32>>>,
    healed: Arc<Mutex<bool>>,
}

impl Handler for Flaky {
    async fn handle(&self, e: &RecordedEvent) -> Result<(), HandlerError> {
        let n = e.envelope.payload["n"].as_i64().unwrap();
        let attempt = {
            let mut a = self.attempts.lock().unwrap();
            let x = a.entry(n).or_default();
            *x += 1;
            *x
        };
        let limit = self
            .fail_first
            .lock()
            .unwrap()
            .get(&n)
            .copied()
            .unwrap_or(0);
        if attempt <= limit && !*self.healed.lock().unwrap() {
            return Err(HandlerError::transient(format!("boom {n}/{attempt}")));
        }
        self.seen.lock().unwrap().push(n);
        Ok(())
    }
}

#[tokio::test]
async fn failing_events_are_retried_then_dead_lettered_and_can_be_retried() {
    for b in backends(Durability::Full) {
        let log = b.log(opts()).await;
        let h = Flaky::default();
        h.fail_first.lock().unwrap().insert(1, 2); // recovers on the 3rd attempt
        h.fail_first.lock().unwrap().insert(2, 100); // never recovers
        let (stop, stop_rx) = watch::channel(false);
        let s = log
            .subscribe(
                ConsumerOptions::new("billing", &["pay"]),
                h.clone(),
                stop_rx,
            )
            .await
            .unwrap();
        // One key: the failing event holds its partition, order is kept.
        log.append(&[
            ev("pay", "k", 0),
            ev("pay", "k", 1),
            ev("pay", "k", 2),
            ev("pay", "k", 3),
        ])
        .await
        .unwrap();
        wait_for("delivery", || h.seen.lock().unwrap().len() >= 3).await;
        assert_eq!(*h.seen.lock().unwrap(), vec![0, 1, 3], "{}", b.name());
        assert_eq!(
            h.attempts.lock().unwrap()[&1],
            3,
            "retried twice then succeeded"
        );
        assert_eq!(
            h.attempts.lock().unwrap()[&2],
            3,
            "gave up after max_attempts"
        );

        let dl = log.dead_letters(Some("billing"), false).await.unwrap();
        assert_eq!(dl.len(), 1, "{}", b.name());
        assert_eq!(dl[0].status, "dead");
        assert_eq!(dl[0].attempts, 3);
        assert!(dl[0].error.contains("boom 2/3"), "{}", dl[0].error);
        // The dead letter is also an event on the group's dead-letter topic.
        let dlq = log
            .tail("dlq.billing", ReplayFrom::Earliest, 10)
            .await
            .unwrap();
        assert_eq!(dlq.len(), 1);
        assert_eq!(
            dlq[0].envelope.payload["event"]["id"],
            serde_json::json!(dl[0].event_id)
        );
        assert_eq!(
            dlq[0].envelope.causation_id.as_deref(),
            Some(dl[0].event_id.as_str())
        );

        // Retry: the handler is fixed now; the consumer redelivers when idle.
        *h.healed.lock().unwrap() = true;
        assert_eq!(
            log.retry_dead_letters(None, Some("billing")).await.unwrap(),
            1
        );
        wait_for("retry", || h.seen.lock().unwrap().len() >= 4).await;
        assert_eq!(*h.seen.lock().unwrap(), vec![0, 1, 3, 2]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while log
            .dead_letters(Some("billing"), false)
            .await
            .unwrap()
            .len()
            == 1
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "dead letter not resolved"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            log.dead_letters(Some("billing"), true).await.unwrap()[0].status,
            "resolved"
        );
        assert!(
            log.retry_dead_letters(Some(424242), None).await.is_err(),
            "unknown id is an error"
        );
        stop.send(true).unwrap();
        s.task.await.unwrap();
    }
}

#[tokio::test]
async fn replay_repositions_a_group_by_offset_and_by_time() {
    for b in backends(Durability::Full) {
        let mut o = opts();
        o.partitions = 1;
        let log = b.log(o).await;
        log.append(&(0..10).map(|i| ev("t", "k", i)).collect::<Vec<_>>())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mid = Timestamp::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        log.append(&(10..15).map(|i| ev("t", "k", i)).collect::<Vec<_>>())
            .await
            .unwrap();

        let h = Collect::default();
        let (stop, stop_rx) = watch::channel(false);
        let s = log
            .subscribe(ConsumerOptions::new("proj", &["t"]), h.clone(), stop_rx)
            .await
            .unwrap();
        wait_for("all", || h.0.lock().unwrap().len() >= 15).await;

        assert_eq!(
            log.replay("proj", Some("t"), ReplayFrom::Offset(12))
                .await
                .unwrap(),
            1
        );
        wait_for("replay from offset", || h.0.lock().unwrap().len() >= 18).await;
        assert_eq!(
            h.0.lock().unwrap()[15..]
                .iter()
                .map(|x| x.1)
                .collect::<Vec<_>>(),
            vec![12, 13, 14]
        );

        log.replay("proj", None, ReplayFrom::Time(mid))
            .await
            .unwrap();
        wait_for("replay from time", || h.0.lock().unwrap().len() >= 23).await;
        assert_eq!(
            h.0.lock().unwrap()[18..]
                .iter()
                .map(|x| x.1)
                .collect::<Vec<_>>(),
            vec![10, 11, 12, 13, 14],
            "{}",
            b.name()
        );

        assert!(log
            .replay("nobody", None, ReplayFrom::Earliest)
            .await
            .is_err());
        assert_eq!(
            log.tail("t", ReplayFrom::Time(mid), 100)
                .await
                .unwrap()
                .len(),
            5
        );
        assert_eq!(
            log.tail("t", ReplayFrom::Offset(13), 100)
                .await
                .unwrap()
                .len(),
            2
        );
        stop.send(true).unwrap();
        s.task.await.unwrap();
    }
}

#[tokio::test]
async fn retention_drops_old_and_oversized_history_but_keeps_offsets() {
    for b in backends(Durability::Relaxed) {
        if b.nats.is_some() {
            continue; // on NATS the stream's own max_age retention applies
        }
        let mut o = opts();
        o.partitions = 1;
        let log = b.log(o).await;
        log.append(&(0..20).map(|i| ev("old", "k", i)).collect::<Vec<_>>())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        log.append(&(0..20).map(|i| ev("big", "k", i)).collect::<Vec<_>>())
            .await
            .unwrap();
        let dropped = log
            .enforce_retention(Some(Duration::from_millis(200)), None)
            .await
            .unwrap();
        assert_eq!(dropped, 20, "{}", b.name());
        assert!(log
            .tail("old", ReplayFrom::Earliest, 100)
            .await
            .unwrap()
            .is_empty());

        let per_event = log
            .topics()
            .await
            .unwrap()
            .iter()
            .find(|t| t.topic == "big")
            .unwrap()
            .bytes
            / 20;
        log.enforce_retention(None, Some((per_event * 5) as u64))
            .await
            .unwrap();
        let left = log.tail("big", ReplayFrom::Earliest, 100).await.unwrap();
        assert!(
            !left.is_empty() && left.len() <= 5,
            "kept {} events, {}",
            left.len(),
            b.name()
        );
        assert_eq!(left.last().unwrap().offset, 19, "newest kept");

        // Offsets continue after the dropped ones.
        log.append(&[ev("old", "k", 99)]).await.unwrap();
        assert_eq!(
            log.tail("old", ReplayFrom::Earliest, 10).await.unwrap()[0].offset,
            20
        );
    }
}

#[tokio::test]
async fn inbox_claims_an_event_once_and_rolls_back_with_the_effect() {
    for b in backends(Durability::Full) {
        let db: Db = service_db(&b, "inboxsvc").await;
        let id = flowline_core::id::new_id();
        let mut tx = db.begin().await.unwrap();
        assert!(inbox::claim(&mut tx, "c1", id).await.unwrap());
        tx.rollback().await.unwrap();
        assert!(
            !inbox::seen(&db, "c1", id).await.unwrap(),
            "rolled back with the effect"
        );

        let mut tx = db.begin().await.unwrap();
        assert!(inbox::claim(&mut tx, "c1", id).await.unwrap());
        tx.commit().await.unwrap();
        let mut tx = db.begin().await.unwrap();
        assert!(
            !inbox::claim(&mut tx, "c1", id).await.unwrap(),
            "second claim refused, {}",
            b.name()
        );
        assert!(
            inbox::claim(&mut tx, "c2", id).await.unwrap(),
            "other consumers are independent"
        );
        tx.commit().await.unwrap();
        assert!(inbox::seen(&db, "c1", id).await.unwrap());
        let later = Timestamp::from_micros(Timestamp::now().as_micros() + 1_000_000);
        assert_eq!(inbox::prune(&db, later).await.unwrap(), 2);
    }
}

#[tokio::test]
async fn migrations_are_idempotent() {
    for b in backends(Durability::Full) {
        let db = service_db(&b, "migr").await;
        assert_eq!(
            db.migrate(outbox::KERNEL_MIGRATIONS).await.unwrap(),
            0,
            "{}",
            b.name()
        );
        db.ping().await.unwrap();
    }
}

#[tokio::test]
async fn an_event_is_dead_lettered_once_per_group_even_when_redelivered() {
    for b in backends(Durability::Full) {
        let log = b.log(opts()).await;
        let h = Flaky::default();
        h.fail_first.lock().unwrap().insert(0, u32::MAX);
        let (stop, stop_rx) = watch::channel(false);
        let s = log
            .subscribe(ConsumerOptions::new("g", &["poison"]), h.clone(), stop_rx)
            .await
            .unwrap();
        log.append(&[ev("poison", "k", 0)]).await.unwrap();
        wait_for("first dead letter", || {
            h.attempts.lock().unwrap().get(&0) == Some(&3)
        })
        .await;
        // As after a crash before the position was committed: the event comes back.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while log.groups().await.unwrap().iter().any(|g| g.lag > 0) {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        log.replay("g", None, ReplayFrom::Earliest).await.unwrap();
        wait_for("second exhaustion", || {
            h.attempts.lock().unwrap().get(&0) == Some(&6)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            log.dead_letters(Some("g"), true).await.unwrap().len(),
            1,
            "{}",
            b.name()
        );
        assert_eq!(
            log.tail("dlq.g", ReplayFrom::Earliest, 10)
                .await
                .unwrap()
                .len(),
            1,
            "{}",
            b.name()
        );
        stop.send(true).unwrap();
        s.task.await.unwrap();
    }
}

/// Counts deliveries per event `n` across every instance of a group.
#[derive(Clone, Default)]
struct Tally(
    Arc<Mutex<HashMap<i64, u32>>>,
    Arc<Mutex<Vec<(String, i64)>>>,
);

impl Handler for Tally {
    async fn handle(&self, e: &RecordedEvent) -> Result<(), HandlerError> {
        let p = &e.envelope.payload;
        let n = p["n"].as_i64().unwrap();
        *self.0.lock().unwrap().entry(n).or_default() += 1;
        self.1
            .lock()
            .unwrap()
            .push((p["key"].as_str().unwrap().to_owned(), n));
        Ok(())
    }
}

#[tokio::test]
async fn instances_share_a_group_by_lease_and_take_over_a_dead_one() {
    for b in backends(Durability::Full) {
        let lease = || LogOptions {
            lease: Duration::from_millis(900),
            ..opts()
        };
        // Two processes' views of one log, each with its own owner id.
        let (log_a, log_b) = (b.log(lease()).await, b.log(lease()).await);
        let tally = Tally::default();
        let (stop_a, rx_a) = watch::channel(false);
        let (stop_b, rx_b) = watch::channel(false);
        let sa = log_a
            .subscribe(
                ConsumerOptions::new("shared", &["jobs"]),
                tally.clone(),
                rx_a,
            )
            .await
            .unwrap();
        let sb = log_b
            .subscribe(
                ConsumerOptions::new("shared", &["jobs"]),
                tally.clone(),
                rx_b,
            )
            .await
            .unwrap();
        // Let the two rebalance to two partitions each.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut sent: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let batch: Vec<Envelope> = (0..200)
            .map(|n| {
                let key = format!("acct-{}", n % 11);
                sent.entry(key.clone()).or_default().push(n);
                ev("jobs", &key, n)
            })
            .collect();
        for (i, chunk) in batch.chunks(25).enumerate() {
            // Appends from both processes, as from two relays.
            let via = if i % 2 == 0 { &log_a } else { &log_b };
            via.append(chunk).await.unwrap();
        }
        wait_for("200 handled", || tally.0.lock().unwrap().len() >= 200).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            tally.0.lock().unwrap().values().all(|c| *c == 1),
            "each event handled once across both instances, {}",
            b.name()
        );
        let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (k, n) in tally.1.lock().unwrap().iter() {
            per_key.entry(k.clone()).or_default().push(*n);
        }
        assert_eq!(
            per_key,
            sent,
            "per-key order across instances, {}",
            b.name()
        );

        // Instance A dies without handing over (no lease release): B takes its
        // partitions once the leases lapse and handles everything after.
        sa.task.abort();
        let _ = sa.task.await;
        drop(stop_a);
        log_b
            .append(
                &(200..260)
                    .map(|n| ev("jobs", &format!("acct-{}", n % 11), n))
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        wait_for("taken over", || tally.0.lock().unwrap().len() >= 260).await;
        assert!(
            tally.0.lock().unwrap().values().all(|c| *c == 1),
            "nothing doubled by the takeover, {}",
            b.name()
        );
        stop_b.send(true).unwrap();
        sb.task.await.unwrap();
    }
}

/// The trace context seen inside the handler, per event id.
#[derive(Clone, Default)]
struct TraceSeen(Arc<Mutex<HashMap<uuid::Uuid, Option<flowline_telemetry::TraceContext>>>>);

impl Handler for TraceSeen {
    async fn handle(&self, e: &RecordedEvent) -> Result<(), HandlerError> {
        let ctx = flowline_telemetry::trace::current_context();
        self.0.lock().unwrap().insert(e.envelope.id, ctx);
        Ok(())
    }
}

#[tokio::test]
async fn a_trace_continues_across_the_log_into_the_handler() {
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let s = tracing_subscriber::registry().with(flowline_telemetry::TraceLayer);
        tracing::subscriber::set_global_default(s).expect("first subscriber");
        flowline_telemetry::trace::enable();
    });
    for b in backends(Durability::Full) {
        let log = b.log(opts()).await;
        let db = service_db(&b, "traced").await;
        let e = ev("traced", "k", 1);
        let request = tracing::info_span!("request", route = "/test");
        let req_ctx = async {
            let mut tx = db.begin().await.unwrap();
            outbox::enqueue(&mut tx, &e).await.unwrap();
            tx.commit().await.unwrap();
            flowline_telemetry::trace::current_context().expect("a recorded trace")
        }
        .instrument(request)
        .await;
        Relay::new(db.clone(), log.clone()).drain().await.unwrap();
        // The envelope in the log carries the publish span's context.
        let got = log.tail("traced", ReplayFrom::Earliest, 10).await.unwrap();
        let tp = got[0]
            .envelope
            .traceparent
            .clone()
            .expect("traceparent in the log");
        let publish = flowline_telemetry::TraceContext::parse(&tp).expect("valid");
        assert_eq!(publish.trace_id, req_ctx.trace_id, "{}", b.name());
        assert_ne!(publish.span_id, req_ctx.span_id);

        let seen = TraceSeen::default();
        let (stop, stop_rx) = watch::channel(false);
        let sub = log
            .subscribe(
                ConsumerOptions::new("tracer", &["traced"]),
                seen.clone(),
                stop_rx,
            )
            .await
            .unwrap();
        wait_for("the handler", || seen.0.lock().unwrap().contains_key(&e.id)).await;
        let _ = stop.send(true);
        sub.task.await.unwrap();
        let in_handler = seen.0.lock().unwrap()[&e.id].expect("handler inside the trace");
        assert_eq!(in_handler.trace_id, req_ctx.trace_id, "{}", b.name());

        // The recorded spans chain: request → publish → event (and the relay hop).
        let trace = req_ctx.trace_hex();
        let mut spans = Vec::new();
        for _ in 0..100 {
            spans.extend(
                flowline_telemetry::trace::drain()
                    .into_iter()
                    .filter(|s| s.trace_id == trace),
            );
            if spans.iter().any(|s| s.name == "event") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let find = |name: &str| {
            spans
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
                .clone()
        };
        let (req, publ, relay, handled) = (
            find("request"),
            find("publish"),
            find("relay"),
            find("event"),
        );
        assert_eq!(publ.parent_id.as_deref(), Some(req.span_id.as_str()));
        assert_eq!(publ.span_id, format!("{:016x}", publish.span_id));
        assert_eq!(relay.parent_id.as_deref(), Some(publ.span_id.as_str()));
        assert_eq!(handled.parent_id.as_deref(), Some(publ.span_id.as_str()));
        assert_eq!(handled.attrs["group"], "tracer");
        assert_eq!(handled.attrs["event_type"], "test.happened");
    }
}
