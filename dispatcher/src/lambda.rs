//! The Lambda front end. One function serves two triggers: the DLQ's event source
//! mapping (an SQS event: re-plan each message, answer with a partial batch response)
//! and a schedule (an EventBridge scheduled event, or any event `{"agentq": "sweep"}`:
//! run one [sweep](crate::sweep)). [`handle`] is a plain async function over the raw
//! event, so it is tested without the runtime.

use aws_lambda_events::event::sqs::SqsEvent;
use serde_json::Value;
use tokio::time::Instant;

use crate::error::ReplanError;
use crate::replan::Replanner;

/// What invoked the function.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// The DLQ's event source mapping.
    Dlq(SqsEvent),
    /// The schedule: run a sweep.
    Sweep,
}

/// An invocation the dispatcher does not know how to handle.
#[derive(Debug, thiserror::Error)]
pub enum LambdaError {
    #[error(
        "unrecognised event (expected an SQS event from the DLQ mapping, an EventBridge \"Scheduled Event\", or {{\"agentq\": \"sweep\"}}): {0}"
    )]
    Unrecognised(String),
    #[error("sweep failed: {0}")]
    Sweep(#[from] ReplanError),
}

/// Tells the triggers apart.
pub fn trigger(event: Value) -> Result<Trigger, LambdaError> {
    if event.get("agentq").and_then(Value::as_str) == Some("sweep")
        || (event.get("source").and_then(Value::as_str) == Some("aws.events")
            && event.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event"))
    {
        return Ok(Trigger::Sweep);
    }
    if event.get("Records").is_some_and(Value::is_array) {
        return serde_json::from_value::<SqsEvent>(event)
            .map(Trigger::Dlq)
            .map_err(|e| LambdaError::Unrecognised(format!("not an SQS event: {e}")));
    }
    let mut shown = event.to_string();
    shown.truncate(300);
    Err(LambdaError::Unrecognised(shown))
}

/// One invocation: a partial batch response for the DLQ, the sweep's report for the
/// schedule. `deadline` is the invocation's.
pub async fn handle(
    replanner: &Replanner,
    event: Value,
    deadline: Instant,
) -> Result<Value, LambdaError> {
    match trigger(event)? {
        Trigger::Dlq(ev) => {
            let resp = replanner.handle(ev).await;
            Ok(serde_json::to_value(resp).unwrap_or(Value::Null))
        }
        Trigger::Sweep => {
            let report = replanner.sweep(Some(deadline)).await;
            replanner.flush_observability(deadline).await;
            let report = report?;
            Ok(serde_json::to_value(report).unwrap_or(Value::Null))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_and_sqs_events_are_told_apart() {
        let scheduled = serde_json::json!({
            "version": "0", "id": "89d1a02d-5ec7-412e-82f5-13505f849b41",
            "detail-type": "Scheduled Event", "source": "aws.events",
            "account": "123456789012", "time": "2026-01-01T00:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:events:us-east-1:123456789012:rule/agentq-sweep"], "detail": {}
        });
        assert_eq!(trigger(scheduled).unwrap(), Trigger::Sweep);
        assert_eq!(
            trigger(serde_json::json!({"agentq": "sweep"})).unwrap(),
            Trigger::Sweep
        );
        let fixture = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/sqs-event.json"),
        )
        .unwrap();
        match trigger(serde_json::from_str(&fixture).unwrap()).unwrap() {
            Trigger::Dlq(ev) => assert!(!ev.records.is_empty()),
            other => panic!("{other:?}"),
        }
        let e = trigger(serde_json::json!({"hello": 1}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unrecognised event") && e.contains("hello"),
            "{e}"
        );
        assert!(trigger(serde_json::json!({"Records": [{"body": 5}]})).is_err());
    }
}
