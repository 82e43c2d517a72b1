"""Train, Evaluate and Full pipeline operators."""

from airflow_aicenter.operators.pipeline import (
    BasePipelineOperator,
    EvaluatePipelineOperator,
    FullPipelineOperator,
    TrainPipelineOperator,
)

__all__ = ["BasePipelineOperator", "EvaluatePipelineOperator", "FullPipelineOperator", "TrainPipelineOperator"]
