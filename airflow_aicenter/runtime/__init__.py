"""What runs in the training pod or the local child process. Imports neither Airflow nor Kubernetes.

The agent (``agent.py``) stages, uploads and reports; package code runs in user processes
(``user.py``, a standalone script run with the package's interpreter).
"""
