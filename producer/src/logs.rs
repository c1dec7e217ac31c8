//! Reading a job's logs: the S3 segments under `Layout::stream_prefix`, in key order
//! (segment numbers are zero-padded, so key order is write order). Follow mode polls for
//! new segments until the job's record is finished and a listing made after that shows
//! nothing new; without `--attempt` it moves on when a newer attempt starts.

use std::time::Duration;

use agentq_core::{Attempt, JobId, JobState, Stream};

use crate::error::ProducerError;
use crate::producer::Producer;

/// What to read.
#[derive(Debug, Clone)]
pub struct LogRequest {
    pub job: JobId,
    /// `None`: the latest attempt (and, when following, the ones after it).
    pub attempt: Option<Attempt>,
    pub stream: Stream,
    pub follow: bool,
    /// Pause between polls when following.
    pub interval: Duration,
}

/// One stored segment.
#[derive(Debug, Clone)]
pub struct LogSegment {
    pub attempt: Attempt,
    pub stream: Stream,
    pub key: String,
    pub data: Vec<u8>,
}

/// How reading ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsEnd {
    /// The last attempt read; `None` when the job never started.
    pub attempt: Option<Attempt>,
    /// The job's state as last seen.
    pub status: JobState,
    pub segments: usize,
}

impl Producer {
    /// Segment keys of one stream of one attempt, after `after` (exclusive), in order.
    pub async fn list_segments(
        &self,
        job: &JobId,
        attempt: Attempt,
        stream: Stream,
        after: Option<&str>,
    ) -> Result<Vec<String>, ProducerError> {
        let bucket = self.settings.bucket()?;
        let prefix = self.settings.layout().stream_prefix(job, attempt, stream);
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .clients
                .s3
                .list_objects_v2()
                .bucket(bucket)
                .prefix(&prefix)
                .set_start_after(after.map(str::to_owned))
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| ProducerError::S3 {
                    op: "ListObjectsV2",
                    bucket: bucket.to_owned(),
                    key: prefix.clone(),
                    transient: agentq_core::aws::is_transient(&e),
                    message: agentq_core::aws::display(&e),
                })?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            token = out.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// An object's bytes from the logs bucket.
    pub async fn read_object(&self, key: &str) -> Result<Vec<u8>, ProducerError> {
        let bucket = self.settings.bucket()?;
        let s3_err = |op, transient, message| ProducerError::S3 {
            op,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            transient,
            message,
        };
        let out = self
            .clients
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                s3_err(
                    "GetObject",
                    agentq_core::aws::is_transient(&e),
                    agentq_core::aws::display(&e),
                )
            })?;
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| s3_err("GetObject", true, e.to_string()))?;
        Ok(bytes.into_bytes().to_vec())
    }

    /// Reads the logs, handing each segment to `sink` in order.
    ///
    /// ```no_run
    /// # async fn demo(producer: agentq_producer::Producer) -> Result<(), agentq_producer::ProducerError> {
    /// use std::io::Write;
    /// use agentq_producer::LogRequest;
    /// let req = LogRequest {
    ///     job: agentq_core::JobId::parse("my-job")?,
    ///     attempt: None,
    ///     stream: agentq_core::Stream::Stdout,
    ///     follow: true,
    ///     interval: std::time::Duration::from_secs(2),
    /// };
    /// producer
    ///     .logs(&req, |seg| Ok(std::io::stdout().write_all(&seg.data)?))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn logs(
        &self,
        req: &LogRequest,
        mut sink: impl FnMut(LogSegment) -> Result<(), ProducerError>,
    ) -> Result<LogsEnd, ProducerError> {
        let store = self.store()?;
        self.settings.bucket()?;
        let mut rec = store.require(&req.job).await?;
        let mut attempt = req.attempt.unwrap_or(rec.attempt);
        while attempt == Attempt::NONE {
            if !req.follow || rec.status.is_finished() {
                return Ok(LogsEnd {
                    attempt: None,
                    status: rec.status,
                    segments: 0,
                });
            }
            tokio::time::sleep(req.interval).await;
            rec = store.require(&req.job).await?;
            attempt = rec.attempt;
        }
        let mut last: Option<String> = None;
        let mut segments = 0usize;
        loop {
            // Read the record before listing: when the job was already finished then,
            // this listing sees every segment it wrote.
            let over = if req.follow {
                rec = store.require(&req.job).await?;
                rec.status.is_finished() || rec.attempt > attempt
            } else {
                true
            };
            let keys = self
                .list_segments(&req.job, attempt, req.stream, last.as_deref())
                .await?;
            let fresh = !keys.is_empty();
            for key in keys {
                let data = self.read_object(&key).await?;
                last = Some(key.clone());
                segments += 1;
                sink(LogSegment {
                    attempt,
                    stream: req.stream,
                    key,
                    data,
                })?;
            }
            if over {
                if req.follow && req.attempt.is_none() && rec.attempt > attempt {
                    attempt = rec.attempt;
                    last = None;
                    continue;
                }
                return Ok(LogsEnd {
                    attempt: Some(attempt),
                    status: rec.status,
                    segments,
                });
            }
            if !fresh {
                tokio::time::sleep(req.interval).await;
            }
        }
    }
}
