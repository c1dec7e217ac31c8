//! Scoped AWS credentials for jobs that ask for them (`aws_credentials: true`).
//!
//! The child never sees the function's own credentials. The agent assumes the configured
//! job role (`AGENTQ_JOB_ROLE_ARN`) with a session policy that allows the job's own data
//! prefix (`{prefix}/jobs/{job}/data/`) and nothing else, and serves the result to the
//! child the way ECS does: `AWS_CONTAINER_CREDENTIALS_FULL_URI` (an endpoint on 127.0.0.1
//! of this job only) plus `AWS_CONTAINER_AUTHORIZATION_TOKEN` (a random per-job token).
//! Every AWS SDK and the AWS CLI read credentials from there and fetch them again before
//! they expire; the agent re-assumes the role ahead of expiry, so long runs keep working.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentq_core::{Attempt, JobId, Layout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Refresh this long before the current credentials expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// Why credentials could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "the job asks for aws_credentials but no job role is configured: set AGENTQ_JOB_ROLE_ARN (the function's own credentials are never given to a job)"
    )]
    NoRole,
    #[error("assuming the job role {role} failed: {message}")]
    AssumeRole {
        role: String,
        message: String,
        transient: bool,
    },
    #[error("could not serve the job's credentials: {0}")]
    Serve(std::io::Error),
}

impl CredentialsError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::AssumeRole {
                transient: true,
                ..
            } | Self::Serve(_)
        )
    }
}

/// The partition of an ARN (`aws`, `aws-cn`, `aws-us-gov`).
fn partition(role_arn: &str) -> &str {
    role_arn
        .split(':')
        .nth(1)
        .filter(|p| !p.is_empty())
        .unwrap_or("aws")
}

/// The job's own S3 area: the only place its credentials reach.
pub fn data_prefix(layout: &Layout, job: &JobId) -> String {
    format!("{}data/", layout.job_prefix(job))
}

/// The session policy for one job: read, write, delete and list under its data prefix.
pub fn session_policy(partition: &str, bucket: &str, prefix: &str) -> serde_json::Value {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "JobData",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                "Resource": format!("arn:{partition}:s3:::{bucket}/{prefix}*"),
            },
            {
                "Sid": "ListJobData",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": format!("arn:{partition}:s3:::{bucket}"),
                "Condition": {"StringLike": {"s3:prefix": format!("{prefix}*")}},
            }
        ]
    })
}

/// One set of credentials.
#[derive(Debug, Clone)]
struct Creds {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: SystemTime,
}

/// What a job's credentials are made from.
#[derive(Debug, Clone)]
pub struct Request {
    pub sts: aws_sdk_sts::Client,
    pub role_arn: String,
    pub bucket: String,
    pub layout: Layout,
    pub job: JobId,
    pub attempt: Attempt,
    pub duration: Duration,
}

impl Request {
    async fn assume(&self) -> Result<Creds, CredentialsError> {
        let prefix = data_prefix(&self.layout, &self.job);
        let policy = session_policy(partition(&self.role_arn), &self.bucket, &prefix);
        let mut name = format!("agentq-{}-a{}", self.job, self.attempt);
        name.truncate(64);
        let out = self
            .sts
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(name)
            .policy(policy.to_string())
            .duration_seconds(self.duration.as_secs() as i32)
            .send()
            .await
            .map_err(|e| CredentialsError::AssumeRole {
                role: self.role_arn.clone(),
                transient: agentq_core::aws::is_transient(&e),
                message: agentq_core::aws::display(&e),
            })?;
        let c = out
            .credentials
            .ok_or_else(|| CredentialsError::AssumeRole {
                role: self.role_arn.clone(),
                transient: true,
                message: "STS returned no credentials".into(),
            })?;
        Ok(Creds {
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            session_token: c.session_token,
            expiration: SystemTime::try_from(c.expiration)
                .unwrap_or_else(|_| SystemTime::now() + Duration::from_secs(900)),
        })
    }
}

