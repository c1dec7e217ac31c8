//! The `agentq` binary end to end against the AWS emulator: each test creates its own
//! queue, table and bucket, runs the real binary in a temp dir, and checks what landed in
//! SQS, DynamoDB and S3 (and what an independent reader makes of it).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use agentq_core::layout::{Layout, Stream, msg_attr};
use agentq_core::payload::{PayloadPointer, SIZE_ATTRIBUTE, resolve_body};
use agentq_core::record::now_ms;
use agentq_core::store::{ClaimOutcome, ClaimRequest, Finish};
use agentq_core::{Attempt, FailureCause, JobId, JobSpec, JobState, JobStore, Progress};
use agentq_testkit::{Resources, resources};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// What a run of the binary left behind.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn command(r: &Resources, dir: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq"));
    // Only this test's resources: nothing from the caller's AGENTQ_* environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("AGENTQ_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(r.env())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finish(cmd: &mut tokio::process::Command, stdin: Option<&[u8]>) -> Out {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn agentq");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(data).await.expect("write stdin");
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("agentq did not finish within 120 s")
        .expect("agentq output");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn agentq(r: &Resources, dir: &Path, args: &[&str]) -> Out {
    finish(&mut command(r, dir, args), None).await
}

fn spec_line(id: Option<&str>, extra: &str) -> String {
    let id = id
        .map(|i| format!(r#""job_id":"{i}","#))
        .unwrap_or_default();
    format!(r#"{{"spec_version":1,{id}"agent":"command","command":["echo","hi"]{extra}}}"#)
}

fn store(r: &Resources) -> JobStore {
    JobStore::new(r.clients().dynamodb, &r.table)
}

/// Receives everything (with message attributes), deleting it.
async fn receive_all(r: &Resources, queue_url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    let sqs = r.clients().sqs;
    let mut all = Vec::new();
    loop {
        let got = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .message_attribute_names("All")
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .wait_time_seconds(0)
            .send()
            .await
            .expect("receive");
        let msgs = got.messages.unwrap_or_default();
        if msgs.is_empty() {
            return all;
        }
        for m in &msgs {
            sqs.delete_message()
                .queue_url(queue_url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await
                .expect("delete");
        }
        all.extend(msgs);
    }
}

fn attr<'a>(m: &'a aws_sdk_sqs::types::Message, name: &str) -> Option<&'a str> {
    m.message_attributes()
        .and_then(|a| a.get(name))
        .and_then(|v| v.string_value())
}

#[tokio::test]
async fn submit_writes_a_queued_record_then_the_message() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_line(Some("first-job"), r#","labels":{"team":"a"}"#);
    std::fs::write(dir.path().join("spec.json"), &spec).unwrap();

    let out = agentq(&r, dir.path(), &["submit", "spec.json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "first-job");
    assert!(out.stderr.contains("submitted job first-job"), "{out:?}");

    let rec = store(&r)
        .require(&JobId::parse("first-job").unwrap())
        .await
        .unwrap();
    assert_eq!(rec.status, JobState::Queued);
    assert_eq!(rec.labels.get("team").map(String::as_str), Some("a"));

    let msgs = receive_all(&r, &r.queue_url).await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(attr(m, msg_attr::JOB_ID), Some("first-job"));
    assert_eq!(attr(m, SIZE_ATTRIBUTE), None);
    let sent = JobSpec::from_json(m.body().unwrap().as_bytes()).unwrap();
    let mut expected = JobSpec::from_json(spec.as_bytes()).unwrap();
    expected.job_id = Some("first-job".into());
    assert_eq!(sent, expected);

    // The record and the status command agree.
    let out = agentq(&r, dir.path(), &["status", "first-job", "--output", "json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    assert_eq!(v["status"], "QUEUED");
    assert_eq!(v["attempt"], 0);
    assert_eq!(v["labels"]["team"], "a");
    assert!(v["created_at"]["rfc3339"].as_str().unwrap().ends_with('Z'));
    let out = agentq(&r, dir.path(), &["status", "first-job"]).await;
    assert!(out.stdout.contains("status     QUEUED"), "{}", out.stdout);
}

#[tokio::test]
async fn bulk_submit_of_500_specs_loses_and_doubles_nothing() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    // Half with ids, half generated; a blank line is skipped.
    let mut lines: Vec<String> = (0..500)
        .map(|i| {
            if i % 2 == 0 {
                spec_line(Some(&format!("bulk-{i}")), "")
            } else {
                spec_line(None, &format!(r#","labels":{{"n":"{i}"}}"#))
            }
        })
        .collect();
    lines.insert(250, String::new());
    std::fs::write(dir.path().join("jobs.jsonl"), lines.join("\n")).unwrap();

    let out = agentq(
        &r,
        dir.path(),
        &["submit", "--batch", "jobs.jsonl", "--output", "json"],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = out.json();
    assert_eq!(v["total"], 500);
    assert_eq!(v["submitted"], 500);
    assert_eq!(v["failed"], 0);
    let reported: BTreeSet<String> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            assert_eq!(j["ok"], true);
            j["job_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(reported.len(), 500);
    assert_eq!(
        v["jobs"][250]["line"], 252,
        "line numbers count the blank line"
    );

    let msgs = receive_all(&r, &r.queue_url).await;
    assert_eq!(msgs.len(), 500, "exactly one message per job");
    let on_queue: BTreeSet<String> = msgs
        .iter()
        .map(|m| {
            let spec = JobSpec::from_json(m.body().unwrap().as_bytes()).unwrap();
            let id = spec.job_id.unwrap();
            assert_eq!(attr(m, msg_attr::JOB_ID), Some(id.as_str()));
            id
        })
        .collect();
    assert_eq!(on_queue, reported);

    let recs = store(&r).list(&[JobState::Queued], 1000).await.unwrap();
    let recorded: BTreeSet<String> = recs.iter().map(|r| r.job_id.to_string()).collect();
    assert_eq!(recs.len(), 500);
    assert_eq!(recorded, reported);
}

#[tokio::test]
async fn duplicate_job_id_is_refused_and_sends_nothing() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spec.json"), spec_line(None, "")).unwrap();
    let args = ["submit", "spec.json", "--job-id", "dup-1"];
    assert_eq!(agentq(&r, dir.path(), &args).await.code, 0);
    let out = agentq(&r, dir.path(), &args).await;
    assert_eq!(out.code, 6, "{out:?}");
    assert!(
        out.stderr.contains("job dup-1 already exists in table"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
    let out = agentq(&r, dir.path(), &[&args[..], &["--output", "json"]].concat()).await;
    assert_eq!(out.code, 6);
    assert_eq!(out.json()["error"]["exit_code"], 6);
    assert_eq!(r.drain(&r.queue_url).await.len(), 1);

    // In a batch: the other jobs go through, the duplicate is reported by line.
    let lines = [spec_line(Some("dup-2"), ""), spec_line(Some("dup-1"), "")].join("\n");
    std::fs::write(dir.path().join("b.jsonl"), lines).unwrap();
    let out = agentq(&r, dir.path(), &["submit", "--batch", "b.jsonl"]).await;
    assert_eq!(out.code, 6, "{out:?}");
    assert_eq!(out.stdout.trim(), "dup-2");
    assert!(
        out.stderr.contains("b.jsonl line 2 (job dup-1)"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("1 of 2 jobs were not submitted"));
    assert_eq!(r.drain(&r.queue_url).await.len(), 1);
}

/// Runs the Python reader (Extended Client library when installed, else boto3).
async fn python_reader(r: &Resources) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extended_reader.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .envs(r.env())
        .env("QUEUE_URL", &r.queue_url)
        .env("BUCKET", &r.bucket)
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reader output")
}

async fn check_offloaded(r: &Resources, id: &str, spec_len_at_least: usize) {
    // (a) the agent's resolver, on a received copy that we put back for (b).
    let sqs = r.clients().sqs;
    let got = sqs
        .receive_message()
        .queue_url(&r.queue_url)
        .message_attribute_names("All")
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let m = &got.messages()[0];
    let body = m.body().unwrap();
    let ptr = PayloadPointer::parse(body).expect("body is an Extended Client pointer");
    assert_eq!(ptr.bucket, r.bucket);
    assert_eq!(ptr.key, Layout::new(&r.prefix).payload(id));
    let size: usize = attr(m, SIZE_ATTRIBUTE).unwrap().parse().unwrap();
    assert!(size >= spec_len_at_least, "{size}");
    assert_eq!(
        m.message_attributes().unwrap()[SIZE_ATTRIBUTE].data_type(),
        "Number"
    );
    assert_eq!(attr(m, msg_attr::JOB_ID), Some(id));
    let resolved = resolve_body(&r.clients().s3, body).await.unwrap();
    assert_eq!(resolved.len(), size);
    let spec = JobSpec::from_json(resolved.as_bytes()).unwrap();
    assert_eq!(spec.job_id.as_deref(), Some(id));
    sqs.change_message_visibility()
        .queue_url(&r.queue_url)
        .receipt_handle(m.receipt_handle().unwrap())
        .visibility_timeout(0)
        .send()
        .await
        .unwrap();

    // (b) an independent reader in another language.
    let v = python_reader(r).await;
    eprintln!("python reader: {}", v["reader"]);
    assert_eq!(v["body"].as_str().unwrap(), resolved);
}

#[tokio::test]
async fn spec_over_the_threshold_goes_through_s3_as_an_extended_client_pointer() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    let prompt = "p".repeat(5000);
    let spec = format!(
        r#"{{"spec_version":1,"job_id":"big-1","agent":"claude-code","prompt":"{prompt}"}}"#
    );
    std::fs::write(dir.path().join("spec.json"), &spec).unwrap();
    let mut cmd = command(&r, dir.path(), &["submit", "spec.json", "--output", "json"]);
    cmd.env("AGENTQ_OFFLOAD_THRESHOLD", "1000");
    let out = finish(&mut cmd, None).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    assert_eq!(v["offloaded"]["bucket"], r.bucket.as_str());
    check_offloaded(&r, "big-1", 5000).await;

    // Below the threshold: inline.
    let out = agentq(
        &r,
        dir.path(),
        &[
            "submit",
            "spec.json",
            "--job-id",
            "big-2",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["offloaded"], Value::Null);
}

#[tokio::test]
async fn a_real_spec_over_256_kib_is_offloaded_by_default() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    let prompt = "word ".repeat(300 * 1024 / 5);
    let spec =
        format!(r#"{{"spec_version":1,"job_id":"huge-1","agent":"codex","prompt":"{prompt}"}}"#);
    assert!(spec.len() > 256 * 1024);
    // Through stdin, in a batch of one.
    let mut cmd = command(&r, dir.path(), &["submit", "--batch", "-"]);
    let out = finish(&mut cmd, Some(spec.as_bytes())).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("(1 through S3)"), "{}", out.stderr);
    check_offloaded(&r, "huge-1", 300 * 1024).await;

    // Too large for the job record (a DynamoDB item holds 400 KB), even with the offload
    // threshold raised above it: stored in S3, and the record keeps the pointer.
    let prompt = "w".repeat(395_000);
    let spec =
        format!(r#"{{"spec_version":1,"job_id":"huge-2","agent":"codex","prompt":"{prompt}"}}"#);
    let mut cmd = command(&r, dir.path(), &["submit", "-", "--output", "json"]);
    cmd.env("AGENTQ_OFFLOAD_THRESHOLD", "1000000");
    let out = finish(&mut cmd, Some(spec.as_bytes())).await;
    assert_eq!(out.code, 0, "{out:?}");
    let offloaded = &out.json()["offloaded"];
    let rec = store(&r)
        .require(&JobId::parse("huge-2").unwrap())
        .await
        .unwrap();
    let kept = PayloadPointer::parse(rec.spec.as_deref().unwrap()).expect("a pointer");
    assert_eq!(offloaded["key"], kept.key.as_str());
    assert_eq!(offloaded["size"], spec.len());
    // huge-1 (just over 300 KiB) too; the 5 KB big-1 of the test above keeps its spec.
    let rec = store(&r)
        .require(&JobId::parse("huge-1").unwrap())
        .await
        .unwrap();
    assert!(PayloadPointer::parse(rec.spec.as_deref().unwrap()).is_some());
    // (huge-1 is in flight with the Python reader; only huge-2 became visible.)
    assert_eq!(r.drain(&r.queue_url).await.len(), 1);
}

#[tokio::test]
async fn cancel_of_a_queued_job_cancels_it_for_good() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    let out = agentq(
        &r,
        dir.path(),
        &["submit", "--job-id", "c-1", "--", "sleep", "60"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = agentq(&r, dir.path(), &["cancel", "c-1"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("cancelled: it had not started"),
        "{}",
        out.stdout
    );
    let rec = store(&r)
        .require(&JobId::parse("c-1").unwrap())
        .await
        .unwrap();
    assert_eq!(rec.status, JobState::Cancelled);
    assert_eq!(rec.history.last().unwrap().by, "producer");
    // An agent claiming the message now finds it finished and never runs it.
    let claim = store(&r)
        .claim(&ClaimRequest {
            job_id: &rec.job_id,
            spec_json: "{}",
            tier: None,
            labels: &Default::default(),
            owner: "agent",
            stale_after_ms: 1000,
            now: now_ms(),
            layout: &Layout::default(),
        })
        .await
        .unwrap();
    assert_eq!(
        claim,
        ClaimOutcome::Finished {
            status: JobState::Cancelled
        }
    );
    let out = agentq(&r, dir.path(), &["cancel", "c-1", "--output", "json"]).await;
    assert_eq!(out.code, 0);
    let v = out.json();
    assert_eq!(v["outcome"], "already_finished");
    assert_eq!(v["status"], "CANCELLED");
    // watch on a cancelled job: finished unsuccessfully.
    let out = agentq(&r, dir.path(), &["watch", "c-1"]).await;
    assert_eq!(out.code, 4, "{out:?}");
}

#[tokio::test]
async fn list_filters_by_status() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    for id in ["l-1", "l-2", "l-3"] {
        let out = agentq(
            &r,
            dir.path(),
            &["submit", "--job-id", id, "--label", "k=v", "--", "true"],
        )
        .await;
        assert_eq!(out.code, 0, "{out:?}");
    }
    assert_eq!(agentq(&r, dir.path(), &["cancel", "l-2"]).await.code, 0);

    let out = agentq(
        &r,
        dir.path(),
        &["list", "--status", "cancelled", "--output", "json"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let rows = out.json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["job_id"], "l-2");
    assert_eq!(rows[0]["status"], "CANCELLED");

    let out = agentq(
        &r,
        dir.path(),
        &["list", "--status", "QUEUED", "--output", "json"],
    )
    .await;
    let ids: BTreeSet<String> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, BTreeSet::from(["l-1".to_owned(), "l-3".to_owned()]));

    let out = agentq(
        &r,
        dir.path(),
        &["list", "--status", "QUEUED,CANCELLED", "--limit", "2"],
    )
    .await;
    assert_eq!(out.code, 0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("JOB_ID"), "{}", out.stdout);
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(out.stdout.contains("k=v"));

    let out = agentq(&r, dir.path(), &["list", "--output", "json"]).await;
    assert_eq!(out.json().as_array().unwrap().len(), 3);
}

/// Claims a job as an agent would, returning its attempt.
async fn claim(r: &Resources, id: &str) -> Attempt {
    let job = JobId::parse(id).unwrap();
    match store(r)
        .claim(&ClaimRequest {
            job_id: &job,
            spec_json: &spec_line(Some(id), ""),
            tier: None,
            labels: &Default::default(),
            owner: "test-agent",
            stale_after_ms: 60_000,
            now: now_ms(),
            layout: &Layout::new(&r.prefix),
        })
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed { attempt, .. } => attempt,
        other => panic!("{other:?}"),
    }
}

async fn end(r: &Resources, id: &str, attempt: Attempt, state: JobState) {
    let cause = (state != JobState::Succeeded).then_some(FailureCause::AgentExit {
        code: Some(3),
        signal: None,
    });
    store(r)
        .finish(
            &JobId::parse(id).unwrap(),
            attempt,
            &Finish {
                state,
                cause,
                reason: format!("test says {state}"),
                exit_code: Some(if state == JobState::Succeeded { 0 } else { 3 }),
                signal: None,
                result_key: None,
                progress: Progress {
                    turns: 2,
                    ..Default::default()
                },
                runtime_ms: 1500,
            },
            now_ms(),
        )
        .await
        .unwrap();
}

async fn put_segment(
    r: &Resources,
    id: &str,
    attempt: Attempt,
    stream: Stream,
    seq: u32,
    text: &str,
) {
    let key = Layout::new(&r.prefix).segment(&JobId::parse(id).unwrap(), attempt, stream, seq);
    r.clients()
        .s3
        .put_object()
        .bucket(&r.bucket)
        .key(key)
        .body(text.as_bytes().to_vec().into())
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn logs_status_and_watch_of_a_job_that_ran() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        agentq(
            &r,
            dir.path(),
            &["submit", "--job-id", "ran-1", "--", "true"]
        )
        .await
        .code,
        0
    );

    // Not started: no logs yet, and that is not an error.
    let out = agentq(&r, dir.path(), &["logs", "ran-1"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("has not started yet"), "{}", out.stderr);

    let a = claim(&r, "ran-1").await;
    for (seq, text) in [(0, "one\n"), (1, "two\n"), (2, "three\n")] {
        put_segment(&r, "ran-1", a, Stream::Stdout, seq, text).await;
    }
    put_segment(&r, "ran-1", a, Stream::Stderr, 0, "warn\n").await;
    end(&r, "ran-1", a, JobState::Succeeded).await;

    let out = agentq(&r, dir.path(), &["logs", "ran-1"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "one\ntwo\nthree\n");
    let out = agentq(
        &r,
        dir.path(),
        &["logs", "ran-1", "--stream", "stderr", "--attempt", "1"],
    )
    .await;
    assert_eq!(out.stdout, "warn\n");
    let out = agentq(&r, dir.path(), &["logs", "ran-1", "--output", "json"]).await;
    let segs = out.json_lines();
    assert_eq!(segs.len(), 3);
    assert_eq!(segs[1]["text"], "two\n");
    assert_eq!(segs[1]["attempt"], 1);
    // Following a finished job prints everything and ends.
    let out = agentq(
        &r,
        dir.path(),
        &["logs", "ran-1", "-f", "--interval", "100ms"],
    )
    .await;
    assert_eq!(out.stdout, "one\ntwo\nthree\n");

    let out = agentq(&r, dir.path(), &["status", "ran-1", "--output", "json"]).await;
    let v = out.json();
    assert_eq!(v["status"], "SUCCEEDED");
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["progress"]["turns"], 2);
    let logs = format!("s3://{}/{}/jobs/ran-1/attempt-1/", r.bucket, r.prefix);
    assert_eq!(v["logs"], logs.as_str());
    assert_eq!(v["attempts"][0]["logs"], logs.as_str());
    assert!(v["durations"]["running_ms"].as_i64().is_some());
    let out = agentq(&r, dir.path(), &["status", "ran-1"]).await;
    assert!(out.stdout.contains(&logs), "{}", out.stdout);
    assert!(out.stdout.contains("exit       code 0"), "{}", out.stdout);

    let out = agentq(&r, dir.path(), &["watch", "ran-1", "--output", "json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json_lines().last().unwrap()["status"], "SUCCEEDED");
}

#[tokio::test]
async fn logs_follow_streams_new_segments_until_the_job_finishes() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        agentq(&r, dir.path(), &["submit", "--job-id", "f-1", "--", "true"])
            .await
            .code,
        0
    );
    // Started before the job runs: waits for the first attempt.
    let follower = command(
        &r,
        dir.path(),
        &["logs", "f-1", "--follow", "--interval", "100ms"],
    )
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = claim(&r, "f-1").await;
    for seq in 0..3 {
        put_segment(&r, "f-1", a, Stream::Stdout, seq, &format!("line {seq}\n")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    put_segment(&r, "f-1", a, Stream::Stdout, 3, "last\n").await;
    end(&r, "f-1", a, JobState::Failed).await;
    let out = tokio::time::timeout(Duration::from_secs(30), follower.wait_with_output())
        .await
        .expect("follow ends once the job is finished")
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line 0\nline 1\nline 2\nlast\n"
    );
}

#[tokio::test]
async fn submit_wait_exits_with_the_jobs_outcome() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    let waiter = command(
        &r,
        dir.path(),
        &[
            "submit",
            "--job-id",
            "w-1",
            "--wait",
            "--interval",
            "100ms",
            "--output",
            "json",
            "--",
            "false",
        ],
    )
    .spawn()
    .unwrap();
    // Wait for the record, then play the agent.
    let job = JobId::parse("w-1").unwrap();
    for _ in 0..100 {
        if store(&r).get(&job).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = claim(&r, "w-1").await;
    end(&r, "w-1", a, JobState::Failed).await;
    let out = tokio::time::timeout(Duration::from_secs(30), waiter.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["submission"]["job_id"], "w-1");
    assert_eq!(v["final"]["status"], "FAILED");
    assert_eq!(v["final"]["cause"], "agent_exit");
}

#[tokio::test]
async fn fifo_queues_get_group_and_deduplication_ids() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    let sqs = r.clients().sqs;
    let fifo = agentq_testkit::create_queue(
        &sqs,
        &format!("{}.fifo", agentq_testkit::unique("aq-fifo")),
        &[(
            aws_sdk_sqs::types::QueueAttributeName::FifoQueue,
            "true".into(),
        )],
    )
    .await;
    let lines = [
        spec_line(Some("g-1"), r#","labels":{"group":"team-a"}"#),
        spec_line(Some("g-2"), ""),
    ]
    .join("\n");
    std::fs::write(dir.path().join("b.jsonl"), lines).unwrap();
    let out = agentq(
        &r,
        dir.path(),
        &["--queue-url", &fifo, "submit", "--batch", "b.jsonl"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let msgs = receive_all(&r, &fifo).await;
    let groups: HashMap<String, String> = msgs
        .iter()
        .map(|m| {
            let sys = m.attributes().unwrap();
            (
                attr(m, msg_attr::JOB_ID).unwrap().to_owned(),
                sys[&aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId].clone(),
            )
        })
        .collect();
    assert_eq!(groups["g-1"], "team-a");
    assert_eq!(groups["g-2"], "g-2");

    let out = agentq(
        &r,
        dir.path(),
        &["--queue-url", &fifo, "submit", "--delay", "5", "--", "true"],
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("FIFO"), "{}", out.stderr);
}

#[tokio::test]
async fn a_failed_send_removes_the_record_so_a_retry_works() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("{}/000000000000/no-such-queue", r.endpoint);
    let out = agentq(
        &r,
        dir.path(),
        &[
            "--queue-url",
            &missing,
            "submit",
            "--job-id",
            "s-1",
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("job s-1: sending to"), "{}", out.stderr);
    assert!(
        out.stderr.contains("submitting the same spec is safe"),
        "{}",
        out.stderr
    );
    let out = agentq(&r, dir.path(), &["status", "s-1"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("job s-1 not found"));
    let out = agentq(&r, dir.path(), &["submit", "--job-id", "s-1", "--", "true"]).await;
    assert_eq!(out.code, 0, "{out:?}");
}

#[tokio::test]
async fn bad_input_names_the_field_or_setting() {
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // A spec missing its prompt, and one with an unknown field.
    std::fs::write(
        d.join("bad.json"),
        r#"{"spec_version":1,"agent":"claude-code"}"#,
    )
    .unwrap();
    let out = agentq(&r, d, &["submit", "bad.json"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("bad.json: job spec is not valid: prompt: required"),
        "{}",
        out.stderr
    );
    let out = agentq(&r, d, &["submit", "bad.json", "--output", "json"]).await;
    assert_eq!(out.code, 2);
    let v = out.json();
    assert_eq!(v["error"]["violations"][0]["field"], "prompt");
    assert_eq!(v["error"]["retryable"], false);
    std::fs::write(d.join("odd.json"), spec_line(None, r#","priority":3"#)).unwrap();
    let out = agentq(&r, d, &["submit", "odd.json"]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("priority: unknown field"),
        "{}",
        out.stderr
    );
    let out = agentq(&r, d, &["submit", "missing.json"]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("cannot read spec file missing.json"),
        "{}",
        out.stderr
    );

    // Quick jobs are validated the same way.
    let out = agentq(&r, d, &["submit", "--preset", "codex"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("prompt: required"), "{}", out.stderr);
    let out = agentq(&r, d, &["submit", "--job-id", "../etc", "--", "true"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("job_id"), "{}", out.stderr);

    // A batch with bad lines submits nothing and names each line and field.
    let lines = [
        spec_line(None, ""),
        r#"{"spec_version":1,"agent":"command"}"#.to_owned(),
        "not json".to_owned(),
        spec_line(None, r#","env":{"PATH":"/x"}"#),
        r#"{"spec_version":1,"agent":"command","command":"not-an-array"}"#.to_owned(),
    ]
    .join("\n");
    std::fs::write(d.join("b.jsonl"), lines).unwrap();
    let out = agentq(&r, d, &["submit", "--batch", "b.jsonl", "--output", "json"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("4 of 5 specs are not valid; nothing was submitted"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("line 2: job spec is not valid: command: required"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("line 4: job spec is not valid: env.PATH"),
        "{}",
        out.stderr
    );
    let fields: Vec<String> = out.json()["error"]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            format!(
                "{} {}",
                v["origin"].as_str().unwrap(),
                v["field"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            "b.jsonl line 2 command",
            "b.jsonl line 3 (spec)",
            "b.jsonl line 4 env.PATH",
            "b.jsonl line 5 command"
        ]
    );
    assert!(r.drain(&r.queue_url).await.is_empty());

    // Missing settings name the variable.
    let mut cmd = command(&r, d, &["submit", "--", "true"]);
    cmd.env_remove("AGENTQ_QUEUE_URL");
    let out = finish(&mut cmd, None).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("AGENTQ_QUEUE_URL") && out.stderr.contains("--queue-url"),
        "{}",
        out.stderr
    );
    let mut cmd = command(&r, d, &["status", "x", "--output", "json"]);
    cmd.env_remove("AGENTQ_TABLE");
    let out = finish(&mut cmd, None).await;
    assert_eq!(out.code, 2);
    assert!(
        out.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("AGENTQ_TABLE")
    );

    // Bad flags.
    let out = agentq(&r, d, &["list", "--status", "DONE"]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("--status") && out.stderr.contains("unknown job state \"DONE\""),
        "{}",
        out.stderr
    );
    let out = agentq(&r, d, &["list", "--status", "DONE", "--output", "json"]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--status")
    );
    let out = agentq(&r, d, &["submit", "--delay", "20m", "--", "true"]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("--delay") && out.stderr.contains("900"),
        "{}",
        out.stderr
    );
    let out = agentq(&r, d, &["status", "a/b"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("job_id contains '/'"), "{}", out.stderr);
    let out = agentq(&r, d, &["status", "nobody", "--output", "json"]).await;
    assert_eq!(out.code, 3);
    assert_eq!(out.json()["error"]["exit_code"], 3);
    let out = agentq(&r, d, &["submit"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("nothing to submit"), "{}", out.stderr);
    let out = agentq(&r, d, &["--help"]).await;
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains(agentq_core::exit::HELP));
}

/// Regression: `agentq logs JOB | head` exited 1 ("writing output failed: Broken pipe").
#[tokio::test]
async fn logs_into_a_pipe_closed_early_exits_zero() {
    use tokio::io::AsyncReadExt;
    let r = resources().await;
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        agentq(
            &r,
            dir.path(),
            &["submit", "--job-id", "pipe-1", "--", "true"]
        )
        .await
        .code,
        0
    );
    let a = claim(&r, "pipe-1").await;
    let big = "x".repeat(1023) + "\n";
    put_segment(&r, "pipe-1", a, Stream::Stdout, 0, &big.repeat(4096)).await;
    end(&r, "pipe-1", a, JobState::Succeeded).await;
    let mut child = command(&r, dir.path(), &["logs", "pipe-1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).await.unwrap();
    drop(stdout);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
