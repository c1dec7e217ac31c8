//! Streaming a job's output to S3 while it runs, without ever slowing the child down.
//!
//! Each stream (stdout, stderr, events) is appended to a spill file in the workspace's
//! agent-only directory as it arrives; one uploader task per stream uploads what the file
//! holds behind the writer, a segment at a time, when `flush_bytes` have piled up or
//! `flush_interval` has passed. A slow or failing S3 therefore never pushes back into the
//! child's pipe: the backlog waits on local disk (bounded by `max_backlog_bytes`, after
//! which the writer does wait), memory stays at one segment per stream, and a hard kill
//! loses at most one flush interval. A segment whose upload fails stays in the file and
//! is tried again at the next flush; only what is still not uploaded when the drain's
//! deadline comes is counted as lost in the manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use agentq_core::{Attempt, JobId, Layout, Stream};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How a log stream is cut into segments.
#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    pub flush_bytes: usize,
    pub flush_interval: Duration,
    /// Bytes written but not yet uploaded before the writer waits (disk use bound).
    pub max_backlog_bytes: u64,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        Self {
            flush_bytes: 4 * 1024 * 1024,
            flush_interval: Duration::from_secs(5),
            max_backlog_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// What one stream produced, for the manifest.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamStats {
    /// Bytes uploaded.
    pub bytes: u64,
    pub segments: u32,
    /// Upload attempts that failed (each retried at the next flush).
    pub failed_uploads: u32,
    /// Bytes written by the job that never reached S3 (the drain ran out of time).
    pub lost_bytes: u64,
    /// SHA-256 of all bytes uploaded (after redaction), hex.
    pub sha256: String,
    pub prefix: String,
}

/// State shared by a stream's writer and its uploader.
#[derive(Debug)]
struct Shared {
    path: PathBuf,
    written: AtomicU64,
    uploaded: AtomicU64,
    closed: AtomicBool,
    /// Wakes the uploader (data or close).
    data: Notify,
    /// Wakes a writer waiting for the backlog to shrink.
    progress: Notify,
}

/// The writing side of one stream. One writer per stream.
#[derive(Debug)]
pub struct StreamSink {
    shared: Arc<Shared>,
    file: tokio::fs::File,
    max_backlog: u64,
    drain_deadline: watch::Sender<Option<Instant>>,
}

/// Reads how much of a stream still waits for S3 (for sizing the final reserve).
#[derive(Debug, Clone)]
pub struct BacklogProbe(Arc<Shared>);

impl BacklogProbe {
    pub fn pending(&self) -> u64 {
        self.0.written.load(Ordering::Acquire) - self.0.uploaded.load(Ordering::Acquire)
    }
}

impl StreamSink {
    pub fn probe(&self) -> BacklogProbe {
        BacklogProbe(self.shared.clone())
    }

    /// Appends a chunk. Waits only when the un-uploaded backlog exceeds the bound.
    pub async fn write(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        loop {
            let backlog = self.shared.written.load(Ordering::Acquire)
                - self.shared.uploaded.load(Ordering::Acquire);
            if backlog < self.max_backlog {
                break;
            }
            let notified = self.shared.progress.notified();
            tokio::select! {
                _ = notified => {}
                // Re-check now and then: an uploader that gave up never notifies.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if self.shared.closed.load(Ordering::Acquire) {
                return;
            }
        }
        if let Err(e) = self.file.write_all(chunk).await {
            tracing::error!(path = %self.shared.path.display(), error = %e, "spill write failed; output lost");
            return;
        }
        self.shared
            .written
            .fetch_add(chunk.len() as u64, Ordering::AcqRel);
        self.shared.data.notify_one();
    }

    /// The stream is complete: the uploader uploads the rest, until `deadline`.
    pub async fn close(mut self, deadline: Instant) {
        let _ = self.file.flush().await;
        let _ = self.drain_deadline.send(Some(deadline));
        self.shared.closed.store(true, Ordering::Release);
        self.shared.data.notify_one();
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        // A writer that was aborted: the uploader still drains what reached the file.
        self.shared.closed.store(true, Ordering::Release);
        self.shared.data.notify_one();
    }
}

/// Where a stream's segments go.
#[derive(Debug, Clone)]
pub struct Target {
    pub s3: aws_sdk_s3::Client,
    pub bucket: String,
    pub layout: Layout,
    pub job: JobId,
    pub attempt: Attempt,
}

