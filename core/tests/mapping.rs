//! Core's event source mapping against the emulator's SQS: the receive uses the
//! mapping's visibility (not the queue's long timeout), a batch in the handler stays
//! invisible past it, and only what succeeded is deleted — the failure is back within
//! the visibility. The timing itself is tested with paused time in the module.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentq_core::mapping::{self, MappingOptions, SqsQueue};
use agentq_testkit::{ResourceOptions, Resources, resources_with};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use aws_sdk_sqs::types::QueueAttributeName;
use tokio_util::sync::CancellationToken;

/// (visible, in flight) per the queue's attributes.
async fn depth(r: &Resources) -> (u64, u64) {
    let out = aws_sdk_sqs::Client::new(&r.sdk)
        .get_queue_attributes()
        .queue_url(&r.queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    let a = out.attributes.unwrap_or_default();
    let n = |k: QueueAttributeName| a.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
    (
        n(QueueAttributeName::ApproximateNumberOfMessages),
        n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

#[tokio::test]
async fn a_batch_stays_hidden_while_handled_and_only_its_failures_come_back() {
    // The queue's own visibility is 5 minutes: anything back within seconds is the
    // mapping's doing.
    let r = resources_with(ResourceOptions {
        max_receive_count: 10,
        visibility_timeout: 300,
    })
    .await;
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    for body in ["ok", "bad"] {
        sqs.send_message()
            .queue_url(&r.queue_url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
    let queue = Arc::new(SqsQueue::connect(sqs.clone(), &r.queue_url).await.unwrap());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<usize>(4);
    let handler = move |event: SqsEvent, _inv: mapping::Invocation| {
        let (stop, seen_tx) = (stop.clone(), seen_tx.clone());
        async move {
            let _ = seen_tx.send(event.records.len()).await;
            // Longer than three visibilities: the mapping must keep the batch hidden.
            tokio::time::sleep(Duration::from_secs(7)).await;
            stop.cancel();
            let mut resp = SqsBatchResponse::default();
            for m in event.records {
                if m.body.as_deref() == Some("bad") {
                    let mut f = BatchItemFailure::default();
                    f.item_identifier = m.message_id.unwrap_or_default();
                    resp.batch_item_failures.push(f);
                }
            }
            resp
        }
    };
    let opts = MappingOptions {
        queue_url: r.queue_url.clone(),
        batch_size: 10,
        batching_window: Duration::from_secs(1),
        wait_time: Duration::from_secs(2),
        visibility: Duration::from_secs(2),
        concurrency: 1,
        function_timeout: Duration::from_secs(60),
        once: false,
        drain_timeout: Duration::from_secs(30),
    };
    let run = tokio::spawn(mapping::run(queue, opts, handler, shutdown));

    assert_eq!(seen_rx.recv().await, Some(2), "both in one batch");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(depth(&r).await, (0, 2), "hidden past the 2 s visibility");

    let stats = run.await.unwrap().unwrap();
    assert_eq!((stats.received, stats.deleted, stats.failed), (2, 1, 1));
    let done = Instant::now();
    // The failure is back within its visibility, not the queue's 5 minutes.
    loop {
        if depth(&r).await == (1, 0) {
            break;
        }
        assert!(
            done.elapsed() < Duration::from_secs(15),
            "the failed message did not come back: {:?}",
            depth(&r).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let left = r.drain(&r.queue_url).await;
    assert_eq!(left, vec!["bad".to_string()]);
}

#[tokio::test]
async fn a_queue_that_does_not_exist_is_a_clear_error() {
    let r = resources_with(ResourceOptions::default()).await;
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    let missing = format!("{}-missing", r.queue_url);
    let e = SqsQueue::connect(sqs, &missing).await.unwrap_err();
    assert!(!e.transient, "{e}");
    assert!(e.to_string().contains(&missing), "{e}");
}
