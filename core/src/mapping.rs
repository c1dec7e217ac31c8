//! One SQS event source mapping, played against any SQS endpoint: what the Lambda
//! service does between a queue and a function, for the front ends that are not Lambda
//! (the agent's `poll`, the dispatcher's `replan`). Both call [`run`] with their handler.
//!
//! - **Receive**: long polls of up to 10 messages, filled for up to the batching window,
//!   with `VisibilityTimeout` = [`MappingOptions::visibility`] (the consumer's horizon,
//!   not the queue's own timeout, which on Lambda is ≥ the function timeout and often
//!   90 minutes). A consumer killed between the receive and its first heartbeat therefore
//!   loses its messages for the horizon only.
//! - **While the handler runs** the mapping keeps the batch's messages invisible for
//!   another horizon every third of it (the real mapping does the same with the queue's
//!   long timeout): a message that waits in the batch for a free job slot does not
//!   reappear meanwhile, and a crash still gives it back within one horizon. The
//!   extensions stop before the deletes (an extension after a delete would fail).
//! - **Partial batch response**: only the messages the handler did not report as failed
//!   are deleted; failures come back when their visibility runs out.
//! - **Bounded**: at most `concurrency` batches at once (a semaphore), receive failures
//!   back off (1 s doubling to 30 s), and on shutdown receiving stops, the batches in
//!   flight see the shutdown token and get `drain_timeout` to finish.
//!
//! The queue is behind the small [`Queue`] trait: [`SqsQueue`] is the real one; the
//! mapping's timing (batching window, extensions, backoff, drain) is tested against an
//! in-memory queue with paused time, and the SQS behaviour against the emulator.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::encodings::Base64Data;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage, SqsMessageAttribute};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageSystemAttributeName, QueueAttributeName,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// SQS' largest batch (receive, delete, change visibility).
pub const MAX_BATCH: usize = 10;
/// SQS' longest long poll.
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// Longest backoff between failing receives.
pub const MAX_RECEIVE_BACKOFF: Duration = Duration::from_secs(30);
/// Consecutive failing receives after which a `once` run gives up.
pub const ONCE_RECEIVE_ATTEMPTS: u32 = 5;

/// How the mapping behaves (the Lambda mapping's settings, plus what a process needs).
#[derive(Debug, Clone)]
pub struct MappingOptions {
    pub queue_url: String,
    /// Messages per batch, 1..=10 (the mapping's `BatchSize`).
    pub batch_size: usize,
    /// How long to keep filling a batch (`MaximumBatchingWindowInSeconds`).
    pub batching_window: Duration,
    /// Long-poll wait of a receive, at most 20 s.
    pub wait_time: Duration,
    /// `VisibilityTimeout` of the receive, renewed while the handler runs: how long
    /// a message stays away when its consumer dies.
    pub visibility: Duration,
    /// Batches in the handler at once (`MaximumConcurrency`).
    pub concurrency: usize,
    /// Each batch's deadline, from its start (the function timeout).
    pub function_timeout: Duration,
    /// Stop at the first empty receive once nothing is in flight (drain the queue).
    pub once: bool,
    /// After shutdown, how long batches in flight get to finish.
    pub drain_timeout: Duration,
}

/// What a handler gets with a batch, besides the event.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Unique per batch: `{mapping id}/{ulid}` (a Lambda request id's stand-in).
    pub request_id: String,
    /// When the batch must be answered (start + function timeout).
    pub deadline: Instant,
    /// Cancelled when the mapping shuts down.
    pub shutdown: CancellationToken,
}

/// What the mapping did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MappingStats {
    pub received: u64,
    pub deleted: u64,
    /// Reported failed by the handler: left to come back.
    pub failed: u64,
    /// Succeeded, but the delete failed: they come back and are handled again.
    pub delete_failed: u64,
}

impl std::ops::AddAssign for MappingStats {
    fn add_assign(&mut self, o: Self) {
        self.received += o.received;
        self.deleted += o.deleted;
        self.failed += o.failed;
        self.delete_failed += o.delete_failed;
    }
}

