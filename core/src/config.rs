//! Configuration: the one `SdkConfig` builder (standard AWS environment: `AWS_ENDPOINT_URL`,
//! `AWS_REGION`, `AWS_PROFILE`, the credentials chain; retries and timeouts set here, once)
//! and agentq's own settings, read from flags with `AGENTQ_*` environment fallbacks and
//! validated once into [`Settings`].
//!
//! Retries and timeouts of every AWS call are the SDK's own, configured here; nothing in
//! core or the dispatcher retries an AWS call on top of them.
//!
//! | | attempt timeout | operation timeout (all attempts) |
//! |---|---|---|
//! | DynamoDB, SSM | 10 s | 30 s |
//! | DynamoDB Query (a page of up to 1 MB) | 30 s | 60 s |
//! | SQS | 25 s (a long poll waits up to 20 s) | 60 s |
//! | S3 | 60 s (the answer comes after the whole body) | 180 s |
//! | anything else (Lambda, ECR, STS) | 30 s | 90 s |
//!
//! Connect timeout 3 s everywhere. Retries: the SDK's standard mode (retry quota, backoff
//! with full jitter from 200 ms up to 5 s), 4 attempts per call in all; the standard
//! `AWS_MAX_ATTEMPTS` and `AWS_RETRY_MODE` (`standard`, `adaptive`) override them.

use std::time::Duration;

use aws_config::retry::{RetryConfig, RetryMode};
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};

use crate::layout::Layout;

/// Default SSM path prefix for job secrets.
pub const DEFAULT_SECRETS_PREFIX: &str = "/agentq/secrets/";

/// `AGENTQ_STALE_AFTER_SECONDS` / `--stale-after-seconds`: a `RUNNING` lease whose
/// heartbeat is older than this is stale. The agent takes such a lease over (attempt + 1)
/// and the dispatcher treats it as crashed, so both must use the same value: set it on
/// both, or on neither. Keep it several heartbeats long (`AGENTQ_HEARTBEAT_SECONDS`,
/// default 5): 30 s is 6 missed heartbeats.
pub const STALE_AFTER_ENV: &str = "AGENTQ_STALE_AFTER_SECONDS";
/// Default of [`STALE_AFTER_ENV`], in seconds.
pub const DEFAULT_STALE_AFTER_SECONDS: f64 = 30.0;
/// [`DEFAULT_STALE_AFTER_SECONDS`] as a command-line default (`default_value`).
pub const DEFAULT_STALE_AFTER_SECONDS_ARG: &str = "30";
/// Accepted range of [`STALE_AFTER_ENV`], in seconds.
pub const STALE_AFTER_RANGE_SECONDS: std::ops::RangeInclusive<f64> = 1.0..=86_400.0;

/// Validates `AGENTQ_STALE_AFTER_SECONDS` (the default when `None`).
pub fn stale_after(seconds: Option<f64>) -> Result<std::time::Duration, ConfigError> {
    let s = seconds.unwrap_or(DEFAULT_STALE_AFTER_SECONDS);
    if !(s.is_finite() && STALE_AFTER_RANGE_SECONDS.contains(&s)) {
        return Err(ConfigError::Invalid {
            env: STALE_AFTER_ENV,
            value: s.to_string(),
            why: format!(
                "use {}..={} seconds (default {DEFAULT_STALE_AFTER_SECONDS}), the same value for the agent and the dispatcher",
                STALE_AFTER_RANGE_SECONDS.start(),
                STALE_AFTER_RANGE_SECONDS.end()
            ),
        });
    }
    Ok(std::time::Duration::from_secs_f64(s))
}

/// Attempts per AWS call, the first included, unless `AWS_MAX_ATTEMPTS` says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Largest `AWS_MAX_ATTEMPTS` accepted.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;
/// First retry backoff (exponential, full jitter).
pub const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry backoff: a Lambda invocation has a deadline to keep.
pub const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time to open a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One service's timeouts: per attempt, and per operation (all attempts and backoffs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceTimeouts {
    pub attempt: Duration,
    pub operation: Duration,
}

impl ServiceTimeouts {
    /// DynamoDB and SSM answer single-item calls in milliseconds; a hung connection
    /// is given up after 10 s (emulators on a busy machine need a few seconds).
    pub const FAST: Self = Self {
        attempt: Duration::from_secs(10),
        operation: Duration::from_secs(30),
    };
    /// A DynamoDB Query returns a page of up to 1 MB.
    pub const QUERY: Self = Self {
        attempt: Duration::from_secs(30),
        operation: Duration::from_secs(60),
    };
    /// SQS: a long poll (`WaitTimeSeconds` ≤ 20) answers after up to 20 s.
    pub const SQS: Self = Self {
        attempt: Duration::from_secs(25),
        operation: Duration::from_secs(60),
    };
    /// S3: the answer to an upload comes after its whole body.
    pub const S3: Self = Self {
        attempt: Duration::from_secs(60),
        operation: Duration::from_secs(180),
    };
    /// Every other service (Lambda, ECR, STS, credentials).
    pub const DEFAULT: Self = Self {
        attempt: Duration::from_secs(30),
        operation: Duration::from_secs(90),
    };

