//! Step 2: the child runs. Its stdout and stderr are read in chunks, redacted (a secret
//! split across chunks is held back until it can be judged whole), appended to spill
//! files that the uploaders stream to S3 behind it, and read line by line for structured
//! events and for what the CLI says about its end ([`super::signals`]). A heartbeat task
//! writes progress, reads the cancel flag, keeps the lease and the message's visibility,
//! enforces the spend cap and watches the job's processes. The child is stopped at its
//! deadline — recomputed every second so that the time kept back covers what is left to
//! upload — or on cancel, lease loss, shutdown or spend; then everything the job started
//! is killed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentq_core::record::now_ms;
use agentq_core::spec::ResumePolicy;
use agentq_core::store::{Finish, StoreError};
use agentq_core::{Attempt, FailureCause, Progress, Stream};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::prepare::Prepared;
use super::signals::{CliSignal, detect_signal};
use super::{RunInput, StopReason, VisibilityLease};
use crate::Deps;
use crate::child::{Ended, RunningChild};
use crate::isolation::{self, JobProcesses, RunningJob};
use crate::logs::{BacklogProbe, StreamSink, StreamStats, Target, spawn_uploader};
use crate::redact::Redactor;

use crate::events::{EventStream, MAX_EVENT_LINE};

/// Rate-limit refusals in a row after which the child is stopped and the job paused
/// (Claude Code alone retries ten times with growing waits, minutes of billed time).
const RATE_LIMIT_STOP_AFTER: u32 = 3;

/// What the run left for [`super::finalize`].
#[derive(Debug)]
pub(super) struct Supervised {
    pub ended: Ended,
    pub stop: Option<StopReason>,
    /// Redacted: it came from redacted output.
    pub progress: Progress,
    pub signal: Option<CliSignal>,
    pub child_started: Instant,
    pub child_ended: Instant,
    pub child_deadline: Instant,
    /// Sinks to close and uploaders to join, per stream.
    pub streams: Vec<(Stream, Option<StreamSink>, JoinHandle<StreamStats>)>,
    pub killed_leftovers: usize,
}

/// State shared by the pumps, the heartbeat and the supervising loop. Std mutexes: held
/// for a field update or a clone, never across an await.
#[derive(Debug, Default)]
struct Live {
    progress: Mutex<Progress>,
    signal: Mutex<Option<CliSignal>>,
    /// Rate-limit refusals reported by the CLI so far.
    rate_limited: AtomicU32,
    /// Bytes a checkpoint would archive now (0 when the job is not resumable).
    checkpoint_bytes: AtomicU64,
}

