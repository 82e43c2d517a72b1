"""The test Kubernetes API server's podman mode: every pod it is sent runs in real containers.

``FakeKubernetes(..., podman=PodmanPods(...))`` (tests/operators/kube_api.py) hands each created
pod (a KubernetesPodOperator pod, or each pod of an Indexed Job) to :meth:`PodmanPods.run`, which
plays the manifest, as validated, with ``podman kube play --network=host`` in the runtime image
that scripts/images.sh builds, and reports the containers back through the API: pod phase, init
and main container states with exit codes and termination messages, and logs (``podman logs``).
The launchers therefore run unchanged against real containers.

Only what podman 4.3 cannot take from a manifest is translated (measured, see
../shared/REFERENCE.md "Real containers"):

- every image name -> the locally built tag, ``imagePullPolicy: Never`` (no registry here);
- ``secretKeyRef`` / ``envFrom.secretRef`` / ``fieldRef`` env -> plain values resolved from the
  Secrets this API server holds (podman knows no Kubernetes Secrets); Job pods' cluster DNS
  names and master port as the process mode rewrites them;
- each ``emptyDir`` -> the same, under a name unique to the pod (podman names the volume after
  the manifest's volume name, so two pods at once would otherwise share one "emptyDir");
- ``persistentVolumeClaim`` and ``secret`` volumes -> ``hostPath`` folders;
- container ``ports`` are left out (on the host network podman refuses them; every port is the host's);
- ``terminationMessagePath`` -> a host file mounted there (what the kubelet does too), read into
  ``state.terminated.message``; ``FallbackToLogsOnError`` uses the container's last log lines;
- the pod annotation ``io.podman.annotations.init.container.type: always``: podman removes a
  finished init container otherwise, and its exit code and logs with it; annotations with values
  over 63 characters are left out (podman 4.3 refuses them; no container reads them);
- the host folders in :attr:`PodmanPods.host_paths` (a file store, a file dataset) mounted at
  the same path into every container except the user's (``base``), owned by the pod's uid.

Pods are removed when they end (``podman pod rm -f``, volumes with them); deleting a pod through
the API stops it (``podman pod stop -t <grace>``: SIGTERM, then SIGKILL), like the kubelet.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.operators.kube_api import Container, FakeKubernetes, Pod

REPO = Path(__file__).resolve().parents[2]
PODMAN_HOME = Path(os.environ.get("AICENTER_PODMAN_HOME") or REPO / ".podman")
RUNTIME_IMAGE = os.environ.get("AICENTER_RUNTIME_IMAGE") or "localhost/aicenter-runtime:test"
INIT_TYPE_ANNOTATION = "io.podman.annotations.init.container.type"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
#: How often a running pod's containers are looked at (each look is one ``podman ps``).
POLL = 0.3
MESSAGE_LIMIT = 4096


def podman_env() -> dict[str, str]:
    """The environment every podman call runs with: scripts/images.sh's configuration."""
    return {**os.environ, "CONTAINERS_CONF": str(PODMAN_HOME / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(PODMAN_HOME / "storage.conf")}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def image_problem() -> str | None:
    """Why the runtime image cannot be used (missing, or older than the code), else None."""
    if shutil.which("podman") is None:
        return "podman is not installed: run bash scripts/images.sh (it installs podman and builds the images)"
    done = subprocess.run(["bash", str(REPO / "scripts" / "images.sh"), "--check"], capture_output=True, text=True,
                          timeout=120, check=False)
    return None if done.returncode == 0 else (done.stderr.strip() or done.stdout.strip() or "scripts/images.sh --check failed")


@dataclass
class _Played:
    """One pod's podman state: names, host files, and the threads that follow its logs."""

    name: str
    init: list[str]
    main: list[str]
    volumes: list[str] = field(default_factory=list)
    followers: dict[str, threading.Thread] = field(default_factory=dict)
    play: subprocess.Popen[str] | None = None
    play_error: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    removed: bool = False


class PodmanPods:
    """Runs the test API server's pods with ``podman kube play`` (see the module docstring).

    :param image: the local tag every container image maps to.
    :param host_paths: host folder -> writable, mounted at the same path into every container but ``base``.
    :param user_container: the container that runs package code (gets no host folder).
    """

    def __init__(self, image: str = RUNTIME_IMAGE, *, host_paths: dict[str, bool] | None = None,
                 user_container: str = "base") -> None:
        self.image = image
        self.host_paths: dict[str, bool] = dict(host_paths or {})
        self.user_container = user_container
        self.played: dict[tuple[str, str], _Played] = {}
        #: Every translated manifest, as played (for assertions about what podman was given).
        self.manifests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    # -- translation --------------------------------------------------------------------
    def translate(self, kube: FakeKubernetes, pod: Pod) -> dict[str, Any]:
        """The manifest podman is given (raises ApiError like the kubelet: missing secret, claim, image)."""
        from tests.operators.kube_api import ApiError

        namespace, name = pod.key
        manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": copy.deepcopy(pod.obj["metadata"]),
                    "spec": copy.deepcopy(pod.obj["spec"])}
        meta, spec = manifest["metadata"], manifest["spec"]
        for key in ("uid", "resourceVersion", "creationTimestamp", "ownerReferences", "deletionTimestamp", "namespace"):
            meta.pop(key, None)
        # podman 4.3 refuses annotation values over 63 characters (Kubernetes has no such limit; the
        # run annotation is longer): the containers never read annotations, so those stay with the API.
        annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if len(v) <= 63}
        meta["annotations"] = {**annotations, INIT_TYPE_ANNOTATION: "always"}
        short = pod.obj["metadata"]["uid"][:8]
        volumes: list[dict[str, Any]] = []
        renamed: dict[str, str] = {}
        claims: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            vname = volume["name"]
            if "emptyDir" in volume:
                renamed[vname] = f"{short}-{vname}"
                volumes.append({"name": renamed[vname], "emptyDir": {}})
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if (namespace, claim) not in kube.claims:
                    raise ApiError(0, "FailedMount", f'persistentvolumeclaim "{claim}" not found')
                claims[vname] = kube.claims[(namespace, claim)]
            elif "secret" in volume:
                folder = pod.folder / "volumes" / vname
                folder.mkdir(parents=True, exist_ok=True)
                for key, value in kube.secrets.get((namespace, volume["secret"]["secretName"]), {}).items():
                    (folder / key).write_text(value)
                volumes.append({"name": vname, "hostPath": {"path": str(folder), "type": "Directory"}})
            else:
                volumes.append(volume)
        extra_mounts: list[dict[str, Any]] = []
        for index, (path, writable) in enumerate(sorted(self.host_paths.items())):
            vname = f"aicenter-host-{index}"
            volumes.append({"name": vname, "hostPath": {"path": path, "type": "Directory"}})
            extra_mounts.append({"name": vname, "mountPath": path, "readOnly": not writable})
        groups = [("initContainers", spec.get("initContainers") or []), ("containers", spec.get("containers") or [])]
        for _, containers in groups:
            for container in containers:
                image = container.get("image", "")
                if image in kube.unpullable:
                    raise ApiError(0, "ErrImagePull", f'failed to pull and unpack image "{image}": not found')
                container["image"], container["imagePullPolicy"] = self.image, "Never"
                container["env"] = [{"name": k, "value": v} for k, v in kube.container_env(pod, container).items()]
                container.pop("envFrom", None)
                # On the host network every port is the host's; podman refuses port declarations there.
                container.pop("ports", None)
                mounts = []
                for mount in container.get("volumeMounts") or []:
                    mount = dict(mount)
                    if mount["name"] in renamed:
                        mount["name"] = renamed[mount["name"]]
                    elif mount["name"] in claims:
                        host = claims[mount["name"]] / (mount.pop("subPath", None) or "")
                        host.mkdir(parents=True, exist_ok=True)
                        vname = f"claim-{len(volumes)}"
                        volumes.append({"name": vname, "hostPath": {"path": str(host), "type": "Directory"}})
                        mount["name"] = vname
                    mounts.append(mount)
                log = self.termination_file(pod, container["name"])
                tname = f"termination-{container['name']}"
                volumes.append({"name": tname, "hostPath": {"path": str(log), "type": "File"}})
                mounts.append({"name": tname, "mountPath": container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH})
                if container["name"] != self.user_container:
                    mounts += copy.deepcopy(extra_mounts)
                container["volumeMounts"] = mounts
        spec["volumes"] = volumes
        spec["restartPolicy"] = "Never"
        return manifest

    @staticmethod
    def termination_file(pod: Pod, container: str) -> Path:
        path = pod.folder / f"termination-{container}"
        if not path.exists():
            path.touch()
            path.chmod(0o666)  # written by the container's uid, like the kubelet's file
        return path

    def _own_host_paths(self, pod: Pod) -> None:
        """Writable host folders belong to the pod's uid (no capabilities: root's folders are closed to it)."""
        security = pod.obj["spec"].get("securityContext") or {}
        uid, gid = security.get("runAsUser"), security.get("runAsGroup") or security.get("fsGroup")
        if uid is None:
            return
        for path, writable in self.host_paths.items():
            if writable:
                for root, dirs, files in os.walk(path):
                    for entry in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                        os.lchown(entry, uid, gid if gid is not None else uid)

    # -- running ------------------------------------------------------------------------
    def run(self, kube: FakeKubernetes, pod: Pod) -> None:
        """Play the pod, follow it until every container that will run has ended, then remove it."""
        from tests.operators.kube_api import ApiError

        if kube.start_delay:
            time.sleep(kube.start_delay)
        inits = pod.init
        with kube.cond:
            first = (inits or pod.containers)[0].name
            for container in [*inits, *pod.containers]:
                container.waiting = ("ContainerCreating", "") if container.name == first else ("PodInitializing", "")
        name = pod.key[1]
        played = _Played(name=name, init=[c.name for c in inits], main=[c.name for c in pod.containers])
        with self._lock:
            self.played[pod.key] = played
        try:
            try:
                manifest = self.translate(kube, pod)
            except ApiError as exc:  # like the kubelet: the pod stays Pending with the reason
                with kube.cond:
                    for container in [*inits, *pod.containers]:
                        container.waiting = (exc.reason, exc.message)
                    kube._event(pod, exc.reason, exc.message, kind="Warning")
                    self.update_status(kube, pod)
                    kube.cond.notify_all()
                return
            self.manifests.append(manifest)
            path = pod.folder / "podman-pod.json"  # JSON is YAML
            path.write_text(json.dumps(manifest, indent=1))
            path.chmod(0o600)
            played.volumes = [v["name"] for v in manifest["spec"]["volumes"] if "emptyDir" in v]
            self._own_host_paths(pod)
            with kube.cond:
                if pod.deleting:
                    return
            played.play = subprocess.Popen(["podman", "kube", "play", "--network=host", str(path)], env=podman_env(),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._follow(kube, pod, played)
        finally:
            self._remove(played)
            with kube.cond:
                played.done.set()
                kube.cond.notify_all()

    def _follow(self, kube: FakeKubernetes, pod: Pod, played: _Played) -> None:
        assert played.play is not None
        containers = {c.name: c for c in [*pod.init, *pod.containers]}
        while True:
            play_done = played.play.poll() is not None
            if play_done and not played.play_error and played.play.returncode != 0:
                played.play_error = (played.play.stderr.read() if played.play.stderr else "").strip()
            states = self._states(played)
            for cname, state in states.items():  # logs: followed from the start; complete before "terminated"
                if state["State"] in ("running", "exited", "stopped") and cname not in played.followers:
                    self._start_follower(kube, pod, played, cname)
                if state["State"] in ("exited", "stopped") and containers[cname].exit_code is None:
                    played.followers[cname].join(timeout=30)
            with kube.cond:
                for cname, state in states.items():
                    container = containers[cname]
                    if cname in played.followers and container.started is None:
                        container.started = _time(state.get("StartedAt")) or _now()
                        container.waiting = None
                        kube._event(pod, "Started", f"Started container {cname}", container=cname)
                    if state["State"] in ("exited", "stopped") and container.exit_code is None:
                        container.exit_code = int(state.get("ExitCode") or 0)
                        container.finished = _time(state.get("ExitedAt")) or _now()
                init_failed = any(c.exit_code not in (None, 0) for c in pod.init)
                if init_failed:
                    pod.init_failed = True
                    for container in pod.containers:
                        if container.started is None:
                            container.waiting = ("PodInitializing", "")
                stuck = play_done and played.play.returncode != 0 and not init_failed and not any(
                    st["State"] == "running" for st in states.values())
                if stuck:  # podman could not create or start the pod: say why, like the kubelet
                    for container in containers.values():
                        if container.exit_code is None:
                            container.waiting = ("CreateContainerError", played.play_error[-1000:] or "podman kube play failed")
                    kube._event(pod, "CreateContainerError", played.play_error[-1000:], kind="Warning")
                self.update_status(kube, pod)
                kube.cond.notify_all()
                if play_done and (all(c.exit_code is not None for c in pod.containers) or init_failed or stuck):
                    return
            time.sleep(POLL)

    def _states(self, played: _Played) -> dict[str, dict[str, Any]]:
        done = podman("ps", "-a", "--filter", f"pod={played.name}", "--format", "json", check=False)
        if done.returncode != 0:
            return {}
        wanted = {f"{played.name}-{c}": c for c in [*played.init, *played.main]}
        states: dict[str, dict[str, Any]] = {}
        for entry in json.loads(done.stdout or "[]"):
            for full in entry.get("Names") or []:
                if full in wanted:
                    states[wanted[full]] = entry
        return states

    def _start_follower(self, kube: FakeKubernetes, pod: Pod, played: _Played, container: str) -> None:
        def follow() -> None:
            proc = subprocess.Popen(["podman", "logs", "-f", f"{played.name}-{container}"], env=podman_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            for raw in proc.stdout:
                with kube.cond:
                    pod.log.append((_now(), container, raw.decode(errors="replace").rstrip("\n")))
                    kube.cond.notify_all()
            proc.wait()

        thread = threading.Thread(target=follow, name=f"podman-logs-{played.name}-{container}", daemon=True)
        played.followers[container] = thread
        thread.start()

    def _remove(self, played: _Played) -> None:
        if played.removed:
            return
        played.removed = True
        if played.play is not None:
            try:
                played.play.wait(timeout=60)
            except subprocess.TimeoutExpired:
                played.play.kill()
        for follower in played.followers.values():
            follower.join(timeout=30)
        podman("pod", "rm", "-f", "-t", "0", played.name, check=False)
        for volume in played.volumes:
            podman("volume", "rm", "-f", volume, check=False)

    def terminate(self, kube: FakeKubernetes, pod: Pod, grace: float) -> None:
        """Delete: SIGTERM to every container, SIGKILL after the grace period; then the pod is gone."""
        with self._lock:
            played = self.played.get(pod.key)
        with kube.cond:
            running = [c.name for c in [*pod.init, *pod.containers] if c.started is not None and c.exit_code is None]
            kube._event(pod, "Killing", "Stopping container " + ", ".join(running))
        if played is not None and not played.done.is_set():
            podman("pod", "stop", "-t", str(max(0, round(grace))), played.name, timeout=grace + 60, check=False)
            played.done.wait(timeout=grace + 60)
        with kube.cond:
            pod.gone = True
            kube.pods.pop(pod.key, None)
            kube.deleted.append(pod)
            kube.cond.notify_all()

    def stop(self) -> None:
        """Remove every pod still there (the test is over)."""
        with self._lock:
            remaining = list(self.played.values())
        for played in remaining:
            if not played.done.is_set():
                podman("pod", "rm", "-f", "-t", "0", played.name, check=False)
            played.done.wait(timeout=30)

    # -- status -------------------------------------------------------------------------
    def update_status(self, kube: FakeKubernetes, pod: Pod) -> None:
        """The pod's status as the kubelet reports it (called with kube.cond held)."""
        from tests.operators.kube_api import rfc3339

        def statuses(containers: list[Container]) -> list[dict[str, Any]]:
            out = []
            for c in containers:
                if c.exit_code is not None:
                    message = _capped(self.termination_file(pod, c.name).read_text(errors="replace"))
                    if not message and c.exit_code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                        message = "\n".join(line for _, name, line in pod.log if name == c.name)[-2048:]
                    reason = "Completed" if c.exit_code == 0 else "Error"
                    state: dict[str, Any] = {"terminated": {
                        "exitCode": c.exit_code, "reason": reason, "message": message or None,
                        "startedAt": rfc3339(c.started or _now()), "finishedAt": rfc3339(c.finished or _now()),
                        "containerID": f"podman://{pod.key[1]}-{c.name}"}}
                elif c.started is not None:
                    state = {"running": {"startedAt": rfc3339(c.started)}}
                else:
                    reason, message = c.waiting or ("ContainerCreating", "")
                    state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
                out.append({"name": c.name, "image": c.spec.get("image", ""), "imageID": f"podman://{self.image}",
                            "ready": "running" in state, "started": "running" in state, "restartCount": 0, "state": state})
            return out

        inits = pod.init
        init_failed = any(c.exit_code not in (None, 0) for c in inits)
        initialized = all(c.exit_code == 0 for c in inits)
        codes = [c.exit_code for c in pod.containers]
        if init_failed or (codes and all(code is not None for code in codes) and any(code != 0 for code in codes)):
            phase = "Failed"
        elif codes and all(code == 0 for code in codes):
            phase = "Succeeded"
        elif initialized and any(c.started is not None for c in pod.containers):
            phase = "Running"
        else:
            phase = "Pending"
        status = pod.obj["status"]
        status.update(phase=phase, containerStatuses=statuses(pod.containers), hostIP="127.0.0.1", podIP="127.0.0.1")
        if inits:
            status["initContainerStatuses"] = statuses(inits)
        if any(c.started is not None for c in [*inits, *pod.containers]):
            status.setdefault("startTime", rfc3339(_now()))
            ready = "True" if phase == "Running" else "False"
            status["conditions"] = [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": status["conditions"][0]["lastTransitionTime"]},
                {"type": "Initialized", "status": "True" if initialized else "False", "lastTransitionTime": rfc3339(_now())},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": rfc3339(_now())},
                {"type": "Ready", "status": ready, "lastTransitionTime": rfc3339(_now())},
            ]
        pod.obj["metadata"]["resourceVersion"] = str(next(kube._rv))


def _capped(text: str) -> str:
    return text[:MESSAGE_LIMIT]


def _now() -> Any:
    from tests.operators.kube_api import now

    return now()


def _time(seconds: Any) -> Any:
    from datetime import UTC, datetime

    if not seconds:
        return None
    return datetime.fromtimestamp(int(seconds), UTC)
