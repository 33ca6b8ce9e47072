//! Command line: `serve`, `migrate`, `config show`, `events …`, `bench …`.
//! `--config` and `--data-dir` are global: accepted before or after a subcommand.

use crate::app::App;
use crate::config::{self, Settings};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flowline_store::{EventLog, ReplayFrom};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "flowline",
    version,
    about = "An event-driven backend platform in one binary"
)]
pub struct Cli {
    /// Settings file (default: ./flowline.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory for embedded backends (default: ./data).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve {
        /// Address to listen on (default 127.0.0.1:8080; port 0 picks a free one).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Apply every pending migration and exit.
    Migrate,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect and operate the event log.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Fill a context with generated data (demos, benchmarks).
    #[command(subcommand)]
    Seed(SeedCommand),
    /// Operate the search index.
    #[command(subcommand)]
    Search(SearchCommand),
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Manage token signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check the ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Inspect sagas (order placement and cancellation, workspace creation).
    #[command(subcommand)]
    Saga(SagaCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Data flows as they happened: a trace as a Mermaid sequence diagram,
    /// or (`--summary`) each endpoint's data-flow graph with p50/p99 per hop.
    /// Without arguments, lists recent traces.
    Flows {
        /// The trace id (the `x-trace-id` response header, or from the list).
        trace_id: Option<String>,
        /// Aggregate recent traces into one graph per endpoint.
        #[arg(long, conflicts_with = "trace_id")]
        summary: bool,
        /// How many recent traces to list or aggregate.
        #[arg(long, default_value_t = 200)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Run a benchmark scenario.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Drive every flow through the public API — register, login, search,
    /// an order that succeeds and one that is compensated, chat, a
    /// notification — printing each flow's observed sequence diagram and a
    /// summary. Starts an embedded server on a fresh temporary data dir, or
    /// targets a running one with `--url`. Exits 1 naming the step when a
    /// flow does not behave.
    Demo {
        /// A running server (`http://HOST:PORT`) instead of an embedded one;
        /// needs `--admin-email` and `--admin-password`.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Keep the embedded server's data dir (its path is printed).
        #[arg(long, conflicts_with = "url")]
        keep: bool,
        /// An admin of the server at `--url` (the demo creates its own products).
        #[arg(long, value_name = "EMAIL", requires = "url")]
        admin_email: Option<String>,
        /// That admin's password.
        #[arg(long, value_name = "PASSWORD", requires = "url")]
        admin_password: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SagaCommand {
    /// One saga and its timeline: every attempt of every step and
    /// compensation, with timings (secrets redacted).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Recent sagas, newest first.
    List {
        /// RUNNING, COMPENSATING, COMPLETED, COMPENSATED or STUCK.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain: report every edited, deleted or inserted record
    /// and a truncated tail (exit 1 on any finding). Works beside a running server.
    Verify {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Check that every journal entry balances per currency, that every
    /// balance projection equals a replay of the journal, and that invoice
    /// and credit-note numbers have no gaps. Exits 1 when anything is off.
    Verify {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user (for bootstrapping an admin). Prompts for the password
    /// when `--password` is left out.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password: Option<String>,
        #[arg(long, default_value = "Administrator")]
        name: String,
        /// Give the user the admin role.
        #[arg(long)]
        admin: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SearchCommand {
    /// Rebuild this node's index from the catalog, in chunks, with progress
    /// (stop the server first: the index has one writer).
    Reindex {
        #[arg(long, default_value_t = 1000)]
        chunk: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum SeedCommand {
    /// A realistic catalog: categories, brands, attributes, titles, descriptions.
    Catalog {
        #[arg(long, default_value_t = 1000)]
        products: u64,
        /// Same seed, same catalog.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Products per transaction.
        #[arg(long, default_value_t = 500)]
        batch: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Add a new signing key; tokens signed by earlier keys stay valid until they expire.
    Rotate,
    /// The published keys (JWKS).
    List,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (secrets redacted).
    Show,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print a topic's events as JSON lines.
    Tail {
        topic: String,
        /// `earliest`, `latest`, an offset, or an RFC 3339 time.
        #[arg(long, default_value = "earliest")]
        from: ReplayFrom,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Keep printing new events until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Topics with their partitions, event counts and sizes.
    Topics(JsonFlag),
    /// Consumer groups: position and lag per partition.
    Groups(JsonFlag),
    /// Move a consumer group's position (replays or skips events).
    Replay {
        #[arg(long)]
        group: String,
        /// Only this topic (default: every topic the group consumes).
        #[arg(long)]
        topic: Option<String>,
        /// `earliest`, `latest`, an offset, or an RFC 3339 time.
        #[arg(long)]
        from: ReplayFrom,
    },
    /// Dead letters: list them, or send them back to their group.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    List {
        #[arg(long)]
        group: Option<String>,
        /// Include resolved entries.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Mark dead letters for redelivery; the running server retries them.
    Retry {
        #[arg(long, conflicts_with = "all")]
        id: Option<i64>,
        #[arg(long)]
        group: Option<String>,
        /// Every dead letter (of `--group`, if given).
        #[arg(long)]
        all: bool,
    },
}

pub fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let mut s = config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(d) = &cli.data_dir {
        s.data_dir = d.clone();
    }
    Ok(s)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = settings(&cli)?;
    match cli.command {
        Command::Serve { listen } => {
            if let Some(l) = listen {
                settings.server.listen = l;
            }
            crate::telemetry::init(&settings.log, settings.telemetry.traces);
            serve(settings).await
        }
        Command::Migrate => {
            crate::telemetry::init(&settings.log, false);
            crate::app::migrate(&settings).await?;
            println!("migrations applied ({})", settings.backend()?.name());
            Ok(())
        }
        Command::Config(ConfigCommand::Show) => {
            print!("{}", settings.redacted_toml());
            Ok(())
        }
        Command::Events(cmd) => events(settings, cmd).await,
        Command::Audit(AuditCommand::Verify { json }) => {
            let db = flowline_store::Db::open(&settings.backend()?, "audit").await?;
            db.migrate(flowline_audit::MIGRATIONS).await?;
            let report = flowline_audit::verify(&db).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} records, head seq {}, head hash {}",
                    report.records, report.head_seq, report.head_hash
                );
                for f in &report.findings {
                    println!("seq {}: {:?}: {}", f.seq, f.kind, f.detail);
                }
                if report.truncated {
                    println!(
                        "(only the first {} findings are listed)",
                        report.findings.len()
                    );
                }
                println!(
                    "{}",
                    if report.is_ok() {
                        "chain intact"
                    } else {
                        "CHAIN BROKEN"
                    }
                );
            }
            if report.is_ok() {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Flows {
            trace_id,
            summary,
            limit,
            json,
        } => flows(&settings, trace_id, summary, limit, json).await,
        Command::Demo {
            url,
            keep,
            admin_email,
            admin_password,
        } => {
            let opts = crate::demo::Options {
                url,
                keep,
                admin_email,
                admin_password,
            };
            crate::demo::run(settings, opts).await
        }
        Command::Bench(cmd) => {
            // Errors only: a failure inside a scenario is explained on stderr
            // without info lines mixing into the report.
            let mut log = settings.log.clone();
            log.level = "error".into();
            crate::telemetry::init(&log, settings.telemetry.traces);
            crate::bench::run(settings, cmd).await
        }
        Command::Users(UsersCommand::Create {
            email,
            password,
            name,
            admin,
        }) => {
            let password = match password {
                Some(p) => p,
                None => read_password()?,
            };
            let log = open_log(&settings).await?;
            let identity = crate::app::open_identity(&settings, &log).await?;
            let ctx = flowline_http::RequestContext::detached();
            let user = identity
                .create_user(&ctx, &email, &password, &name, admin)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}",
                        e.0.detail.clone().unwrap_or_else(|| e.0.title.to_owned())
                    )
                })?;
            println!(
                "created user {} ({}, role {})",
                user.id, user.email, user.role
            );
            Ok(())
        }
        Command::Saga(cmd) => {
            let log = open_log(&settings).await?;
            // Orders and messaging keep their sagas in their own databases.
            // Read-only: no definitions, so nothing here ever runs a step.
            let mut orchs = Vec::new();
            for service in ["orders", "messaging"] {
                let db = flowline_store::Db::open(&settings.backend()?, service).await?;
                let relay = flowline_store::outbox::Relay::new(db.clone(), log.clone());
                orchs.push(
                    flowline_saga::Orchestrator::new(
                        db,
                        relay,
                        Vec::new(),
                        flowline_saga::SagaOptions::default(),
                    )
                    .await?,
                );
            }
            match cmd {
                SagaCommand::Show { id, json } => {
                    for orch in &orchs {
                        if let Some(d) = orch.get(&id).await? {
                            return crate::sagas::print_detail(&d, json);
                        }
                    }
                    anyhow::bail!("no saga `{id}`")
                }
                SagaCommand::List { status, limit } => {
                    let mut all = Vec::new();
                    for orch in &orchs {
                        all.extend(orch.list(status.as_deref(), limit).await?);
                    }
                    all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
                    all.truncate(limit.max(0) as usize);
                    for s in all {
                        println!(
                            "{}  {:<16} {:<13} {:<22} {}",
                            s.created_at.to_rfc3339(),
                            s.name,
                            s.status.as_str(),
                            s.current_step.as_deref().unwrap_or("-"),
                            s.id
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Ledger(LedgerCommand::Verify { json }) => {
            let log = open_log(&settings).await?;
            let ledger = crate::app::open_ledger(&settings, &log).await?;
            let report = ledger.verify().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} entries, {} postings, {} account balances checked",
                    report.entries, report.postings, report.accounts
                );
                for p in &report.unbalanced {
                    println!("UNBALANCED {}", serde_json::to_string(p)?);
                }
                for m in &report.mismatched {
                    println!("MISMATCH {}", serde_json::to_string(m)?);
                }
                for g in &report.sequence_gaps {
                    println!("GAP {}", serde_json::to_string(g)?);
                }
            }
            if !report.is_ok() {
                anyhow::bail!("the ledger does not verify");
            }
            if !json {
                println!("ledger ok");
            }
            Ok(())
        }
        Command::Search(SearchCommand::Reindex { chunk }) => reindex(&settings, chunk).await,
        Command::Seed(SeedCommand::Catalog {
            products,
            seed,
            batch,
        }) => seed_catalog(&settings, products, seed, batch).await,
        Command::Keys(cmd) => {
            let log = open_log(&settings).await?;
            let identity = crate::app::open_identity(&settings, &log).await?;
            match cmd {
                KeysCommand::Rotate => {
                    let kid = identity.rotate_keys().await?;
                    println!("new signing key {kid}; running servers pick it up within seconds");
                }
                KeysCommand::List => {
                    println!("{}", serde_json::to_string_pretty(&identity.jwks())?)
                }
            }
            Ok(())
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let listen = settings.server.listen;
    let grace = settings.server.shutdown_grace.0;
    let app = App::start(settings).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let router = app_router(&app.state);
    tracing::info!(%addr, backend = app.state.log.db().backend_name(), "flowline listening");
    // The one line on stdout: scripts and tests read the bound address here.
    println!("flowline listening on http://{addr}");
    std::io::stdout().flush().ok();

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
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = stop_tx.send(());
    let mut server = server;
    match tokio::time::timeout(grace, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "server error"),
        Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
        Err(_) => {
            // Stop the stragglers before the stores close under them.
            server.abort();
            tracing::warn!("in-flight requests did not finish within the grace period; aborted");
        }
    }
    app.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// `flowline flows`: reads the trace store (beside a running server too).
async fn flows(
    settings: &Settings,
    trace_id: Option<String>,
    summary: bool,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    if !(1..=10_000).contains(&limit) {
        anyhow::bail!("--limit must be 1..=10000");
    }
    let db = flowline_store::Db::open(&settings.backend()?, "traces").await?;
    let store =
        crate::traces::TraceStore::open(db, &settings.server.node_id, settings.telemetry.max_spans)
            .await?;
    if let Some(id) = trace_id {
        let id = id.trim().to_ascii_lowercase();
        if flowline_telemetry::trace::parse_trace_id(&id).is_none() {
            anyhow::bail!("`{id}` is not a trace id (32 hex digits)");
        }
        let spans = store.spans(&id).await?;
        if spans.is_empty() {
            anyhow::bail!("no trace {id} in the trace store (unknown, pruned, or not flushed yet)");
        }
        let diagram = crate::flows::sequence(&spans);
        if json {
            let v = serde_json::json!({"trace_id": id, "spans": spans, "diagram": diagram});
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", crate::flows::mermaid(&diagram));
        }
        return Ok(());
    }
    if summary {
        let traces = store.recent_traces(limit).await?;
        let endpoints = crate::flows::summary(&traces);
        if json {
            println!("{}", serde_json::to_string_pretty(&endpoints)?);
            return Ok(());
        }
        if endpoints.is_empty() {
            println!("no traces yet: send some requests to a running server");
        }
        for e in endpoints {
            println!("%% {} ({} traces)", e.endpoint, e.traces);
            print!("{}", e.mermaid);
            println!();
        }
        return Ok(());
    }
    let items = store.recent(limit, None, None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    println!(
        "{:<32}  {:<27}  {:>6}  {:>9}  {:>5}  ROOT",
        "TRACE", "STARTED", "STATUS", "MS", "SPANS"
    );
    for t in items {
        println!(
            "{:<32}  {:<27}  {:>6}  {:>9.2}  {:>5}  {}",
            t.trace_id,
            t.started_at.to_rfc3339(),
            t.status.map(|s| s.to_string()).unwrap_or_default(),
            t.duration_ms,
            t.spans,
            t.root
        );
    }
    Ok(())
}

/// The whole HTTP surface of a running app.
pub fn app_router(state: &std::sync::Arc<crate::app::AppState>) -> axum::Router {
    crate::http::router(state.clone(), api_routes(state), root_routes(state))
}

fn root_routes(state: &crate::app::AppState) -> axum::Router<std::sync::Arc<crate::app::AppState>> {
    flowline_identity::routes::well_known(auth_state(state)).merge(crate::console::routes())
}

fn auth_state(state: &crate::app::AppState) -> flowline_identity::routes::AuthState {
    let r = &state.settings.ratelimit;
    flowline_identity::routes::AuthState {
        identity: state.identity.clone(),
        limiter: r.enabled.then(|| {
            (
                state.limiter.clone(),
                flowline_http::ratelimit::Quota::per_minute(r.user_per_minute, r.user_burst),
            )
        }),
        cache: state.cache.clone(),
    }
}

fn api_routes(state: &crate::app::AppState) -> axum::Router<std::sync::Arc<crate::app::AppState>> {
    use axum::middleware::from_fn_with_state;
    use flowline_identity::routes::{require_auth, require_role_admin};
    let auth = auth_state(state);
    let (catalog_public, catalog_admin) = flowline_catalog::routes::routes(state.catalog.clone());
    // Admin writes: authenticate (outer), then the admin role, then the handler.
    let catalog_admin = catalog_admin
        .route_layer(from_fn_with_state(auth.clone(), require_role_admin))
        .route_layer(from_fn_with_state(auth.clone(), require_auth));
    let (inventory_public, inventory_admin) =
        flowline_inventory::routes::routes(state.inventory.clone());
    let inventory_admin = inventory_admin
        .route_layer(from_fn_with_state(auth.clone(), require_role_admin))
        .route_layer(from_fn_with_state(auth.clone(), require_auth));
    let payments = flowline_payments::routes::routes(state.payments.clone())
        .route_layer(from_fn_with_state(auth.clone(), require_auth));
    let carts = flowline_cart::routes(state.carts.clone())
        .route_layer(from_fn_with_state(auth.clone(), require_auth));
    let ledger = flowline_ledger::routes::routes(state.ledger.clone())
        .route_layer(from_fn_with_state(auth.clone(), require_role_admin))
        .route_layer(from_fn_with_state(auth.clone(), require_auth));
    let (orders_user, orders_admin) = flowline_orders::routes::routes(state.orders.clone());
    let orders_user = orders_user.route_layer(from_fn_with_state(auth.clone(), require_auth));
    let (shipping_user, shipping_admin) = flowline_shipping::routes::routes(state.shipping.clone());
    let shipping_user = shipping_user.route_layer(from_fn_with_state(auth.clone(), require_auth));
    let (notify_user, notify_admin) =
        flowline_notifications::routes::routes(state.notifications.clone());
    let notify_user = notify_user.route_layer(from_fn_with_state(auth.clone(), require_auth));
    // The socket authenticates itself (header or first frame); REST and SSE
    // go through the gateway's authentication.
    let (messaging_api, messaging_ws) = flowline_messaging::routes::routes(state.gateway.clone());
    let messaging_api = messaging_api.route_layer(from_fn_with_state(auth.clone(), require_auth));
    // Admin-only, behind one stack: authenticate (outer), then the role.
    let admin = axum::Router::new()
        .merge(orders_admin)
        .merge(shipping_admin)
        .merge(notify_admin)
        .merge(crate::sagas::routes())
        .merge(crate::console::admin_routes())
        .merge(crate::traces::routes())
        .merge(flowline_audit::routes::routes(state.audit.clone()))
        .merge(flowline_analytics::routes::routes(state.analytics.clone()))
        .route_layer(from_fn_with_state(auth.clone(), require_role_admin))
        .route_layer(from_fn_with_state(auth.clone(), require_auth));
    axum::Router::new()
        .merge(crate::probe::routes())
        .merge(inventory_public)
        .merge(inventory_admin)
        .merge(payments)
        .merge(carts)
        .merge(ledger)
        .merge(orders_user)
        .merge(shipping_user)
        .merge(notify_user)
        .merge(messaging_api)
        .merge(messaging_ws)
        .merge(admin)
        .merge(flowline_identity::routes::api_routes(auth))
        .merge(catalog_public)
        .merge(catalog_admin)
        .merge(flowline_search::routes::routes(state.search.clone()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Rebuilds the search index from the catalog. The indexer group is moved to
/// the end of the log first: events after that point still apply (by id, so
/// replaying a change the rebuild already saw is harmless).
pub async fn reindex(settings: &Settings, chunk: i64) -> anyhow::Result<()> {
    use flowline_store::outbox::Relay;
    let log = open_log(settings).await?;
    let db = flowline_store::Db::open(&settings.backend()?, "catalog").await?;
    let metrics = flowline_cache::CacheMetrics::default();
    let catalog =
        flowline_catalog::Catalog::open(db.clone(), Relay::new(db.clone(), log.clone()), &metrics)
            .await?;
    let dir = settings.data_dir.join("search");
    let (index, _) = flowline_search::SearchIndex::open(&dir, Box::new(|| {})).map_err(|e| {
        anyhow::anyhow!("{e}: is a flowline server running on this data dir? stop it first")
    })?;
    let group = format!("search.indexer.{}", settings.server.node_id);
    if log.groups().await?.iter().any(|g| g.group == group) {
        log.replay(&group, Some(flowline_search::TOPIC), ReplayFrom::Latest)
            .await?;
    }
    index.clear().map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = std::time::Instant::now();
    let mut err = std::io::stderr().lock();
    let mut cursor: Option<String> = None;
    let mut done = 0usize;
    loop {
        let q = flowline_catalog::ListQuery {
            cursor: cursor.clone(),
            limit: chunk.clamp(1, 10_000),
            ..Default::default()
        };
        let (items, next) = catalog
            .list(&q)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.0.title))?;
        for p in &items {
            index
                .upsert(&serde_json::to_value(p)?)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        done += items.len();
        index.commit().map_err(|e| anyhow::anyhow!("{e}"))?;
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let _ = write!(err, "\rreindexing: {done} products ({rate:.0}/s)");
        let _ = err.flush();
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let _ = writeln!(err);
    println!(
        "reindexed {done} products in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    db.close().await;
    log.db().close().await;
    Ok(())
}

async fn seed_catalog(
    settings: &Settings,
    products: u64,
    seed: u64,
    batch: u64,
) -> anyhow::Result<()> {
    use flowline_store::outbox::Relay;
    let log = open_log(settings).await?;
    let db = flowline_store::Db::open(&settings.backend()?, "catalog").await?;
    let relay = Relay::new(db.clone(), log.clone());
    let metrics = flowline_cache::CacheMetrics::default();
    let catalog = flowline_catalog::Catalog::open(db.clone(), relay.clone(), &metrics).await?;
    let ctx = flowline_http::RequestContext {
        correlation_id: flowline_core::id::new_correlation_id(),
        request_id: "seed".into(),
    };
    let started = std::time::Instant::now();
    let (mut done, mut created) = (0u64, 0usize);
    let batch = batch.clamp(1, 10_000);
    let mut err = std::io::stderr().lock();
    while done < products {
        let n = batch.min(products - done);
        let items = (done..done + n)
            .map(|i| flowline_catalog::seed::product(seed, i))
            .collect();
        created += catalog.create_many(&ctx, items).await.map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.0.detail.clone().unwrap_or_else(|| e.0.title.to_owned())
            )
        })?;
        done += n;
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let width = 30;
        let filled = (done * width / products.max(1)) as usize;
        let _ = write!(
            err,
            "\rseeding catalog [{}{}] {done}/{products} ({:.0}/s)",
            "#".repeat(filled),
            "-".repeat(width as usize - filled),
            rate
        );
        let _ = err.flush();
    }
    let _ = writeln!(err);
    // Hand the events to the log now, so search can index without a server running.
    let relayed = relay.drain().await?;
    println!(
        "seeded {created} new products ({} already there) in {:.1}s; {relayed} events relayed to catalog.events",
        products as usize - created,
        started.elapsed().as_secs_f64()
    );
    db.close().await;
    log.db().close().await;
    Ok(())
}

/// Reads a password without echo from a terminal, or one line from a pipe.
fn read_password() -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password: ");
        std::io::stderr().flush().ok();
        // SAFETY: termios calls on our own stdin, restored before returning.
        let mut term: libc::termios = unsafe { std::mem::zeroed() };
        let have = unsafe { libc::tcgetattr(0, &mut term) } == 0;
        if have {
            let mut quiet = term;
            quiet.c_lflag &= !libc::ECHO;
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) };
        }
        let mut line = String::new();
        let read = stdin.lock().read_line(&mut line);
        if have {
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &term) };
        }
        eprintln!();
        read?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    let pw = line.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(
        !pw.is_empty(),
        "no password given: use --password or write it on stdin"
    );
    Ok(pw)
}

async fn open_log(settings: &Settings) -> anyhow::Result<EventLog> {
    settings.open_log(&settings.backend()?).await
}

async fn events(settings: Settings, cmd: EventsCommand) -> anyhow::Result<()> {
    let log = open_log(&settings).await?;
    let mut out = std::io::stdout().lock();
    match cmd {
        EventsCommand::Tail {
            topic,
            from,
            limit,
            follow,
        } => {
            // Per-partition cursors: exact, whatever the timestamps.
            let mut cursors: Vec<(i32, i64)> = log.resolve(&topic, from).await?;
            loop {
                let mut page = Vec::new();
                for (partition, next) in &cursors {
                    page.extend(log.read(&topic, *partition, *next, limit.max(1)).await?);
                }
                page.sort_by_key(|e| (e.appended_at, e.partition, e.offset));
                page.truncate(limit.max(0) as usize);
                for ev in &page {
                    writeln!(out, "{}", serde_json::to_string(ev)?)?;
                    if let Some(c) = cursors.iter_mut().find(|c| c.0 == ev.partition) {
                        c.1 = ev.offset + 1;
                    }
                }
                out.flush()?;
                if !follow {
                    break;
                }
                if !page.is_empty() {
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
        EventsCommand::Topics(f) => {
            let topics = log.topics().await?;
            if f.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&topics)?)?;
            } else {
                writeln!(
                    out,
                    "{:<32} {:>10} {:>12} {:>14}",
                    "TOPIC", "PARTITIONS", "EVENTS", "BYTES"
                )?;
                for t in topics {
                    writeln!(
                        out,
                        "{:<32} {:>10} {:>12} {:>14}",
                        t.topic, t.partitions, t.events, t.bytes
                    )?;
                }
            }
        }
        EventsCommand::Groups(f) => {
            let groups = log.groups().await?;
            if f.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&groups)?)?;
            } else {
                writeln!(
                    out,
                    "{:<24} {:<24} {:>9} {:>12} {:>12} {:>8}",
                    "GROUP", "TOPIC", "PARTITION", "POSITION", "END", "LAG"
                )?;
                for g in groups {
                    writeln!(
                        out,
                        "{:<24} {:<24} {:>9} {:>12} {:>12} {:>8}",
                        g.group, g.topic, g.partition, g.next_offset, g.end_offset, g.lag
                    )?;
                }
            }
        }
        EventsCommand::Replay { group, topic, from } => {
            let n = log.replay(&group, topic.as_deref(), from).await?;
            writeln!(out, "group {group}: {n} partition(s) repositioned")?;
        }
        EventsCommand::Dlq(DlqCommand::List { group, all, json }) => {
            let dl = log.dead_letters(group.as_deref(), all).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&dl)?)?;
            } else {
                writeln!(
                    out,
                    "{:>6} {:<20} {:<20} {:>4} {:>8} {:<9} {:>8}  ERROR",
                    "ID", "GROUP", "TOPIC", "PART", "OFFSET", "STATUS", "ATTEMPTS"
                )?;
                for d in dl {
                    writeln!(
                        out,
                        "{:>6} {:<20} {:<20} {:>4} {:>8} {:<9} {:>8}  {}",
                        d.id,
                        d.group,
                        d.topic,
                        d.partition,
                        d.offset,
                        d.status,
                        d.attempts,
                        d.error
                    )?;
                }
            }
        }
        EventsCommand::Dlq(DlqCommand::Retry { id, group, all }) => {
            if id.is_none() && !all {
                anyhow::bail!(
                    "say which dead letters to retry: --id N, or --all (optionally with --group G)"
                );
            }
            let n = log.retry_dead_letters(id, group.as_deref()).await?;
            writeln!(
                out,
                "{n} dead letter(s) marked for retry; the running server redelivers them"
            )?;
        }
    }
    log.db().close().await;
    Ok(())
}
