//! The `replan` front end: plays the DLQ's event source mapping against any SQS
//! endpoint with core's one mapping ([`agentq_core::mapping`]) and the same
//! [`Replanner::handle`] as the Lambda front end: batches of up to 10, what succeeded is
//! deleted, failures come back after their visibility. Stops when `shutdown` is
//! cancelled (batches in flight are finished first), or, with `once`, when the DLQ is
//! drained.

use std::sync::Arc;
use std::time::Duration;

use agentq_core::mapping::{self, MappingOptions, QueueError, SqsQueue};
use tokio_util::sync::CancellationToken;

use crate::replan::{Replanner, StatsSnapshot};

/// How long a DLQ message stays away while it is re-planned (and after a failed
/// re-plan, before it is tried again). Re-plans take milliseconds; a dispatcher that
/// dies gives its batch back after this long.
pub const DEFAULT_VISIBILITY: Duration = Duration::from_secs(30);

/// How the poller runs.
#[derive(Debug, Clone)]
pub struct PollOptions {
    pub dlq_url: String,
    /// Long-poll wait per receive (0..=20).
    pub wait_seconds: i32,
    /// Drain: stop at the first receive that returns nothing.
    pub once: bool,
    /// `VisibilityTimeout` of the receive (see [`DEFAULT_VISIBILITY`]).
    pub visibility: Duration,
}

impl PollOptions {
    pub fn new(dlq_url: impl Into<String>, wait_seconds: i32, once: bool) -> Self {
        Self {
            dlq_url: dlq_url.into(),
            wait_seconds,
            once,
            visibility: DEFAULT_VISIBILITY,
        }
    }
}

/// A poller failure that stops it (the DLQ cannot be read).
pub type PollError = QueueError;

/// Runs until `shutdown` is cancelled (or the DLQ is drained with `once`).
pub async fn run(
    replanner: &Replanner,
    sqs: &aws_sdk_sqs::Client,
    opts: &PollOptions,
    shutdown: CancellationToken,
) -> Result<StatsSnapshot, PollError> {
    let queue = Arc::new(SqsQueue::connect(sqs.clone(), &opts.dlq_url).await?);
    let r = replanner.clone();
    let handler = move |event, _inv| {
        let r = r.clone();
        async move { r.handle(event).await }
    };
    mapping::run(
        queue,
        MappingOptions {
            queue_url: opts.dlq_url.clone(),
            batch_size: mapping::MAX_BATCH,
            batching_window: Duration::ZERO,
            wait_time: Duration::from_secs(opts.wait_seconds.clamp(0, 20) as u64),
            visibility: opts.visibility,
            // Messages of one job must be handled in order: one batch at a time.
            concurrency: 1,
            function_timeout: Duration::from_secs(60),
            once: opts.once,
            drain_timeout: Duration::from_secs(30),
        },
        handler,
        shutdown,
    )
    .await?;
    Ok(replanner.stats())
}
