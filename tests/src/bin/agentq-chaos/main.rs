//! `agentq-chaos`: the chaos and fault suite. On an emulator of its own it submits N short
//! `command` jobs, runs M agent pollers and the dispatcher, SIGKILLs one of them at random
//! every few seconds (and starts it again) for a period, optionally through the fault
//! proxy, sends duplicate deliveries (the same message twice, and the same job id with a
//! different body), then lets things calm down and judges what is left: jobs terminal,
//! jobs run twice at once, attempts without logs, orphaned children, time to recover,
//! stranded jobs. Prints the figures and a JSON summary; exit 1 when an invariant fails.
//! `scripts/chaos` builds and runs it; see docs/reliability.md.

mod checks;
mod procs;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentq_core::record::now_ms;
use agentq_core::{Attempt, JobId, JobRecord, JobStore, Layout, Stream};
use agentq_testkit::faultproxy::{FaultConfig, FaultProxy, Stats};
use agentq_testkit::{ResourceOptions, Resources};
use anyhow::Context;
use aws_sdk_sqs::types::QueueAttributeName;
use clap::Parser;
use tokio::time::Instant;

use checks::{AttemptObjects, Timing};
use procs::{Emulator, Fleet, Launch, Role, WatcherTask};
use report::{Figures, Invariant, KillEvent, Summary};

/// The chaos and fault suite for agentq (see docs/reliability.md).
#[derive(Debug, Parser)]
#[command(
    name = "agentq-chaos",
    after_help = "Exit codes: 0 every invariant holds; 1 an invariant failed; 2 bad arguments; 3 the harness itself failed."
)]
struct Cli {
    /// The quick version for the test command: 10 jobs, 2 pollers running one job each,
    /// 20 s of kills every 2-4 s, 10 % faults, up to 60 s of calm. Flags given as well
    /// override these.
    #[arg(long)]
    short: bool,
    /// Jobs to submit (default 50).
    #[arg(long)]
    jobs: Option<usize>,
    /// Agent pollers (default 3).
    #[arg(long)]
    pollers: Option<usize>,
    /// Jobs each poller runs at once (default 2).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds of random kills (default 150).
    #[arg(long)]
    chaos_seconds: Option<u64>,
    /// Most seconds of calm afterwards, waiting for every job to end (default 120).
    #[arg(long)]
    calm_seconds: Option<u64>,
    /// Shortest time between kills, seconds (default 3).
    #[arg(long)]
    kill_min_seconds: Option<f64>,
    /// Longest time between kills, seconds (default 7).
    #[arg(long)]
    kill_max_seconds: Option<f64>,
    /// Injected AWS fault rate per request through the proxy, 0 to 1 (default 0: no proxy).
    #[arg(long)]
    faults: Option<f64>,
    /// Added latency per AWS request through the proxy, milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Up to this much more latency, milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Job messages sent a second time, unchanged (default: a fifth of the jobs).
    #[arg(long)]
    duplicates: Option<usize>,
    /// Messages reusing a job's id with a different body (default: a tenth, at least 1).
    #[arg(long)]
    imposters: Option<usize>,
    /// How long each job's child prints, seconds (default 2).
    #[arg(long)]
    job_seconds: Option<f64>,
    /// Seed for kills, duplicates and faults (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for logs, markers and the summary (default .localdev/chaos/RUN).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the JSON summary here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Validated settings of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    pub jobs: usize,
    pub pollers: usize,
    pub concurrency: usize,
    pub chaos_seconds: u64,
    pub calm_seconds: u64,
    pub kill_min_seconds: f64,
    pub kill_max_seconds: f64,
    pub faults: f64,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub duplicates: usize,
    pub imposters: usize,
    pub job_seconds: f64,
    pub seed: u64,
    pub heartbeat_seconds: f64,
    pub visibility_horizon_seconds: u32,
    pub stale_after_seconds: f64,
    pub log_flush_seconds: f64,
    pub queue_visibility_timeout_seconds: u32,
    pub max_receive_count: u32,
}

/// A flag out of range.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {why}")]
struct UsageError {
    flag: &'static str,
    why: String,
}

fn usage(flag: &'static str, why: impl Into<String>) -> UsageError {
    UsageError {
        flag,
        why: why.into(),
    }
}

