//! Streaming a job's output to S3 while it runs: one uploader task per stream, fed by a
//! bounded channel. A segment is uploaded when it reaches `flush_bytes` or when
//! `flush_interval` passes, so a hard kill loses at most one interval, and memory stays
//! bounded (channel capacity × chunk size + one segment) whatever the child prints: a
//! full channel blocks the pipe reader, which blocks the child's writes.

use std::time::Duration;

use agentq_core::{Attempt, JobId, Layout, Stream};
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How a log stream is cut into segments.
#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    pub flush_bytes: usize,
    pub flush_interval: Duration,
    /// Chunks queued per stream before the reader waits.
    pub channel_capacity: usize,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        Self {
            flush_bytes: 4 * 1024 * 1024,
            flush_interval: Duration::from_secs(5),
            channel_capacity: 16,
        }
    }
}

/// What one stream produced, for the manifest.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamStats {
    pub bytes: u64,
    pub segments: u32,
    pub failed_segments: u32,
    /// SHA-256 of all bytes uploaded (after redaction), hex.
    pub sha256: String,
    pub prefix: String,
}

/// The sending side of one stream.
#[derive(Debug, Clone)]
pub struct StreamSink {
    tx: mpsc::Sender<Bytes>,
}

impl StreamSink {
    /// Queues a chunk; waits when the uploader is behind (backpressure).
    pub async fn send(&self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        // A closed uploader only happens after shutdown; dropping is then correct.
        let _ = self.tx.send(chunk).await;
    }
}

/// Spawns the uploader of one stream. Drop every [`StreamSink`] clone, then await the
/// handle: it uploads what is left and returns the stats.
pub fn spawn_uploader(
    s3: aws_sdk_s3::Client,
    bucket: String,
    layout: Layout,
    job: JobId,
    attempt: Attempt,
    stream: Stream,
    policy: FlushPolicy,
) -> (StreamSink, JoinHandle<StreamStats>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(policy.channel_capacity.max(1));
    let mut up = Uploader {
        stats: StreamStats {
            prefix: layout.stream_prefix(&job, attempt, stream),
            ..Default::default()
        },
        hasher: Sha256::new(),
        s3,
        bucket,
        layout,
        job,
        attempt,
        stream,
    };
    let handle = tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::new();
        let mut tick = tokio::time::interval(policy.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let flush = tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(c) => {
                        buf.extend_from_slice(&c);
                        buf.len() >= policy.flush_bytes
                    }
                    None => break,
                },
                _ = tick.tick() => !buf.is_empty(),
            };
            if flush {
                up.upload(std::mem::take(&mut buf)).await;
            }
        }
        if !buf.is_empty() {
            up.upload(buf).await;
        }
        up.stats.sha256 = hex::encode(up.hasher.finalize());
        up.stats
    });
    (StreamSink { tx }, handle)
}

/// One stream's upload state: where segments go, and what was uploaded so far.
struct Uploader {
    s3: aws_sdk_s3::Client,
    bucket: String,
    layout: Layout,
    job: JobId,
    attempt: Attempt,
    stream: Stream,
    stats: StreamStats,
    hasher: Sha256,
}

impl Uploader {
    /// Uploads one segment (retrying transient errors); a segment that still fails is
    /// counted in the manifest and the stream goes on.
    async fn upload(&mut self, data: Vec<u8>) {
        let key = self
            .layout
            .segment(&self.job, self.attempt, self.stream, self.stats.segments);
        let len = data.len();
        self.hasher.update(&data);
        let body = Bytes::from(data);
        let content_type = match self.stream {
            Stream::Events => "application/x-ndjson",
            _ => "text/plain; charset=utf-8",
        };
        let put = || async {
            self.s3
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .body(body.clone().into())
                .content_type(content_type)
                .send()
                .await
        };
        let result = put
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(4)
                    .with_jitter(),
            )
            .when(agentq_core::aws::is_transient)
            .await;
        self.stats.segments += 1;
        self.stats.bytes += len as u64;
        if let Err(e) = result {
            self.stats.failed_segments += 1;
            tracing::error!(job = %self.job, bucket = %self.bucket, %key, error = %agentq_core::aws::display(&e), "log segment upload failed");
        }
    }
}
