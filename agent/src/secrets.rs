//! Job secrets from SSM Parameter Store: only names under the configured prefix, read
//! with decryption, values kept out of every log line and error message.

use std::collections::BTreeMap;

use agentq_core::FailureCause;
use agentq_core::spec::secret_name_allowed;

use crate::redact::MIN_SECRET_LEN;

/// Secret values for one job, by child env var name. `Debug` never shows values.
#[derive(Default, Clone)]
pub struct Secrets(BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Secrets {
    pub fn env(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.0.values().map(String::as_str)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why the secrets could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {env}: {reason}")]
    Denied { env: String, reason: String },
    #[error("reading secret {env} from SSM failed (transient): {message}")]
    Transient { env: String, message: String },
}

impl SecretError {
    pub fn cause(&self) -> FailureCause {
        match self {
            Self::Denied { .. } => FailureCause::SecretDenied,
            Self::Transient { .. } => FailureCause::InfraTransient,
        }
    }
}

/// Reads every secret of a spec. Names outside `prefix` are refused before any call.
pub async fn resolve(
    ssm: &aws_sdk_ssm::Client,
    wanted: &BTreeMap<String, String>,
    prefix: &str,
) -> Result<Secrets, SecretError> {
    for (env, name) in wanted {
        if !secret_name_allowed(name, prefix) {
            return Err(SecretError::Denied {
                env: env.clone(),
                reason: format!(
                    "parameter {name:?} is outside the allowed prefix {prefix:?}; the agent reads only parameters under it"
                ),
            });
        }
    }
    let mut out = BTreeMap::new();
    // GetParameters takes at most 10 names per call.
    let pairs: Vec<(&String, &String)> = wanted.iter().collect();
    for chunk in pairs.chunks(10) {
        let names: Vec<String> = chunk.iter().map(|(_, n)| (*n).clone()).collect();
        let resp = ssm
            .get_parameters()
            .set_names(Some(names))
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| {
                let env = chunk[0].0.clone();
                if agentq_core::aws::is_transient(&e) {
                    SecretError::Transient {
                        env,
                        message: agentq_core::aws::display(&e),
                    }
                } else {
                    SecretError::Denied {
                        env,
                        reason: format!("SSM refused: {}", agentq_core::aws::display(&e)),
                    }
                }
            })?;
        if let Some(missing) = resp.invalid_parameters().first() {
            let env = chunk
                .iter()
                .find(|(_, n)| *n == missing)
                .map(|(e, _)| (*e).clone())
                .unwrap_or_default();
            return Err(SecretError::Denied {
                env,
                reason: format!(
                    "parameter {missing:?} does not exist (create it with `aws ssm put-parameter --type SecureString`)"
                ),
            });
        }
        for p in resp.parameters() {
            let (Some(name), Some(value)) = (p.name(), p.value()) else {
                continue;
            };
            if let Some((env, _)) = chunk.iter().find(|(_, n)| n.as_str() == name) {
                if value.len() < MIN_SECRET_LEN {
                    return Err(SecretError::Denied {
                        env: (*env).clone(),
                        reason: format!(
                            "parameter {name:?} is shorter than {MIN_SECRET_LEN} characters, too short to redact reliably from logs"
                        ),
                    });
                }
                out.insert((*env).clone(), value.to_owned());
            }
        }
    }
    Ok(Secrets(out))
}
