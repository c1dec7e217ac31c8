//! The Lambda front end: the runtime delivers SQS events from the event source mapping;
//! the invocation's budget comes from the context deadline. A graceful-shutdown extension
//! is registered so the runtime's SIGTERM at teardown is seen (it never comes at the
//! invocation deadline; the handler's own reserve covers that).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{LambdaEvent, service_fn};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Deps, Invocation, handle_batch};

/// Serves invocations until the runtime goes away.
pub async fn run(deps: Arc<Deps>) -> Result<(), lambda_runtime::Error> {
    let shutdown = CancellationToken::new();
    let on_term = shutdown.clone();
    lambda_runtime::spawn_graceful_shutdown_handler(move || async move {
        tracing::info!("runtime shutting down");
        on_term.cancel();
    })
    .await;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let deps = deps.clone();
        let shutdown = shutdown.clone();
        async move {
            Ok::<SqsBatchResponse, lambda_runtime::Error>(handle(&deps, event, &shutdown).await)
        }
    }))
    .await
}

/// One invocation, testable without the runtime.
pub async fn handle(
    deps: &Arc<Deps>,
    event: LambdaEvent<SqsEvent>,
    shutdown: &CancellationToken,
) -> SqsBatchResponse {
    let left = event
        .context
        .deadline()
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let inv = Invocation {
        request_id: event.context.request_id.clone(),
        deadline: Instant::now() + left,
    };
    handle_batch(deps, event.payload, &inv, shutdown).await
}
