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
}

impl AppState {
    /// `Err(name)` of the first store that does not answer.
    pub async fn ready(&self) -> Result<(), String> {
        self.log
            .db()
            .ping()
            .await
            .map_err(|_| "event log".to_owned())?;
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
    let log = EventLog::open(&backend, settings.log_options()).await?;
    let probe = Db::open(&backend, "probe").await?;
    crate::probe::migrate(&probe).await?;
    probe.close().await;
    let identity = open_identity(settings, &log).await?;
    identity.db.close().await;
    let catalog_db = Db::open(&backend, "catalog").await?;
    let metrics = flowline_cache::CacheMetrics::default();
    let relay = Relay::new(catalog_db.clone(), log.clone());
    flowline_catalog::Catalog::open(catalog_db.clone(), relay, &metrics).await?;
    catalog_db.close().await;
    log.db().close().await;
    Ok(())
}

/// The identity context alone, for CLI commands (users, keys).
pub async fn open_identity(settings: &Settings, log: &EventLog) -> anyhow::Result<Identity> {
    let db = Db::open(&settings.backend()?, "identity").await?;
    let relay = Relay::new(db.clone(), log.clone());
    Ok(Identity::open(db, relay, settings.identity_config()).await?)
}

/// The running application: state plus background tasks.
pub struct App {
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
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
        let log = EventLog::open(&backend, settings.log_options()).await?;
        let mut metrics = Metrics::new(log.metrics());
        let cache = Arc::new(ResponseCache::new(100_000));
        cache.register(&mut metrics.registry);
        let cache_metrics = flowline_cache::CacheMetrics::default();
        cache_metrics.register(&mut metrics.registry);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut databases = Vec::new();
        let mut relays = Vec::new();
        let mut consumers = Vec::new();

        let probe = if settings.probe.enabled {
            let db = Db::open(&backend, "probe").await?;
            let relay = Relay::new(db.clone(), log.clone());
            let (probe, tasks) =
                Probe::start(db.clone(), relay.clone(), &log, shutdown_rx.clone()).await?;
            consumers.extend(tasks);
            relays.push(tokio::spawn(relay.run(shutdown_rx.clone())));
            databases.push(("probe", db));
            Some(probe)
        } else {
            None
        };

        let identity_db = Db::open(&backend, "identity").await?;
        let identity_relay = Relay::new(identity_db.clone(), log.clone());
        let identity = Arc::new(
            Identity::open(
                identity_db.clone(),
                identity_relay.clone(),
                settings.identity_config(),
            )
            .await?,
        );
        relays.push(tokio::spawn(identity_relay.run(shutdown_rx.clone())));
        databases.push(("identity", identity_db));

        let catalog_db = Db::open(&backend, "catalog").await?;
        let catalog_relay = Relay::new(catalog_db.clone(), log.clone());
        let catalog = Arc::new(
            flowline_catalog::Catalog::open(
                catalog_db.clone(),
                catalog_relay.clone(),
                &cache_metrics,
            )
            .await?,
        );
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
        relays.push(tokio::spawn(catalog_relay.run(shutdown_rx.clone())));
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

        let housekeeping = vec![
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

        let limiter: Arc<dyn RateLimiter> = Arc::new(MemoryRateLimiter::default());
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
        });
        Ok(App {
            state,
            shutdown,
            relays,
            consumers,
            housekeeping,
            _lock: lock,
        })
    }

    /// Stops background work: relays flush their outboxes first (so every
    /// committed event reaches the log), then consumers finish the event in hand.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.relays {
            let _ = t.await;
        }
        for t in self.consumers.into_iter().chain(self.housekeeping) {
            let _ = t.await;
        }
        for (_, db) in &self.state.databases {
            db.close().await;
        }
        self.state.log.db().close().await;
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
        self.0.invalidate(&ev.envelope.key);
        Ok(())
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
