//! Large specs: the Amazon SQS Extended Client payload format, so Java and Python
//! producers using that library interoperate with agentq in both directions.
//!
//! Body: `["software.amazon.payloadoffloading.PayloadS3Pointer",{"s3BucketName":"B","s3Key":"K"}]`
//! with the numeric message attribute `ExtendedPayloadSize` (older clients:
//! `SQSLargePayloadSize`) giving the payload's size in bytes.
//!
//! Also the one rule for what a job record keeps as its spec ([`record_spec`]): the spec
//! JSON, or — for a spec too large for a DynamoDB item that travels through S3 — the
//! pointer body, which stays re-sendable as it is. Producer, agent and dispatcher all
//! follow it; readers tell the two apart with [`PayloadPointer::parse`].

use serde::{Deserialize, Serialize};

/// The class name the Extended Client writes as the first array element.
pub const POINTER_CLASS: &str = "software.amazon.payloadoffloading.PayloadS3Pointer";
/// Message attribute carrying the payload size (current clients).
pub const SIZE_ATTRIBUTE: &str = "ExtendedPayloadSize";
/// Message attribute used by older clients.
pub const LEGACY_SIZE_ATTRIBUTE: &str = "SQSLargePayloadSize";
/// Default size above which the producer offloads a spec (the SQS default maximum is
/// 256 KiB; leave room for attributes).
pub const DEFAULT_OFFLOAD_THRESHOLD: usize = 200 * 1024;

/// Largest spec a job record keeps whole. A DynamoDB item holds at most 400 KB
/// (409,600 bytes) with the record's other attributes (history, attempts, labels,
/// progress), so a larger spec that travels through S3 is kept as its pointer body.
pub const RECORD_SPEC_MAX_BYTES: usize = 300 * 1024;

/// What a job record keeps as its spec: `spec_json`, or `pointer_body` when the spec is
/// larger than [`RECORD_SPEC_MAX_BYTES`] and travels through S3. The object the pointer
/// names must carry the job id, so that re-sending the pointer re-sends the same job.
pub fn record_spec<'a>(spec_json: &'a str, pointer_body: Option<&'a str>) -> &'a str {
    match pointer_body {
        Some(p) if spec_json.len() > RECORD_SPEC_MAX_BYTES => p,
        _ => spec_json,
    }
}

/// Where an offloaded payload lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadPointer {
    #[serde(rename = "s3BucketName")]
    pub bucket: String,
    #[serde(rename = "s3Key")]
    pub key: String,
}

impl PayloadPointer {
    /// `s3://bucket/key`, for people.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// The message body for this pointer.
    pub fn to_body(&self) -> String {
        serde_json::json!([POINTER_CLASS, self]).to_string()
    }

    /// Reads a pointer body; `None` for anything else (e.g. a plain spec).
    pub fn parse(body: &str) -> Option<Self> {
        let trimmed = body.trim_start();
        if !trimmed.starts_with('[') {
            return None;
        }
        let (class, ptr): (String, PayloadPointer) = serde_json::from_str(trimmed).ok()?;
        (class == POINTER_CLASS).then_some(ptr)
    }
}

/// Resolving a pointer failed.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload s3://{bucket}/{key} could not be read: {message}")]
    Fetch {
        bucket: String,
        key: String,
        transient: bool,
        message: String,
    },
    #[error("payload s3://{bucket}/{key} is not UTF-8 text")]
    NotText { bucket: String, key: String },
    #[error("payload s3://{bucket}/{key} refused: {why}")]
    Refused {
        bucket: String,
        key: String,
        why: String,
    },
}

impl PayloadError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Fetch {
                transient: true,
                ..
            }
        )
    }
}

/// Largest payload a pointer may name: a valid spec is far smaller (prompt ≤ 512 KiB, env
/// ≤ 32 KiB), so anything bigger is refused before it is read.
pub const MAX_PAYLOAD_BYTES: u64 = 4 * 1024 * 1024;

/// Returns the message's real body: the body itself, or the S3 object a pointer names
/// (any bucket, at most [`MAX_PAYLOAD_BYTES`]).
pub async fn resolve_body(s3: &aws_sdk_s3::Client, body: &str) -> Result<String, PayloadError> {
    resolve_body_within(s3, body, None, MAX_PAYLOAD_BYTES).await
}

/// Like [`resolve_body`], accepting pointers only into `bucket` (when given) and reading
/// at most `max_bytes`, streamed: an oversized object is refused, never collected whole.
pub async fn resolve_body_within(
    s3: &aws_sdk_s3::Client,
    body: &str,
    bucket: Option<&str>,
    max_bytes: u64,
) -> Result<String, PayloadError> {
    let Some(ptr) = PayloadPointer::parse(body) else {
        return Ok(body.to_owned());
    };
    if let Some(b) = bucket
        && ptr.bucket != b
    {
        return Err(PayloadError::Refused {
            bucket: ptr.bucket.clone(),
            key: ptr.key.clone(),
            why: format!("payloads are read only from the configured bucket {b:?}"),
        });
    }
    let fetch_err = |transient: bool, message: String| PayloadError::Fetch {
        bucket: ptr.bucket.clone(),
        key: ptr.key.clone(),
        transient,
        message,
    };
    let too_big = |n: u64| PayloadError::Refused {
        bucket: ptr.bucket.clone(),
        key: ptr.key.clone(),
        why: format!("the payload is larger than {max_bytes} bytes ({n} or more)"),
    };
    let out = s3
        .get_object()
        .bucket(&ptr.bucket)
        .key(&ptr.key)
        .send()
        .await
        .map_err(|e| fetch_err(crate::aws::is_transient(&e), crate::aws::display(&e)))?;
    if let Some(n) = out.content_length()
        && n as u64 > max_bytes
    {
        return Err(too_big(n as u64));
    }
    let mut reader = out.body.into_async_read();
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        use tokio::io::AsyncReadExt;
        let n = reader
            .read(&mut chunk)
            .await
            .map_err(|e| fetch_err(true, e.to_string()))?;
        if n == 0 {
            break;
        }
        if (bytes.len() + n) as u64 > max_bytes {
            return Err(too_big((bytes.len() + n) as u64));
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(bytes).map_err(|_| PayloadError::NotText {
        bucket: ptr.bucket.clone(),
        key: ptr.key.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_round_trip_matches_the_extended_client_format() {
        let p = PayloadPointer {
            bucket: "b".into(),
            key: "agentq/payloads/x.json".into(),
        };
        let body = p.to_body();
        assert_eq!(
            body,
            r#"["software.amazon.payloadoffloading.PayloadS3Pointer",{"s3BucketName":"b","s3Key":"agentq/payloads/x.json"}]"#
        );
        assert_eq!(p.url(), "s3://b/agentq/payloads/x.json");
        assert_eq!(PayloadPointer::parse(&body), Some(p));
        assert_eq!(PayloadPointer::parse(r#"{"spec_version":1}"#), None);
        assert_eq!(
            PayloadPointer::parse(r#"["other.Class",{"s3BucketName":"b","s3Key":"k"}]"#),
            None
        );
    }

    #[test]
    fn the_record_keeps_the_pointer_only_for_specs_too_large_for_an_item() {
        let small = "{}".to_owned();
        let big = "x".repeat(RECORD_SPEC_MAX_BYTES + 1);
        let ptr = "[pointer]";
        assert_eq!(record_spec(&small, Some(ptr)), small);
        assert_eq!(record_spec(&big, Some(ptr)), ptr);
        assert_eq!(record_spec(&big, None), big);
    }
}
