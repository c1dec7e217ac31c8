//! Streaming an object of unknown size to S3 with bounded memory: one `PutObject` when it
//! fits in a part, a multipart upload otherwise (8 MiB parts, one in memory at a time),
//! aborted when it fails or runs past its deadline (the bucket's lifecycle rule cleans up
//! what an abort could not).

use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// Part size (S3's minimum is 5 MiB for every part but the last).
pub const PART_BYTES: usize = 8 * 1024 * 1024;

/// Where and how an object is written.
#[derive(Debug, Clone)]
pub struct ObjectTarget<'a> {
    pub s3: &'a aws_sdk_s3::Client,
    pub bucket: &'a str,
    pub key: &'a str,
    pub content_type: &'a str,
    /// SSE-KMS with this key; `None` = the bucket's default encryption.
    pub kms_key: Option<&'a str>,
}

/// Why an upload did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("reading the data for s3://{bucket}/{key} failed: {source}")]
    Read {
        bucket: String,
        key: String,
        source: std::io::Error,
    },
    #[error("s3://{bucket}/{key}: {message}")]
    S3 {
        bucket: String,
        key: String,
        message: String,
    },
    #[error("s3://{bucket}/{key} was not uploaded before its deadline")]
    Deadline { bucket: String, key: String },
}

/// Fills `buf` from `r` until it is full or the reader ends; returns the bytes read.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let m = r.read(&mut buf[n..]).await?;
        if m == 0 {
            break;
        }
        n += m;
    }
    Ok(n)
}

/// Uploads everything `reader` yields to `t`, finishing before `deadline` or not at all.
/// Returns the number of bytes written.
pub async fn stream_object<R: AsyncRead + Unpin>(
    t: &ObjectTarget<'_>,
    reader: &mut R,
    deadline: Instant,
) -> Result<u64, UploadError> {
    let deadline_err = || UploadError::Deadline {
        bucket: t.bucket.into(),
        key: t.key.into(),
    };
    let s3_err = |message: String| UploadError::S3 {
        bucket: t.bucket.into(),
        key: t.key.into(),
        message,
    };
    let read_err = |source| UploadError::Read {
        bucket: t.bucket.into(),
        key: t.key.into(),
        source,
    };
    let mut buf = vec![0u8; PART_BYTES];
    let first = tokio::time::timeout_at(deadline, fill(reader, &mut buf))
        .await
        .map_err(|_| deadline_err())?
        .map_err(read_err)?;
    if first < PART_BYTES {
        buf.truncate(first);
        let mut put =
            t.s3.put_object()
                .bucket(t.bucket)
                .key(t.key)
                .content_type(t.content_type)
                .body(buf.into());
        if let Some(k) = t.kms_key {
            put = put
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(k);
        }
        tokio::time::timeout_at(deadline, put.send())
            .await
            .map_err(|_| deadline_err())?
            .map_err(|e| s3_err(agentq_core::aws::display(&e)))?;
        return Ok(first as u64);
    }

    let mut create =
        t.s3.create_multipart_upload()
            .bucket(t.bucket)
            .key(t.key)
            .content_type(t.content_type);
    if let Some(k) = t.kms_key {
        create = create
            .server_side_encryption(ServerSideEncryption::AwsKms)
            .ssekms_key_id(k);
    }
    let upload_id = tokio::time::timeout_at(deadline, create.send())
        .await
        .map_err(|_| deadline_err())?
        .map_err(|e| s3_err(agentq_core::aws::display(&e)))?
        .upload_id
        .unwrap_or_default();
    let parts = async {
        let mut parts = Vec::new();
        let mut total = 0u64;
        let mut len = first;
        loop {
            let n = parts.len() as i32 + 1;
            let out =
                t.s3.upload_part()
                    .bucket(t.bucket)
                    .key(t.key)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(buf[..len].to_vec().into())
                    .send()
                    .await
                    .map_err(|e| s3_err(agentq_core::aws::display(&e)))?;
            total += len as u64;
            parts.push(
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(out.e_tag)
                    .build(),
            );
            len = fill(reader, &mut buf).await.map_err(read_err)?;
            if len == 0 {
                break;
            }
        }
        t.s3.complete_multipart_upload()
            .bucket(t.bucket)
            .key(t.key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_err(agentq_core::aws::display(&e)))?;
        Ok::<u64, UploadError>(total)
    };
    let res = match tokio::time::timeout_at(deadline, parts).await {
        Ok(r) => r,
        Err(_) => Err(deadline_err()),
    };
    if res.is_err() {
        // Best effort, briefly: the lifecycle rule removes what is left after a day.
        let abort =
            t.s3.abort_multipart_upload()
                .bucket(t.bucket)
                .key(t.key)
                .upload_id(&upload_id)
                .send();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), abort).await;
    }
    res
}
