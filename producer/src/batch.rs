//! Bulk submit: records first (conditional `PutItem` each, bounded concurrency), then
//! `SendMessageBatch` of up to 10 entries with several calls in flight. Entries a batch
//! reports as failed are retried with backoff; entries that still fail, and entries whose
//! record could not be written, are reported one by one — never dropped silently.
//!
//! Every spec is planned (delay, FIFO ids, offload) before anything is written, so a bad
//! option fails the whole batch up front rather than half of it.

use std::collections::HashSet;
use std::time::Duration;

use agentq_core::{JobId, JobStore, ValidSpec};
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::error::ProducerError;
use crate::producer::{Outgoing, Planned, Producer, SubmitOptions, Submitted};

/// Most entries in one `SendMessageBatch` (AWS).
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Most bytes (bodies + attributes) in one `SendMessageBatch` on a queue with the
/// default maximum message size (AWS: 256 KiB).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Size of a pointer message, for grouping before the offload happened.
const POINTER_ESTIMATE: usize = 512;
/// Attribute overhead per message, for grouping.
const ATTRIBUTE_ESTIMATE: usize = 128;

/// One job of a batch and what became of it.
#[derive(Debug)]
pub struct BatchEntry {
    /// Position in the input (0-based).
    pub index: usize,
    pub job_id: JobId,
    pub result: Result<Submitted, ProducerError>,
}

/// The outcome of [`Producer::submit_batch`], in input order.
#[derive(Debug, Default)]
pub struct BatchReport {
    pub entries: Vec<BatchEntry>,
}

impl BatchReport {
    pub fn submitted(&self) -> usize {
        self.entries.iter().filter(|e| e.result.is_ok()).count()
    }
    pub fn failed(&self) -> usize {
        self.entries.len() - self.submitted()
    }
    /// `Ok` when every job was submitted, else [`ProducerError::Batch`] carrying the first
    /// failure (by input position).
    pub fn into_result(self) -> Result<Vec<Submitted>, ProducerError> {
        let total = self.entries.len();
        let failed = self.failed();
        let mut ok = Vec::with_capacity(total);
        for e in self.entries {
            match e.result {
                Ok(s) => ok.push(s),
                Err(first) => {
                    return Err(ProducerError::Batch {
                        failed,
                        total,
                        first: Box::new(first),
                    });
                }
            }
        }
        Ok(ok)
    }
}

/// A JSON-friendly view of one entry.
#[derive(Debug, Serialize)]
pub struct BatchEntryView<'a> {
    pub index: usize,
    pub job_id: &'a JobId,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offloaded: Option<&'a crate::producer::Offloaded>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
}

impl BatchEntry {
    pub fn view(&self) -> BatchEntryView<'_> {
        let ok = self.result.as_ref().ok();
        let err = self.result.as_ref().err();
        BatchEntryView {
            index: self.index,
            job_id: &self.job_id,
            ok: ok.is_some(),
            message_id: ok.and_then(|s| s.message_id.as_deref()),
            offloaded: ok.and_then(|s| s.offloaded.as_ref()),
            error: err.map(|e| e.to_string()),
            retryable: err.map(ProducerError::is_retryable),
        }
    }
}

/// Why an entry could not be sent.
#[derive(Debug, Clone)]
struct SendFailure {
    transient: bool,
    message: String,
}

