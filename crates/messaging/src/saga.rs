//! The create-workspace saga (seed 004):
//!
//! 1. create the workspace record (CREATING);
//! 2. create the default channel `#general`;
//! 3. add the creator as admin (and to `#general`);
//! 4. send the welcome notification — non-critical: a failure is logged as
//!    a warning and the saga completes.
//!
//! A failure in steps 1–3 compensates the completed ones in reverse; the
//! workspace stays as FAILED with the reason, for its creator to see. Every
//! step is idempotent (the orchestrator may run one again after a crash).

use crate::service::{add_channel_member, enqueue, insert_channel};
use crate::{ChannelKind, WORKSPACES_TOPIC};
use flowline_core::Timestamp;
use flowline_http::RequestContext;
use flowline_saga::{
    BoxFuture, OnFinish, RetryPolicy, SagaDef, SagaStatus, Step, StepCtx, StepError,
};
use flowline_store::{on_tx, Db, StoreError, Tx};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

pub const WORKSPACE_SAGA: &str = "workspace.create";

/// The welcome notification, sent through the notifications context.
pub struct Welcome<'a> {
    /// The workspace id: also the notification's dedupe id, so a step run
    /// twice queues one notification.
    pub workspace_id: &'a str,
    pub workspace_name: &'a str,
    pub user_id: &'a str,
    pub correlation_id: &'a str,
}

pub trait WelcomeSender: Send + Sync {
    fn send<'a>(&'a self, w: Welcome<'a>) -> BoxFuture<'a, Result<(), String>>;
}

#[derive(serde::Deserialize)]
struct Data {
    workspace_id: String,
    name: String,
    user_id: String,
    general_channel_id: String,
    #[serde(default)]
    correlation_id: String,
}

fn data(ctx: &StepCtx) -> Result<Data, StepError> {
    serde_json::from_value(ctx.data.clone())
        .map_err(|e| StepError::fatal(format!("bad saga data: {e}")))
}

fn store(e: StoreError) -> StepError {
    StepError::retryable(e.to_string())
}

/// Runs `f` in a transaction of `db`; a store error is retryable.
async fn in_tx<T>(
    db: &Db,
    f: impl for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, StoreError>>,
) -> Result<T, StepError> {
    let mut tx = db.begin().await.map_err(store)?;
    let out = f(&mut tx).await.map_err(store)?;
    tx.commit().await.map_err(store)?;
    Ok(out)
}

