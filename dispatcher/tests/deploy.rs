//! `deploy` against the emulator. moto has ECR's API but no registry (no push) and runs
//! no images, so these tests record images with `PutImage` (what a push ends with) and
//! deploy them with `--image-tag`; the build itself runs only where a container engine
//! answers, and says so when it is skipped. Mappings are always created disabled: an
//! enabled mapping on the emulator hijacks SendMessage.

use std::path::PathBuf;

use agentq_dispatcher::DeployError;
use agentq_dispatcher::deploy::builder::{self, BuilderChoice};
use agentq_dispatcher::deploy::{
    self, Action, DeployArgs, DeployClients, DeployReport, Queues, Role,
};
use agentq_testkit::{ResourceOptions, Resources, emulator, resources_with, unique};
use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: DeployArgs,
}

fn args(extra: &[&str]) -> DeployArgs {
    let mut argv = vec!["deploy"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).expect("deploy args").args
}

/// A role in the emulator's IAM (moto's CreateFunction checks the role exists).
fn create_role(endpoint: &str, name: &str) -> String {
    let script = format!(
        "import boto3,json\n\
         iam=boto3.client('iam',endpoint_url='{endpoint}',region_name='us-east-1',aws_access_key_id='test',aws_secret_access_key='test')\n\
         doc=json.dumps({{'Version':'2012-10-17','Statement':[{{'Effect':'Allow','Principal':{{'Service':'lambda.amazonaws.com'}},'Action':'sts:AssumeRole'}}]}})\n\
         print(iam.create_role(RoleName='{name}',AssumeRolePolicyDocument=doc)['Role']['Arn'])\n"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 with boto3 (moto's dependency)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Records an image in ECR as a push would (moto has no registry): returns its digest.
async fn put_image(ecr: &aws_sdk_ecr::Client, repo: &str, tag: &str) -> String {
    let hex = |seed: &str| {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in seed.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        format!("{h:016x}").repeat(4)
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 1469,
            "digest": format!("sha256:{}", hex(&format!("{repo}{tag}config"))),
        },
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 1024,
            "digest": format!("sha256:{}", hex(&format!("{repo}{tag}layer"))),
        }]
    });
    ecr.put_image()
        .repository_name(repo)
        .image_tag(tag)
        .image_manifest(manifest.to_string())
        .send()
        .await
        .expect("put image")
        .image()
        .and_then(|i| i.image_id())
        .and_then(|i| i.image_digest())
        .expect("digest")
        .to_owned()
}

struct Fixture {
    r: Resources,
    c: DeployClients,
    function: String,
    repo: String,
}

async fn fixture(visibility: u32) -> Fixture {
    let r = resources_with(ResourceOptions {
        max_receive_count: 3,
        visibility_timeout: visibility,
    })
    .await;
    // The DLQ is the dispatcher function's event source: the same rule applies to it.
    aws_sdk_sqs::Client::new(&r.sdk)
        .set_queue_attributes()
        .queue_url(&r.dlq_url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
            visibility.to_string(),
        )
        .send()
        .await
        .expect("DLQ visibility");
    Fixture {
        c: DeployClients::new(&r.sdk),
        function: unique("fn"),
        repo: unique("repo"),
        r,
    }
}

impl Fixture {
    async fn deploy(&self, extra: &[&str]) -> Result<DeployReport, DeployError> {
        let mut argv = vec![
            "--function",
            &self.function,
            "--repository",
            &self.repo,
            "--enabled",
            "false",
        ];
        argv.extend_from_slice(extra);
        deploy::run(
            &self.c,
            &args(&argv),
            &Queues {
                jobs: Some(self.r.queue_url.clone()),
                dlq: Some(self.r.dlq_url.clone()),
            },
            &agentq_testkit::repo_root(),
            &vec![("AGENTQ_QUEUE_URL".into(), self.r.queue_url.clone())],
        )
        .await
    }

