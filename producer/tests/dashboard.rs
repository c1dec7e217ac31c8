//! `agentq dashboard` over HTTP against the AWS emulator. Most tests drive the router in
//! process (as a tower service, with real AWS calls behind it): pages and filters,
//! escaping of job text, the Host/token/origin guard, cancel, the live stream's log tail
//! as segments arrive, the failures page. One test runs the real binary.

use std::time::Duration;

use agentq_core::layout::{Layout, Stream};
use agentq_core::record::now_ms;
use agentq_core::store::{ClaimOutcome, ClaimRequest, Finish};
use agentq_core::{AgentPreset, Attempt, JobId, JobSpec, JobState, JobStore, Progress};
use agentq_producer::Producer;
use agentq_producer::dashboard::{Dashboard, DashboardOptions};
use agentq_testkit::{Resources, resources, unique};
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const HOST: &str = "127.0.0.1:7780";
const HOSTILE: &str = r#"<img src=x onerror="window.__xss=1">"#;

struct Env {
    r: Resources,
    producer: Producer,
    dash: Dashboard,
}

async fn env() -> Env {
    let r = resources().await;
    let producer = Producer::from_sdk(&r.sdk, r.settings());
    let dash = Dashboard::new(
        producer.clone(),
        DashboardOptions {
            refresh: Duration::from_millis(200),
            ..Default::default()
        },
        HOST.parse().unwrap(),
    )
    .unwrap();
    Env { r, producer, dash }
}

impl Env {
    fn store(&self) -> JobStore {
        JobStore::new(self.r.clients().dynamodb, &self.r.table)
    }

