//! Assembly: opens the stores, starts relays and consumers, builds the router,
//! and shuts everything down in order.

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::probe::Probe;
use anyhow::Context;
use flowline_http::cache::ResponseCache;
use flowline_http::ratelimit::{MemoryRateLimiter, RateLimiter};
use flowline_identity::Identity;
use flowline_store::outbox::Relay;
use flowline_store::{Backend, Db, EventLog};
use flowline_store::{ConsumerOptions, Handler, HandlerError, ReplayFrom};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct AppState {
    pub settings: Settings,
    pub log: EventLog,
    pub metrics: Metrics,
    /// Every service database, for readiness.
    pub databases: Vec<(&'static str, Db)>,
    pub probe: Option<Probe>,
    pub identity: Arc<Identity>,
    pub limiter: Arc<dyn RateLimiter>,
    pub cache: Arc<ResponseCache>,
    pub catalog: Arc<flowline_catalog::Catalog>,
    pub search: flowline_search::routes::SearchState,
    pub inventory: Arc<flowline_inventory::Inventory>,
    pub payments: Arc<flowline_payments::Payments>,
    pub carts: Arc<flowline_cart::Carts>,
    pub ledger: Arc<flowline_ledger::Ledger>,
    pub shipping: Arc<flowline_shipping::Shipping>,
    pub orders: Arc<flowline_orders::Orders>,
    pub notifications: Arc<flowline_notifications::Notifications>,
    pub messaging: Arc<flowline_messaging::Messaging>,
    pub gateway: Arc<flowline_messaging::Gateway>,
    /// The local trace store (`telemetry.traces`).
    pub traces: Option<crate::traces::TraceStore>,
    /// Request latency samples on their way to `gateway.requests`.
    pub samples: Arc<crate::traces::RequestSamples>,
    pub audit: Arc<flowline_audit::Audit>,
    pub analytics: Arc<flowline_analytics::Analytics>,
}

impl AppState {
    /// `Err(name)` of the first store that does not answer.
    pub async fn ready(&self) -> Result<(), String> {
        self.log.ping().await.map_err(|_| "event log".to_owned())?;
        for (name, db) in &self.databases {
            db.ping().await.map_err(|_| format!("{name} database"))?;
        }
        Ok(())
    }
}

/// Applies every context's migrations (enabled or not) without starting any work.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let backend = settings.backend()?;
    let _lock = match &backend {
        Backend::Sqlite { dir, .. } => Some(DataDirLock::acquire(dir)?),
        Backend::Postgres { .. } => None,
    };
    let log = settings.open_log(&backend).await?;
    let probe = Db::open(&backend, "probe").await?;
    crate::probe::migrate(&probe).await?;
    probe.close().await;
    let identity = open_identity(settings, &log).await?;
    identity.db.close().await;
    let catalog_db = Db::open(&backend, "catalog").await?;
    let metrics = flowline_cache::CacheMetrics::default();
    let relay = Relay::new(catalog_db.clone(), log.clone());
    flowline_catalog::Catalog::open(catalog_db.clone(), relay, &metrics).await?;
    let db = Db::open(&backend, "inventory").await?;
    flowline_inventory::Inventory::open(db.clone(), Relay::new(db.clone(), log.clone()), &metrics)
        .await?;
    db.close().await;
    let db = Db::open(&backend, "payments").await?;
    open_payments(settings, db.clone(), &log).await?;
    db.close().await;
    let db = Db::open(&backend, "cart").await?;
    let prices = Arc::new(CatalogPrices(Arc::new(
        flowline_catalog::Catalog::open(
            catalog_db.clone(),
            Relay::new(catalog_db.clone(), log.clone()),
            &metrics,
        )
        .await?,
    )));
    flowline_cart::open(db.clone(), Relay::new(db.clone(), log.clone()), prices).await?;
    db.close().await;
    open_ledger(settings, &log).await?.db.close().await;
    let db = Db::open(&backend, "shipping").await?;
    flowline_shipping::Shipping::open(db.clone(), Relay::new(db.clone(), log.clone())).await?;
    db.close().await;
    let db = Db::open(&backend, "orders").await?;
    db.migrate(flowline_store::outbox::KERNEL_MIGRATIONS)
        .await?;
    db.migrate(flowline_orders::MIGRATIONS).await?;
    db.migrate(flowline_saga::MIGRATIONS).await?;
    db.close().await;
    let db = Db::open(&backend, "notifications").await?;
    flowline_notifications::Notifications::open(
        db.clone(),
        Relay::new(db.clone(), log.clone()),
        settings.notify_config()?,
    )
    .await?;
    db.close().await;
    let db = Db::open(&backend, "messaging").await?;
    db.migrate(flowline_store::outbox::KERNEL_MIGRATIONS)
        .await?;
    db.migrate(flowline_messaging::MIGRATIONS).await?;
    db.migrate(flowline_saga::MIGRATIONS).await?;
    db.close().await;
    let db = Db::open(&backend, "audit").await?;
    flowline_audit::Audit::open(db.clone(), Relay::new(db.clone(), log.clone())).await?;
    db.close().await;
    let db = Db::open(&backend, "analytics").await?;
    flowline_analytics::Analytics::open(db.clone(), settings.analytics_config()).await?;
    db.close().await;
    let db = Db::open(&backend, "traces").await?;
    db.migrate(crate::traces::MIGRATIONS).await?;
    db.close().await;
    catalog_db.close().await;
    log.db().close().await;
    Ok(())
}

