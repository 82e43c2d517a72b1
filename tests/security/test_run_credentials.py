"""Least-privilege run credentials (DESIGN "★ Trust boundaries"; issue 13, issue 20 finding 8).

Against a moto server of its own with IAM access control on (``INITIAL_NO_AUTH_ACTION_COUNT``:
the set-up requests pass unauthenticated, every later one is checked): the worker assumes
the runtime role through the amazon provider's AWS connection, and the credentials it gets
can write their run folder and cannot write a version record, an alias or another run, nor
read another team's blobs where the run needs none but its package's.

moto 5.2 does not apply session policies (``moto/iam/access_control.py``: an assumed role's
permissions are its role's policies only) and ignores condition operators other than
StringEquals (a statement with one applies unconditionally). So each test gives the role the
session policy of the run it tests as the role's own policy, which moto does enforce (actions
and resources), and the session policy the worker sent (read back from moto's record of the
AssumeRole call) is checked against an IAM evaluator below, conditions included: create-only
blobs, listing limited by prefix, against lists of keys each kind of run must and must not reach.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from airflow_aicenter.credentials import (
    MAX_POLICY_CHARS,
    S3Credentials,
    Scope,
    run_credentials,
    run_scope,
    session_name,
    session_policy,
)
from airflow_aicenter.errors import AICenterError, ConfigurationError, DatasetError, NotFoundError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.records import BlobRef, Manifest, ManifestEntry, RunSpec
from airflow_aicenter.runtime.checkpoint import CheckpointSync
from airflow_aicenter.runtime.incremental import check_carried
from airflow_aicenter.storage import S3Options, Store, open_store, transfer
from airflow_aicenter.storage.transfer import ensure_blobs, get_blob, put_blob, sha256_file
from tests.security.iam_moto import (
    ACCOUNT,
    BLOB,
    BUCKET,
    CHECKPOINTS,
    DATASET,
    OTHER,
    PACKAGE,
    ROLE,
    ROLE_ARN,
    RUN,
    STORAGE,
    IamMoto,
    assume,
    policy_for_this_run,
    spec,
)


def s3_of(iam_moto: IamMoto, creds: S3Credentials) -> Any:
    return iam_moto.client("s3", creds.access_key_id, creds.secret_access_key, creds.session_token)


def runtime_store(iam_moto: IamMoto, creds: S3Credentials) -> Store:
    """The runtime's own S3 client (obstore) with the pod's credentials, as the pod gets them in env."""
    return open_store(STORAGE, S3Options.from_env({"AWS_ENDPOINT_URL": iam_moto.endpoint, "AWS_REGION": "us-east-1",
                                                   **creds.to_env()}))


def assume_for_moto(iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch, scope: Scope) -> S3Credentials:
    """Credentials whose role carries the run's session policy as far as moto can enforce it.

    moto 5.2 evaluates no condition but StringEquals (it would apply the create-only Deny, with
    its ``Null`` and ``BoolIfExists``, to every blob write), and authorizes a listing as action
    ``s3:ListObjectsV2``, not IAM's ``s3:ListBucket``. So the role gets the policy without its
    conditional Deny, with its listing unconditional and under moto's name too: broader, never
    narrower, than the session policy, so what moto refuses, AWS refuses too. The evaluator
    tests those conditions. (moto authorizes a HEAD as ``s3:HeadObject``, AWS as ``s3:GetObject``;
    the policy names only the latter, so moto refuses every HEAD, as AWS refuses a HEAD of an
    absent key to whoever may not list it.)
    """
    creds = assume(iam_moto, monkeypatch, scope)
    statements = []
    for st in session_policy(scope)["Statement"]:
        if "Condition" in st and st["Effect"] == "Deny":
            continue
        st = {k: v for k, v in st.items() if k != "Condition"}
        if st["Action"] == "s3:ListBucket":
            st["Action"] = ["s3:ListBucket", "s3:ListObjectsV2"]
        statements.append(st)
    iam_moto.worker("iam").put_role_policy(RoleName=ROLE, PolicyName="run", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": statements}))
    return creds


def denied(call: Any, **kwargs: Any) -> bool:
    try:
        call(**kwargs)
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("AccessDenied", "403")
    return False


def test_run_credentials_write_their_run_folder_and_never_a_version_record_or_alias(
    iam_moto: IamMoto, credentials: S3Credentials
) -> None:
    pod = s3_of(iam_moto, credentials)
    # Allowed: the run folder, the task's checkpoints (and pruning them), reading the package blob and the dataset.
    pod.put_object(Bucket=BUCKET, Key=f"aicenter/{RUN}/outcome.json", Body=b"{}")
    pod.put_object(Bucket=BUCKET, Key=f"aicenter/{RUN}/artifacts/model.pkl", Body=b"model")
    pod.put_object(Bucket=BUCKET, Key=f"aicenter/{CHECKPOINTS}/manifests/0000000001.json", Body=b"{}")
    pod.delete_object(Bucket=BUCKET, Key=f"aicenter/{CHECKPOINTS}/manifests/0000000001.json")
    assert pod.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == b"package zip"
    assert pod.get_object(Bucket=BUCKET, Key="datasets/churn/train.csv")["Body"].read() == b"a,b\n1,2\n"
    # Refused: version records, aliases, other runs and tries, the dataset, deleting in the run folder.
    assert denied(pod.put_object, Bucket=BUCKET, Key="aicenter/packages/x/versions/1.1.json", Body=b"{}")
    assert denied(pod.put_object, Bucket=BUCKET, Key="aicenter/packages/x/aliases/production/0000000002.json", Body=b"{}")
    assert denied(pod.delete_object, Bucket=BUCKET, Key="aicenter/packages/x/versions/1.0.json")
    assert denied(pod.put_object, Bucket=BUCKET, Key="aicenter/runs/churn/other_run/train/1/outcome.json", Body=b"{}")
    assert denied(pod.put_object, Bucket=BUCKET, Key=f"aicenter/{RUN[:-1]}2/outcome.json", Body=b"{}")
    assert denied(pod.put_object, Bucket=BUCKET, Key="datasets/churn/train.csv", Body=b"poisoned")
    assert denied(pod.delete_object, Bucket=BUCKET, Key=f"aicenter/{RUN}/outcome.json")
    assert denied(pod.get_object, Bucket=BUCKET, Key="aicenter/packages/x/versions/1.0.json")
    # The same worker identity without the role can write a version record: the narrowing comes from the role.
    iam_moto.worker("s3").put_object(Bucket=BUCKET, Key="aicenter/packages/x/versions/1.0.json", Body=b"{}")


def test_the_runtime_store_with_run_credentials_writes_its_run_and_is_refused_a_version(
    iam_moto: IamMoto, credentials: S3Credentials
) -> None:
    """The runtime's own S3 client (obstore) given the pod's credentials, as the pod gets them in env."""
    options = S3Options.from_env({"AWS_ENDPOINT_URL": iam_moto.endpoint, "AWS_REGION": "us-east-1",
                                  **credentials.to_env()})
    store = open_store(STORAGE, options)
    store.put_bytes(f"{RUN}/outcome.json", b'{"status": "running"}')
    assert store.get_bytes(f"{RUN}/outcome.json") == b'{"status": "running"}'
    with pytest.raises(AICenterError):
        store.put_bytes("packages/churn/versions/1.1.json", b"{}", create=True)
    with pytest.raises(AICenterError):
        store.put_bytes("packages/churn/aliases/production/0000000009.json", b"{}")


def test_the_worker_sends_the_session_policy_and_the_duration_of_the_connection(
    iam_moto: IamMoto, credentials: S3Credentials
) -> None:
    assert json.loads(iam_moto.assumed_role_policies()[-1]) == policy_for_this_run()
    left = (credentials.expiration - datetime.now(UTC)).total_seconds()
    assert 1700 < left <= 1800
    assert credentials.role_arn == ROLE_ARN
    assert credentials.secret_access_key not in repr(credentials)
    assert credentials.session_token not in repr(credentials)
    identity = iam_moto.client("sts", credentials.access_key_id, credentials.secret_access_key,
                               credentials.session_token).get_caller_identity()
    assert identity["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE}/{session_name(RUN)}"


def test_a_role_the_worker_may_not_assume_is_a_clear_error(iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in iam_moto.connection_env().items():
        monkeypatch.setenv(name, value)
    other = f"arn:aws:iam::{ACCOUNT}:role/not-for-airflow"
    with pytest.raises(ConfigurationError, match=r"cannot assume runtime_role_arn .*not-for-airflow.*sts:AssumeRole"):
        run_credentials({"runtime_role_arn": other}, "aws_iam_moto",
                        Scope(storage=STORAGE, run_prefix=RUN, checkpoint_prefix=CHECKPOINTS))


def test_without_a_role_there_are_no_run_credentials() -> None:
    # No STS call at all (no connection exists under that id): the pod's own identity is used.
    assert run_credentials({"storage": STORAGE}, "no_such_connection",
                           Scope(storage=STORAGE, run_prefix=RUN, checkpoint_prefix=None)) is None


@pytest.mark.parametrize(("extra", "message"), [
    ({"runtime_role_arn": "aicenter-runtime"}, "is not an IAM role ARN"),
    ({"runtime_role_arn": f"arn:aws:iam::{ACCOUNT}:user/ana"}, "is not an IAM role ARN"),
    ({"runtime_role_arn": ROLE_ARN, "runtime_role_duration": "1h"}, "runtime_role_duration '1h'"),
    ({"runtime_role_arn": ROLE_ARN, "runtime_role_duration": 60}, "between 900 and 43200"),
    ({"runtime_role_arn": ROLE_ARN, "runtime_role_duration": 86400}, "between 900 and 43200"),
    ({"runtime_role_arn": ROLE_ARN, "runtime_role_duration": True}, "runtime_role_duration True"),
])
def test_bad_role_settings_are_refused_naming_the_fix(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        run_credentials(extra, None, Scope(storage=STORAGE, run_prefix=RUN, checkpoint_prefix=None))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"storage": "file:///srv/aicenter"}, "needs the store on S3"),
    ({"run_prefix": "runs/churn/*/train/1"}, "wildcard or variable"),
    ({"run_prefix": "runs/churn/${aws:username}/train/1"}, "wildcard or variable"),
    ({"datasets": ("s3://data/ch?rn",)}, "wildcard or variable"),
    ({"run_prefix": "packages/churn"}, "is not a folder under runs/"),
    ({"checkpoint_prefix": "blobs/sha256"}, "is not a folder under runs/"),
])
def test_a_policy_that_would_grant_more_is_refused(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"storage": STORAGE, "run_prefix": RUN, "checkpoint_prefix": CHECKPOINTS, **kwargs}
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        session_policy(Scope(**arguments))


def test_a_session_policy_over_the_aws_limit_is_refused_before_calling_sts() -> None:
    datasets = tuple(f"s3://data-{uuid.uuid4().hex}/folder-{i}" for i in range(30))
    with pytest.raises(ConfigurationError, match=f"over the {MAX_POLICY_CHARS} AWS accepts"):
        run_credentials({"runtime_role_arn": ROLE_ARN}, "no_such_connection",
                        Scope(storage=STORAGE, run_prefix=RUN, checkpoint_prefix=CHECKPOINTS, datasets=datasets))


def test_a_typical_full_run_fits_the_aws_limit() -> None:
    long_run = "runs/customer_churn_retraining/scheduled__2026-11-28T00:00:00+00:00/train_and_evaluate~12"
    store = "s3://company-ml-platform-store/aicenter"
    full = spec("full", storage=store, run_prefix=f"{long_run}/3", checkpoint_prefix=f"{long_run}/checkpoints",
                dataset="s3://company-datasets/churn/2026-11", evaluation_dataset="s3://company-datasets/churn/holdout",
                install_requirements=True, save_training_data=True, save_test_data=True,
                incremental_base=f"{store}/{long_run.replace('~12', '~11')}/2/data_directory.manifest.json")
    predict = spec("predict", storage=store, run_prefix=f"{long_run}/3", dataset="s3://company-datasets/churn/inbox")
    for run in (full, predict):
        assert len(json.dumps(session_policy(run_scope(run)), separators=(",", ":"))) <= MAX_POLICY_CHARS


def test_session_names_fit_sts() -> None:
    name = session_name("runs/" + "d" * 200 + "/manual__2026-11-28T00:00:00+00:00/t~3/1")
    assert re.fullmatch(r"[\w+=,.@-]{2,64}", name)
    assert session_name(RUN) != session_name(RUN[:-1] + "2")


# -- the session policy as AWS evaluates it (conditions included, which moto ignores) ---------------
def _like(pattern: str, value: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part).replace(r"\?", ".") for part in pattern.split("*")), value) is not None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _condition_holds(operator: str, key: str, expected: Any, context: Mapping[str, str]) -> bool:
    actual = context.get(key)
    if operator.endswith("IfExists"):
        return actual is None or _condition_holds(operator.removesuffix("IfExists"), key, expected, context)
    if operator == "Null":
        return (actual is None) == (str(expected).lower() == "true")
    if actual is None:
        return False
    if operator == "StringLike":
        return any(_like(p, actual) for p in _as_list(expected))
    if operator == "Bool":
        return actual.lower() == str(expected).lower()
    raise AssertionError(f"the evaluator does not know {operator}")


def allowed(policy: dict[str, Any], action: str, resource: str, **context: str) -> bool:
    """IAM's evaluation of one policy: an explicit Deny wins, else any Allow that applies, else denied."""
    def applies(statement: dict[str, Any]) -> bool:
        return (
            any(_like(a, action) for a in _as_list(statement["Action"]))
            and any(_like(r, resource) for r in _as_list(statement["Resource"]))
            and all(_condition_holds(op, key, value, context)
                    for op, keys in statement.get("Condition", {}).items() for key, value in keys.items())
        )
    effects = {s["Effect"] for s in policy["Statement"] if applies(s)}
    return "Deny" not in effects and "Allow" in effects