/// A queue operation that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("SQS {op} on {queue} failed: {message}")]
pub struct QueueError {
    pub op: &'static str,
    pub queue: String,
    pub message: String,
    /// Whether trying again later may succeed.
    pub transient: bool,
}

/// The queue operations the mapping needs.
pub trait Queue: Send + Sync + 'static {
    /// The queue's ARN (it goes into every event record).
    fn arn(&self) -> &str;
    /// Up to `max` messages, waiting up to `wait` for the first, invisible for `visibility`.
    fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> impl Future<Output = Result<Vec<Message>, QueueError>> + Send;
    /// Deletes by receipt handle; returns how many were deleted.
    fn delete(
        &self,
        receipt_handles: &[String],
    ) -> impl Future<Output = Result<usize, QueueError>> + Send;
    /// Makes the messages invisible for `visibility` from now.
    fn extend(
        &self,
        receipt_handles: &[String],
        visibility: Duration,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
}

/// A real SQS queue.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
    arn: String,
}

fn queue_err<E>(
    op: &'static str,
    queue: &str,
    e: &aws_sdk_sqs::error::SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse>,
) -> QueueError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    QueueError {
        op,
        queue: queue.to_owned(),
        message: crate::aws::display(e),
        transient: crate::aws::is_transient(e),
    }
}

fn seconds(d: Duration) -> i32 {
    d.as_secs().min(43_200) as i32
}

impl SqsQueue {
    /// Looks the queue up (its ARN): fails when it does not exist or cannot be read.
    pub async fn connect(client: aws_sdk_sqs::Client, url: &str) -> Result<Self, QueueError> {
        let out = client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| queue_err("GetQueueAttributes", url, &e))?;
        let arn = out
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .unwrap_or_default();
        Ok(Self {
            client,
            url: url.to_owned(),
            arn,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Queue for SqsQueue {
    fn arn(&self) -> &str {
        &self.arn
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Message>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, MAX_BATCH) as i32)
            .wait_time_seconds(wait.min(MAX_WAIT).as_secs() as i32)
            .visibility_timeout(seconds(visibility).max(1))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| queue_err("ReceiveMessage", &self.url, &e))?;
        Ok(out.messages.unwrap_or_default())
    }

    async fn delete(&self, receipt_handles: &[String]) -> Result<usize, QueueError> {
        let mut deleted = 0;
        for chunk in receipt_handles.chunks(MAX_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, h)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(h)
                        .build()
                        .ok()
                })
                .collect();
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| queue_err("DeleteMessageBatch", &self.url, &e))?;
            for f in out.failed() {
                tracing::warn!(code = %f.code(), message = ?f.message(), "delete failed; the message comes back and is handled again");
            }
            deleted += out.successful().len();
        }
        Ok(deleted)
    }

    async fn extend(
        &self,
        receipt_handles: &[String],
        visibility: Duration,
    ) -> Result<(), QueueError> {
        for chunk in receipt_handles.chunks(MAX_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, h)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(h)
                        .visibility_timeout(seconds(visibility))
                        .build()
                        .ok()
                })
                .collect();
            self.client
                .change_message_visibility_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| queue_err("ChangeMessageVisibilityBatch", &self.url, &e))?;
        }
        Ok(())
    }
}

/// The delay before receive number `failures + 1` after `failures` failed in a row:
/// 1 s doubling, at most [`MAX_RECEIVE_BACKOFF`].
pub fn receive_backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(MAX_RECEIVE_BACKOFF)
}

