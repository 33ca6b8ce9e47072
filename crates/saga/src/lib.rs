//! flowline-saga: the durable saga orchestrator.
//!
//! A saga is a list of steps, each an action with an optional compensation.
//! An instance is started in the caller's transaction (an order and its saga
//! commit together). A runner claims due instances with a lease (a
//! conditional UPDATE), runs the current step under its timeout, and records
//! the outcome — timeline row, results, next step, `saga.events` through the
//! outbox, and the context's hooks — in one transaction.
//!
//! - A retryable failure or timeout is retried with backoff up to the step's
//!   `max_attempts`; then, or at once on a non-retryable failure, the saga
//!   compensates the completed steps in reverse order. A step that timed out
//!   or kept failing may have taken effect, so it is compensated too; one
//!   that refused (non-retryable) is not.
//! - A compensation is retried until it succeeds; after `stuck_after` failed
//!   attempts the saga is flagged stuck, `saga.stuck` is emitted once and a
//!   metric counts it.
//! - After a crash, unfinished instances are claimed again once their lease
//!   expires, and the step that was running runs again. Participants must
//!   therefore dedupe on `StepCtx::command_id`, which is the same on every
//!   attempt and after any restart.
//! - A timed-out attempt is aborted here, but a request it already sent may
//!   still land at the participant after the compensation ran. Participants
//!   should remember an applied `…:undo` and refuse its late `…:do`.
//! - Leases are compared with each runner's clock: runners on several hosts
//!   need clocks synchronised well within `SagaOptions::lease`.

mod def;
mod inspect;
mod metrics;
mod orchestrator;

pub use def::{
    BoxFuture, OnFinish, OnStep, RetryPolicy, SagaDef, SagaStatus, Step, StepCtx, StepError, StepFn,
};
pub use inspect::{redact, SagaDetail, SagaSummary, TimelineEntry};
pub use metrics::{SagaLabels, SagaMetrics};
pub use orchestrator::{Orchestrator, SagaOptions, MIGRATIONS, TOPIC};
