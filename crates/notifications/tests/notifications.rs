//! Notifications against a real database: SQLite always, PostgreSQL too when
//! `FLOWLINE_TEST_POSTGRES_URL` is set. Events are fed to the consumer as the
//! log would deliver them; one test runs the real log, consumer and dispatcher.

use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_notifications::{
    Channel, DeliveryFilter, DeliveryStatus, NewTemplate, Notifications, Notifier, NotifyConfig,
    OptOut, Preferences, SmtpConfig, DIRECTORY_GROUP, DIRECTORY_TOPICS, GROUP, TOPICS,
};
use flowline_store::outbox::Relay;
use flowline_store::{Backend, ConsumerOptions, Db, Durability, EventLog, Handler, LogOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct Env {
    name: &'static str,
    db: Db,
    log: EventLog,
    relay: Relay,
    mailbox: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A notifications instance on this environment's database.
    async fn open(&self, tweak: impl FnOnce(&mut NotifyConfig)) -> Arc<Notifications> {
        let mut cfg = NotifyConfig {
            mailbox_dir: self.mailbox.clone(),
            poll: Duration::from_millis(50),
            ..NotifyConfig::default()
        };
        tweak(&mut cfg);
        let n = Notifications::open(self.db.clone(), self.relay.clone(), cfg)
            .await
            .expect("open notifications");
        Arc::new(n)
    }
}

async fn envs() -> Vec<Env> {
    let mut backends = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    backends.push((
        Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: Durability::Relaxed,
        },
        dir,
    ));
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        backends.push((
            Backend::Postgres {
                url,
                schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
                max_connections: 8,
            },
            tempfile::tempdir().unwrap(),
        ));
    }
    let mut v = Vec::new();
    for (backend, dir) in backends {
        let log = EventLog::open(&backend, LogOptions::default())
            .await
            .unwrap();
        let db = Db::open(&backend, "notifications").await.unwrap();
        let relay = Relay::new(db.clone(), log.clone());
        v.push(Env {
            name: backend.name(),
            mailbox: dir.path().join("mailbox"),
            db,
            log,
            relay,
            _dir: dir,
        });
    }
    v
}

fn event(topic: &str, event_type: &str, key: &str, payload: Value) -> RecordedEvent {
    RecordedEvent {
        partition: flowline_core::event::partition_for(key, 4),
        offset: 0,
        appended_at: Timestamp::now(),
        envelope: Envelope::stamp(
            EventDraft::new(topic, event_type, key, payload),
            &flowline_core::id::new_correlation_id(),
            None,
        ),
    }
}

fn registered(user: &str, email: &str, name: &str) -> RecordedEvent {
    event(
        "user.events",
        "user.registered",
        user,
        json!({"user_id": user, "email": email, "display_name": name, "role": "customer"}),
    )
}

fn confirmed(user: &str, number: &str) -> RecordedEvent {
    event(
        "orders.events",
        "order.confirmed",
        &format!("o-{number}"),
        json!({"order_id": format!("o-{number}"), "order_number": number, "user_id": user,
            "total": {"amount": 29990, "currency": "BRL"},
            "items": [{"product_id": "p1", "title": "Kettle", "quantity": 2},
                      {"product_id": "p2", "title": "Mug", "quantity": 1}]}),
    )
}

fn cancelled(user: &str, number: &str) -> RecordedEvent {
    event(
        "orders.events",
        "order.cancelled",
        &format!("o-{number}"),
        json!({"order_id": format!("o-{number}"), "order_number": number, "user_id": user,
            "reason": "payment declined"}),
    )
}

fn shipment(user: &str, number: &str, status: &str, tracking: Option<&str>) -> RecordedEvent {
    event(
        "shipping.events",
        &format!("shipment.{status}"),
        &format!("s-{number}"),
        json!({"shipment_id": format!("s-{number}"), "order_id": format!("o-{number}"),
            "order_number": number, "user_id": user, "status": status.to_uppercase(),
            "tracking_number": tracking, "at": "2026-05-01T10:00:00Z"}),
    )
}

async fn scalar(db: &Db, sql: &str) -> i64 {
    flowline_store::on_pool!(write db, |p| sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(p)
        .await)
    .expect(sql)
}

async fn outbox_count(db: &Db, event_type: &str) -> i64 {
    scalar(
        db,
        &format!("SELECT count(*) FROM outbox WHERE event_type = '{event_type}'"),
    )
    .await
}

fn eml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    v.sort();
    v
}

async fn all(n: &Notifications, user: Option<&str>) -> Vec<flowline_notifications::Delivery> {
    n.deliveries(&DeliveryFilter {
        status: None,
        user_id: user.map(str::to_owned),
        limit: 500,
    })
    .await
    .unwrap()
}

