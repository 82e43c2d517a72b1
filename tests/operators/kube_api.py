"""A small Kubernetes API server for tests: real HTTP on 127.0.0.1, pods run as local processes.

A real cluster cannot run on these machines, so this implements the part of the core/v1 API
that KubernetesPodOperator (sync client) and its trigger (kubernetes_asyncio) call: create,
read, list (labelSelector), patch and delete pods, pod logs (``follow=true`` streams), events
(list and ``watch=true``), plus ``/version``. A created pod is validated against the
Kubernetes OpenAPI schema (kubernetes-validate), then its containers run as local processes
(``initContainers`` one after the other, a failed one fails the pod; then ``containers`` together):

- env from ``value``, ``secretKeyRef`` / ``envFrom.secretRef`` (secrets the test registers),
  ``fieldRef`` (metadata.name/namespace); nothing leaks in from the test process's env;
- volumes: ``emptyDir`` -> a temp folder, ``persistentVolumeClaim`` -> the folder the test
  registered for the claim (+ ``subPath``), ``hostPath`` -> that folder of this machine (the
  node of every pod; ``DirectoryOrCreate`` creates it); mount paths in env values and arguments are
  rewritten to those folders, ``/tmp`` becomes ``TMPDIR``;
- ``python`` runs the interpreter given to the server (the airflow-free runtime venv);
- the termination message file becomes ``AICENTER_TERMINATION_LOG`` and is reported in
  ``status.containerStatuses[].state.terminated.message`` (``FallbackToLogsOnError`` honoured);
- phases go Pending -> Running -> Succeeded/Failed; delete sends SIGTERM, then SIGKILL after
  the grace period, like the kubelet.

Jobs (``batch/v1``, Indexed) run through a small Job controller: one pod per completion index,
``backoffLimit: 0``, ``suspend`` until :meth:`FakeKubernetes.admit_job` (as Kueue admits), a
``podFailurePolicy`` ``FailJob`` rule on ``DisruptionTarget``, and a pod removed before it
succeeded counted as failed. :class:`StateStoreComms` serves Airflow's task state store to a
task run without a supervisor, shared between worker processes through a file.

Helpers for tests that use it are at the end of the module (the fixtures live in conftest.py).
``FakeKubernetes(..., podman=PodmanPods())`` runs the pods in real containers instead
(tests/containers/podman.py, used by tests/containers/).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

if TYPE_CHECKING:
    from tests.containers.podman import PodmanPods

REPO = Path(__file__).resolve().parents[2]
KUBE_VERSION = "1.34"
#: Cap on a deleted pod's grace period, so a test never waits 30 s for a stubborn process.
MAX_GRACE = 10.0
#: How long a ``watch=true`` request is held open at most.
MAX_WATCH = 5.0


def now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime, *, nano: bool = False) -> str:
    if nano:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


# -- selectors --------------------------------------------------------------------------
def label_selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x,y)``."""
    if not selector:
        return True
    for term in re.split(r",(?![^()]*\))", selector):
        term = term.strip()
        if not term:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            ok = labels.get(key) in values if op == "in" else labels.get(key) not in values
        elif "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key.strip()) != value.strip()
        elif "=" in term:
            key, value = re.split(r"==?", term, maxsplit=1)
            ok = labels.get(key.strip()) == value.strip()
        elif term.startswith("!"):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def field_selector_matches(selector: str | None, obj: dict[str, Any]) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        path, _, value = term.partition("=")
        current: Any = obj
        for part in path.strip().split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if str(current) != value.strip():
            return False
    return True


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


# -- pods -------------------------------------------------------------------------------
@dataclass
class Container:
    name: str
    spec: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    started: datetime | None = None
    finished: datetime | None = None
    exit_code: int | None = None
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    termination_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # resolved (for test assertions only)
    argv: list[str] = field(default_factory=list)


@dataclass
class Pod:
    obj: dict[str, Any]
    folder: Path
    containers: list[Container]
    #: ``initContainers``, run one after the other before ``containers`` start (all at once).
    init: list[Container] = field(default_factory=list)
    log: list[tuple[datetime, str, str]] = field(default_factory=list)  # (time, container, line)
    events: list[dict[str, Any]] = field(default_factory=list)
    deleting: bool = False
    gone: bool = False
    init_failed: bool = False
    #: The ``DisruptionTarget`` condition of a disrupted pod (:meth:`FakeKubernetes.disrupt`).
    disruption: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.obj["metadata"]["namespace"], self.obj["metadata"]["name"]

    @property
    def terminal(self) -> bool:
        return self.obj.get("status", {}).get("phase") in ("Succeeded", "Failed")


@dataclass
class Fault:
    """The next ``count`` requests whose method and path match answer ``status`` (or reset the connection)."""

    method: str
    path: re.Pattern[str]
    count: int
    status: int | str  # an HTTP status, "reset": the connection is closed with no answer, or "hold" (see hold_next)
    #: For ``status="hold"``: the held requests go on (answered normally) once this is set.
    release: threading.Event = field(default_factory=threading.Event)
    #: Set when the first matching request is held (the test knows the client is waiting there).
    reached: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        return self.count > 0 and (self.method in ("*", method)) and bool(self.path.search(path))


@dataclass
class Job:
    """An Indexed batch/v1 Job: one pod per completion index, no retries (backoffLimit 0)."""

    obj: dict[str, Any]
    pods: list[tuple[str, str]] = field(default_factory=list)
    #: The port every pod of this Job sees as AICENTER_MASTER_PORT (one host: one free port per Job).
    port: int = 0
    deleting: bool = False