impl Producer {
    /// Submits many jobs. `progress` is called with the number of jobs settled (sent or
    /// failed) as they settle.
    ///
    /// Fails as a whole (writing nothing) when settings are missing, two specs share a job
    /// id, or an option does not fit the queue; otherwise every job gets its own result.
    ///
    /// ```no_run
    /// # async fn demo(producer: agentq_producer::Producer, specs: Vec<agentq_core::ValidSpec>)
    /// # -> Result<(), agentq_producer::ProducerError> {
    /// let report = producer
    ///     .submit_batch(specs, &agentq_producer::SubmitOptions::default(), &|_n| {})
    ///     .await?;
    /// for e in &report.entries {
    ///     if let Err(err) = &e.result {
    ///         eprintln!("job {}: {err}", e.job_id);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn submit_batch(
        &self,
        specs: Vec<ValidSpec>,
        opts: &SubmitOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<BatchReport, ProducerError> {
        let queue_url = self.settings.queue_url()?.to_owned();
        let store = self.store()?;
        let mut seen = HashSet::new();
        let mut planned = Vec::with_capacity(specs.len());
        for (i, spec) in specs.into_iter().enumerate() {
            if !seen.insert(spec.job_id.clone()) {
                return Err(ProducerError::Input(format!(
                    "job_id {} appears more than once in the batch (entry {}): give each job its own id",
                    spec.job_id,
                    i + 1
                )));
            }
            let id = spec.job_id.clone();
            let p = self.plan(spec, opts, &queue_url).map_err(|e| match e {
                ProducerError::Input(m) => {
                    ProducerError::Input(format!("entry {} (job {id}): {m}", i + 1))
                }
                other => other,
            })?;
            planned.push((i, p));
        }
        let chunks = chunk(planned);
        let records = Semaphore::new(self.opts.record_concurrency.max(1));
        let mut entries: Vec<BatchEntry> = futures::stream::iter(chunks)
            .map(|c| self.submit_chunk(&store, &queue_url, c, &records, progress))
            .buffer_unordered(self.opts.send_concurrency.max(1))
            .flat_map(futures::stream::iter)
            .collect()
            .await;
        entries.sort_by_key(|e| e.index);
        Ok(BatchReport { entries })
    }

    async fn submit_chunk(
        &self,
        store: &JobStore,
        queue_url: &str,
        chunk: Vec<(usize, Planned)>,
        records: &Semaphore,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Vec<BatchEntry> {
        let mut done = Vec::with_capacity(chunk.len());
        let prepared = futures::future::join_all(chunk.into_iter().map(|(i, p)| async move {
            // A tokio semaphore permit may be held across awaits (no lock is held).
            let _permit = records.acquire().await;
            let job_id = p.spec.job_id.clone();
            let res = match self.record(store, &p).await {
                Ok(created) => self.offload(store, p, created).await.map(|o| (o, created)),
                Err(e) => Err(e),
            };
            (i, job_id, res)
        }))
        .await;
        let mut ready = Vec::new();
        for (index, job_id, res) in prepared {
            match res {
                Ok((out, created)) => ready.push((index, out, created)),
                Err(e) => {
                    progress(1);
                    done.push(BatchEntry {
                        index,
                        job_id,
                        result: Err(e),
                    });
                }
            }
        }
        if ready.is_empty() {
            return done;
        }
        let outs: Vec<&Outgoing> = ready.iter().map(|(_, o, _)| o).collect();
        let results = self.send_batch(queue_url, &outs).await;
        for ((index, out, created), res) in ready.iter().zip(results) {
            let result = match res {
                Ok(message_id) => {
                    self.queued(out, message_id.as_deref());
                    Ok(out.submitted(queue_url, message_id))
                }
                Err(f) => {
                    let record = self.unrecord(store, out, *created).await;
                    Err(ProducerError::Send {
                        job_id: out.job_id.clone(),
                        queue_url: queue_url.to_owned(),
                        transient: f.transient,
                        message: f.message,
                        record,
                    })
                }
            };
            progress(1);
            done.push(BatchEntry {
                index: *index,
                job_id: out.job_id.clone(),
                result,
            });
        }
        done
    }

    /// One `SendMessageBatch`, retrying the entries it reports failed (unless the sender
    /// is at fault) and whole-call transient errors. Results are aligned with `outs`.
    async fn send_batch(
        &self,
        queue_url: &str,
        outs: &[&Outgoing],
    ) -> Vec<Result<Option<String>, SendFailure>> {
        let mut results: Vec<Option<Result<Option<String>, SendFailure>>> = vec![None; outs.len()];
        let mut last_error = vec![String::new(); outs.len()];
        let mut pending: Vec<usize> = (0..outs.len()).collect();
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(self.opts.send_retries)
            .with_jitter()
            .build();
        let mut tries = 0usize;
        loop {
            tries += 1;
            let entries: Vec<SendMessageBatchRequestEntry> =
                pending.iter().map(|&i| batch_entry(i, outs[i])).collect();
            let mut retry = Vec::new();
            match self
                .clients
                .sqs
                .send_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    for s in out.successful() {
                        if let Some(slot) = s
                            .id()
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| results.get_mut(i))
                        {
                            *slot = Some(Ok(Some(s.message_id().to_owned())));
                        }
                    }
                    for f in out.failed() {
                        let Some(i) = f.id().parse::<usize>().ok().filter(|i| *i < outs.len())
                        else {
                            continue;
                        };
                        let message = format!(
                            "SendMessageBatch entry failed: {} {}",
                            f.code(),
                            f.message().unwrap_or_default()
                        );
                        if f.sender_fault() {
                            results[i] = Some(Err(SendFailure {
                                transient: false,
                                message,
                            }));
                        } else {
                            last_error[i] = message;
                            retry.push(i);
                        }
                    }
                    // An entry the answer does not mention was not sent: retry it.
                    for &i in &pending {
                        if results[i].is_none() && !retry.contains(&i) {
                            last_error[i] = "SendMessageBatch did not report the entry".into();
                            retry.push(i);
                        }
                    }
                }
                Err(e) => {
                    let message = agentq_core::aws::display(&e);
                    if agentq_core::aws::is_transient(&e) {
                        for &i in &pending {
                            last_error[i] = message.clone();
                        }
                        retry = pending.clone();
                    } else {
                        for &i in &pending {
                            results[i] = Some(Err(SendFailure {
                                transient: false,
                                message: message.clone(),
                            }));
                        }
                    }
                }
            }
            if retry.is_empty() {
                break;
            }
            match backoff.next() {
                Some(delay) => {
                    tracing::debug!(
                        entries = retry.len(),
                        ?delay,
                        "retrying failed batch entries"
                    );
                    tokio::time::sleep(delay).await;
                    pending = retry;
                }
                None => {
                    for i in retry {
                        results[i] = Some(Err(SendFailure {
                            transient: true,
                            message: format!("{} (gave up after {tries} tries)", last_error[i]),
                        }));
                    }
                    break;
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(SendFailure {
                        transient: true,
                        message: "not sent".into(),
                    })
                })
            })
            .collect()
    }
}

