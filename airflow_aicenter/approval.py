"""A person approves before an alias moves (``promote_if="approved"``), through Airflow's human in the loop.

The Full and Evaluate operators register the candidate, keep an approval request beside its
version record (``pending``) and ask a person through the standard provider's
human-in-the-loop support (Airflow 3.1+: Browse -> Required Actions), as its ``HITLOperator``
does: the request's body, written here, shows the candidate against the alias's current
version (scores compared like with like, the ``env`` parameters that differ, the data
snapshot's files added, removed and changed, both run pages). The task waits without a
worker slot. The person's answer (or the timeout, which rejects) comes back to
:func:`apply_decision`: approve moves the alias (its history names the approver, the time
and the comment), reject leaves it; either way the decision is kept, created once, beside
the version (:meth:`Registry.decide_approval <airflow_aicenter.registry.Registry.decide_approval>`).

Everything but :func:`hitl_support` and the request's form field is Airflow-free: the
decision and the body are tested alone on real stores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Protocol
from urllib.parse import quote

from airflow_aicenter.errors import AICenterError, ConfigurationError
from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.plans import PipelinePlan
from airflow_aicenter.promotion import Promotion, compare
from airflow_aicenter.records import (
    ApprovalRecord,
    Manifest,
    Outcome,
    Results,
    RunRef,
    VersionRecord,
    read_optional,
    write,
)
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store

if TYPE_CHECKING:
    from airflow_aicenter.completion import Completion, Log, RunRequest

APPROVE, REJECT = "Approve", "Reject"
#: The request's options, as the provider's ``ApprovalOperator`` names them; a timeout takes the default.
OPTIONS = [APPROVE, REJECT]
DEFAULTS = [REJECT]
#: The request's one form field: the person's comment, kept with the decision.
COMMENT = "comment"
DEFAULT_TIMEOUT = timedelta(days=7)
#: Human in the loop arrived in Airflow 3.1 (the standard provider's ``airflow.providers.standard.operators.hitl``).
HITL_AIRFLOW = (3, 1)
HITL_NEEDS = "Airflow 3.1 or later with apache-airflow-providers-standard 1.6.0 or later (human in the loop)"
#: At most this many changed files are named one by one in the request; the rest are counted.
MAX_LISTED = 20


def approval_timeout(value: object) -> timedelta:
    """``approval_timeout`` as a positive ``timedelta`` (given as one, or as seconds > 0)."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigurationError(
            f"approval_timeout={value!r} is not a positive duration; give a timedelta (default "
            "timedelta(days=7)) or seconds > 0: after it the request is rejected"
        )
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


def check_approval(plan: PipelinePlan, who: str, promote_to: str | None, promote_if: str, timeout: object) -> timedelta:
    """The approval arguments, checked when the DAG is parsed; the timeout as a ``timedelta``."""
    timeout = approval_timeout(timeout)
    if promote_if != "approved":
        return timeout
    if promote_to is None:
        raise ConfigurationError(
            f"promote_if='approved' on {who} needs promote_to: name the alias a person approves the version for "
            "(promote_to='production')"
        )
    if not plan.scored:
        raise ConfigurationError(
            f"promote_if='approved' applies to FullPipelineOperator and EvaluatePipelineOperator (their runs are "
            f"scored, so the person sees the candidate against the current version); {who} is not"
        )
    hitl_support()
    return timeout


def check_hitl_version(airflow_version: str) -> None:
    """Refuse an Airflow older than the human-in-the-loop support, naming the version needed."""
    try:
        parts = tuple(int(p) for p in airflow_version.split(".")[:2])
    except ValueError:
        parts = (0, 0)
    if parts < HITL_AIRFLOW:
        raise ConfigurationError(
            f"promote_if='approved' needs {HITL_NEEDS}; this is Airflow {airflow_version}: upgrade Airflow, or use "
            "promote_if='better' and promote by hand with `aicenter package promote`"
        )