class FakeKubernetes:
    """The server and the pods it runs. See the module docstring."""

    def __init__(self, root: Path, *, python: str = sys.executable, podman: PodmanPods | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.python = python
        #: Podman mode (tests/containers/podman.py): pods run in real containers instead of as processes.
        self.podman = podman
        self.pods: dict[tuple[str, str], Pod] = {}
        self.deleted: list[Pod] = []
        self.created: list[dict[str, Any]] = []  # every pod manifest received, as sent
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.claims: dict[tuple[str, str], Path] = {}
        self.unpullable: set[str] = set()
        #: The runtime image's own environment (its Dockerfile's ENV): every container starts with it, the pod's env wins.
        self.image_env: dict[str, str] = {}
        self.jobs: dict[tuple[str, str], Job] = {}
        self.secret_manifests: list[dict[str, Any]] = []
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        #: The cluster DNS of Job pods (``<job>-<i>.<service>``): every pod runs on this host.
        self.dns: dict[str, str] = {}
        self.start_delay = 0.0  # seconds a pod stays Pending before its containers start
        #: Called with the labelSelector before a pod list is answered (a test can seed pods then).
        self.on_list_pods: Callable[[str | None], None] | None = None
        #: Pods this says True for are never scheduled: they stay Pending (``PodScheduled: False``, Unschedulable),
        #: as on a cluster with no free GPU node; e.g. ``lambda pod: index_of(pod) == 1``.
        self.unschedulable: Callable[[dict[str, Any]], bool] | None = None
        #: Injected API faults (:meth:`fail_next`): the next requests matching them fail.
        self.faults: list[Fault] = []
        #: Faults served, as ``(method, path, status or "reset")``.
        self.faults_served: list[tuple[str, str, int | str]] = []
        #: What the server itself made of an object (a pod's or Job's status) that the schema refuses: the fixture
        #: fails the test on any (the clients must only ever see objects a real API server could serve).
        self.invalid: list[str] = []
        self.cond = threading.Condition()
        self._rv = itertools.count(1000)
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> FakeKubernetes:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kube-api", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.podman is not None:
            self.podman.stop()
        for pod in list(self.pods.values()):
            for container in [*pod.init, *pod.containers]:
                _kill(container, signal.SIGKILL)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, namespace: str = "default") -> Path:
        path = self.root / "kubeconfig.json"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))
        return path

    def connection_env(self, namespace: str = "default") -> dict[str, str]:
        """``kubernetes_default`` pointing at this server (sync client and trigger alike)."""
        extra = {"kube_config_path": str(self.kubeconfig(namespace)), "namespace": namespace}
        return {"AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps({"conn_type": "kubernetes", "extra": extra})}

    # -- test set-up and inspection -----------------------------------------------------
    def add_secret(self, name: str, data: dict[str, str], namespace: str = "default") -> None:
        self.secrets[(namespace, name)] = dict(data)

    def add_claim(self, name: str, folder: Path, namespace: str = "default") -> None:
        self.claims[(namespace, name)] = folder

    def fail_next(self, path: str, count: int = 1, status: int | str = 503, *, method: str = "GET") -> Fault:
        """Make the next ``count`` ``method`` requests whose path matches the regex ``path`` fail.

        ``status`` is an HTTP status (500, 503, 429: a Kubernetes ``Status`` body) or ``"reset"``
        (the connection is dropped with a TCP reset before any answer), as a flaky API server,
        load balancer or network does. ``method="*"`` matches every method.
        """
        fault = Fault(method=method, path=re.compile(path), count=count, status=status)
        with self.cond:
            self.faults.append(fault)
        return fault

    def hold_next(self, path: str, count: int = 1, *, method: str = "GET") -> Fault:
        """Hold the next ``count`` ``method`` requests whose path matches ``path`` until ``fault.release`` is set.

        A slow API server at one chosen call: the client waits there (``fault.reached`` says one
        is waiting) while the test makes something else happen first; then the request is answered
        as usual. Held at most 60 s. Deterministic orderings of two clients without sleeps.
        """
        fault = Fault(method=method, path=re.compile(path), count=count, status="hold")
        with self.cond:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> int | str | None:
        held: Fault | None = None
        with self.cond:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.count -= 1
                    if fault.status != "hold":
                        self.faults_served.append((method, path, fault.status))
                        return fault.status
                    held = fault
                    break
        if held is not None:
            held.reached.set()
            if not held.release.wait(60):
                raise AssertionError(f"{method} {path} was held for 60 s: the test never released it")
        return None

    def disrupt(self, index: int | None = None, reason: str = "EvictionByEvictionAPI",
                message: str = "Eviction API: evicting", *, gone: bool = False) -> Pod:
        """Disrupt the running pod of Job completion ``index`` (None: the only pod) as an eviction (node pressure, drain) does.

        The pod gets the ``DisruptionTarget`` condition and ``status.reason: Evicted``, its containers
        are stopped like the kubelet does (SIGTERM, then SIGKILL after the grace period), and it
        stays listed, Failed, as node-pressure evictions leave it. With ``gone=True`` it is then
        removed, as a preemption or an eviction through the API deletes it: nobody can read it after.
        """
        with self.cond:
            [pod] = [p for p in self.pods.values() if index is None  # the only pod
                     or (p.obj["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-completion-index") == str(index)]
            pod.disruption = {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message,
                              "lastTransitionTime": rfc3339(now())}
            pod.obj["status"].update(reason="Evicted", message=message)
            self._event(pod, "Evicted", message, kind="Warning")
            self._update_status(pod)
            self.cond.notify_all()
        threading.Thread(target=self._terminate, args=(pod, 5.0), kwargs={"keep": not gone}, daemon=True).start()
        return pod

    def all_pods(self) -> list[Pod]:
        with self.cond:
            return [*self.deleted, *self.pods.values()]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self.cond.wait(min(left, 0.2))

    def everything_sent(self) -> str:
        """Every manifest and patch the clients sent, as text (for secret-leak assertions)."""
        return json.dumps(self.created)

    def _served(self, obj: dict[str, Any], kind: str) -> None:
        """Check an object as the server changed it (status, conditions) against the schema; keep what it refuses."""
        try:
            validate(obj, kind)
        except ApiError as exc:
            self.invalid.append(f"{obj.get('metadata', {}).get('name')}: {exc.message}")

    # -- API operations (called by the handler, under no lock) -----------------------------
    def create_pod(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(copy.deepcopy(body))
        validate(body, "Pod")
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "Pod is invalid: metadata.name: Required value")
        key = (meta["namespace"], meta["name"])
        with self.cond:
            if key in self.pods:
                raise ApiError(409, "AlreadyExists", f'pods "{meta["name"]}" already exists')
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=rfc3339(now()), resourceVersion=str(next(self._rv)))
            meta.setdefault("labels", {})
            spec = body["spec"]
            folder = self.root / "pods" / f"{meta['name']}-{meta['uid'][:8]}"
            folder.mkdir(parents=True)
            containers = [Container(name=c["name"], spec=c) for c in spec.get("containers", [])]
            init = [Container(name=c["name"], spec=c) for c in spec.get("initContainers", []) or []]
            body["status"] = {
                "phase": "Pending", "qosClass": "Burstable",
                "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": rfc3339(now())}],
            }
            pod = Pod(obj=body, folder=folder, containers=containers, init=init)
            self.pods[key] = pod
            if self.unschedulable is not None and self.unschedulable(body):
                message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
                body["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                 "message": message, "lastTransitionTime": rfc3339(now())}]
                self._event(pod, "FailedScheduling", message, kind="Warning")
                meta["resourceVersion"] = str(next(self._rv))
                self.cond.notify_all()
                return copy.deepcopy(body)
            self._event(pod, "Scheduled", f"Successfully assigned {key[0]}/{key[1]} to fake-node")
            body["spec"]["nodeName"] = "fake-node"
            self._update_status(pod)
            self.cond.notify_all()
        run, args = (self._run_pod, (pod,)) if self.podman is None else (self.podman.run, (self, pod))
        threading.Thread(target=run, args=args, name=f"pod-{meta['name']}", daemon=True).start()
        return copy.deepcopy(body)

    def get_pod(self, namespace: str, name: str) -> Pod:
        pod = self.pods.get((namespace, name))
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        return pod

    def delete_pod(self, namespace: str, name: str, grace: float | None) -> dict[str, Any]:
        with self.cond:
            pod = self.get_pod(namespace, name)
            if not pod.deleting:
                pod.deleting = True
                pod.obj["metadata"]["deletionTimestamp"] = rfc3339(now())
                pod.obj["metadata"]["resourceVersion"] = str(next(self._rv))
                period = grace if grace is not None else pod.obj["spec"].get("terminationGracePeriodSeconds", 30)
                grace = min(float(period), MAX_GRACE)
                stop, args = (self._terminate, (pod, grace)) if self.podman is None else (self.podman.terminate, (self, pod, grace))
                threading.Thread(target=stop, args=args, daemon=True).start()
            return copy.deepcopy(pod.obj)

    def patch_pod(self, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        with self.cond:
            pod = self.get_pod(namespace, name)
            if not isinstance(patch, dict):
                raise ApiError(415, "UnsupportedMediaType", "only merge patches are supported by the test server")
            self.created.append({"patch": copy.deepcopy(patch)})
            merge_patch(pod.obj, {k: v for k, v in patch.items() if k in ("metadata",)})
            pod.obj["metadata"]["resourceVersion"] = str(next(self._rv))
            self.cond.notify_all()
            return copy.deepcopy(pod.obj)

    # -- Jobs and Services (the Job controller runs here too) -------------------------------
    def create_service(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(copy.deepcopy(body))
        validate(body, "Service")
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        key = (meta["namespace"], meta["name"])
        with self.cond:
            if key in self.services:
                raise ApiError(409, "AlreadyExists", f'services "{meta["name"]}" already exists')
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=rfc3339(now()), resourceVersion=str(next(self._rv)))
            self.services[key] = body
        return copy.deepcopy(body)

    def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """A Secret (kept out of ``created``: its values are secret by design; ``secret_manifests`` has them)."""
        import base64

        validate(body, "Secret")
        meta = body.setdefault("metadata", {})
        key = (meta.setdefault("namespace", namespace), meta["name"])
        data = {k: base64.b64decode(v).decode() for k, v in (body.get("data") or {}).items()}
        data.update(body.get("stringData") or {})
        with self.cond:
            if key in self.secrets:
                raise ApiError(409, "AlreadyExists", f'secrets "{meta["name"]}" already exists')
            self.secrets[key] = data
            self.secret_manifests.append(copy.deepcopy(body))
        return {"apiVersion": "v1", "kind": "Secret", "metadata": meta}

    def delete_secret(self, namespace: str, name: str) -> dict[str, Any]:
        with self.cond:
            if self.secrets.pop((namespace, name), None) is None:
                raise ApiError(404, "NotFound", f'secrets "{name}" not found')
        return {"kind": "Status", "apiVersion": "v1", "status": "Success"}

    def get_service(self, namespace: str, name: str) -> dict[str, Any]:
        service = self.services.get((namespace, name))
        if service is None:
            raise ApiError(404, "NotFound", f'services "{name}" not found')
        return service

    def delete_service(self, namespace: str, name: str) -> dict[str, Any]:
        with self.cond:
            service = self.get_service(namespace, name)
            del self.services[(namespace, name)]
            return copy.deepcopy(service)

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(copy.deepcopy(body))
        validate(body, "Job")
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        spec = body["spec"]
        if spec.get("completionMode") != "Indexed":
            raise ApiError(422, "Invalid", "the test server runs Indexed Jobs only (spec.completionMode: Indexed)")
        key = (meta["namespace"], meta["name"])
        with self.cond:
            if key in self.jobs:
                raise ApiError(409, "AlreadyExists", f'jobs.batch "{meta["name"]}" already exists')
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=rfc3339(now()), resourceVersion=str(next(self._rv)))
            job = Job(obj=body, port=_free_port())
            self.jobs[key] = job
            if spec.get("suspend"):  # queued (Kueue): no pods until admitted, see admit_job
                body["status"] = {"active": 0, "conditions": [self._job_condition("Suspended", "True", "JobSuspended",
                                                                                  "Job suspended")]}
                self._served(body, "Job")
                self.cond.notify_all()
                return copy.deepcopy(body)
            body["status"] = {"active": 0, "startTime": rfc3339(now())}
        self._start_job(job)
        return copy.deepcopy(body)

    @staticmethod
    def _job_condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        moment = rfc3339(now())
        return {"type": kind, "status": status, "reason": reason, "message": message, "lastProbeTime": moment,
                "lastTransitionTime": moment}

    def admit_job(self, name: str | None = None, namespace: str = "default") -> None:
        """Unsuspend a queued Job and start its pods, as Kueue does when its quota is free (the only Job if no name)."""
        with self.cond:
            if name is None:
                [(namespace, name)] = list(self.jobs)
            job = self.get_job(namespace, name)
            if not job.obj["spec"].get("suspend"):
                raise AssertionError(f"Job {namespace}/{name} is not suspended")
            job.obj["spec"]["suspend"] = False
            job.obj["status"] = {"active": 0, "startTime": rfc3339(now()),
                                 "conditions": [self._job_condition("Suspended", "False", "JobResumed", "Job resumed")]}
            job.obj["metadata"]["resourceVersion"] = str(next(self._rv))
            self._served(job.obj, "Job")
        self._start_job(job)

    def _start_job(self, job: Job) -> None:
        """The Job controller's start: one pod per completion index, then the controller's loop."""
        body, meta, spec = job.obj, job.obj["metadata"], job.obj["spec"]
        template = spec["template"]
        subdomain = template["spec"].get("subdomain")
        for index in range(int(spec.get("completions", 1))):
            pod = copy.deepcopy(template)
            pod_meta = pod.setdefault("metadata", {})
            hostname = f"{meta['name']}-{index}"
            pod_meta["name"] = f"{hostname}-{uuid.uuid4().hex[:5]}"
            pod_meta["namespace"] = meta["namespace"]
            pod_meta["labels"] = {**(pod_meta.get("labels") or {}), "job-name": meta["name"],
                                  "batch.kubernetes.io/job-name": meta["name"],
                                  "batch.kubernetes.io/job-completion-index": str(index)}
            pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), "batch.kubernetes.io/job-completion-index": str(index)}
            pod_meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
                                            "controller": True, "blockOwnerDeletion": True}]
            pod.update(apiVersion="v1", kind="Pod")
            pod["spec"]["hostname"] = hostname
            for container in [*pod["spec"].get("initContainers", []), *pod["spec"].get("containers", [])]:
                container["env"] = [*(container.get("env") or []), {"name": "JOB_COMPLETION_INDEX", "value": str(index)}]
            if subdomain:
                self.dns[f"{hostname}.{subdomain}"] = "127.0.0.1"
            created = self.create_pod(meta["namespace"], pod)
            with self.cond:
                job.pods.append((created["metadata"]["namespace"], created["metadata"]["name"]))
                if job.deleting and job.pods[-1] in self.pods:  # deleted meanwhile: the garbage collector removes what
                    self.delete_pod(*job.pods[-1], None)  # it owned (the delete may have found this pod already)
        threading.Thread(target=self._control_job, args=(job,), name=f"job-{body['metadata']['name']}", daemon=True).start()

    def get_job(self, namespace: str, name: str) -> Job:
        job = self.jobs.get((namespace, name))
        if job is None:
            raise ApiError(404, "NotFound", f'jobs.batch "{name}" not found')
        return job

    def delete_job(self, namespace: str, name: str) -> dict[str, Any]:
        """Background propagation: the Job goes at once, its pods are stopped after."""
        with self.cond:
            job = self.get_job(namespace, name)
            job.deleting = True
            del self.jobs[(namespace, name)]
            uid = job.obj["metadata"]["uid"]
            owned = [p.key for p in self.pods.values()  # what it owns, as the garbage collector finds it
                     if any(ref.get("uid") == uid for ref in p.obj["metadata"].get("ownerReferences") or [])]
            for key in dict.fromkeys([*job.pods, *owned]):
                if key in self.pods:
                    self.delete_pod(*key, None)
            return copy.deepcopy(job.obj)

    def job_pods(self, job: Job) -> list[Pod]:
        return [p for p in self.all_pods() if p.key in job.pods]

    @staticmethod
    def _failure_policy_match(job: Job, pods: list[Pod]) -> tuple[str, str, str] | None:
        """The first pod whose ``DisruptionTarget`` matches a ``FailJob`` rule of ``spec.podFailurePolicy``, as the Job
        controller reports it (the only rule kind the test server applies)."""
        rules = ((job.obj["spec"].get("podFailurePolicy") or {}).get("rules")) or []
        for pod in pods:
            if pod.disruption is None:
                continue
            for number, rule in enumerate(rules):
                patterns = rule.get("onPodConditions") or []
                if rule.get("action") == "FailJob" and any(
                        p.get("type") == "DisruptionTarget" and p.get("status", "True") == "True" for p in patterns):
                    namespace, name = pod.key
                    return ("Failed", "PodFailurePolicy",
                            f"Pod {namespace}/{name} has condition DisruptionTarget matching FailJob rule at index {number}")
        return None

    def _control_job(self, job: Job) -> None:
        """Count pods; all succeeded -> Complete; one failed -> Failed and the others stopped (backoffLimit 0).

        A pod removed before it succeeded (deleted, preempted) counts as failed, as the Job controller counts it
        (pods are tracked with finalizers); a ``DisruptionTarget`` pod matching a ``FailJob`` rule of
        ``podFailurePolicy`` fails the Job with reason ``PodFailurePolicy``.
        """
        while True:
            with self.cond:
                if job.deleting:
                    return
                pods = self.job_pods(job)
                phases = ["Failed" if p.gone and p.obj["status"]["phase"] != "Succeeded" else p.obj["status"]["phase"]
                          for p in pods]
                status = job.obj["status"]
                status.update(active=sum(1 for ph in phases if ph in ("Pending", "Running")),
                              succeeded=phases.count("Succeeded"), failed=phases.count("Failed"))
                done = self._failure_policy_match(job, pods)
                if done is not None and not phases.count("Failed"):
                    done = None  # the rule applies once the disrupted pod has ended
                elif done is None and phases.count("Failed"):
                    done = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                elif phases and all(ph == "Succeeded" for ph in phases):
                    done = ("Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                    status["completedIndexes"] = f"0-{len(phases) - 1}" if len(phases) > 1 else "0"
                if done is not None:
                    moment = rfc3339(now())
                    status["conditions"] = [*(c for c in status.get("conditions", []) if c["type"] == "Suspended"),
                                            {"type": done[0], "status": "True", "reason": done[1], "message": done[2],
                                             "lastProbeTime": moment, "lastTransitionTime": moment}]
                    if done[0] == "Complete":
                        status["completionTime"] = moment
                    job.obj["metadata"]["resourceVersion"] = str(next(self._rv))
                    self._served(job.obj, "Job")
                    for pod in pods:
                        if not pod.terminal and not pod.deleting:
                            self.delete_pod(*pod.key, None)
                    self.cond.notify_all()
                    return
                self.cond.wait(0.2)

    # -- running a pod -----------------------------------------------------------------
    def _run_pod(self, pod: Pod) -> None:
        if self.start_delay:
            time.sleep(self.start_delay)
        try:
            for container in [*pod.init, *pod.containers]:
                self._prepare(pod, container)
        except ApiError as exc:  # a missing secret/claim or image: the pod stays Pending, like the kubelet
            with self.cond:
                for container in [*pod.init, *pod.containers]:
                    container.waiting = (exc.reason, exc.message)
                self._event(pod, exc.reason, exc.message, kind="Warning")
                self._update_status(pod)
            return
        for container in pod.init:  # one after the other; a failed one fails the pod (restartPolicy Never)
            with self.cond:
                if pod.deleting:
                    return
                self._start(pod, container)
                self._update_status(pod)
                self.cond.notify_all()
            self._wait(pod, container)
            if container.exit_code != 0:
                with self.cond:
                    for main in pod.containers:
                        main.waiting = ("PodInitializing", "")
                    pod.init_failed = True
                    self._update_status(pod)
                    self.cond.notify_all()
                return
        with self.cond:
            if pod.deleting:
                return
            for container in pod.containers:
                self._start(pod, container)
            self._update_status(pod)
            self.cond.notify_all()
        readers = [threading.Thread(target=self._read_output, args=(pod, c), daemon=True) for c in pod.containers if c.process]
        for reader in readers:
            reader.start()
        for container, reader in zip([c for c in pod.containers if c.process], readers, strict=True):
            assert container.process is not None
            code = container.process.wait()
            _end_container(container)
            reader.join()
            with self.cond:
                container.exit_code = 128 - code if code < 0 else code
                container.finished = now()
                self._update_status(pod)
                self.cond.notify_all()

    def _wait(self, pod: Pod, container: Container) -> None:
        """Run one (init) container to its end, its output into the pod's log."""
        assert container.process is not None
        reader = threading.Thread(target=self._read_output, args=(pod, container), daemon=True)
        reader.start()
        code = container.process.wait()
        _end_container(container)
        reader.join()
        with self.cond:
            container.exit_code = 128 - code if code < 0 else code
            container.finished = now()
            self._update_status(pod)
            self.cond.notify_all()

    def _prepare(self, pod: Pod, container: Container) -> None:
        namespace = pod.key[0]
        spec = container.spec
        image = spec.get("image", "")
        if image in self.unpullable:
            raise ApiError(0, "ErrImagePull", f'failed to pull and unpack image "{image}": not found')
        mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in pod.obj["spec"].get("volumes", []) or []}
        for mount in sorted(spec.get("volumeMounts", []) or [], key=lambda m: len(m["mountPath"])):
            volume = volumes.get(mount["name"])
            if volume is None:
                raise ApiError(0, "CreateContainerConfigError", f'volume "{mount["name"]}" not found')
            # A volume mounted inside another one's mount path (work/bin in work): processes here see
            # one file tree, so it is that folder of the outer volume, in every container alike.
            outer = next((p for p in sorted(mounts, key=len, reverse=True) if mount["mountPath"].startswith(f"{p}/")), None)
            if "emptyDir" in volume and outer is not None:
                host = mounts[outer] / mount["mountPath"][len(outer) + 1:]
            elif "emptyDir" in volume:
                host = pod.folder / "volumes" / mount["name"]
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if (namespace, claim) not in self.claims:
                    raise ApiError(0, "FailedMount", f'persistentvolumeclaim "{claim}" not found')
                host = self.claims[(namespace, claim)]
            elif "hostPath" in volume:  # this machine is the node: the path itself, shared by every pod
                host = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") != "DirectoryOrCreate" and not host.is_dir():
                    raise ApiError(0, "FailedMount", f'hostPath type check failed: {host} is not a directory')
            elif "secret" in volume:
                host = pod.folder / "volumes" / mount["name"]
                host.mkdir(parents=True, exist_ok=True)
                for key, value in self.secrets.get((namespace, volume["secret"]["secretName"]), {}).items():
                    (host / key).write_text(value)
            else:
                host = pod.folder / "volumes" / mount["name"]
            if mount.get("subPath"):
                host = host / mount["subPath"]
            host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = host

        def rewrite(value: str) -> str:
            for path in sorted(mounts, key=len, reverse=True):
                if path == "/tmp":
                    continue
                value = re.sub(rf"(?<![\w/.-]){re.escape(path)}(?=/|\"|$)", str(mounts[path]).replace("\\", "\\\\"), value)
            return value

        container.termination_file = pod.folder / f"termination-{container.name}"
        # ``python`` in a shell command is the image's interpreter: the runtime venv's, first on PATH.
        env = {"PATH": f"{Path(self.python).parent}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOSTNAME": pod.key[1],
               "HOME": str(pod.folder / "home"),
               # The kubelet mounts the file at terminationMessagePath; a process here cannot write
               # /dev/termination-log, so the runtime is told where the file is instead.
               "AICENTER_TERMINATION_LOG": str(container.termination_file)}
        if "/tmp" in mounts:
            env["TMPDIR"] = str(mounts["/tmp"])
        env.update(self.image_env)
        env.update(self.container_env(pod, spec, rewrite))
        argv = [*(spec.get("command") or []), *(spec.get("args") or [])]
        if not argv:
            raise ApiError(0, "CreateContainerError", f"image {image!r} has no entrypoint in the test server; set command")
        if argv[0] in ("python", "python3"):
            argv[0] = self.python
        container.argv = [rewrite(a) for a in argv]
        container.env = env
        (pod.folder / "home").mkdir(exist_ok=True)
        (pod.folder / "cwd").mkdir(exist_ok=True)

    def container_env(self, pod: Pod, spec: dict[str, Any], rewrite: Callable[[str], str] = str) -> dict[str, str]:
        """A container's env as the kubelet resolves it: ``envFrom`` first, then ``env`` in order.

        Secrets come from those the test registered (a missing one raises like the kubelet:
        the pod stays Pending); Job pods see the cluster DNS names of their Job as this host and
        their Job's own rendezvous port. Used by the process mode and the podman mode alike.
        """
        namespace = pod.key[0]
        env: dict[str, str] = {}
        for source in spec.get("envFrom", []) or []:
            if "secretRef" in source:
                ref = source["secretRef"]
                data = self.secrets.get((namespace, ref["name"]))
                if data is None and not ref.get("optional"):
                    raise ApiError(0, "CreateContainerConfigError", f'secret "{ref["name"]}" not found')
                env.update({f"{source.get('prefix', '')}{k}": v for k, v in (data or {}).items()})
        for var in spec.get("env", []) or []:
            if "valueFrom" not in var:
                env[var["name"]] = rewrite(var.get("value", ""))
                continue
            source = var["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self.secrets.get((namespace, ref["name"]))
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = f'secret "{ref["name"]}" not found' if data is None else f'couldn\'t find key {ref["key"]} in Secret {namespace}/{ref["name"]}'
                    raise ApiError(0, "CreateContainerConfigError", what)
                env[var["name"]] = data[ref["key"]]
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[var["name"]] = {"metadata.name": pod.key[1], "metadata.namespace": namespace,
                                    "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}.get(path, "")
            else:
                raise ApiError(0, "CreateContainerConfigError", f"unsupported env source for {var['name']}: {sorted(source)}")
        for name, value in list(env.items()):  # the cluster DNS of Job pods: all on this host
            for host, address in self.dns.items():
                value = value.replace(host, address)
            env[name] = value
        job_name = (pod.obj["metadata"].get("labels") or {}).get("job-name")
        if job_name and "AICENTER_MASTER_PORT" in env and (namespace, job_name) in self.jobs:
            env["AICENTER_MASTER_PORT"] = str(self.jobs[(namespace, job_name)].port)
        return env

    def _start(self, pod: Pod, container: Container) -> None:
        container.process = subprocess.Popen(
            container.argv, env=container.env, cwd=pod.folder / "cwd", stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        container.started, container.waiting = now(), None
        for reason, message in (("Pulled", f'Container image "{container.spec.get("image")}" already present on machine'),
                                ("Created", f"Created container {container.name}"),
                                ("Started", f"Started container {container.name}")):
            self._event(pod, reason, message, container=container.name)

    def _read_output(self, pod: Pod, container: Container) -> None:
        assert container.process is not None and container.process.stdout is not None
        for raw in container.process.stdout:
            with self.cond:
                pod.log.append((now(), container.name, raw.decode(errors="replace").rstrip("\n")))
                self.cond.notify_all()

    def _terminate(self, pod: Pod, grace: float, *, keep: bool = False) -> None:
        running = [c for c in [*pod.init, *pod.containers] if c.process is not None and c.exit_code is None]
        with self.cond:
            self._event(pod, "Killing", "Stopping container " + ", ".join(c.name for c in running))
        for container in running:
            _kill(container, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for container in running:
            assert container.process is not None
            try:
                container.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(container, signal.SIGKILL)
        with self.cond:
            self.wait_for(lambda: all(c.exit_code is not None for c in running), timeout=30, what="containers to stop")
            if keep:  # evicted: the pod object stays (Failed) until someone deletes it
                self._update_status(pod)
                self.cond.notify_all()
                return
            pod.gone = True
            self.pods.pop(pod.key, None)
            self.deleted.append(pod)
            self.cond.notify_all()

    # -- status ------------------------------------------------------------------------
    def _event(self, pod: Pod, reason: str, message: str, *, kind: str = "Normal", container: str | None = None) -> None:
        meta = pod.obj["metadata"]
        moment = rfc3339(now())
        pod.events.append({
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"],
                         "uid": str(uuid.uuid4()), "resourceVersion": str(next(self._rv)), "creationTimestamp": moment},
            "involvedObject": {"kind": "Pod", "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid"),
                               **({"fieldPath": f"spec.containers{{{container}}}"} if container else {})},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": moment, "lastTimestamp": moment, "source": {"component": "kubelet", "host": "fake-node"},
        })

    def _update_status(self, pod: Pod) -> None:
        statuses = self._statuses(pod, pod.containers)
        init_statuses = self._statuses(pod, pod.init)
        codes = [c.exit_code for c in pod.containers]
        if pod.init_failed or (pod.disruption is not None and codes and all(code is not None for code in codes)):
            phase = "Failed"
        elif codes and all(code is not None for code in codes):
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        elif any(c.process is not None for c in pod.containers):
            phase = "Running"
        else:
            phase = "Pending"
        status = pod.obj["status"]
        status.update(phase=phase, containerStatuses=statuses, hostIP="127.0.0.1", podIP="127.0.0.1")
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        if phase != "Pending" or any(c.process is not None for c in pod.init):
            status.setdefault("startTime", rfc3339(now()))
        if phase != "Pending":
            ready = "True" if phase == "Running" else "False"
            initialized = "False" if pod.init_failed else "True"
            status["conditions"] = [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": status["conditions"][0]["lastTransitionTime"]},
                {"type": "Initialized", "status": initialized, "lastTransitionTime": rfc3339(now())},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": rfc3339(now())},
                {"type": "Ready", "status": ready, "lastTransitionTime": rfc3339(now())},
                *([pod.disruption] if pod.disruption else []),
            ]
        pod.obj["metadata"]["resourceVersion"] = str(next(self._rv))
        self._served(pod.obj, "Pod")

    def _statuses(self, pod: Pod, containers: list[Container]) -> list[dict[str, Any]]:
        statuses = []
        for c in containers:
            if c.exit_code is not None:
                message = c.termination_file.read_text()[:4096] if c.termination_file and c.termination_file.exists() else ""
                if not message and c.exit_code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                    message = "\n".join(line for _, name, line in pod.log if name == c.name)[-2048:]
                state = {"terminated": {"exitCode": c.exit_code, "reason": "Completed" if c.exit_code == 0 else "Error",
                                        "message": message or None, "startedAt": rfc3339(c.started or now()),
                                        "finishedAt": rfc3339(c.finished or now()), "containerID": f"fake://{c.name}"}}
            elif c.process is not None:
                state = {"running": {"startedAt": rfc3339(c.started or now())}}
            else:
                reason, message = c.waiting or ("ContainerCreating", "")
                state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
            statuses.append({"name": c.name, "image": c.spec.get("image", ""), "imageID": f"fake://{c.spec.get('image', '')}",
                             "ready": "running" in state, "started": "running" in state, "restartCount": 0, "state": state})
        return statuses


def validate(body: dict[str, Any], kind: str) -> None:
    """What the API server would reject: the manifest against the Kubernetes schema (422 Invalid)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(body, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise ApiError(422, "Invalid", f"{kind} is invalid: {str(exc).splitlines()[0]}") from None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _flag(value: str | None) -> bool:
    """Query booleans: the sync client sends ``True``, the async one ``true``."""
    return (value or "").lower() in ("true", "1")


def _end_container(container: Container) -> None:
    """A container ends with its first process: the kernel kills what is left in its PID namespace.

    Here that is the process group the container was started in; without this, a child the first
    process left behind (the heartbeat's ``sleep``) holds the log pipe open for seconds after the end.
    """
    assert container.process is not None
    try:
        os.killpg(container.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(container: Container, sig: int) -> None:
    if container.process is not None and container.process.poll() is None:
        try:
            os.killpg(container.process.pid, sig)
        except ProcessLookupError:
            pass


# -- HTTP ---------------------------------------------------------------------------------
_POD = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)(/log|/status)?$")
_PODS = re.compile(r"^/api/v1/(?:namespaces/([^/]+)/)?pods$")
_EVENTS = re.compile(r"^/api/v1/(?:namespaces/([^/]+)/)?events$")
_JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs$")
_JOB = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)(/status)?$")
_SECRETS = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets$")
_SECRET = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/]+)$")
_SERVICES = re.compile(r"^/api/v1/namespaces/([^/]+)/services$")
_SERVICE = re.compile(r"^/api/v1/namespaces/([^/]+)/services/([^/]+)$")


def _handler(kube: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _query(self) -> dict[str, str]:
            return {k: v[-1] for k, v in parse_qs(urlparse(self.path).query).items()}

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else None

        def _send(self, code: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream_start(self, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

        def _reset(self) -> None:
            """Drop the connection with a TCP reset (SO_LINGER 0), no answer at all."""
            import socket
            import struct

            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass

        def _dispatch(self, method: str) -> None:
            kube.requests.append((method, self.path))
            path = urlparse(self.path).path
            fault = kube.take_fault(method, path)
            if fault is not None:
                if method in ("POST", "PATCH", "DELETE", "PUT"):
                    self._body()
                if fault == "reset":
                    return self._reset()
                code = int(fault)
                reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}.get(code, "InternalError")
                return self._send(code, ApiError(code, reason, f"injected fault: {method} {path} answered {code}").body())
            try:
                body = self._body() if method in ("POST", "PATCH", "DELETE", "PUT") else None
                if path == "/version":
                    return self._send(200, {"major": "1", "minor": KUBE_VERSION.split(".")[1], "gitVersion": f"v{KUBE_VERSION}.0-fake",
                                            "platform": "linux/amd64"})
                if m := _PODS.match(path):
                    if method == "POST" and m.group(1):
                        return self._send(201, kube.create_pod(m.group(1), body or {}))
                    if method == "GET":
                        return self._list_pods(m.group(1))
                if m := _POD.match(path):
                    namespace, name, sub = m.groups()
                    if sub == "/log" and method == "GET":
                        return self._log(namespace, name)
                    if method == "GET":
                        with kube.cond:
                            return self._send(200, copy.deepcopy(kube.get_pod(namespace, name).obj))
                    if method == "DELETE" and not sub:
                        grace = (body or {}).get("gracePeriodSeconds", self._query().get("gracePeriodSeconds"))
                        return self._send(200, kube.delete_pod(namespace, name, None if grace is None else float(grace)))
                    if method == "PATCH" and not sub:
                        return self._send(200, kube.patch_pod(namespace, name, body))
                if (m := _EVENTS.match(path)) and method == "GET":
                    return self._events(m.group(1))
                if (m := _JOBS.match(path)) and method == "POST":
                    return self._send(201, kube.create_job(m.group(1), body or {}))
                if m := _JOB.match(path):
                    if method == "GET":
                        with kube.cond:
                            return self._send(200, copy.deepcopy(kube.get_job(m.group(1), m.group(2)).obj))
                    if method == "DELETE":
                        return self._send(200, kube.delete_job(m.group(1), m.group(2)))
                if (m := _SECRETS.match(path)) and method == "POST":
                    return self._send(201, kube.create_secret(m.group(1), body or {}))
                if (m := _SECRET.match(path)) and method == "DELETE":
                    return self._send(200, kube.delete_secret(m.group(1), m.group(2)))
                if (m := _SERVICES.match(path)) and method == "POST":
                    return self._send(201, kube.create_service(m.group(1), body or {}))
                if m := _SERVICE.match(path):
                    if method == "GET":
                        with kube.cond:
                            return self._send(200, copy.deepcopy(kube.get_service(m.group(1), m.group(2))))
                    if method == "DELETE":
                        return self._send(200, kube.delete_service(m.group(1), m.group(2)))
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({method} {path})")
            except ApiError as exc:
                self._send(exc.code, exc.body())
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:
                self._send(500, ApiError(500, "InternalError", f"test server error: {exc!r}").body())

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PATCH(self) -> None:
            self._dispatch("PATCH")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def _list_pods(self, namespace: str | None) -> None:
            query = self._query()
            if kube.on_list_pods is not None:
                kube.on_list_pods(query.get("labelSelector"))
            with kube.cond:
                items = [copy.deepcopy(p.obj) for p in kube.pods.values()
                         if (namespace is None or p.key[0] == namespace)
                         and label_selector_matches(query.get("labelSelector"), p.obj["metadata"].get("labels") or {})
                         and field_selector_matches(query.get("fieldSelector"), p.obj)]
                rv = str(next(kube._rv))
            self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})

        def _matching_events(self, namespace: str | None, selector: str | None) -> list[dict[str, Any]]:
            return [e for p in [*kube.deleted, *kube.pods.values()] for e in p.events
                    if (namespace is None or p.key[0] == namespace) and field_selector_matches(selector, e)]

        def _events(self, namespace: str | None) -> None:
            query = self._query()
            selector = query.get("fieldSelector")
            if not _flag(query.get("watch")):
                with kube.cond:
                    items = copy.deepcopy(self._matching_events(namespace, selector))
                    rv = str(next(kube._rv))
                return self._send(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})
            self._stream_start("application/json")
            since = int(query.get("resourceVersion") or 0)
            hold = min(float(query.get("timeoutSeconds") or MAX_WATCH), MAX_WATCH)
            deadline = time.monotonic() + hold
            sent: set[str] = set()
            while True:
                with kube.cond:
                    fresh = [e for e in self._matching_events(namespace, selector)
                             if e["metadata"]["uid"] not in sent and int(e["metadata"]["resourceVersion"]) > since]
                    done = time.monotonic() >= deadline
                    if not fresh and not done:
                        kube.cond.wait(0.2)
                for event in fresh:
                    sent.add(event["metadata"]["uid"])
                    self.wfile.write(json.dumps({"type": "ADDED", "object": event}).encode() + b"\n")
                    self.wfile.flush()
                if done:
                    return None

        def _log(self, namespace: str, name: str) -> None:
            query = self._query()
            follow = _flag(query.get("follow"))
            stamps = _flag(query.get("timestamps"))
            since = query.get("sinceSeconds")
            tail = query.get("tailLines")
            with kube.cond:
                pod = kube.get_pod(namespace, name)
                container = query.get("container") or pod.containers[0].name
                target = next((c for c in [*pod.containers, *pod.init] if c.name == container), None)
                if target is None:
                    raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
                if follow:
                    kube.wait_for(lambda: target.process is not None or pod.gone or target.waiting != ("ContainerCreating", ""),
                                  timeout=60, what="container start")
            cutoff = now() - timedelta(seconds=int(since)) if since else None

            def lines(start: int) -> tuple[list[str], int]:
                picked = [(t, line) for t, c, line in pod.log[start:] if c == container and (cutoff is None or t >= cutoff)]
                return [f"{rfc3339(t, nano=True)} {line}" if stamps else line for t, line in picked], len(pod.log)

            with kube.cond:
                out, seen = lines(0)
            if tail:
                out = out[-int(tail):]
            if not follow:
                data = "".join(f"{line}\n" for line in out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self._stream_start("text/plain")
            while True:
                for line in out:
                    self.wfile.write(f"{line}\n".encode())
                self.wfile.flush()
                with kube.cond:
                    finished = target.exit_code is not None or pod.gone or (target.process is None and target.waiting is not None
                                                                            and target.waiting[0] != "ContainerCreating")
                    if len(pod.log) == seen and not finished:
                        kube.cond.wait(0.5)
                    out, seen = lines(seen)
                    if finished and not out:
                        return

    return Handler


# -- an Airflow-free interpreter like the runtime image -------------------------------------
def image_sources() -> list[str]:
    """The airflow_aicenter paths docker/Dockerfile copies into the image."""
    sources: list[str] = []
    for line in (REPO / "docker" / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and any(p.startswith("airflow_aicenter") for p in parts[1:-1]):
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    return sources


def build_runtime_python(dest: Path) -> Path:
    """A venv with only docker/requirements.txt (same versions as here) and the image's modules."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    python = dest / "bin" / "python"
    constraints = dest / "constraints.txt"
    constraints.write_text("".join(f"{name}=={dist_version(name)}\n" for name in ("obstore", "pydantic", "pydantic-core", "pip",
                                                                                     "uv", "zstandard")))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
         "-r", str(REPO / "docker" / "requirements.txt"), "pip", "-c", str(constraints)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"could not build the runtime venv: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    image_root = dest / "image"
    for source in image_sources():
        src = REPO / source
        target = image_root / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, target)
    site = next((dest / "lib").glob("python3*/site-packages"))
    (site / "aicenter-image.pth").write_text(f"{image_root}\n")  # like PYTHONPATH=/opt/aicenter in the image
    return python


# -- running the operator in-process (no scheduler, no task runner) ------------------------
@dataclass
class FakeTI:
    """What KubernetesPodOperator and BasePipelineOperator read from ``context["ti"]``."""

    dag_id: str
    run_id: str
    task_id: str
    try_number: int = 1
    map_index: int = -1
    start_date: datetime = field(default_factory=now)
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class _Events(dict):
    """``context["outlet_events"][alias].add(asset, extra=...)``, recorded."""

    def __missing__(self, key: Any) -> Any:
        added: list[tuple[Any, dict[str, Any]]] = []

        class Accessor:
            def add(self, asset: Any, extra: dict[str, Any] | None = None) -> None:
                added.append((asset, extra or {}))

        accessor = Accessor()
        accessor.added = added  # type: ignore[attr-defined]
        accessor.extra = {}  # type: ignore[attr-defined]
        self[key] = accessor
        return accessor


class StateStoreComms:
    """The supervisor's side of Airflow's task state store, for a task run without a supervisor.

    ``context["task_state_store"]`` is Airflow's own ``TaskStateStoreAccessor``; it sends
    ``GetTaskStateStore`` / ``SetTaskStateStore`` / ``DeleteTaskStateStore`` /
    ``ClearTaskStateStore`` to ``task_runner.SUPERVISOR_COMMS``, which the supervisor forwards
    to the execution API and the metadata database. This answers them from a JSON file
    instead: values are kept per task instance (dag, run, task, map index; every try shares
    them, as in the database) and the file outlives a worker process killed mid-run, so the
    next try's worker (another process) reads what the dead one wrote. Other messages
    (``MaskSecret``) are acknowledged; connections and variables are not found here (the
    environment variables backend, first in the chain, has them).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"tis": {}, "values": {}}
        return dict(json.loads(self.path.read_text()))

    def _save(self, data: dict[str, Any]) -> None:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(self.path)

    def register(self, ti_id: uuid.UUID, scope: Any) -> None:
        """A task try's id and the task instance it belongs to (the database's task_instance row)."""
        data = self._load()
        data["tis"][str(ti_id)] = f"{scope.dag_id}|{scope.run_id}|{scope.task_id}|{scope.map_index}"
        self._save(data)

    def values(self, ti_id: uuid.UUID | str) -> dict[str, Any]:
        """What the task instance of try ``ti_id`` has stored (for test assertions)."""
        data = self._load()
        return dict(data["values"].get(data["tis"][str(ti_id)], {}))

    def send(self, msg: Any) -> Any:
        from airflow.sdk.exceptions import ErrorType
        from airflow.sdk.execution_time import comms

        if isinstance(msg, comms.GetConnection):
            return comms.ErrorResponse(error=ErrorType.CONNECTION_NOT_FOUND)
        if isinstance(msg, comms.GetVariable):
            return comms.ErrorResponse(error=ErrorType.VARIABLE_NOT_FOUND)
        if not isinstance(msg, (comms.GetTaskStateStore, comms.SetTaskStateStore, comms.DeleteTaskStateStore,
                                comms.ClearTaskStateStore)):
            return comms.OKResponse(ok=True)
        data = self._load()
        instance = data["tis"][str(msg.ti_id)]
        stored = data["values"].setdefault(instance, {})
        if isinstance(msg, comms.GetTaskStateStore):
            if msg.key not in stored:
                return comms.ErrorResponse(error=ErrorType.TASK_STORE_NOT_FOUND)
            return comms.TaskStateStoreResult(value=stored[msg.key])
        if isinstance(msg, comms.SetTaskStateStore):
            stored[msg.key] = msg.value
        elif isinstance(msg, comms.DeleteTaskStateStore):
            stored.pop(msg.key, None)
        else:
            stored.clear()
        self._save(data)
        return comms.OKResponse(ok=True)


def use_state_store(path: Path) -> StateStoreComms:
    """Serve the task state store of this process from ``path`` (a worker process's set-up; tests use monkeypatch)."""
    from airflow.sdk.execution_time import task_runner

    comms = StateStoreComms(path)
    task_runner.SUPERVISOR_COMMS = comms  # type: ignore[assignment]
    return comms


#: A worker process running one try of a training task (``TrainPipelineOperator(task_id="train", **FAST, **op)``),
#: its task state store served from a file the next try shares.
_WORKER = """
import json, sys
from pathlib import Path
from airflow_aicenter.operators import TrainPipelineOperator
from tests.aicenter_helpers import FAST
from tests.operators.kube_api import make_context, use_state_store

args = json.loads(sys.argv[1])
use_state_store(Path(args["store"]))
op = TrainPipelineOperator(task_id="train", **FAST, **args["op"])
op.execute(make_context(try_number=args["try"], state_store=Path(args["store"])))
"""


def kill_worker_once_stored(store: Path, key: str, *, try_number: int = 1, timeout: float = 90, **op: Any) -> None:
    """Run a training try in a worker process, wait until it stored ``key`` in the task state store (what it
    created), then kill it with SIGKILL: nothing of it runs on (no ``finally``, no ``on_kill``), as when a worker
    machine dies. Its environment is this process's (the connections the test set)."""
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps({"store": str(store), "try": try_number, "op": op})],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while worker.poll() is None and time.monotonic() < deadline:
            if store.exists() and any(key in values for values in json.loads(store.read_text())["values"].values()):
                break
            time.sleep(0.1)
    finally:
        worker.kill()
        _, err = worker.communicate(timeout=30)
    if worker.returncode != -signal.SIGKILL:
        raise AssertionError(f"the worker ended by itself (exit code {worker.returncode}) before storing {key}: "
                             f"{err.decode(errors='replace')[-3000:]}")
    if not any(key in values for values in json.loads(store.read_text())["values"].values()):
        raise AssertionError(f"the worker stored no {key} within {timeout:.0f} s: {err.decode(errors='replace')[-3000:]}")


def rebuilt(trigger: Any) -> Any:
    """``trigger`` as the triggerer makes it: from what it serialized, through JSON."""
    import importlib

    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs, default=str)))


