//! Test support: makes sure a local AWS emulator (moto's server) is running, hands out
//! SDK clients pointed at it, and creates uniquely named queues, tables and buckets per
//! test so tests run in parallel without clashing.
//!
//! The endpoint comes from `AGENTQ_TEST_ENDPOINT` when set (the test command starts one
//! emulator for the whole run). Otherwise the first test to need one starts moto on
//! `127.0.0.1:$AGENTQ_TEST_PORT` (default 4598) under a file lock, and leaves it running
//! for the next test process; `localdev/down`-style cleanup is the test command's job.
//!
//! [`models`] runs scripted stand-ins for the model APIs and [`agent_clis`] installs the
//! real Claude Code and Codex CLIs, for tests that run the real agents. [`http_sink`] is
//! a recording HTTP receiver (OTLP collector and webhook stand-in).

pub mod agent_clis;
pub mod faultproxy;
pub mod http_sink;
pub mod models;
pub mod runtime_api;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentq_core::layout::{STATUS_INDEX, attr};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;
use tokio::sync::OnceCell;

/// Static credentials the emulator accepts.
pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "test";
pub const REGION: &str = "us-east-1";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A file under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(name)
}

/// A built binary of the workspace (`target/debug/NAME`), building it if missing.
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--bin", name])
            .current_dir(repo_root())
            .status()
            .expect("cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A name no other test uses: `{prefix}-{ulid}` in lower case.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// The running emulator.
#[derive(Debug, Clone)]
pub struct Emulator {
    pub endpoint: String,
    pub sdk: SdkConfig,
}

static EMULATOR: OnceCell<Emulator> = OnceCell::const_new();

/// The emulator, started on first use when none answers.
pub async fn emulator() -> &'static Emulator {
    EMULATOR
        .get_or_init(|| async {
            let endpoint = match std::env::var("AGENTQ_TEST_ENDPOINT") {
                Ok(e) if !e.is_empty() => e,
                _ => {
                    let port: u16 = std::env::var("AGENTQ_TEST_PORT")
                        .ok()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(4598);
                    tokio::task::spawn_blocking(move || ensure_moto(port))
                        .await
                        .expect("start emulator")
                }
            };
            let sdk = sdk_config(&endpoint).await;
            Emulator { endpoint, sdk }
        })
        .await
}

/// SDK config for the emulator at `endpoint`, static credentials, no metadata probes.
pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(REGION))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            ACCESS_KEY,
            SECRET_KEY,
            None,
            None,
            "agentq-test",
        ))
        .load()
        .await
}

/// Whether an emulator answers `GET /moto-api/` on `127.0.0.1:port` (blocking, up to ~2 s).
pub fn emulator_answers(port: u16) -> bool {
    answers(port)
}

fn answers(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1.") && &buf[9..12] == b"200")
}

fn ensure_moto(port: u16) -> String {
    let endpoint = format!("http://127.0.0.1:{port}");
    if answers(port) {
        return endpoint;
    }
    // One test process starts it; the others wait on the lock and then find it up.
    let lock_path = std::env::temp_dir().join(format!("agentq-test-moto-{port}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .expect("open lock file");
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock");
    if answers(port) {
        return endpoint;
    }
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("agentq-test-moto-{port}.log")))
            .expect("log file");
    use std::os::unix::process::CommandExt;
    // Deliberately detached: the emulator outlives this test process so the next one
    // reuses it; the test command stops it at the end.
    #[allow(clippy::zombie_processes)]
    let _detached = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("python3 -m moto.server (install with: python3 -m pip install 'moto[server]')");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if answers(port) {
            return endpoint;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("moto server did not answer on {endpoint} within 30 s");
}

/// A full set of agentq resources with unique names.
#[derive(Debug, Clone)]
pub struct Resources {
    pub endpoint: String,
    pub sdk: SdkConfig,
    pub queue_url: String,
    pub dlq_url: String,
    pub table: String,
    pub bucket: String,
    pub prefix: String,
    pub secrets_prefix: String,
}

/// Options for [`resources_with`].
#[derive(Debug, Clone)]
pub struct ResourceOptions {
    pub max_receive_count: u32,
    pub visibility_timeout: u32,
}

impl Default for ResourceOptions {
    fn default() -> Self {
        Self {
            max_receive_count: 3,
            visibility_timeout: 30,
        }
    }
}

/// Creates a queue + DLQ (with redrive), a jobs table, a bucket, and a secrets prefix.
pub async fn resources() -> Resources {
    resources_with(ResourceOptions::default()).await
}

pub async fn resources_with(opts: ResourceOptions) -> Resources {
    resources_on(emulator().await, opts).await
}

/// [`resources_with`] on a given emulator (e.g. one a harness started for itself).
pub async fn resources_on(emu: &Emulator, opts: ResourceOptions) -> Resources {
    let name = unique("aq");
    let sqs = aws_sdk_sqs::Client::new(&emu.sdk);
    let dlq_url = create_queue(&sqs, &format!("{name}-dlq"), &[]).await;
    let dlq_arn = queue_arn(&sqs, &dlq_url).await;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": opts.max_receive_count.to_string(),
    })
    .to_string();
    let queue_url = create_queue(
        &sqs,
        &format!("{name}-jobs"),
        &[
            (QueueAttributeName::RedrivePolicy, redrive),
            (
                QueueAttributeName::VisibilityTimeout,
                opts.visibility_timeout.to_string(),
            ),
        ],
    )
    .await;
    let table = format!("{name}-jobs");
    create_table(&aws_sdk_dynamodb::Client::new(&emu.sdk), &table).await;
    let bucket = name.clone();
    agentq_core::config::s3_client(&emu.sdk)
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket");
    Resources {
        endpoint: emu.endpoint.clone(),
        sdk: emu.sdk.clone(),
        queue_url,
        dlq_url,
        table,
        bucket,
        prefix: "agentq".into(),
        secrets_prefix: format!("/{name}/secrets/"),
    }
}

