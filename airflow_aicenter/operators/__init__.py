"""The AI Center pipeline operators: Train, Evaluate, Full and Predict."""

from airflow_aicenter.operators.base import BasePipelineOperator
from airflow_aicenter.operators.pipeline import (
    EvaluatePipelineOperator,
    FullPipelineOperator,
    PredictPipelineOperator,
    TrainPipelineOperator,
)

__all__ = [
    "BasePipelineOperator",
    "EvaluatePipelineOperator",
    "FullPipelineOperator",
    "PredictPipelineOperator",
    "TrainPipelineOperator",
]
