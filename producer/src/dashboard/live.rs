//! A job page's live stream: one task per open page polls the job's record and lists new
//! log segments in S3 (stdout, stderr, events of the current attempt) every refresh
//! interval, and sends what is new to the page as server-sent events through a bounded
//! channel:
//!
//! - `summary`: the re-rendered summary (state, progress, chart, attempts, decisions),
//!   whenever the record or the chart changed;
//! - `log`: `{stream, attempt, seq, text, skipped}` for every new segment (its `id` is the
//!   cursor, so a reconnecting `EventSource` resumes where it stopped via `Last-Event-ID`);
//! - `problem`: a failed AWS call (the stream retries on the next tick);
//! - `end`: the job reached a terminal state and every segment was sent.
//!
//! Bounds: on a fresh page only the last [`TAIL_BYTES`] of each stream are sent, a segment
//! larger than [`SEGMENT_BYTES`] is read by a suffix range, the chart reads at most
//! [`CHART_BYTES`] of events per page, the channel holds a few messages (a slow page slows
//! its own task), and the number of open streams is capped by the dashboard's semaphore.
//! The task ends when the page goes away, at shutdown, or at the end of the job.

use std::sync::Arc;

use agentq_core::record::{EpochMillis, now_ms};
use agentq_core::{Attempt, JobId, JobRecord, Stream};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::App;
use super::chart::{Series, Usage, svg};
use super::html;
use crate::error::ProducerError;

/// Log bytes sent per stream when a page opens.
pub const TAIL_BYTES: u64 = 256 * 1024;
/// Largest part of one segment sent to a page (the rest is counted as skipped).
pub const SEGMENT_BYTES: u64 = 512 * 1024;
/// Events read for the chart when a page opens.
pub const CHART_BYTES: u64 = 32 * 1024 * 1024;
/// Messages buffered per page.
const CHANNEL: usize = 8;

/// What the task sends to its page.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Summary(String),
    Log {
        stream: Stream,
        attempt: u32,
        seq: u32,
        text: String,
        /// Bytes before `text` that were not sent.
        skipped: u64,
        cursor: String,
    },
    Problem(String),
    End,
}

/// Where a page is in the logs: the attempt and the last segment sent per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub attempt: u32,
    pub last: [Option<u32>; 3],
}

fn idx(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
        Stream::Events => 2,
    }
}

impl Cursor {
    /// `attempt.stdout.stderr.events`, `-` for none: the SSE event id.
    pub fn encode(&self) -> String {
        let part = |v: Option<u32>| v.map_or("-".to_owned(), |n| n.to_string());
        format!(
            "{}.{}.{}.{}",
            self.attempt,
            part(self.last[0]),
            part(self.last[1]),
            part(self.last[2])
        )
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut it = s.split('.');
        let attempt = it.next()?.parse().ok()?;
        let mut last = [None; 3];
        for slot in &mut last {
            let p = it.next()?;
            *slot = if p == "-" {
                None
            } else {
                Some(p.parse().ok()?)
            };
        }
        it.next().is_none().then_some(Self { attempt, last })
    }
}

/// One listed segment.
#[derive(Debug, Clone)]
struct Obj {
    key: String,
    seq: u32,
    size: u64,
    modified: EpochMillis,
}

