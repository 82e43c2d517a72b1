"""What runs in the training pod or the local child process. Imports neither Airflow nor Kubernetes."""

from airflow_aicenter.runtime.run import Runner, main

__all__ = ["Runner", "main"]
