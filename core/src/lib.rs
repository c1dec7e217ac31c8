//! agentq's core: the job spec and its validation, ids, the job state machine and failure
//! causes, the storage layout (S3 keys, DynamoDB attributes), the jobs-table operations,
//! the DLQ failure record and the SQS Extended Client payload format, chained delays,
//! the SQS event source mapping the non-Lambda front ends play, the one AWS
//! configuration builder every binary uses, and the command-line conventions the three
//! binaries share (exit codes, `--output`); and observability: EMF metrics, OTLP traces
//! and state-change notifications (webhook, EventBridge).

pub mod aws;
pub mod config;
pub mod delay;
pub mod exit;
pub mod failure;
pub mod http;
pub mod ids;
pub mod invocation;
pub mod layout;
pub mod mapping;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod output;
pub mod payload;
pub mod record;
pub mod spec;
pub mod state;
pub mod store;
pub mod telemetry;

pub use config::{AwsClients, ConfigError, Settings, SettingsArgs, load_sdk_config};
pub use exit::ExitStatus;
pub use ids::{Attempt, JobId};
pub use layout::{Layout, Stream};
pub use observe::{Observability, ObservabilityArgs, Service};
pub use output::OutputFormat;
pub use record::{Decision, JobRecord, Progress};
pub use spec::{AgentPreset, JobSpec, SpecError, ValidSpec};
pub use state::{Action, CauseKind, FailureCause, JobState};
pub use store::{JobStore, StoreError};
