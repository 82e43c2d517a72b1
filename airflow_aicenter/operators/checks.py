"""Before compute: the pipeline operators' arguments and datasets, checked against the plan.

A run that cannot work fails here, before any pod or process starts, with what to change. The
pipeline type is asked of its :class:`~airflow_aicenter.plans.PipelinePlan`. No Airflow import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, get_args
from urllib.parse import unquote, urlparse

from airflow_aicenter.approval import DEFAULT_TIMEOUT as DEFAULT_APPROVAL_TIMEOUT
from airflow_aicenter.approval import check_approval
from airflow_aicenter.errors import ConfigurationError, DatasetError, NotFoundError
from airflow_aicenter.launchers.base import LAUNCHERS
from airflow_aicenter.launchers.pod_spec import DEFAULT_STARTUP_TIMEOUT, check_infra, check_queue_name, check_startup_timeout
from airflow_aicenter.package import validate_alias_name
from airflow_aicenter.plans import PipelinePlan
from airflow_aicenter.promotion import PromoteIf, check_promote_if
from airflow_aicenter.records import InputType
from airflow_aicenter.run_spec import rendered_count
from airflow_aicenter.runtime.manifest import (
    EVALUATION,
    INFERENCE,
    TRAINING,
    Roots,
    check_manifest,
    dataset_roots,
    outside_roots,
)

if TYPE_CHECKING:
    from airflow_aicenter.storage import Store


def gpu_count(gpu: bool | int) -> int:
    if isinstance(gpu, bool):
        return int(gpu)
    if isinstance(gpu, int) and gpu >= 0:
        return gpu
    raise ConfigurationError(f"gpu={gpu!r} is not valid; use True/False or a GPU count such as 2")


def is_templated(value: object) -> bool:
    """A Jinja template: its value is known only once the task is rendered (then it is checked)."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)


class Arguments(Protocol):
    """The operator's arguments as it holds them (its attributes of the same names), before any is normalised."""

    dataset: str | None
    gpu: bool | int
    cpu: float | str | None
    memory_gb: float | None
    storage_gb: float | None
    dataset_volume_claim: str | None
    dataset_sub_path: str | None
    allow_source_builds: bool
    nodes: int | str  # a count, or a template rendering to one
    procs_per_node: int | str
    checkpoint_interval: float
    progress_interval: float
    incremental: bool
    launcher: str | None
    promote_to: str | None
    promote_if: PromoteIf
    do_xcom_push: bool


class Checked(NamedTuple):
    """The arguments :func:`check_arguments` normalises, as the operator keeps them."""

    gpu: int
    checkpoint_interval: float
    progress_interval: float
    approval_timeout: timedelta
    queue_name: str | None
    startup_timeout: float


def check_arguments(
    plan: PipelinePlan,
    who: str,
    args: Arguments,
    *,
    approval_timeout: object = DEFAULT_APPROVAL_TIMEOUT,
    queue_name: object = None,
    startup_timeout: object = DEFAULT_STARTUP_TIMEOUT,
) -> Checked:
    """The operator's arguments, checked when the DAG is parsed: a task that cannot work never reaches a worker.

    ``who`` names the operator class in the messages. Only what is known before rendering is
    checked here (the datasets' content is checked by :func:`check_datasets` before compute).
    Returns the arguments that have a normal form (a GPU count, seconds, a ``timedelta``), with
    those the operator keeps only in that form (``approval_timeout``, ``queue_name``, ``startup_timeout``).
    """
    dataset, claim = args.dataset, args.dataset_volume_claim
    gpu_count(args.gpu)
    check_infra(cpu=args.cpu, memory_gb=args.memory_gb, storage_gb=args.storage_gb, dataset_sub_path=args.dataset_sub_path)
    if not isinstance(args.allow_source_builds, bool):
        raise ConfigurationError(f"allow_source_builds={args.allow_source_builds!r} is not valid; give True or False")
    # Templated counts (a DAG param) are checked with the shape once rendered: check_rendered_counts.
    nodes = 1 if is_templated(args.nodes) else rendered_count("nodes", args.nodes)
    procs_per_node = 1 if is_templated(args.procs_per_node) else rendered_count("procs_per_node", args.procs_per_node)
    for name, default in (("checkpoint_interval", 300), ("progress_interval", 30)):
        interval = getattr(args, name)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigurationError(f"{name}={interval!r} is not valid; give seconds > 0 (default {default})")
    if claim and dataset and not dataset.startswith("pvc://"):
        raise ConfigurationError(
            f"give either dataset={dataset!r} (staged from the store) or dataset_volume_claim={claim!r} "
            "(mounted read-only), not both"
        )
    if args.do_xcom_push:
        raise ConfigurationError(
            "do_xcom_push=True would add KubernetesPodOperator's XCom sidecar (known to hang the task); the results "
            "are pushed to XCom (return_value) without it: leave do_xcom_push unset"
        )
    if args.launcher is not None and args.launcher not in LAUNCHERS:
        raise ConfigurationError(f"launcher={args.launcher!r} is not valid; use one of {', '.join(LAUNCHERS)} or None")
    check_promote_if(args.promote_if)
    check_shape(
        plan, who, nodes=nodes, procs_per_node=procs_per_node, incremental=args.incremental,
        promote_to=args.promote_to, promote_if=args.promote_if,
    )
    return Checked(
        gpu=gpu_count(args.gpu),
        checkpoint_interval=float(args.checkpoint_interval),
        progress_interval=float(args.progress_interval),
        approval_timeout=check_approval(plan, who, args.promote_to, args.promote_if, approval_timeout),
        queue_name=check_queue_name(queue_name),
        startup_timeout=check_startup_timeout(startup_timeout),
    )