fn batch_entry(i: usize, o: &Outgoing) -> SendMessageBatchRequestEntry {
    SendMessageBatchRequestEntry::builder()
        .id(i.to_string())
        .message_body(&o.body)
        .set_message_attributes(Some(o.attributes.clone()))
        .set_message_group_id(o.group_id.clone())
        .set_message_deduplication_id(o.dedup_id.clone())
        .set_delay_seconds(o.delay_seconds)
        .build()
        .expect("id and body are set")
}

/// Groups planned jobs into batches of at most 10 entries and [`MAX_BATCH_BYTES`]
/// (a message larger than that alone goes in a batch of its own).
fn chunk(planned: Vec<(usize, Planned)>) -> Vec<Vec<(usize, Planned)>> {
    let mut chunks = Vec::new();
    let mut cur: Vec<(usize, Planned)> = Vec::new();
    let mut bytes = 0usize;
    for (i, p) in planned {
        let size = ATTRIBUTE_ESTIMATE
            + if p.offload_bucket.is_some() {
                POINTER_ESTIMATE
            } else {
                p.json.len()
            };
        if !cur.is_empty() && (cur.len() == MAX_BATCH_ENTRIES || bytes + size > MAX_BATCH_BYTES) {
            chunks.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size;
        cur.push((i, p));
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentq_core::spec::{JobSpec, ValidationContext};

    fn planned(n: usize, body: usize) -> Vec<(usize, Planned)> {
        (0..n)
            .map(|i| {
                let spec = JobSpec::parse_valid(
                    br#"{"spec_version":1,"agent":"command","command":["true"]}"#,
                    &ValidationContext::default(),
                )
                .unwrap();
                (
                    i,
                    Planned {
                        spec,
                        json: "x".repeat(body),
                        group_id: None,
                        dedup_id: None,
                        delay_seconds: None,
                        offload_bucket: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn batches_hold_at_most_ten_entries_and_256_kib() {
        let c = chunk(planned(25, 100));
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);
        // 100 KiB bodies: two per batch.
        let c = chunk(planned(5, 100 * 1024));
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        // Larger than a batch: alone.
        let c = chunk(planned(2, 300 * 1024));
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1]);
        let order: Vec<usize> = chunk(planned(12, 1))
            .into_iter()
            .flatten()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(order, (0..12).collect::<Vec<_>>());
    }
}