fn opt(channel: &str, kind: &str) -> OptOut {
    OptOut {
        channel: channel.into(),
        kind: kind.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_mails_one_welcome_however_often_it_is_delivered() {
    for env in envs().await {
        let name = env.name;
        let n = env.open(|_| {}).await;
        let notifier = Notifier(n.clone());
        let ev = registered("u1", "ana@example.com", "Ana Souza");
        notifier.handle(&ev).await.unwrap();
        notifier.handle(&ev).await.unwrap();
        assert_eq!(n.dispatch_once().await.unwrap(), 1, "{name}");
        notifier.handle(&ev).await.unwrap();
        assert_eq!(n.dispatch_once().await.unwrap(), 0, "{name}");

        let ds = all(&n, Some("u1")).await;
        assert_eq!(ds.len(), 1, "{name}: {ds:?}");
        let d = &ds[0];
        assert_eq!(d.channel, Channel::Email);
        assert_eq!(d.status, DeliveryStatus::Sent);
        assert_eq!(
            (d.template_key.as_str(), d.template_version, d.attempts),
            ("welcome", Some(1), 1)
        );
        assert_eq!(d.template_locale.as_deref(), Some("en"));
        assert_eq!(d.address.as_deref(), Some("ana@example.com"));
        assert!(d.sent_at.is_some() && d.last_error.is_none(), "{d:?}");

        let files = eml_files(&env.mailbox);
        assert_eq!(files.len(), 1, "{name}: {files:?}");
        assert_eq!(
            files[0].file_name().unwrap().to_str().unwrap(),
            format!("{}.eml", d.id)
        );
        let eml = std::fs::read_to_string(&files[0]).unwrap();
        assert!(eml.contains("To: \"Ana Souza\" <ana@example.com>"), "{eml}");
        assert!(
            eml.contains("Subject: Welcome to flowline, Ana Souza"),
            "{eml}"
        );
        assert!(
            eml.contains("From: flowline <no-reply@flowline.local>"),
            "{eml}"
        );
        assert!(
            eml.contains(&format!("Message-ID: <{}@flowline.local>", d.id)),
            "{eml}"
        );
        assert!(eml.contains("multipart/alternative"), "{eml}");
        assert!(
            eml.contains("text/html") && eml.contains("text/plain"),
            "{eml}"
        );

        let mail = n.mailbox(Some("ANA@example.com"), 10).await.unwrap();
        assert_eq!(mail.len(), 1, "{name}");
        assert_eq!(mail[0].subject, "Welcome to flowline, Ana Souza");
        assert!(mail[0].text.contains("ana@example.com"), "{:?}", mail[0]);
        assert_eq!(mail[0].path, files[0].display().to_string());
        assert!(n
            .mailbox(Some("bob@example.com"), 10)
            .await
            .unwrap()
            .is_empty());

        assert_eq!(
            outbox_count(&env.db, "notification.sent").await,
            1,
            "{name}"
        );
        let inbox = scalar(&env.db, "SELECT count(*) FROM inbox").await;
        assert_eq!(inbox, 1, "{name}");
        let r = n.recipient("u1").await.unwrap().unwrap();
        assert_eq!((r.locale.as_str(), r.active), ("en", true));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_events_reach_every_channel_the_user_did_not_opt_out_of() {
    for env in envs().await {
        let name = env.name;
        let n = env.open(|_| {}).await;
        let notifier = Notifier(n.clone());
        notifier
            .handle(&registered("u1", "ana@example.com", "Ana"))
            .await
            .unwrap();
        // The directory lags behind: retried, and nothing is kept meanwhile.
        let early = confirmed("u2", "1002");
        let err = notifier.handle(&early).await.unwrap_err();
        assert!(!err.permanent, "{name}: {}", err.message);
        assert!(all(&n, Some("u2")).await.is_empty());
        assert_eq!(scalar(&env.db, "SELECT count(*) FROM inbox").await, 1);
        notifier
            .handle(&registered("u2", "bob@example.com", "Bob"))
            .await
            .unwrap();
        notifier.handle(&early).await.unwrap();

        let order = confirmed("u1", "1001");
        notifier.handle(&order).await.unwrap();
        notifier.handle(&order).await.unwrap();
        notifier
            .handle(&event(
                "orders.events",
                "order.shipped_to_mars",
                "x",
                json!({}),
            ))
            .await
            .unwrap();
        while n.dispatch_once().await.unwrap() > 0 {}

        let mine = all(&n, Some("u1")).await;
        let mut channels: Vec<(&str, Channel)> = mine
            .iter()
            .map(|d| (d.template_key.as_str(), d.channel))
            .collect();
        channels.sort_by_key(|c| (c.0, c.1.as_str()));
        assert_eq!(
            channels,
            [
                ("order_confirmed", Channel::Email),
                ("order_confirmed", Channel::InApp),
                ("order_confirmed", Channel::Push),
                ("welcome", Channel::Email),
            ],
            "{name}"
        );
        assert!(
            mine.iter().all(|d| d.status == DeliveryStatus::Sent),
            "{mine:?}"
        );

        let inbox = n.in_app("u1", false, 10, None).await.unwrap();
        assert_eq!(inbox.len(), 1, "{name}");
        assert_eq!(inbox[0].kind, "order_confirmed");
        assert_eq!(inbox[0].title, "Order 1001 confirmed");
        assert!(inbox[0].body.contains("2 x Kettle"), "{}", inbox[0].body);
        assert!(inbox[0].body.contains("BRL 299.90"), "{}", inbox[0].body);
        assert_eq!(inbox[0].data["order_id"], "o-1001");
        assert!(inbox[0].read_at.is_none());
        let mail = n.mailbox(Some("ana@example.com"), 10).await.unwrap();
        assert_eq!(mail.len(), 2, "{name}");
        assert_eq!(mail[0].subject, "Order 1001 confirmed");
        let html = mail[0].html.as_deref().unwrap();
        assert!(html.contains("<b>1001</b>"), "{html}");
        let pushes = scalar(
            &env.db,
            "SELECT count(*) FROM push_log WHERE user_id = 'u1'",
        )
        .await;
        assert_eq!(pushes, 1, "{name}");

        let read = n.mark_read("u1", &inbox[0].id).await.unwrap();
        assert!(read.read_at.is_some());
        assert_eq!(
            n.mark_read("u1", &inbox[0].id).await.unwrap().read_at,
            read.read_at,
            "the first read time stays"
        );
        assert_eq!(
            n.mark_read("u2", &inbox[0].id).await.unwrap_err().0.status,
            404
        );
        assert!(n.in_app("u1", true, 10, None).await.unwrap().is_empty());
        assert_eq!(n.unread_count("u1").await.unwrap(), 0);

        // Email off for order confirmations, push off for everything.
        let prefs = Preferences {
            opt_out: vec![opt("email", "order_confirmed"), opt("push", "*")],
            locale: None,
        };
        n.set_preferences("u1", prefs.clone()).await.unwrap();
        let got = n.preferences("u1").await.unwrap();
        assert_eq!(got.opt_out.len(), 2);
        let bad = Preferences {
            opt_out: vec![opt("fax", "order_confirmed"), opt("email", "spam")],
            locale: Some("klingon".into()),
        };
        let e = n.set_preferences("u1", bad).await.unwrap_err();
        assert_eq!(e.0.status, 422);
        let fields: Vec<&str> = e.0.errors.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["opt_out[0].channel", "opt_out[1].type", "locale"]);
        assert_eq!(n.preferences("u1").await.unwrap(), got, "unchanged");

        notifier.handle(&confirmed("u1", "1003")).await.unwrap();
        notifier.handle(&cancelled("u1", "1003")).await.unwrap();
        while n.dispatch_once().await.unwrap() > 0 {}
        let later: Vec<(String, Channel)> = all(&n, Some("u1"))
            .await
            .into_iter()
            .filter(|d| d.template_key != "welcome" && d.event_id != order.envelope.id.to_string())
            .map(|d| (d.template_key, d.channel))
            .collect();
        let mut later = later;
        later.sort_by_key(|c| (c.0.clone(), c.1.as_str()));
        assert_eq!(
            later,
            [
                ("order_cancelled".to_string(), Channel::Email),
                ("order_cancelled".to_string(), Channel::InApp),
                ("order_confirmed".to_string(), Channel::InApp),
            ],
            "{name}: only in-app for the confirmation"
        );
        assert_eq!(n.in_app("u1", true, 10, None).await.unwrap().len(), 2);

        // A ban stops the queue; a rename shows in later messages.
        notifier
            .handle(&event(
                "user.events",
                "user.updated",
                "u2",
                json!({"user_id": "u2", "changed": ["display_name"], "display_name": "Roberto"}),
            ))
            .await
            .unwrap();
        notifier.handle(&cancelled("u2", "1002")).await.unwrap();
        n.dispatch_once().await.unwrap();
        let to_bob = n.mailbox(Some("bob@example.com"), 10).await.unwrap();
        assert!(
            to_bob[0].text.starts_with("Hi Roberto,"),
            "{}",
            to_bob[0].text
        );
        notifier
            .handle(&event(
                "user.events",
                "user.banned",
                "u2",
                json!({"user_id": "u2", "banned_by": "admin"}),
            ))
            .await
            .unwrap();
        let before = all(&n, Some("u2")).await.len();
        notifier
            .handle(&shipment("u2", "1002", "delivered", Some("TRK")))
            .await
            .unwrap();
        assert_eq!(all(&n, Some("u2")).await.len(), before, "{name}");
        assert!(!n.recipient("u2").await.unwrap().unwrap().active);

        let counts = n.counts().await.unwrap();
        assert_eq!((counts.queued, counts.retry, counts.dead), (0, 0, 0));
        assert_eq!(
            counts.sent,
            outbox_count(&env.db, "notification.sent").await,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locales_fall_back_and_new_template_versions_apply_to_later_deliveries() {
    for env in envs().await {
        let name = env.name;
        let n = env.open(|_| {}).await;
        let notifier = Notifier(n.clone());
        for (user, locale) in [("br", "pt-BR"), ("pt", "pt-PT"), ("fr", "fr-FR")] {
            notifier
                .handle(&registered(user, &format!("{user}@example.com"), user))
                .await
                .unwrap();
            let prefs = Preferences {
                opt_out: vec![],
                locale: Some(locale.to_lowercase()),
            };
            let set = n.set_preferences(user, prefs).await.unwrap();
            assert_eq!(set.locale.as_deref(), Some(locale), "normalised");
        }
        let pt = NewTemplate {
            subject: "Encomenda {{order_number}} cancelada".into(),
            text: "Olá {{name}}, a encomenda {{order_number}} foi cancelada.".into(),
            html: None,
        };
        let t = n.put_template("order_cancelled", "pt", pt).await.unwrap();
        assert_eq!((t.locale.as_str(), t.version), ("pt", 1));
        while n.dispatch_once().await.unwrap() > 0 {}

        for user in ["br", "pt", "fr"] {
            notifier.handle(&cancelled(user, "7")).await.unwrap();
        }
        while n.dispatch_once().await.unwrap() > 0 {}
        let subject = |user: &'static str| {
            let n = n.clone();
            async move {
                let m = n
                    .mailbox(Some(&format!("{user}@example.com")), 1)
                    .await
                    .unwrap();
                m[0].subject.clone()
            }
        };
        assert_eq!(subject("br").await, "Pedido 7 cancelado", "{name}: exact");
        assert_eq!(
            subject("pt").await,
            "Encomenda 7 cancelada",
            "{name}: language"
        );
        assert_eq!(subject("fr").await, "Order 7 cancelled", "{name}: English");
        let used = |user: &'static str| {
            let n = n.clone();
            async move {
                let d = all(&n, Some(user)).await;
                let d = d
                    .into_iter()
                    .find(|d| d.template_key == "order_cancelled" && d.channel == Channel::Email)
                    .unwrap();
                (
                    d.locale,
                    d.template_locale.unwrap(),
                    d.template_version.unwrap(),
                )
            }
        };
        assert_eq!(used("br").await, ("pt-BR".into(), "pt-BR".into(), 1));
        assert_eq!(used("pt").await, ("pt-PT".into(), "pt".into(), 1));
        assert_eq!(used("fr").await, ("fr-FR".into(), "en".into(), 1));
        // The in-app copy renders the same template.
        let inbox = n.in_app("br", false, 10, None).await.unwrap();
        assert_eq!(inbox[0].title, "Pedido 7 cancelado");

        // A new English version: later deliveries use it, earlier ones keep theirs.
        let v2 = NewTemplate {
            subject: "Your order {{order_number}} was cancelled".into(),
            text: "Hello {{name}}: order {{order_number}} is cancelled ({{reason}}).".into(),
            html: Some("<p>{{name}}: order {{order_number}} is cancelled.</p>".into()),
        };
        let t = n.put_template("order_cancelled", "en", v2).await.unwrap();
        assert_eq!(t.version, 2, "{name}");
        notifier.handle(&cancelled("fr", "8")).await.unwrap();
        while n.dispatch_once().await.unwrap() > 0 {}
        assert_eq!(subject("fr").await, "Your order 8 was cancelled");
        let fr = all(&n, Some("fr")).await;
        let versions: Vec<(String, Option<i64>)> = fr
            .iter()
            .filter(|d| d.template_key == "order_cancelled" && d.channel == Channel::Email)
            .map(|d| (d.template_key.clone(), d.template_version))
            .collect();
        assert_eq!(
            versions,
            [
                ("order_cancelled".into(), Some(2)),
                ("order_cancelled".into(), Some(1))
            ]
        );
        let listed = n.templates().await.unwrap();
        let cancelled_en: Vec<i64> = listed
            .iter()
            .filter(|t| t.key == "order_cancelled" && t.locale == "en")
            .map(|t| t.version)
            .collect();
        assert_eq!(cancelled_en, [2, 1]);

        // A version that does not render with the type's variables is refused.
        let bad = NewTemplate {
            subject: "{{coupon}} for {{name}}".into(),
            text: "{{name".into(),
            html: None,
        };
        let e = n
            .put_template("order_cancelled", "en", bad)
            .await
            .unwrap_err();
        assert_eq!(e.0.status, 422);
        let fields: Vec<&str> = e.0.errors.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["subject", "text"], "{:?}", e.0.errors);
        let ok = || NewTemplate {
            subject: "s".into(),
            text: "t".into(),
            html: None,
        };
        assert_eq!(
            n.put_template("nope", "en", ok())
                .await
                .unwrap_err()
                .0
                .status,
            404
        );
        assert_eq!(
            n.put_template("welcome", "xx-yyy", ok())
                .await
                .unwrap_err()
                .0
                .status,
            422
        );

        // An event without a variable its template needs: dead at once, the reason kept.
        notifier
            .handle(&shipment("fr", "8", "in_transit", None))
            .await
            .unwrap();
        while n.dispatch_once().await.unwrap() > 0 {}
        let dead: Vec<_> = all(&n, Some("fr"))
            .await
            .into_iter()
            .filter(|d| d.template_key == "shipment_in_transit")
            .collect();
        assert_eq!(dead.len(), 2, "{name}: email and in-app");
        for d in &dead {
            assert_eq!(d.status, DeliveryStatus::Dead, "{d:?}");
            assert_eq!(d.attempts, 1, "permanent: no retries");
            assert!(
                d.last_error.as_deref().unwrap().contains("tracking_number"),
                "{d:?}"
            );
        }
        assert_eq!(outbox_count(&env.db, "notification.dead_lettered").await, 2);
    }
}

/// What a minimal SMTP server received: one transcript per session.
type Transcripts = Arc<Mutex<Vec<String>>>;

/// A tiny SMTP server on a free loopback port; stops with the test's runtime.
async fn smtp_server() -> (u16, Transcripts) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: Transcripts = Arc::default();
    let sessions = got.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sessions = sessions.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                let mut log = String::new();
                let mut in_data = false;
                w.write_all(b"220 test.local ESMTP\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.push_str(&line);
                    log.push('\n');
                    let reply: &[u8] = if in_data {
                        if line == "." {
                            in_data = false;
                            b"250 2.0.0 queued\r\n"
                        } else {
                            continue;
                        }
                    } else {
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        match verb.as_str() {
                            "EHLO" | "HELO" => b"250 test.local\r\n",
                            "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.1.0 ok\r\n",
                            "DATA" => {
                                in_data = true;
                                b"354 end with <CRLF>.<CRLF>\r\n"
                            }
                            "QUIT" => {
                                let _ = w.write_all(b"221 bye\r\n").await;
                                break;
                            }
                            _ => b"502 5.5.2 not implemented\r\n",
                        }
                    };
                    if w.write_all(reply).await.is_err() {
                        break;
                    }
                }
                sessions.lock().unwrap().push(log);
            });
        }
    });
    (port, got)
}