/// Starts the task for one page; the receiver feeds the SSE response.
pub fn spawn(
    app: Arc<App>,
    job: JobId,
    resume: Option<Cursor>,
    permit: OwnedSemaphorePermit,
) -> mpsc::Receiver<Msg> {
    let (tx, rx) = mpsc::channel(CHANNEL);
    tokio::spawn(async move {
        let _permit = permit;
        let mut shutdown = app.shutdown.clone();
        let mut t = Tail {
            app: app.clone(),
            job,
            tx,
            series: Series::default(),
            chart_last: None,
            cursor: Cursor::default(),
            carry: Default::default(),
            seen: None,
            drained_final: false,
        };
        tokio::select! {
            _ = t.run(resume) => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    });
    rx
}

struct Tail {
    app: Arc<App>,
    job: JobId,
    tx: mpsc::Sender<Msg>,
    series: Series,
    /// Last events segment of the series' attempt folded into the chart.
    chart_last: Option<u32>,
    cursor: Cursor,
    /// Incomplete UTF-8 at the end of the last segment, per stream.
    carry: [Vec<u8>; 3],
    /// What the last summary showed.
    seen: Option<(EpochMillis, Option<EpochMillis>, usize)>,
    /// The job was finished when its segments were last listed.
    drained_final: bool,
}

/// The page went away or the dashboard stops.
struct Gone;

impl Tail {
    async fn run(&mut self, resume: Option<Cursor>) {
        // Start: the chart from every attempt's events, then the tail (or resume).
        let rec = loop {
            match self.start(resume).await {
                Ok(Some(rec)) => break rec,
                Ok(None) => return,
                Err(e) => {
                    if self.problem(&e).await.is_err() || self.pause().await.is_err() {
                        return;
                    }
                }
            }
        };
        if rec.status.is_terminal() {
            let _ = self.tx.send(Msg::End).await;
            return;
        }
        loop {
            if self.pause().await.is_err() {
                return;
            }
            match self.tick().await {
                Ok(true) => {
                    let _ = self.tx.send(Msg::End).await;
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    if self.problem(&e).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn pause(&self) -> Result<(), Gone> {
        tokio::select! {
            _ = tokio::time::sleep(self.app.opts.refresh) => Ok(()),
            _ = self.tx.closed() => Err(Gone),
        }
    }

    async fn send(&self, m: Msg) -> Result<(), Gone> {
        self.tx.send(m).await.map_err(|_| Gone)
    }

    async fn problem(&self, e: &ProducerError) -> Result<(), Gone> {
        let hint = if e.is_retryable() {
            " (transient; retrying)"
        } else {
            " (retrying)"
        };
        self.send(Msg::Problem(format!("{e}{hint}"))).await
    }

    /// Reads the record, builds the chart and sends the first summary and the log tails.
    /// `Ok(None)`: the page went away.
    async fn start(&mut self, resume: Option<Cursor>) -> Result<Option<JobRecord>, ProducerError> {
        let rec = self.app.producer.status(&self.job).await?;
        self.series = Series::default();
        self.chart_last = None;
        let mut budget = CHART_BYTES;
        for a in 1..=rec.attempt.get() {
            self.series.start_attempt(a);
            let objs = self.list(Attempt(a), Stream::Events, None).await?;
            for o in objs {
                if o.size > budget {
                    self.series.partial = true;
                    continue;
                }
                budget -= o.size;
                let data = self.app.producer.read_object(&o.key).await?;
                self.series.segment(o.modified, &data);
                if a == rec.attempt.get() {
                    self.chart_last = Some(o.seq);
                }
            }
        }
        let fresh = resume.is_none();
        self.cursor = resume.unwrap_or(Cursor {
            attempt: rec.attempt.get(),
            last: [None; 3],
        });
        if self.summary(&rec).await.is_err() {
            return Ok(None);
        }
        if fresh && rec.attempt != Attempt::NONE {
            for s in Stream::ALL {
                if self.initial_tail(s).await.is_err() {
                    return Ok(None);
                }
            }
        } else if self.drain(&rec).await?.is_err() {
            return Ok(None);
        }
        self.drained_final = rec.status.is_finished();
        Ok(Some(rec))
    }

    /// One poll. `Ok(true)`: the job is terminal and everything was sent.
    async fn tick(&mut self) -> Result<bool, ProducerError> {
        // Read the record before listing: if the job was finished then, the listing
        // below sees every segment it wrote.
        let rec = self.app.producer.status(&self.job).await?;
        let finished = rec.status.is_finished();
        let moved_on = rec.attempt.get() > self.cursor.attempt;
        if !(finished && self.drained_final && !moved_on) {
            if self.drain(&rec).await?.is_err() {
                return Ok(true);
            }
            self.drained_final = finished;
        }
        if self.summary(&rec).await.is_err() {
            return Ok(true);
        }
        Ok(rec.status.is_terminal())
    }

    /// Sends the new segments of the cursor's attempt, then of any newer attempt.
    async fn drain(&mut self, rec: &JobRecord) -> Result<Result<(), Gone>, ProducerError> {
        loop {
            if self.cursor.attempt > 0 {
                for s in Stream::ALL {
                    let after = self.cursor.last[idx(s)];
                    let objs = self.list(Attempt(self.cursor.attempt), s, after).await?;
                    for o in objs {
                        if self.forward_with(s, &o, 0).await?.is_err() {
                            return Ok(Err(Gone));
                        }
                    }
                }
            }
            if rec.attempt.get() <= self.cursor.attempt {
                return Ok(Ok(()));
            }
            // A newer attempt started: move on (a character cut at the very end of the
            // old attempt's output is dropped).
            self.carry = Default::default();
            self.cursor = Cursor {
                attempt: self.cursor.attempt + 1,
                last: [None; 3],
            };
            if self.cursor.attempt > self.series.attempt() {
                self.series.start_attempt(self.cursor.attempt);
                self.chart_last = None;
            }
        }
    }

    /// The last [`TAIL_BYTES`] of a stream of the current attempt.
    async fn initial_tail(&mut self, s: Stream) -> Result<(), Gone> {
        let objs = match self.list(Attempt(self.cursor.attempt), s, None).await {
            Ok(o) => o,
            Err(e) => return self.problem(&e).await,
        };
        let mut keep = 0;
        let mut bytes = 0u64;
        for o in objs.iter().rev() {
            if bytes >= TAIL_BYTES {
                break;
            }
            bytes += o.size;
            keep += 1;
        }
        let first = objs.len() - keep;
        let mut skipped: u64 = objs[..first].iter().map(|o| o.size).sum();
        if let Some(last_skipped) = objs[..first].last() {
            self.cursor.last[idx(s)] = Some(last_skipped.seq);
        }
        for o in &objs[first..] {
            match self.forward_with(s, o, skipped).await {
                Ok(r) => r?,
                Err(e) => self.problem(&e).await?,
            }
            skipped = 0;
        }
        Ok(())
    }

    /// Reads one segment (its tail when large), folds events into the chart, sends it.
    async fn forward_with(
        &mut self,
        s: Stream,
        o: &Obj,
        skipped_before: u64,
    ) -> Result<Result<(), Gone>, ProducerError> {
        let fold = s == Stream::Events
            && self.cursor.attempt == self.series.attempt()
            && self.chart_last.is_none_or(|c| o.seq > c);
        let (data, mut skipped) = if fold || o.size <= SEGMENT_BYTES {
            (self.app.producer.read_object(&o.key).await?, 0)
        } else {
            (
                self.read_suffix(&o.key, SEGMENT_BYTES).await?,
                o.size.saturating_sub(SEGMENT_BYTES),
            )
        };
        if fold {
            self.series.segment(o.modified, &data);
            self.chart_last = Some(o.seq);
        }
        let mut slice = &data[..];
        if slice.len() as u64 > SEGMENT_BYTES {
            let cut = slice.len() - SEGMENT_BYTES as usize;
            skipped += cut as u64;
            slice = &slice[cut..];
        }
        if skipped > 0 {
            // Start at a line boundary when one is near.
            if let Some(nl) = slice.iter().take(4096).position(|b| *b == b'\n') {
                skipped += nl as u64 + 1;
                slice = &slice[nl + 1..];
            }
            self.carry[idx(s)].clear();
        }
        let text = decode(&mut self.carry[idx(s)], slice);
        self.cursor.last[idx(s)] = Some(o.seq);
        let m = self.log_msg(s, o.seq, text, skipped + skipped_before);
        Ok(self.send(m).await)
    }

    fn log_msg(&self, stream: Stream, seq: u32, text: String, skipped: u64) -> Msg {
        Msg::Log {
            stream,
            attempt: self.cursor.attempt,
            seq,
            text,
            skipped,
            cursor: self.cursor.encode(),
        }
    }

    /// Sends the summary when the record or the chart changed since the last one.
    async fn summary(&mut self, rec: &JobRecord) -> Result<(), Gone> {
        let now = now_ms();
        let live =
            (rec.attempt.get() > 0 && rec.attempt.get() == self.series.attempt()).then(|| {
                let p = &rec.progress;
                let at = rec
                    .finished_at
                    .or(rec.heartbeat_at)
                    .unwrap_or(rec.updated_at);
                (
                    at,
                    Usage {
                        turns: p.turns.into(),
                        input_tokens: p.input_tokens,
                        output_tokens: p.output_tokens,
                        cost_usd: p.cost_usd,
                    },
                )
            });
        let points = self.series.points_with(live);
        let key = (rec.updated_at, rec.heartbeat_at, points.len());
        if self.seen == Some(key) && rec.status != agentq_core::JobState::Running {
            return Ok(());
        }
        self.seen = Some(key);
        let start = rec
            .attempts
            .values()
            .map(|a| a.started_at)
            .min()
            .unwrap_or(rec.created_at);
        let chart = svg(
            &points,
            start,
            rec.finished_at.unwrap_or(now),
            self.series.partial,
        );
        let html = html::job_summary(rec, &chart, self.app.token.as_str(), now);
        self.send(Msg::Summary(html)).await
    }

    async fn list(
        &self,
        attempt: Attempt,
        stream: Stream,
        after: Option<u32>,
    ) -> Result<Vec<Obj>, ProducerError> {
        let p = &self.app.producer;
        let bucket = p.settings().bucket()?;
        let layout = p.settings().layout();
        let prefix = layout.stream_prefix(&self.job, attempt, stream);
        let start_after = after.map(|seq| layout.segment(&self.job, attempt, stream, seq));
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = p
                .clients
                .s3
                .list_objects_v2()
                .bucket(bucket)
                .prefix(&prefix)
                .set_start_after(start_after.clone())
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
            for o in page.contents() {
                let Some(key) = o.key() else { continue };
                let Some(seq) = key
                    .strip_prefix(&prefix)
                    .and_then(|name| name.split('.').next())
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                out.push(Obj {
                    key: key.to_owned(),
                    seq,
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o
                        .last_modified()
                        .and_then(|t| t.to_millis().ok())
                        .unwrap_or_else(now_ms),
                });
            }
            token = page.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        out.sort_by_key(|o| o.seq);
        Ok(out)
    }

    /// The last `n` bytes of an object.
    async fn read_suffix(&self, key: &str, n: u64) -> Result<Vec<u8>, ProducerError> {
        let p = &self.app.producer;
        let bucket = p.settings().bucket()?;
        let err = |transient, message| ProducerError::S3 {
            op: "GetObject",
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            transient,
            message,
        };
        let out = p
            .clients
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes=-{n}"))
            .send()
            .await
            .map_err(|e| {
                err(
                    agentq_core::aws::is_transient(&e),
                    agentq_core::aws::display(&e),
                )
            })?;
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| err(true, e.to_string()))?;
        Ok(bytes.into_bytes().to_vec())
    }
}

/// Decodes `data` after what `carry` held, keeping an incomplete UTF-8 character at the
/// end for the next segment; invalid bytes become U+FFFD.
pub fn decode(carry: &mut Vec<u8>, data: &[u8]) -> String {
    let mut buf = std::mem::take(carry);
    buf.extend_from_slice(data);
    let mut cut = buf.len();
    for i in (buf.len().saturating_sub(3)..buf.len()).rev() {
        let b = buf[i];
        if b < 0x80 {
            break;
        }
        if b >= 0xC0 {
            let need = match b {
                0xF0.. => 4,
                0xE0.. => 3,
                _ => 2,
            };
            if i + need > buf.len() {
                cut = i;
            }
            break;
        }
    }
    *carry = buf.split_off(cut);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips() {
        let c = Cursor {
            attempt: 2,
            last: [Some(3), None, Some(0)],
        };
        assert_eq!(c.encode(), "2.3.-.0");
        assert_eq!(Cursor::decode("2.3.-.0"), Some(c));
        for bad in ["", "2", "2.3.-", "2.3.-.0.1", "x.-.-.-", "1.-1.-.-"] {
            assert_eq!(Cursor::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn utf8_split_across_segments_is_kept_whole() {
        let text = "grüße ✓ 🚀";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut carry = Vec::new();
            let mut out = decode(&mut carry, &bytes[..cut]);
            out.push_str(&decode(&mut carry, &bytes[cut..]));
            assert_eq!(out, text, "cut at {cut}");
            assert!(carry.is_empty());
        }
        let mut carry = Vec::new();
        assert_eq!(decode(&mut carry, b"a\xffb"), "a\u{fffd}b");
    }
}
