"""Test hook: kill this process at a named point, to prove a crash there loses nothing.

``AICENTER_TEST_CRASH_AT=<point>`` SIGKILLs the process when it reaches ``crash_point(<point>)``;
``<point>+<seconds>`` arms a timer there instead, so the kill lands in the middle of the work
that follows (an upload, say), or at the next crash point if that work ends first. Unset
(always, outside tests) it costs one dict lookup.

Points: the runtime's phases (``stage_package``, ``stage_data``, ``user_code``,
``package_upload``, ``artifacts_upload``, ``snapshot``) at their start, ``outcome`` before
the final outcome.json; the operator's ``register`` (outcome read, version not yet
committed) and ``results`` (version committed, ``_results.json`` not yet written).
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "AICENTER_TEST_CRASH_AT"


_armed: list[threading.Timer] = []


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, delay = spec.partition("+")
    if _armed:  # the timed kill's phase ended before the timer fired: kill here
        os.kill(os.getpid(), signal.SIGKILL)
    if point != name:
        return
    if delay:
        timer = threading.Timer(float(delay), os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
        _armed.append(timer)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
