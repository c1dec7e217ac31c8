//! The template's large tier on Lambda Managed Instances (`LargeTierCompute`), checked in
//! the template itself: no emulator serves capacity providers, and the deployed shape is
//! what matters. `infra/template.yaml` is read with PyYAML (its short-form tags kept as
//! `{"!Tag": value}`), its conditions evaluated for a few parameter sets, and then:
//!
//! - the capacity provider and its operator role exist exactly when the large tier's
//!   functions exist and `LargeTierCompute=ManagedInstances`, and nowhere else;
//! - the operator role trusts only Lambda of this account and carries only the AWS managed
//!   policy the docs name as the minimum;
//! - the large function is attached to that provider, one job per execution environment,
//!   with the longer timeout (up to the documented 5,400 s), and its queue's visibility
//!   covers that timeout;
//! - the dispatcher gets `AGENTQ_ESCALATE_TIMEOUTS=true` (the variable its binary reads)
//!   only then, and no value at all otherwise (the policy file decides);
//! - the stack refuses ManagedInstances without the large tier, subnets or security groups.

use std::collections::BTreeMap;
use std::process::Command;

use agentq_testkit::repo_root;
use serde_json::{Value, json};

/// The template as JSON; `!Ref X` becomes `{"!Ref": "X"}`, long forms stay as written.
fn template() -> Value {
    let script = r#"
import json, sys, yaml
class L(yaml.SafeLoader): pass
def tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode): v = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode): v = loader.construct_sequence(node, deep=True)
    else: v = loader.construct_mapping(node, deep=True)
    return {"!" + suffix: v}
L.add_multi_constructor("!", tag)
print(json.dumps(yaml.load(open(sys.argv[1]), Loader=L)))
"#;
    let path = repo_root().join("infra/template.yaml");
    let out = Command::new("python3")
        .args(["-c", script, path.to_str().expect("utf-8 path")])
        .output()
        .expect("python3 (with PyYAML) runs");
    assert!(
        out.status.success(),
        "reading the template failed (python3 with PyYAML is required):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("template as JSON")
}

/// The one value of a short or long form intrinsic (`!Ref`/`Ref`, `!If`/`Fn::If`, …).
fn intrinsic<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    let o = v.as_object()?;
    if o.len() != 1 {
        return None;
    }
    o.get(&format!("!{name}"))
        .or_else(|| o.get(&format!("Fn::{name}")))
        .or_else(|| (name == "Ref").then(|| o.get("Ref")).flatten())
}

/// Parameter values: the template's defaults, overridden by `set`.
fn parameters(t: &Value, set: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut p: BTreeMap<String, String> = t["Parameters"]
        .as_object()
        .expect("Parameters")
        .iter()
        .map(|(k, v)| {
            let d = match &v["Default"] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (k.clone(), d)
        })
        .collect();
    for (k, v) in set {
        assert!(p.contains_key(*k), "no parameter {k}");
        p.insert((*k).into(), (*v).into());
    }
    p
}

/// Evaluates the template's conditions for the parameter values `p`.
struct Conditions<'a> {
    t: &'a Value,
    p: BTreeMap<String, String>,
}

