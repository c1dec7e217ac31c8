//! agentq's dispatcher: re-plans what lands on the dead-letter queue (retry with
//! backoff, resume a timed-out session, escalate to a bigger tier, or end the job with
//! the reason), sweeps up jobs whose message is gone, and prepares and launches the
//! agent image on Lambda (`deploy`).
//!
//! Modules: [`policy`] (configuration and backoff), [`plan`] (the pure decision),
//! [`replan`] (the batch handler both front ends call), [`sweep`] (stranded jobs),
//! [`poller`] (the DLQ poller front end), [`lambda`] (the Lambda front end: DLQ events
//! and the sweep's schedule), [`deploy`] (image build, ECR, function, alias, event
//! source mapping).

pub mod deploy;
pub mod error;
pub mod lambda;
pub mod plan;
pub mod policy;
pub mod poller;
pub mod replan;
pub mod sweep;

pub use error::{DeployError, PolicyError, ReplanError};
pub use policy::{Policy, RawPolicy};
pub use replan::{Outcome, Replanner, StatsSnapshot};