/// The credentials endpoint of one job; stops serving when dropped.
#[derive(Debug)]
pub struct JobCredentials {
    /// Environment for the child.
    pub env: Vec<(String, String)>,
    /// Values to redact from everything the job produces.
    pub secrets: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl Drop for JobCredentials {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl JobCredentials {
    /// Assumes the job role and starts serving the credentials on 127.0.0.1.
    pub async fn start(req: Request) -> Result<Self, CredentialsError> {
        let first = req.assume().await?;
        let secrets = Arc::new(Mutex::new(vec![
            first.secret_access_key.clone(),
            first.session_token.clone(),
        ]));
        let current = Arc::new(Mutex::new(first));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(CredentialsError::Serve)?;
        let addr = listener.local_addr().map_err(CredentialsError::Serve)?;
        let token = format!(
            "{}{}",
            ulid::Ulid::new().to_string().to_lowercase(),
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let stop = CancellationToken::new();

        // Refresh ahead of expiry.
        {
            let (current, secrets, stop, req) =
                (current.clone(), secrets.clone(), stop.clone(), req.clone());
            tokio::spawn(async move {
                loop {
                    let exp = current
                        .lock()
                        .map(|c| c.expiration)
                        .unwrap_or_else(|_| SystemTime::now());
                    let wait = exp
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .saturating_sub(REFRESH_BEFORE)
                        .max(Duration::from_secs(5));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    match req.assume().await {
                        Ok(c) => {
                            if let Ok(mut s) = secrets.lock() {
                                s.push(c.secret_access_key.clone());
                                s.push(c.session_token.clone());
                            }
                            if let Ok(mut cur) = current.lock() {
                                *cur = c;
                            }
                            tracing::info!(job = %req.job, "job credentials refreshed");
                        }
                        Err(e) => {
                            tracing::warn!(job = %req.job, error = %e, "job credentials refresh failed; trying again")
                        }
                    }
                }
            });
        }
        // Serve: one small GET per connection, bounded in size and time.
        {
            let (current, stop, token) = (current.clone(), stop.clone(), token.clone());
            tokio::spawn(async move {
                loop {
                    let conn = tokio::select! {
                        _ = stop.cancelled() => return,
                        c = listener.accept() => c,
                    };
                    let Ok((mut sock, _)) = conn else { continue };
                    let (current, token) = (current.clone(), token.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 8192];
                        let mut n = 0;
                        let read = async {
                            while n < buf.len() {
                                let m = sock.read(&mut buf[n..]).await?;
                                if m == 0 {
                                    break;
                                }
                                n += m;
                                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                    break;
                                }
                            }
                            Ok::<_, std::io::Error>(())
                        };
                        if tokio::time::timeout(Duration::from_secs(5), read)
                            .await
                            .is_err()
                        {
                            return;
                        }
                        let head = String::from_utf8_lossy(&buf[..n]);
                        let authorized = head.lines().skip(1).any(|l| {
                            l.split_once(':').is_some_and(|(k, v)| {
                                k.trim().eq_ignore_ascii_case("authorization") && v.trim() == token
                            })
                        });
                        let response = if !head.starts_with("GET ") {
                            http(405, "{\"message\":\"use GET\"}")
                        } else if !authorized {
                            http(403, "{\"message\":\"bad authorization token\"}")
                        } else {
                            let body = current.lock().map(|c| creds_json(&c)).unwrap_or_default();
                            http(200, &body)
                        };
                        let _ = sock.write_all(response.as_bytes()).await;
                        let _ = sock.shutdown().await;
                    });
                }
            });
        }
        let mut env = vec![
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI".to_owned(),
                format!("http://{addr}/credentials"),
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN".to_owned(), token),
        ];
        // Region and endpoint are not secret; the child needs them to reach the same AWS.
        if let Some(region) = req.sts.config().region() {
            env.push(("AWS_REGION".to_owned(), region.to_string()));
            env.push(("AWS_DEFAULT_REGION".to_owned(), region.to_string()));
        }
        for k in ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"] {
            if let Ok(v) = std::env::var(k) {
                env.push((k.to_owned(), v));
            }
        }
        Ok(Self { env, secrets, stop })
    }
}

fn creds_json(c: &Creds) -> String {
    serde_json::json!({
        "AccessKeyId": c.access_key_id,
        "SecretAccessKey": c.secret_access_key,
        "Token": c.session_token,
        "Expiration": humantime::format_rfc3339_seconds(c.expiration).to_string(),
    })
    .to_string()
}

fn http(status: u16, body: &str) -> String {
    let reason = match status {
        200 => "OK",
        403 => "Forbidden",
        _ => "Method Not Allowed",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_policy_reaches_the_job_prefix_only() {
        let l = Layout::new("agentq");
        let j = JobId::parse("job-7").unwrap();
        let p = session_policy("aws", "bkt", &data_prefix(&l, &j));
        let st = p["Statement"].as_array().unwrap();
        assert_eq!(st.len(), 2);
        assert_eq!(
            st[0]["Resource"],
            "arn:aws:s3:::bkt/agentq/jobs/job-7/data/*"
        );
        assert_eq!(
            st[0]["Action"],
            serde_json::json!([
                "s3:GetObject",
                "s3:PutObject",
                "s3:DeleteObject",
                "s3:AbortMultipartUpload"
            ])
        );
        assert_eq!(st[1]["Action"], "s3:ListBucket");
        assert_eq!(st[1]["Resource"], "arn:aws:s3:::bkt");
        assert_eq!(
            st[1]["Condition"]["StringLike"]["s3:prefix"],
            "agentq/jobs/job-7/data/*"
        );
        // Nothing else: no wildcard actions, no other service, every statement an Allow.
        for s in st {
            assert_eq!(s["Effect"], "Allow");
            let actions: Vec<&str> = match &s["Action"] {
                serde_json::Value::String(a) => vec![a.as_str()],
                v => v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect(),
            };
            assert!(
                actions
                    .iter()
                    .all(|a| a.starts_with("s3:") && !a.contains('*'))
            );
        }
        // Another job's prefix is not covered by the resource pattern.
        assert!(!"agentq/jobs/job-70/data/x".starts_with("agentq/jobs/job-7/data/"));
        assert_eq!(partition("arn:aws-cn:iam::1:role/r"), "aws-cn");
    }
}