/// The identity context alone, for CLI commands (users, keys).
pub async fn open_identity(settings: &Settings, log: &EventLog) -> anyhow::Result<Identity> {
    let db = Db::open(&settings.backend()?, "identity").await?;
    let relay = Relay::new(db.clone(), log.clone());
    let identity = Identity::open(db.clone(), relay, settings.identity_config()).await?;
    with_sessions(settings, identity, db).await
}

/// Where sessions live: the identity database, or Redis when `cache.url` is one.
async fn with_sessions(
    settings: &Settings,
    identity: Identity,
    db: Db,
) -> anyhow::Result<Identity> {
    if !settings.cache.url.starts_with("redis://") {
        return Ok(identity);
    }
    // Distributed mode: sessions live in Redis, so a logout on one instance
    // holds on every instance at once.
    let store = flowline_identity::RedisSessionStore::connect(
        &settings.cache.url,
        settings.cache.key_prefix.clone(),
        db,
    )
    .await?;
    Ok(identity.with_session_store(Arc::new(store)))
}

/// Adds the Redis L2 to a context's cache when there is one.
fn l2<T>(
    ctx: T,
    redis: &Option<(flowline_cache::RedisConnection, String)>,
    with: fn(T, flowline_cache::RedisConnection, &str) -> T,
) -> T {
    match redis {
        Some((conn, prefix)) => with(ctx, conn.clone(), prefix),
        None => ctx,
    }
}

/// The rate limiter: per process, or cluster-wide in Redis.
async fn open_limiter(
    settings: &Settings,
    registry: &mut prometheus_client::registry::Registry,
) -> anyhow::Result<Arc<dyn RateLimiter>> {
    if !settings.cache.url.starts_with("redis://") {
        return Ok(Arc::new(MemoryRateLimiter::default()));
    }
    let limiter = flowline_http::ratelimit::RedisRateLimiter::connect(
        &settings.cache.url,
        settings.cache.key_prefix.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "connecting to Redis at {}",
            flowline_store::redact_url(&settings.cache.url)
        )
    })?;
    limiter.register(registry);
    Ok(Arc::new(limiter))
}

/// The payments context on `db`, with the built-in sandbox provider.
pub async fn open_payments(
    settings: &Settings,
    db: Db,
    log: &EventLog,
) -> anyhow::Result<flowline_payments::Payments> {
    let sandbox = Arc::new(flowline_payments::provider::Sandbox::new(
        db.clone(),
        settings.payments.sandbox_latency.0,
    ));
    let relay = Relay::new(db.clone(), log.clone());
    Ok(flowline_payments::Payments::open(db, relay, sandbox, settings.payments_config()).await?)
}

/// The ledger context alone (for `flowline ledger verify`, too).
pub async fn open_ledger(
    settings: &Settings,
    log: &EventLog,
) -> anyhow::Result<flowline_ledger::Ledger> {
    let db = Db::open(&settings.backend()?, "ledger").await?;
    let relay = Relay::new(db.clone(), log.clone());
    Ok(flowline_ledger::Ledger::open(db, relay).await?)
}

/// The gateway checks socket tokens with identity, as REST requests are.
struct IdentityTokens(Arc<Identity>);

impl flowline_messaging::TokenCheck for IdentityTokens {
    fn check<'a>(
        &'a self,
        token: &'a str,
    ) -> flowline_http::BoxFuture<'a, Result<flowline_http::Principal, flowline_http::ApiError>>
    {
        Box::pin(self.0.authenticate(token))
    }
}

