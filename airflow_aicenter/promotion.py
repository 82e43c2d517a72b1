"""Promotion: point an alias (``production``) at a candidate version when it earns it.

Shared by the Evaluate/Full operators (``promote_to=``) and ``aicenter package promote``;
no Airflow import. The decision is made inside :meth:`Registry.set_alias`'s condition, which
is re-run against the alias's newest entry after every lost race: two runs finishing at once
can never let the worse model overwrite the better one, and no alias update is ever lost.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from airflow_aicenter.errors import AICenterError, ConfigurationError
from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.package import validate_alias_name
from airflow_aicenter.records import (
    AliasRecord,
    EvaluationRecord,
    Manifest,
    Outcome,
    RunRef,
    VersionRecord,
    read_optional,
)
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


SPLIT = "#process_data"


@dataclass(frozen=True)
class Measurement:
    """One score of a version and what it was measured on, from the records (version, evaluations, run outcomes).

    ``data`` is the evaluation dataset's URI, or ``<dataset>#process_data`` for the split a full
    run's ``process_data`` made of its own training data. ``digest`` identifies the content: of
    the evaluation data's snapshot (``save_test_data=True``), or for an own split, of the
    training data's snapshot (``save_training_data=True``); None when nothing was snapshotted.
    """

    version: str
    score: float
    data: str | None  # None: not recorded (a record from before ``evaluated_on``): comparable with nothing
    digest: str | None
    at: datetime
    source: str

    @property
    def own_split(self) -> bool:
        return self.data is not None and self.data.endswith(SPLIT)

    @property
    def dataset(self) -> str | None:
        return None if self.data is None else self.data.removesuffix(SPLIT)

    def describe(self) -> str:
        where = f"its own process_data split of {self.dataset}" if self.own_split else self.data or "data not recorded"
        return f"{self.version}: {self.score:.6g} on {where}"


@dataclass(frozen=True)
class Comparison:
    """How two versions' scores compare under the one rule of "better" (:func:`compare`).

    ``basis`` says which comparison was used (None: the two are not comparable); ``why_not``
    then says why, and ``fix`` what would make them comparable.
    """

    ours: Measurement | None
    theirs: Measurement | None
    basis: str | None
    why_not: str = ""  # e.g. "not scored on the same data (1.2: 0.87 on ...; 1.1: ...)"
    fix: str = ""  # e.g. "evaluate both on the same data: EvaluatePipelineOperator(...)"

    @property
    def comparable(self) -> bool:
        return self.basis is not None and self.ours is not None and self.theirs is not None

    @property
    def better(self) -> bool:
        return self.comparable and self.ours is not None and self.theirs is not None and self.ours.score > self.theirs.score


def snapshot_digest(registry: Registry, uri: str | None) -> str | None:
    """A digest of a snapshot's content (its paths and file digests), so that equal data compares equal
    whatever run or URI snapshotted it; None when there is no readable snapshot."""
    if not uri:
        return None
    store = registry.store
    key = uri[len(store.uri) + 1:] if uri.startswith(store.uri + "/") else uri
    try:
        manifest = read_optional(store, key, Manifest)
    except AICenterError:
        return None
    if manifest is None:
        return None
    listing = "".join(f"{e.path}\0{e.sha256}\n" for e in sorted(manifest.files, key=lambda e: e.path))
    return hashlib.sha256(listing.encode()).hexdigest()


def _test_data_digest(registry: Registry, run: RunRef | None) -> str | None:
    """The digest of the evaluation data a run snapshotted (``save_test_data=True``), if it did."""
    if run is None:
        return None
    try:
        outcome = read_optional(registry.store, run.key(OUTCOME), Outcome)
    except AICenterError:
        return None
    return None if outcome is None else snapshot_digest(registry, outcome.snapshots.get("test_data_directory"))


def measurements(registry: Registry, package: str, version: str) -> list[Measurement]:
    """Every score of ``version`` with what it was measured on, oldest first.

    A score whose data was not recorded (a record from before ``evaluated_on`` was kept, an
    evaluation without a dataset) is kept with ``data`` None: it is a score, so a first
    promotion can use it, but it is the same data as nothing.
    """
    found: list[Measurement] = []
    record = registry.get(package, version)
    if record.score is not None:
        on = record.evaluated_on
        if on is None:
            digest = None
        elif on.endswith(SPLIT):
            digest = snapshot_digest(registry, record.snapshot)
        else:
            digest = _test_data_digest(registry, record.run)
        found.append(Measurement(version, record.score, on, digest, record.created_at, f"{record.pipeline} run"))
    for e in registry.evaluations(package, version):
        if e.score is not None:
            found.append(Measurement(version, e.score, e.dataset, _test_data_digest(registry, e.run), e.created_at,
                                     f"evaluation of {e.created_at:%Y-%m-%d %H:%M:%S}"))
    return sorted(found, key=lambda m: m.at)


def _same_data(a: Measurement, b: Measurement) -> bool:
    """The same content when both were snapshotted; otherwise the same URI is all that is known."""
    if a.data is None or b.data is None:
        return False
    if a.digest is not None and b.digest is not None:
        return a.digest == b.digest
    return a.data == b.data


def _snap(digest: str | None) -> str:
    return f", snapshot {digest[:12]}" if digest else ""


def compare(
    registry: Registry,
    package: str,
    candidate: str,
    current: str,
    *,
    ours: list[Measurement] | None = None,
) -> Comparison:
    """The one rule of "better", used by promotion (operators and CLI) and by the approval request.

    1. The same evaluation data: the candidate's latest score on an evaluation set that the
       current version was also scored on (the same snapshot digest when both runs snapshotted
       it, else the same URI), against the current version's latest score on it.
    2. Else like-for-like own scores: both full-run scores on their ``process_data`` split of
       the same training data (the same snapshot digest) by the same code (the same major).
    3. Else not comparable: ``why_not`` names both scores and the evaluation that would fix it.

    Only the records decide, never who asks: the operator and ``aicenter package promote`` get
    the same answer for the same versions. ``ours`` saves the reads when the caller has them.
    """
    mine = measurements(registry, package, candidate) if ours is None else ours
    theirs = measurements(registry, package, current)
    for m in reversed(mine):
        if m.own_split or m.data is None:
            continue
        same = [t for t in theirs if not t.own_split and _same_data(m, t)]
        if same:
            t = same[-1]
            digest = m.digest if m.digest == t.digest else None
            shown = m.data if m.data == t.data else f"{m.data} and {t.data}"
            return Comparison(m, t, f"on the same evaluation data {shown}{_snap(digest)}")
    major = candidate.partition(".")[0]
    my_split = next((m for m in reversed(mine) if m.own_split), None)
    their_split = next((t for t in reversed(theirs) if t.own_split), None)
    if (
        my_split is not None and their_split is not None and my_split.digest is not None
        and my_split.digest == their_split.digest and major == current.partition(".")[0]
    ):
        return Comparison(my_split, their_split, f"full-run scores on the same training data {my_split.dataset}"
                                                 f"{_snap(my_split.digest)}, each split by major "
                                                 f"{major}'s process_data")
    a, b = (mine[-1] if mine else None), (theirs[-1] if theirs else None)
    return Comparison(a, b, None, *_why_not(package, candidate, current, mine, theirs))


def _why_not(
    package: str, candidate: str, current: str, mine: list[Measurement], theirs: list[Measurement]
) -> tuple[str, str]:
    """Why the two are not comparable (their latest scores) and the evaluation(s) that would make them so."""
    shown = "; ".join(m.describe() for m in (mine[-1:] + theirs[-1:]))
    sets = [m.data for m in reversed(mine + theirs) if m.data is not None and not m.own_split]
    data = sets[0] if sets else None
    todo = [v for v, ms in ((candidate, mine), (current, theirs)) if data is None or all(m.data != data for m in ms)]
    runs = " and ".join(
        f"EvaluatePipelineOperator(task_id=..., package={package!r}, version={v!r}, "
        f"evaluation_dataset={data!r})" if data else
        f"EvaluatePipelineOperator(task_id=..., package={package!r}, version={v!r}, evaluation_dataset=...)"
        for v in (todo or [candidate, current])
    )
    split = [m for m in (mine[-1:] + theirs[-1:]) if m.own_split]
    hint = ""
    if len(split) == 2 and split[0].dataset == split[1].dataset:
        a, b = split
        if a.digest is None or b.digest is None:
            hint = "; or train both with save_training_data=True so that the same training data can be recognised"
        elif a.digest != b.digest:
            shown += f"; the data under {a.dataset} changed between the runs (snapshots {a.digest[:12]}, {b.digest[:12]})"
        elif a.version.partition(".")[0] != b.version.partition(".")[0]:
            shown += "; the same training data, but split by two majors' process_data"
    return f"not scored on the same data ({shown})", f"evaluate both on the same data: {runs}{hint}"


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
    promote_if: str,
    current: AliasRecord | None,
    ours: list[Measurement],
) -> tuple[bool, str]:
    if current is not None and current.version == version:
        return False, f"{alias!r} already points at {version}"
    if promote_if == "approved":
        return False, f"waiting for a person's approval before {alias!r} moves to {version} (promote_if='approved')"
    if promote_if == "always":
        return True, "promote_if='always'" + (f" (replaces {current.version})" if current else f" (new alias {alias!r})")
    if not ours:
        return False, (
            f"version {version} has no score (its run did not evaluate), so promote_if='better' cannot judge it; "
            "give the run evaluation data or use promote_if='always'"
        )
    if current is None:
        return True, f"score {ours[-1].score:.6g}; alias {alias!r} did not exist yet"
    judged = compare(registry, package, version, current.version, ours=ours)
    if judged.theirs is None:
        return True, f"score {ours[-1].score:.6g}; the current {alias} version {current.version} has no score"
    if not judged.comparable or judged.ours is None:
        return False, (
            f"{version} and the current {alias} version {current.version} were {judged.why_not}, so promote_if='better' "
            f"cannot judge them; {judged.fix}"
        )
    a, b = judged.ours.score, judged.theirs.score
    if judged.better:
        return True, f"score {a:.6g} > {b:.6g} of the current {alias} version {current.version} ({judged.basis})"
    return False, f"score {a:.6g} is not above {b:.6g} of the current {alias} version {current.version} ({judged.basis})"


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

    With ``promote_if="better"`` the records decide (:func:`compare`), so every caller gets the
    same answer; ``score`` is noted in the alias history and ``evaluated_on`` is accepted for the
    callers that know it, neither decides.
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
    ours = measurements(registry, package, version) if promote_if == "better" else []

    def condition(current: AliasRecord | None) -> bool:
        ok, reason = _decide(registry, package, alias, version, promote_if, current, ours)
        last.update(current=current.version if current else None, reason=reason)
        return ok

    shown = "none" if score is None else f"{score:.6g}"
    record = registry.set_alias(
        package, alias, version, set_by=set_by, condition=condition, reason=f"promote_if={promote_if}, score {shown}"
    )
    if record is None:
        return Promotion(alias, last.get("current"), version, False, last.get("reason", "declined"))
    return Promotion(alias, record.previous, version, True, last["reason"])