/// Creates the spill file of `stream` under `dir` and spawns its uploader. Close the sink,
/// then await the handle for the stats.
pub async fn spawn_uploader(
    target: Target,
    stream: Stream,
    dir: &Path,
    policy: FlushPolicy,
) -> std::io::Result<(StreamSink, JoinHandle<StreamStats>)> {
    let path = dir.join(format!("{}.spill", stream.as_str()));
    let file = tokio::fs::File::create(&path).await?;
    let reader = tokio::fs::File::open(&path).await?;
    let shared = Arc::new(Shared {
        path,
        written: AtomicU64::new(0),
        uploaded: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        data: Notify::new(),
        progress: Notify::new(),
    });
    let (deadline_tx, deadline_rx) = watch::channel(None);
    let up = Uploader {
        stats: StreamStats {
            prefix: target
                .layout
                .stream_prefix(&target.job, target.attempt, stream),
            ..Default::default()
        },
        hasher: Sha256::new(),
        target,
        stream,
        shared: shared.clone(),
        reader,
        policy,
    };
    let handle = tokio::spawn(up.run(deadline_rx));
    Ok((
        StreamSink {
            shared,
            file,
            max_backlog: policy.max_backlog_bytes.max(policy.flush_bytes as u64),
            drain_deadline: deadline_tx,
        },
        handle,
    ))
}

/// One stream's upload state.
struct Uploader {
    target: Target,
    stream: Stream,
    shared: Arc<Shared>,
    reader: tokio::fs::File,
    policy: FlushPolicy,
    stats: StreamStats,
    hasher: Sha256,
}

impl Uploader {
    async fn run(mut self, mut deadline: watch::Receiver<Option<Instant>>) -> StreamStats {
        let mut tick = tokio::time::interval(self.policy.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // While the job runs: full segments as they fill, a partial one at each tick. After
        // a failed upload, wait for the next tick (not the next write) before trying again.
        let mut backing_off = false;
        while !self.shared.closed.load(Ordering::Acquire) {
            let timed = loop {
                tokio::select! {
                    _ = self.shared.data.notified() => {
                        if !backing_off || self.shared.closed.load(Ordering::Acquire) {
                            break false;
                        }
                    }
                    _ = tick.tick() => break true,
                }
            };
            backing_off = false;
            while self.pending() >= self.policy.flush_bytes as u64 {
                if !self.upload_next().await {
                    backing_off = true;
                    break;
                }
            }
            if timed && !backing_off && self.pending() > 0 && !self.upload_next().await {
                backing_off = true;
            }
        }
        // Drain: everything left, until the deadline.
        let until = (*deadline.borrow_and_update())
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
        while self.pending() > 0 {
            let ok = tokio::time::timeout_at(until, self.upload_next()).await;
            match ok {
                Ok(true) => {}
                Ok(false) if Instant::now() + Duration::from_millis(200) < until => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => break,
            }
        }
        self.stats.lost_bytes = self.pending();
        if self.stats.lost_bytes > 0 {
            tracing::error!(job = %self.target.job, stream = self.stream.as_str(), lost = self.stats.lost_bytes, "log bytes not uploaded before the deadline");
        }
        self.shared.progress.notify_waiters();
        self.stats.sha256 = hex::encode(self.hasher.finalize());
        self.stats
    }

    fn pending(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire) - self.shared.uploaded.load(Ordering::Acquire)
    }

    /// Uploads the next segment (up to `flush_bytes` from the upload offset). Returns
    /// whether it reached S3; on failure the bytes stay for the next try.
    async fn upload_next(&mut self) -> bool {
        let offset = self.shared.uploaded.load(Ordering::Acquire);
        let len = self.pending().min(self.policy.flush_bytes as u64) as usize;
        if len == 0 {
            return true;
        }
        let mut data = vec![0u8; len];
        let read = async {
            self.reader.seek(std::io::SeekFrom::Start(offset)).await?;
            self.reader.read_exact(&mut data).await
        };
        if let Err(e) = read.await {
            tracing::error!(path = %self.shared.path.display(), error = %e, "spill read failed");
            return false;
        }
        let t = &self.target;
        let key = t
            .layout
            .segment(&t.job, t.attempt, self.stream, self.stats.segments);
        let content_type = match self.stream {
            Stream::Events => "application/x-ndjson",
            _ => "text/plain; charset=utf-8",
        };
        let put =
            t.s3.put_object()
                .bucket(&t.bucket)
                .key(&key)
                .body(data.clone().into())
                .content_type(content_type)
                .send()
                .await;
        match put {
            Ok(_) => {
                self.hasher.update(&data);
                self.stats.segments += 1;
                self.stats.bytes += len as u64;
                self.shared.uploaded.fetch_add(len as u64, Ordering::AcqRel);
                self.shared.progress.notify_waiters();
                true
            }
            Err(e) => {
                self.stats.failed_uploads += 1;
                tracing::warn!(job = %t.job, bucket = %t.bucket, %key, error = %agentq_core::aws::display(&e), "log segment upload failed; kept for the next flush");
                false
            }
        }
    }
}