/// Step 4 of the create-workspace saga: an in-app welcome, queued once per
/// workspace (its id is the notification's dedupe id).
struct WorkspaceWelcome(Arc<flowline_notifications::Notifications>);

impl flowline_messaging::WelcomeSender for WorkspaceWelcome {
    fn send<'a>(
        &'a self,
        w: flowline_messaging::saga::Welcome<'a>,
    ) -> flowline_saga::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let id = uuid::Uuid::parse_str(w.workspace_id).map_err(|e| e.to_string())?;
            let vars = [
                ("workspace_name".to_owned(), w.workspace_name.to_owned()),
                ("workspace_id".to_owned(), w.workspace_id.to_owned()),
            ]
            .into_iter()
            .collect();
            flowline_notifications::Notifier(self.0.clone())
                .request(id, w.correlation_id, w.user_id, "workspace_welcome", vars)
                .await
                .map_err(|e| e.message)
        })
    }
}

/// Carts read current prices through the catalog's API, never its tables.
struct CatalogPrices(Arc<flowline_catalog::Catalog>);

impl flowline_cart::PriceSource for CatalogPrices {
    fn product<'a>(
        &'a self,
        product_id: &'a str,
    ) -> flowline_http::BoxFuture<
        'a,
        Result<Option<flowline_cart::PricedProduct>, flowline_http::ApiError>,
    > {
        Box::pin(async move {
            match self.0.get(product_id).await {
                Ok(p) => Ok(Some(flowline_cart::PricedProduct {
                    title: p.title,
                    price: p.price,
                    in_stock: p.in_stock,
                })),
                Err(e) if e.0.code == flowline_core::ErrorCode::NotFound.as_str() => Ok(None),
                Err(e) => Err(e),
            }
        })
    }
}

/// The running application: state plus background tasks.
pub struct App {
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    relay_stop: watch::Sender<bool>,
    relays: Vec<JoinHandle<()>>,
    consumers: Vec<JoinHandle<()>>,
    housekeeping: Vec<JoinHandle<()>>,
    _lock: Option<DataDirLock>,
}

