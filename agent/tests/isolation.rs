//! Probe jobs for the threat model of a hostile child (docs/security.md): it cannot read
//! the agent's credentials, leaves nothing running after its job, dies with its agent,
//! cannot run under another job's id, and only reaches AWS through scoped credentials.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentq_core::{JobId, JobState, JobStore, Layout, Stream};
use agentq_testkit::{Resources, binary, resources};
use common::*;

fn agent_cmd(r: &Resources, work: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(binary("agentq-agent"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env("AGENTQ_CLAUDE_BIN", fake_agent())
        .env("AGENTQ_CODEX_BIN", fake_agent())
        .env("AGENTQ_WORK_ROOT", work)
        .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
        .env("AGENTQ_VISIBILITY_HORIZON_SECONDS", "3")
        .env("AGENTQ_STALE_AFTER_SECONDS", "3")
        .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
        .env("AGENTQ_KILL_GRACE_SECONDS", "1")
        .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn send(r: &Resources, body: &str) {
    aws_sdk_sqs::Client::new(&r.sdk)
        .send_message()
        .queue_url(&r.queue_url)
        .message_body(body)
        .send()
        .await
        .unwrap();
}

fn shell_job(job: &str, script: &str) -> String {
    serde_json::json!({
        "spec_version": 1, "job_id": job, "agent": "command",
        "command": ["sh", "-c", script],
    })
    .to_string()
}

/// All stdout of attempt `n` of `job`.
async fn stdout_of(r: &Resources, job: &str, n: u32) -> String {
    stream_of(r, job, n, Stream::Stdout).await
}

async fn stream_of(r: &Resources, job: &str, n: u32, stream: Stream) -> String {
    let l = Layout::new(&r.prefix);
    let j = JobId::parse(job).unwrap();
    let mut out = String::new();
    for k in r
        .keys(&l.stream_prefix(&j, agentq_core::Attempt(n), stream))
        .await
    {
        out.push_str(&r.object(&k).await);
    }
    out
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn pids_after(text: &str, marker: &str) -> Vec<i32> {
    text.lines()
        .filter_map(|l| l.strip_prefix(marker))
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// A work root the given uid may use.
fn work_root_for(uid: u32) -> tempfile::TempDir {
    let d = work_root();
    std::os::unix::fs::chown(d.path(), Some(uid), Some(uid)).unwrap();
    d
}

/// Counts the processes whose environment holds the agent's secret. A control process of
/// the child's own carries it too, so a working probe counts exactly 1.
const PROBE: &str = "CONTROL=\"agent-secret-$PROBE_NEEDLE\" sleep 5 & sleep 0.2; n=0; for f in /proc/[0-9]*/environ; do \
    if tr '\\0' '\\n' < \"$f\" 2>/dev/null | grep -q \"agent-secret-$PROBE_NEEDLE\"; then n=$((n+1)); fi; done; \
    echo \"READABLE_WITH_SECRET $n\"; \
    if cat /proc/$PPID/environ >/dev/null 2>&1; then echo PARENT_ENVIRON_READABLE; fi";

#[tokio::test]
async fn a_child_reading_every_environ_finds_no_agent_secret_as_root_or_as_a_user() {
    let r = resources().await;
    for (label, uid) in [("root", None), ("user", Some(62_500u32))] {
        let needle = format!("probe{}", ulid::Ulid::new()).to_lowercase();
        let agent_secret = format!("agent-secret-{needle}");
        let job = format!("environ-{label}");
        let spec = serde_json::json!({
            "spec_version": 1, "job_id": job, "agent": "command",
            "command": ["sh", "-c", PROBE],
            "env": {"PROBE_NEEDLE": needle},
        });
        send(&r, &spec.to_string()).await;
        let work = match uid {
            Some(u) => work_root_for(u),
            None => work_root(),
        };
        let mut cmd = agent_cmd(&r, work.path(), &["poll", "--once", "--wait-seconds", "2"]);
        cmd.env("AWS_SECRET_ACCESS_KEY", &agent_secret);
        if let Some(u) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(u).gid(u);
        }
        let out = cmd.stderr(Stdio::piped()).output().unwrap();
        assert!(
            out.status.success(),
            "{label}: poller failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rec = record(&r, &job).await;
        assert_eq!(rec.status, JobState::Succeeded, "{label}: {rec:?}");
        let out = stdout_of(&r, &job, 1).await;
        assert!(
            out.contains("READABLE_WITH_SECRET 1"),
            "{label}: the child found the agent's secret: {out}"
        );
        assert!(!out.contains("PARENT_ENVIRON_READABLE"), "{label}: {out}");
        assert!(!out.contains(&agent_secret), "{label}: leaked");
    }
}

#[tokio::test]
async fn a_setsid_grandchild_is_gone_when_its_job_ends() {
    let r = resources().await;
    let work = work_root();
    // One escapes with setsid, one with a double fork (re-parented on its parent's exit).
    let script = "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo \"ESCAPED $!\"; \
        (setsid sleep 301 </dev/null >/dev/null 2>&1 & echo \"ESCAPED $!\"); sleep 1";
    send(&r, &shell_job("escape-poll", script)).await;
    let status = agent_cmd(&r, work.path(), &["poll", "--once", "--wait-seconds", "2"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = stdout_of(&r, "escape-poll", 1).await;
    let pids = pids_after(&out, "ESCAPED ");
    assert_eq!(pids.len(), 2, "{out}");
    for p in &pids {
        assert!(!alive(*p), "pid {p} outlived its job (poll mode)");
    }

    // The same in-process (the library without the binary's subreaper): as root the job
    // runs under its own uid, and everything of that uid goes with the job.
    let deps = deps(&r, work.path(), &[]);
    let resp = handle(
        &deps,
        vec![message("m1", &shell_job("escape-lib", script))],
        Duration::from_secs(60),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    let out = stdout_of(&r, "escape-lib", 1).await;
    let pids = pids_after(&out, "ESCAPED ");
    assert_eq!(pids.len(), 2, "{out}");
    for p in &pids {
        assert!(!alive(*p), "pid {p} outlived its job (library)");
    }
}

#[tokio::test]
async fn a_killed_pollers_child_dies_with_it_and_the_takeover_runs_alone() {
    let r = agentq_testkit::resources_with(agentq_testkit::ResourceOptions {
        max_receive_count: 10,
        visibility_timeout: 30,
    })
    .await;
    let work = work_root();
    let marks = work_root();
    std::fs::set_permissions(marks.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = format!(
        "echo \"$AGENTQ_ATTEMPT $$\" >> {0}/pids; \
         if [ \"$AGENTQ_ATTEMPT\" = 1 ]; then exec sleep 300; fi; \
         for p in $(cut -d' ' -f2 {0}/pids); do \
           if [ \"$p\" != \"$$\" ] && [ -e /proc/$p ]; then echo \"OTHER_RUN_ALIVE $p\"; fi; done; \
         echo done",
        marks.path().display()
    );
    send(&r, &shell_job("pdeath", &script)).await;
    let first = agent_cmd(&r, work.path(), &["poll", "--wait-seconds", "1"])
        .spawn()
        .unwrap();
    let mut first = Killer(first);
    let pid_file = marks.path().join("pids");
    let t = Instant::now();
    let child_pid: i32 = loop {
        if let Ok(s) = std::fs::read_to_string(&pid_file)
            && let Some(p) = s.split_whitespace().nth(1)
        {
            break p.parse().unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "child never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(alive(child_pid));
    first.0.kill().unwrap();
    let _ = first.0.wait();
    let killed = Instant::now();
    while alive(child_pid) {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the child outlived its killed poller by 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The takeover: its child finds no other run of the job alive.
    let status = agent_cmd(&r, work.path(), &["poll", "--once", "--wait-seconds", "8"])
        .status()
        .unwrap();
    assert!(status.success());
    let rec = JobStore::new(r.clients().dynamodb, &r.table)
        .require(&JobId::parse("pdeath").unwrap())
        .await
        .unwrap();
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.attempt.get(), 2);
    let out = stdout_of(&r, "pdeath", 2).await;
    assert!(out.contains("done"), "{out}");
    assert!(!out.contains("OTHER_RUN_ALIVE"), "{out}");
}

#[tokio::test]
async fn a_reused_job_id_runs_the_recorded_spec_only() {
    let r = resources().await;
    let work = work_root();
    let deps = deps(&r, work.path(), &[]);
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let recorded = agentq_core::JobSpec::parse_valid(
        shell_job("reused", "echo RECORDED-SPEC-RAN").as_bytes(),
        &r.settings().validation(),
    )
    .unwrap();
    store
        .create_queued(&recorded, agentq_core::record::now_ms())
        .await
        .unwrap();

    // A malformed message with that id arrives first: the job is left alone.
    let resp = handle(
        &deps,
        vec![message(
            "bad",
            r#"{"spec_version":1,"job_id":"reused","agent":"command","command":"not-a-list"}"#,
        )],
        Duration::from_secs(60),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(record(&r, "reused").await.status, JobState::Queued);
    let dlq = r.drain(&r.dlq_url).await;
    assert_eq!(dlq.len(), 1);
    let agentq_core::failure::DlqMessage::Failure(f) =
        agentq_core::failure::DlqMessage::parse(&dlq[0])
    else {
        panic!("{}", dlq[0])
    };
    assert_eq!(
        f.job_id, None,
        "the DLQ record must not name the existing job"
    );

    // Then a valid message with another command under the same id.
    let resp = handle(
        &deps,
        vec![message(
            "hostile",
            &shell_job("reused", "echo HOSTILE-SPEC-RAN"),
        )],
        Duration::from_secs(60),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    let rec = record(&r, "reused").await;
    assert_eq!(rec.status, JobState::Succeeded);
    let out = stdout_of(&r, "reused", 1).await;
    assert!(out.contains("RECORDED-SPEC-RAN"), "{out}");
    assert!(!out.contains("HOSTILE-SPEC-RAN"), "{out}");
}

#[tokio::test]
async fn the_scratch_dir_is_wiped_before_a_job_only_when_asked_or_on_lambda() {
    let r = resources().await;
    let scratch = work_root();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let work = scratch.path().join("agentq");
    let junk = scratch.path().join("left-by-an-earlier-job");
    for (mode, wiped) in [("auto", false), ("never", false), ("always", true)] {
        std::fs::write(&junk, "secret residue").unwrap();
        let deps = deps(
            &r,
            &work,
            &[
                "--scratch-dir",
                scratch.path().to_str().unwrap(),
                "--wipe-scratch",
                mode,
            ],
        );
        let job = format!("wipe-{mode}");
        let resp = handle(
            &deps,
            vec![message("m", &shell_job(&job, "true"))],
            Duration::from_secs(60),
        )
        .await;
        assert!(resp.batch_item_failures.is_empty());
        assert_eq!(record(&r, &job).await.status, JobState::Succeeded);
        // `auto` is off here: this is not the Lambda service (no LAMBDA_TASK_ROOT).
        assert_eq!(!junk.exists(), wiped, "mode {mode}");
        assert!(work.exists(), "the work root is never wiped");
    }
}

#[tokio::test]
async fn a_job_with_aws_credentials_gets_a_scoped_role_not_the_agents_keys() {
    let r = resources().await;
    let work = work_root();
    let iam = aws_sdk_iam_role(&r).await;
    // The child needs boto3, which lives with the test's own python3 (readable by root):
    // this probe runs its child as root; uid isolation is covered above.
    let python = which("python3");
    let deps = deps(
        &r,
        work.path(),
        &["--job-role-arn", &iam, "--child-uid", "0"],
    );
    let script = r#"
import json, os, urllib.request, boto3
print("AGENT_KEYS_IN_ENV", any(k in os.environ for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")))
print("REGION", os.environ.get("AWS_REGION"))
s3 = boto3.client("s3", endpoint_url=os.environ["ENDPOINT"])
bucket, prefix = os.environ["BUCKET"], os.environ["DATA_PREFIX"]
s3.put_object(Bucket=bucket, Key=prefix + "hello.txt", Body=b"from the job")
req = urllib.request.Request(os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
    headers={"Authorization": os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
creds = json.load(urllib.request.urlopen(req))
print("SECRET_FROM_ENDPOINT", creds["SecretAccessKey"])
bad = urllib.request.Request(os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"], headers={"Authorization": "wrong"})
try:
    urllib.request.urlopen(bad); print("WRONG_TOKEN_ACCEPTED")
except Exception as e:
    print("WRONG_TOKEN_REFUSED")
"#;
    let l = Layout::new(&r.prefix);
    let prefix = format!("{}data/", l.job_prefix(&JobId::parse("creds").unwrap()));
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": "creds", "agent": "command",
        "command": [python, "-c", script],
        "aws_credentials": true,
        "env": {"BUCKET": r.bucket, "DATA_PREFIX": prefix, "ENDPOINT": r.endpoint},
    });
    let resp = handle(
        &deps,
        vec![message("m", &spec.to_string())],
        Duration::from_secs(60),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    let out = stdout_of(&r, "creds", 1).await;
    let rec = record(&r, "creds").await;
    let err = stream_of(&r, "creds", 1, Stream::Stderr).await;
    assert_eq!(rec.status, JobState::Succeeded, "{out}\n{err}");
    assert!(out.contains("AGENT_KEYS_IN_ENV False"), "{out}");
    assert!(out.contains("REGION us-east-1"), "{out}");
    assert!(out.contains("WRONG_TOKEN_REFUSED"), "{out}");
    // The scoped secret key was redacted like any secret.
    assert!(out.contains("SECRET_FROM_ENDPOINT [REDACTED]"), "{out}");
    assert_eq!(
        r.object(&format!("{prefix}hello.txt")).await,
        "from the job"
    );

    // Without a job role, such a job is refused before it starts.
    let deps = deps_without_role(&r, work.path());
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": "creds-refused", "agent": "command",
        "command": ["true"], "aws_credentials": true,
    });
    handle(
        &deps,
        vec![message("m", &spec.to_string())],
        Duration::from_secs(60),
    )
    .await;
    let rec = record(&r, "creds-refused").await;
    assert_eq!(rec.status, JobState::Failed);
    assert_eq!(rec.cause.as_deref(), Some("secret_denied"));
    assert!(rec.reason.unwrap().contains("AGENTQ_JOB_ROLE_ARN"));
}

fn deps_without_role(r: &Resources, work: &std::path::Path) -> std::sync::Arc<agentq_agent::Deps> {
    deps(r, work, &[])
}

fn which(program: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap();
    let p = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(!p.is_empty(), "{program} not found on PATH");
    // pyenv shims re-exec by name; resolve to the interpreter itself.
    let real = Command::new(&p)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    String::from_utf8(real.stdout).unwrap().trim().to_owned()
}

/// A role in the emulator's IAM the agent may assume for jobs.
async fn aws_sdk_iam_role(r: &Resources) -> String {
    let name = agentq_testkit::unique("job-role");
    let trust = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]
    });
    let out = Command::new(which("python3"))
        .args([
            "-c",
            "import boto3,sys; print(boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test').create_role(RoleName=sys.argv[2], AssumeRolePolicyDocument=sys.argv[3])['Role']['Arn'])",
            &r.endpoint,
            &name,
            &trust.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