def hitl_support() -> None:
    """This Airflow's human-in-the-loop support, or a clear error naming what is needed."""
    from airflow import __version__ as airflow_version

    check_hitl_version(airflow_version)
    try:
        import airflow.providers.standard.operators.hitl  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"promote_if='approved' needs {HITL_NEEDS}; the installed standard provider has none ({exc}): "
            "pip install 'apache-airflow-providers-standard>=1.6.0'"
        ) from exc


# -- the request ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """The version a person is asked about, with the score its run measured and on what data."""

    record: VersionRecord
    score: float | None
    on: str | None
    env: Mapping[str, str]
    run_url: str | None = None


def run_env(registry: Registry, record: VersionRecord) -> dict[str, str] | None:
    """The ``env`` parameters (masked as recorded) of the run that made ``record``; None for an upload."""
    if record.run is None:
        return None
    outcome = read_optional(registry.store, record.run.key(OUTCOME), Outcome)
    return None if outcome is None or outcome.env is None else dict(outcome.env)


def manifest(registry: Registry, uri: str | None) -> Manifest | None:
    """A snapshot manifest by its URI (as version records name it); None when there is none."""
    if not uri:
        return None
    store = registry.store
    key = uri[len(store.uri) + 1:] if uri.startswith(store.uri + "/") else uri
    try:
        return read_optional(store, key, Manifest)
    except AICenterError:
        return None


def snapshot_changes(old: Manifest, new: Manifest) -> tuple[list[str], list[str], list[str]]:
    """Files added, removed and changed (by digest) from ``old`` to ``new``, each sorted."""
    before = {e.path: e.sha256 for e in old.files}
    after = {e.path: e.sha256 for e in new.files}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    return added, removed, changed


def _fmt(score: float | None) -> str:
    return "none" if score is None else f"{score:.6g}"


def _listed(title: str, paths: list[str]) -> list[str]:
    if not paths:
        return []
    shown = ", ".join(f"`{p}`" for p in paths[:MAX_LISTED])
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return [f"- {title} ({len(paths)}): {shown}{more}"]


