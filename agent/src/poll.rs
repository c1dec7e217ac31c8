//! Local poll mode: the agent's handler behind core's one SQS event source mapping
//! ([`agentq_core::mapping`]) against any SQS endpoint — long polling, batch size and
//! batching window, a concurrency limit, delete only what succeeded, a clean drain on
//! shutdown.
//!
//! Messages are received with `VisibilityTimeout` = the agent's visibility horizon
//! (`AGENTQ_VISIBILITY_HORIZON_SECONDS`), not the queue's own timeout, and kept
//! invisible for another horizon while their batch is in the handler: a poller killed
//! between the receive and the claim (or the first heartbeat) gives its messages back
//! within one horizon instead of stranding them for the queue's visibility timeout.

use std::sync::Arc;
use std::time::Duration;

use agentq_core::mapping::{self, MappingOptions, SqsQueue};
use tokio_util::sync::CancellationToken;

use crate::{Deps, Invocation, handle_batch};

/// How the poller behaves.
#[derive(Debug, Clone)]
pub struct PollOptions {
    pub queue_url: String,
    /// Messages per batch (1..=10), like the mapping's BatchSize.
    pub batch_size: i32,
    /// Wait up to this long to fill a batch, like MaximumBatchingWindowInSeconds.
    pub batching_window: Duration,
    /// Batches handled at once (the mapping's MaximumConcurrency).
    pub concurrency: usize,
    /// The simulated function timeout: each batch gets this long.
    pub function_timeout: Duration,
    /// Exit once the queue is empty and nothing is in flight.
    pub once: bool,
    /// Upper bound for the drain after shutdown.
    pub drain_timeout: Duration,
    /// Long-poll wait per receive (0..=20 s).
    pub wait_time: Duration,
}

/// What the poller did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    pub received: u64,
    pub deleted: u64,
    pub failed: u64,
}

/// Runs until `shutdown` (or, with `once`, until the queue is drained).
pub async fn run(
    deps: Arc<Deps>,
    opts: PollOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<PollStats> {
    let queue = SqsQueue::connect(deps.clients.sqs.clone(), &opts.queue_url)
        .await
        .map_err(|e| anyhow::anyhow!("queue {} is not reachable: {e}", opts.queue_url))?;
    deps.remember_queue(mapping::Queue::arn(&queue), &opts.queue_url);
    let visibility = Duration::from_secs(u64::from(deps.config.visibility_horizon));
    let handler_deps = deps.clone();
    let handler = move |event, inv: mapping::Invocation| {
        let deps = handler_deps.clone();
        async move {
            let invocation = Invocation {
                request_id: inv.request_id,
                deadline: inv.deadline,
            };
            handle_batch(&deps, event, &invocation, &inv.shutdown).await
        }
    };
    let stats = mapping::run(
        Arc::new(queue),
        MappingOptions {
            queue_url: opts.queue_url.clone(),
            batch_size: opts.batch_size.clamp(1, 10) as usize,
            batching_window: opts.batching_window,
            wait_time: opts.wait_time,
            visibility,
            concurrency: opts.concurrency,
            function_timeout: opts.function_timeout,
            once: opts.once,
            drain_timeout: opts.drain_timeout,
        },
        handler,
        shutdown,
    )
    .await?;
    Ok(PollStats {
        received: stats.received,
        deleted: stats.deleted,
        failed: stats.failed + stats.delete_failed,
    })
}