impl App {
    /// Opens stores (applying migrations) and starts background work.
    pub async fn start(settings: Settings) -> anyhow::Result<App> {
        let backend = settings.backend()?;
        let lock = match &backend {
            Backend::Sqlite { dir, .. } => Some(DataDirLock::acquire(dir)?),
            Backend::Postgres { .. } => None,
        };
        let log = settings.open_log(&backend).await?;
        if lock.is_some() && log.kind() == "embedded" {
            // Alone under the data-dir lock: a crashed run's partition leases
            // are free now, not when they lapse.
            log.release_all_leases().await?;
        }
        let mut metrics = Metrics::new(log.metrics());
        let cache = Arc::new(ResponseCache::new(100_000));
        cache.register(&mut metrics.registry);
        let cache_metrics = flowline_cache::CacheMetrics::default();
        cache_metrics.register(&mut metrics.registry);
        let (shutdown, shutdown_rx) = watch::channel(false);
        // Relays stop last, so events committed by consumers and sweepers
        // while they wind down still reach the log.
        let (relay_stop, relay_rx) = watch::channel(false);
        let mut databases = Vec::new();
        let mut relays = Vec::new();
        let mut consumers = Vec::new();

        let probe = if settings.probe.enabled {
            let db = Db::open(&backend, "probe").await?;
            let relay = Relay::new(db.clone(), log.clone());
            let (probe, tasks) =
                Probe::start(db.clone(), relay.clone(), &log, shutdown_rx.clone()).await?;
            consumers.extend(tasks);
            relays.push(tokio::spawn(relay.run(relay_rx.clone())));
            databases.push(("probe", db));
            Some(probe)
        } else {
            None
        };

        // Distributed mode: one Redis connection for the shared cache level.
        let redis = match settings.cache.url.starts_with("redis://") {
            true => Some((
                flowline_cache::connect_redis(&settings.cache.url)
                    .await
                    .with_context(|| {
                        format!(
                            "connecting to Redis at {}",
                            flowline_store::redact_url(&settings.cache.url)
                        )
                    })?,
                settings.cache.key_prefix.clone(),
            )),
            false => None,
        };
        let identity_db = Db::open(&backend, "identity").await?;
        let identity_relay = Relay::new(identity_db.clone(), log.clone());
        let identity = Identity::open(
            identity_db.clone(),
            identity_relay.clone(),
            settings.identity_config(),
        )
        .await?;
        let identity = Arc::new(with_sessions(&settings, identity, identity_db.clone()).await?);
        relays.push(tokio::spawn(identity_relay.run(relay_rx.clone())));
        databases.push(("identity", identity_db));

        let catalog_db = Db::open(&backend, "catalog").await?;
        let catalog_relay = Relay::new(catalog_db.clone(), log.clone());
        let catalog = Arc::new(l2(
            flowline_catalog::Catalog::open(
                catalog_db.clone(),
                catalog_relay.clone(),
                &cache_metrics,
            )
            .await?,
            &redis,
            flowline_catalog::Catalog::with_l2,
        ));
        // Every node drops its cached products when the catalog says they changed.
        let mut opts = ConsumerOptions::new(
            format!("cache.catalog.{}", settings.server.node_id),
            &[flowline_catalog::TOPIC],
        );
        opts.start = ReplayFrom::Latest;
        let dropper = CatalogCacheInvalidator(catalog.clone());
        consumers.push(
            log.subscribe(opts, dropper, shutdown_rx.clone())
                .await?
                .task,
        );
        relays.push(tokio::spawn(catalog_relay.run(relay_rx.clone())));
        databases.push(("catalog", catalog_db));

        let search = open_search(&settings, &log, &cache_metrics).await?;
        let group = format!("search.indexer.{}", settings.server.node_id);
        let indexer = flowline_search::Indexer(search.index.clone());
        let opts = ConsumerOptions::new(group, &[flowline_search::TOPIC]);
        consumers.push(
            log.subscribe(opts, indexer, shutdown_rx.clone())
                .await?
                .task,
        );

        let inventory_db = Db::open(&backend, "inventory").await?;
        let inventory_relay = Relay::new(inventory_db.clone(), log.clone());
        let inventory = Arc::new(l2(
            flowline_inventory::Inventory::open(
                inventory_db.clone(),
                inventory_relay.clone(),
                &cache_metrics,
            )
            .await?,
            &redis,
            flowline_inventory::Inventory::with_l2,
        ));
        relays.push(tokio::spawn(inventory_relay.run(relay_rx.clone())));
        databases.push(("inventory", inventory_db));
        // Every node drops its cached stock levels on other nodes' changes.
        let mut opts = ConsumerOptions::new(
            format!("cache.inventory.{}", settings.server.node_id),
            &[flowline_inventory::TOPIC],
        );
        opts.start = ReplayFrom::Latest;
        let dropper = InventoryCacheInvalidator(inventory.clone());
        consumers.push(
            log.subscribe(opts, dropper, shutdown_rx.clone())
                .await?
                .task,
        );
        // The catalog's `in_stock` follows availability (one group for the cluster).
        let opts = ConsumerOptions::new("catalog.stock", &[flowline_inventory::TOPIC]);
        let follower = StockFollower(catalog.clone(), inventory.clone());
        consumers.push(
            log.subscribe(opts, follower, shutdown_rx.clone())
                .await?
                .task,
        );

        let payments_db = Db::open(&backend, "payments").await?;
        let payments = Arc::new(open_payments(&settings, payments_db.clone(), &log).await?);
        relays.push(tokio::spawn(
            Relay::new(payments_db.clone(), log.clone()).run(relay_rx.clone()),
        ));
        databases.push(("payments", payments_db));

        let cart_db = Db::open(&backend, "cart").await?;
        let cart_relay = Relay::new(cart_db.clone(), log.clone());
        let carts = Arc::new(
            flowline_cart::open(
                cart_db.clone(),
                cart_relay.clone(),
                Arc::new(CatalogPrices(catalog.clone())),
            )
            .await?,
        );
        relays.push(tokio::spawn(cart_relay.run(relay_rx.clone())));
        databases.push(("cart", cart_db));

        let ledger = Arc::new(open_ledger(&settings, &log).await?);
        let ledger_db = ledger.db.clone();
        relays.push(tokio::spawn(
            Relay::new(ledger_db.clone(), log.clone()).run(relay_rx.clone()),
        ));
        databases.push(("ledger", ledger_db));
        // Billing: captured payments become invoices and journal entries.
        let opts = ConsumerOptions::new(
            flowline_ledger::BILLING_GROUP,
            &[flowline_ledger::PAYMENTS_TOPIC],
        );
        consumers.push(
            log.subscribe(
                opts,
                flowline_ledger::Billing(ledger.clone()),
                shutdown_rx.clone(),
            )
            .await?
            .task,
        );

        let shipping_db = Db::open(&backend, "shipping").await?;
        let shipping_relay = Relay::new(shipping_db.clone(), log.clone());
        let shipping = Arc::new(
            flowline_shipping::Shipping::open(shipping_db.clone(), shipping_relay.clone()).await?,
        );
        relays.push(tokio::spawn(shipping_relay.run(relay_rx.clone())));
        databases.push(("shipping", shipping_db));

        let orders_db = Db::open(&backend, "orders").await?;
        let orders_relay = Relay::new(orders_db.clone(), log.clone());
        let ports = Arc::new(crate::order_ports::ContextPorts {
            carts: carts.clone(),
            inventory: inventory.clone(),
            payments: payments.clone(),
            shipping: shipping.clone(),
        });
        let orders = flowline_orders::Orders::open(
            orders_db.clone(),
            orders_relay.clone(),
            ports,
            settings.orders_config(),
        )
        .await?;
        orders
            .orchestrator()
            .metrics()
            .register(&mut metrics.registry);
        if lock.is_some() {
            // Embedded and locked: no other runner exists, so any lease is a
            // dead process's and its sagas resume now, not when it expires.
            let n = orders.orchestrator().release_leases().await?;
            if n > 0 {
                tracing::info!(sagas = n, "resuming sagas a previous run left unfinished");
            }
        }
        relays.push(tokio::spawn(orders_relay.run(relay_rx.clone())));
        databases.push(("orders", orders_db));
        // Read models (user names, product titles) and shipment progress.
        let opts = ConsumerOptions::new(
            flowline_orders::FOLLOWER_GROUP,
            &flowline_orders::FOLLOWED_TOPICS,
        );
        consumers.push(
            log.subscribe(
                opts,
                flowline_orders::Follower(orders.clone()),
                shutdown_rx.clone(),
            )
            .await?
            .task,
        );

        let notify_db = Db::open(&backend, "notifications").await?;
        let notify_relay = Relay::new(notify_db.clone(), log.clone());
        let notifications = Arc::new(
            flowline_notifications::Notifications::open(
                notify_db.clone(),
                notify_relay.clone(),
                settings.notify_config()?,
            )
            .await?,
        );
        if lock.is_some() {
            // Alone under the data-dir lock: a dead run's leases are free.
            notifications.release_leases().await?;
        }
        relays.push(tokio::spawn(notify_relay.run(relay_rx.clone())));
        databases.push(("notifications", notify_db));
        // Two groups: the directory (user.events) must not wait behind an
        // order event that waits for its recipient.
        for (group, topics) in [
            (
                flowline_notifications::GROUP,
                flowline_notifications::TOPICS,
            ),
            (
                flowline_notifications::DIRECTORY_GROUP,
                flowline_notifications::DIRECTORY_TOPICS,
            ),
        ] {
            let mut opts = ConsumerOptions::new(group, topics);
            if group == flowline_notifications::GROUP {
                // Messages are about what happens from now on: a deployment
                // that adds notifications must not mail its whole history.
                // The directory group reads every user from the start.
                opts.start = ReplayFrom::Latest;
            }
            let notifier = flowline_notifications::Notifier(notifications.clone());
            consumers.push(
                log.subscribe(opts, notifier, shutdown_rx.clone())
                    .await?
                    .task,
            );
        }

        let messaging_db = Db::open(&backend, "messaging").await?;
        let messaging_relay = Relay::new(messaging_db.clone(), log.clone());
        let messaging = flowline_messaging::Messaging::open(
            messaging_db.clone(),
            messaging_relay.clone(),
            Arc::new(WorkspaceWelcome(notifications.clone())),
            settings.messaging_config(),
        )
        .await?;
        if let Some((conn, prefix)) = &redis {
            messaging.share_typing(conn.clone(), prefix);
        }
        messaging
            .orchestrator()
            .metrics()
            .register(&mut metrics.registry);
        if lock.is_some() {
            messaging.orchestrator().release_leases().await?;
        }
        relays.push(tokio::spawn(messaging_relay.run(relay_rx.clone())));
        databases.push(("messaging", messaging_db));
        let gateway = flowline_messaging::Gateway::new(
            messaging.clone(),
            Arc::new(IdentityTokens(identity.clone())),
        );
        gateway.metrics().register(&mut metrics.registry);
        // The directory and the feed: one group each for the cluster.
        let opts = ConsumerOptions::new(
            flowline_messaging::DIRECTORY_GROUP,
            &[flowline_identity::service::USER_TOPIC],
        );
        consumers.push(
            log.subscribe(
                opts,
                flowline_messaging::Directory(messaging.clone()),
                shutdown_rx.clone(),
            )
            .await?
            .task,
        );
        let mut opts = ConsumerOptions::new(
            flowline_messaging::FEED_GROUP,
            &flowline_messaging::FEED_TOPICS,
        );
        opts.start = ReplayFrom::Latest;
        consumers.push(
            log.subscribe(
                opts,
                flowline_messaging::FeedWriter(messaging.clone()),
                shutdown_rx.clone(),
            )
            .await?
            .task,
        );
        // Fan-out: every node reads every channel event, from now on.
        let mut opts = ConsumerOptions::new(
            format!("messaging.fanout.{}", settings.server.node_id),
            &flowline_messaging::FANOUT_TOPICS,
        );
        opts.start = ReplayFrom::Latest;
        consumers.push(
            log.subscribe(
                opts,
                flowline_messaging::Fanout(gateway.clone()),
                shutdown_rx.clone(),
            )
            .await?
            .task,
        );

        let housekeeping = vec![
            tokio::spawn(notifications.clone().run(shutdown_rx.clone())),
            tokio::spawn(orders.orchestrator().clone().run(shutdown_rx.clone())),
            tokio::spawn(messaging.orchestrator().clone().run(shutdown_rx.clone())),
            tokio::spawn(gateway.clone().run(shutdown_rx.clone())),
            tokio::spawn(sweep_reservations(
                inventory.clone(),
                settings.inventory.sweep_interval.0,
                shutdown_rx.clone(),
            )),
            tokio::spawn(reconcile_payments(
                payments.clone(),
                settings.payments.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(retention(
                log.clone(),
                settings.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(reload_keys(identity.clone(), shutdown_rx.clone())),
        ];
        // Each node drops its own cached responses: one group per node, from now on.
        let group = format!("gateway.cache.{}", settings.server.node_id);
        let mut opts = ConsumerOptions::new(group, &[flowline_identity::service::USER_TOPIC]);
        opts.start = ReplayFrom::Latest;
        let invalidator = CacheInvalidator(cache.clone());
        consumers.push(
            log.subscribe(opts, invalidator, shutdown_rx.clone())
                .await?
                .task,
        );

        // Audit: one hash chain for the cluster, fed by one group.
        let audit_db = Db::open(&backend, "audit").await?;
        let audit_relay = Relay::new(audit_db.clone(), log.clone());
        let audit = flowline_audit::Audit::open_with(
            audit_db.clone(),
            audit_relay.clone(),
            settings.audit_config(),
        )
        .await?;
        audit.register_metrics(&mut metrics.registry);
        consumers.push(
            log.subscribe(
                ConsumerOptions::new(flowline_audit::GROUP, flowline_audit::TOPICS),
                audit.clone(),
                shutdown_rx.clone(),
            )
            .await?
            .task,
        );
        relays.push(tokio::spawn(audit_relay.run(relay_rx.clone())));
        databases.push(("audit", audit_db));

        // Analytics: windows and sessions over the log, one group for the cluster.
        let analytics_db = Db::open(&backend, "analytics").await?;
        let analytics =
            flowline_analytics::Analytics::open(analytics_db.clone(), settings.analytics_config())
                .await?;
        analytics.metrics().register(&mut metrics.registry);
        consumers.push(
            log.subscribe(
                ConsumerOptions::new(flowline_analytics::GROUP, flowline_analytics::TOPICS),
                analytics.clone(),
                shutdown_rx.clone(),
            )
            .await?
            .task,
        );
        consumers.push(tokio::spawn(prune_analytics(
            analytics.clone(),
            settings.analytics.retention.0,
            shutdown_rx.clone(),
        )));
        databases.push(("analytics", analytics_db));

        // Traces: this node's spans go to the shared trace store; it stops
        // with the relays, so the last relay spans are kept too.
        let traces = if settings.telemetry.traces {
            let db = Db::open(&backend, "traces").await?;
            let store = crate::traces::TraceStore::open(
                db.clone(),
                &settings.server.node_id,
                settings.telemetry.max_spans,
            )
            .await?;
            flowline_telemetry::trace::enable();
            relays.push(tokio::spawn(crate::traces::run_flusher(
                store.clone(),
                settings.telemetry.otlp_endpoint.clone(),
                relay_rx.clone(),
            )));
            databases.push(("traces", db));
            Some(store)
        } else {
            None
        };
        let samples = Arc::new(crate::traces::RequestSamples::default());
        if settings.telemetry.request_samples {
            relays.push(tokio::spawn(crate::traces::run_sampler(
                samples.clone(),
                log.clone(),
                settings.server.node_id.clone(),
                relay_rx.clone(),
            )));
        }

        check_connection_budget(&log, databases.len() + 1, settings.database.max_connections).await;
        let limiter = open_limiter(&settings, &mut metrics.registry).await?;
        let state = Arc::new(AppState {
            settings,
            log,
            metrics,
            databases,
            probe,
            identity,
            limiter,
            cache,
            catalog,
            search,
            inventory,
            payments,
            carts,
            ledger,
            shipping,
            orders,
            notifications,
            messaging,
            gateway,
            traces,
            samples,
            audit,
            analytics,
        });
        Ok(App {
            state,
            shutdown,
            relay_stop,
            relays,
            consumers,
            housekeeping,
            _lock: lock,
        })
    }

    /// Stops background work: consumers finish the event in hand and
    /// sweepers their pass, then relays flush every outbox (so every committed
    /// event, including those just written, reaches the log).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.consumers.into_iter().chain(self.housekeeping) {
            let _ = t.await;
        }
        let _ = self.relay_stop.send(true);
        for t in self.relays {
            let _ = t.await;
        }
        for (_, db) in &self.state.databases {
            db.close().await;
        }
        self.state.log.db().close().await;
    }
}

/// Warns when the pools (one per service, `max_connections` each) could
/// open more connections than PostgreSQL allows: under load a pool would then
/// wait for a slot and time out (a 500) instead of queueing on its own.
async fn check_connection_budget(log: &EventLog, pools: usize, per_pool: u32) {
    let Db::Postgres { pool, .. } = log.db() else {
        return;
    };
    let allowed: Result<String, _> = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(pool)
        .await;
    let Some(allowed) = allowed.ok().and_then(|v| v.parse::<usize>().ok()) else {
        return;
    };
    let wanted = pools * per_pool as usize;
    if wanted > allowed.saturating_sub(3) {
        tracing::warn!(
            pools,
            per_pool,
            wanted,
            allowed,
            "the connection pools may want more connections than PostgreSQL allows; \
             lower database.max_connections to {} or raise PostgreSQL's max_connections",
            allowed.saturating_sub(3) / pools.max(1)
        );
    }
}

/// Deletes final analytics windows older than `retention`, hourly.
async fn prune_analytics(
    analytics: Arc<flowline_analytics::Analytics>,
    retention: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let before = flowline_core::Timestamp::from_micros(
            flowline_core::Timestamp::now().as_micros()
                - retention.as_micros().min(i64::MAX as u128) as i64,
        );
        if let Err(e) = analytics.prune(before).await {
            tracing::warn!(error = %e, "analytics prune failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Drops a user's cached responses when one of its events arrives.
struct CacheInvalidator(Arc<ResponseCache>);

impl Handler for CacheInvalidator {
    async fn handle(&self, ev: &flowline_core::RecordedEvent) -> Result<(), HandlerError> {
        self.0.invalidate_tag(&format!("user:{}", ev.envelope.key));
        Ok(())
    }
}

struct CatalogCacheInvalidator(Arc<flowline_catalog::Catalog>);

impl Handler for CatalogCacheInvalidator {
    async fn handle(&self, ev: &flowline_core::RecordedEvent) -> Result<(), HandlerError> {
        self.0.invalidate(&ev.envelope.key).await;
        Ok(())
    }
}

struct InventoryCacheInvalidator(Arc<flowline_inventory::Inventory>);

impl Handler for InventoryCacheInvalidator {
    async fn handle(&self, ev: &flowline_core::RecordedEvent) -> Result<(), HandlerError> {
        if let Some(id) = ev
            .envelope
            .payload
            .get("product_id")
            .and_then(|v| v.as_str())
        {
            self.0.invalidate(id).await;
        }
        for item in ev.envelope.payload["items"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(id) = item["product_id"].as_str() {
                self.0.invalidate(id).await;
            }
        }
        Ok(())
    }
}

/// Applies `product.stock_changed` to the catalog's `in_stock`. The event is
/// a trigger: the availability is read from inventory now (through its API),
/// so a late, replayed or retried event never writes an old value back.
struct StockFollower(
    Arc<flowline_catalog::Catalog>,
    Arc<flowline_inventory::Inventory>,
);

impl Handler for StockFollower {
    async fn handle(&self, ev: &flowline_core::RecordedEvent) -> Result<(), HandlerError> {
        if ev.envelope.event_type != "product.stock_changed" {
            return Ok(());
        }
        let Some(id) = ev.envelope.payload["product_id"].as_str() else {
            return Err(HandlerError::permanent(
                "product.stock_changed without product_id",
            ));
        };
        let in_stock = self
            .1
            .level_now(id)
            .await
            .map_err(HandlerError::transient)?
            .available
            > 0;
        let ctx = flowline_http::RequestContext::caused_by(&ev.envelope);
        self.0
            .set_in_stock(&ctx, id, in_stock)
            .await
            .map_err(|e| HandlerError::transient(format!("{}: {:?}", e.0.code, e.0.detail)))
    }
}

/// Releases reservations past their TTL (`inventory.reservation_expired`).
async fn sweep_reservations(
    inventory: Arc<flowline_inventory::Inventory>,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        match inventory.expire_due().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "released expired reservations"),
            Err(e) => tracing::warn!(code = %e.0.code, "reservation sweep failed"),
        }
    }
}

/// Drives payments and refunds a crash or a silent provider left unresolved,
/// and forgets idempotency keys past their 24 hours.
async fn reconcile_payments(
    payments: Arc<flowline_payments::Payments>,
    cfg: crate::config::PaymentSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.reconcile_interval.0) => {}
            _ = shutdown.changed() => return,
        }
        match payments
            .reconcile(cfg.reconcile_min_age.0, cfg.reconcile_give_up.0)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(moved = n, "reconciled payments"),
            Err(e) => tracing::warn!(code = %e.0.code, "payment reconciliation failed"),
        }
        if let Err(e) = flowline_payments::idempotency::prune(&payments.db).await {
            tracing::warn!(error = %e, "cannot prune idempotency keys");
        }
    }
}