def run_queue(launcher: str, queue_name: str | None, connection_queue: object) -> str | None:
    """The Kueue queue a run waits in: the operator's ``queue_name``, else the connection extra's.

    Only the kubernetes launcher queues: ``queue_name`` on another launcher is refused, as it
    would be ignored (the run starts on the worker at once); the connection's default is not.
    """
    if launcher == "kubernetes":
        return queue_name or check_queue_name(connection_queue, "the connection's extra queue_name")
    if queue_name:
        raise ConfigurationError(
            f"queue_name={queue_name!r} is for the kubernetes launcher (a Kueue queue); the {launcher} launcher runs "
            "on the worker: remove queue_name or use launcher='kubernetes'"
        )
    return None


def check_rendered_counts(plan: PipelinePlan, who: str, args: Arguments) -> tuple[int, int]:
    """``(nodes, procs_per_node)`` once the task is rendered, checked against the plan as at parse time."""
    nodes, procs_per_node = rendered_count("nodes", args.nodes), rendered_count("procs_per_node", args.procs_per_node)
    check_shape(plan, who, nodes=nodes, procs_per_node=procs_per_node, incremental=args.incremental,
                promote_to=args.promote_to, promote_if=args.promote_if)
    return nodes, procs_per_node


def check_prediction(input_type: str, max_failed: int) -> None:
    """Batch prediction's own arguments: how inputs are read, how many may fail."""
    if input_type not in get_args(InputType):
        raise ConfigurationError(
            f"input_type={input_type!r} is not valid; use 'json' (JSON Lines, one input a line) or 'file' (one input a file)"
        )
    if isinstance(max_failed, bool) or not isinstance(max_failed, int) or max_failed < 0:
        raise ConfigurationError(f"max_failed={max_failed!r} is not valid; give how many inputs may fail (0 or more)")


def check_shape(
    plan: PipelinePlan,
    who: str,
    *,
    nodes: int,
    procs_per_node: int,
    incremental: bool,
    promote_to: str | None,
    promote_if: str,
) -> None:
    """What the pipeline type allows: ranks (training, or processes sharing prediction inputs), incremental, promotion."""
    if (nodes > 1 or procs_per_node > 1) and not (plan.distributed or plan.serving):
        raise ConfigurationError(f"{who} runs one process (nodes and procs_per_node apply to training); leave them at 1")
    if plan.serving and nodes != 1:
        raise ConfigurationError("batch prediction runs on one node: use procs_per_node=N to share the inputs")
    if incremental and not plan.makes_version:
        raise ConfigurationError(f"incremental=True applies to training runs; {who} does not train")
    if promote_to is not None:
        validate_alias_name(promote_to)
        if not plan.scored and promote_if == "better":
            raise ConfigurationError(
                "promote_if='better' needs a score, and a training run has none: use FullPipelineOperator "
                "(trains and evaluates) or promote_if='always'"
            )


def check_datasets(
    plan: PipelinePlan,
    datasets: Mapping[str, str | None],
    who: str,
    *,
    open_store: Callable[[str], Store],
    mounted_claim: bool = False,
    allowed_roots: Roots = None,
) -> None:
    """Fail before compute when a dataset is missing, empty or unreadable.

    ``datasets`` maps the operator's dataset arguments to their URIs; ``mounted_claim``: the
    dataset is a volume claim the pod mounts (it checks it); ``allowed_roots``: the connection
    extra ``allowed_dataset_roots``, the only folders ``file://`` data may come from.
    """
    for attr in plan.datasets:
        if not datasets.get(attr):
            raise ConfigurationError(f"{who} needs {attr}=...: the URI of the data folder (s3://... or file:///...)")
    for attr in plan.all_datasets:
        uri = datasets.get(attr)
        if uri and uri.startswith("pvc://") and not (attr == "dataset" and mounted_claim):
            raise ConfigurationError(
                f"{attr}={uri!r} names a volume claim; mount it with dataset_volume_claim='<claim>' "
                "(and dataset_sub_path=...) and leave dataset unset, or give an s3:// or file:// URI"
            )
        if not uri or uri.startswith("pvc://"):  # a mounted volume claim: the pod checks it
            continue
        check_dataset_root(attr, uri, allowed_roots)
        if uri.endswith((".manifest", ".jsonl")):
            # A ModelArts manifest: every line checked (JSON, ``source``, the source exists), and at
            # least one line for what this run reads from it (TRAIN, EVAL/TEST or INFERENCE lines).
            usages = INFERENCE if plan.serving else EVALUATION if attr == "evaluation_dataset" else TRAINING
            check_manifest(uri, lambda target, **kw: open_store(target), require=usages, roots=allowed_roots)
            continue
        try:
            empty = next(iter(open_store(uri).list("")), None) is None
        except NotFoundError:
            empty = True
        if empty:
            raise DatasetError(f"{attr} {uri} is empty or does not exist; upload the data there or fix the URI")


def check_dataset_root(attr: str, uri: str, roots: Roots) -> None:
    """With the connection extra ``allowed_dataset_roots``, a ``file://`` dataset must lie inside one of them.

    The worker's disk holds more than data (its own configuration, other teams' files): a
    deployment names the folders DAG authors may train from. Links are resolved first.
    """
    allowed = dataset_roots(roots) if uri.startswith("file://") else []
    if outside_roots(Path(unquote(urlparse(uri).path)), allowed):
        raise ConfigurationError(
            f"{attr} {uri} is outside the folders this deployment allows for file:// datasets "
            f"({', '.join(str(r) for r in allowed)}; the aicenter connection's allowed_dataset_roots): "
            "move the data under one of them, or use an s3:// dataset"
        )