    /// Everything deploy could change, for before/after comparisons.
    async fn listing(&self) -> String {
        let l = &self.c.lambda;
        let fns: Vec<String> = l
            .list_functions()
            .send()
            .await
            .expect("functions")
            .functions()
            .iter()
            .filter_map(|f| f.function_name().map(str::to_owned))
            .filter(|n| *n == self.function)
            .collect();
        let code = match l.get_function().function_name(&self.function).send().await {
            Ok(f) => format!("{:?}", f.code().and_then(|c| c.image_uri())),
            Err(_) => "no function".into(),
        };
        let versions = match l
            .list_versions_by_function()
            .function_name(&self.function)
            .send()
            .await
        {
            Ok(v) => v
                .versions()
                .iter()
                .filter_map(|v| v.version().map(str::to_owned))
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => "-".into(),
        };
        let aliases = match l.list_aliases().function_name(&self.function).send().await {
            Ok(a) => a
                .aliases()
                .iter()
                .map(|a| format!("{:?}->{:?}", a.name(), a.function_version()))
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => "-".into(),
        };
        let arn =
            agentq_testkit::queue_arn(&aws_sdk_sqs::Client::new(&self.r.sdk), &self.r.queue_url)
                .await;
        let mappings = l
            .list_event_source_mappings()
            .event_source_arn(arn)
            .send()
            .await
            .expect("mappings")
            .event_source_mappings()
            .iter()
            .map(|m| {
                format!(
                    "{:?} {:?} {:?} {:?}",
                    m.uuid(),
                    m.batch_size(),
                    m.state(),
                    m.function_arn()
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let repos = self
            .c
            .ecr
            .describe_repositories()
            .repository_names(&self.repo)
            .send()
            .await
            .map(|r| r.repositories().len())
            .unwrap_or(0);
        format!(
            "fns={fns:?} code={code} versions={versions} aliases={aliases} mappings={mappings} repos={repos}"
        )
    }

    /// The image URI the function's code points at.
    async fn image_uri(&self) -> Option<String> {
        self.c
            .lambda
            .get_function()
            .function_name(&self.function)
            .send()
            .await
            .expect("function")
            .code()
            .and_then(|c| c.image_uri())
            .map(str::to_owned)
    }

    /// The version the `live` alias points at.
    async fn live_version(&self) -> String {
        self.c
            .lambda
            .get_alias()
            .function_name(&self.function)
            .name("live")
            .send()
            .await
            .expect("alias live")
            .function_version()
            .expect("version")
            .to_owned()
    }

    async fn mapping(&self) -> aws_sdk_lambda::types::EventSourceMappingConfiguration {
        let arn =
            agentq_testkit::queue_arn(&aws_sdk_sqs::Client::new(&self.r.sdk), &self.r.queue_url)
                .await;
        let out = self
            .c
            .lambda
            .list_event_source_mappings()
            .event_source_arn(arn)
            .send()
            .await
            .expect("mappings");
        assert_eq!(out.event_source_mappings().len(), 1, "{out:?}");
        out.event_source_mappings()[0].clone()
    }
}

fn step(report: &DeployReport, name: &str) -> Action {
    report
        .steps
        .iter()
        .find(|s| s.step == name)
        .unwrap_or_else(|| panic!("no step {name}: {report:?}"))
        .action
}

#[tokio::test]
async fn deploy_bootstraps_updates_in_place_and_is_idempotent() {
    let f = fixture(6 * 60).await;
    let role = create_role(&f.r.endpoint, &unique("agentq-role"));

    // A fresh account: the repository is created (scan on push, immutable tags), and
    // the missing image is reported with what to do.
    let err = f
        .deploy(&[
            "--image-tag",
            "v1",
            "--create-function",
            "--role-arn",
            &role,
            "--function-timeout-seconds",
            "60",
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, DeployError::NoImage { .. }), "{err}");
    assert!(err.to_string().contains("push it first"), "{err}");
    let repo =
        f.c.ecr
            .describe_repositories()
            .repository_names(&f.repo)
            .send()
            .await
            .expect("repository created")
            .repositories()[0]
            .clone();
    assert_eq!(
        repo.image_tag_mutability(),
        Some(&aws_sdk_ecr::types::ImageTagMutability::Immutable)
    );
    assert_eq!(
        repo.image_scanning_configuration()
            .map(|s| s.scan_on_push()),
        Some(true)
    );
    let repo_uri = repo.repository_uri().expect("uri").to_owned();

    // First deploy: function created from the digest, version, alias, mapping.
    let d1 = put_image(&f.c.ecr, &f.repo, "v1").await;
    let report = f
        .deploy(&[
            "--image-tag",
            "v1",
            "--create-function",
            "--role-arn",
            &role,
            "--function-timeout-seconds",
            "60",
            "--batch-size",
            "5",
            "--max-concurrency",
            "5",
        ])
        .await
        .expect("deploy v1");
    assert!(report.warnings.is_empty(), "{report:?}");
    assert_eq!(
        report.image_uri.as_deref(),
        Some(&*format!("{repo_uri}@{d1}"))
    );
    assert_eq!(step(&report, "ecr-repository"), Action::Unchanged);
    assert_eq!(step(&report, "function"), Action::Create);
    assert_eq!(step(&report, "version"), Action::Publish);
    assert_eq!(step(&report, "alias"), Action::Create);
    assert_eq!(step(&report, "event-source"), Action::Create);
    assert_eq!(f.image_uri().await, Some(format!("{repo_uri}@{d1}")));
    let v1 = f.live_version().await;
    assert_eq!(report.functions[0].version.as_deref(), Some(v1.as_str()));
    let m = f.mapping().await;
    let uuid = m.uuid().expect("uuid").to_owned();
    assert_eq!(m.batch_size(), Some(5));
    assert_eq!(m.state(), Some("Disabled"));
    assert!(
        m.function_response_types()
            .contains(&aws_sdk_lambda::types::FunctionResponseType::ReportBatchItemFailures)
    );
    assert_eq!(
        m.scaling_config().and_then(|s| s.maximum_concurrency()),
        Some(5)
    );
    assert_eq!(
        report.functions[0].mapping_uuid.as_deref(),
        Some(uuid.as_str())
    );

    // Again with nothing changed: every step is in place, nothing is written.
    let before = f.listing().await;
    let again = f
        .deploy(&[
            "--image-tag",
            "v1",
            "--batch-size",
            "5",
            "--max-concurrency",
            "5",
        ])
        .await
        .expect("re-deploy");
    assert!(!again.changes(), "{}", again.render());
    assert_eq!(f.listing().await, before);

    // A new image and batch size: code, version, alias move; the mapping is updated in place.
    let d2 = put_image(&f.c.ecr, &f.repo, "v2").await;
    assert_ne!(d1, d2);
    let r2 = f
        .deploy(&[
            "--image-tag",
            "v2",
            "--batch-size",
            "7",
            "--max-concurrency",
            "5",
        ])
        .await
        .expect("deploy v2");
    assert_eq!(step(&r2, "function-code"), Action::Update);
    assert_eq!(step(&r2, "version"), Action::Publish);
    assert_eq!(step(&r2, "alias"), Action::Update);
    assert_eq!(step(&r2, "event-source"), Action::Update);
    assert_eq!(f.image_uri().await, Some(format!("{repo_uri}@{d2}")));
    let v2 = f.live_version().await;
    assert_ne!(v1, v2, "the alias moved to a new version");
    let m2 = f.mapping().await;
    assert_eq!(
        m2.uuid(),
        Some(uuid.as_str()),
        "same mapping, updated in place"
    );
    assert_eq!(m2.batch_size(), Some(7));
    assert_eq!(m2.state(), Some("Disabled"));

    // A dry run of a third image changes nothing and says what it would do.
    put_image(&f.c.ecr, &f.repo, "v3").await;
    let before = f.listing().await;
    let dry = f
        .deploy(&["--image-tag", "v3", "--batch-size", "9", "--dry-run"])
        .await
        .expect("dry run");
    assert_eq!(f.listing().await, before);
    assert!(dry.dry_run);
    assert_eq!(step(&dry, "function-code"), Action::Update);
    assert_eq!(step(&dry, "version"), Action::Publish);
    assert_eq!(step(&dry, "event-source"), Action::Update);
    assert!(dry.render().contains("dry run"), "{}", dry.render());

    // Nothing changed after v2 by an --image-uri deploy of the same digest.
    let same = f
        .deploy(&[
            "--image-uri",
            &format!("{repo_uri}@{d2}"),
            "--batch-size",
            "7",
            "--max-concurrency",
            "5",
        ])
        .await
        .expect("deploy by uri");
    assert!(!same.changes(), "{}", same.render());
}

#[tokio::test]
async fn a_queue_whose_visibility_is_shorter_than_the_function_timeout_is_refused() {
    let f = fixture(30).await;
    let role = create_role(&f.r.endpoint, &unique("agentq-role"));
    let before = f.listing().await;
    let err = f
        .deploy(&[
            "--image-tag",
            "v1",
            "--create-function",
            "--role-arn",
            &role,
            "--function-timeout-seconds",
            "60",
        ])
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DeployError::VisibilityTooShort { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("visibility timeout 30s is shorter than the function timeout 60s"),
        "{msg}"
    );
    assert!(msg.contains("360"), "names the 6x recommendation: {msg}");
    assert_eq!(
        f.listing().await,
        before,
        "refused before changing anything"
    );

    // Equal is allowed, with the 6x warning.
    put_image_after_bootstrap(&f).await;
    let report = f
        .deploy(&[
            "--image-tag",
            "v1",
            "--create-function",
            "--role-arn",
            &role,
            "--timeout",
            "30",
            "--dry-run",
        ])
        .await
        .expect("dry run");
    assert!(
        report.warnings.iter().any(|w| w.contains("6x")),
        "{report:?}"
    );
}

async fn put_image_after_bootstrap(f: &Fixture) {
    f.c.ecr
        .create_repository()
        .repository_name(&f.repo)
        .send()
        .await
        .expect("repository");
    put_image(&f.c.ecr, &f.repo, "v1").await;
}

#[tokio::test]
async fn a_missing_function_is_reported_with_the_fix() {
    let f = fixture(6 * 60).await;
    let err = f.deploy(&["--image-tag", "v1"]).await.unwrap_err();
    assert!(matches!(err, DeployError::NoFunction { .. }), "{err}");
    assert!(err.to_string().contains("--create-function"), "{err}");
}

#[tokio::test]
async fn the_build_context_has_the_agent_files_and_the_binary_as_bootstrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("agent-binary");
    std::fs::write(&bin, b"#!/bin/sh\necho agent\n").expect("fake binary");
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    let agent_dir = agentq_testkit::repo_root().join("agent");
    let files = builder::prepare_context(&agent_dir, &bin, &ctx)
        .await
        .expect("context");
    for f in ["Dockerfile", "mcp.json", "package.json", "bootstrap"] {
        assert!(files.contains(&f.to_owned()), "{f}: {files:?}");
        assert!(ctx.join(f).exists(), "{f}");
    }
    assert_eq!(
        std::fs::read(ctx.join("bootstrap")).expect("bootstrap"),
        std::fs::read(&bin).expect("binary")
    );
    // A missing binary says how to build it.
    let err = builder::prepare_context(
        &agent_dir,
        &PathBuf::from("/nonexistent/agentq-agent"),
        &ctx,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("cargo build --release -p agentq-agent"),
        "{err}"
    );
}

/// The image build runs where a container engine answers; elsewhere `deploy` without
/// `--image-uri`/`--image-tag` must fail with the clear "no container builder found".
#[tokio::test]
async fn the_image_build_or_a_clear_no_builder_error() {
    match builder::detect(BuilderChoice::Auto).await {
        Err(DeployError::NoBuilder { detail }) => {
            eprintln!(
                "no container engine here ({detail}): checking the error a real deploy gives"
            );
            let f = fixture(6 * 60).await;
            let role = create_role(&f.r.endpoint, &unique("agentq-role"));
            let before = f.listing().await;
            let err = f
                .deploy(&["--create-function", "--role-arn", &role, "--timeout", "60"])
                .await
                .unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("no container builder found"), "{msg}");
            assert!(msg.contains("--image-uri"), "says what to do: {msg}");
            assert_eq!(f.listing().await, before, "nothing created");
        }
        Err(other) => panic!("detect: {other}"),
        Ok(engine) => {
            eprintln!("building the agent image with {engine:?}");
            let dir = tempfile::tempdir().expect("tempdir");
            let bin = agentq_testkit::binary("agentq-agent");
            let dispatcher = agentq_testkit::binary("agentq-dispatcher");
            builder::prepare_context_with(
                &agentq_testkit::repo_root().join("agent"),
                &bin,
                Some(&dispatcher),
                dir.path(),
            )
            .await
            .expect("context");
            builder::build(
                engine,
                &format!("agentq-agent:{}", unique("test")),
                dir.path(),
            )
            .await
            .expect("image build");
        }
    }
}

#[tokio::test]
async fn the_binary_prints_a_json_plan_on_dry_run() {
    let emu = emulator().await;
    let f = fixture(6 * 60).await;
    let role = create_role(&emu.endpoint, &unique("agentq-role"));
    put_image_after_bootstrap(&f).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq-dispatcher"))
        .args([
            "deploy",
            "--dry-run",
            "--output",
            "json",
            "--function",
            &f.function,
            "--repository",
            &f.repo,
            "--image-tag",
            "v1",
            "--create-function",
            "--role-arn",
            &role,
            "--function-timeout-seconds",
            "60",
            "--enabled",
            "false",
        ])
        .envs(f.r.env())
        .output()
        .await
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json report");
    assert_eq!(v["dry_run"], true);
    let steps: Vec<(String, String)> = v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap_or_default().to_owned(),
                s["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        steps.contains(&("function".into(), "create".into())),
        "{steps:?}"
    );
    assert!(
        steps.contains(&("event-source".into(), "create".into())),
        "{steps:?}"
    );
    // Nothing was created.
    assert!(
        f.c.lambda
            .get_function()
            .function_name(&f.function)
            .send()
            .await
            .is_err()
    );
}

/// One image, two functions: the dispatcher function is moved to the same image as the
/// agent, gets its own version and `live` alias, and the DLQ as its event source.
#[tokio::test]
async fn deploy_moves_the_dispatcher_function_with_the_dlq_as_its_event_source() {
    let f = fixture(6 * 60).await;
    let role = create_role(&f.r.endpoint, &unique("agentq-role"));
    put_image_after_bootstrap(&f).await;
    let dispatcher = unique("fn-dispatcher");
    let report = f
        .deploy(&[
            "--dispatcher-function",
            &dispatcher,
            "--image-tag",
            "v1",
            "--create-function",
            "--role-arn",
            &role,
            "--timeout",
            "60",
        ])
        .await
        .expect("deploy both");
    let roles: Vec<(Role, &str, &str)> = report
        .functions
        .iter()
        .map(|x| (x.role, x.function.as_str(), x.queue_url.as_str()))
        .collect();
    assert_eq!(
        roles,
        vec![
            (Role::Agent, f.function.as_str(), f.r.queue_url.as_str()),
            (Role::Dispatcher, dispatcher.as_str(), f.r.dlq_url.as_str()),
        ]
    );
    // The dispatcher's entrypoint is its own binary in the shared image.
    let conf =
        f.c.lambda
            .get_function_configuration()
            .function_name(&dispatcher)
            .send()
            .await
            .expect("dispatcher function");
    let image = conf.image_config_response().and_then(|r| r.image_config());
    assert_eq!(
        image.map(|i| (i.entry_point().to_vec(), i.command().to_vec())),
        Some((
            vec!["/opt/agentq/bin/agentq-dispatcher".to_owned()],
            vec!["lambda".to_owned()]
        )),
        "{conf:?}"
    );
    let dlq_arn =
        agentq_testkit::queue_arn(&aws_sdk_sqs::Client::new(&f.r.sdk), &f.r.dlq_url).await;
    let ms =
        f.c.lambda
            .list_event_source_mappings()
            .event_source_arn(&dlq_arn)
            .send()
            .await
            .expect("mappings");
    let m = &ms.event_source_mappings()[0];
    assert_eq!(ms.event_source_mappings().len(), 1);
    assert!(
        m.function_arn().is_some_and(|a| a.contains(&dispatcher)),
        "{m:?}"
    );
    assert_eq!(m.batch_size(), Some(deploy::DISPATCHER_BATCH_SIZE));
    assert_eq!(
        m.scaling_config().and_then(|s| s.maximum_concurrency()),
        Some(deploy::DISPATCHER_MAX_CONCURRENCY)
    );
    assert_eq!(m.state(), Some("Disabled"));
    // Again, only the dispatcher: nothing to change.
    let again = f
        .deploy(&[
            "--dispatcher-function",
            &dispatcher,
            "--only",
            "dispatcher",
            "--image-tag",
            "v1",
        ])
        .await
        .expect("again");
    assert_eq!(again.functions.len(), 1);
    assert!(!again.changes(), "{}", again.render());
}

/// The first deployment pushes before any function exists: `--push-only` needs no
/// function and no queue, and touches neither.
#[tokio::test]
async fn push_only_resolves_the_image_without_functions_or_queues() {
    let f = fixture(6 * 60).await;
    put_image_after_bootstrap(&f).await;
    let before = f.listing().await;
    let report = deploy::run(
        &f.c,
        &args(&[
            "--function",
            &f.function,
            "--repository",
            &f.repo,
            "--push-only",
            "--image-tag",
            "v1",
        ]),
        &Queues::default(),
        &agentq_testkit::repo_root(),
        &Vec::new(),
    )
    .await
    .expect("push only");
    assert!(report.functions.is_empty());
    assert!(
        report
            .image_uri
            .as_deref()
            .is_some_and(|u| u.contains("@sha256:")),
        "{report:?}"
    );
    assert!(report.render().contains("image: "), "{}", report.render());
    assert_eq!(f.listing().await, before);
}

/// Without a container engine a dry run still prints the whole plan and exits 0, with
/// the build marked as not checked; with one, the build is checked.
#[tokio::test]
async fn a_dry_run_without_an_engine_prints_the_whole_plan() {
    let f = fixture(6 * 60).await;
    let role = create_role(&f.r.endpoint, &unique("agentq-role"));
    put_image_after_bootstrap(&f).await;
    let dispatcher = unique("fn-dispatcher");
    for only in ["agent", "dispatcher"] {
        f.deploy(&[
            "--dispatcher-function",
            &dispatcher,
            "--only",
            only,
            "--image-tag",
            "v1",
            "--create-function",
            "--role-arn",
            &role,
            "--timeout",
            "60",
        ])
        .await
        .expect("functions exist");
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq-dispatcher"))
        .args([
            "deploy",
            "--dry-run",
            "--repository",
            &f.repo,
            "--tag",
            "next",
        ])
        .env("AGENTQ_FUNCTION", &f.function)
        .env("AGENTQ_DISPATCHER_FUNCTION", &dispatcher)
        .envs(f.r.env())
        .output()
        .await
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "dry run",
        "[build    ] image",
        &format!("{}: function-code", f.function),
        &format!("{}: version", f.function),
        &format!("{}: alias", f.function),
        &format!("{}: event-source", f.function),
        &format!("{dispatcher}: function-code"),
        &format!("{dispatcher}: event-source"),
    ] {
        assert!(stdout.contains(needle), "{needle:?} in:\n{stdout}");
    }
    let engine = builder::detect(BuilderChoice::Auto).await;
    assert_eq!(
        engine.is_err(),
        stdout.contains("not checked: no container engine"),
        "{stdout}"
    );
}
