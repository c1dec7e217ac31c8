#!/usr/bin/env python3
"""Provision agentq's AWS resources on a local emulator (moto server, LocalStack).

Deploys infra/template.yaml with CloudFormation CreateStack, waits for CREATE_COMPLETE, reads the
outputs, then repairs what the emulator silently drops (TTL, PITR, the `live` alias, image
package type, S3 public access block and lifecycle, ECR scan/lifecycle settings). Idempotent: an
existing stack is reused. If the template cannot be deployed at all, the same data resources are
created directly with boto3 instead (said on stderr).

Creates a demo SSM SecureString `{SecretsPrefix}demo/api-token` when missing.

Never creates an enabled event source mapping: on moto an enabled mapping makes SendMessage invoke
the function synchronously (HTTP 500 for image functions). agentq's poll mode plays the mapping.

stdout: `export AGENTQ_...=...` lines (default) or the outputs as JSON (--json). Progress: stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover
    sys.stderr.write("provision: boto3 is required (python3 -m pip install boto3)\n")
    sys.exit(2)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "template.yaml"
DONE = {"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE"}
REQUIRED = ["QueueUrl", "DlqUrl", "TableName", "BucketName", "KeyPrefix", "SecretsPrefix"]
DEMO_SECRET_VALUE = "demo-secret-value-1234"
# infra/template.yaml's ImageConfig of the dispatcher function.
DISPATCHER_IMAGE_CONFIG = {"EntryPoint": ["/opt/agentq/bin/agentq-dispatcher"], "Command": ["lambda"]}


def log(msg: str) -> None:
    sys.stderr.write(f"provision: {msg}\n")
    sys.stderr.flush()


def template_defaults() -> dict[str, str]:
    """Parameter defaults of the template (YAML short-form tags are ignored, only Parameters are read)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def any_tag(loader, suffix, node):  # noqa: ARG001
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        return loader.construct_mapping(node)

    Loader.add_multi_constructor("!", any_tag)
    doc = yaml.load(TEMPLATE.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader subclass
    return {k: str(v.get("Default", "")) for k, v in doc.get("Parameters", {}).items()}


class Provisioner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.region = args.region
        cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"})
        self.session = boto3.session.Session(
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
            region_name=self.region,
        )
        self._cfg = cfg
        self._clients: dict[str, object] = {}
        self.params = template_defaults()
        self.name_prefix = (args.name_prefix or args.stack_name).lower()
        self.account = self.client("sts").get_caller_identity()["Account"]
        self.direct = False
        self.separate_sqs = bool(args.sqs_endpoint) and args.sqs_endpoint.rstrip("/") != args.endpoint.rstrip("/")

    def client(self, name: str):
        if name not in self._clients:
            endpoint = self.args.sqs_endpoint if name == "sqs" and self.args.sqs_endpoint else self.args.endpoint
            self._clients[name] = self.session.client(name, endpoint_url=endpoint, config=self._cfg)
        return self._clients[name]

    # ------------------------------------------------------------ parameters
    def stack_parameters(self) -> dict[str, str]:
        a = self.args
        p = {
            "NamePrefix": self.name_prefix,
            "KeyPrefix": a.key_prefix,
            "SecretsPrefix": a.secrets_prefix,
            "MaxReceiveCount": str(a.max_receive_count),
            # Never an enabled mapping on an emulator (see module docstring).
            "EventSourceMappings": "None",
            "CreateFunctions": "true" if a.functions else "false",
            "TierQueues": "true" if a.tier_queues else "false",
        }
        if a.functions:
            # Placeholder image: the emulator stores the URI and never pulls it.
            p["ImageUri"] = (
                f"{self.account}.dkr.ecr.{self.region}.amazonaws.com/{self.name_prefix}-agent:local"
            )
        self.params.update(p)
        return p

    # ------------------------------------------------------------ CloudFormation path
    def existing_stack(self) -> dict | None:
        cf = self.client("cloudformation")
        try:
            stacks = cf.describe_stacks(StackName=self.args.stack_name)["Stacks"]
        except ClientError as e:
            if "does not exist" in str(e):
                return None
            raise
        return stacks[0] if stacks else None

    def deploy_stack(self) -> dict[str, str]:
        cf = self.client("cloudformation")
        params = self.stack_parameters()
        stack = self.existing_stack()
        if stack and stack["StackStatus"] in DONE:
            log(f"stack {self.args.stack_name} exists ({stack['StackStatus']}): reusing its outputs")
            self.params.update({p["ParameterKey"]: p["ParameterValue"] for p in stack.get("Parameters", [])})
            return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        if stack:
            log(f"stack {self.args.stack_name} is {stack['StackStatus']}: deleting it and creating it again")
            cf.delete_stack(StackName=self.args.stack_name)
            self.wait(lambda: self.existing_stack() is None, "stack deletion")

        log(f"creating stack {self.args.stack_name} from infra/template.yaml on {self.args.endpoint}")
        started = time.monotonic()
        cf.create_stack(
            StackName=self.args.stack_name,
            TemplateBody=TEMPLATE.read_text(),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
            Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
        )
        final: dict = {}

        def done() -> bool:
            s = self.existing_stack()
            if s and not s["StackStatus"].endswith("_IN_PROGRESS"):
                final.update(s)
                return True
            return False

        self.wait(done, "CREATE_COMPLETE", timeout=120)
        if final["StackStatus"] != "CREATE_COMPLETE":
            reasons = [
                f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason')}"
                for e in cf.describe_stack_events(StackName=self.args.stack_name)["StackEvents"]
                if "FAILED" in e.get("ResourceStatus", "")
            ]
            raise RuntimeError(f"stack ended {final['StackStatus']}: {'; '.join(reasons) or final.get('StackStatusReason')}")
        log(f"stack CREATE_COMPLETE in {time.monotonic() - started:.1f}s")
        return {o["OutputKey"]: o["OutputValue"] for o in final.get("Outputs", [])}

    @staticmethod
    def wait(pred, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.2)

    # ------------------------------------------------------------ repairs
    def fixing(self, what: str) -> None:
        if self.direct:
            log(f"configure: {what}")
        else:
            log(f"repair: the emulator's CloudFormation dropped it: {what}")

    def repair(self, out: dict[str, str]) -> None:
        """Re-apply what emulators silently drop from the template. Every step is idempotent."""
        ddb = self.client("dynamodb")
        table = out["TableName"]
        ttl = ddb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
        if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            self.fixing(f"table TTL on expires_at (was {ttl.get('TimeToLiveStatus')}); UpdateTimeToLive")
            ddb.update_time_to_live(
                TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
            )
        try:
            pitr = ddb.describe_continuous_backups(TableName=table)["ContinuousBackupsDescription"]
            if pitr["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] != "ENABLED":
                self.fixing("point-in-time recovery on the table")
                ddb.update_continuous_backups(
                    TableName=table, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
                )
        except ClientError as e:
            log(f"note: point-in-time recovery not available on this emulator ({e})")

        self.repair_bucket(out["BucketName"], out["KeyPrefix"])
        if out.get("RepositoryName"):
            self.repair_repository(out["RepositoryName"])
        self.repair_functions(out)

    def repair_bucket(self, bucket: str, prefix: str) -> None:
        s3 = self.client("s3")
        try:
            s3.get_public_access_block(Bucket=bucket)
        except ClientError:
            self.fixing("bucket public access block")
            s3.put_public_access_block(
                Bucket=bucket,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            )
        try:
            s3.get_bucket_lifecycle_configuration(Bucket=bucket)
        except ClientError:
            self.fixing("bucket lifecycle rules")
            s3.put_bucket_lifecycle_configuration(
                Bucket=bucket,
                LifecycleConfiguration={
                    "Rules": [
                        {
                            "ID": "expire-job-data",
                            "Status": "Enabled",
                            "Filter": {"Prefix": f"{prefix}/jobs/"},
                            "Expiration": {"Days": int(self.params.get("JobDataRetentionDays", "90"))},
                        },
                        {
                            "ID": "expire-payloads",
                            "Status": "Enabled",
                            "Filter": {"Prefix": f"{prefix}/payloads/"},
                            "Expiration": {"Days": int(self.params.get("PayloadRetentionDays", "30"))},
                        },
                        {
                            "ID": "abort-incomplete-uploads",
                            "Status": "Enabled",
                            "Filter": {"Prefix": ""},
                            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                        },
                    ]
                },
            )
        # The TLS-only bucket policy is deliberately not applied locally: the emulator is plain HTTP.

    def repair_repository(self, repo: str) -> None:
        ecr = self.client("ecr")
        try:
            desc = ecr.describe_repositories(repositoryNames=[repo])["repositories"][0]
            if not desc.get("imageScanningConfiguration", {}).get("scanOnPush"):
                self.fixing("repository scan-on-push")
                ecr.put_image_scanning_configuration(
                    repositoryName=repo, imageScanningConfiguration={"scanOnPush": True}
                )
            try:
                ecr.get_lifecycle_policy(repositoryName=repo)
            except ClientError:
                self.fixing("repository lifecycle policy")
                keep = int(self.params.get("ImageRetentionCount", "30"))
                ecr.put_lifecycle_policy(
                    repositoryName=repo,
                    lifecyclePolicyText=json.dumps(
                        {
                            "rules": [
                                {
                                    "rulePriority": 1,
                                    "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days", "countNumber": 7},
                                    "action": {"type": "expire"},
                                },
                                {
                                    "rulePriority": 2,
                                    "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep},
                                    "action": {"type": "expire"},
                                },
                            ]
                        }
                    ),
                )
        except ClientError as e:
            log(f"note: could not repair repository settings ({e})")

    def repair_functions(self, out: dict[str, str]) -> None:
        lam = self.client("lambda")
        specs = [
            ("AgentFunctionName", "AgentAliasArn", "AgentEphemeralStorageMB"),
            ("LargeAgentFunctionName", "LargeAgentAliasArn", "LargeAgentEphemeralStorageMB"),
            ("DispatcherFunctionName", "DispatcherAliasArn", None),
        ]
        for name_key, alias_key, storage_key in specs:
            name = out.get(name_key)
            if not name:
                continue
            cfg = lam.get_function_configuration(FunctionName=name)
            storage = int(self.params.get(storage_key, "512")) if storage_key else 512
            if cfg.get("PackageType") != "Image":
                # Lambda cannot change a function's package type in place: recreate it with the same
                # configuration. Safe here: the emulator never runs it, and the stack is never updated.
                log(f"repair: emulator created {name} as PackageType={cfg.get('PackageType')}; recreating it as an Image function")
                code = lam.get_function(FunctionName=name).get("Code", {})
                image = code.get("ImageUri") or self.params.get("ImageUri")
                lam.delete_function(FunctionName=name)
                kwargs = dict(
                    FunctionName=name,
                    PackageType="Image",
                    Code={"ImageUri": image},
                    Role=cfg["Role"],
                    MemorySize=cfg["MemorySize"],
                    Timeout=cfg["Timeout"],
                    Environment={"Variables": cfg.get("Environment", {}).get("Variables", {})},
                    EphemeralStorage={"Size": storage},
                    Architectures=cfg.get("Architectures") or ["x86_64"],
                )
                if cfg.get("Description"):
                    kwargs["Description"] = cfg["Description"]
                image_config = (cfg.get("ImageConfigResponse") or {}).get("ImageConfig")
                if name_key == "DispatcherFunctionName" and not image_config:
                    # The template starts the dispatcher binary of the shared image.
                    image_config = DISPATCHER_IMAGE_CONFIG
                if image_config:
                    kwargs["ImageConfig"] = image_config
                lam.create_function(**kwargs)
                lam.get_waiter("function_active_v2").wait(FunctionName=name)
            if alias_key:
                out[alias_key] = self.ensure_live_alias(name)

    def ensure_live_alias(self, name: str) -> str:
        lam = self.client("lambda")
        try:
            return lam.get_alias(FunctionName=name, Name="live")["AliasArn"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
        versions = [
            v["Version"]
            for v in lam.list_versions_by_function(FunctionName=name)["Versions"]
            if v["Version"] != "$LATEST"
        ]
        version = versions[-1] if versions else lam.publish_version(FunctionName=name, Description="initial version")["Version"]
        log(f"repair: emulator dropped the `live` alias of {name} (AWS::Lambda::Alias unsupported); creating it on version {version}")
        return lam.create_alias(FunctionName=name, Name="live", FunctionVersion=version)["AliasArn"]

    def normalize_queue_urls(self, out: dict[str, str]) -> None:
        """Use the queue URLs the emulator's SQS API answers with (CloudFormation outputs carry the
        public AWS host, e.g. https://sqs.us-east-1.amazonaws.com/...), so URLs compare equal."""
        sqs = self.client("sqs")
        for key in ("QueueUrl", "DlqUrl", "ParkedQueueUrl", "LargeQueueUrl"):
            if out.get(key):
                name = out[key].rstrip("/").rsplit("/", 1)[-1]
                try:
                    out[key] = sqs.get_queue_url(QueueName=name)["QueueUrl"]
                except ClientError as e:
                    log(f"note: keeping {key} as output by the stack ({e})")

    def fix_max_receive_count(self, out: dict[str, str]) -> None:
        """An existing stack keeps its parameters; honour a different --max-receive-count anyway."""
        sqs = self.client("sqs")
        urls = [out["QueueUrl"]] + ([out["LargeQueueUrl"]] if out.get("LargeQueueUrl") else [])
        for url in urls:
            attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])["Attributes"]
            policy = json.loads(attrs.get("RedrivePolicy", "{}"))
            if policy and int(policy.get("maxReceiveCount", 0)) != self.args.max_receive_count:
                log(f"updating maxReceiveCount of {url.rsplit('/', 1)[-1]} from {policy.get('maxReceiveCount')} to {self.args.max_receive_count}")
                policy["maxReceiveCount"] = self.args.max_receive_count
                sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": json.dumps(policy)})

    # ------------------------------------------------------------ boto3 fallback
    def create_queues(self) -> dict[str, str]:
        """The template's queues (jobs, DLQ, parked, optional large tier), via the SQS API."""
        a, n = self.args, self.name_prefix
        sqs = self.client("sqs")
        visibility = self.params.get("QueueVisibilityTimeoutSeconds", "5400")
        common = {"MaximumMessageSize": "1048576", "SqsManagedSseEnabled": "true"}

        def queue(name: str, attrs: dict[str, str]) -> tuple[str, str]:
            try:
                url = sqs.create_queue(QueueName=name, Attributes={**common, **attrs})["QueueUrl"]
            except ClientError as e:
                # Some SQS emulators (ElasticMQ) reject attributes they do not model.
                if "Attribute" not in e.response.get("Error", {}).get("Code", ""):
                    raise
                log(f"note: {name}: the SQS endpoint rejected {sorted(common)} ({e}); creating it without them")
                url = sqs.create_queue(QueueName=name, Attributes=attrs)["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            return url, arn

        parked_url, parked_arn = queue(f"{n}-parked", {"MessageRetentionPeriod": "1209600"})
        dlq_url, dlq_arn = queue(
            f"{n}-dlq",
            {
                "MessageRetentionPeriod": "1209600",
                "VisibilityTimeout": visibility,
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": parked_arn, "maxReceiveCount": int(self.params.get("DlqMaxReceiveCount", "10"))}),
            },
        )
        jobs_attrs = {
            "MessageRetentionPeriod": "345600",
            "VisibilityTimeout": visibility,
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": a.max_receive_count}),
        }
        jobs_url, jobs_arn = queue(f"{n}-jobs", jobs_attrs)
        out = {
            "QueueUrl": jobs_url,
            "QueueArn": jobs_arn,
            "DlqUrl": dlq_url,
            "DlqArn": dlq_arn,
            "ParkedQueueUrl": parked_url,
        }
        if a.tier_queues:
            out["LargeQueueUrl"] = queue(f"{n}-jobs-large", jobs_attrs)[0]
        return out

    def create_directly(self) -> dict[str, str]:
        """Same data resources as the template, created with plain API calls (no functions/roles)."""
        a, n = self.args, self.name_prefix
        ddb, s3, ecr = (self.client(x) for x in ("dynamodb", "s3", "ecr"))
        out = self.create_queues()
        out.update({
            "TableName": f"{n}-jobs",
            "BucketName": f"{n}-data-{self.account}",
            "KeyPrefix": a.key_prefix,
            "SecretsPrefix": a.secrets_prefix,
            "RepositoryName": f"{n}-agent",
        })
        try:
            ddb.create_table(
                TableName=out["TableName"],
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[
                    {"AttributeName": "job_id", "AttributeType": "S"},
                    {"AttributeName": "status", "AttributeType": "S"},
                    {"AttributeName": "updated_at", "AttributeType": "N"},
                ],
                KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
                GlobalSecondaryIndexes=[
                    {
                        "IndexName": "by-status",
                        "KeySchema": [
                            {"AttributeName": "status", "KeyType": "HASH"},
                            {"AttributeName": "updated_at", "KeyType": "RANGE"},
                        ],
                        "Projection": {"ProjectionType": "ALL"},
                    }
                ],
                SSESpecification={"Enabled": True},
            )
            ddb.get_waiter("table_exists").wait(TableName=out["TableName"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise
        try:
            kwargs = {"Bucket": out["BucketName"]}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            s3.create_bucket(**kwargs)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        s3.put_bucket_encryption(
            Bucket=out["BucketName"],
            ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
        )
        try:
            try:
                repo = ecr.create_repository(
                    repositoryName=out["RepositoryName"],
                    imageTagMutability="IMMUTABLE",
                    imageScanningConfiguration={"scanOnPush": True},
                )["repository"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "RepositoryAlreadyExistsException":
                    raise
                repo = ecr.describe_repositories(repositoryNames=[out["RepositoryName"]])["repositories"][0]
            out["RepositoryUri"] = repo["repositoryUri"]
        except Exception as e:  # noqa: BLE001 - e.g. ECR missing from a free emulator edition
            log(f"note: no ECR repository on this emulator ({e}); local runs do not need one")
            out.pop("RepositoryName", None)
        return out

    # ------------------------------------------------------------ SSM demo secret
    def ensure_demo_secret(self, secrets_prefix: str) -> None:
        ssm = self.client("ssm")
        name = f"{secrets_prefix}demo/api-token"
        try:
            ssm.get_parameter(Name=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ParameterNotFound":
                raise
            log(f"creating demo SecureString {name}")
            ssm.put_parameter(Name=name, Value=DEMO_SECRET_VALUE, Type="SecureString", Description="agentq local demo secret")

    # ------------------------------------------------------------ main
    def run(self) -> dict[str, str]:
        out: dict[str, str] | None = None
        source = "cloudformation"
        if not self.args.direct:
            try:
                out = self.deploy_stack()
                missing = [k for k in REQUIRED if not out.get(k)]
                if missing:
                    raise RuntimeError(f"stack outputs lack {', '.join(missing)}")
            except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
                log(f"cannot deploy infra/template.yaml to this emulator ({e}); creating the resources with boto3 instead")
                out = None
        else:
            log("--direct: creating the resources with boto3 (no CloudFormation)")
        if out is None:
            source = "boto3"
            self.direct = True
            self.stack_parameters()
            out = self.create_directly()
        elif self.separate_sqs:
            log(f"SQS is served by {self.args.sqs_endpoint}: creating the queues there (the stack's queues stay unused)")
            out.update(self.create_queues())
        self.normalize_queue_urls(out)
        self.repair(out)
        self.fix_max_receive_count(out)
        self.ensure_demo_secret(out["SecretsPrefix"])
        out["ProvisionedBy"] = source
        out["StackName"] = self.args.stack_name
        out["Endpoint"] = self.args.endpoint
        if self.separate_sqs:
            out["SqsEndpoint"] = self.args.sqs_endpoint
        out["Region"] = self.region
        out["DemoSecretName"] = f"{out['SecretsPrefix']}demo/api-token"
        return out


def exports(out: dict[str, str]) -> list[str]:
    env = {
        "AGENTQ_QUEUE_URL": out["QueueUrl"],
        "AGENTQ_DLQ_URL": out["DlqUrl"],
        "AGENTQ_TABLE": out["TableName"],
        "AGENTQ_BUCKET": out["BucketName"],
        "AGENTQ_PREFIX": out["KeyPrefix"],
        "AGENTQ_SECRETS_PREFIX": out["SecretsPrefix"],
    }
    if out.get("LargeQueueUrl"):
        env["AGENTQ_TIER_QUEUES"] = f"large={out['LargeQueueUrl']}"
    # What `agentq-dispatcher deploy` needs besides the queues (stack outputs too).
    for var, key in (
        ("AGENTQ_REPOSITORY", "RepositoryName"),
        ("AGENTQ_FUNCTION", "AgentFunctionName"),
        ("AGENTQ_DISPATCHER_FUNCTION", "DispatcherFunctionName"),
    ):
        if out.get(key):
            env[var] = out[key]
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4599"))
    ap.add_argument("--sqs-endpoint", default=os.environ.get("AWS_ENDPOINT_URL_SQS"),
                    help="separate SQS endpoint, e.g. ElasticMQ (default: $AWS_ENDPOINT_URL_SQS, else --endpoint)")
    ap.add_argument("--stack-name", default=os.environ.get("AGENTQ_STACK_NAME", "agentq-local"))
    ap.add_argument("--name-prefix", default=None, help="resource name prefix (default: the stack name)")
    ap.add_argument("--region", default=os.environ.get("AWS_REGION", "us-east-1"))
    ap.add_argument("--max-receive-count", type=int, default=int(os.environ.get("AGENTQ_MAX_RECEIVE_COUNT", "3")))
    ap.add_argument("--secrets-prefix", default=os.environ.get("AGENTQ_SECRETS_PREFIX", "/agentq/secrets/"))
    ap.add_argument("--key-prefix", default=os.environ.get("AGENTQ_PREFIX", "agentq"))
    ap.add_argument("--no-functions", dest="functions", action="store_false",
                    help="do not create the (never invoked) Lambda functions")
    ap.add_argument("--no-tier-queues", dest="tier_queues", action="store_false",
                    help="do not create the `large` tier queue")
    ap.add_argument("--direct", action="store_true", help="skip CloudFormation, create resources with boto3")
    ap.add_argument("--json", action="store_true", help="print the outputs as JSON instead of export lines")
    args = ap.parse_args(argv)
    if os.environ.get("AGENTQ_LOCAL_FUNCTIONS") == "0":
        args.functions = False
    if not args.secrets_prefix.startswith("/") or not args.secrets_prefix.endswith("/"):
        ap.error("--secrets-prefix must start and end with '/'")

    try:
        out = Provisioner(args).run()
    except Exception as e:  # noqa: BLE001
        log(f"failed: {e}")
        return 1
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print("\n".join(exports(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