/// Creates a queue with attributes, returns its URL.
pub async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    attrs: &[(QueueAttributeName, String)],
) -> String {
    let mut req = sqs.create_queue().queue_name(name);
    for (k, v) in attrs {
        req = req.attributes(k.clone(), v.clone());
    }
    req.send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url")
}

pub async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("queue arn")
}

/// Creates a jobs table exactly as `infra/template.yaml` defines it.
pub async fn create_table(ddb: &aws_sdk_dynamodb::Client, table: &str) {
    let attr_def = |n: &str, t: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(t)
            .build()
            .expect("attribute definition")
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .expect("key")
    };
    ddb.create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr_def(attr::JOB_ID, ScalarAttributeType::S))
        .attribute_definitions(attr_def(attr::STATUS, ScalarAttributeType::S))
        .attribute_definitions(attr_def(attr::UPDATED_AT, ScalarAttributeType::N))
        .key_schema(key(attr::JOB_ID, KeyType::Hash))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(STATUS_INDEX)
                .key_schema(key(attr::STATUS, KeyType::Hash))
                .key_schema(key(attr::UPDATED_AT, KeyType::Range))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .expect("gsi"),
        )
        .send()
        .await
        .expect("create table");
    ddb.update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name(attr::EXPIRES_AT)
                .enabled(true)
                .build()
                .expect("ttl"),
        )
        .send()
        .await
        .expect("ttl");
}

impl Resources {
    /// The environment a spawned agentq binary needs to reach these resources.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_DEFAULT_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AGENTQ_QUEUE_URL", self.queue_url.as_str()),
            ("AGENTQ_DLQ_URL", self.dlq_url.as_str()),
            ("AGENTQ_TABLE", self.table.as_str()),
            ("AGENTQ_BUCKET", self.bucket.as_str()),
            ("AGENTQ_PREFIX", self.prefix.as_str()),
            ("AGENTQ_SECRETS_PREFIX", self.secrets_prefix.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Settings as the binaries would validate them from [`Resources::env`].
    pub fn settings(&self) -> agentq_core::Settings {
        agentq_core::Settings::from_args(&agentq_core::SettingsArgs {
            queue_url: Some(self.queue_url.clone()),
            dlq_url: Some(self.dlq_url.clone()),
            table: Some(self.table.clone()),
            bucket: Some(self.bucket.clone()),
            prefix: Some(self.prefix.clone()),
            secrets_prefix: Some(self.secrets_prefix.clone()),
        })
        .expect("settings")
    }

    pub fn clients(&self) -> agentq_core::AwsClients {
        agentq_core::AwsClients::new(&self.sdk)
    }

    /// Stores an SSM SecureString.
    pub async fn put_secret(&self, name: &str, value: &str) {
        aws_sdk_ssm::Client::new(&self.sdk)
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .overwrite(true)
            .send()
            .await
            .expect("put parameter");
    }

    /// Every body currently receivable from `queue_url` (received and deleted).
    pub async fn drain(&self, queue_url: &str) -> Vec<String> {
        self.drain_messages(queue_url)
            .await
            .into_iter()
            .map(|m| m.body.unwrap_or_default())
            .collect()
    }

    /// Every message currently receivable from `queue_url`, with its message attributes
    /// (received and deleted).
    pub async fn drain_messages(&self, queue_url: &str) -> Vec<aws_sdk_sqs::types::Message> {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let mut out = Vec::new();
        loop {
            let got = sqs
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .message_attribute_names("All")
                .wait_time_seconds(0)
                .send()
                .await
                .expect("receive");
            let msgs = got.messages.unwrap_or_default();
            if msgs.is_empty() {
                return out;
            }
            for m in msgs {
                if let Some(h) = m.receipt_handle() {
                    sqs.delete_message()
                        .queue_url(queue_url)
                        .receipt_handle(h)
                        .send()
                        .await
                        .expect("delete");
                }
                out.push(m);
            }
        }
    }

    /// Every key under `prefix` in the bucket.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let s3 = agentq_core::config::s3_client(&self.sdk);
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let out = s3
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .expect("list objects");
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            token = out.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                return keys;
            }
        }
    }

    /// An object's text.
    pub async fn object(&self, key: &str) -> String {
        let s3 = agentq_core::config::s3_client(&self.sdk);
        let out = s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e:?}"));
        let bytes = out.body.collect().await.expect("body").into_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