impl Settings {
    fn from_cli(c: &Cli) -> Result<Self, UsageError> {
        let s = c.short;
        let jobs = c.jobs.unwrap_or(if s { 10 } else { 50 });
        let kill_min_seconds = c.kill_min_seconds.unwrap_or(if s { 2.0 } else { 3.0 });
        let kill_max_seconds = c.kill_max_seconds.unwrap_or(if s { 4.0 } else { 7.0 });
        let out = Self {
            jobs,
            pollers: c.pollers.unwrap_or(if s { 2 } else { 3 }),
            concurrency: c.concurrency.unwrap_or(if s { 1 } else { 2 }),
            chaos_seconds: c.chaos_seconds.unwrap_or(if s { 20 } else { 150 }),
            calm_seconds: c.calm_seconds.unwrap_or(if s { 60 } else { 120 }),
            kill_min_seconds,
            kill_max_seconds,
            faults: c.faults.unwrap_or(if s { 0.1 } else { 0.0 }),
            latency_ms: c.latency_ms,
            jitter_ms: c.jitter_ms,
            duplicates: c.duplicates.unwrap_or(jobs / 5),
            imposters: c.imposters.unwrap_or((jobs / 10).max(1)),
            job_seconds: c.job_seconds.unwrap_or(2.0),
            seed: c.seed.unwrap_or_else(|| now_ms() as u64),
            heartbeat_seconds: 1.0,
            visibility_horizon_seconds: 3,
            stale_after_seconds: 4.0,
            log_flush_seconds: 1.0,
            // As infra/template.yaml deploys the jobs queue.
            queue_visibility_timeout_seconds: 5400,
            max_receive_count: 3,
        };
        if !(1..=1000).contains(&out.jobs) {
            return Err(usage("jobs", "use 1..=1000"));
        }
        if !(1..=16).contains(&out.pollers) {
            return Err(usage("pollers", "use 1..=16"));
        }
        if !(1..=8).contains(&out.concurrency) {
            return Err(usage("concurrency", "use 1..=8"));
        }
        if !(out.kill_min_seconds > 0.0 && out.kill_min_seconds <= out.kill_max_seconds) {
            return Err(usage(
                "kill-min-seconds",
                "must be above 0 and at most --kill-max-seconds",
            ));
        }
        if !(0.0..=0.9).contains(&out.faults) {
            return Err(usage("faults", "a probability in 0..=0.9"));
        }
        if !(0.2..=60.0).contains(&out.job_seconds) {
            return Err(usage("job-seconds", "use 0.2..=60"));
        }
        if out.duplicates > out.jobs || out.imposters > out.jobs {
            return Err(usage(
                "duplicates",
                "--duplicates and --imposters are at most --jobs",
            ));
        }
        Ok(out)
    }

    fn timing(&self) -> Timing {
        Timing {
            tick_ms: TICK_MS,
            flush_ms: (self.log_flush_seconds * 1000.0) as u64,
            stale_after_ms: (self.stale_after_seconds * 1000.0) as i64,
        }
    }
}

/// Interval between the job child's lines.
const TICK_MS: u64 = 200;

/// The job child: appends `start`, a `tick` per interval and `end` to its job's marker
/// file (epoch ms, pid, attempt, body tag), prints each tick to stdout (uploaded as the
/// attempt's log) and leaves an artifact. `$0` carries the run's marker so leftover
/// processes can be found by their argv. SIGPIPE is ignored: a child whose agent died
/// keeps working like an agent CLI busy in a quiet tool call would, instead of dying at
/// its next line on the broken stdout pipe (which would hide every orphan).
const CHILD_SCRIPT: &str = r#"trap '' PIPE
m="$CHAOS_MARKS/$AGENTQ_JOB_ID.marks"
now() { date +%s%3N; }
echo "start $(now) $$ $AGENTQ_ATTEMPT $CHAOS_BODY" >> "$m"
i=0
while [ "$i" -lt "$CHAOS_TICKS" ]; do
  t=$(now)
  echo "tick $i $t $$ $AGENTQ_ATTEMPT $CHAOS_BODY"
  echo "tick $t $$ $AGENTQ_ATTEMPT $CHAOS_BODY" >> "$m"
  sleep "$CHAOS_TICK_SECONDS"
  i=$((i+1))
done
echo "$AGENTQ_JOB_ID $AGENTQ_ATTEMPT $CHAOS_BODY" > "$AGENTQ_OUT_DIR/chaos-artifact.txt"
echo "end $(now) $$ $AGENTQ_ATTEMPT $CHAOS_BODY" >> "$m"
echo "done""#;