/// Runs the mapping until `shutdown` (or, with `once`, until the queue is drained).
/// Fails when the queue refuses a receive in a way retrying cannot fix (it does not
/// exist, access denied), or with `once` after [`ONCE_RECEIVE_ATTEMPTS`] failures.
pub async fn run<Q, H, Fut>(
    queue: Arc<Q>,
    opts: MappingOptions,
    handler: H,
    shutdown: CancellationToken,
) -> Result<MappingStats, QueueError>
where
    Q: Queue,
    H: Fn(SqsEvent, Invocation) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = SqsBatchResponse> + Send + 'static,
{
    let handler = Arc::new(handler);
    let mapping_id = format!("mapping-{}", ulid::Ulid::new());
    let region = queue.arn().split(':').nth(3).unwrap_or_default().to_owned();
    tracing::info!(queue = %opts.queue_url, %mapping_id, batch_size = opts.batch_size, concurrency = opts.concurrency, visibility_s = opts.visibility.as_secs(), "polling");
    let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut inflight: JoinSet<MappingStats> = JoinSet::new();
    let mut stats = MappingStats::default();
    let mut failures = 0u32;
    let outcome = loop {
        while let Some(done) = inflight.try_join_next() {
            stats += done.unwrap_or_default();
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let batch = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            b = collect(queue.as_ref(), &opts) => b,
        };
        let batch = match batch {
            Ok(b) => {
                failures = 0;
                b
            }
            Err(e) if !e.transient => break Err(e),
            Err(e) => {
                drop(permit);
                failures += 1;
                if opts.once && failures >= ONCE_RECEIVE_ATTEMPTS {
                    break Err(e);
                }
                let wait = receive_backoff(failures);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "receive failed; backing off");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        if batch.is_empty() {
            drop(permit);
            if opts.once {
                if inflight.is_empty() {
                    break Ok(());
                }
                // Failures of the batches in flight may come back: wait for one first.
                if let Some(done) = inflight.join_next().await {
                    stats += done.unwrap_or_default();
                }
            }
            continue;
        }
        let event = to_event(&batch, queue.arn(), &region);
        let inv = Invocation {
            request_id: format!("{mapping_id}/{}", ulid::Ulid::new()),
            deadline: Instant::now() + opts.function_timeout,
            shutdown: shutdown.clone(),
        };
        let (queue, handler, visibility) = (queue.clone(), handler.clone(), opts.visibility);
        inflight.spawn(async move {
            let _permit = permit;
            let run = handler(event, inv);
            handle_batch(queue.as_ref(), batch, visibility, run).await
        });
    };
    // Drain: batches in flight see the shutdown and finish within the drain timeout;
    // whatever is still running then is dropped and its messages come back.
    let drain = async {
        while let Some(done) = inflight.join_next().await {
            stats += done.unwrap_or_default();
        }
    };
    if tokio::time::timeout(opts.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::error!(
            abandoned = inflight.len(),
            "drain timed out; abandoning the batches in flight (their messages come back)"
        );
        inflight.abort_all();
    }
    tracing::info!(?stats, "mapping stopped");
    outcome.map(|()| stats)
}

/// Receives one batch: a long poll for the first messages, then more until the batch is
/// full, a receive comes back empty, or the batching window has passed.
async fn collect<Q: Queue>(queue: &Q, opts: &MappingOptions) -> Result<Vec<Message>, QueueError> {
    let size = opts.batch_size.clamp(1, MAX_BATCH);
    let mut batch: Vec<Message> = Vec::new();
    let mut window_end: Option<Instant> = None;
    loop {
        let wait = match window_end {
            None => opts.wait_time,
            Some(end) => end.saturating_duration_since(Instant::now()),
        };
        let got = match queue
            .receive(size - batch.len(), wait, opts.visibility)
            .await
        {
            Ok(got) => got,
            // Keep what was received; its visibility covers a later try.
            Err(e) if batch.is_empty() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "receive failed while filling a batch; handling what arrived");
                return Ok(batch);
            }
        };
        let empty = got.is_empty();
        batch.extend(got);
        let end = *window_end.get_or_insert_with(|| Instant::now() + opts.batching_window);
        if empty || batch.len() >= size || Instant::now() >= end {
            return Ok(batch);
        }
    }
}

