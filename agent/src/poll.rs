//! Local poll mode: plays the SQS event source mapping against any SQS endpoint — long
//! polling, batch size and batching window, a concurrency limit, delete only what
//! succeeded, leave failures to come back, and a clean drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage, SqsMessageAttribute};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
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
    let sqs = deps.clients.sqs.clone();
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&opts.queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "queue {} is not reachable: {}",
                opts.queue_url,
                agentq_core::aws::display(&e)
            )
        })?
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    deps.remember_queue(&arn, &opts.queue_url);
    let region = arn.split(':').nth(3).unwrap_or("us-east-1").to_owned();
    let poller_id = format!("poller-{}", ulid::Ulid::new());
    tracing::info!(queue = %opts.queue_url, %poller_id, batch_size = opts.batch_size, concurrency = opts.concurrency, "polling");

    let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut inflight: JoinSet<PollStats> = JoinSet::new();
    let mut stats = PollStats::default();
    loop {
        while let Some(done) = inflight.try_join_next() {
            add(&mut stats, done.unwrap_or_default());
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p?,
        };
        let mut batch = Vec::new();
        let window_end = Instant::now() + opts.batching_window;
        loop {
            let want = opts.batch_size - batch.len() as i32;
            let wait = if batch.is_empty() {
                opts.wait_time
            } else {
                window_end.saturating_duration_since(Instant::now())
            };
            let recv = sqs
                .receive_message()
                .queue_url(&opts.queue_url)
                .max_number_of_messages(want.clamp(1, 10))
                .wait_time_seconds(wait.as_secs().min(20) as i32)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send();
            let got = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = recv => r,
            };
            match got {
                Ok(out) => {
                    let msgs = out.messages.unwrap_or_default();
                    let empty = msgs.is_empty();
                    batch.extend(msgs);
                    if empty
                        || batch.len() as i32 >= opts.batch_size
                        || Instant::now() >= window_end
                    {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %agentq_core::aws::display(&e), "receive failed; backing off");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
        if batch.is_empty() {
            drop(permit);
            if opts.once && inflight.is_empty() {
                break;
            }
            if opts.once {
                // Wait for in-flight work: failures may come back to the queue.
                if let Some(done) = inflight.join_next().await {
                    add(&mut stats, done.unwrap_or_default());
                }
            }
            continue;
        }
        stats.received += batch.len() as u64;
        let event = to_event(&batch, &arn, &region);
        let deps = deps.clone();
        let queue_url = opts.queue_url.clone();
        let inv = Invocation {
            request_id: format!("{poller_id}/{}", ulid::Ulid::new()),
            deadline: Instant::now() + opts.function_timeout,
        };
        let shutdown = shutdown.clone();
        inflight.spawn(async move {
            let _permit = permit;
            let resp = handle_batch(&deps, event, &inv, &shutdown).await;
            let failed: std::collections::HashSet<String> =
                resp.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect();
            let entries: Vec<DeleteMessageBatchRequestEntry> = batch
                .iter()
                .filter(|m| !failed.contains(m.message_id().unwrap_or_default()))
                .enumerate()
                .filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .build()
                        .ok()
                })
                .collect();
            let mut s = PollStats {
                failed: failed.len() as u64,
                ..Default::default()
            };
            if !entries.is_empty() {
                match deps
                    .clients
                    .sqs
                    .delete_message_batch()
                    .queue_url(&queue_url)
                    .set_entries(Some(entries.clone()))
                    .send()
                    .await
                {
                    Ok(out) => s.deleted += (entries.len() - out.failed().len()) as u64,
                    Err(e) => tracing::error!(error = %agentq_core::aws::display(&e), "delete failed; the messages will come back and be acknowledged then"),
                }
            }
            s
        });
    }
    // Drain: in-flight jobs see the shutdown, stop their children and upload.
    let drain = async {
        while let Some(done) = inflight.join_next().await {
            add(&mut stats, done.unwrap_or_default());
        }
    };
    if tokio::time::timeout(opts.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::error!("drain timed out; abandoning in-flight batches");
    }
    tracing::info!(?stats, "poller stopped");
    Ok(stats)
}

fn add(total: &mut PollStats, s: PollStats) {
    total.received += s.received;
    total.deleted += s.deleted;
    total.failed += s.failed;
}

/// The event the mapping would have delivered for these messages.
pub fn to_event(msgs: &[aws_sdk_sqs::types::Message], arn: &str, region: &str) -> SqsEvent {
    let mut event = SqsEvent::default();
    for m in msgs {
        let mut e = SqsMessage::default();
        e.message_id = m.message_id.clone();
        e.receipt_handle = m.receipt_handle.clone();
        e.body = m.body.clone();
        e.md5_of_body = m.md5_of_body.clone();
        e.md5_of_message_attributes = m.md5_of_message_attributes.clone();
        if let Some(attrs) = &m.attributes {
            for (k, v) in attrs {
                e.attributes.insert(k.as_str().to_owned(), v.clone());
            }
        }
        if let Some(attrs) = &m.message_attributes {
            for (k, v) in attrs {
                let mut a = SqsMessageAttribute::default();
                a.string_value = v.string_value.clone();
                a.data_type = Some(v.data_type.clone());
                e.message_attributes.insert(k.clone(), a);
            }
        }
        e.event_source = Some("aws:sqs".into());
        e.event_source_arn = Some(arn.to_owned());
        e.aws_region = Some(region.to_owned());
        event.records.push(e);
    }
    event
}