def run_in_thread(op: Any, context: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """``op.execute(context)`` in a thread; its result or error lands in the returned dict."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = op.execute(context)
        except BaseException as error:  # handed to the test, with where it came from for a failing assertion
            out["error"] = error
            out["traceback"] = traceback.format_exc()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def make_context(dag_id: str = "aicenter_k8s", task_id: str = "train", *, run_id: str = "manual__2026-03-01T00:00:00+00:00",
                 try_number: int = 1, state_store: Path | None = None) -> dict[str, Any]:
    """A task context; with ``state_store``, ``context["task_state_store"]`` is Airflow's accessor served from that file
    (:class:`StateStoreComms`: install it as ``task_runner.SUPERVISOR_COMMS`` in the process that runs the task)."""
    ti = FakeTI(dag_id=dag_id, run_id=run_id, task_id=task_id, try_number=try_number)

    class Dag:
        pass

    dag = Dag()
    dag.dag_id = dag_id  # type: ignore[attr-defined]
    context = {"ti": ti, "run_id": run_id, "dag": dag, "outlet_events": _Events(), "task_instance": ti}
    if state_store is not None:
        from airflow.sdk._shared.state import TaskScope
        from airflow.sdk.execution_time.context import TaskStateStoreAccessor

        ti_id = uuid.uuid4()
        scope = TaskScope(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=ti.map_index)
        StateStoreComms(state_store).register(ti_id, scope)
        context["task_state_store"] = TaskStateStoreAccessor(ti_id=ti_id, scope=scope)
    return context


def seed_pod(op: Any, registry: Any, context: dict[str, Any], *, command: list[str] | None = None,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest the operator would have created for ``context`` (an earlier attempt's pod)."""
    from kubernetes.client import ApiClient

    from airflow_aicenter.launchers.pod import PodRun

    run = op.run_ref(context)
    parent = registry.resolve(op.package, str(op.version))
    spec = op.build_spec(parent, run)
    spec.env.update(env or {})
    launcher = op.make_launcher("kubernetes")
    launcher.pod_run = PodRun(spec=spec, run=run)
    op.launcher_in_use = launcher
    if command:
        op.cmds = command
    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context))