/// Runs the child; `Err` when it could not even start.
pub(super) async fn supervise(
    deps: &Arc<Deps>,
    input: &RunInput<'_>,
    prepared: &Prepared,
    running: &RunningJob,
    started: Instant,
) -> Result<Supervised, Box<Finish>> {
    let spec = input.spec;
    let job = &spec.job_id;
    let cfg = &deps.config;
    let bucket = deps.settings.bucket().unwrap_or_default().to_owned();
    let target = Target {
        s3: deps.clients.s3.clone(),
        bucket,
        layout: deps.settings.layout().clone(),
        job: job.clone(),
        attempt: input.attempt,
    };
    let mut sinks = Vec::new();
    let mut handles = Vec::new();
    for stream in Stream::ALL {
        match spawn_uploader(target.clone(), stream, &prepared.ws.state, cfg.flush).await {
            Ok((sink, h)) => {
                sinks.push(sink);
                handles.push((stream, h));
            }
            Err(e) => {
                return Err(Box::new(Finish {
                    state: FailureCause::InfraTransient.final_state(),
                    cause: Some(FailureCause::InfraTransient),
                    reason: format!("could not create the log spill files: {e}"),
                    exit_code: None,
                    signal: None,
                    result_key: None,
                    progress: Progress::default(),
                    runtime_ms: 0,
                }));
            }
        }
    }
    let probes: Vec<BacklogProbe> = sinks.iter().map(StreamSink::probe).collect();
    let mut sinks = sinks.into_iter();
    let (Some(out_sink), Some(err_sink), Some(ev_sink)) =
        (sinks.next(), sinks.next(), sinks.next())
    else {
        unreachable!("three streams");
    };

    let child_spec = &prepared.child;
    let (mut child, stdout, stderr) = match RunningChild::spawn(child_spec) {
        Ok(c) => c,
        Err(e) => {
            let mut streams = Vec::new();
            for ((stream, h), sink) in handles.into_iter().zip([out_sink, err_sink, ev_sink]) {
                streams.push((stream, Some(sink), h));
            }
            let now = Instant::now();
            return Ok(Supervised {
                ended: Ended {
                    code: Some(127),
                    signal: None,
                    killed: false,
                },
                stop: None,
                progress: Progress {
                    last_event: Some(format!("could not start {:?}: {e}", child_spec.program)),
                    ..Progress::default()
                },
                signal: None,
                child_started: now,
                child_ended: now,
                child_deadline: now,
                streams,
                killed_leftovers: 0,
            });
        }
    };
    let child_started = Instant::now();
    tracing::info!(%job, attempt = %input.attempt, pid = ?child.pid(), program = %child_spec.program, uid = ?child_spec.identity.map(|i| i.uid), "child started");
    let live = Arc::new(Live::default());
    let redact = prepared.redact_values();
    let out_reader = tokio::spawn(pump(
        stdout,
        Redactor::new(&redact),
        out_sink,
        Some(ev_sink),
        live.clone(),
        true,
    ));
    let err_reader = tokio::spawn(pump(
        stderr,
        Redactor::new(&redact),
        err_sink,
        None,
        live.clone(),
        false,
    ));

    let procs = Arc::new(Mutex::new(JobProcesses {
        child_pid: child.pid().map(|p| p as i32),
        uid: child_spec.identity.map(|i| i.uid),
        seen: Default::default(),
    }));
    let (stop_tx, mut stop_rx) = watch::channel::<Option<StopReason>>(None);
    let hb_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(Heartbeat {
        deps: deps.clone(),
        job: job.clone(),
        attempt: input.attempt,
        live: live.clone(),
        visibility: input.visibility.clone(),
        stop: stop_tx,
        done: hb_stop.clone(),
        procs: procs.clone(),
        budget: spec.spec.max_budget_usd,
        spent_before: input.record.cost_usd,
        resumable: spec.resume_policy() == ResumePolicy::Auto,
        workspace: (prepared.ws.home.clone(), prepared.ws.work.clone()),
    }));

    // The child's deadline: the job's own time, or the invocation's end minus what the
    // finalize needs (the reserve, more when much is left to upload).
    let remaining_job = Duration::from_millis(
        (spec.timeout_seconds() * 1000).saturating_sub(input.record.runtime_ms),
    )
    .max(Duration::from_secs(1));
    let job_deadline = started + remaining_job;
    let deadline_now = || {
        let pending: u64 = probes.iter().map(BacklogProbe::pending).sum::<u64>()
            + live.checkpoint_bytes.load(Ordering::Relaxed);
        // A quarter more than the assumed throughput: archiving competes for the CPU.
        let upload = Duration::from_secs_f64(1.25 * pending as f64 / cfg.upload_bytes_per_second);
        let reserve = cfg
            .reserve
            .max(cfg.grace + super::finalize::FINAL_OVERHEAD + upload);
        job_deadline.min(
            input
                .invocation_deadline
                .checked_sub(reserve)
                .unwrap_or(started),
        )
    };
    let mut child_deadline = deadline_now();
    let mut recompute = tokio::time::interval(Duration::from_secs(1));
    recompute.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut stop_reason = None;
    let ended: std::io::Result<Ended> = loop {
        tokio::select! {
            r = child.wait() => break r,
            _ = tokio::time::sleep_until(child_deadline) => {
                stop_reason = Some(StopReason::Deadline);
                break child.stop(cfg.grace).await;
            }
            _ = input.shutdown.cancelled() => {
                stop_reason = Some(StopReason::Shutdown);
                break child.stop(cfg.grace).await;
            }
            r = stop_rx.changed() => {
                let reason = *stop_rx.borrow();
                match (r, reason) {
                    (Ok(()), Some(reason)) => {
                        stop_reason = Some(reason);
                        break child.stop(cfg.grace).await;
                    }
                    (Ok(()), None) => {}
                    // The heartbeat ended (lease lost was already sent): keep waiting.
                    (Err(_), _) => std::future::pending::<()>().await,
                }
            }
            _ = recompute.tick() => child_deadline = deadline_now(),
        }
    };
    let child_ended = Instant::now();
    let ended = ended.unwrap_or(Ended {
        code: None,
        signal: None,
        killed: false,
    });

    // Nothing of the job survives it: the group, descendants, its uid, adopted orphans.
    let job_procs = procs.lock().map(|p| p.clone()).unwrap_or_default();
    let include_orphans = running.others() == 0;
    let report = tokio::task::spawn_blocking(move || isolation::sweep(&job_procs, include_orphans))
        .await
        .unwrap_or_default();
    if report.killed > 0 {
        tracing::warn!(%job, killed = report.killed, "killed processes the job left behind");
    }
    drop(child);

    // Readers end at EOF now that every writer is gone; do not wait forever regardless.
    let mut out_sinks = (None, None, None);
    for (i, r) in [out_reader, err_reader].into_iter().enumerate() {
        let abort = r.abort_handle();
        match tokio::time::timeout(Duration::from_secs(2), r).await {
            Ok(Ok((sink, events))) => {
                if i == 0 {
                    out_sinks.0 = Some(sink);
                    out_sinks.2 = events;
                } else {
                    out_sinks.1 = Some(sink);
                }
            }
            _ => abort.abort(),
        }
    }
    // Stop heartbeats before anything final (a heartbeat after the ack would fail).
    hb_stop.cancel();
    let _ = heartbeat.await;

    let progress = live.progress.lock().map(|p| p.clone()).unwrap_or_default();
    let signal = live.signal.lock().ok().and_then(|s| *s);
    let mut streams = Vec::new();
    for (stream, h) in handles {
        let sink = match stream {
            Stream::Stdout => out_sinks.0.take(),
            Stream::Stderr => out_sinks.1.take(),
            Stream::Events => out_sinks.2.take(),
        };
        streams.push((stream, sink, h));
    }
    Ok(Supervised {
        ended,
        stop: stop_reason,
        progress,
        signal,
        child_started,
        child_ended,
        child_deadline,
        streams,
        killed_leftovers: report.killed,
    })
}