fn smtp(port: u16) -> SmtpConfig {
    SmtpConfig {
        host: "127.0.0.1".into(),
        port,
        timeout: Duration::from_secs(5),
        ..SmtpConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_out_through_a_real_smtp_server() {
    for env in envs().await {
        let name = env.name;
        let (port, got) = smtp_server().await;
        let n = env.open(|c| c.smtp = Some(smtp(port))).await;
        let notifier = Notifier(n.clone());
        notifier
            .handle(&registered("u1", "ana@example.com", "Ana"))
            .await
            .unwrap();
        assert_eq!(n.dispatch_once().await.unwrap(), 1);
        let d = &all(&n, Some("u1")).await[0];
        assert_eq!(d.status, DeliveryStatus::Sent, "{name}: {d:?}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sessions = got.lock().unwrap().clone();
        assert_eq!(sessions.len(), 1, "{name}: {sessions:?}");
        let s = &sessions[0];
        assert!(s.contains("MAIL FROM:<no-reply@flowline.local>"), "{s}");
        assert!(s.contains("RCPT TO:<ana@example.com>"), "{s}");
        assert!(s.contains("Subject: Welcome to flowline, Ana"), "{s}");
        assert!(
            s.contains(&format!("Message-ID: <{}@flowline.local>", d.id)),
            "{s}"
        );
        assert!(
            eml_files(&env.mailbox).is_empty(),
            "SMTP, not the local mailbox"
        );
        assert!(n.mailbox(None, 10).await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_smtp_server_is_retried_with_backoff_then_dead_lettered() {
    for env in envs().await {
        let name = env.name;
        // A port nobody listens on: connections are refused.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let n = env
            .open(|c| {
                c.smtp = Some(smtp(port));
                c.max_attempts = 3;
                c.backoff_base = Duration::from_millis(200);
                c.backoff_max = Duration::from_secs(1);
            })
            .await;
        let notifier = Notifier(n.clone());
        notifier
            .handle(&registered("u1", "ana@example.com", "Ana"))
            .await
            .unwrap();
        let mut gaps = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let handled = n.dispatch_once().await.unwrap();
            let d = all(&n, Some("u1")).await.remove(0);
            if handled > 0 && d.status == DeliveryStatus::Retry {
                let next = Timestamp::parse_rfc3339(&d.next_attempt_at).unwrap();
                let at = Timestamp::parse_rfc3339(&d.updated_at).unwrap();
                gaps.push(next.as_micros() - at.as_micros());
                // Not due yet: nothing to do before the backoff ends.
                assert_eq!(n.dispatch_once().await.unwrap(), 0, "{name}");
            }
            if d.status == DeliveryStatus::Dead {
                assert_eq!(d.attempts, 3, "{name}");
                let err = d.last_error.unwrap();
                assert!(err.starts_with("smtp:"), "{name}: {err}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: never dead: {d:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(gaps, [200_000, 400_000], "{name}: exponential backoff");
        let counts = n.counts().await.unwrap();
        assert_eq!((counts.dead, counts.sent), (1, 0));
        let dead = n
            .deliveries(&DeliveryFilter {
                status: Some(DeliveryStatus::Dead),
                user_id: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(outbox_count(&env.db, "notification.dead_lettered").await, 1);
        assert_eq!(outbox_count(&env.db, "notification.sent").await, 0);
        assert_eq!(n.dispatch_once().await.unwrap(), 0, "DEAD is final");
        // Until an admin sends it again (the relay is back): attempts restart.
        let id = dead[0].id.clone();
        assert_eq!(n.retry_dead(&id).await.unwrap(), Some(true), "{name}");
        let d = n.delivery(&id).await.unwrap().unwrap();
        assert_eq!((d.status, d.attempts), (DeliveryStatus::Retry, 0), "{name}");
        assert_eq!(n.retry_dead(&id).await.unwrap(), Some(false), "only DEAD");
        assert_eq!(n.retry_dead("no-such-delivery").await.unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_that_dies_after_claiming_leaves_the_delivery_to_another_once() {
    for env in envs().await {
        let name = env.name;
        // Accepts connections and never greets: the send hangs after the claim.
        let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = hang.local_addr().unwrap().port();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(1);
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = hang.accept().await {
                held.push(s);
                let _ = accepted_tx.send(()).await;
            }
        });
        let lease = Duration::from_secs(1);
        let doomed = env
            .open(|c| {
                c.smtp = Some(smtp(port));
                c.lease = lease;
            })
            .await;
        let survivor = env.open(|c| c.lease = lease).await;
        Notifier(survivor.clone())
            .handle(&registered("u1", "ana@example.com", "Ana"))
            .await
            .unwrap();

        let crashed = {
            let doomed = doomed.clone();
            tokio::spawn(async move { doomed.dispatch_once().await })
        };
        tokio::time::timeout(Duration::from_secs(5), accepted.recv())
            .await
            .expect("the doomed dispatcher claimed and connected");
        crashed.abort();
        assert!(crashed.await.unwrap_err().is_cancelled());
        let d = &all(&survivor, None).await[0];
        assert_eq!(
            (d.status, d.attempts),
            (DeliveryStatus::Queued, 1),
            "{name}"
        );

        // Leased: another dispatcher leaves it alone until the lease expires.
        assert_eq!(survivor.dispatch_once().await.unwrap(), 0, "{name}");
        tokio::time::sleep(lease + Duration::from_millis(100)).await;
        assert_eq!(survivor.dispatch_once().await.unwrap(), 1, "{name}");
        assert_eq!(survivor.dispatch_once().await.unwrap(), 0, "{name}");
        let d = &all(&survivor, None).await[0];
        assert_eq!((d.status, d.attempts), (DeliveryStatus::Sent, 2), "{name}");
        assert_eq!(eml_files(&env.mailbox).len(), 1, "{name}");
        assert_eq!(outbox_count(&env.db, "notification.sent").await, 1);
        holder.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dispatchers_send_each_delivery_once() {
    for env in envs().await {
        let name = env.name;
        let first = env.open(|_| {}).await;
        let notifier = Notifier(first.clone());
        for i in 0..30 {
            notifier
                .handle(&registered(
                    &format!("u{i}"),
                    &format!("u{i}@example.com"),
                    "U",
                ))
                .await
                .unwrap();
        }
        let mut dispatchers = vec![first];
        for _ in 0..2 {
            dispatchers.push(env.open(|_| {}).await);
        }
        let tasks: Vec<_> = dispatchers
            .into_iter()
            .map(|n| {
                tokio::spawn(async move {
                    let mut handled = 0;
                    loop {
                        let k = n.dispatch_once().await.unwrap();
                        if k == 0 {
                            return handled;
                        }
                        handled += k;
                    }
                })
            })
            .collect();
        let mut handled = 0;
        for t in tasks {
            handled += t.await.unwrap();
        }
        let n = env.open(|_| {}).await;
        let ds = all(&n, None).await;
        assert_eq!(handled, 30, "{name}");
        assert!(
            ds.iter()
                .all(|d| d.status == DeliveryStatus::Sent && d.attempts == 1),
            "{name}: {ds:?}"
        );
        assert_eq!(eml_files(&env.mailbox).len(), 30, "{name}");
        assert_eq!(
            outbox_count(&env.db, "notification.sent").await,
            30,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_consumer_and_dispatcher_deliver_end_to_end() {
    for env in envs().await {
        let name = env.name;
        let n = env.open(|_| {}).await;
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let mut subs = Vec::new();
        for (group, topics) in [(GROUP, TOPICS), (DIRECTORY_GROUP, DIRECTORY_TOPICS)] {
            let opts = ConsumerOptions::new(group, topics);
            let sub = env
                .log
                .subscribe(opts, Notifier(n.clone()), shutdown.clone());
            subs.push(sub.await.unwrap());
        }
        let dispatcher = tokio::spawn(n.clone().run(shutdown.clone()));
        // The order arrives before the registration it needs: retried until
        // the directory (moving in its own group) has the user.
        let order = confirmed("u1", "42");
        env.log
            .append(&[
                order.envelope.clone(),
                shipment("u1", "42", "delivered", Some("TRK42")).envelope,
            ])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        env.log
            .append(&[registered("u1", "ana@example.com", "Ana").envelope])
            .await
            .unwrap();
        // Redelivered by the log itself: the inbox makes it a no-op.
        env.log
            .append(std::slice::from_ref(&order.envelope))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let c = n.counts().await.unwrap();
            if c.sent == 7 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name}: {c:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.send(true).unwrap();
        for sub in subs {
            sub.task.await.unwrap();
        }
        dispatcher.await.unwrap();
        let dead = env.log.dead_letters(None, true).await.unwrap();
        assert!(dead.is_empty(), "{name}: {dead:?}");
        assert_eq!(n.mailbox(None, 10).await.unwrap().len(), 3, "{name}");
        assert_eq!(n.in_app("u1", false, 10, None).await.unwrap().len(), 2);

        // The sent events travel on through the outbox to the log.
        env.relay.drain().await.unwrap();
        let p = flowline_core::event::partition_for("u1", 4);
        let sent = env
            .log
            .read("notifications.events", p, 0, 100)
            .await
            .unwrap();
        assert_eq!(sent.len(), 7, "{name}");
        assert!(sent
            .iter()
            .all(|e| e.envelope.event_type == "notification.sent"));
        let welcome = sent
            .iter()
            .find(|e| e.envelope.payload["type"] == "welcome")
            .unwrap();
        assert_eq!(welcome.envelope.payload["channel"], "email");
        assert_eq!(welcome.envelope.payload["template_version"], 1);
    }
}

mod http {
    use super::*;
    use axum::body::Body;
    use axum::http::{header, Method, Request, StatusCode};
    use flowline_http::Principal;
    use tower::ServiceExt;
    use utoipa::OpenApi;

    async fn call(
        router: &axum::Router,
        user: &str,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let mut req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        req.extensions_mut().insert(Principal {
            user_id: user.into(),
            session_id: "s".into(),
            roles: vec![],
        });
        let res = router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v)
    }

    #[tokio::test]
    async fn the_routes_answer_with_pages_and_problems() {
        let env = envs().await.remove(0);
        let n = env.open(|_| {}).await;
        let (user, admin): (axum::Router, axum::Router) =
            flowline_notifications::routes::routes(n.clone());
        let notifier = Notifier(n.clone());
        notifier
            .handle(&registered("u1", "ana@example.com", "Ana"))
            .await
            .unwrap();
        for i in 0..3 {
            notifier
                .handle(&confirmed("u1", &format!("10{i}")))
                .await
                .unwrap();
        }
        while n.dispatch_once().await.unwrap() > 0 {}

        let (s, page) = call(&user, "u1", Method::GET, "/notifications?limit=2", None).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert_eq!(page["items"].as_array().unwrap().len(), 2);
        assert_eq!(
            page["items"][0]["title"], "Order 102 confirmed",
            "newest first"
        );
        assert_eq!(page["unread"], 3);
        let cursor = page["next_cursor"].as_str().unwrap();
        let (_, rest) = call(
            &user,
            "u1",
            Method::GET,
            &format!("/notifications?limit=2&cursor={cursor}"),
            None,
        )
        .await;
        assert_eq!(rest["items"].as_array().unwrap().len(), 1);
        assert_eq!(rest["items"][0]["title"], "Order 100 confirmed");
        assert_eq!(rest["next_cursor"], Value::Null);
        let id = page["items"][0]["id"].as_str().unwrap();
        let (s, read) = call(
            &user,
            "u1",
            Method::POST,
            &format!("/notifications/{id}/read"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert!(read["read_at"].is_string());
        let (s, p) = call(
            &user,
            "u2",
            Method::POST,
            &format!("/notifications/{id}/read"),
            None,
        )
        .await;
        assert_eq!(
            (s, p["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        let (_, unread) = call(&user, "u1", Method::GET, "/notifications?unread=true", None).await;
        assert_eq!(unread["items"].as_array().unwrap().len(), 2);
        let (s, _) = call(&user, "u1", Method::GET, "/notifications?limit=0", None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);

        let (s, p) = call(
            &user,
            "u1",
            Method::PUT,
            "/notifications/preferences",
            Some(json!({"opt_out": [{"channel": "sms", "type": "*"}, {"channel": "*", "type": "spam"}]})),
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        assert_eq!(p["code"], "validation_failed");
        assert_eq!(p["errors"][0]["field"], "opt_out[0].channel");
        assert_eq!(p["errors"][1]["field"], "opt_out[1].type");
        let body =
            json!({"opt_out": [{"channel": "push", "type": "order_confirmed"}], "locale": "pt-br"});
        let (s, p) = call(
            &user,
            "u1",
            Method::PUT,
            "/notifications/preferences",
            Some(body),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{p}");
        let (_, p) = call(&user, "u1", Method::GET, "/notifications/preferences", None).await;
        assert_eq!(
            p,
            json!({"opt_out": [{"channel": "push", "type": "order_confirmed"}], "locale": "pt-BR"})
        );

        let (s, m) = call(
            &admin,
            "a",
            Method::GET,
            "/admin/mailbox?to=ana@example.com&limit=2",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{m}");
        assert_eq!(m["items"].as_array().unwrap().len(), 2);
        assert_eq!(m["items"][0]["to"], "ana@example.com");
        assert!(m["items"][0]["path"].as_str().unwrap().ends_with(".eml"));

        let (s, d) = call(
            &admin,
            "a",
            Method::GET,
            "/admin/notifications/deliveries?status=SENT&user_id=u1",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{d}");
        assert_eq!(d["items"].as_array().unwrap().len(), 10);
        assert_eq!(d["counts"]["sent"], 10);
        assert_eq!(d["counts"]["dead"], 0);
        let first = &d["items"][0];
        assert_eq!(first["status"], "SENT");
        assert_eq!(first["template_version"], 1);
        assert!(first["channel"].is_string() && first["template_locale"] == "en");
        let (s, _) = call(
            &admin,
            "a",
            Method::GET,
            "/admin/notifications/deliveries?status=LOST",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);

        let (s, t) = call(
            &admin,
            "a",
            Method::GET,
            "/admin/notification-templates",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(t["items"].as_array().unwrap().len(), 18);
        assert_eq!(t["kinds"].as_array().unwrap().len(), 9);
        let (s, t) = call(
            &admin,
            "a",
            Method::PUT,
            "/admin/notification-templates/welcome/en",
            Some(json!({"subject": "Hi {{name}}", "text": "Welcome, {{name}} ({{email}})"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{t}");
        assert_eq!(
            (t["version"].as_i64(), t["html"].is_null()),
            (Some(2), true)
        );
        let (s, p) = call(
            &admin,
            "a",
            Method::PUT,
            "/admin/notification-templates/welcome/en",
            Some(json!({"subject": "Hi", "text": "{{order_number}}", "html": "<p>{{name}}</p>"})),
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        assert_eq!(p["errors"][0]["field"], "text");
        let (s, _) = call(
            &admin,
            "a",
            Method::PUT,
            "/admin/notification-templates/nope/en",
            Some(json!({"subject": "s", "text": "t"})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        let doc = flowline_notifications::routes::NotificationsApi::openapi();
        let paths: Vec<&String> = doc.paths.paths.keys().collect();
        assert_eq!(paths.len(), 8, "{paths:?}");
        assert!(doc
            .paths
            .paths
            .contains_key("/api/v1/admin/notification-templates/{key}/{locale}"));
    }
}
