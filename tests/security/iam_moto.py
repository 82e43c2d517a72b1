"""The run and the IAM set-up of the run-credential tests: a moto server's worker user, runtime role and bucket."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from airflow_aicenter.credentials import S3Credentials, Scope, run_credentials, run_scope, session_policy
from airflow_aicenter.records import BlobRef, RunSpec

ACCOUNT = "123456789012"  # moto's default account
ROLE = "aicenter-runtime"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE}"
BUCKET = "aicenter-iam"
STORAGE = f"s3://{BUCKET}/aicenter"
# No '+' in the run id here: moto matches policy resources as unescaped regular expressions (real ids
# such as manual__...+00:00 are covered by the evaluator tests below).
RUN = "runs/churn/manual__2026-11-28T00:00:00/train/1"
CHECKPOINTS = "runs/churn/manual__2026-11-28T00:00:00/train/checkpoints"
DATASET = f"s3://{BUCKET}/datasets/churn"
PACKAGE = "ab" * 32  # the digest of the package version's zip
BLOB = f"aicenter/blobs/sha256/{PACKAGE}"
OTHER = "aicenter/blobs/sha256/" + "cd" * 32  # another team's model, in the same store
#: The requests the set-up makes before access control starts (bucket, user, key, user policy, role, role policy).
SETUP_REQUESTS = 6


def spec(pipeline: str = "train", **changes: Any) -> RunSpec:
    """A run of package churn 1.0 in run folder RUN, as the operator hands it to the launcher."""
    fields: dict[str, Any] = {"pipeline": pipeline, "storage": STORAGE, "run_prefix": RUN, "package": "churn",
                              "version": "1.0", "blob": BlobRef(sha256=PACKAGE, size=11), "dataset": DATASET}
    return RunSpec(**(fields | changes))


#: A training run with checkpoints: it makes a new version, so it creates blobs.
SCOPE = run_scope(spec(checkpoint_prefix=CHECKPOINTS))


def policy_for_this_run() -> dict[str, Any]:
    return session_policy(SCOPE)


@dataclass
class IamMoto:
    endpoint: str
    worker_key: str
    worker_secret: str

    def client(self, service: str, key: str, secret: str, token: str | None = None) -> Any:
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=key,
                            aws_secret_access_key=secret, aws_session_token=token)

    def worker(self, service: str) -> Any:
        return self.client(service, self.worker_key, self.worker_secret)

    def connection_env(self) -> dict[str, str]:
        return {"AIRFLOW_CONN_AWS_IAM_MOTO": json.dumps({
            "conn_type": "aws", "login": self.worker_key, "password": self.worker_secret,
            "extra": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        })}

    def assumed_role_policies(self) -> list[str]:
        """The session policies moto recorded for AssumeRole calls (its own model API, no auth)."""
        with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=10) as answer:
            data = json.load(answer)
        return [role["policy"] for role in data.get("sts", {}).get("AssumedRole", []) if role.get("policy")]


def assume(iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch, scope: Scope, duration: str = "1800") -> S3Credentials:
    """The credentials the worker gets for a run of ``scope``, with the role carrying that run's session policy."""
    for name, value in iam_moto.connection_env().items():
        monkeypatch.setenv(name, value)
    iam_moto.worker("iam").put_role_policy(RoleName=ROLE, PolicyName="run",
                                           PolicyDocument=json.dumps(session_policy(scope)))
    creds = run_credentials({"runtime_role_arn": ROLE_ARN, "runtime_role_duration": duration}, "aws_iam_moto", scope)
    assert creds is not None
    return creds