/// Opens this node's search index (`<data_dir>/search`). A fresh index (first
/// start, or deleted to rebuild) gets its consumer group rewound so the log
/// replays into it.
async fn open_search(
    settings: &Settings,
    log: &EventLog,
    metrics: &flowline_cache::CacheMetrics,
) -> anyhow::Result<flowline_search::routes::SearchState> {
    let cache: flowline_cache::Cache<Arc<flowline_search::SearchResult>> =
        flowline_cache::Cache::new(
            "search",
            10_000,
            std::time::Duration::from_secs(60),
            |_| Vec::new(),
            metrics,
        );
    let dropper = cache.clone();
    let dir = settings.data_dir.join("search");
    let (index, fresh) = flowline_search::SearchIndex::open(
        &dir,
        Box::new(move || dropper.invalidate_prefix("search:")),
    )
    .map_err(|e| anyhow::anyhow!("{e} (is another flowline using {}?)", dir.display()))?;
    let group = format!("search.indexer.{}", settings.server.node_id);
    if fresh && log.groups().await?.iter().any(|g| g.group == group) {
        tracing::info!(%group, "search index is new: replaying the catalog log into it");
        log.replay(&group, Some(flowline_search::TOPIC), ReplayFrom::Earliest)
            .await?;
    }
    Ok(flowline_search::routes::SearchState {
        index: Arc::new(index),
        cache,
    })
}