impl Conditions<'_> {
    fn value(&self, v: &Value) -> String {
        if let Some(Value::String(name)) = intrinsic(v, "Ref") {
            return self.p.get(name).cloned().unwrap_or_else(|| name.clone());
        }
        match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    fn eval(&self, c: &Value) -> bool {
        if let Some(Value::String(name)) = c.as_object().and_then(|o| o.get("Condition")) {
            return self.named(name);
        }
        if let Some(Value::Array(a)) = intrinsic(c, "Equals") {
            return self.value(&a[0]) == self.value(&a[1]);
        }
        if let Some(Value::Array(a)) = intrinsic(c, "Not") {
            return !self.eval(&a[0]);
        }
        if let Some(Value::Array(a)) = intrinsic(c, "And") {
            return a.iter().all(|x| self.eval(x));
        }
        if let Some(Value::Array(a)) = intrinsic(c, "Or") {
            return a.iter().any(|x| self.eval(x));
        }
        panic!("condition this test cannot evaluate: {c}");
    }

    fn named(&self, name: &str) -> bool {
        let c = &self.t["Conditions"][name];
        assert!(!c.is_null(), "no condition {name}");
        self.eval(c)
    }

    /// The resources a stack with these parameters creates.
    fn resources(&self) -> Vec<String> {
        self.t["Resources"]
            .as_object()
            .expect("Resources")
            .iter()
            .filter(|(_, r)| r["Condition"].as_str().is_none_or(|c| self.named(c)))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

const IMAGE: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com/agentq-agent@sha256:00";
const MI_RESOURCES: [&str; 2] = ["LargeCapacityProvider", "ManagedInstancesOperatorRole"];

#[test]
fn the_capacity_provider_exists_only_for_a_large_tier_on_managed_instances() {
    let t = template();
    let p = &t["Parameters"]["LargeTierCompute"];
    assert_eq!(p["AllowedValues"], json!(["Lambda", "ManagedInstances"]));
    assert_eq!(p["Default"], "Lambda", "Lambda stays the default");

    let cases: [(&[(&str, &str)], bool); 6] = [
        (&[], false),
        (&[("TierQueues", "true"), ("ImageUri", IMAGE)], false),
        // Chosen, but no large tier: the rule below refuses the stack; nothing is created.
        (&[("LargeTierCompute", "ManagedInstances")], false),
        // First phase (no image yet): no functions, so no capacity provider either.
        (
            &[
                ("LargeTierCompute", "ManagedInstances"),
                ("TierQueues", "true"),
            ],
            false,
        ),
        (
            &[
                ("LargeTierCompute", "ManagedInstances"),
                ("TierQueues", "true"),
                ("ImageUri", IMAGE),
                ("CreateFunctions", "false"),
            ],
            false,
        ),
        (
            &[
                ("LargeTierCompute", "ManagedInstances"),
                ("TierQueues", "true"),
                ("ImageUri", IMAGE),
            ],
            true,
        ),
    ];
    for (set, wanted) in cases {
        let c = Conditions {
            t: &t,
            p: parameters(&t, set),
        };
        let made = c.resources();
        for r in MI_RESOURCES {
            assert_eq!(made.iter().any(|m| m == r), wanted, "{r} with {set:?}");
        }
        assert_eq!(c.named("LargeTierManagedInstances"), wanted, "{set:?}");
        if wanted {
            assert!(made.iter().any(|m| m == "LargeAgentFunction"));
        }
    }

    // Everything that names them is under the same condition (or an If on it).
    let r = &t["Resources"];
    assert_eq!(
        r["LargeCapacityProvider"]["Type"],
        "AWS::Lambda::CapacityProvider"
    );
    for name in MI_RESOURCES {
        assert_eq!(r[name]["Condition"], "LargeTierManagedInstances", "{name}");
    }
    let out = &t["Outputs"]["LargeCapacityProviderArn"];
    assert_eq!(out["Condition"], "LargeTierManagedInstances");
    for (name, res) in r.as_object().unwrap() {
        let text = res.to_string();
        let names_them =
            MI_RESOURCES.iter().any(|m| text.contains(m)) && !MI_RESOURCES.contains(&name.as_str());
        if names_them {
            assert_eq!(
                name, "LargeAgentFunction",
                "{name} names a Managed Instances resource"
            );
        }
    }
}

#[test]
fn the_capacity_provider_runs_in_the_given_vpc_with_a_least_privilege_operator() {
    let t = template();
    let r = &t["Resources"];
    let cp = &r["LargeCapacityProvider"]["Properties"];
    let text = cp["VpcConfig"].to_string();
    assert!(text.contains("ManagedInstancesSubnetIds"), "{text}");
    assert!(text.contains("ManagedInstancesSecurityGroupIds"), "{text}");
    assert_eq!(
        cp["PermissionsConfig"]["CapacityProviderOperatorRoleArn"],
        json!({"!GetAtt": "ManagedInstancesOperatorRole.Arn"})
    );
    // Instances of the function's own architecture, and a cost ceiling.
    assert_eq!(
        cp["InstanceRequirements"]["Architectures"],
        json!([{"!Ref": "Architecture"}])
    );
    assert_eq!(
        cp["CapacityProviderScalingConfig"]["MaxVCpuCount"],
        json!({"!Ref": "ManagedInstancesMaxVCpuCount"})
    );

    let role = &r["ManagedInstancesOperatorRole"]["Properties"];
    let trust = role["AssumeRolePolicyDocument"]["Statement"]
        .as_array()
        .unwrap();
    assert_eq!(trust.len(), 1);
    assert_eq!(trust[0]["Effect"], "Allow");
    assert_eq!(
        trust[0]["Principal"],
        json!({"Service": "lambda.amazonaws.com"})
    );
    assert_eq!(trust[0]["Action"], "sts:AssumeRole");
    assert_eq!(
        trust[0]["Condition"]["StringEquals"]["aws:SourceAccount"],
        json!({"!Ref": "AWS::AccountId"}),
        "only Lambda acting for this account (confused deputy)"
    );
    assert_eq!(
        role["ManagedPolicyArns"],
        json!([{"!Sub": "arn:${AWS::Partition}:iam::aws:policy/AWSLambdaManagedEC2ResourceOperator"}])
    );
    assert!(
        role["Policies"].is_null(),
        "no inline permissions beyond the managed policy"
    );
}

#[test]
fn the_large_function_runs_on_the_provider_with_the_longer_timeout() {
    let t = template();
    let f = &t["Resources"]["LargeAgentFunction"]["Properties"];
    assert_eq!(
        f["Timeout"],
        json!({"!If": ["LargeTierManagedInstances",
            {"!Ref": "ManagedInstancesTimeoutSeconds"}, {"!Ref": "AgentTimeoutSeconds"}]})
    );
    let p = &t["Parameters"];
    // Lambda Managed Instances: up to 5,400 s for invocations by an SQS event source mapping.
    assert_eq!(p["ManagedInstancesTimeoutSeconds"]["MaxValue"], 5400);
    assert_eq!(p["ManagedInstancesTimeoutSeconds"]["Default"], 5400);
    assert_eq!(
        p["AgentTimeoutSeconds"]["MaxValue"], 900,
        "plain Lambda stays at 900 s"
    );

    let cfg = intrinsic(&f["CapacityProviderConfig"], "If").expect("an If");
    assert_eq!(cfg[0], "LargeTierManagedInstances");
    assert_eq!(
        cfg[2],
        json!({"!Ref": "AWS::NoValue"}),
        "no attachment otherwise"
    );
    let lmi = &cfg[1]["LambdaManagedInstancesCapacityProviderConfig"];
    assert_eq!(
        lmi["CapacityProviderArn"],
        json!({"!GetAtt": "LargeCapacityProvider.Arn"})
    );
    assert_eq!(
        lmi["PerExecutionEnvironmentMaxConcurrency"], 1,
        "one job per execution environment"
    );
    assert_eq!(
        f["MemorySize"],
        json!({"!If": ["LargeTierManagedInstances",
            {"!Ref": "ManagedInstancesMemoryMB"}, {"!Ref": "LargeAgentMemoryMB"}]})
    );
    assert_eq!(p["ManagedInstancesMemoryMB"]["MinValue"], 2048);
    assert_eq!(p["ManagedInstancesMemoryMB"]["MaxValue"], 32768);

    // The SQS mapping needs visibility >= the function's timeout.
    let vis = intrinsic(
        &t["Resources"]["LargeQueue"]["Properties"]["VisibilityTimeout"],
        "If",
    )
    .expect("an If");
    assert_eq!(vis[0], "LargeQueueOnManagedInstances");
    let on_mi = vis[1].as_u64().expect("a number");
    assert!((5400..=43_200).contains(&on_mi), "{on_mi}");
    assert_eq!(vis[2], json!({"!Ref": "QueueVisibilityTimeoutSeconds"}));
    // The mapping points at the alias of a published version (Managed Instances run versions).
    assert_eq!(
        t["Resources"]["LargeAgentMapping"]["Properties"]["FunctionName"],
        json!({"!Ref": "LargeAgentLiveAlias"})
    );
}

#[test]
fn the_dispatcher_escalates_timed_out_segments_only_with_managed_instances() {
    let t = template();
    let env = &t["Resources"]["DispatcherFunction"]["Properties"]["Environment"]["Variables"];
    assert_eq!(
        env["AGENTQ_ESCALATE_TIMEOUTS"],
        json!({"!If": ["LargeTierManagedInstances", "true", {"!Ref": "AWS::NoValue"}]})
    );
    // The variable is the one the dispatcher binary reads for --escalate-timeouts.
    let main = std::fs::read_to_string(repo_root().join("dispatcher/src/main.rs")).unwrap();
    assert!(
        main.contains(r#"env = "AGENTQ_ESCALATE_TIMEOUTS""#),
        "dispatcher/src/main.rs no longer reads AGENTQ_ESCALATE_TIMEOUTS"
    );
    // …and the tier it escalates to is the large tier's queue.
    assert_eq!(
        env["AGENTQ_TIER_QUEUES"],
        json!({"!If": ["LargeTier", {"!Sub": "large=${LargeQueue}"}, ""]})
    );
}

#[test]
fn the_stack_refuses_managed_instances_without_what_they_need() {
    let t = template();
    let rule = &t["Rules"]["ManagedInstancesNeedTheLargeTierAndAVpc"];
    assert_eq!(
        rule["RuleCondition"],
        json!({"!Equals": [{"!Ref": "LargeTierCompute"}, "ManagedInstances"]})
    );
    let asserts: Vec<String> = rule["Assertions"]
        .as_array()
        .expect("Assertions")
        .iter()
        .map(|a| a["Assert"].to_string())
        .collect();
    assert!(
        asserts
            .iter()
            .any(|a| a == &json!({"!Equals": [{"!Ref": "TierQueues"}, "true"]}).to_string()),
        "{asserts:?}"
    );
    for p in [
        "ManagedInstancesSubnetIds",
        "ManagedInstancesSecurityGroupIds",
    ] {
        let not_empty = json!({"!Not": [{"!Contains": [{"!Ref": p}, ""]}]}).to_string();
        assert!(asserts.contains(&not_empty), "{p}: {asserts:?}");
        assert_eq!(t["Parameters"][p]["Type"], "CommaDelimitedList");
    }
}
