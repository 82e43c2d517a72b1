"""Promotion: point an alias (``production``) at a candidate version when it earns it.

Shared by the Evaluate/Full operators (``promote_to=``) and ``aicenter package promote``;
no Airflow import. The decision is made inside :meth:`Registry.set_alias`'s condition, which
is re-run against the alias's newest entry after every lost race: two runs finishing at once
can never let the worse model overwrite the better one, and no alias update is ever lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.package import validate_alias_name
from airflow_aicenter.records import AliasRecord, EvaluationRecord, VersionRecord
from airflow_aicenter.registry import Registry

PromoteIf = Literal["better", "always", "approved"]
#: What the CLI's ``promote --if`` offers: a decision made now.
PROMOTE_IF: tuple[str, ...] = ("better", "always")
#: What the operators' ``promote_if`` takes: also "approved" (a person decides, :mod:`airflow_aicenter.approval`).
OPERATOR_PROMOTE_IF: tuple[str, ...] = (*PROMOTE_IF, "approved")


@dataclass(frozen=True)
class Promotion:
    """What a promotion attempt decided; ``as_dict`` is the ``"promotion"`` entry of XCom and results."""

    alias: str
    from_version: str | None  # the alias's version when the decision was made (None: no alias yet)
    to_version: str
    promoted: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "from": self.from_version, "to": self.to_version, "reason": self.reason}


@dataclass(frozen=True)
class VersionScore:
    score: float | None
    source: str  # where the score comes from, for the decision's reason
    on: str | None = None  # the data it was measured on, when known


def version_score(
    registry: Registry,
    package: str,
    version: str,
    *,
    record: VersionRecord | None = None,
    evaluations: list[EvaluationRecord] | None = None,
    on: str | None = None,
) -> VersionScore:
    """The score a version is judged by.

    With ``on`` (what the candidate was scored on), a score measured on that same data comes
    first: the latest evaluation on it, else the version's own run score if that run
    evaluated on it. Scores on different data are not comparable, so only without such a
    score: the latest evaluation (a fixed holdout is the usual comparable number), else the
    score its own run recorded. The source says which, so a decision can be checked.
    ``record`` / ``evaluations`` save the reads when the caller has them already.
    """
    if evaluations is None:
        evaluations = registry.evaluations(package, version)
    scored = [e for e in evaluations if e.score is not None]
    same = [e for e in scored if on is not None and e.dataset == on]
    if same:
        return VersionScore(same[-1].score, f"evaluation on the same data, {same[-1].created_at:%Y-%m-%d %H:%M:%S}", on)
    record = record or registry.get(package, version)
    if on is not None and record.score is not None and record.evaluated_on == on:
        return VersionScore(record.score, f"{record.pipeline} run on the same data", on)
    elsewhere = " on other data" if on is not None else ""
    if scored:
        last = scored[-1]
        return VersionScore(last.score, f"evaluation{elsewhere} of {last.created_at:%Y-%m-%d %H:%M:%S}", last.dataset)
    if record.score is not None:
        return VersionScore(record.score, f"{record.pipeline} run{elsewhere}", record.evaluated_on)
    return VersionScore(None, "none")


def check_promote_if(promote_if: str) -> str:
    if promote_if not in OPERATOR_PROMOTE_IF:
        raise ConfigurationError(
            f"promote_if={promote_if!r} is not valid; use 'better' (score strictly above the alias's "
            "current version's), 'always' or 'approved' (a person approves in Airflow's Required Actions)"
        )
    return promote_if


def rejected_reason(registry: Registry, package: str, version: str) -> str | None:
    """Why ``version`` must not be promoted (a person rejected it), or None."""
    approval = registry.approval(package, version)
    if approval is None or approval.status != "rejected":
        return None
    comment = f": {approval.comment!r}" if approval.comment else ""
    return f"version {version} was rejected for {approval.alias!r} ({approval.reason or 'rejected'}{comment})"


def _decide(
    registry: Registry,
    package: str,
    alias: str,
    version: str,
    score: float | None,
    promote_if: str,
    current: AliasRecord | None,
    on: str | None,
) -> tuple[bool, str]:
    if current is not None and current.version == version:
        return False, f"{alias!r} already points at {version}"
    if promote_if == "approved":
        return False, f"waiting for a person's approval before {alias!r} moves to {version} (promote_if='approved')"
    if promote_if == "always":
        return True, "promote_if='always'" + (f" (replaces {current.version})" if current else f" (new alias {alias!r})")
    if score is None:
        return False, (
            f"version {version} has no score (its run did not evaluate), so promote_if='better' cannot judge it; "
            "give the run evaluation data or use promote_if='always'"
        )
    if current is None:
        return True, f"score {score:.6g}; alias {alias!r} did not exist yet"
    theirs = version_score(registry, package, current.version, on=on)
    if theirs.score is None:
        return True, f"score {score:.6g}; the current {alias} version {current.version} has no score"
    if score > theirs.score:
        return True, f"score {score:.6g} > {theirs.score:.6g} of the current {alias} version {current.version} ({theirs.source})"
    return (
        False,
        f"score {score:.6g} is not above {theirs.score:.6g} of the current {alias} version {current.version} ({theirs.source})",
    )


def promote(
    registry: Registry,
    package: str,
    alias: str,
    version: str,
    *,
    score: float | None,
    promote_if: str = "better",
    set_by: str = "",
    evaluated_on: str | None = None,
    force: bool = False,
) -> Promotion:
    """Point ``alias`` at ``version`` if ``promote_if`` allows it, atomically and with history.

    ``evaluated_on`` names the data ``score`` was measured on (see :func:`version_score`).
    ``promote_if="approved"`` never moves the alias here: the person's decision does
    (:func:`airflow_aicenter.approval.apply_decision`). A version a person rejected is never
    moved, unless ``force`` (the CLI's ``--force``).
    """
    validate_alias_name(alias)
    check_promote_if(promote_if)
    if not force and (refused := rejected_reason(registry, package, version)) is not None:
        current = registry.alias(package, alias)
        return Promotion(alias, current.version if current else None, version, False, refused)
    last: dict[str, Any] = {}

    def condition(current: AliasRecord | None) -> bool:
        ok, reason = _decide(registry, package, alias, version, score, promote_if, current, evaluated_on)
        last.update(current=current.version if current else None, reason=reason)
        return ok

    shown = "none" if score is None else f"{score:.6g}"
    record = registry.set_alias(
        package, alias, version, set_by=set_by, condition=condition, reason=f"promote_if={promote_if}, score {shown}"
    )
    if record is None:
        return Promotion(alias, last.get("current"), version, False, last.get("reason", "declined"))
    return Promotion(alias, record.previous, version, True, last["reason"])
