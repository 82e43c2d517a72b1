"""Least-privilege S3 credentials for one run (DESIGN "★ Trust boundaries").

With ``runtime_role_arn`` in the ``aicenter`` connection's extra, the worker assumes that role
for each run (STS AssumeRole through the amazon provider's AWS connection) with a session
policy, so a pod holds credentials that can only:

- write its own run folder ``runs/<dag>/<run>/<task>/<try>/`` and its task's
  ``runs/<dag>/<run>/<task>/checkpoints/`` (delete only there: checkpoints are pruned);
- read its run folder, its checkpoints, its datasets (for a manifest dataset, the folders of its
  sources too), its package version's blob (by its exact key) and the single objects it is given
  (the parent's snapshot manifest of an incremental run); for a per-file package version, its
  manifest blob and the file blobs it lists by their exact keys when there are at most
  ``MAX_EXACT_BLOBS`` of them and the policy still fits, else every blob by digest (below);
- only when the run makes blobs (a new version, a snapshot, a package environment; an incremental
  run): create, never overwrite, ``blobs/sha256/*`` and read blobs by digest (``s3:if-none-match``:
  every object-creating request there must carry ``If-None-Match: *``; the multipart steps that
  cannot carry it, CreateMultipartUpload and UploadPart, are told apart through
  ``s3:ObjectCreationOperation`` as AWS documents, so a multipart completion must carry it);
- only when it installs requirements: read and create (never overwrite) ``envs/*``;
- list only its checkpoints and its datasets (``s3:prefix``): never ``blobs/`` or ``envs/``.

Why blobs are read "by digest" and not by a list of keys: the digests a run reads besides its
package blob are decided inside the pod, after the credentials are issued (the environment key
depends on the image's Python and platform; a snapshot's blobs on the data staged; a new
version's on what the code saved), and a session policy holds at most 2,048 characters, a few
blob ARNs. So a run that makes blobs may read any blob whose full sha256 it knows; what it
cannot do is learn digests from the store: it lists no blob or environment, and reads no version
record, alias, snapshot hint, trigger state or other run's folder, which are where digests are
named. A run that makes no blob (batch prediction, an evaluation without snapshots or
environment) reads its package blob and nothing else under ``blobs/``; with a per-file package,
its manifest and the few file blobs that lists. A per-file package of more files than a policy
can name (each key is ~110 characters of the 2,048) is read the same way a run that makes blobs
reads: GetObject on ``blobs/sha256/*`` with no ListBucket there (``Scope.reads_blobs``), so
the run reads the blobs whose digests its manifest gives it, and any other only if it already
knows that blob's full sha256 (content-addressed keys cannot be guessed or listed).

Nothing allows ``packages/`` (version records and aliases), and an explicit Deny keeps it so
even if a dataset is the store itself: those are written by the worker alone. Effective
permissions are the intersection of the role's own policy and this session policy, so the role
may be as broad as the store; the session policy is what makes each run narrow.

Not imported by ``runtime/``, ``package/`` or ``storage/`` (it needs the amazon provider).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.layout import BLOBS, ENVS, PACKAGES, RUNS, blob_key, is_digest
from airflow_aicenter.plans import plan_for
from airflow_aicenter.records import BlobRef, RunSpec
from airflow_aicenter.runtime.manifest import is_manifest_uri, read_manifest
from airflow_aicenter.storage import Store

DEFAULT_DURATION = 3600
#: What STS accepts for DurationSeconds (the role's own maximum may be lower).
MIN_DURATION, MAX_DURATION = 900, 43200
#: AWS refuses a session policy whose plaintext is longer than this.
MAX_POLICY_CHARS = 2048
_ROLE_ARN = re.compile(r"^arn:(aws[a-z-]*):iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
#: A per-file package of at most this many distinct file blobs is read by their exact keys; more by digest.
MAX_EXACT_BLOBS = 8
#: IAM reads these inside a Resource or a condition value as wildcards and policy variables.
_POLICY_SPECIAL = re.compile(r"[*?$]")


@dataclass(frozen=True)
class S3Credentials:
    """STS session credentials for one run. The secret parts stay out of reprs and logs."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime
    role_arn: str

    def to_env(self) -> dict[str, str]:
        """The AWS SDK's variables for a pod or child process (merge over the endpoint and region)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
        }


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigurationError(f"{uri!r} is not an s3://bucket/prefix URI; runtime_role_arn needs the store on S3")
    return parts.netloc, parts.path.strip("/")


def role_settings(extra: Mapping[str, Any]) -> tuple[str, int] | None:
    """``(runtime_role_arn, runtime_role_duration)`` from the connection extra, or None without a role."""
    role = extra.get("runtime_role_arn")
    if not role:
        return None
    if not isinstance(role, str) or not _ROLE_ARN.match(role):
        raise ConfigurationError(
            f"runtime_role_arn {role!r} is not an IAM role ARN; give one like arn:aws:iam::123456789012:role/aicenter-runtime"
        )
    raw = extra.get("runtime_role_duration", DEFAULT_DURATION)
    try:
        duration = int(raw)
    except (TypeError, ValueError):
        duration = -1
    if isinstance(raw, bool) or not MIN_DURATION <= duration <= MAX_DURATION or str(duration) != str(raw).strip():
        raise ConfigurationError(
            f"runtime_role_duration {raw!r} is not a whole number of seconds between {MIN_DURATION} and {MAX_DURATION}; "
            f"set it to how long a run may take (default {DEFAULT_DURATION}), within the role's maximum session duration"
        )
    return role, duration


@dataclass(frozen=True)
class Scope:
    """What one run reaches in the store, as the worker knows it before the pod starts (``run_scope``).

    ``run_prefix`` and ``checkpoint_prefix`` are store keys (``runs/<dag>/<run>/<task>/<try>``,
    ``runs/<dag>/<run>/<task>/checkpoints``); ``datasets`` are the run's dataset URIs (only
    ``s3://`` ones matter; for a manifest dataset the manifest and its sources' folders);
    ``reads`` are single objects the run reads, as store keys or ``s3://`` URIs (the parent
    snapshot of an incremental run); ``blobs`` the digests of the blobs it reads (its package:
    the zip, or a per-file version's manifest and its few file blobs).
    ``makes_blobs``: it creates blobs and reads them by digest (see the module docstring for why
    S3 cannot narrow that further); ``reads_blobs``: it reads blobs by digest, creating none (a
    per-file package of more files than the policy can name); ``environments``: it reads and
    creates ``envs/*``.
    """

    storage: str
    run_prefix: str
    checkpoint_prefix: str | None
    datasets: tuple[str | None, ...] = ()
    reads: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()
    makes_blobs: bool = False
    environments: bool = False
    reads_blobs: bool = False


def run_scope(spec: RunSpec, open_store: Callable[[str], Store] | None = None) -> Scope:
    """The scope of a run's credentials, from its spec: exactly what its agent reads and writes.

    ``blobs`` is the package version's blob; ``reads`` the parent's training snapshot manifest
    (``incremental_base``, a URI). ``makes_blobs`` when the run creates or checks blobs whose
    digests only the pod learns: a new version (train, full), a snapshot (``save_training_data``,
    ``save_test_data``), a package environment (``install_requirements``), and an incremental run
    (it checks that the parent snapshot's blobs are still stored). ``environments`` when it
    restores or stores ``envs/<key>.json``.

    A manifest dataset names its files, in its own folder or anywhere on S3: with ``open_store``
    (the worker's, e.g. ``AICenterHook.get_store``) the manifest is read and the folders of its
    ``s3://`` sources become datasets of the run too (read and listed, never written). A per-file
    package's manifest is read the same way: up to ``MAX_EXACT_BLOBS`` file blobs are named by
    their keys, more (or without ``open_store``) make the run read blobs by digest.
    """
    plan = plan_for(spec.pipeline)
    snapshots = spec.save_training_data or spec.save_test_data
    datasets: tuple[str | None, ...] = (spec.dataset, spec.evaluation_dataset)
    if open_store is not None:
        for uri in (spec.dataset, spec.evaluation_dataset):
            if uri and uri.startswith("s3://") and is_manifest_uri(uri):
                datasets += tuple(_source_folders(uri, open_store))
    makes_blobs = plan.makes_version or snapshots or spec.install_requirements or bool(spec.incremental_base)
    # A run that makes blobs reads blobs by digest anyway: its per-file package's manifest need not be read here.
    blobs, reads_blobs = ((spec.blob.sha256,), False) if makes_blobs else _package_blobs(spec.storage, spec.blob, open_store)
    return Scope(
        storage=spec.storage,
        run_prefix=spec.run_prefix,
        checkpoint_prefix=spec.checkpoint_prefix,
        datasets=datasets,
        reads=(spec.incremental_base,) if spec.incremental_base else (),
        blobs=blobs,
        makes_blobs=makes_blobs,
        environments=spec.install_requirements,
        reads_blobs=reads_blobs,
    )


def _package_blobs(storage: str, blob: BlobRef, open_store: Callable[[str], Store] | None) -> tuple[tuple[str, ...], bool]:
    """(the digests of the package's blobs to name by key, whether it reads blobs by digest instead).

    A zip version is its one blob. A per-file version is its manifest and the distinct file
    blobs the manifest lists, read here with the worker's store (verified by digest), when they
    are few enough to name; else, or without a store to read it from, the run reads by digest.
    """
    if blob.kind != "files":
        return (blob.sha256,), False
    if open_store is None:
        return (blob.sha256,), True
    from airflow_aicenter.storage.transfer import read_package_contents

    files = sorted(read_package_contents(open_store(storage), blob)[0].digests())
    if len(files) > MAX_EXACT_BLOBS:
        return (blob.sha256,), True
    return (blob.sha256, *files), False


def _source_folders(uri: str, open_store: Callable[[str], Store]) -> list[str]:
    """The S3 folders a manifest's sources lie in (its own folder for relative ones), none inside another."""
    folders = sorted({uri.rsplit("/", 1)[0]} | {line.source.rsplit("/", 1)[0] for line in read_manifest(uri, open_store)
                                                if line.source.startswith("s3://")})
    kept: list[str] = []
    for folder in folders:  # sorted: a folder comes right after the folders it lies in
        if not any(folder.startswith(f"{outer}/") for outer in kept):
            kept.append(folder)
    return kept


def session_policy(scope: Scope, partition: str = "aws") -> dict[str, Any]:
    """The session policy for the run of ``scope``: exactly what DESIGN lets a pod do, nothing else.

    Where naming each of several package blobs by key would make the policy longer than AWS
    accepts, the blobs are read by digest instead (``reads_blobs``: the module docstring says why
    that is safe), so a long run id or many datasets never make a per-file package unusable.
    """
    policy = _session_policy(scope, partition)
    if len(scope.blobs) > 1 and not scope.reads_blobs and len(_compact(policy)) > MAX_POLICY_CHARS:
        policy = _session_policy(replace(scope, blobs=scope.blobs[:1], reads_blobs=True), partition)
    return policy


def _compact(policy: dict[str, Any]) -> str:
    """The policy as it is sent to STS (and as AWS counts its length)."""
    return json.dumps(policy, separators=(",", ":"))


def _session_policy(scope: Scope, partition: str) -> dict[str, Any]:
    bucket, root = parse_s3_uri(scope.storage)
    run_prefix, checkpoint_prefix, makes_blobs = scope.run_prefix, scope.checkpoint_prefix, scope.makes_blobs

    def key(name: str) -> str:
        name = name.strip("/")
        return f"{root}/{name}" if root else name

    def objects(bucket_name: str, *prefixes: str) -> list[str]:
        return [f"arn:{partition}:s3:::{bucket_name}/{p}" for p in prefixes]

    for what, prefix in (("run_prefix", run_prefix), ("checkpoint_prefix", checkpoint_prefix)):
        if prefix is not None and not prefix.strip("/").startswith(f"{RUNS}/"):
            raise ConfigurationError(f"{what} {prefix!r} is not a folder under runs/ (runs/<dag>/<run>/<task>/...)")
    run = key(_checked("run_prefix", run_prefix))
    checkpoints = key(_checked("checkpoint_prefix", checkpoint_prefix)) if checkpoint_prefix else None
    create_only = [*([key(BLOBS)] if makes_blobs else []), *([key(ENVS)] if scope.environments else [])]
    data: dict[str, list[str]] = {}  # the run's S3 datasets: bucket -> prefixes
    for uri in scope.datasets:
        if uri and uri.startswith("s3://"):
            data_bucket, prefix = parse_s3_uri(_checked("dataset", uri))
            data.setdefault(data_bucket, []).append(prefix)
    # Listed: what the runtime lists (checkpoint manifests, datasets). Never blobs/ or envs/: a run
    # that could list them could read every blob by the digests the listing names.
    listed = {bucket: [checkpoints]} if checkpoints else {}
    for data_bucket, prefixes in data.items():
        listed.setdefault(data_bucket, []).extend(prefixes)
    single: list[str] = []  # the single objects it reads: given keys or URIs, its package blob
    for name in scope.reads:
        if "://" in name:
            if name.startswith("s3://"):
                single += objects(*parse_s3_uri(_checked("read", name)))
        else:
            single += objects(bucket, key(_checked("read", name)))
    for digest in scope.blobs:
        _digest(digest)
    if not makes_blobs and scope.reads_blobs:  # a per-file package of many files: any blob, by digest (never listed)
        single += objects(bucket, f"{key(BLOBS)}/*")
    elif not makes_blobs:  # else blobs/sha256/* is readable anyway (by digest)
        single += objects(bucket, *(key(blob_key(d)) for d in scope.blobs))
    read_only = [*single, *(arn for b, prefixes in data.items() for arn in objects(b, *_object_patterns(prefixes)))]

    def one_or_many(arns: list[str]) -> str | list[str]:
        return arns[0] if len(arns) == 1 else arns

    # Few statements, no Sids: AWS refuses a session policy over 2,048 characters, and the run's
    # folder names (long run ids) and datasets all add to it.
    writable = [run, *([checkpoints] if checkpoints else []), *create_only]
    statements: list[dict[str, Any]] = [
        # The run folder (overwrites too: outcome.json is rewritten as the run goes), the task's
        # checkpoints, and where the run makes them blobs/ and envs/: written, in one request or as
        # a multipart upload, and read.
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:GetObject"],
         "Resource": objects(bucket, *(f"{p}/*" for p in writable))},
    ]
    if create_only:
        # blobs/ and envs/ are create-only: an object-creating request there (PutObject,
        # CompleteMultipartUpload, CopyObject) without If-None-Match is refused. The multipart steps
        # that cannot carry the header (CreateMultipartUpload, UploadPart) are not object-creating.
        statements.append(
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": objects(bucket, *(f"{p}/*" for p in create_only)),
             "Condition": {"Null": {"s3:if-none-match": "true"}, "BoolIfExists": {"s3:ObjectCreationOperation": "true"}}})
    # Version records and aliases are the worker's alone, whatever else a dataset URI grants.
    statements.append(
        {"Effect": "Deny", "Action": ["s3:PutObject", "s3:DeleteObject"], "Resource": objects(bucket, f"{key(PACKAGES)}/*")})
    if checkpoints:  # a checkpoint sync prunes what only older manifests named
        statements.append({"Effect": "Allow", "Action": "s3:DeleteObject", "Resource": objects(bucket, f"{checkpoints}/*")})
    if read_only:  # the run's datasets, its package blob and the single keys it is given
        statements.append({"Effect": "Allow", "Action": "s3:GetObject", "Resource": read_only})
    statements += [
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:{partition}:s3:::{b}",
         "Condition": {"StringLike": {"s3:prefix": one_or_many([f"{p}/*" if p else "*" for p in prefixes])}}}
        for b, prefixes in listed.items()
    ]
    for statement in statements:
        if isinstance(statement["Resource"], list):
            statement["Resource"] = one_or_many(statement["Resource"])
    return {"Version": "2012-10-17", "Statement": statements}


def _digest(value: str) -> str:
    if not is_digest(value):
        raise ConfigurationError(f"blob digest {value!r} is not 64 lowercase hex characters (a sha256); the version "
                                 "record naming it is damaged: run `aicenter verify` on the store")
    return value


def _checked(what: str, value: str) -> str:
    if _POLICY_SPECIAL.search(value):
        raise ConfigurationError(
            f"{what} {value!r} has '*', '?' or '$', which an IAM policy reads as a wildcard or variable and would widen "
            "the run's credentials; rename it without those characters"
        )
    return value


def _object_patterns(prefixes: Sequence[str]) -> list[str]:
    """A dataset prefix is a folder (``p/*``) or one object (a manifest file, ``p``)."""
    out: list[str] = []
    for p in prefixes:
        out += [f"{p}/*", p] if p else ["*"]
    return out


def session_name(run_prefix: str) -> str:
    """A RoleSessionName naming the run (CloudTrail shows it), within STS's 64 characters and alphabet."""
    digest = hashlib.sha256(run_prefix.encode()).hexdigest()[:10]
    readable = re.sub(r"[^\w+=,.@-]", "-", run_prefix.strip("/").removeprefix(f"{RUNS}/"))
    return f"aicenter-{readable[:43]}-{digest}"


def run_credentials(extra: Mapping[str, Any], aws_conn_id: str | None, scope: Scope) -> S3Credentials | None:
    """Per-run STS credentials limited by ``session_policy``; None when the connection names no role.

    ``extra`` is the ``aicenter`` connection's extra (``runtime_role_arn``, ``runtime_role_duration``);
    ``aws_conn_id`` the AWS connection whose identity may assume the role; ``scope`` what the run
    reaches (``run_scope(spec)`` gives it from the run spec).
    """
    settings = role_settings(extra)
    if settings is None:
        return None
    role_arn, duration = settings
    partition = role_arn.split(":")[1]
    policy = session_policy(scope, partition)
    document = _compact(policy)
    if len(document) > MAX_POLICY_CHARS:
        raise ConfigurationError(
            f"the session policy for run {scope.run_prefix} is {len(document)} characters, over the {MAX_POLICY_CHARS} AWS "
            "accepts: the run names too many datasets (a manifest's sources count by the folders they lie in); put them "
            "under fewer s3:// prefixes"
        )
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from botocore.exceptions import BotoCoreError, ClientError

    sts = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="sts").get_conn()
    try:
        answer = sts.assume_role(
            RoleArn=role_arn, RoleSessionName=session_name(scope.run_prefix), Policy=document, DurationSeconds=duration,
        )
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise ConfigurationError(
            f"cannot assume runtime_role_arn {role_arn} ({error.get('Code')}: {error.get('Message')}); let the identity "
            f"of AWS connection {aws_conn_id!r} call sts:AssumeRole on it (the role's trust policy and that identity's "
            "policy), or remove runtime_role_arn from the aicenter connection"
        ) from None
    except BotoCoreError as exc:
        raise ConfigurationError(
            f"cannot reach STS to assume {role_arn}: {exc}; check the endpoint and region of AWS connection {aws_conn_id!r}"
        ) from None
    creds = answer["Credentials"]
    return S3Credentials(
        access_key_id=creds["AccessKeyId"],
        secret_access_key=creds["SecretAccessKey"],
        session_token=creds["SessionToken"],
        expiration=creds["Expiration"],
        role_arn=role_arn,
    )