def obj(key: str, bucket: str = BUCKET) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


CREATE = {"s3:ObjectCreationOperation": "true"}  # PutObject, CompleteMultipartUpload
STEP = {"s3:ObjectCreationOperation": "false"}  # CreateMultipartUpload, UploadPart


PARENT = "runs/churn/manual__1/train/1"  # the run that made the parent version (its snapshot)


def test_the_policy_allows_exactly_what_design_lists() -> None:
    full = spec("full", evaluation_dataset="s3://other-data/images/2026", checkpoint_prefix=CHECKPOINTS,
                install_requirements=True, save_training_data=True,
                incremental_base=f"{STORAGE}/{PARENT}/data_directory.manifest.json")
    policy = session_policy(run_scope(full))
    put, get, delete, lst = "s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:ListBucket"
    bucket = f"arn:aws:s3:::{BUCKET}"
    expectations = [
        # the run folder and the task's checkpoints
        (True, put, obj(f"aicenter/{RUN}/_outcome.json"), CREATE),
        (True, put, obj(f"aicenter/{RUN}/artifacts/a/b.bin"), STEP),
        (True, "s3:AbortMultipartUpload", obj(f"aicenter/{RUN}/artifacts/a/b.bin"), {}),
        (True, put, obj(f"aicenter/{CHECKPOINTS}/objects/" + "0" * 64), CREATE),
        (True, delete, obj(f"aicenter/{CHECKPOINTS}/objects/" + "0" * 64), {}),
        (False, delete, obj(f"aicenter/{RUN}/outcome.json"), {}),
        (False, put, obj("aicenter/runs/churn/manual__2026-11-28T00:00:00/train/2/outcome.json"), CREATE),
        (False, put, obj("aicenter/runs/churn/manual__2026-11-28T00:00:00/evaluate/checkpoints/x"), CREATE),
        # blobs and envs: created with If-None-Match, never overwritten
        (True, put, obj(BLOB), {**CREATE, "s3:if-none-match": "*"}),
        (False, put, obj(BLOB), CREATE),  # a plain put, or a multipart completion, without If-None-Match
        (True, put, obj(BLOB), STEP),  # the parts of a multipart upload
        (True, put, obj("aicenter/envs/k.json"), {**CREATE, "s3:if-none-match": "*"}),
        (False, put, obj("aicenter/envs/k.json"), CREATE),
        (False, delete, obj(BLOB), {}),
        (True, get, obj(BLOB), {}),
        (True, get, obj("aicenter/envs/k.json"), {}),
        # version records and aliases: never
        (False, put, obj("aicenter/packages/x/versions/1.1.json"), {**CREATE, "s3:if-none-match": "*"}),
        (False, put, obj("aicenter/packages/x/aliases/production/0000000002.json"), CREATE),
        (False, delete, obj("aicenter/packages/x/versions/1.0.json"), {}),
        (False, get, obj("aicenter/packages/x/versions/1.0.json"), {}),
        # datasets and given keys: read only, exactly those prefixes
        (True, get, obj("datasets/churn/train.csv"), {}),
        (True, get, obj("images/2026/cat.png", "other-data"), {}),
        (False, get, obj("images/2025/cat.png", "other-data"), {}),
        (False, get, obj("datasets/churn-private/x.csv"), {}),
        (False, put, obj("datasets/churn/train.csv"), CREATE),
        # the parent's snapshot manifest, given as the URI the version record holds: that one object
        (True, get, obj(f"aicenter/{PARENT}/data_directory.manifest.json"), {}),
        (False, get, obj(f"aicenter/{PARENT}/outcome.json"), {}),
        (False, put, obj(f"aicenter/{PARENT}/data_directory.manifest.json"), CREATE),
        # where digests are named: other runs' manifests, snapshot hints, trigger state
        (False, get, obj("aicenter/runs/other_team/manual__2/train/1/data_directory.manifest.json"), {}),
        (False, get, obj("aicenter/snapshots/" + "5" * 64 + ".json"), {}),
        (False, get, obj("aicenter/triggers/" + "6" * 64 + ".json"), {}),
        # listing: only the prefixes the run reads; never blobs/ or envs/ (every digest in the store)
        (True, lst, bucket, {"s3:prefix": f"aicenter/{CHECKPOINTS}/manifests/"}),
        (True, lst, bucket, {"s3:prefix": "datasets/churn/"}),
        (True, lst, "arn:aws:s3:::other-data", {"s3:prefix": "images/2026/"}),
        (False, lst, bucket, {"s3:prefix": "aicenter/blobs/sha256/"}),
        (False, lst, bucket, {"s3:prefix": "aicenter/blobs/sha256"}),
        (False, lst, bucket, {"s3:prefix": "aicenter/envs/"}),
        (False, lst, bucket, {"s3:prefix": "aicenter/packages/"}),
        (False, lst, bucket, {"s3:prefix": "aicenter/runs/"}),
        (False, lst, bucket, {"s3:prefix": "aicenter/"}),
        (False, lst, bucket, {}),
        (False, lst, "arn:aws:s3:::other-data", {"s3:prefix": "images/"}),
    ]
    wrong = [(a, r, c, want) for want, a, r, c in expectations if allowed(policy, a, r, **c) != want]
    assert wrong == []