/// Picks up signing keys added by `flowline keys rotate` in another process.
async fn reload_keys(identity: Arc<Identity>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = identity.reload_keys().await {
            tracing::warn!(error = %e, "cannot reload signing keys");
        }
    }
}

async fn retention(log: EventLog, settings: Settings, mut shutdown: watch::Receiver<bool>) {
    let e = &settings.eventlog;
    let age = Some(e.retention_max_age.0).filter(|d| !d.is_zero());
    let bytes = Some(e.retention_max_bytes).filter(|b| *b > 0);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(e.retention_interval.0) => {}
            _ = shutdown.changed() => return,
        }
        match log.enforce_retention(age, bytes).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(dropped = n, "retention dropped old events"),
            Err(err) => tracing::warn!(error = %err, "retention pass failed"),
        }
    }
}

/// An exclusive lock on the data directory: two servers writing one SQLite
/// data dir would each believe they own its consumer groups.
pub struct DataDirLock(#[allow(dead_code)] File);

impl DataDirLock {
    pub fn acquire(dir: &Path) -> anyhow::Result<DataDirLock> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("data dir {}: cannot create it", dir.display()))?;
        let path = dir.join("flowline.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| {
                format!("data dir {}: cannot open {}", dir.display(), path.display())
            })?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "data dir {} is locked by another running flowline process; stop it or use another --data-dir",
                dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("data dir {}: cannot lock {}", dir.display(), path.display()))
            }
        }
    }
}