def request_body(
    registry: Registry, candidate: Candidate, alias: str, current: VersionRecord | None, current_run_url: str | None
) -> str:
    """The request in Markdown: the candidate against the alias's current version, to decide on."""
    new = candidate.record
    package = new.package
    lines = [f"**{package} {new.version}** is a candidate for **{alias}**."]
    if current is None:
        lines.append(f"`{alias}` does not exist yet: approving creates it.")
    else:
        lines.append(f"`{alias}` now points at **{current.version}**.")
    lines += ["", "### Score"]
    if current is None:
        lines.append(f"- candidate {new.version}: {_fmt(candidate.score)} (on `{candidate.on}`)")
    else:
        # the comparison promote_if='better' would make (promotion.compare): the person sees the same rule
        judged = compare(registry, package, new.version, current.version)
        ours, theirs = judged.ours, judged.theirs
        if judged.comparable and ours is not None:
            lines.append(f"- candidate {new.version}: {_fmt(ours.score)} ({ours.source}, on `{ours.data}`)")
        else:
            lines.append(f"- candidate {new.version}: {_fmt(candidate.score)} (on `{candidate.on}`)")
        if theirs is None:
            lines.append(f"- current {current.version}: none")
            lines.append("- The current version has no score: the scores cannot be compared.")
        else:
            lines.append(f"- current {current.version}: {_fmt(theirs.score)} ({theirs.source}, on `{theirs.data}`)")
            if not judged.comparable or ours is None:
                lines.append(f"- **Not like with like**: {judged.why_not}; the two scores are not comparable. To compare "
                             f"them, {judged.fix}.")
            else:
                delta = ours.score - theirs.score
                verdict = "higher" if delta > 0 else "lower" if delta < 0 else "the same"
                basis = judged.basis or ""
                lines.append(f"- {basis[:1].upper()}{basis[1:]}: the candidate scores {verdict} ({delta:+.6g}).")
    lines += ["", "### Parameters (`env`)"]
    theirs_env = None if current is None else run_env(registry, current)
    if current is None:
        lines.append("- " + ", ".join(f"`{k}={v}`" for k, v in sorted(candidate.env.items())) if candidate.env else "- none")
    elif theirs_env is None:
        lines.append(f"- The current version {current.version} was not made by a run here: no parameters to compare.")
    else:
        keys = sorted(set(candidate.env) | set(theirs_env))
        differ = [k for k in keys if candidate.env.get(k) != theirs_env.get(k)]
        if not differ:
            lines.append("- The same parameters as the current version.")
        for k in differ:
            lines.append(f"- `{k}`: `{theirs_env.get(k, '(unset)')}` -> `{candidate.env.get(k, '(unset)')}`")
    lines += ["", "### Training data"]
    new_data, old_data = manifest(registry, new.snapshot), None if current is None else manifest(registry, current.snapshot)
    if current is None:
        lines.append(f"- Snapshot: {new.snapshot or 'none kept'}")
    elif new_data is None or old_data is None:
        missing = [v for v, m in ((new.version, new_data), (current.version, old_data)) if m is None]
        lines.append(
            f"- No snapshot to compare for {' and '.join(missing)} (train with save_training_data=True to see the data "
            "differences)."
        )
    else:
        added, removed, changed = snapshot_changes(old_data, new_data)
        if not (added or removed or changed):
            lines.append(f"- The same {new_data.file_count} files as the current version.")
        lines += _listed("added", added) + _listed("removed", removed) + _listed("changed", changed)
        lines.append(f"- {old_data.file_count} files, {old_data.total_bytes} bytes -> "
                     f"{new_data.file_count} files, {new_data.total_bytes} bytes")
    lines += ["", "### Runs"]
    lines.append(f"- candidate {new.version}: " + (f"[run page]({candidate.run_url})" if candidate.run_url else "no run page"))
    if current is not None:
        lines.append(f"- current {current.version}: " + (f"[run page]({current_run_url})" if current_run_url
                                                           else "uploaded, no run page"))
    lines += ["", f"Approve moves `{alias}` to {new.version}; Reject leaves it. No answer is a rejection."]
    return "\n".join(lines)


def subject(package: str, version: str, alias: str) -> str:
    return f"Approve {package} {version} for {alias}?"


# -- the decision ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What came back from the request: approved or not, by whom, when, the comment; ``timed_out`` when nobody answered."""

    approved: bool
    by: str | None
    at: datetime
    comment: str = ""
    timed_out: bool = False


def decision_from_event(event: Mapping[str, Any], timeout: timedelta | None = None) -> Decision:
    """The human-in-the-loop response event (the standard provider's payload) as a :class:`Decision`.

    A timeout (the request's default, or the provider's timeout error event) rejects.
    """
    now = datetime.now(UTC)
    if "error" in event:
        if event.get("error_type") == "timeout":
            return Decision(False, None, now, "", timed_out=True)
        raise ConfigurationError(f"the approval request failed: {event['error']}")
    chosen = list(event.get("chosen_options") or [])
    user = event.get("responded_by_user") or None
    by = None if user is None else str(user.get("name") or user.get("id") or "") or None
    params = event.get("params_input") or {}
    comment = params.get(COMMENT) or ""
    at = event.get("responded_at") or now
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    timed_out = bool(event.get("timedout"))
    return Decision(chosen == [APPROVE] and not timed_out, by, at, str(comment), timed_out)


