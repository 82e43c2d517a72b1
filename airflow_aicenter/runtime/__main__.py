"""``python -m airflow_aicenter.runtime SPEC.json``: the agent."""

from airflow_aicenter.process import exit_process
from airflow_aicenter.runtime.agent import main

exit_process(main())
