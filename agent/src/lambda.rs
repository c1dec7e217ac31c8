//! The Lambda front end: the runtime delivers SQS events from the event source mapping;
//! the invocation's budget comes from the context deadline. A graceful-shutdown extension
//! is registered so the runtime's SIGTERM at teardown is seen (it never comes at the
//! invocation deadline; the handler's own reserve covers that).
//!
//! The deadline (`Lambda-Runtime-Deadline-Ms`) is an epoch time in milliseconds on AWS.
//! Local Runtime API emulators do not all agree: `cargo lambda watch` sends the
//! function's timeout as a plain duration. [`budget`] reads either, and falls back to
//! the function timeout for anything else, with a warning.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{LambdaEvent, service_fn};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Deps, Invocation, handle_batch};

pub use agentq_core::invocation::{Budget, MAX_FUNCTION_TIMEOUT, budget, function_timeout};

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
    let left = budget(
        event.context.deadline,
        SystemTime::now(),
        function_timeout(),
    );
    if let Some(why) = left.reason() {
        // Once per process: every invocation of a local emulator would say the same.
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                deadline_ms = event.context.deadline,
                budget_s = left.duration().as_secs_f64(),
                "{why}"
            );
        }
    }
    let inv = Invocation {
        request_id: event.context.request_id.clone(),
        deadline: Instant::now() + left.duration(),
    };
    handle_batch(deps, event.payload, &inv, shutdown).await
}
