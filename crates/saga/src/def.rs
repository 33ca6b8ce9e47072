//! What a saga is: named steps, each an action with an optional compensation.

use flowline_store::{StoreError, Tx};
use serde_json::{Map, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A boxed, sendable future (the same shape as `flowline_http::BoxFuture`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a step's action or compensation is given.
#[derive(Debug, Clone)]
pub struct StepCtx {
    pub saga_id: String,
    pub step: String,
    /// `{saga_id}:{step}:do` or `{saga_id}:{step}:undo`. The same on every
    /// attempt and after a crash: participants dedupe on it, because a step may
    /// run again when its outcome was not recorded before a crash.
    pub command_id: String,
    /// 1 for the first attempt of this action or compensation.
    pub attempt: u32,
    /// The saga's input, as given to `start`.
    pub data: Value,
    /// Outputs of the completed steps, by step name.
    pub results: Map<String, Value>,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    pub message: String,
    /// Retried with backoff when true; when false (declined card, out of
    /// stock) the saga goes straight to compensation.
    pub retryable: bool,
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: false,
        }
    }
}

/// A step's action or compensation. Implemented for any
/// `Fn(StepCtx) -> impl Future<Output = Result<Value, StepError>>`.
pub trait StepFn: Send + Sync {
    fn call(&self, ctx: StepCtx) -> BoxFuture<'static, Result<Value, StepError>>;
}

impl<F, Fut> StepFn for F
where
    F: Fn(StepCtx) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    fn call(&self, ctx: StepCtx) -> BoxFuture<'static, Result<Value, StepError>> {
        Box::pin(self(ctx))
    }
}

/// How a step's action is retried; compensations reuse the backoff, forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of the action before the saga compensates (at least 1).
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Wait after failed attempt `attempt` (1-based): doubling, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

#[derive(Clone)]
pub struct Step {
    pub name: String,
    pub action: Arc<dyn StepFn>,
    /// Undoes the action once it completed; `None` when there is nothing to undo.
    pub compensation: Option<Arc<dyn StepFn>>,
    /// Per attempt; a timed-out attempt counts as a retryable failure.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl Step {
    /// A step with a 10 s timeout and the default retry policy.
    pub fn new(name: impl Into<String>, action: impl StepFn + 'static) -> Self {
        Step {
            name: name.into(),
            action: Arc::new(action),
            compensation: None,
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }

    pub fn compensate(mut self, f: impl StepFn + 'static) -> Self {
        self.compensation = Some(Arc::new(f));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

/// Where a saga ended, for [`OnFinish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaStatus {
    Running,
    Compensating,
    Completed,
    Compensated,
}

impl SagaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "RUNNING",
            SagaStatus::Compensating => "COMPENSATING",
            SagaStatus::Completed => "COMPLETED",
            SagaStatus::Compensated => "COMPENSATED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RUNNING" => SagaStatus::Running,
            "COMPENSATING" => SagaStatus::Compensating,
            "COMPLETED" => SagaStatus::Completed,
            "COMPENSATED" => SagaStatus::Compensated,
            _ => return None,
        })
    }
}

/// Runs in the transaction that records a completed step, so a context can
/// change its own state (an order becomes PAID) atomically with the saga.
pub trait OnStep: Send + Sync {
    fn call<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga_id: &'a str,
        step: &'a str,
        output: &'a Value,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Runs in the transaction that sets COMPLETED or COMPENSATED. An error rolls
/// the transition back; it is tried again when the lease expires.
pub trait OnFinish: Send + Sync {
    fn call<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga_id: &'a str,
        status: SagaStatus,
        reason: Option<&'a str>,
        results: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

#[derive(Clone)]
pub struct SagaDef {
    pub name: String,
    pub steps: Vec<Step>,
    pub on_step: Option<Arc<dyn OnStep>>,
    pub on_finish: Option<Arc<dyn OnFinish>>,
}

impl SagaDef {
    pub fn new(name: impl Into<String>, steps: Vec<Step>) -> Self {
        SagaDef {
            name: name.into(),
            steps,
            on_step: None,
            on_finish: None,
        }
    }

    pub fn on_step(mut self, hook: impl OnStep + 'static) -> Self {
        self.on_step = Some(Arc::new(hook));
        self
    }

    pub fn on_finish(mut self, hook: impl OnFinish + 'static) -> Self {
        self.on_finish = Some(Arc::new(hook));
        self
    }

    /// While compensating, `step_index` counts the steps left to undo; this
    /// skips the ones without a compensation.
    pub(crate) fn undo_from(&self, mut n: usize) -> usize {
        while n > 0 && self.steps[n - 1].compensation.is_none() {
            n -= 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(3), Duration::from_millis(400));
        assert_eq!(p.backoff(5), Duration::from_secs(1));
        assert_eq!(p.backoff(80), Duration::from_secs(1));
    }

    #[test]
    fn undo_skips_steps_without_compensation() {
        let ok = |_c: StepCtx| async { Ok(Value::Null) };
        let def = SagaDef::new(
            "s",
            vec![
                Step::new("a", ok).compensate(ok),
                Step::new("b", ok),
                Step::new("c", ok),
            ],
        );
        assert_eq!(def.undo_from(3), 1);
        assert_eq!(def.undo_from(1), 1);
        assert_eq!(def.undo_from(0), 0);
    }
}