def apply_decision(
    registry: Registry, request: ApprovalRecord, decision: Decision, timeout: timedelta | None = None
) -> tuple[ApprovalRecord, Promotion]:
    """Keep the decision beside the version and, approved, move the alias (history: approver, time, comment).

    The decision is created once: a repeated call (a retried resume) finds the one kept and
    applies it again, which moves nothing twice.
    """
    package, version, alias = request.package, request.version, request.alias
    if decision.timed_out:
        reason = "no decision " + (f"within {timeout} " if timeout else "") + "(the request timed out)"
    else:
        reason = f"{'approved' if decision.approved else 'rejected'} by {decision.by or 'an unknown user'}"
    kept = registry.decide_approval(
        request.model_copy(update={
            "status": "approved" if decision.approved else "rejected",
            "by": decision.by, "at": decision.at, "comment": decision.comment, "reason": reason,
        })
    )
    current = registry.alias(package, alias)
    before = current.version if current else None
    if kept.status != "approved":
        return kept, Promotion(alias, before, version, False, kept.reason)
    if current is not None and current.version == version:
        return kept, Promotion(alias, current.previous, version, True, f"{alias!r} points at {version}: {kept.reason}")
    comment = f": {kept.comment}" if kept.comment else ""
    moved = registry.set_alias(
        package, alias, version, set_by=kept.by or "unknown user", reason=f"{kept.reason} at {kept.at:%Y-%m-%d %H:%M:%S}"
        f" UTC{comment}", condition=lambda now: now is None or now.version != version,
    )
    return kept, Promotion(alias, moved.previous if moved else before, version, True, kept.reason)


def pending_request(
    package: str, version: str, alias: str, run: RunRef | None, request_url: str | None = None
) -> ApprovalRecord:
    """The ``pending`` record a run keeps when it asks."""
    return ApprovalRecord(package=package, version=version, alias=alias, status="pending", run=run,
                          request_url=request_url, reason="waiting for a person's decision")


# -- the task's side: open the request, ask, apply the answer ------------------------------
def open_request(
    registry: Registry,
    request: RunRequest,
    done: Completion,
    run: RunRef,
    page_url: Callable[[RunRef], str],
    request_url: str | None = None,
) -> tuple[ApprovalRecord, str] | None:
    """Keep the ``pending`` request beside the candidate and write the body to show; None: nothing to ask.

    Nothing is asked when the alias already points at the candidate, or when the candidate
    already has a decision (a person decides about a version once; a rejected one stays rejected).
    """
    alias = request.promote_to
    assert alias is not None
    candidate = done.new_version or done.parent
    package = candidate.package
    current_alias = registry.alias(package, alias)
    if current_alias is not None and current_alias.version == candidate.version:
        return None
    existing = registry.approval(package, candidate.version)
    if existing is not None and existing.status != "pending":
        return None
    kept = registry.request_approval(pending_request(package, candidate.version, alias, run, request_url))
    current = None if current_alias is None else registry.get(package, current_alias.version)
    env = run_env(registry, candidate)
    asked = Candidate(candidate, done.outcome.score, request.evaluated_on(done.outcome),
                      request.masked_env() if env is None else env, done.run_url)
    current_url = None if current is None or current.run is None else page_url(current.run)
    return kept, request_body(registry, asked, alias, current, current_url)


class TaskInstance(Protocol):
    """What names a task instance's page: Airflow's task instance (``context["ti"]``) has these."""

    @property
    def dag_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...


def required_actions_url(base_url: str, ti: TaskInstance) -> str:
    """The task instance's Required Actions page (where the person answers), under the UI's ``base_url``."""
    return (f"{base_url}/dags/{quote(ti.dag_id, safe='')}/runs/{quote(ti.run_id, safe='')}/tasks/"
            f"{quote(ti.task_id, safe='')}/required_actions")