    pub fn config(self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(self.attempt)
            .operation_timeout(self.operation)
            .build()
    }
}

/// The retry configuration from the standard `AWS_MAX_ATTEMPTS` and `AWS_RETRY_MODE`
/// (read through `env`), with agentq's defaults where they are unset.
pub fn retry_config(env: impl Fn(&str) -> Option<String>) -> Result<RetryConfig, ConfigError> {
    let mode = match env("AWS_RETRY_MODE").filter(|v| !v.is_empty()) {
        None => RetryMode::Standard,
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "standard" => RetryMode::Standard,
            "adaptive" => RetryMode::Adaptive,
            _ => {
                return Err(ConfigError::Invalid {
                    env: "AWS_RETRY_MODE",
                    value: v,
                    why: "use standard or adaptive".into(),
                });
            }
        },
    };
    let attempts = match env("AWS_MAX_ATTEMPTS").filter(|v| !v.is_empty()) {
        None => DEFAULT_MAX_ATTEMPTS,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_ATTEMPTS_LIMIT).contains(&n) => n,
            _ => {
                return Err(ConfigError::Invalid {
                    env: "AWS_MAX_ATTEMPTS",
                    value: v,
                    why: format!(
                        "use a whole number of attempts per call from 1 (no retries) to {MAX_ATTEMPTS_LIMIT}"
                    ),
                });
            }
        },
    };
    let base = match mode {
        RetryMode::Adaptive => RetryConfig::adaptive(),
        _ => RetryConfig::standard(),
    };
    Ok(base
        .with_max_attempts(attempts)
        .with_initial_backoff(RETRY_INITIAL_BACKOFF)
        .with_max_backoff(RETRY_MAX_BACKOFF))
}

/// Loads the AWS configuration from the standard environment and profile files, with
/// agentq's retries and timeouts (see the module docs).
///
/// Switching to a local emulator is one variable: `AWS_ENDPOINT_URL`. Fails when
/// `AWS_MAX_ATTEMPTS` or `AWS_RETRY_MODE` is malformed.
pub async fn load_sdk_config() -> Result<SdkConfig, ConfigError> {
    let retry = retry_config(|k| std::env::var(k).ok())?;
    Ok(aws_config::defaults(BehaviorVersion::latest())
        .retry_config(retry)
        .timeout_config(ServiceTimeouts::DEFAULT.config())
        .load()
        .await)
}

/// The AWS clients agentq uses, built once from one `SdkConfig`.
#[derive(Debug, Clone)]
pub struct AwsClients {
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub s3: aws_sdk_s3::Client,
    pub ssm: aws_sdk_ssm::Client,
    /// Job credentials (the agent assumes the job role).
    pub sts: aws_sdk_sts::Client,
}

impl AwsClients {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            sqs: sqs_client(sdk),
            dynamodb: dynamodb_client(sdk),
            s3: s3_client(sdk),
            ssm: ssm_client(sdk),
            sts: aws_sdk_sts::Client::from_conf(
                aws_sdk_sts::config::Builder::from(sdk)
                    .timeout_config(ServiceTimeouts::FAST.config())
                    .build(),
            ),
        }
    }
}

/// An SQS client with [`ServiceTimeouts::SQS`].
pub fn sqs_client(sdk: &SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(sdk)
            .timeout_config(ServiceTimeouts::SQS.config())
            .build(),
    )
}

/// A DynamoDB client with [`ServiceTimeouts::FAST`].
pub fn dynamodb_client(sdk: &SdkConfig) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(sdk)
            .timeout_config(ServiceTimeouts::FAST.config())
            .build(),
    )
}

/// An SSM client with [`ServiceTimeouts::FAST`].
pub fn ssm_client(sdk: &SdkConfig) -> aws_sdk_ssm::Client {
    aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::config::Builder::from(sdk)
            .timeout_config(ServiceTimeouts::FAST.config())
            .build(),
    )
}

