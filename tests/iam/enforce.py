#!/usr/bin/env python3
"""Turn a moto server with agentq's stack into an IAM-enforcing one, with credentials per component.

Used by the IAM-enforced test suite (tests/tests/iam.rs), after localdev/provision.py deployed
infra/template.yaml (enforcement still off):

  enforce.py setup --endpoint URL --outputs outputs.json   -> credentials JSON on stdout
  enforce.py drop-statement --endpoint URL --outputs outputs.json --creds creds.json \
             --principal agent --sid ReportFailures          (a role's inline policy without it)

`setup`:
1. Re-writes every inline role policy CloudFormation created with PutRolePolicy: moto stores them
   as a Python repr, which crashes its policy check (KeyError 'policy_document').
2. Adds an emulator-only inline policy to each principal. moto cannot judge DynamoDB, SSM and KMS
   resources (a specific ARN is always denied), so the template's statements for those services are
   copied with Resource "*": the actions stay exactly the template's, and the resources are checked
   by a unit test of the template instead. moto checks SQS batch calls under their own names
   (sqs:DeleteMessageBatch...), which AWS authorises with the single-message action: each granted
   single-message action gets its batch name on the same resources.
3. Makes the producer an IAM user with the stack's ProducerPolicy (plus its emulator-only policy)
   and an access key; assumes the agent's and the dispatcher's roles (sts:AssumeRole); makes an
   `admin` user (Action "*") for the test's own checks.
4. Switches enforcement on (POST /moto-api/reset-auth, body 0). From then on the emulator's
   test/test keys are denied too.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import urllib.request

import boto3

EMULATOR_ONLY = "emulator-only"
OPAQUE_SERVICES = ("dynamodb:", "ssm:", "kms:")
BATCH_NAMES = {
    "sqs:DeleteMessage": "sqs:DeleteMessageBatch",
    "sqs:ChangeMessageVisibility": "sqs:ChangeMessageVisibilityBatch",
    "sqs:SendMessage": "sqs:SendMessageBatch",
}


def as_list(v):
    return v if isinstance(v, list) else [v]


def parse_doc(doc) -> dict:
    if isinstance(doc, dict):
        return doc
    try:
        return json.loads(doc)
    except ValueError:
        return ast.literal_eval(doc)  # moto's repr of a CloudFormation inline policy


def emulator_only(doc: dict) -> dict:
    """The extra statements moto needs to judge `doc` like AWS would (see the module doc)."""
    extra = []
    for st in doc.get("Statement", []):
        if st.get("Effect") != "Allow":
            continue
        actions = as_list(st.get("Action", []))
        opaque = [a for a in actions if a.startswith(OPAQUE_SERVICES)]
        if opaque:
            extra.append({"Sid": f"{st.get('Sid', 'S')}AnyResource", "Effect": "Allow", "Action": opaque, "Resource": "*"})
        batch = [BATCH_NAMES[a] for a in actions if a in BATCH_NAMES]
        if batch:
            extra.append({"Sid": f"{st.get('Sid', 'S')}Batch", "Effect": "Allow", "Action": batch, "Resource": st["Resource"]})
    return {"Version": "2012-10-17", "Statement": extra}


class Env:
    def __init__(self, endpoint: str, outputs: dict, creds: dict | None = None):
        self.endpoint = endpoint
        self.out = outputs
        key = (creds or {}).get("admin") or {"AccessKeyId": "test", "SecretAccessKey": "test"}
        self.session = boto3.session.Session(
            aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1"
        )
        self.iam = self.session.client("iam", endpoint_url=endpoint)
        self.sts = self.session.client("sts", endpoint_url=endpoint)

    def role_name(self, principal: str) -> str:
        return self.out[{"agent": "AgentRoleArn", "dispatcher": "DispatcherRoleArn"}[principal]].rsplit("/", 1)[1]

    def inline(self, role: str) -> dict[str, dict]:
        return {
            name: parse_doc(self.iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])
            for name in self.iam.list_role_policies(RoleName=role)["PolicyNames"]
            if name != EMULATOR_ONLY
        }

    def managed(self, arn: str) -> dict:
        version = self.iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
        return parse_doc(self.iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"])

    def user_key(self, user: str) -> dict:
        key = self.iam.create_access_key(UserName=user)["AccessKey"]
        return {"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]}


def setup(env: Env) -> dict:
    creds: dict = {}
    for principal in ("agent", "dispatcher"):
        role = env.role_name(principal)
        docs = env.inline(role)
        statements = []
        for name, doc in docs.items():
            env.iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=json.dumps(doc))
            statements.extend(emulator_only(doc)["Statement"])
        env.iam.put_role_policy(
            RoleName=role,
            PolicyName=EMULATOR_ONLY,
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
        )
    producer = "agentq-producer"
    env.iam.create_user(UserName=producer)
    env.iam.attach_user_policy(UserName=producer, PolicyArn=env.out["ProducerPolicyArn"])
    env.iam.put_user_policy(
        UserName=producer, PolicyName=EMULATOR_ONLY, PolicyDocument=json.dumps(emulator_only(env.managed(env.out["ProducerPolicyArn"])))
    )
    creds["producer"] = env.user_key(producer)
    env.iam.create_user(UserName="admin")
    env.iam.put_user_policy(
        UserName="admin",
        PolicyName="everything",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}),
    )
    creds["admin"] = env.user_key("admin")
    for principal in ("agent", "dispatcher"):
        arn = env.out[{"agent": "AgentRoleArn", "dispatcher": "DispatcherRoleArn"}[principal]]
        c = env.sts.assume_role(RoleArn=arn, RoleSessionName=f"agentq-{principal}", DurationSeconds=3600)["Credentials"]
        creds[principal] = {k: c[k] for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")}
    req = urllib.request.Request(
        env.endpoint.rstrip("/") + "/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}, method="POST"
    )
    urllib.request.urlopen(req, timeout=10).read()
    return creds


def drop_statement(env: Env, principal: str, sid: str) -> None:
    role = env.role_name(principal)
    for name, doc in env.inline(role).items():
        kept = [s for s in doc["Statement"] if s.get("Sid") != sid]
        if len(kept) != len(doc["Statement"]):
            env.iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=json.dumps({**doc, "Statement": kept}))
            # The emulator-only copies of that statement go too.
            extra = parse_doc(env.iam.get_role_policy(RoleName=role, PolicyName=EMULATOR_ONLY)["PolicyDocument"])
            extra["Statement"] = [s for s in extra["Statement"] if not s.get("Sid", "").startswith(sid)]
            env.iam.put_role_policy(RoleName=role, PolicyName=EMULATOR_ONLY, PolicyDocument=json.dumps(extra))
            return
    raise SystemExit(f"enforce: no statement {sid} in the inline policies of {role}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["setup", "drop-statement"])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--outputs", required=True, help="localdev/provision.py --json output")
    ap.add_argument("--creds", help="credentials JSON from `setup` (drop-statement)")
    ap.add_argument("--principal", choices=["agent", "dispatcher"])
    ap.add_argument("--sid")
    a = ap.parse_args()
    with open(a.outputs) as f:
        outputs = json.load(f)
    if a.command == "setup":
        print(json.dumps(setup(Env(a.endpoint, outputs)), indent=2))
    else:
        if not (a.creds and a.principal and a.sid):
            ap.error("drop-statement needs --creds, --principal and --sid")
        with open(a.creds) as f:
            creds = json.load(f)
        drop_statement(Env(a.endpoint, outputs, creds), a.principal, a.sid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