/// Reads a pipe in chunks, redacts, spills to the stream's file, and (stdout) folds JSON
/// lines into progress and the events stream. Every line is checked for CLI signals.
/// Returns the sinks at EOF.
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    mut pipe: R,
    mut redactor: Redactor,
    mut sink: StreamSink,
    mut events: Option<StreamSink>,
    live: Arc<Live>,
    is_stdout: bool,
) -> (StreamSink, Option<StreamSink>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::new();
    let mut overlong = false;
    let mut parser = EventStream::default();
    let mut handle_line = |line: &[u8], events_out: &mut Vec<u8>| {
        let signal = detect_signal(line, now_ms());
        if matches!(signal, Some(CliSignal::RateLimited { .. })) {
            live.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(s) = signal
            && let Ok(mut slot) = live.signal.lock()
        {
            // A resume failure explains the exit better than a later rate-limit mention.
            if !matches!(*slot, Some(CliSignal::ResumeFailed)) {
                *slot = Some(s);
            }
        }
        if is_stdout
            && let Ok(mut p) = live.progress.lock()
            && parser.observe(&mut p, line)
        {
            events_out.extend_from_slice(line);
            if !line.ends_with(b"\n") {
                events_out.push(b'\n');
            }
        }
    };
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let clean = if n == 0 {
            redactor.finish()
        } else {
            redactor.push(&buf[..n])
        };
        if !clean.is_empty() {
            if let Ok(mut p) = live.progress.lock() {
                if is_stdout {
                    p.stdout_bytes += clean.len() as u64;
                } else {
                    p.stderr_bytes += clean.len() as u64;
                }
            }
            let mut events_out: Vec<u8> = Vec::new();
            for chunk in clean.split_inclusive(|b| *b == b'\n') {
                if line.len() + chunk.len() > MAX_EVENT_LINE {
                    overlong = true;
                    line.clear();
                } else {
                    line.extend_from_slice(chunk);
                }
                if chunk.ends_with(b"\n") {
                    if !overlong {
                        handle_line(&line, &mut events_out);
                    }
                    line.clear();
                    overlong = false;
                }
            }
            if let Some(ev) = events.as_mut() {
                ev.write(&events_out).await;
            }
            sink.write(&clean).await;
        }
        if n == 0 {
            break;
        }
    }
    if !line.is_empty() && !overlong {
        let mut events_out = Vec::new();
        handle_line(&line, &mut events_out);
        if let Some(ev) = events.as_mut() {
            ev.write(&events_out).await;
        }
    }
    (sink, events)
}