/// Runs the handler on one batch while keeping its messages invisible, then deletes the
/// ones it did not report as failed.
async fn handle_batch<Q: Queue>(
    queue: &Q,
    batch: Vec<Message>,
    visibility: Duration,
    run: impl Future<Output = SqsBatchResponse>,
) -> MappingStats {
    let handles: Vec<String> = batch
        .iter()
        .filter_map(|m| m.receipt_handle.clone())
        .collect();
    let keep = keep_invisible(queue, &handles, visibility);
    let resp = tokio::select! {
        // The answer first: once it is there, no more extensions.
        biased;
        r = run => r,
        never = keep => match never {},
    };
    // The extensions stopped with the select above; only now delete.
    let failed: std::collections::HashSet<&str> = resp
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    let done: Vec<String> = batch
        .iter()
        .filter(|m| !failed.contains(m.message_id().unwrap_or_default()))
        .filter_map(|m| m.receipt_handle.clone())
        .collect();
    let mut stats = MappingStats {
        received: batch.len() as u64,
        failed: (batch.len() - done.len()) as u64,
        ..Default::default()
    };
    if !done.is_empty() {
        match queue.delete(&done).await {
            Ok(n) => {
                stats.deleted = n as u64;
                stats.delete_failed = (done.len() - n) as u64;
            }
            Err(e) => {
                stats.delete_failed = done.len() as u64;
                tracing::error!(error = %e, "delete failed; the messages come back and are handled again");
            }
        }
    }
    stats
}

/// Every third of `visibility`, makes the messages invisible for `visibility` again.
/// Never returns: it is dropped when the handler answers.
async fn keep_invisible<Q: Queue>(
    queue: &Q,
    handles: &[String],
    visibility: Duration,
) -> std::convert::Infallible {
    let period = (visibility / 3).max(Duration::from_millis(500));
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = queue.extend(handles, visibility).await {
            tracing::warn!(error = %e, "could not keep the batch invisible; its messages may be delivered again");
        }
    }
}