@pytest.mark.parametrize("run", [
    spec("predict"),
    spec("evaluate", dataset=None, evaluation_dataset=DATASET),
    spec("evaluate", dataset=None, evaluation_dataset=DATASET, checkpoint_prefix=CHECKPOINTS),
], ids=["predict", "evaluate", "evaluate-with-checkpoints"])
def test_a_run_that_makes_no_blob_reads_its_package_blob_and_no_other(run: RunSpec) -> None:
    policy = session_policy(run_scope(run))
    put, get, lst = "s3:PutObject", "s3:GetObject", "s3:ListBucket"
    expectations = [
        (True, get, obj(BLOB), {}),
        (True, get, obj("datasets/churn/train.csv"), {}),
        (True, put, obj(f"aicenter/{RUN}/outcome.json"), CREATE),
        (False, get, obj(OTHER), {}),
        (False, get, obj("aicenter/envs/k.json"), {}),
        (False, put, obj(OTHER), {**CREATE, "s3:if-none-match": "*"}),
        (False, put, obj("aicenter/envs/k.json"), {**CREATE, "s3:if-none-match": "*"}),
        (False, lst, f"arn:aws:s3:::{BUCKET}", {"s3:prefix": "aicenter/blobs/sha256/"}),
    ]
    wrong = [(a, r, c, want) for want, a, r, c in expectations if allowed(policy, a, r, **c) != want]
    assert wrong == []


