//! agentq's agent: one handler over a batch of SQS messages (claim → secrets → child →
//! heartbeats → logs → finish → partial batch response), with four front ends that all
//! call it: the Lambda runtime ([`lambda`]), a local poller that plays the event source
//! mapping ([`poll`]), the AgentCore Runtime HTTP contract ([`serve`]), and a one-shot
//! run of a spec file (`agentq-agent run`).

pub mod checkpoint;
pub mod child;
pub mod config;
pub mod credentials;
pub mod events;
pub mod handler;
pub mod isolation;
pub mod job;
pub mod lambda;
pub mod logs;
pub mod observe;
pub mod poll;
pub mod redact;
pub mod secrets;
pub mod serve;
pub mod upload;
pub mod workspace;

use std::collections::HashMap;
use std::sync::Mutex;

use agentq_core::{AwsClients, JobStore, Observability, Service, Settings};
use tokio::sync::Semaphore;

pub use config::{AgentArgs, AgentConfig};
pub use handler::{Invocation, handle_batch};

/// Everything the handler needs, built once per process.
#[derive(Debug)]
pub struct Deps {
    pub clients: AwsClients,
    /// Metrics, traces and notifications (off unless [`Deps::with_observability`]).
    pub obs: Observability,
    pub store: JobStore,
    pub settings: Settings,
    pub config: AgentConfig,
    /// Bounds the children running at once in this process.
    pub jobs: Semaphore,
    /// One uid/gid per concurrent job when the agent is root (`None` otherwise).
    pub identities: Option<isolation::IdentityPool>,
    /// Queue ARN → URL, for visibility heartbeats. A std mutex: held only for a lookup,
    /// never across an await.
    queue_urls: Mutex<HashMap<String, String>>,
}

impl Deps {
    /// Fails when a setting the agent needs (table, bucket) is missing.
    pub fn new(
        clients: AwsClients,
        settings: Settings,
        config: AgentConfig,
    ) -> Result<Self, agentq_core::ConfigError> {
        let store = JobStore::new(clients.dynamodb.clone(), settings.table()?);
        settings.bucket()?;
        Ok(Self {
            jobs: Semaphore::new(config.max_concurrent_jobs),
            identities: config
                .child_identity
                .map(|(uid, gid)| isolation::IdentityPool::new(uid, gid)),
            clients,
            obs: Observability::disabled(Service::Agent),
            store,
            settings,
            config,
            queue_urls: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the (default: disabled) metrics, tracer and notifier.
    pub fn with_observability(mut self, obs: Observability) -> Self {
        self.obs = obs;
        self
    }

    /// Remembers a queue's URL for its ARN (the poller knows both).
    pub fn remember_queue(&self, arn: &str, url: &str) {
        if let Ok(mut m) = self.queue_urls.lock() {
            m.insert(arn.to_owned(), url.to_owned());
        }
    }

    /// The URL of the queue with this ARN (an event's `eventSourceARN`), for visibility
    /// heartbeats and deferred copies.
    ///
    /// No AWS call: the URL is one the agent is configured with (`AGENTQ_QUEUE_URL`,
    /// `AGENTQ_DLQ_URL`) or one the poller remembered, matched on the queue's account and
    /// name. Looking it up with `sqs:GetQueueUrl` would need a permission the function's
    /// role does not otherwise need. `None` (with a warning) when no configured queue
    /// matches: the message then keeps the queue's own visibility timeout.
    pub async fn queue_url_for(&self, arn: &str) -> Option<String> {
        if let Some(u) = self
            .queue_urls
            .lock()
            .ok()
            .and_then(|m| m.get(arn).cloned())
        {
            return Some(u);
        }
        let configured = [self.settings.queue_url().ok(), self.settings.dlq_url().ok()];
        match configured
            .into_iter()
            .flatten()
            .find(|url| queue_url_matches_arn(url, arn))
        {
            Some(url) => {
                self.remember_queue(arn, url);
                Some(url.to_owned())
            }
            None => {
                tracing::warn!(
                    queue_arn = arn,
                    configured = ?configured,
                    "the message comes from a queue the agent is not configured with \
                     (set AGENTQ_QUEUE_URL to its URL): its visibility cannot be extended"
                );
                None
            }
        }
    }
}

/// Whether `url` (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`, or an emulator's
/// `http://HOST:PORT/ACCOUNT/NAME`) names the queue `arn` (`arn:PARTITION:sqs:REGION:ACCOUNT:NAME`):
/// same account and name.
pub fn queue_url_matches_arn(url: &str, arn: &str) -> bool {
    let mut a = arn.split(':');
    let (
        Some("arn"),
        Some(_partition),
        Some("sqs"),
        Some(_region),
        Some(account),
        Some(name),
        None,
    ) = (
        a.next(),
        a.next(),
        a.next(),
        a.next(),
        a.next(),
        a.next(),
        a.next(),
    )
    else {
        return false;
    };
    let path = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['?', '#'])
        .next()
        .unwrap_or_default();
    let mut segs = path.trim_end_matches('/').rsplit('/');
    let (Some(url_name), Some(url_account)) = (segs.next(), segs.next()) else {
        return false;
    };
    !name.is_empty() && url_name == name && url_account == account
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:sqs:us-east-1:123456789012:agentq-jobs";

    #[test]
    fn queue_urls_match_their_arn_by_account_and_name() {
        for url in [
            "https://sqs.us-east-1.amazonaws.com/123456789012/agentq-jobs",
            "https://queue.amazonaws.com/123456789012/agentq-jobs",
            "http://127.0.0.1:4599/123456789012/agentq-jobs",
            "http://127.0.0.1:4599/123456789012/agentq-jobs/",
        ] {
            assert!(queue_url_matches_arn(url, ARN), "{url}");
        }
        for url in [
            "https://sqs.us-east-1.amazonaws.com/123456789012/agentq-jobs-large",
            "https://sqs.us-east-1.amazonaws.com/999999999999/agentq-jobs",
            "https://sqs.us-east-1.amazonaws.com/agentq-jobs",
            "agentq-jobs",
        ] {
            assert!(!queue_url_matches_arn(url, ARN), "{url}");
        }
        let fifo = "arn:aws-cn:sqs:cn-north-1:123456789012:jobs.fifo";
        assert!(queue_url_matches_arn(
            "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/jobs.fifo",
            fifo
        ));
        assert!(!queue_url_matches_arn(
            "https://sqs.us-east-1.amazonaws.com/123456789012/agentq-jobs",
            "arn:aws:sns:us-east-1:123456789012:agentq-jobs"
        ));
        assert!(!queue_url_matches_arn(
            "https://sqs.us-east-1.amazonaws.com/123456789012/agentq-jobs",
            "not an arn"
        ));
    }
}