def ask(
    *,
    ti_id: Any,
    pending: ApprovalRecord,
    body: str,
    timeout: timedelta,
    method_name: str,
    kwargs: dict[str, Any],
    defer: Callable[..., Any],
    log: Log,
) -> NoReturn:
    """Create the human-in-the-loop request for ``pending`` and wait, as the standard provider's ``HITLOperator.execute``.

    Its own functions write the request (``upsert_hitl_detail``); on Airflow 3.3+ the task
    waits in ``awaiting_input`` (no worker slot, no trigger), before that it defers to the
    provider's ``HITLTrigger``. Either way it resumes in ``method_name`` with the response as
    ``event`` and ``kwargs``. Options Approve/Reject, a comment field, Reject on timeout.
    """
    hitl_support()
    log.info("Asking for approval of %s %s for %r (Browse -> Required Actions: %s), waiting up to %s",
             pending.package, pending.version, pending.alias, pending.request_url, timeout)
    from airflow.providers.standard.version_compat import AIRFLOW_V_3_1_3_PLUS, AIRFLOW_V_3_3_PLUS
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.execution_time.hitl import upsert_hitl_detail
    from airflow.sdk.timezone import utcnow

    # Optional (null allowed): Approve and Reject stay clickable without one.
    params = ParamsDict({COMMENT: Param(None, type=["null", "string"], title="Comment",
                                        description="Why (optional): kept with the decision and in the alias history")})
    serialized = {k: params.get_param(k).serialize() for k in params} if AIRFLOW_V_3_1_3_PLUS else params.dump()
    upsert_hitl_detail(ti_id=ti_id, options=OPTIONS, subject=subject(pending.package, pending.version, pending.alias),
                       body=body, defaults=DEFAULTS, multiple=False, params=serialized)
    if AIRFLOW_V_3_3_PLUS:
        from airflow.sdk.exceptions import TaskAwaitingInput

        raise TaskAwaitingInput(method_name=method_name, kwargs=kwargs, timeout=timeout)
    from airflow.providers.standard.triggers.hitl import HITLTrigger

    defer(trigger=HITLTrigger(ti_id=ti_id, options=OPTIONS, defaults=DEFAULTS, params=serialized, multiple=False,
                              timeout_datetime=utcnow() + timeout), method_name=method_name, kwargs=kwargs)
    raise AssertionError("defer() returned")  # pragma: no cover - defer always raises


def decide(
    registry: Registry, package: str, version: str, alias: str, event: Mapping[str, Any], timeout: timedelta | None
) -> tuple[ApprovalRecord, Promotion]:
    """The response ``event`` applied to ``version``'s request (see :func:`apply_decision`)."""
    request = registry.approval(package, version) or pending_request(package, version, alias, None)
    return apply_decision(registry, request, decision_from_event(event, timeout), timeout)


def as_value(record: ApprovalRecord) -> dict[str, Any]:
    """The ``approval`` entry of the XCom value and ``_results.json``: status, by, at, comment, reason."""
    return {"status": record.status, "alias": record.alias, "by": record.by, "at": record.at.isoformat(),
            "comment": record.comment, "reason": record.reason}


def note_in_results(store: Store, results_uri: str, record: ApprovalRecord, promotion: Promotion) -> None:
    """``_results.json`` says what the person decided (``aicenter.approval``) and what the promotion did."""
    key = results_uri[len(store.uri) + 1:] if results_uri.startswith(store.uri + "/") else results_uri
    results = read_optional(store, key, Results)
    if results is None:
        return
    results.aicenter.update(approval=as_value(record), promoted=promotion.promoted, promotion=promotion.as_dict())
    write(store, key, results)


def settle(
    registry: Registry, value: Mapping[str, Any], alias: str, event: Mapping[str, Any], timeout: timedelta | None, log: Log
) -> dict[str, Any]:
    """The task's resumption: the person's answer (or the timeout) for the run's ``value`` (its XCom value).

    The decision is kept and applied (:func:`decide`), noted in ``_results.json``; the returned
    value is ``value`` with what was decided (``promoted``, ``promotion``, ``approval``).
    """
    kept, promotion = decide(registry, value["package"], value["version"], alias, event, timeout)
    note_in_results(registry.store, value["results_uri"], kept, promotion)
    comment = f" ({kept.comment})" if kept.comment else ""
    log.info("%s %s for %r: %s%s", kept.package, kept.version, kept.alias, kept.reason, comment)
    return {**value, "promoted": promotion.promoted, "promotion": promotion.as_dict(), "approval": as_value(kept)}
