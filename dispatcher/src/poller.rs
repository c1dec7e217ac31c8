//! The `replan` front end: plays the DLQ's event source mapping against any SQS
//! endpoint. Long-polls up to 10 messages, turns them into an `SqsEvent`, calls the same
//! [`Replanner::handle`] as the Lambda front end, deletes what succeeded and leaves the
//! failures to come back after their visibility timeout. Stops between batches when
//! `shutdown` resolves (a batch in progress is finished first), or, with `once`, at the
//! first empty receive.

use std::future::Future;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage, SqsMessageAttribute};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use tracing::{debug, warn};

use crate::replan::{Replanner, StatsSnapshot};

/// How the poller runs.
#[derive(Debug, Clone)]
pub struct PollOptions {
    pub dlq_url: String,
    /// Long-poll wait per receive (0..=20).
    pub wait_seconds: i32,
    /// Drain: stop at the first receive that returns nothing.
    pub once: bool,
}

/// A poller failure that stops it (a receive that keeps failing).
#[derive(Debug, thiserror::Error)]
#[error("SQS {op} on {queue} failed: {message}")]
pub struct PollError {
    pub op: &'static str,
    pub queue: String,
    pub message: String,
}

/// Runs until `shutdown` resolves (or the queue is drained with `once`).
pub async fn run(
    replanner: &Replanner,
    sqs: &aws_sdk_sqs::Client,
    opts: &PollOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<StatsSnapshot, PollError> {
    tokio::pin!(shutdown);
    let mut errors = 0u32;
    loop {
        let receive = sqs
            .receive_message()
            .queue_url(&opts.dlq_url)
            .max_number_of_messages(10)
            .wait_time_seconds(opts.wait_seconds.clamp(0, 20))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send();
        let got = tokio::select! {
            _ = &mut shutdown => break,
            got = receive => got,
        };
        let msgs = match got {
            Ok(out) => {
                errors = 0;
                out.messages.unwrap_or_default()
            }
            Err(e) => {
                errors += 1;
                let message = agentq_core::aws::display(&e);
                if errors >= 5 || !agentq_core::aws::is_transient(&e) {
                    return Err(PollError {
                        op: "ReceiveMessage",
                        queue: opts.dlq_url.clone(),
                        message,
                    });
                }
                warn!(error = %message, "receive failed; backing off");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1 << errors)) => continue,
                }
            }
        };
        if msgs.is_empty() {
            if opts.once {
                break;
            }
            continue;
        }
        let mut event = SqsEvent::default();
        let mut handles = Vec::with_capacity(msgs.len());
        for m in msgs {
            handles.push((
                m.message_id.clone().unwrap_or_default(),
                m.receipt_handle.clone().unwrap_or_default(),
            ));
            event.records.push(to_event_message(m));
        }
        let resp = replanner.handle(event).await;
        let failed: Vec<&str> = resp
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        let entries: Vec<DeleteMessageBatchRequestEntry> = handles
            .iter()
            .enumerate()
            .filter(|(_, (id, _))| !failed.contains(&id.as_str()))
            .filter_map(|(i, (_, handle))| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(handle)
                    .build()
                    .ok()
            })
            .collect();
        debug!(
            deleting = entries.len(),
            leaving = failed.len(),
            "batch done"
        );
        if !entries.is_empty() {
            match sqs
                .delete_message_batch()
                .queue_url(&opts.dlq_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    for f in out.failed() {
                        warn!(id = %f.id(), code = %f.code(), "delete failed; the message comes back and is re-planned idempotently");
                    }
                }
                Err(e) => {
                    warn!(error = %agentq_core::aws::display(&e), "delete failed; the messages come back and are re-planned idempotently")
                }
            }
        }
    }
    Ok(replanner.stats())
}

/// The SQS API's message as the Lambda event carries it.
pub fn to_event_message(m: aws_sdk_sqs::types::Message) -> SqsMessage {
    let mut out = SqsMessage::default();
    out.message_id = m.message_id;
    out.receipt_handle = m.receipt_handle;
    out.body = m.body;
    out.md5_of_body = m.md5_of_body;
    out.event_source = Some("aws:sqs".into());
    if let Some(attrs) = m.attributes {
        out.attributes = attrs
            .into_iter()
            .map(|(k, v)| (k.as_str().to_owned(), v))
            .collect();
    }
    if let Some(attrs) = m.message_attributes {
        out.message_attributes = attrs
            .into_iter()
            .map(|(k, v)| {
                let mut a = SqsMessageAttribute::default();
                a.string_value = v.string_value;
                a.data_type = Some(v.data_type);
                (k, a)
            })
            .collect();
    }
    out
}