/// An S3 client with [`ServiceTimeouts::S3`]; path-style addressing when an endpoint
/// override is set (emulators on `127.0.0.1`/`localhost` cannot serve virtual-host-style
/// bucket names).
pub fn s3_client(sdk: &SdkConfig) -> aws_sdk_s3::Client {
    let overridden =
        sdk.endpoint_url().is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
    let conf = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(overridden)
        .timeout_config(ServiceTimeouts::S3.config())
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// agentq's settings as given on the command line or in the environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SettingsArgs {
    /// URL of the jobs queue.
    #[arg(long, env = "AGENTQ_QUEUE_URL", global = true)]
    pub queue_url: Option<String>,
    /// URL of the dead-letter queue (failure records, redriven messages).
    #[arg(long, env = "AGENTQ_DLQ_URL", global = true)]
    pub dlq_url: Option<String>,
    /// Name of the DynamoDB jobs table.
    #[arg(long, env = "AGENTQ_TABLE", global = true)]
    pub table: Option<String>,
    /// S3 bucket for logs, manifests, artifacts and large specs.
    #[arg(long, env = "AGENTQ_BUCKET", global = true)]
    pub bucket: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(long, env = "AGENTQ_PREFIX", global = true)]
    pub prefix: Option<String>,
    /// SSM path prefix that job secrets must sit under.
    #[arg(long, env = "AGENTQ_SECRETS_PREFIX", global = true)]
    pub secrets_prefix: Option<String>,
}

/// A setting that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{what} is not set: pass --{flag} or export {env} (for a local emulator, `eval \"$(localdev/up)\"` sets it)"
    )]
    Missing {
        what: &'static str,
        flag: &'static str,
        env: &'static str,
    },
    #[error("{env}={value:?} is not valid: {why}")]
    Invalid {
        env: &'static str,
        value: String,
        why: String,
    },
}

/// Validated settings. Each component needs only some of them; accessors say which is
/// missing and how to set it.
#[derive(Debug, Clone)]
pub struct Settings {
    queue_url: Option<String>,
    dlq_url: Option<String>,
    table: Option<String>,
    bucket: Option<String>,
    layout: Layout,
    secrets_prefix: String,
}