@pytest.mark.parametrize(("run", "makes_blobs", "environments"), [
    (spec("train"), True, False),  # the new version's package blob
    (spec("full", install_requirements=True), True, True),
    (spec("predict"), False, False),
    (spec("predict", install_requirements=True), True, True),  # restores or stores its environment's blob
    (spec("evaluate", dataset=None, evaluation_dataset=DATASET), False, False),
    (spec("evaluate", dataset=None, evaluation_dataset=DATASET, save_test_data=True), True, False),  # a snapshot
    (spec("predict", incremental_base=f"{STORAGE}/{PARENT}/data_directory.manifest.json"), True, False),
])
def test_the_scope_follows_what_the_run_does(run: RunSpec, makes_blobs: bool, environments: bool) -> None:
    scope = run_scope(run)
    assert (scope.makes_blobs, scope.environments, scope.blobs) == (makes_blobs, environments, (PACKAGE,))


@pytest.mark.parametrize("digest", ["*", PACKAGE + "\n", PACKAGE.upper()])
def test_a_digest_that_is_not_one_is_refused(digest: str) -> None:
    # "\n": a newline would end up inside the blob's ARN (a regex's "$" matches before a final newline).
    with pytest.raises(ConfigurationError, match="is not 64 lowercase hex characters"):
        session_policy(Scope(storage=STORAGE, run_prefix=RUN, checkpoint_prefix=None, blobs=(digest,)))