/// The re-plan policy of the run (seconds instead of minutes).
const POLICY: &str = include_str!("../../../chaos/policy.toml");

const BODY: &str = "orig";
const IMPOSTER_BODY: &str = "imposter";

fn spec(job: &str, body: &str, marks: &Path, token: &str, ticks: u32) -> String {
    serde_json::json!({
        "spec_version": 1,
        "job_id": job,
        "agent": "command",
        "command": ["sh", "-c", CHILD_SCRIPT, format!("agentq-chaos-child-{token}")],
        "env": {
            "CHAOS_MARKS": marks.display().to_string(),
            "CHAOS_RUN": token,
            "CHAOS_BODY": body,
            "CHAOS_TICKS": ticks.to_string(),
            "CHAOS_TICK_SECONDS": format!("{:.1}", TICK_MS as f64 / 1000.0),
        },
        "timeout_seconds": 120,
        "max_attempts": 20,
        "resume": "never",
        "labels": {"chaos": token},
    })
    .to_string()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_cli(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agentq-chaos: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match Box::pin(run(&cli, settings)).await {
        Ok(summary) if summary.passed => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(1),
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("agentq-chaos: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("agentq-chaos: {e:#}");
            std::process::ExitCode::from(3)
        }
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("chaos: {}", msg.as_ref());
}

/// A binary next to this one (the scripts build them all into one target directory).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating agentq-chaos")?;
    let p = me.with_file_name(name);
    anyhow::ensure!(
        p.exists(),
        "{} is missing: build it first (scripts/chaos does: cargo build --bins)",
        p.display()
    );
    Ok(p)
}

async fn run(cli: &Cli, s: Settings) -> anyhow::Result<Summary> {
    let token = ulid::Ulid::new().to_string().to_lowercase()[20..].to_owned();
    let out = match &cli.out {
        Some(o) => o.clone(),
        None => agentq_testkit::repo_root()
            .join(".localdev")
            .join("chaos")
            .join(format!("{}-{token}", now_ms() / 1000)),
    };
    let out = std::path::absolute(&out).unwrap_or(out);
    if std::fs::read_dir(&out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(usage(
            "out",
            format!(
                "{} is not empty: give a new directory (each run writes its own markers and logs)",
                out.display()
            ),
        )
        .into());
    }
    let marks = out.join("marks");
    let logs = out.join("logs");
    let work = out.join("work");
    for d in [&marks, &logs, &work] {
        tokio::fs::create_dir_all(d)
            .await
            .with_context(|| format!("creating {}", d.display()))?;
    }
    // A root agent runs each job slot under its own uid: every child must be able to
    // append to the markers (the files are made, world-writable, before the jobs start).
    tokio::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o777)).await?;
    say(format!(
        "run {token}: {} jobs, {} pollers x {}, {} s of kills every {}-{} s, {} s of calm at most, faults {}, seed {}; files in {}",
        s.jobs,
        s.pollers,
        s.concurrency,
        s.chaos_seconds,
        s.kill_min_seconds,
        s.kill_max_seconds,
        s.calm_seconds,
        s.faults,
        s.seed,
        out.display()
    ));
    let agent = sibling("agentq-agent")?;
    let dispatcher = sibling("agentq-dispatcher")?;
    let producer = sibling("agentq")?;

    let emulator = Emulator::start(&logs.join("emulator.log")).await?;
    let result = run_on(
        &s,
        &token,
        &out,
        &emulator.endpoint,
        [agent, dispatcher, producer],
    )
    .await;
    emulator.stop().await;
    let summary = result?;
    let text = report::render(&summary);
    println!("{text}");
    let json = serde_json::to_string_pretty(&summary)?;
    tokio::fs::write(out.join("summary.json"), &json).await?;
    tokio::fs::write(out.join("summary.txt"), &text).await?;
    if let Some(p) = &cli.json {
        tokio::fs::write(p, &json)
            .await
            .with_context(|| format!("writing {}", p.display()))?;
    }
    say(format!("summary: {}", out.join("summary.json").display()));
    Ok(summary)
}

