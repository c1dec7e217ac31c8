//! `infra/README.md`'s deploy steps, run as written against the local emulator, and
//! `agentq-dispatcher deploy --dry-run` right after `localdev/up`.
//!
//! The README's shell blocks are marked `<!-- deploy-step: N -->`; this test runs them
//! with bash, the AWS CLI and the workspace's binaries on `PATH`. Two parts cannot run
//! here, and are stood in for:
//! - the image build and push (step 3's `deploy --push-only --tag`): no container engine,
//!   and the emulator's ECR has no registry. The test records the image with
//!   `aws ecr put-image` (what a push ends with) and runs `deploy --push-only --image-tag`;
//! - step 4: the emulator's CloudFormation cannot update this stack (its change sets lose
//!   the outputs, and UpdateStack stalls on `AWS::Lambda::Alias`). Steps 5 and 6 run on the
//!   stack `localdev/up` created with the functions, which is what step 4 leaves.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Command, Output};

use agentq_testkit::{binary, repo_root};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The README's marked blocks, by step number, with the list indentation removed.
fn steps() -> BTreeMap<u32, String> {
    let readme = std::fs::read_to_string(repo_root().join("infra/README.md")).expect("README");
    let mut out = BTreeMap::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(n) = line
            .trim()
            .strip_prefix("<!-- deploy-step: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        let n: u32 = n.parse().expect("step number");
        let fence = lines.next().expect("a fence after the marker");
        assert_eq!(
            fence.trim(),
            "```sh",
            "step {n}: a ```sh block follows its marker"
        );
        let indent = fence.len() - fence.trim_start().len();
        let mut block = String::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            block.push_str(l.get(indent..).unwrap_or(l.trim_start()));
            block.push('\n');
        }
        out.insert(n, block);
    }
    out
}

struct Down(u16);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("localdev/down"))
            .env("AGENTQ_EMULATOR_PORT", self.0.to_string())
            .status();
    }
}

/// `localdev/up` on `port`: its exports.
fn up(port: u16) -> Vec<(String, String)> {
    let out = Command::new(repo_root().join("localdev/up"))
        .env("AGENTQ_EMULATOR_PORT", port.to_string())
        .output()
        .expect("localdev/up");
    assert!(
        out.status.success(),
        "localdev/up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

fn bash(script: &str, env: &[(String, String)], dir: &std::path::Path) -> Output {
    // The workspace's binaries first on PATH, as the README's "Needs" says.
    binary("agentq");
    binary("agentq-agent");
    let bins = binary("agentq-dispatcher")
        .parent()
        .expect("target dir")
        .to_owned();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .env_clear()
        .env("PATH", path)
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(dir)
        .output()
        .expect("bash")
}

fn ok(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_readme_deploy_steps_run_as_written() {
    let steps = steps();
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (0..=6).collect::<Vec<_>>(),
        "every step is marked"
    );
    let port = free_port();
    let _down = Down(port);
    let local = up(port);
    let get = |k: &str| {
        local
            .iter()
            .find(|(x, _)| x == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("localdev/up exports {k}"))
    };
    for k in [
        "AGENTQ_FUNCTION",
        "AGENTQ_DISPATCHER_FUNCTION",
        "AGENTQ_REPOSITORY",
    ] {
        get(k);
    }
    // Run from the repository root (the README's `file://infra/template.yaml`), writing
    // nothing there: job.json goes to a temp dir the steps are pointed at with cd.
    let work = tempfile::tempdir().expect("tempdir");
    let root = repo_root();
    let aws: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", get("AWS_ENDPOINT_URL")),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("ANTHROPIC_API_KEY", "sk-test-readme-1234".into()),
        (
            "FAKE_MANIFEST",
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1469,
                           "digest": format!("sha256:{}", "ab".repeat(32))},
                "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 1024,
                            "digest": format!("sha256:{}", "cd".repeat(32))}]
            })
            .to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    // Steps 0-3: the first-time path on a fresh stack, up to the pushed image.
    let push = "agentq-dispatcher deploy --push-only --tag \"$TAG\"";
    assert!(steps[&3].contains(push), "step 3 pushes with: {push}");
    let step3 = steps[&3].replace(
        push,
        "aws ecr put-image --repository-name \"$AGENTQ_REPOSITORY\" --image-tag \"$TAG\" --image-manifest \"$FAKE_MANIFEST\" >/dev/null\n\
         agentq-dispatcher deploy --push-only --image-tag \"$TAG\"",
    );
    let first = format!(
        "cd {root}\n{}{}{}{step3}echo \"DIGEST=$DIGEST\"\n",
        steps[&0],
        steps[&1],
        steps[&2],
        root = root.display()
    );
    let stdout = ok("steps 0-3", &bash(&first, &aws, work.path()));
    let digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DIGEST="))
        .expect("DIGEST printed")
        .to_owned();
    assert!(digest.starts_with("sha256:"), "{stdout}");
    assert!(
        stdout.contains("image: "),
        "push-only names the image: {stdout}"
    );

    // Steps 5-6 on the stack with functions (see the module doc for step 4).
    let mut env = aws.clone();
    env.push(("DIGEST".into(), digest));
    let rest = format!(
        "{}STACK={}\n{}cd {}\n{}agentq-dispatcher deploy --dry-run\n",
        steps[&0],
        "agentq-local",
        steps[&5],
        work.path().display(),
        steps[&6],
    );
    let out = bash(&rest, &env, work.path());
    let stdout = ok("steps 5-6", &out);
    for needle in [
        "deploy plan (dry run, nothing changed)",
        &get("AGENTQ_FUNCTION"),
        &get("AGENTQ_DISPATCHER_FUNCTION"),
        "event-source",
        "QUEUED",
    ] {
        assert!(stdout.contains(needle), "{needle:?} in:\n{stdout}");
    }
    // The last dry run has no image: the build is planned; without an engine, marked.
    let last_plan = stdout.rsplit("deploy plan").next().unwrap_or_default();
    assert!(last_plan.contains("[build    ] image"), "{stdout}");
}