def test_prediction_credentials_read_their_package_blob_and_not_another_teams(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_s3 = iam_moto.worker("s3")
    for key, body in ((BLOB, b"package zip"), (OTHER, b"another team's model"), ("aicenter/envs/k.json", b"{}")):
        worker_s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    pod = s3_of(iam_moto, assume(iam_moto, monkeypatch, run_scope(spec("predict"))))
    # (GETs only: moto 5.2 authorizes a HEAD as s3:HeadObject, which is no IAM action; AWS as s3:GetObject.)
    assert pod.get_object(Bucket=BUCKET, Key=BLOB)["Body"].read() == b"package zip"
    assert denied(pod.get_object, Bucket=BUCKET, Key=OTHER)
    assert denied(pod.get_object, Bucket=BUCKET, Key="aicenter/envs/k.json")
    assert denied(pod.put_object, Bucket=BUCKET, Key="aicenter/blobs/sha256/" + "ef" * 32, Body=b"x", IfNoneMatch="*")


def test_incremental_credentials_read_the_parent_snapshot_the_version_record_names(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``incremental_base`` is a URI (the version record's ``snapshot``), not a store key."""
    manifest = f"aicenter/{PARENT}/data_directory.manifest.json"
    worker_s3 = iam_moto.worker("s3")
    worker_s3.put_object(Bucket=BUCKET, Key=manifest, Body=b'{"files": []}')
    worker_s3.put_object(Bucket=BUCKET, Key=f"aicenter/{PARENT}/outcome.json", Body=b"{}")
    run = spec("train", save_training_data=True, incremental_base=f"s3://{BUCKET}/{manifest}")
    pod = s3_of(iam_moto, assume(iam_moto, monkeypatch, run_scope(run)))
    assert pod.get_object(Bucket=BUCKET, Key=manifest)["Body"].read() == b'{"files": []}'
    assert denied(pod.get_object, Bucket=BUCKET, Key=f"aicenter/{PARENT}/outcome.json")


def test_without_checkpoints_nothing_under_the_task_but_the_run_folder_is_writable() -> None:
    policy = session_policy(Scope(storage=f"s3://{BUCKET}", run_prefix=RUN, checkpoint_prefix=None))
    assert allowed(policy, "s3:PutObject", obj(f"{RUN}/outcome.json"), **CREATE)
    assert not allowed(policy, "s3:PutObject", obj(f"{CHECKPOINTS}/manifests/1.json"), **CREATE)
    assert not any("s3:DeleteObject" in _as_list(s["Action"]) for s in policy["Statement"] if s["Effect"] == "Allow")
    assert not allowed(policy, "s3:PutObject", obj("packages/x/versions/1.1.json"), **CREATE, **{"s3:if-none-match": "*"})


# -- the runtime under credentials that may not list blobs/ ------------------------------------
# Run credentials list no blob, and S3 answers 403 (not 404) to a lookup of an absent key from
# whoever may not list it. moto 5.2 refuses every HEAD under these policies (it authorizes a HEAD
# as s3:HeadObject, which is no IAM action; AWS authorizes it as s3:GetObject): that stands for
# AWS's answer here, for present keys too.
def test_a_snapshot_with_run_credentials_stores_its_blobs_without_listing_the_store(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = {"stored.csv": b"already stored\n", "new-1.csv": b"new one\n", "new-2.csv": b"new two\n"}
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    entries = [sha256_file(tmp_path / name) for name in files]
    iam_moto.worker("s3").put_object(Bucket=BUCKET, Key=f"aicenter/{blob_key(entries[0].sha256)}", Body=files["stored.csv"])
    creds = assume_for_moto(iam_moto, monkeypatch, run_scope(spec("train", dataset=None, save_training_data=True)))
    store = runtime_store(iam_moto, creds)
    with pytest.raises(AICenterError, match="denied"):  # the credentials cannot list the blobs
        list(store.list("blobs/sha256"))
    monkeypatch.setattr(transfer, "LIST_MIN_FILES", 2)  # the listing path, which a large snapshot takes on S3
    stats = transfer.run(ensure_blobs(store, tmp_path, entries))
    assert (stats.files, stats.uploaded_files) == (3, 2)
    worker_s3 = iam_moto.worker("s3")
    for entry in entries:
        key = f"aicenter/{blob_key(entry.sha256)}"
        assert worker_s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == files[entry.path]


def test_a_new_package_blob_is_stored_with_run_credentials(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    package = tmp_path / "package.zip"
    package.write_bytes(b"PK new version " + uuid.uuid4().bytes)
    entry = sha256_file(package)
    creds = assume_for_moto(iam_moto, monkeypatch, run_scope(spec("train", dataset=None)))
    assert put_blob(runtime_store(iam_moto, creds), package, entry.sha256)
    stored = iam_moto.worker("s3").get_object(Bucket=BUCKET, Key=f"aicenter/{blob_key(entry.sha256)}")
    assert stored["Body"].read() == package.read_bytes()


def test_a_checkpoint_sync_with_run_credentials_stores_its_objects(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The sync looks each new object up before creating it; a refused lookup is an absent object."""
    local = tmp_path / "checkpoint"
    local.mkdir()
    (local / "step-1.pt").write_bytes(b"weights " + uuid.uuid4().bytes)
    creds = assume_for_moto(iam_moto, monkeypatch, run_scope(spec("train", dataset=None, checkpoint_prefix=CHECKPOINTS)))
    sync = CheckpointSync(runtime_store(iam_moto, creds), CHECKPOINTS, local, 300, lambda _: None, try_number=1)
    stats = sync.sync()
    assert stats is not None and stats.uploaded_files == 1
    restored = tmp_path / "restored"
    restored.mkdir()
    manifest = CheckpointSync(runtime_store(iam_moto, creds), CHECKPOINTS, restored, 300, lambda _: None,
                              try_number=2).restore()
    assert manifest is not None
    assert (restored / "step-1.pt").read_bytes() == (local / "step-1.pt").read_bytes()


def test_a_parent_blob_that_is_gone_is_named_under_run_credentials(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "access denied; check the credentials": run credentials get 403 for an absent blob."""
    uri = f"{STORAGE}/{PARENT}/data_directory.manifest.json"
    gone = ManifestEntry(path="old.csv", sha256="0f" * 32, size=3)
    base = Manifest(source=DATASET, directory="data_directory", files=[gone], file_count=1, total_bytes=3)
    creds = assume(iam_moto, monkeypatch, run_scope(spec("train", save_training_data=True, incremental_base=uri)))
    with pytest.raises(DatasetError, match=r"which is gone from the store .*train without incremental=True"):
        check_carried(runtime_store(iam_moto, creds), base, [gone], uri)


def test_a_package_blob_that_is_gone_is_named_under_run_credentials(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Staging a version whose blob was deleted: not "access denied; check the credentials"."""
    gone = "0e" * 32
    creds = assume_for_moto(iam_moto, monkeypatch, run_scope(spec("predict", blob=BlobRef(sha256=gone, size=3))))
    with pytest.raises(NotFoundError, match=r"missing from the store or not readable .*aicenter verify --repair"):
        get_blob(runtime_store(iam_moto, creds), gone, tmp_path / "package.zip")


def test_a_manifest_dataset_reads_the_folders_of_its_sources(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest names its files: relative to its folder, or anywhere on S3; the run reads those folders only."""
    worker_s3 = iam_moto.worker("s3")
    lines = [{"source": "images/cat.png", "usage": "TRAIN"}, {"source": f"s3://{BUCKET}/shared/2026/dog.png"}]
    worker_s3.put_object(Bucket=BUCKET, Key="manifests/churn/train.manifest",
                         Body="\n".join(json.dumps(line) for line in lines).encode())
    for key in ("manifests/churn/images/cat.png", "shared/2026/dog.png", "shared/2025/secret.png"):
        worker_s3.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
    worker = S3Options.from_env({"AWS_ENDPOINT_URL": iam_moto.endpoint, "AWS_REGION": "us-east-1",
                                 "AWS_ACCESS_KEY_ID": iam_moto.worker_key, "AWS_SECRET_ACCESS_KEY": iam_moto.worker_secret})
    scope = run_scope(spec("train", dataset=f"s3://{BUCKET}/manifests/churn/train.manifest"),
                      lambda uri: open_store(uri, worker, create=False))
    policy = session_policy(scope)
    assert allowed(policy, "s3:GetObject", obj("manifests/churn/train.manifest"))
    assert allowed(policy, "s3:GetObject", obj("shared/2026/dog.png"))
    assert not allowed(policy, "s3:GetObject", obj("shared/2025/secret.png"))
    pod = s3_of(iam_moto, assume_for_moto(iam_moto, monkeypatch, scope))
    for key in ("manifests/churn/train.manifest", "manifests/churn/images/cat.png", "shared/2026/dog.png"):
        assert pod.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert denied(pod.get_object, Bucket=BUCKET, Key="shared/2025/secret.png")


# -- per-file package versions (issue 25): the manifest's blobs by exact key, else by digest --------
def per_file_package(store: Store, tmp_path: Path, n_files: int) -> BlobRef:
    """A per-file version's content in ``store``: ``n_files`` file blobs and the manifest naming them."""
    from airflow_aicenter.package.contents import PackageContents, PackageFile, encode

    files = []
    for i in range(n_files):
        path = tmp_path / f"file-{i}.bin"
        path.write_bytes(f"file {i} ".encode() + uuid.uuid4().bytes)
        entry = sha256_file(path)
        put_blob(store, path, entry.sha256)
        files.append(PackageFile(path=f"model/file-{i:03d}.bin", size=entry.size, mode=0o644, sha256=entry.sha256))
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(encode(PackageContents(files=files)))
    ref = sha256_file(manifest)
    put_blob(store, manifest, ref.sha256)
    return BlobRef(sha256=ref.sha256, size=ref.size, kind="files")


def store_at(root: Path) -> Any:
    """``open_store`` for run_scope: the run's s3:// storage, served from a folder laid out like it."""
    return lambda uri: open_store(root.as_uri())


def file_keys(store: Store, blob: BlobRef) -> list[str]:
    from airflow_aicenter.storage.transfer import read_package_contents

    return [f"aicenter/{blob_key(f.sha256)}" for f in read_package_contents(store, blob)[0].files]


def test_a_per_file_package_of_a_few_files_is_read_by_exact_keys(tmp_path: Path) -> None:
    """A prediction staging a per-file version reads its manifest and the blobs it lists, and no other blob."""
    store = open_store((tmp_path / "store").as_uri())
    blob = per_file_package(store, tmp_path, 3)
    scope = run_scope(spec("predict", blob=blob), store_at(tmp_path / "store"))
    assert not scope.makes_blobs and not scope.reads_blobs and len(scope.blobs) == 4
    policy = session_policy(scope)
    get, lst = "s3:GetObject", "s3:ListBucket"
    for key in [f"aicenter/{blob_key(blob.sha256)}", *file_keys(store, blob)]:
        assert allowed(policy, get, obj(key)), key
    assert not allowed(policy, get, obj(OTHER))
    assert not allowed(policy, get, obj(BLOB))
    assert not allowed(policy, lst, f"arn:aws:s3:::{BUCKET}", **{"s3:prefix": "aicenter/blobs/sha256/"})
    assert not allowed(policy, "s3:PutObject", obj(OTHER), **CREATE, **{"s3:if-none-match": "*"})


@pytest.mark.parametrize("how", ["many files", "no store to read the manifest from"])
def test_a_per_file_package_of_many_files_reads_blobs_by_digest_and_lists_none(tmp_path: Path, how: str) -> None:
    """Thousands of keys do not fit a session policy (2,048 characters): GetObject on blobs/sha256/* then,
    never ListBucket there, so only a digest the run already knows can be read (content-addressed keys are
    unguessable), and nothing is writable."""
    store = open_store((tmp_path / "store").as_uri())
    blob = per_file_package(store, tmp_path, 40 if how == "many files" else 2)
    scope = run_scope(spec("predict", blob=blob), store_at(tmp_path / "store") if how == "many files" else None)
    assert scope.reads_blobs and not scope.makes_blobs
    policy = session_policy(scope)
    document = json.dumps(policy, separators=(",", ":"))
    assert len(document) <= MAX_POLICY_CHARS
    get, lst = "s3:GetObject", "s3:ListBucket"
    for key in [f"aicenter/{blob_key(blob.sha256)}", *file_keys(store, blob)]:
        assert allowed(policy, get, obj(key)), key
    for prefix in ("aicenter/blobs/sha256/", "aicenter/blobs/", "aicenter/"):
        assert not allowed(policy, lst, f"arn:aws:s3:::{BUCKET}", **{"s3:prefix": prefix})
    assert not allowed(policy, "s3:PutObject", obj(OTHER), **CREATE, **{"s3:if-none-match": "*"})
    assert not allowed(policy, get, obj("aicenter/envs/k.json"))
    assert not allowed(policy, get, obj("aicenter/packages/churn/versions/1.0.json"))


def test_exact_keys_give_way_to_reading_by_digest_when_the_policy_would_be_too_long() -> None:
    digests = tuple(f"{i:02x}" * 32 for i in range(9))
    long_run = "runs/" + "d" * 200 + "/manual__2026-11-28T00:00:00/t/1"
    scope = Scope(storage=STORAGE, run_prefix=long_run, checkpoint_prefix=None,
                  datasets=tuple(f"s3://{BUCKET}/datasets/{'x' * 60}-{i}" for i in range(4)), blobs=digests)
    policy = session_policy(scope)
    assert len(json.dumps(policy, separators=(",", ":"))) <= MAX_POLICY_CHARS
    for digest in digests:
        assert allowed(policy, "s3:GetObject", obj(f"aicenter/{blob_key(digest)}"))
    assert not allowed(policy, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", **{"s3:prefix": "aicenter/blobs/sha256/"})


def test_prediction_credentials_read_the_blobs_of_their_per_file_package_and_not_another_teams(
    iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    worker = S3Options.from_env({"AWS_ENDPOINT_URL": iam_moto.endpoint, "AWS_REGION": "us-east-1",
                                 "AWS_ACCESS_KEY_ID": iam_moto.worker_key, "AWS_SECRET_ACCESS_KEY": iam_moto.worker_secret})
    store = open_store(STORAGE, worker, create=False)
    blob = per_file_package(store, tmp_path, 3)
    iam_moto.worker("s3").put_object(Bucket=BUCKET, Key=OTHER, Body=b"another team's model")
    scope = run_scope(spec("predict", blob=blob), lambda uri: open_store(uri, worker, create=False))
    pod = s3_of(iam_moto, assume(iam_moto, monkeypatch, scope))
    for key in [f"aicenter/{blob_key(blob.sha256)}", *file_keys(store, blob)]:
        assert pod.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key
    assert denied(pod.get_object, Bucket=BUCKET, Key=OTHER)


def test_a_run_that_makes_blobs_does_not_read_its_per_file_packages_manifest() -> None:
    """It reads blobs by digest anyway (its package's files among them): the worker spares the manifest's GET."""
    def no_store(uri: str) -> Store:
        raise AssertionError(f"{uri} was opened")

    blob = BlobRef(sha256=PACKAGE, size=300, kind="files")
    scope = run_scope(spec("train", dataset=None, blob=blob), no_store)
    assert scope.makes_blobs and scope.blobs == (PACKAGE,)
    assert allowed(session_policy(scope), "s3:GetObject", obj("aicenter/" + blob_key("ef" * 32)))
