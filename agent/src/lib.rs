//! agentq's agent: one handler over a batch of SQS messages (claim → secrets → child →
//! heartbeats → logs → finish → partial batch response), with three front ends that all
//! call it: the Lambda runtime ([`lambda`]), a local poller that plays the event source
//! mapping ([`poll`]), and a one-shot run of a spec file (`agentq-agent run`).

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

    /// The URL of the queue with this ARN (cached; GetQueueUrl on first use).
    pub async fn queue_url_for(&self, arn: &str) -> Option<String> {
        if let Some(u) = self
            .queue_urls
            .lock()
            .ok()
            .and_then(|m| m.get(arn).cloned())
        {
            return Some(u);
        }
        // arn:aws:sqs:REGION:ACCOUNT:NAME
        let mut parts = arn.splitn(6, ':');
        let (_, _, _, _, account, name) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        let url = self
            .clients
            .sqs
            .get_queue_url()
            .queue_name(name)
            .queue_owner_aws_account_id(account)
            .send()
            .await
            .ok()?
            .queue_url?;
        self.remember_queue(arn, &url);
        Some(url)
    }
}
