"""The AI Center pipeline operators: one subclass per pipeline type, the flow in :mod:`.base`.

Each subclass names its :class:`~airflow_aicenter.plans.PipelinePlan` and the arguments its
type takes; everything else (resolve, check, launch, register, results, XCom, events) is the
base operator's one flow.
"""

from __future__ import annotations

from typing import Any

from airflow_aicenter.operators.base import BasePipelineOperator
from airflow_aicenter.operators.checks import check_prediction
from airflow_aicenter.plans import EVALUATE, FULL, PREDICT, TRAIN
from airflow_aicenter.records import InputType


class TrainPipelineOperator(BasePipelineOperator):
    """AI Center training pipeline: ``Main()``, ``train(data_directory)``, ``save()`` -> new minor version.

    With ``procs_per_node``/``nodes`` every rank trains and rank 0 saves (see DESIGN "Distributed
    training"). See :class:`BasePipelineOperator` for every argument.

    :param package: the ML package's name. (templated)
    :param dataset: the training data URI. (templated)
    :param version: the version to train from (default ``"latest"``). (templated)
    :param save_training_data: snapshot the training data into the store.
    """

    plan = TRAIN

    def __init__(
        self,
        *,
        package: str,
        dataset: str | None = None,
        version: str = "latest",
        save_training_data: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(package=package, version=version, dataset=dataset, save_training_data=save_training_data, **kwargs)


class EvaluatePipelineOperator(BasePipelineOperator):
    """AI Center evaluation pipeline: ``Main()``, ``evaluate(evaluation_directory)`` -> score; no new version.

    :param package: the ML package's name. (templated)
    :param evaluation_dataset: the evaluation data URI. (templated)
    :param version: the version to evaluate (default ``"latest"``). (templated)
    :param save_test_data: snapshot the evaluation data into the store.
    """

    plan = EVALUATE

    def __init__(
        self, *, package: str, evaluation_dataset: str, version: str = "latest", save_test_data: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(
            package=package, version=version, evaluation_dataset=evaluation_dataset, save_test_data=save_test_data, **kwargs
        )


class FullPipelineOperator(BasePipelineOperator):
    """AI Center full pipeline: process_data, train, evaluate, save -> new minor version with its score.

    :param package: the ML package's name. (templated)
    :param dataset: the input data URI (``data_directory``). (templated)
    :param version: the version to train from (default ``"latest"``). (templated)
    :param evaluation_dataset: an evaluation set, staged at ``test_data_directory`` and copied to
        ``evaluation_data_directory``; without it ``process_data`` writes the split. (templated)
    :param save_training_data: snapshot the input data.
    :param save_test_data: snapshot the evaluation data.
    """

    plan = FULL

    def __init__(
        self,
        *,
        package: str,
        dataset: str | None = None,
        version: str = "latest",
        evaluation_dataset: str | None = None,
        save_training_data: bool = False,
        save_test_data: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            package=package,
            version=version,
            dataset=dataset,
            evaluation_dataset=evaluation_dataset,
            save_training_data=save_training_data,
            save_test_data=save_test_data,
            **kwargs,
        )


class PredictPipelineOperator(BasePipelineOperator):
    """Batch prediction with a package's serving code: ``Main()`` from ``main.py``, ``predict(input)`` per input.

    Like SageMaker's batch transform or Craft AI's inference pipelines, on AI Center packages.
    ``procs_per_node`` user processes share the inputs, each loading ``Main()`` once. Outputs go
    to the run folder's ``predictions/`` at the inputs' relative paths. A failing input does not
    stop the batch; the run fails when more than ``max_failed`` inputs failed, after every output
    is written. No new version.

    :param package: the ML package's name. (templated)
    :param version: the version to serve, usually an alias such as ``"production"``. (templated)
    :param dataset: the inputs: a folder, or a manifest whose ``INFERENCE`` lines name them. (templated)
    :param input_type: ``"json"`` (every line of every ``*.jsonl`` file is one input, passed as the
        string it is) or ``"file"`` (every file is one input, its bytes).
    :param max_failed: how many inputs may fail before the run fails (default 0).
    """

    plan = PREDICT

    def __init__(
        self,
        *,
        package: str,
        dataset: str,
        version: str = "latest",
        input_type: InputType = "json",
        max_failed: int = 0,
        **kwargs: Any,
    ) -> None:
        check_prediction(input_type, max_failed)
        super().__init__(package=package, version=version, dataset=dataset, **kwargs)
        self.input_type = input_type
        self.max_failed = max_failed

    def spec_extra(self) -> dict[str, Any]:
        return {"input_type": self.input_type, "max_failed": self.max_failed}