/// The event the Lambda mapping would deliver for these messages.
pub fn to_event(msgs: &[Message], arn: &str, region: &str) -> SqsEvent {
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
                a.binary_value = v.binary_value.as_ref().map(|b| {
                    let mut data = Base64Data::default();
                    *data = b.as_ref().to_vec();
                    data
                });
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

#[cfg(test)]
mod tests {
    //! The mapping's timing against an in-memory queue, with paused time: tokio's clock
    //! only moves when every task waits, so the assertions are exact and nothing sleeps.

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use aws_lambda_events::event::sqs::BatchItemFailure;

    use super::*;

    /// What the queue was asked to do, and when (paused clock, from the start).
    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        Receive { at: Duration, got: usize },
        Extend { at: Duration, n: usize },
        Delete { at: Duration, n: usize },
    }

    /// Messages that become receivable at given times; receives long-poll like SQS.
    #[derive(Debug)]
    struct MemQueue {
        start: Instant,
        pending: Mutex<VecDeque<(Duration, Message)>>,
        calls: Mutex<Vec<Call>>,
        /// Receives that fail (transiently) before one succeeds.
        failing: Mutex<u32>,
        fatal: bool,
    }

    impl MemQueue {
        fn new(msgs: &[(u64, &str)]) -> Arc<Self> {
            Arc::new(Self {
                start: Instant::now(),
                pending: Mutex::new(
                    msgs.iter()
                        .map(|(at, id)| {
                            let m = Message::builder()
                                .message_id(*id)
                                .receipt_handle(format!("rh-{id}"))
                                .body("{}")
                                .build();
                            (Duration::from_secs(*at), m)
                        })
                        .collect(),
                ),
                calls: Mutex::new(Vec::new()),
                failing: Mutex::new(0),
                fatal: false,
            })
        }
        fn now(&self) -> Duration {
            Instant::now() - self.start
        }
        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
        fn log(&self, c: Call) {
            self.calls.lock().unwrap().push(c);
        }
    }

    impl Queue for MemQueue {
        fn arn(&self) -> &str {
            "arn:aws:sqs:eu-west-1:123456789012:mem"
        }
        async fn receive(
            &self,
            max: usize,
            wait: Duration,
            _visibility: Duration,
        ) -> Result<Vec<Message>, QueueError> {
            {
                let mut f = self.failing.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    self.log(Call::Receive {
                        at: self.now(),
                        got: 0,
                    });
                    return Err(QueueError {
                        op: "ReceiveMessage",
                        queue: "mem".into(),
                        message: "throttled".into(),
                        transient: !self.fatal,
                    });
                }
            }
            let deadline = Instant::now() + wait;
            loop {
                let got: Vec<Message> = {
                    let mut p = self.pending.lock().unwrap();
                    let now = self.now();
                    let mut got = Vec::new();
                    while got.len() < max && p.front().is_some_and(|(at, _)| *at <= now) {
                        got.push(p.pop_front().unwrap().1);
                    }
                    got
                };
                let next = self.pending.lock().unwrap().front().map(|(at, _)| *at);
                if !got.is_empty() || Instant::now() >= deadline {
                    self.log(Call::Receive {
                        at: self.now(),
                        got: got.len(),
                    });
                    return Ok(got);
                }
                let until = next
                    .map(|at| (self.start + at).min(deadline))
                    .unwrap_or(deadline);
                tokio::time::sleep_until(until).await;
            }
        }
        async fn delete(&self, handles: &[String]) -> Result<usize, QueueError> {
            self.log(Call::Delete {
                at: self.now(),
                n: handles.len(),
            });
            Ok(handles.len())
        }
        async fn extend(&self, handles: &[String], _v: Duration) -> Result<(), QueueError> {
            self.log(Call::Extend {
                at: self.now(),
                n: handles.len(),
            });
            Ok(())
        }
    }

    fn opts() -> MappingOptions {
        MappingOptions {
            queue_url: "mem".into(),
            batch_size: 10,
            batching_window: Duration::ZERO,
            wait_time: Duration::from_secs(20),
            visibility: Duration::from_secs(9),
            concurrency: 1,
            function_timeout: Duration::from_secs(900),
            once: true,
            drain_timeout: Duration::from_secs(5),
        }
    }

    /// A handler that takes `secs` per batch and fails the messages named in `fail`.
    fn handler(
        secs: u64,
        fail: &'static [&'static str],
    ) -> impl Fn(
        SqsEvent,
        Invocation,
    ) -> std::pin::Pin<Box<dyn Future<Output = SqsBatchResponse> + Send>>
    + Send
    + Sync
    + 'static {
        move |event: SqsEvent, _inv| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                let mut resp = SqsBatchResponse::default();
                for r in event.records {
                    let id = r.message_id.unwrap_or_default();
                    if fail.contains(&id.as_str()) {
                        let mut f = BatchItemFailure::default();
                        f.item_identifier = id;
                        resp.batch_item_failures.push(f);
                    }
                }
                resp
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_batching_window_fills_a_batch_until_it_closes() {
        let q = MemQueue::new(&[(0, "a"), (2, "b"), (4, "c"), (30, "late")]);
        let mut o = opts();
        o.batch_size = 5;
        o.batching_window = Duration::from_secs(10);
        let stats = run(q.clone(), o, handler(0, &[]), CancellationToken::new())
            .await
            .unwrap();
        // a, b, c in one batch: the window (10 s from the first message) closed before
        // the batch was full; `late` in a second one.
        let receives: Vec<_> = q
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Receive { at, got } if got > 0 => Some((at.as_secs(), got)),
                _ => None,
            })
            .collect();
        assert_eq!(receives, vec![(0, 1), (2, 1), (4, 1), (30, 1)]);
        let deletes: Vec<_> = q
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Delete { at, n } => Some((at.as_secs(), n)),
                _ => None,
            })
            .collect();
        assert_eq!(deletes, vec![(10, 3), (40, 1)]);
        assert_eq!(
            stats,
            MappingStats {
                received: 4,
                deleted: 4,
                ..Default::default()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn messages_stay_invisible_while_the_handler_runs_and_only_successes_are_deleted() {
        let q = MemQueue::new(&[(0, "ok"), (0, "bad")]);
        let stats = run(
            q.clone(),
            opts(),
            handler(60, &["bad"]),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let calls = q.calls();
        let extends: Vec<u64> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Extend { at, n: 2 } => Some(at.as_secs()),
                _ => None,
            })
            .collect();
        // Every third of the 9 s visibility while the 60 s handler runs.
        assert_eq!(extends, (1..20).map(|i| i * 3).collect::<Vec<_>>());
        let delete = calls
            .iter()
            .position(|c| matches!(c, Call::Delete { .. }))
            .unwrap();
        assert_eq!(
            calls[delete],
            Call::Delete {
                at: Duration::from_secs(60),
                n: 1
            }
        );
        // No extension after the delete (it would fail with an invalid receipt handle).
        assert!(
            !calls[delete..]
                .iter()
                .any(|c| matches!(c, Call::Extend { .. }))
        );
        assert_eq!((stats.deleted, stats.failed), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_drains_within_the_drain_timeout() {
        let q = MemQueue::new(&[(0, "slow"), (1, "quick")]);
        let mut o = opts();
        o.once = false;
        o.concurrency = 2;
        o.batch_size = 1;
        o.drain_timeout = Duration::from_secs(5);
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            s.cancel();
        });
        // `slow` never sees the shutdown (it sleeps 1000 s); `quick` ends at 4 s.
        let slow_or_quick = move |event: SqsEvent, inv: Invocation| {
            let slow = event.records[0].message_id.as_deref() == Some("slow");
            async move {
                let d = if slow { 1000 } else { 3 };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(d)) => {}
                    _ = inv.shutdown.cancelled(), if !slow => {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
                SqsBatchResponse::default()
            }
        };
        let t = Instant::now();
        let stats = run(q.clone(), o, slow_or_quick, shutdown).await.unwrap();
        // Stopped receiving at 2 s; `quick` finished its drain at 4 s; `slow` was
        // abandoned when the 5 s drain ran out (its message comes back by itself).
        assert_eq!(t.elapsed(), Duration::from_secs(7));
        assert_eq!((stats.received, stats.deleted), (1, 1));
        assert!(
            q.calls()
                .iter()
                .all(|c| !matches!(c, Call::Receive { at, .. } if *at > Duration::from_secs(2)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failing_receives_back_off_and_fatal_ones_stop_the_mapping() {
        let q = MemQueue::new(&[(0, "m")]);
        *q.failing.lock().unwrap() = 3;
        let mut o = opts();
        o.wait_time = Duration::ZERO;
        let t = Instant::now();
        let stats = run(q.clone(), o, handler(0, &[]), CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(stats.deleted, 1);
        // 1 + 2 + 4 s of backoff before the fourth receive got the message.
        assert_eq!(t.elapsed(), Duration::from_secs(7));
        assert_eq!(receive_backoff(1), Duration::from_secs(1));
        assert_eq!(receive_backoff(4), Duration::from_secs(8));
        assert_eq!(receive_backoff(40), MAX_RECEIVE_BACKOFF);

        // `once` gives up after a few; a refusal that retrying cannot fix stops at once.
        let q = MemQueue::new(&[]);
        *q.failing.lock().unwrap() = 100;
        assert!(
            run(q, opts(), handler(0, &[]), CancellationToken::new())
                .await
                .is_err()
        );
        let mut fatal = MemQueue::new(&[]);
        Arc::get_mut(&mut fatal).unwrap().fatal = true;
        *fatal.failing.lock().unwrap() = 1;
        let mut o = opts();
        o.once = false;
        let t = Instant::now();
        let e = run(fatal, o, handler(0, &[]), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(!e.transient);
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[test]
    fn the_event_is_what_lambda_would_deliver() {
        let m = Message::builder()
            .message_id("id-1")
            .receipt_handle("rh")
            .body("{\"a\":1}")
            .message_attributes(
                "agentq-plan",
                aws_sdk_sqs::types::MessageAttributeValue::builder()
                    .data_type("Number")
                    .string_value("2")
                    .build()
                    .unwrap(),
            )
            .build();
        let e = to_event(&[m], "arn:aws:sqs:eu-west-1:1:q", "eu-west-1");
        let r = &e.records[0];
        assert_eq!(r.message_id.as_deref(), Some("id-1"));
        assert_eq!(r.event_source.as_deref(), Some("aws:sqs"));
        assert_eq!(
            r.event_source_arn.as_deref(),
            Some("arn:aws:sqs:eu-west-1:1:q")
        );
        assert_eq!(r.aws_region.as_deref(), Some("eu-west-1"));
        let a = &r.message_attributes["agentq-plan"];
        assert_eq!(
            (a.data_type.as_deref(), a.string_value.as_deref()),
            (Some("Number"), Some("2"))
        );
        // It round-trips as the Lambda JSON.
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json["Records"][0]["eventSourceARN"],
            "arn:aws:sqs:eu-west-1:1:q"
        );
    }
}
