"""Kubernetes API calls that ride out a flaky API server: 5xx, 429, dropped or refused connections.

A 10-hour multi-node training is polled thousands of times; on a shared cluster the API
server (or the load balancer before it) answers 503 now and then, throttles with 429, or
drops a connection while it restarts. One such answer must not end the run: the calls the
Job launcher makes go through :func:`call`, which retries the transient ones with jittered
exponential backoff (so the workers of many tasks do not retry in step) within an overall
time budget, and raises :class:`KubernetesUnavailable` (retryable) once the budget is spent.

The KubernetesHook's own ``generic_api_retry`` is not used here: it retries 409 too (a
create whose first answer was lost would be retried into "already exists" five times), and
its five attempts over about 15 s are shorter than an API server restart.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from airflow_aicenter.errors import ConfigurationError, RunError

T = TypeVar("T")


class WarningLog(Protocol):
    """Any logger (stdlib or Airflow's structlog one): only ``warning`` is used."""

    def warning(self, msg: str, /, *args: Any) -> Any: ...

#: HTTP statuses worth another try: throttled, or the server (or its proxy) failing for now.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
#: Seconds of retrying one call before giving up (an API server restart takes about a minute).
BUDGET = 120.0
#: The first wait and the longest one between tries, in seconds, unless the worker's (or triggerer's)
#: environment sets ``AICENTER_KUBE_RETRY_FIRST_WAIT`` / ``AICENTER_KUBE_RETRY_MAX_WAIT`` (docs/kubernetes.md).
FIRST_WAIT, MAX_WAIT = 0.5, 10.0
FIRST_WAIT_ENV, MAX_WAIT_ENV = "AICENTER_KUBE_RETRY_FIRST_WAIT", "AICENTER_KUBE_RETRY_MAX_WAIT"


class KubernetesUnavailable(RunError):
    """The Kubernetes API kept failing for the whole retry budget (retryable: the next try reattaches)."""


def _wait_setting(name: str, default: float) -> float:
    """A wait in seconds from the environment variable ``name`` (above 0), else ``default``.

    Read at each call, so an operator can shorten or lengthen the retry pauses of a worker or
    triggerer without a new release; a bad value is refused naming the variable, not ignored.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ConfigurationError(f"{name}={raw!r} is not a number of seconds above 0; set it to, for example, "
                                 f"{default:g}, or unset it for the default")
    return value


def transient(error: BaseException) -> bool:
    """Whether ``error`` is one a retry can cure: a 429/5xx answer, or no answer at all.

    Both clients count: the sync one (kubernetes, urllib3) and the deferrable trigger's
    (kubernetes_asyncio, aiohttp).
    """
    if isinstance(error, ApiException) or _async_api_error(error):
        status = getattr(error, "status", None)
        return status in TRANSIENT_STATUS or not status  # status 0: no HTTP answer
    return isinstance(error, (HTTPError, ConnectionError, TimeoutError)) or _async_transport_error(error)


def _async_api_error(error: BaseException) -> bool:
    try:
        from kubernetes_asyncio.client.exceptions import ApiException as AsyncApiException
    except ImportError:  # the trigger's client is not installed: no such error can happen
        return False
    return isinstance(error, AsyncApiException)


def _async_transport_error(error: BaseException) -> bool:
    try:
        from aiohttp import ClientConnectionError, ServerTimeoutError
    except ImportError:
        return False
    return isinstance(error, (ClientConnectionError, ServerTimeoutError))


def _retry_after(error: BaseException) -> float | None:
    """A 429's ``Retry-After`` in seconds, when the server gave one."""
    if getattr(error, "status", None) == 429:
        value = (getattr(error, "headers", None) or {}).get("Retry-After")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None
    return None


def _unavailable(what: str, limit: float, tries: int, cause: str) -> KubernetesUnavailable:
    return KubernetesUnavailable(
        f"the Kubernetes API failed to {what} for {limit:.0f} s ({tries} tries, last: {cause}); check the API "
        "server; the task's retry reattaches to a run that is still going"
    )


def _cause(error: BaseException) -> str:
    status = getattr(error, "status", None)
    if status is not None and hasattr(error, "reason"):
        return f"{status} {error.reason}"
    return f"{type(error).__name__}: {error}"


class _Backoff:
    """The retry schedule of one call: jittered exponential pauses within ``budget`` seconds.

    ``pause(error)`` (for a transient error) raises :class:`KubernetesUnavailable` once the budget
    is spent, else logs and returns how long to wait before the next try: the one rule of
    :func:`call` and :func:`acall`.
    """

    def __init__(self, what: str, log: WarningLog | None, budget: float | None) -> None:
        self.what, self.log = what, log
        self.limit = BUDGET if budget is None else budget
        self.deadline = time.monotonic() + self.limit
        self.wait, self.tries = _wait_setting(FIRST_WAIT_ENV, FIRST_WAIT), 0
        self.max_wait = _wait_setting(MAX_WAIT_ENV, MAX_WAIT)

    def pause(self, error: Exception) -> float:
        self.tries += 1
        left = self.deadline - time.monotonic()
        cause = _cause(error)
        if left <= 0:
            raise _unavailable(self.what, self.limit, self.tries, cause) from error
        pause = min(left, _retry_after(error) or random.uniform(self.wait / 2, self.wait))  # jitter, not crypto
        if self.log is not None:
            self.log.warning("Kubernetes API: could not %s (%s); trying again in %.1f s", self.what, cause, pause)
        self.wait = min(self.wait * 2, self.max_wait)
        return pause


async def acall(fn: Callable[..., Awaitable[T]], *args: object, what: str, log: WarningLog | None = None,
                budget: float | None = None, **kwargs: object) -> T:
    """:func:`call` for the deferrable trigger's coroutines: ``await fn(*args, **kwargs)``, retried the same way."""
    backoff = _Backoff(what, log, budget)
    while True:
        try:
            return await fn(*args, **kwargs)
        except Exception as error:
            if not transient(error):
                raise
            await asyncio.sleep(backoff.pause(error))


def call(fn: Callable[..., T], *args: object, what: str, log: WarningLog | None = None, budget: float | None = None,
         **kwargs: object) -> T:
    """``fn(*args, **kwargs)``, retried while it fails transiently, for at most ``budget`` seconds.

    Non-transient errors (404, 409, 422, 403...) are raised at once: the caller decides what
    they mean. ``what`` names the call in the log and in the final error.
    """
    backoff = _Backoff(what, log, budget)
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if not transient(error):
                raise
            time.sleep(backoff.pause(error))