pub(crate) fn definition(
    db: Db,
    welcome: Arc<dyn WelcomeSender>,
    failpoints: &[String],
) -> SagaDef {
    let fail = |step: &str| failpoints.iter().any(|f| f == step);
    let no_retry = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };

    let (d1, f1) = (db.clone(), fail("create_workspace"));
    let create = Step::new("create_workspace", move |ctx: StepCtx| {
        let db = d1.clone();
        async move {
            let d = data(&ctx)?;
            if f1 {
                return Err(StepError::fatal("failpoint create_workspace"));
            }
            let now = Timestamp::now().as_micros();
            let status: String = in_tx(&db, |tx| {
                Box::pin(async move {
                    on_tx!(&mut *tx, |c| sqlx::query(
                        "INSERT INTO workspaces (id, name, created_by, status, created_at, updated_at)
                         VALUES ($1, $2, $3, 'CREATING', $4, $4) ON CONFLICT (id) DO NOTHING"
                    )
                    .bind(&d.workspace_id)
                    .bind(&d.name)
                    .bind(&d.user_id)
                    .bind(now)
                    .execute(c)
                    .await
                    .map(|_| ())).map_err(StoreError::from)?;
                    on_tx!(&mut *tx, |c| sqlx::query_scalar(
                        "SELECT status FROM workspaces WHERE id = $1"
                    )
                    .bind(&d.workspace_id)
                    .fetch_one(c)
                    .await).map_err(StoreError::from)
                })
            })
            .await?;
            if status == "FAILED" {
                // A late retry after the compensation ran.
                return Err(StepError::fatal("the workspace was already compensated"));
            }
            Ok(json!({"workspace_id": data(&ctx)?.workspace_id,
                      "correlation_id": data(&ctx)?.correlation_id}))
        }
    })
    .compensate({
        let db = db.clone();
        move |ctx: StepCtx| {
            let db = db.clone();
            async move {
                let d = data(&ctx)?;
                let now = Timestamp::now().as_micros();
                in_tx(&db, |tx| {
                    Box::pin(async move {
                        on_tx!(&mut *tx, |c| sqlx::query(
                            "UPDATE workspaces SET status = 'FAILED', updated_at = $2 WHERE id = $1"
                        )
                        .bind(&d.workspace_id)
                        .bind(now)
                        .execute(c)
                        .await
                        .map(|_| ())).map_err(StoreError::from)?;
                        Ok(())
                    })
                })
                .await?;
                Ok(json!({}))
            }
        }
    });

    let (d2, f2) = (db.clone(), fail("create_default_channel"));
    let general = Step::new("create_default_channel", move |ctx: StepCtx| {
        let db = d2.clone();
        async move {
            let d = data(&ctx)?;
            if f2 {
                return Err(StepError::fatal("failpoint create_default_channel"));
            }
            let topic = format!("Everyone in {}", d.name);
            let id = d.general_channel_id.clone();
            in_tx(&db, |tx| {
                Box::pin(async move {
                    insert_channel(
                        tx,
                        &d.general_channel_id,
                        &d.workspace_id,
                        "general",
                        ChannelKind::Public,
                        Some(&topic),
                        &d.user_id,
                    )
                    .await
                })
            })
            .await?;
            Ok(json!({"channel_id": id}))
        }
    })
    .compensate({
        let db = db.clone();
        move |ctx: StepCtx| {
            let db = db.clone();
            async move {
                let d = data(&ctx)?;
                in_tx(&db, |tx| {
                    Box::pin(async move {
                        for sql in [
                            "DELETE FROM channel_members WHERE channel_id = $1",
                            "DELETE FROM channels WHERE id = $1",
                        ] {
                            on_tx!(&mut *tx, |c| sqlx::query(sql)
                                .bind(&d.general_channel_id)
                                .execute(c)
                                .await
                                .map(|_| ()))
                            .map_err(StoreError::from)?;
                        }
                        Ok(())
                    })
                })
                .await?;
                Ok(json!({}))
            }
        }
    });

    let (d3, f3) = (db.clone(), fail("add_creator_admin"));
    let admin = Step::new("add_creator_admin", move |ctx: StepCtx| {
        let db = d3.clone();
        async move {
            let d = data(&ctx)?;
            if f3 {
                return Err(StepError::fatal("failpoint add_creator_admin"));
            }
            let now = Timestamp::now().as_micros();
            in_tx(&db, |tx| {
                Box::pin(async move {
                    on_tx!(&mut *tx, |c| sqlx::query(
                        "INSERT INTO workspace_members (workspace_id, user_id, role, joined_at)
                         VALUES ($1, $2, 'admin', $3) ON CONFLICT (workspace_id, user_id) DO NOTHING"
                    )
                    .bind(&d.workspace_id)
                    .bind(&d.user_id)
                    .bind(now)
                    .execute(c)
                    .await
                    .map(|_| ())).map_err(StoreError::from)?;
                    add_channel_member(tx, &d.general_channel_id, &d.user_id).await?;
                    Ok(())
                })
            })
            .await?;
            Ok(json!({"role": "admin"}))
        }
    })
    .compensate({
        let db = db.clone();
        move |ctx: StepCtx| {
            let db = db.clone();
            async move {
                let d = data(&ctx)?;
                in_tx(&db, |tx| {
                    Box::pin(async move {
                        on_tx!(&mut *tx, |c| sqlx::query(
                            "DELETE FROM channel_members WHERE channel_id = $1 AND user_id = $2"
                        )
                        .bind(&d.general_channel_id)
                        .bind(&d.user_id)
                        .execute(c)
                        .await
                        .map(|_| ())).map_err(StoreError::from)?;
                        on_tx!(&mut *tx, |c| sqlx::query(
                            "DELETE FROM workspace_members WHERE workspace_id = $1 AND user_id = $2"
                        )
                        .bind(&d.workspace_id)
                        .bind(&d.user_id)
                        .execute(c)
                        .await
                        .map(|_| ())).map_err(StoreError::from)?;
                        Ok(())
                    })
                })
                .await?;
                Ok(json!({}))
            }
        }
    });

    let f4 = fail("welcome_notification");
    let greet = Step::new("welcome_notification", move |ctx: StepCtx| {
        let welcome = welcome.clone();
        async move {
            let d = data(&ctx)?;
            let sent = if f4 {
                Err("failpoint welcome_notification".to_owned())
            } else {
                // Its own deadline, inside the step's: a slow notifications
                // store must not time the step out (that would compensate).
                let send = welcome.send(Welcome {
                    workspace_id: &d.workspace_id,
                    workspace_name: &d.name,
                    user_id: &d.user_id,
                    correlation_id: &d.correlation_id,
                });
                tokio::time::timeout(Duration::from_secs(3), send)
                    .await
                    .unwrap_or_else(|_| Err("timed out after 3 s".to_owned()))
            };
            match sent {
                Ok(()) => Ok(json!({"sent": true})),
                Err(e) => {
                    // Non-critical: the workspace stands without its welcome.
                    tracing::warn!(workspace_id = %d.workspace_id, error = %e,
                        "welcome notification failed; the workspace is created without it");
                    Ok(json!({"sent": false, "warning": e}))
                }
            }
        }
    })
    .timeout(Duration::from_secs(10))
    .retry(no_retry);

    SagaDef::new(WORKSPACE_SAGA, vec![create, general, admin, greet]).on_finish(Finish)
}

/// Activates the workspace (COMPLETED) or records why it failed.
struct Finish;

impl OnFinish for Finish {
    fn call<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga_id: &'a str,
        status: SagaStatus,
        reason: Option<&'a str>,
        results: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let now = Timestamp::now().as_micros();
            let (new_status, event) = match status {
                SagaStatus::Completed => ("ACTIVE", "workspace.created"),
                _ => ("FAILED", "workspace.failed"),
            };
            let n = on_tx!(&mut *tx, |c| {
                sqlx::query(
                "UPDATE workspaces SET status = $2, failure = $3, updated_at = $4 WHERE id = $1"
            )
            .bind(saga_id)
            .bind(new_status)
            .bind(reason)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
            })
            .map_err(StoreError::from)?;
            if n == 0 {
                return Ok(());
            }
            let correlation = results
                .get("create_workspace")
                .and_then(|r| r.get("correlation_id"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            let mut ctx = RequestContext::detached();
            if let Some(c) = correlation {
                ctx.correlation_id = c;
            }
            let row: (String, String) = on_tx!(&mut *tx, |c| sqlx::query_as(
                "SELECT name, created_by FROM workspaces WHERE id = $1"
            )
            .bind(saga_id)
            .fetch_one(c)
            .await)
            .map_err(StoreError::from)?;
            enqueue(
                tx,
                &ctx,
                WORKSPACES_TOPIC,
                event,
                saga_id,
                json!({"workspace_id": saga_id, "name": row.0, "created_by": row.1,
                       "status": new_status, "reason": reason}),
            )
            .await
        })
    }
}