impl Settings {
    /// Validates what was given; missing values are reported when first needed.
    pub fn from_args(args: &SettingsArgs) -> Result<Self, ConfigError> {
        for (env, v) in [
            ("AGENTQ_QUEUE_URL", &args.queue_url),
            ("AGENTQ_DLQ_URL", &args.dlq_url),
        ] {
            if let Some(url) = v
                && !(url.starts_with("https://") || url.starts_with("http://"))
            {
                return Err(ConfigError::Invalid {
                    env,
                    value: url.clone(),
                    why: "a queue URL starts with https:// (see `aws sqs get-queue-url`)".into(),
                });
            }
        }
        if let Some(b) = &args.bucket
            && (b.len() < 3 || b.len() > 63 || b.contains('/'))
        {
            return Err(ConfigError::Invalid {
                env: "AGENTQ_BUCKET",
                value: b.clone(),
                why: "a bucket name is 3-63 characters without '/'".into(),
            });
        }
        let secrets_prefix = args
            .secrets_prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_SECRETS_PREFIX.to_owned());
        if !secrets_prefix.starts_with('/') || secrets_prefix.contains("..") {
            return Err(ConfigError::Invalid {
                env: "AGENTQ_SECRETS_PREFIX",
                value: secrets_prefix,
                why: "use an absolute SSM path such as /agentq/secrets/".into(),
            });
        }
        let secrets_prefix = if secrets_prefix.ends_with('/') {
            secrets_prefix
        } else {
            format!("{secrets_prefix}/")
        };
        Ok(Self {
            queue_url: args.queue_url.clone().filter(|s| !s.is_empty()),
            dlq_url: args.dlq_url.clone().filter(|s| !s.is_empty()),
            table: args.table.clone().filter(|s| !s.is_empty()),
            bucket: args.bucket.clone().filter(|s| !s.is_empty()),
            layout: Layout::new(
                args.prefix
                    .as_deref()
                    .unwrap_or(crate::layout::DEFAULT_PREFIX),
            ),
            secrets_prefix,
        })
    }

    pub fn queue_url(&self) -> Result<&str, ConfigError> {
        self.queue_url.as_deref().ok_or(ConfigError::Missing {
            what: "the jobs queue URL",
            flag: "queue-url",
            env: "AGENTQ_QUEUE_URL",
        })
    }
    pub fn dlq_url(&self) -> Result<&str, ConfigError> {
        self.dlq_url.as_deref().ok_or(ConfigError::Missing {
            what: "the dead-letter queue URL",
            flag: "dlq-url",
            env: "AGENTQ_DLQ_URL",
        })
    }
    pub fn table(&self) -> Result<&str, ConfigError> {
        self.table.as_deref().ok_or(ConfigError::Missing {
            what: "the jobs table name",
            flag: "table",
            env: "AGENTQ_TABLE",
        })
    }
    pub fn bucket(&self) -> Result<&str, ConfigError> {
        self.bucket.as_deref().ok_or(ConfigError::Missing {
            what: "the logs bucket",
            flag: "bucket",
            env: "AGENTQ_BUCKET",
        })
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn secrets_prefix(&self) -> &str {
        &self.secrets_prefix
    }
    /// The validation context for job specs under these settings.
    pub fn validation(&self) -> crate::spec::ValidationContext {
        crate::spec::ValidationContext {
            secrets_prefix: self.secrets_prefix.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_settings_name_the_env_var() {
        let s = Settings::from_args(&SettingsArgs::default()).unwrap();
        let e = s.queue_url().unwrap_err().to_string();
        assert!(
            e.contains("AGENTQ_QUEUE_URL") && e.contains("--queue-url"),
            "{e}"
        );
        assert_eq!(s.secrets_prefix(), "/agentq/secrets/");
        assert_eq!(s.layout().prefix(), "agentq");
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn retries_default_to_standard_mode_and_follow_the_aws_variables() {
        let rc = retry_config(env(&[])).unwrap();
        assert_eq!(rc.mode(), RetryMode::Standard);
        assert_eq!(rc.max_attempts(), DEFAULT_MAX_ATTEMPTS);
        assert_eq!(rc.initial_backoff(), RETRY_INITIAL_BACKOFF);
        assert_eq!(rc.max_backoff(), RETRY_MAX_BACKOFF);
        let rc = retry_config(env(&[
            ("AWS_MAX_ATTEMPTS", "7"),
            ("AWS_RETRY_MODE", "adaptive"),
        ]))
        .unwrap();
        assert_eq!((rc.mode(), rc.max_attempts()), (RetryMode::Adaptive, 7));
        assert_eq!(rc.max_backoff(), RETRY_MAX_BACKOFF);
        for (k, v) in [
            ("AWS_MAX_ATTEMPTS", "0"),
            ("AWS_MAX_ATTEMPTS", "many"),
            ("AWS_MAX_ATTEMPTS", "99"),
            ("AWS_RETRY_MODE", "legacy"),
        ] {
            let e = retry_config(env(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains(v) && e.contains("use"), "{e}");
        }
    }

    #[tokio::test]
    async fn every_client_gets_its_timeouts_and_the_retry_config() {
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .retry_config(retry_config(env(&[])).unwrap())
            .timeout_config(ServiceTimeouts::DEFAULT.config())
            .build();
        let c = AwsClients::new(&sdk);
        let check = |t: Option<&TimeoutConfig>, want: ServiceTimeouts| {
            let t = t.expect("timeouts");
            assert_eq!(t.connect_timeout(), Some(CONNECT_TIMEOUT));
            assert_eq!(t.operation_attempt_timeout(), Some(want.attempt));
            assert_eq!(t.operation_timeout(), Some(want.operation));
        };
        check(c.dynamodb.config().timeout_config(), ServiceTimeouts::FAST);
        check(c.ssm.config().timeout_config(), ServiceTimeouts::FAST);
        check(c.sqs.config().timeout_config(), ServiceTimeouts::SQS);
        check(c.s3.config().timeout_config(), ServiceTimeouts::S3);
        assert!(ServiceTimeouts::SQS.attempt > Duration::from_secs(20));
        let rc = c.dynamodb.config().retry_config().expect("retry config");
        assert_eq!(rc.max_attempts(), DEFAULT_MAX_ATTEMPTS);
    }

    #[test]
    fn bad_settings_are_refused() {
        let args = SettingsArgs {
            queue_url: Some("my-queue".into()),
            ..Default::default()
        };
        assert!(matches!(
            Settings::from_args(&args),
            Err(ConfigError::Invalid {
                env: "AGENTQ_QUEUE_URL",
                ..
            })
        ));
        let args = SettingsArgs {
            secrets_prefix: Some("agentq".into()),
            ..Default::default()
        };
        assert!(Settings::from_args(&args).is_err());
        let args = SettingsArgs {
            secrets_prefix: Some("/team/a".into()),
            ..Default::default()
        };
        assert_eq!(
            Settings::from_args(&args).unwrap().secrets_prefix(),
            "/team/a/"
        );
    }

    #[test]
    fn stale_after_has_one_default_and_range() {
        assert_eq!(stale_after(None).unwrap().as_secs(), 30);
        assert_eq!(
            DEFAULT_STALE_AFTER_SECONDS_ARG.parse::<f64>().unwrap(),
            DEFAULT_STALE_AFTER_SECONDS
        );
        assert_eq!(stale_after(Some(2.5)).unwrap().as_millis(), 2500);
        for bad in [0.5, -1.0, f64::NAN, 100_000.0] {
            let e = stale_after(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("AGENTQ_STALE_AFTER_SECONDS"), "{e}");
        }
    }
}
