"""Triggers: ``DatasetChangedTrigger`` for data-driven schedules (``AssetWatcher``)."""

from airflow_aicenter.triggers.dataset import DatasetChangedTrigger

__all__ = ["DatasetChangedTrigger"]
