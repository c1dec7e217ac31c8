//! The observability settings every binary shares ([`ObservabilityArgs`]: metrics target
//! and namespace, webhook, EventBridge bus; traces come from the standard `OTEL_*`
//! variables) and the bundle they build ([`Observability`]: metrics, tracer, notifier),
//! with the one call that ends an invocation's telemetry: [`Observability::flush`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_config::SdkConfig;
use tokio::time::Instant;

use crate::config::ConfigError;
use crate::metrics::{DEFAULT_NAMESPACE, Metrics, MetricsTarget};
use crate::notify::{Notifier, NotifyConfig, Webhook, WebhookSecret};
use crate::telemetry::Telemetry;

/// Which binary is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Agent,
    Dispatcher,
    Producer,
}

impl Service {
    /// The metrics' `Service` dimension.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Dispatcher => "dispatcher",
            Self::Producer => "producer",
        }
    }

    /// `service.name` when `OTEL_SERVICE_NAME` does not say.
    pub fn default_service_name(self) -> &'static str {
        match self {
            Self::Agent => "agentq-agent",
            Self::Dispatcher => "agentq-dispatcher",
            Self::Producer => "agentq",
        }
    }
}

/// Metrics and notification settings (flags with `AGENTQ_*` environment fallbacks).
/// Traces are configured by the standard `OTEL_*` variables (see docs/observability.md).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ObservabilityArgs {
    /// Where CloudWatch Embedded Metric Format lines go: stdout, stderr or off (default:
    /// stdout for `lambda` and `poll`, stderr for commands that print a result on stdout).
    #[arg(long, env = "AGENTQ_METRICS", value_enum, global = true)]
    pub metrics: Option<MetricsTarget>,
    /// CloudWatch namespace of the metrics.
    #[arg(long, env = "AGENTQ_METRICS_NAMESPACE", global = true)]
    pub metrics_namespace: Option<String>,
    /// POST a signed notification (Standard Webhooks) to this URL on every job state change.
    #[arg(long, env = "AGENTQ_WEBHOOK_URL", global = true)]
    pub webhook_url: Option<String>,
    /// The webhook signing secret: whsec_ + base64, or any string of 16+ bytes.
    #[arg(
        long,
        env = "AGENTQ_WEBHOOK_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub webhook_secret: Option<String>,
    /// Also put every job state change on this EventBridge bus (name or ARN).
    #[arg(long, env = "AGENTQ_EVENT_BUS", global = true)]
    pub event_bus: Option<String>,
}

impl ObservabilityArgs {
    /// The settings from the environment alone (for programs without these flags).
    pub fn from_env() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            args: ObservabilityArgs,
        }
        use clap::Parser;
        Only::try_parse_from(["agentq"])
            .map(|o| o.args)
            .unwrap_or_default()
    }
}

/// Metrics, tracer and notifier of one process. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Observability {
    pub service: Service,
    pub metrics: Metrics,
    pub telemetry: Telemetry,
    pub notifier: Notifier,
    /// Dropped notifications already reported as a metric.
    reported_drops: Arc<AtomicU64>,
}

impl Observability {
    /// Nothing is written, exported or sent (trace contexts still pass through).
    pub fn disabled(service: Service) -> Self {
        Self {
            service,
            metrics: Metrics::off(),
            telemetry: Telemetry::disabled(),
            notifier: Notifier::disabled(),
            reported_drops: Arc::default(),
        }
    }

    /// Validates the settings and starts the notifier (needs a Tokio runtime).
    /// `default_target` is where metrics go unless `AGENTQ_METRICS` says; `tier` is the
    /// metrics' `Tier` dimension.
    pub fn build(
        args: &ObservabilityArgs,
        service: Service,
        tier: &str,
        default_target: MetricsTarget,
        sdk: &SdkConfig,
    ) -> Result<Self, ConfigError> {
        let namespace = args
            .metrics_namespace
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        if namespace.len() > 255 || namespace.starts_with("AWS/") || namespace.contains(':') {
            return Err(ConfigError::Invalid {
                env: "AGENTQ_METRICS_NAMESPACE",
                value: namespace,
                why: "use 1-255 characters, no ':' and not the reserved AWS/ prefix".into(),
            });
        }
        let metrics = Metrics::new(
            &namespace,
            service.as_str(),
            tier,
            args.metrics.unwrap_or(default_target),
        );
        let telemetry = Telemetry::from_env(service.default_service_name()).map_err(|e| {
            ConfigError::Invalid {
                env: e.var,
                value: e.value,
                why: e.why,
            }
        })?;
        let webhook = match (&args.webhook_url, &args.webhook_secret) {
            (None, _) => None,
            (Some(url), secret) => {
                let url = crate::http::parse_url(url).map_err(|why| ConfigError::Invalid {
                    env: "AGENTQ_WEBHOOK_URL",
                    value: url.clone(),
                    why,
                })?;
                let Some(secret) = secret else {
                    return Err(ConfigError::Missing {
                        what: "the webhook signing secret (webhooks are always signed)",
                        flag: "webhook-secret",
                        env: "AGENTQ_WEBHOOK_SECRET",
                    });
                };
                let secret = WebhookSecret::parse(secret).map_err(|why| ConfigError::Invalid {
                    env: "AGENTQ_WEBHOOK_SECRET",
                    value: "(hidden)".into(),
                    why,
                })?;
                Some(Webhook { url, secret })
            }
        };
        let event_bus = args
            .event_bus
            .clone()
            .map(|b| b.trim().to_owned())
            .filter(|b| !b.is_empty());
        if let Some(b) = &event_bus
            && (b.len() > 1600 || b.contains(char::is_whitespace))
        {
            return Err(ConfigError::Invalid {
                env: "AGENTQ_EVENT_BUS",
                value: b.clone(),
                why: "use an event bus name or ARN".into(),
            });
        }
        let eventbridge = event_bus
            .as_ref()
            .map(|_| aws_sdk_eventbridge::Client::new(sdk));
        let notifier = Notifier::start(
            NotifyConfig {
                webhook,
                event_bus,
                ..NotifyConfig::default()
            },
            eventbridge,
        );
        Ok(Self {
            service,
            metrics,
            telemetry,
            notifier,
            reported_drops: Arc::default(),
        })
    }

    /// Ends an invocation's telemetry: exports finished spans and delivers queued
    /// notifications, together, until `until` at the latest (and at most 10 s). Call it
    /// before a Lambda invocation returns and before a process exits. Dropped
    /// notifications are reported as a metric.
    pub async fn flush(&self, until: Instant) {
        let until = until.min(Instant::now() + Duration::from_secs(10));
        let budget = until.saturating_duration_since(Instant::now());
        let (_spans, drained) =
            tokio::join!(self.telemetry.flush(budget), self.notifier.drain(until));
        let before = self.reported_drops.swap(drained.dropped, Ordering::Relaxed);
        self.metrics
            .notifications_dropped(drained.dropped.saturating_sub(before));
    }
}
