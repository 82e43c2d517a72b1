"""The launcher interface and the one way a run's ending is settled from its ``outcome.json``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from airflow_aicenter.errors import RunError
from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.records import Outcome, RunRef, RunSpec, RunStatus, end_outcome, read_optional

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_aicenter.storage import Store

#: The launchers by name (the operator's ``launcher`` argument, the connection's ``launcher`` extra).
LAUNCHERS = ("local", "kubernetes")


@dataclass(frozen=True)
class Finished:
    """A run that ended well: the spec it ran, its run folder and the runtime's report.

    ``run`` may be an earlier try's folder (a reattached pod, a recovered run): the version is
    registered under the run that made it.
    """

    spec: RunSpec
    run: RunRef
    outcome: Outcome


class Launcher(ABC):
    """Runs a :class:`RunSpec` somewhere and returns the :class:`Finished` run (or raises).

    ``launch`` either runs to the end (returns), fails with the run's one-line cause
    (:class:`RunError`), or defers (Airflow's ``TaskDeferred``; ``resume`` continues from the
    trigger's event). ``kill`` stops what ``launch`` started.
    """

    name: ClassVar[str]
    #: Whether a run of an earlier try can still be running elsewhere (a pod the next try
    #: reattaches to): then an earlier try's "running" outcome is not abandoned.
    outlives_worker: ClassVar[bool] = False

    def check(self) -> None:  # noqa: B027 - optional hook
        """Refuse, before anything is created, what this launcher cannot do."""

    @abstractmethod
    def launch(self, context: Context, spec: RunSpec, run: RunRef) -> Finished: ...

    def resume(self, context: Context, event: dict[str, Any]) -> Finished:
        raise RunError(f"the {self.name} launcher does not defer; clear the task to run it again")

    @abstractmethod
    def kill(self) -> None: ...


def killed_by_airflow(phase: str) -> str:
    """The error of a run Airflow stopped (``on_kill``) before its runtime could record it."""
    return f"killed by Airflow (task stopped) during {phase}"


def await_ending(store: Store, run: RunRef, seconds: float) -> None:
    """Give a runtime that is stopping ``seconds`` to record its own ending (``killed`` in the phase it was in) while its
    outcome says ``running``; a run that left no outcome never started, and is not waited for."""
    key, deadline = run.key(OUTCOME), time.monotonic() + seconds
    outcome = read_optional(store, key, Outcome)
    while outcome is not None and outcome.status == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        outcome = read_optional(store, key, Outcome)


def end_unrecorded(store: Store, spec: RunSpec, run: RunRef, status: RunStatus, error: str | Callable[[str], str]) -> Outcome:
    """The run's outcome; one its runtime left unended (none, or still ``running``) is ended now with ``status`` and
    ``error`` (:func:`end_outcome`). Returns it."""
    key = run.key(OUTCOME)
    outcome = read_optional(store, key, Outcome)
    if outcome is None or outcome.status == "running":
        outcome = end_outcome(store, key, outcome or spec, status, error)
    return outcome


def record_killed(store: Store, spec: RunSpec, run: RunRef) -> Outcome:
    """on_kill's record of a run: ``killed`` (:func:`killed_by_airflow`), unless its runtime recorded an ending. The
    operator's on_kill (pod and Job) and both deferred triggers record a stopped run this way. Returns the outcome."""
    return end_unrecorded(store, spec, run, "killed", killed_by_airflow)


def settle_outcome(store: Store, spec: RunSpec, run: RunRef, *, ended: str | None = None) -> Outcome:
    """The run's ending, from ``outcome.json``; the one place a missing ending is written.

    A runtime that died without reporting (killed, out of memory, a pod that never started)
    leaves no outcome or one still ``running``: a failed outcome is written for it with
    ``ended`` (what the launcher saw, e.g. "the runtime exited with code 137") as the cause.
    A run that did not succeed raises :class:`RunError` with its one-line cause.
    """
    outcome = end_unrecorded(store, spec, run, "failed",
                             lambda phase: f"{ended or 'the runtime ended'} during {phase} before reporting an outcome")
    if outcome.status not in ("succeeded", "skipped"):
        raise RunError(f"{spec.pipeline} run of {spec.package}:{spec.version} {outcome.status}: {outcome.error}")
    return outcome
