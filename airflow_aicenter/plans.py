"""Pipeline plans: what each pipeline type needs and produces, as data.

The operators, the runtime and the records ask a plan instead of branching on the pipeline's
name: which datasets it needs, whether it makes a version or a score, which ``_results.json``
keys it fills, and the calls it makes on ``Main``. No Airflow import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pipeline = Literal["train", "evaluate", "full", "predict"]


@dataclass(frozen=True)
class PipelinePlan:
    """One pipeline type.

    :param name: the pipeline type, as records and ``validate_package`` name it.
    :param source: the package file whose ``Main`` runs (``train.py``, or ``main.py`` to serve).
    :param calls: the ``Main`` methods called after ``Main()``, in order (AI Center's call order).
    :param datasets: operator arguments that must be given (``dataset``, ``evaluation_dataset``).
    :param optional_datasets: operator arguments that may be given.
    :param makes_version: the run's package folder becomes the next minor version.
    :param scored: the run reports a score (``Main.evaluate``).
    :param input_keys: ``_results.json`` ``parameters.inputs`` keys for the datasets, in order.
    :param distributed: ``nodes``/``procs_per_node`` > 1 are allowed (ranks train together).
    :param contract: what ``validate_package`` checks the package for (predicting needs the serving half).
    """

    name: Pipeline
    source: str
    calls: tuple[str, ...]
    datasets: tuple[str, ...]
    optional_datasets: tuple[str, ...] = ()
    makes_version: bool = False
    scored: bool = False
    input_keys: tuple[tuple[str, str], ...] = ()
    distributed: bool = False
    contract: str = ""

    @property
    def serving(self) -> bool:
        """Batch prediction: ``main.py``'s ``Main``, processes share the inputs, outputs go to ``predictions/``."""
        return self.contract == "serve"

    @property
    def processes_data(self) -> bool:
        """``process_data`` runs first (once per node) and writes the training and evaluation splits."""
        return "process_data" in self.calls

    def __post_init__(self) -> None:
        if not self.contract:
            object.__setattr__(self, "contract", self.name)

    @property
    def records_evaluation(self) -> bool:
        """The run scores the version it ran, which stays as it is: an evaluation record of that version."""
        return self.scored and not self.makes_version

    @property
    def all_datasets(self) -> tuple[str, ...]:
        return (*self.datasets, *self.optional_datasets)


TRAIN = PipelinePlan(
    name="train",
    source="train.py",
    calls=("train", "save"),
    datasets=("dataset",),
    makes_version=True,
    input_keys=(("train_data", "dataset"),),
    distributed=True,
)
EVALUATE = PipelinePlan(
    name="evaluate",
    source="train.py",
    calls=("evaluate",),
    datasets=("evaluation_dataset",),
    scored=True,
    input_keys=(("evaluation_data", "evaluation_dataset"),),
)
FULL = PipelinePlan(
    name="full",
    source="train.py",
    calls=("process_data", "train", "evaluate", "save"),
    datasets=("dataset",),
    optional_datasets=("evaluation_dataset",),
    makes_version=True,
    scored=True,
    input_keys=(("train_data", "dataset"), ("evaluation_data", "evaluation_dataset")),
    distributed=True,
)
PREDICT = PipelinePlan(
    name="predict",
    source="main.py",
    calls=("predict",),
    datasets=("dataset",),
    input_keys=(("inference_data", "dataset"),),
    contract="serve",
)

PLANS: dict[str, PipelinePlan] = {plan.name: plan for plan in (TRAIN, EVALUATE, FULL, PREDICT)}
#: What ``validate_package`` can check a package for, each once (``PipelinePlan.contract``).
CONTRACTS: tuple[str, ...] = tuple(dict.fromkeys(plan.contract for plan in PLANS.values()))


def plan_for(name: str) -> PipelinePlan:
    try:
        return PLANS[name]
    except KeyError:
        raise ValueError(f"unknown pipeline {name!r}; one of {', '.join(PLANS)}") from None
