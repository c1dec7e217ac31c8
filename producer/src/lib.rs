//! agentq's producer: the library behind the `agentq` CLI, for programs that submit,
//! inspect, follow and cancel agentq jobs.
//!
//! - [`Producer`] submits one job ([`Producer::submit`]) or many
//!   ([`Producer::submit_batch`]): the `QUEUED` record is written first (a duplicate job id
//!   is refused), then the message is sent; specs larger than the offload threshold go
//!   through S3 as an Amazon SQS Extended Client pointer.
//! - [`Producer::status`], [`Producer::list`], [`Producer::cancel`], [`Producer::wait`] and
//!   [`Producer::logs`] read and steer jobs.
//! - [`dashboard`] is the local web UI behind `agentq dashboard`.
//! - [`cli`] holds the `agentq` command line and its testable entry point [`cli::run`].
//!
//! Errors are one enum, [`ProducerError`], whose variants carry context, say what to do
//! next, and know whether retrying may help ([`ProducerError::is_retryable`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), agentq_producer::ProducerError> {
//! use agentq_core::{JobSpec, Settings, SettingsArgs};
//! use agentq_producer::{Producer, SubmitOptions, WaitUntil};
//!
//! let sdk = agentq_core::load_sdk_config().await?;
//! // Queue, table and bucket from the flags' environment fallbacks (AGENTQ_*).
//! let settings = Settings::from_args(&SettingsArgs {
//!     queue_url: std::env::var("AGENTQ_QUEUE_URL").ok(),
//!     table: std::env::var("AGENTQ_TABLE").ok(),
//!     bucket: std::env::var("AGENTQ_BUCKET").ok(),
//!     ..Default::default()
//! })?;
//! let producer = Producer::from_sdk(&sdk, settings);
//! let spec = producer.parse(
//!     br#"{"spec_version":1,"agent":"claude-code","prompt":"Fix the failing test"}"#,
//!     "example",
//! )?;
//! let job = producer.submit(spec, &SubmitOptions::default()).await?;
//! let done = producer
//!     .wait(&job.job_id, std::time::Duration::from_secs(5), WaitUntil::Finished, |_| {})
//!     .await?;
//! println!("{} ended {}", done.job_id, done.status);
//! # Ok(()) }
//! ```

pub mod batch;
pub mod cli;
pub mod dashboard;
pub mod error;
pub mod logs;
pub mod output;
pub mod producer;

pub use batch::{BatchEntry, BatchReport};
pub use error::{ErrorClass, ProducerError, RecordFate};
pub use logs::{LogRequest, LogSegment, LogsEnd};
pub use producer::{Offloaded, Producer, ProducerOptions, SubmitOptions, Submitted, WaitUntil};