    async fn call(&self, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let resp = self.dash.router().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    async fn get(&self, uri: &str) -> (StatusCode, HeaderMap, String) {
        self.call(
            Request::get(uri)
                .header(header::HOST, HOST)
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    async fn submit(&self, id: &str, labels: &[(&str, &str)]) -> JobId {
        let mut spec = JobSpec::new(AgentPreset::Command);
        spec.job_id = Some(id.to_owned());
        spec.command = Some(vec!["echo".into(), "hi".into()]);
        spec.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.producer
            .submit_spec(spec, &Default::default())
            .await
            .unwrap()
            .job_id
    }

    async fn claim(&self, job: &JobId) -> Attempt {
        match self
            .store()
            .claim(&ClaimRequest {
                job_id: job,
                spec_json: "{}",
                tier: None,
                labels: &Default::default(),
                owner: "test-agent",
                stale_after_ms: 60_000,
                now: now_ms(),
                layout: &Layout::new(&self.r.prefix),
            })
            .await
            .unwrap()
        {
            ClaimOutcome::Claimed { attempt, .. } => attempt,
            other => panic!("{other:?}"),
        }
    }

    async fn put(&self, job: &JobId, attempt: Attempt, stream: Stream, seq: u32, text: &str) {
        agentq_core::config::s3_client(&self.r.sdk)
            .put_object()
            .bucket(&self.r.bucket)
            .key(Layout::new(&self.r.prefix).segment(job, attempt, stream, seq))
            .body(text.as_bytes().to_vec().into())
            .send()
            .await
            .unwrap();
    }
}

fn assert_escaped(page: &str) {
    assert!(!page.contains("<img"), "raw markup from a job: {page}");
    assert!(
        page.contains("&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;"),
        "the hostile text is shown escaped: {page}"
    );
}

#[tokio::test]
async fn list_shows_jobs_and_filters_them() {
    let e = env().await;
    let a = e.submit(&unique("dash-a"), &[("team", "a")]).await;
    let b = e.submit(&unique("dash-b"), &[("team", "b")]).await;

    let (status, headers, page) = e.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&format!(r#"href="/jobs/{a}""#)) && page.contains(b.as_str()));
    assert!(page.contains(r#"data-fragment="/fragments/jobs""#));
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");

    let (_, _, frag) = e.get("/fragments/jobs?label=team%3Da").await;
    assert!(
        frag.contains(a.as_str()) && !frag.contains(b.as_str()),
        "{frag}"
    );
    assert!(!frag.contains("<html"), "a fragment, not a page");
    let (_, _, frag) = e.get("/fragments/jobs?label=team").await;
    assert!(frag.contains(a.as_str()) && frag.contains(b.as_str()));
    let (_, _, frag) = e.get("/fragments/jobs?state=RUNNING,DEAD").await;
    assert!(!frag.contains(a.as_str()) && frag.contains("no jobs match"));
    let (_, _, frag) = e.get("/fragments/jobs?state=QUEUED&age=1h&limit=1").await;
    assert_eq!(frag.matches("<tr data-job=").count(), 1, "{frag}");

    let (status, _, page) = e.get("/?state=SLEEPING").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        page.contains("state: &quot;SLEEPING&quot; is not a job state"),
        "{page}"
    );
    let (status, _, _) = e.get("/jobs/..%2Fetc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, page) = e.get(&format!("/jobs/{}", unique("nope"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("not found"), "{page}");
}

#[tokio::test]
async fn job_text_is_escaped_on_every_page() {
    let e = env().await;
    let job = e.submit(&unique("dash-xss"), &[(HOSTILE, HOSTILE)]).await;
    let dead = JobId::parse(&unique("dash-dead")).unwrap();
    e.store()
        .record_invalid(&dead, HOSTILE, HOSTILE, now_ms())
        .await
        .unwrap();
    for uri in [
        "/".to_owned(),
        "/fragments/jobs".to_owned(),
        format!("/jobs/{job}"),
        format!("/jobs/{dead}"),
        "/failures".to_owned(),
        "/fragments/failures".to_owned(),
    ] {
        let (status, _, page) = e.get(&uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
        assert_escaped(&page);
    }
}

#[tokio::test]
async fn host_token_and_origin_guard_changes() {
    let e = env().await;
    let job = e.submit(&unique("dash-csrf"), &[]).await;
    let post = |headers: &[(&str, &str)], body: &str| {
        let mut b = Request::post(format!("/jobs/{job}/cancel"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let token = format!("token={}", e.dash.token());

    // A DNS-rebinding page reaches 127.0.0.1 under its own name: refused, even for GET.
    let (status, _, page) = e
        .call(
            Request::get("/")
                .header(header::HOST, "attacker.example:7780")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("--allow-host"));
    assert!(!page.contains(e.dash.token()));

    for (headers, body, why) in [
        (vec![("host", HOST)], String::new(), "no token"),
        (
            vec![("host", HOST)],
            "token=guess".to_owned(),
            "wrong token",
        ),
        (
            vec![("host", HOST), ("origin", "http://attacker.example")],
            token.clone(),
            "foreign origin",
        ),
        (
            vec![("host", HOST), ("sec-fetch-site", "cross-site")],
            token.clone(),
            "cross-site",
        ),
        (
            vec![("host", "attacker.example:7780")],
            token.clone(),
            "foreign host",
        ),
    ] {
        let (status, _, _) = e.call(post(&headers, &body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{why}");
        assert_eq!(
            e.producer.status(&job).await.unwrap().status,
            JobState::Queued,
            "{why}: nothing changed"
        );
    }

    let (status, headers, _) = e
        .call(post(
            &[
                ("host", HOST),
                ("origin", &format!("http://{HOST}")),
                ("sec-fetch-site", "same-origin"),
            ],
            &token,
        ))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        headers[header::LOCATION],
        format!("/jobs/{job}?cancel=cancelled").as_str()
    );
    let rec = e.producer.status(&job).await.unwrap();
    assert_eq!(rec.status, JobState::Cancelled);
    assert_eq!(rec.history.last().unwrap().action, "cancel");
    let (_, _, page) = e.get(&format!("/jobs/{job}?cancel=cancelled")).await;
    assert!(page.contains("will never run"));
    assert!(
        !page.contains(r#"id="cancel""#),
        "no cancel button on a finished job"
    );
}

/// Reads server-sent events from a response body until `want` says stop.
async fn read_events(
    body: &mut Body,
    want: &mut dyn FnMut(&str, &Value) -> bool,
    buf: &mut String,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = if v == "log" {
                        "log"
                    } else if v == "summary" {
                        "summary"
                    } else if v == "end" {
                        "end"
                    } else {
                        "other"
                    };
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&data).unwrap();
            if want(name, &v) {
                return;
            }
        }
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("the expected events within 20 s")
            .expect("stream open")
            .unwrap();
        if let Ok(chunk) = frame.into_data() {
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn live_stream_sends_new_segments_as_they_arrive() {
    let e = env().await;
    let job = e.submit(&unique("dash-live"), &[]).await;
    let attempt = e.claim(&job).await;
    e.put(&job, attempt, Stream::Stdout, 0, "first line\n")
        .await;
    e.put(
        &job,
        attempt,
        Stream::Events,
        0,
        "{\"type\":\"assistant\",\"message\":{\"usage\":{\"input_tokens\":100,\"output_tokens\":20}}}\n",
    )
    .await;

    let resp = e
        .dash
        .router()
        .oneshot(
            Request::get(format!("/jobs/{job}/live"))
                .header(header::HOST, HOST)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let mut buf = String::new();

    let mut summary = String::new();
    let mut logs: Vec<Value> = Vec::new();
    read_events(
        &mut body,
        &mut |name, v| {
            match name {
                "summary" => summary = v["html"].as_str().unwrap().to_owned(),
                "log" => logs.push(v.clone()),
                _ => {}
            }
            !summary.is_empty() && logs.len() >= 2
        },
        &mut buf,
    )
    .await;
    assert!(
        summary.contains("RUNNING") && summary.contains("<svg"),
        "{summary}"
    );
    assert!(
        summary.contains(r#"name="token""#),
        "a running job can be cancelled"
    );
    let stdout = logs.iter().find(|l| l["stream"] == "stdout").unwrap();
    assert_eq!(stdout["text"], "first line\n");
    assert_eq!(stdout["attempt"], 1);

    // A segment that arrives while the page is open, with text a browser must not run.
    e.put(&job, attempt, Stream::Stdout, 1, &format!("{HOSTILE}\n"))
        .await;
    let mut got = None;
    read_events(
        &mut body,
        &mut |name, v| {
            if name == "log" && v["stream"] == "stdout" {
                got = Some(v.clone());
                return true;
            }
            false
        },
        &mut buf,
    )
    .await;
    let got = got.unwrap();
    assert_eq!(got["seq"], 1);
    // Sent as data: the page inserts it as a text node.
    assert_eq!(got["text"], format!("{HOSTILE}\n"));

    // The job ends: a last summary, then `end`.
    e.store()
        .finish(
            &job,
            attempt,
            &Finish {
                state: JobState::Succeeded,
                cause: None,
                reason: HOSTILE.into(),
                exit_code: Some(0),
                signal: None,
                result_key: None,
                progress: Progress {
                    turns: 1,
                    input_tokens: 100,
                    output_tokens: 20,
                    ..Default::default()
                },
                runtime_ms: 10,
            },
            now_ms(),
        )
        .await
        .unwrap();
    let mut last_summary = String::new();
    read_events(
        &mut body,
        &mut |name, v| {
            if name == "summary" {
                last_summary = v["html"].as_str().unwrap().to_owned();
            }
            name == "end"
        },
        &mut buf,
    )
    .await;
    assert!(last_summary.contains("SUCCEEDED"), "{last_summary}");
    assert_escaped(&last_summary);

    // The whole log as plain text.
    let (status, headers, text) = e.get(&format!("/jobs/{job}/logs/1/stdout")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(text, format!("first line\n{HOSTILE}\n"));
}

#[tokio::test]
async fn a_reconnecting_page_resumes_after_its_last_event() {
    let e = env().await;
    let job = e.submit(&unique("dash-resume"), &[]).await;
    let attempt = e.claim(&job).await;
    for seq in 0..3 {
        e.put(&job, attempt, Stream::Stdout, seq, &format!("line {seq}\n"))
            .await;
    }
    let resp = e
        .dash
        .router()
        .oneshot(
            Request::get(format!("/jobs/{job}/live"))
                .header(header::HOST, HOST)
                .header("last-event-id", "1.1.-.-")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut texts = Vec::new();
    read_events(
        &mut body,
        &mut |name, v| {
            if name == "log" && v["stream"] == "stdout" {
                texts.push(v["text"].as_str().unwrap().to_owned());
            }
            !texts.is_empty()
        },
        &mut buf,
    )
    .await;
    assert_eq!(texts, ["line 2\n"], "segments 0 and 1 were seen before");
}

#[tokio::test]
async fn failures_page_shows_dlq_depth_without_consuming_it() {
    let e = env().await;
    let sqs = e.r.clients().sqs;
    for i in 0..2 {
        sqs.send_message()
            .queue_url(&e.r.dlq_url)
            .message_body(format!("{{\"n\":{i}}}"))
            .send()
            .await
            .unwrap();
    }
    let dead = JobId::parse(&unique("dash-dead")).unwrap();
    e.store()
        .record_invalid(&dead, "{}", "spec_version: missing", now_ms())
        .await
        .unwrap();
    for _ in 0..2 {
        let (status, _, page) = e.get("/failures").await;
        assert_eq!(status, StatusCode::OK);
        let dlq = page.split(r#"data-queue="dlq""#).nth(1).expect("a DLQ box");
        assert!(
            dlq.contains(r#"<span class="big">2</span> waiting"#),
            "{dlq}"
        );
        assert!(page.contains(dead.as_str()) && page.contains("spec_version: missing"));
    }
    assert_eq!(
        e.r.drain(&e.r.dlq_url).await.len(),
        2,
        "nothing was consumed"
    );
}

#[tokio::test]
async fn the_binary_serves_until_sigterm() {
    let r = resources().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq"))
        .envs(r.env())
        .args(["dashboard", "--listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the address within 30 s")
        .unwrap()
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("{line}"));
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    // A plain HTTP/1.1 request over TCP.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut resp)
        .await
        .unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("ok"),
        "{resp}"
    );

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("stopped within 15 s")
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // Bad settings are usage errors that name the flag.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq"))
        .envs(r.env())
        .args(["dashboard", "--listen", "127.0.0.1:0", "--refresh", "10ms"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--refresh"));
}
