"""``python -m airflow_aicenter.runtime SPEC.json``."""

from airflow_aicenter.runtime.run import main
from airflow_aicenter.storage.store import exit_process

exit_process(main())
