"""How our short-lived processes (the runtime, the ``aicenter`` command) end. No Airflow import."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """End a short-lived process without interpreter teardown.

    obstore's Tokio worker threads are never told that Python is finalizing; one that is still
    busy at that moment (cleaning up after a multipart upload, say) can abort the process with
    SIGABRT after all its work succeeded (seen here twice in about 100 benchmark runs: exit -6
    with the results already printed). Everything the process owes is written before this is
    called, so output is flushed and the process leaves at once with its real exit code.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