async fn run_on(
    s: &Settings,
    token: &str,
    out: &Path,
    endpoint: &str,
    [agent, dispatcher, producer]: [PathBuf; 3],
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let emu = agentq_testkit::Emulator {
        endpoint: endpoint.to_owned(),
        sdk: agentq_testkit::sdk_config(endpoint).await,
    };
    let r = agentq_testkit::resources_on(
        &emu,
        ResourceOptions {
            max_receive_count: s.max_receive_count,
            visibility_timeout: s.queue_visibility_timeout_seconds,
        },
    )
    .await;
    let mut rng = fastrand::Rng::with_seed(s.seed);

    // The fault proxy sits between the agents/dispatcher and the emulator; the harness's
    // own reads go straight to the emulator.
    let proxy = if s.faults > 0.0 || s.latency_ms > 0 || s.jitter_ms > 0 {
        let p = FaultProxy::start(
            endpoint,
            "127.0.0.1:0".parse()?,
            FaultConfig {
                latency_ms: s.latency_ms,
                jitter_ms: s.jitter_ms,
                ..FaultConfig::uniform(s.faults, s.seed)
            },
        )
        .await?;
        say(format!("fault proxy on {}", p.endpoint()));
        Some(p)
    } else {
        None
    };
    let aws_endpoint = proxy
        .as_ref()
        .map(|p| p.endpoint())
        .unwrap_or_else(|| endpoint.to_owned());

    let policy = out.join("policy.toml");
    // The sweep on the run's scale: a RUNNING job whose lease went stale and whose
    // message would have been back within the horizon is stranded after a few seconds.
    let sweep = format!(
        "\n[sweep]\nvisibility_horizon = \"{}s\"\nmargin = \"3s\"\nqueued_after = \"17m\"\n",
        s.visibility_horizon_seconds
    );
    tokio::fs::write(&policy, format!("{POLICY}{sweep}")).await?;
    let mut base_env = r.env();
    base_env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    base_env.push(("AWS_ENDPOINT_URL".into(), aws_endpoint));
    base_env.push(("PATH".into(), std::env::var("PATH").unwrap_or_default()));
    base_env.push(("RUST_LOG".into(), "info,aws=warn,hyper=warn".into()));
    let mut launches = BTreeMap::new();
    for i in 0..s.pollers {
        let mut env = base_env.clone();
        env.extend(
            [
                ("AGENTQ_HEARTBEAT_SECONDS", s.heartbeat_seconds.to_string()),
                (
                    "AGENTQ_VISIBILITY_HORIZON_SECONDS",
                    s.visibility_horizon_seconds.to_string(),
                ),
                (
                    "AGENTQ_STALE_AFTER_SECONDS",
                    s.stale_after_seconds.to_string(),
                ),
                ("AGENTQ_DEADLINE_RESERVE_SECONDS", "4".into()),
                ("AGENTQ_KILL_GRACE_SECONDS", "1".into()),
                ("AGENTQ_LOG_FLUSH_SECONDS", s.log_flush_seconds.to_string()),
                ("AGENTQ_MAX_CONCURRENT_JOBS", s.concurrency.to_string()),
                ("AGENTQ_WORK_ROOT", out.join("work").display().to_string()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        launches.insert(
            Role::Poller(i),
            Launch {
                program: agent.clone(),
                args: [
                    "poll",
                    "--max-concurrency",
                    &s.concurrency.to_string(),
                    "--wait-seconds",
                    "2",
                    "--function-timeout-seconds",
                    "60",
                ]
                .map(str::to_owned)
                .to_vec(),
                env,
            },
        );
    }
    // The dispatcher and its sweep judge leases with the agents' stale limit.
    let mut sweeper_env = base_env.clone();
    sweeper_env.push((
        "AGENTQ_STALE_AFTER_SECONDS".into(),
        s.stale_after_seconds.to_string(),
    ));
    launches.insert(
        Role::Dispatcher,
        Launch {
            program: dispatcher.clone(),
            args: [
                "replan",
                "--wait-seconds",
                "2",
                "--policy",
                &policy.display().to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
            env: sweeper_env.clone(),
        },
    );
    // The dispatcher's sweep, as its schedule runs it on Lambda (every 5 minutes there).
    launches.insert(
        Role::Sweeper,
        Launch {
            program: dispatcher.clone(),
            args: [
                "sweep",
                "--every",
                "3s",
                "--policy",
                &policy.display().to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
            env: sweeper_env,
        },
    );
    let mut fleet = Fleet::new(launches, out.join("logs"));

    // Jobs: submitted with the producer CLI (records QUEUED, then SendMessageBatch),
    // straight to the emulator: submission is not under test.
    let ticks = ((s.job_seconds * 1000.0) / TICK_MS as f64).round().max(1.0) as u32;
    let marks = out.join("marks");
    let ids: Vec<String> = (0..s.jobs)
        .map(|i| format!("chaos-{token}-{i:03}"))
        .collect();
    let bodies: BTreeMap<String, String> = ids
        .iter()
        .map(|id| (id.clone(), spec(id, BODY, &marks, token, ticks)))
        .collect();
    for id in &ids {
        let f = marks.join(format!("{id}.marks"));
        tokio::fs::write(&f, b"").await?;
        tokio::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).await?;
    }
    let batch = out.join("jobs.jsonl");
    tokio::fs::write(
        &batch,
        bodies.values().cloned().collect::<Vec<_>>().join("\n") + "\n",
    )
    .await?;

    fleet.start_all()?;
    let watcher = WatcherTask::start(
        format!("agentq-chaos-child-{token}"),
        fleet.live_agents.clone(),
    );
    let submit = tokio::process::Command::new(&producer)
        .args([
            "submit",
            "--batch",
            &batch.display().to_string(),
            "--output",
            "json",
        ])
        .env_clear()
        .envs(r.env())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await
        .context("running agentq submit")?;
    anyhow::ensure!(
        submit.status.success(),
        "agentq submit --batch failed ({}): {}",
        submit.status,
        String::from_utf8_lossy(&submit.stderr)
    );
    let submitted_at = Instant::now();
    say(format!("submitted {} jobs", ids.len()));

    // Duplicate deliveries, sent at random times in the first half of the chaos period.
    let sqs = aws_sdk_sqs::Client::new(&emu.sdk);
    let mut extra: Vec<(Duration, String)> = Vec::new();
    let window = (s.chaos_seconds as f64 / 2.0).max(1.0);
    let mut pick = ids.clone();
    rng.shuffle(&mut pick);
    for id in pick.iter().take(s.duplicates) {
        extra.push((
            Duration::from_secs_f64(rng.f64() * window),
            bodies[id].clone(),
        ));
    }
    rng.shuffle(&mut pick);
    for id in pick.iter().take(s.imposters) {
        extra.push((
            Duration::from_secs_f64(rng.f64() * window),
            spec(id, IMPOSTER_BODY, &marks, token, ticks),
        ));
    }
    extra.sort_by_key(|(d, _)| *d);
    let sender = {
        let sqs = sqs.clone();
        let queue = r.queue_url.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut sent = 0u32;
            for (at, body) in extra {
                tokio::time::sleep_until(t0 + at).await;
                if sqs
                    .send_message()
                    .queue_url(&queue)
                    .message_body(body)
                    .send()
                    .await
                    .is_ok()
                {
                    sent += 1;
                }
            }
            sent
        })
    };

    // Observer: reads every record every 2 s; notes when all jobs are terminal.
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let job_ids: Vec<JobId> = ids.iter().filter_map(|i| JobId::parse(i).ok()).collect();

    // Chaos.
    let chaos_end = submitted_at + Duration::from_secs(s.chaos_seconds);
    let mut kills: Vec<KillEvent> = Vec::new();
    let mut unexpected_exits: Vec<String> = Vec::new();
    let mut all_terminal_at: Option<Instant> = None;
    let mut next_kill = Instant::now()
        + Duration::from_secs_f64(
            rng.f64() * (s.kill_max_seconds - s.kill_min_seconds) + s.kill_min_seconds,
        );
    let mut next_look = Instant::now();
    let roles = fleet.roles();
    while Instant::now() < chaos_end {
        let wake = next_kill.min(next_look).min(chaos_end);
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if now >= next_look {
            next_look = now + Duration::from_secs(2);
            for (role, status) in fleet.restart_exited().await? {
                // Exit code 2 is a usage or configuration error: the run would measure a
                // fleet without that process, so the harness itself fails.
                anyhow::ensure!(
                    !status.ends_with("exit status: 2"),
                    "{role} refused its configuration ({status}); see its log under {}",
                    out.join("logs").display()
                );
                unexpected_exits.push(format!("{role} exited by itself ({status})"));
            }
            if all_terminal(&store, &job_ids).await {
                all_terminal_at.get_or_insert(now);
            } else {
                all_terminal_at = None;
            }
        }
        if now >= next_kill && now < chaos_end {
            let role = roles[rng.usize(..roles.len())];
            let pid = fleet.kill_and_restart(role).await?;
            kills.push(KillEvent {
                at_s: submitted_at.elapsed().as_secs_f64(),
                role: role.to_string(),
                pid,
            });
            all_terminal_at = None;
            next_kill = now
                + Duration::from_secs_f64(
                    rng.f64() * (s.kill_max_seconds - s.kill_min_seconds) + s.kill_min_seconds,
                );
        }
    }
    let last_kill = kills
        .last()
        .map(|k| submitted_at + Duration::from_secs_f64(k.at_s));
    say(format!("chaos over: {} kills; calm", kills.len()));

    // Calm: nothing is killed; wait for every job to end.
    let calm_end = Instant::now() + Duration::from_secs(s.calm_seconds);
    while Instant::now() < calm_end {
        if all_terminal_at.is_none() && all_terminal(&store, &job_ids).await {
            all_terminal_at = Some(Instant::now());
        }
        if all_terminal_at.is_some() {
            break;
        }
        for (role, status) in fleet.restart_exited().await? {
            // Exit code 2 is a usage or configuration error: the run would measure a
            // fleet without that process, so the harness itself fails.
            anyhow::ensure!(
                !status.ends_with("exit status: 2"),
                "{role} refused its configuration ({status}); see its log under {}",
                out.join("logs").display()
            );
            unexpected_exits.push(format!("{role} exited by itself ({status})"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let calm_used =
        (Instant::now() - (calm_end - Duration::from_secs(s.calm_seconds))).as_secs_f64();
    let recover_s = match (all_terminal_at, last_kill) {
        (Some(t), Some(k)) => Some(t.saturating_duration_since(k).as_secs_f64()),
        (Some(t), None) => Some(t.saturating_duration_since(submitted_at).as_secs_f64()),
        _ => None,
    };
    let duplicates_sent = sender.await.unwrap_or(0);

    // The end of the run: the records as the calm phase left them, then stop everything.
    let at_calm_end = read_records(&store, &job_ids).await;
    say("stopping pollers and dispatcher");
    fleet.stop_all(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let watcher = watcher.finish().await;
    let needle = format!("CHAOS_RUN={token}");
    let leftovers = {
        let n = needle.clone();
        tokio::task::spawn_blocking(move || procs::find_processes(&n, true)).await?
    };
    for p in &leftovers {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    // Messages: wait for in-flight visibility to run out (a few heartbeats), then list
    // every visible message on the jobs queue and the DLQ by the job it names.
    let (queued, invisible) = queued_jobs(&sqs, &r, s).await;
    let read_at = now_ms();
    let records = read_records(&store, &job_ids).await;
    let layout = Layout::new(&r.prefix);
    let mut verdicts = Vec::new();
    let mut ran_until: std::collections::HashMap<u32, i64> = Default::default();
    for id in &job_ids {
        let text = tokio::fs::read_to_string(marks.join(format!("{id}.marks")))
            .await
            .unwrap_or_default();
        let runs = checks::parse_marks(&text);
        for run in &runs {
            let e = ran_until.entry(run.pid).or_default();
            *e = (*e).max(run.last_ms);
        }
        let record = records.get(id.as_str());
        let objects = attempt_objects(&r, &layout, id, record).await;
        verdicts.push(checks::judge(
            checks::Evidence {
                job_id: id.as_str(),
                submitted_body: BODY,
                record,
                runs: &runs,
                objects: &objects,
                queued: queued.contains(id.as_str()),
                now_ms: read_at,
            },
            s.timing(),
        ));
    }
    let mut states_at_calm_end: BTreeMap<String, usize> = BTreeMap::new();
    for id in &job_ids {
        let st = at_calm_end
            .get(id.as_str())
            .map(|r| r.status.to_string())
            .unwrap_or_else(|| "MISSING".into());
        *states_at_calm_end.entry(st).or_default() += 1;
    }
    let orphans = watcher.orphans(1000, &fleet.killed, &ran_until);
    let figures = Figures::from_verdicts(
        &verdicts,
        &at_calm_end,
        &kills,
        orphans,
        leftovers
            .iter()
            .map(|p| (p.pid, p.cmdline.clone()))
            .collect(),
        recover_s,
        invisible,
        watcher.children_seen(),
    );
    let invariants = Invariant::judge(&figures, s.jobs);
    let passed = invariants.iter().all(|i| i.holds);
    Ok(Summary {
        run: token.to_owned(),
        settings: s.clone(),
        passed,
        invariants,
        figures,
        states_at_calm_end,
        duplicates_sent,
        calm_seconds_used: calm_used,
        total_seconds: started.elapsed().as_secs_f64(),
        restarts: fleet.restarts,
        unexpected_exits,
        proxy: proxy
            .as_ref()
            .map(FaultProxy::stats)
            .unwrap_or_else(Stats::default),
        kills,
        jobs: verdicts,
        out_dir: out.display().to_string(),
    })
}

async fn read_records(store: &JobStore, ids: &[JobId]) -> BTreeMap<String, JobRecord> {
    let mut out = BTreeMap::new();
    for id in ids {
        // The harness reads the emulator directly; a failed read is retried once.
        for _ in 0..2 {
            if let Ok(Some(r)) = store.get(id).await {
                out.insert(id.to_string(), r);
                break;
            }
        }
    }
    out
}

async fn all_terminal(store: &JobStore, ids: &[JobId]) -> bool {
    for id in ids {
        match store.get(id).await {
            Ok(Some(r)) if r.status.is_terminal() => {}
            _ => return false,
        }
    }
    true
}

/// Jobs named by a visible message on the jobs queue or the DLQ, and how many messages
/// stayed invisible (e.g. held for the queue's visibility timeout by a dead poller).
async fn queued_jobs(
    sqs: &aws_sdk_sqs::Client,
    r: &Resources,
    s: &Settings,
) -> (BTreeSet<String>, BTreeMap<String, i64>) {
    let settle = Duration::from_secs_f64(
        f64::from(s.visibility_horizon_seconds).max(s.stale_after_seconds) + 3.0,
    );
    let t = Instant::now();
    let mut invisible = BTreeMap::new();
    loop {
        invisible.clear();
        for (name, url) in [("jobs", &r.queue_url), ("dlq", &r.dlq_url)] {
            let n = sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .send()
                .await
                .ok()
                .and_then(|o| {
                    o.attributes?
                        .get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?
                        .parse::<i64>()
                        .ok()
                })
                .unwrap_or(0);
            invisible.insert(name.to_owned(), n);
        }
        if invisible.values().all(|n| *n == 0) || t.elapsed() >= settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut jobs = BTreeSet::new();
    for url in [&r.queue_url, &r.dlq_url] {
        loop {
            let Ok(got) = sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .visibility_timeout(60)
                .wait_time_seconds(0)
                .send()
                .await
            else {
                break;
            };
            let msgs = got.messages.unwrap_or_default();
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                if let Some(id) = m
                    .body()
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
                    .and_then(|v| v.get("job_id")?.as_str().map(str::to_owned))
                {
                    jobs.insert(id);
                }
            }
        }
    }
    (jobs, invisible)
}

/// What S3 holds for each attempt of `job` the record knows (plus any other attempt
/// folder found).
async fn attempt_objects(
    r: &Resources,
    layout: &Layout,
    job: &JobId,
    record: Option<&JobRecord>,
) -> BTreeMap<u32, AttemptObjects> {
    let keys = r.keys(&layout.job_prefix(job)).await;
    let mut attempts: BTreeSet<u32> = record
        .map(|rec| rec.attempts.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default();
    for k in &keys {
        if let Some(n) = k
            .split('/')
            .find_map(|p| p.strip_prefix("attempt-"))
            .and_then(|n| n.parse().ok())
        {
            attempts.insert(n);
        }
    }
    let mut out = BTreeMap::new();
    for a in attempts {
        let attempt = Attempt(a);
        let stdout = layout.stream_prefix(job, attempt, Stream::Stdout);
        let mut o = AttemptObjects {
            result: keys.contains(&layout.result(job, attempt)),
            artifact: layout
                .artifact(job, attempt, "chaos-artifact.txt")
                .is_some_and(|k| keys.contains(&k)),
            ..Default::default()
        };
        for k in keys.iter().filter(|k| k.starts_with(&stdout)) {
            o.stdout_segments += 1;
            o.stdout_ticks += r
                .object(k)
                .await
                .lines()
                .filter(|l| l.starts_with("tick "))
                .count() as u32;
        }
        out.insert(a, o);
    }
    out
}