struct Heartbeat {
    deps: Arc<Deps>,
    job: agentq_core::JobId,
    attempt: Attempt,
    live: Arc<Live>,
    visibility: Option<VisibilityLease>,
    stop: watch::Sender<Option<StopReason>>,
    done: CancellationToken,
    procs: Arc<Mutex<JobProcesses>>,
    budget: Option<f64>,
    spent_before: f64,
    resumable: bool,
    workspace: (std::path::PathBuf, std::path::PathBuf),
}

async fn heartbeat_loop(h: Heartbeat) {
    let deps = &h.deps;
    let mut tick = tokio::time::interval(deps.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut beats = 0u64;
    loop {
        tokio::select! {
            _ = h.done.cancelled() => return,
            _ = tick.tick() => {}
        }
        beats += 1;
        if h.live.rate_limited.load(Ordering::Relaxed) >= RATE_LIMIT_STOP_AFTER {
            tracing::warn!(job = %h.job, "the model API keeps rate-limiting; stopping the child to pause the job");
            let _ = h.stop.send(Some(StopReason::RateLimited));
        }
        let snapshot = h
            .live
            .progress
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        if let Some(b) = h.budget
            && h.spent_before + snapshot.cost_usd >= b
        {
            tracing::warn!(job = %h.job, spent = h.spent_before + snapshot.cost_usd, budget = b, "spend cap reached; stopping the child");
            let _ = h.stop.send(Some(StopReason::Budget));
        }
        match deps
            .store
            .heartbeat(&h.job, h.attempt, &snapshot, now_ms())
            .await
        {
            Ok(ack) if ack.cancel_requested => {
                tracing::info!(job = %h.job, attempt = %h.attempt, "cancel requested; stopping the child");
                let _ = h.stop.send(Some(StopReason::Cancelled));
            }
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                tracing::warn!(job = %h.job, attempt = %h.attempt, "lease lost to another attempt; stopping the child");
                let _ = h.stop.send(Some(StopReason::LeaseLost));
                return;
            }
            Err(e) => {
                tracing::warn!(job = %h.job, attempt = %h.attempt, error = %e, retryable = e.is_retryable(), "heartbeat failed")
            }
        }
        if let Some(v) = &h.visibility
            && let Err(e) = deps
                .clients
                .sqs
                .change_message_visibility()
                .queue_url(&v.queue_url)
                .receipt_handle(&v.receipt_handle)
                .visibility_timeout(deps.config.visibility_horizon as i32)
                .send()
                .await
        {
            tracing::warn!(job = %h.job, error = %agentq_core::aws::display(&e), "visibility extension failed");
        }
        // Processes: remember the child's descendants (so escapees are known), reap
        // adopted orphans; every few beats, how big a checkpoint would be now.
        let procs = h.procs.clone();
        let size_of = (h.resumable && snapshot.session_id.is_some() && beats % 5 == 1)
            .then(|| h.workspace.clone());
        let measured = tokio::task::spawn_blocking(move || {
            if let Ok(mut p) = procs.lock() {
                p.observe();
            }
            isolation::reap_orphans();
            size_of.map(|(home, work)| crate::workspace::tree_bytes(&[home, work]))
        })
        .await
        .ok()
        .flatten();
        if let Some(b) = measured {
            h.live.checkpoint_bytes.store(b, Ordering::Relaxed);
        }
    }
}
