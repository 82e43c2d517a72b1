"""``import aicenter; aicenter.report(step=120, total=1000, loss=0.31)``: progress and metrics from package code.

The implementation is ``airflow_aicenter/runtime/report.py`` (standard library only), which the
runtime also copies beside every user process as ``aicenter.py``; see docs/progress.md.
"""

from airflow_aicenter.runtime.report import MAX_LINE, METRICS_FILE_ENV, report

__all__ = ["MAX_LINE", "METRICS_FILE_ENV", "report"]
