"""airflow-aicenter: AI-Center-style ML pipelines for Apache Airflow.

This top-level module stays import-light (no Airflow, no Kubernetes client) so the runtime
that executes inside training pods can import ``airflow_aicenter.*`` without Airflow.
"""

__version__ = "0.1.0"
