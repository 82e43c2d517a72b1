"""``python -m airflow_aicenter.runtime SPEC.json``."""

import sys

from airflow_aicenter.runtime.run import main

sys.exit(main())
