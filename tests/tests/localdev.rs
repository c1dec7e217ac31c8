//! `localdev/up` provisions agentq from `infra/template.yaml` on a fresh emulator; the
//! created resources are checked through the real APIs, then `localdev/down` stops it.
//! What the emulator cannot do with the template is named here, and the rest is checked.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::Command;

use agentq_core::layout::{STATUS_INDEX, attr};
use agentq_testkit::{repo_root, sdk_config};
use aws_sdk_sqs::types::QueueAttributeName;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn up(port: u16) -> HashMap<String, String> {
    let out = Command::new(repo_root().join("localdev/up"))
        .env("AGENTQ_EMULATOR_PORT", port.to_string())
        .output()
        .expect("localdev/up");
    assert!(
        out.status.success(),
        "localdev/up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout
        .lines()
        .map(|l| {
            let rest = l
                .strip_prefix("export ")
                .unwrap_or_else(|| panic!("stdout has a non-export line: {l:?}"));
            let (k, v) = rest.split_once('=').unwrap();
            (
                k.to_owned(),
                v.trim_matches(|c| c == '\'' || c == '"').to_owned(),
            )
        })
        .collect()
}

struct Down(u16);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("localdev/down"))
            .env("AGENTQ_EMULATOR_PORT", self.0.to_string())
            .status();
    }
}

#[tokio::test]
async fn localdev_up_provisions_from_the_template_and_down_stops_it() {
    let port = free_port();
    let _down = Down(port);
    let env = up(port);
    for k in [
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AGENTQ_QUEUE_URL",
        "AGENTQ_DLQ_URL",
        "AGENTQ_TABLE",
        "AGENTQ_BUCKET",
        "AGENTQ_SECRETS_PREFIX",
    ] {
        assert!(env.contains_key(k), "{k} not exported: {env:?}");
    }
    // A second `up` reuses the running emulator and prints the same settings.
    assert_eq!(up(port), env);

    let sdk = sdk_config(&env["AWS_ENDPOINT_URL"]).await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&env["AGENTQ_QUEUE_URL"])
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap();
    let redrive: serde_json::Value =
        serde_json::from_str(&attrs[&QueueAttributeName::RedrivePolicy]).unwrap();
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&env["AGENTQ_DLQ_URL"])
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    assert_eq!(redrive["deadLetterTargetArn"], dlq_arn.as_str());
    assert_eq!(
        redrive["maxReceiveCount"].to_string().trim_matches('"'),
        "3"
    );
    let vis: u32 = attrs[&QueueAttributeName::VisibilityTimeout]
        .parse()
        .unwrap();
    assert!(
        vis >= 900,
        "visibility timeout {vis} is below the function timeout"
    );

    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    let table = ddb
        .describe_table()
        .table_name(&env["AGENTQ_TABLE"])
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    assert_eq!(table.key_schema()[0].attribute_name(), attr::JOB_ID);
    let gsi = &table.global_secondary_indexes()[0];
    assert_eq!(gsi.index_name(), Some(STATUS_INDEX));
    let gsi_keys: Vec<&str> = gsi
        .key_schema()
        .iter()
        .map(|k| k.attribute_name())
        .collect();
    assert_eq!(gsi_keys, vec![attr::STATUS, attr::UPDATED_AT]);
    // The emulator drops TTL from the template; localdev repairs it with UpdateTimeToLive.
    let ttl = ddb
        .describe_time_to_live()
        .table_name(&env["AGENTQ_TABLE"])
        .send()
        .await
        .unwrap()
        .time_to_live_description
        .unwrap();
    assert_eq!(ttl.attribute_name(), Some(attr::EXPIRES_AT));

    agentq_core::config::s3_client(&sdk)
        .head_bucket()
        .bucket(&env["AGENTQ_BUCKET"])
        .send()
        .await
        .expect("bucket exists");
    let param = format!("{}demo/api-token", env["AGENTQ_SECRETS_PREFIX"]);
    let p = aws_sdk_ssm::Client::new(&sdk)
        .get_parameter()
        .name(&param)
        .with_decryption(true)
        .send()
        .await
        .expect("demo secret")
        .parameter
        .unwrap();
    assert_eq!(
        p.r#type(),
        Some(&aws_sdk_ssm::types::ParameterType::SecureString)
    );

    // No enabled event source mapping may exist on the emulator (it hijacks SendMessage).
    let maps = aws_sdk_lambda::Client::new(&sdk)
        .list_event_source_mappings()
        .send()
        .await
        .unwrap();
    assert!(
        maps.event_source_mappings()
            .iter()
            .all(|m| m.state() != Some("Enabled")),
        "an enabled mapping was left on the emulator"
    );
}

/// The event source mappings cannot be created on the emulator: its CloudFormation does
/// not support `AWS::Lambda::Alias`, so a mapping on the `live` alias fails with "Missing
/// FunctionName" (and an enabled mapping would hijack SendMessage anyway). Their settings
/// are checked in the template itself instead, read with cfn-lint's CloudFormation YAML
/// loader; `agentq-dispatcher deploy` creates the same settings through the Lambda API and
/// is tested against the emulator in the dispatcher crate.
#[test]
fn template_mappings_use_partial_batch_responses_and_bounded_concurrency() {
    let script = r#"
import json, sys
from cfnlint.decode.cfn_yaml import load
t = load(sys.argv[1])
print(json.dumps({k: v["Properties"] for k, v in t["Resources"].items()
                  if v["Type"] == "AWS::Lambda::EventSourceMapping"}))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(repo_root().join("infra/template.yaml"))
        .output()
        .expect("python3 with cfn-lint");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for name in ["AgentMapping", "DispatcherMapping"] {
        let m = &maps[name];
        assert_eq!(
            m["FunctionResponseTypes"],
            serde_json::json!(["ReportBatchItemFailures"]),
            "{name}"
        );
        assert!(
            m["ScalingConfig"]["MaximumConcurrency"].is_object()
                || m["ScalingConfig"]["MaximumConcurrency"].is_number(),
            "{name}"
        );
        assert!(!m["BatchSize"].is_null(), "{name}");
        // Enabled is a parameter, so local emulators can create them disabled (or not at all).
        assert!(m["Enabled"].get("Fn::If").is_some(), "{name}");
    }
    assert_eq!(
        maps["AgentMapping"]["FunctionName"]["Ref"],
        "AgentLiveAlias"
    );
}
