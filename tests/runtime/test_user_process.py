"""The agent and its user processes: what package code can see, how its failures and output come
back, and that no user process outlives its run. Real runtime child processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_aicenter.records import Outcome, read
from airflow_aicenter.storage import open_store
from tests.runtime.test_run import run_runtime, setup_run

DUMP_ENV = '''
import json, os, sys
class Main:
    def __init__(self):
        pass
    def train(self, d):
        with open(os.path.join(os.environ["artifacts_directory"], "env.json"), "w") as fh:
            json.dump({"env": dict(os.environ), "sys_path": sys.path, "cwd": os.getcwd()}, fh)
    def save(self):
        pass
'''


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state


def test_user_code_sees_only_its_variables(store, tmp_path, request):
    s3 = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    _, spec = setup_run(store, tmp_path, train_py=DUMP_ENV)
    worker = {
        **s3,
        "AWS_ACCESS_KEY_ID": "AKIAWORKERKEY", "AWS_SECRET_ACCESS_KEY": "worker-secret-access",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:pw@db/airflow", "AIRFLOW_CTX_DAG_ID": "d",
        "AICENTER_RUN_SPEC": spec.model_dump_json(), "UNRELATED_WORKER_VAR": "x",
        "API_TOKEN": "user-secret-token",  # named in spec.user_env_names: the user's own secret
        "OTHER_TOKEN": "not-the-users",  # a secret the launcher did not name
        "LANG": "C.UTF-8", "TZ": "UTC", "CUDA_VISIBLE_DEVICES": "",
    }
    done = run_runtime(spec, tmp_path, worker)
    assert done.returncode == 0, done.stderr
    seen = json.loads(store.get_bytes(f"{spec.run_prefix}/artifacts/env.json"))
    env = seen["env"]
    # AICENTER_METRICS_FILE alone: where aicenter.report appends (DESIGN "Progress, metrics and resources").
    assert not [k for k in env if k.startswith(("AWS_", "AIRFLOW", "AICENTER_")) and k != "AICENTER_METRICS_FILE"], sorted(env)
    assert "UNRELATED_WORKER_VAR" not in env and "OTHER_TOKEN" not in env
    assert env["API_TOKEN"] == "user-secret-token" and env["EPOCHS"] == "3"
    assert env["LANG"] == "C.UTF-8" and env["TZ"] == "UTC" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PATH"] and env["PYTHONUNBUFFERED"] == "1"
    for name in ("data_directory", "test_data_directory", "training_data_directory", "evaluation_data_directory",
                 "artifacts_directory", "checkpoint_directory"):
        assert os.path.isabs(env[name]), name
    assert env["save_training_data"] == "False" and env["save_test_data"] == "False"
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
    assert not any(value in ("AKIAWORKERKEY", "worker-secret-access", "testing-secret") for value in env.values())
    assert not any("postgresql://" in value for value in env.values())
    # imports resolve in the package, never in the runtime's own folder
    assert seen["sys_path"][0] == seen["cwd"] and not any(p.endswith("airflow_aicenter/runtime") for p in seen["sys_path"])


def test_an_import_error_in_train_py_is_reported_as_such(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    train_py = "import os\n\nimport no_such_module_xyz\n\nclass Main:\n    def __init__(self):\n        pass\n" \
               "    def train(self, d):\n        pass\n    def save(self):\n        pass\n"
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.error == "importing train.py raised ModuleNotFoundError: No module named 'no_such_module_xyz' (train.py:3)"
    assert "Traceback (most recent call last)" in done.stderr


def test_the_user_process_reports_type_message_location_and_traceback(tmp_path):
    """user.py run by path, as the agent runs it, with a stdlib-only interpreter view (-S: no site-packages)."""
    import sys

    from airflow_aicenter.runtime.agent import USER_SCRIPT
    from tests.conftest import write_files
    root = write_files(tmp_path / "pkg", {"train.py": "class Main:\n    def __init__(self):\n        pass\n"
                                                     "    def train(self, d):\n        raise ValueError('bad rows\\nmore')\n"})
    result = tmp_path / "result.json"
    (tmp_path / "plan.json").write_text(json.dumps({"root": str(root), "module": "train", "result": str(result),
                                                    "steps": [{"call": "train", "args": ["/data"]}]}))
    done = subprocess.run([sys.executable, "-S", str(USER_SCRIPT), str(tmp_path / "plan.json")], cwd=root,
                          env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    failure = json.loads(result.read_text())["failure"]
    assert failure["cause"] == "Main.train() raised ValueError: bad rows (train.py:5)"
    assert (failure["type"], failure["message"], failure["location"]) == ("ValueError", "bad rows", "train.py:5")
    assert failure["traceback"].startswith("Traceback (most recent call last)") and "more" in failure["traceback"]


def test_an_error_in_a_package_module_names_that_file(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    train_py = "from helpers import boom\nclass Main:\n    def __init__(self):\n        pass\n" \
               "    def train(self, d):\n        boom()\n    def save(self):\n        pass\n"
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    from airflow_aicenter.registry import Registry
    from tests.conftest import write_files
    from tests.runtime.test_run import MAIN
    pkg = write_files(tmp_path / "pkg2", {"main.py": MAIN, "train.py": train_py, "requirements.txt": "",
                                          "helpers.py": "def boom():\n    raise KeyError('missing column')\n"})
    base = Registry(store).upload(pkg, "helped")
    spec = spec.model_copy(update={"package": "helped", "version": base.version, "blob": base.blob})
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1, done.stderr
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.error == "Main.train() raised KeyError: 'missing column' (helpers.py:2)"


def test_a_huge_output_line_is_cut_and_the_run_goes_on(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    train_py = ("import sys\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n"
                "        sys.stdout.write('x' * 20_000_000)\n        sys.stdout.write('\\n')\n"
                "        print('after the long line')\n"
                "    def save(self):\n        pass\n")
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    long_lines = [line for line in done.stdout.splitlines() if line.startswith("xxx")]
    assert len(long_lines) == 1 and len(long_lines[0]) < 65 * 1024
    assert long_lines[0].endswith("[... line cut at 64 KiB]")
    assert "after the long line" in done.stdout
    assert len(done.stdout) < 200_000


def test_a_broken_output_pipe_still_records_the_ending(tmp_path):
    """``python -m airflow_aicenter.runtime spec.json 2>&1 | head -n 8``: the run ends and says so."""
    store = open_store((tmp_path / "s").as_uri())
    train_py = ("import time\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n"
                "        for i in range(300):\n            print('epoch', i, flush=True)\n            time.sleep(0.002)\n"
                "    def save(self):\n        open('model.txt', 'w').write('ok')\n")
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    done = subprocess.run(["bash", "-c", f"'{sys.executable}' -m airflow_aicenter.runtime '{spec_file}' 2>&1 | head -n 8"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert len(done.stdout.splitlines()) == 8
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.blob is not None and store.exists(f"blobs/sha256/{outcome.blob.sha256}")


SLEEPER = '''
import os, time
class Main:
    def __init__(self):
        pass
    def train(self, d):
        with open(os.environ["MARKER"] + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.rename(os.environ["MARKER"] + ".tmp", os.environ["MARKER"])
        time.sleep(120)
    def save(self):
        pass
'''


def test_the_run_stops_and_says_killed_when_its_launcher_dies(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    marker, workdir = tmp_path / "user.pid", tmp_path / "work"
    _, spec = setup_run(store, tmp_path, train_py=SLEEPER)
    spec.env["MARKER"] = str(marker)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    # A stand-in for the worker: starts the runtime in its own session (as the local launcher does), then dies.
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'airflow_aicenter.runtime', {str(spec_file)!r}], start_new_session=True,"
        " stdout=subprocess.PIPE, stderr=subprocess.STDOUT)\n"
        "print(p.pid, flush=True)\ntime.sleep(600)\n")],
        env={**os.environ, "AICENTER_WORKDIR": str(workdir)}, stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    agent = int(launcher.stdout.readline())
    user = int(wait_for(marker))
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 30
    while time.time() < deadline and not (gone(agent) and gone(user)):
        time.sleep(0.1)
    assert gone(user), "the user process outlived its run"
    assert gone(agent), "the agent outlived its launcher"
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "killed" and outcome.error == "killed during user_code"
    assert not workdir.exists(), "the run's work folder was left behind"


def test_a_user_process_dies_with_its_agent(tmp_path, spawn_runtime):
    store = open_store((tmp_path / "s").as_uri())
    marker = tmp_path / "user.pid"
    _, spec = setup_run(store, tmp_path, train_py=SLEEPER)
    spec.env["MARKER"] = str(marker)
    agent = spawn_runtime.start(spec, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    user = int(wait_for(marker))
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and not gone(user):
        time.sleep(0.05)
    assert gone(user), "the user process outlived its agent"


def test_what_user_code_leaves_running_ends_with_the_run(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    marker = tmp_path / "child.pid"
    train_py = ("import os, subprocess, sys\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n"
                "        child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                "        open(os.environ['MARKER'], 'w').write(str(child.pid))\n"
                "    def save(self):\n        pass\n")
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    spec.env["MARKER"] = str(marker)
    began = time.time()
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 0, done.stderr
    assert time.time() - began < 60
    child = int(marker.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and not gone(child):
        time.sleep(0.05)
    assert gone(child), "a process started by user code outlived the run"


def test_a_400_mb_line_costs_the_agent_no_memory(tmp_path):
    """Issue 13 finding 14: one output line of 400 MB without a newline; the agent's peak memory stays flat."""
    store = open_store((tmp_path / "s").as_uri())
    train_py = ("import sys\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n"
                "        chunk = 'y' * (1 << 20)\n        for _ in range(400):\n            sys.stdout.write(chunk)\n"
                "        sys.stdout.write('\\n')\n    def save(self):\n        pass\n")
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    agent = ("import resource, sys\nfrom airflow_aicenter.runtime.agent import main\ncode = main([sys.argv[1]])\n"
             "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", agent, str(spec_file)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = int(done.stderr.split("MAXRSS_KB ")[1].split()[0]) / 1024
    # Unbounded, the agent held the whole line (peak over 2 GB); bounded it stays near 120 MB. Once, in a
    # full suite run on a loaded 2-core machine, it read 633 MB (not reproduced since): the bound
    # leaves room for that and still fails the unbounded case.
    assert peak_mb < 1024, f"the agent peaked at {peak_mb:.0f} MB passing on one long line"
    assert len(done.stdout) < 100_000 and "[... line cut at 64 KiB]" in done.stdout


def test_a_secret_at_the_cut_of_a_long_line_does_not_leak_in_part(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    secret = "sk-live-0123456789abcdef"
    train_py = ("import os, sys\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n"
                "        for shift in range(len(os.environ['API_TOKEN'])):\n"
                "            print('z' * (65536 - shift - 4) + os.environ['API_TOKEN'] + 'z' * 100)\n"
                "    def save(self):\n        pass\n")
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    done = run_runtime(spec, tmp_path, {"API_TOKEN": secret})
    assert done.returncode == 0, done.stderr[-2000:]
    cut = [line for line in done.stdout.splitlines() if line.startswith("zzz")]
    assert len(cut) == len(secret) and all(line.endswith("[... line cut at 64 KiB]") for line in cut)
    for line in cut:  # no line ends with the first characters of the secret
        head = line.removesuffix(" [... line cut at 64 KiB]")
        assert not any(head.endswith(secret[:k]) for k in range(2, len(secret) + 1)), head[-40:]


# -- the user supervisor run by path, as a pod's user container runs it ---------------------------
FAKE_USER = r'''
import json, os, subprocess, sys, time
instructions = json.load(open(sys.argv[1]))
print("token is", os.environ["API_TOKEN"], flush=True)
sys.stdout.write("q" * 200_000 + "\n")
if instructions.get("daemon"):  # a setsid daemon that would outlive everything
    subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"], start_new_session=True)
    child = subprocess.Popen([sys.executable, "-c",
        "import os, sys, time\nos.setsid()\nif os.fork(): os._exit(0)\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(300)",
        instructions["daemon"]])
    child.wait()
    while not os.path.exists(instructions["daemon"]):
        time.sleep(0.02)
if instructions.get("fail"):
    result = {"ok": False, "failure": {"cause": "Main.train() raised ValueError: " + os.environ["API_TOKEN"], "traceback": "", "at": time.time()}}
    json.dump(result, open(instructions["result"], "w"))
    sys.exit(1)
if instructions.get("sleep"):
    time.sleep(instructions["sleep"])
json.dump({"ok": True, "score": 0.5}, open(instructions["result"], "w"))
'''


def _plan(tmp_path: Path, procs: list[dict], secret: str, before: list[dict] | None = None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    from airflow_aicenter.runtime.supervisor import BUNDLE

    for name, source in BUNDLE.items():  # what a pod's stage container copies into bin/
        (bin_dir / name).write_bytes(source.read_bytes())
    user = tmp_path / "fake_user.py"
    user.write_text(FAKE_USER)

    def processes(group: str, specs: list[dict]) -> list[dict]:
        out = []
        for i, extra in enumerate(specs):
            result = tmp_path / f"{group}-{i}.result.json"
            instructions = tmp_path / f"{group}-{i}.json"
            instructions.write_text(json.dumps({"result": str(result), **extra}))
            out.append({"label": f"{group} {i}", "argv": [sys.executable, "-I", "-S", str(user), str(instructions)],
                        "cwd": str(tmp_path), "env": {"API_TOKEN": secret, "PATH": os.environ["PATH"]},
                        "result": str(result)})
        return out

    plan = tmp_path / "supervisor.json"
    plan.write_text(json.dumps({"processes": processes("rank", procs), "secret_env": ["API_TOKEN"], "prefix_output": True,
                                "line_limit": 65536, "grace": 2.0, "run_as": None,
                                "exit_file": str(tmp_path / "exit.json"),
                                **({"before": [{"processes": processes("prep", before)}]} if before else {})}))
    return plan


def test_the_supervisor_runs_by_path_with_the_standard_library_alone(tmp_path):
    """``python -I -S bin/supervisor.py PLAN``: no site-packages, so nothing of airflow_aicenter nor its dependencies."""
    secret = "sk-supervised-0123456789"
    daemon = tmp_path / "daemon.pid"
    plan = _plan(tmp_path, [{"daemon": str(daemon)}, {}], secret)
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "bin" / "supervisor.py"), str(plan)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    # what rank 0 left running holds its output pipes: it is killed when the ranks end, not waited for
    # (waiting for the end of their output first cost every such run 5 s a pipe)
    assert time.monotonic() - began < 8, f"the supervisor took {time.monotonic() - began:.1f} s"
    ended = json.loads((tmp_path / "exit.json").read_text())
    used = ended.pop("resources")  # what the user processes used (supervisor.Usage), measured with the standard library
    assert used["wall_seconds"] > 0 and used["cpu_seconds"] >= 0 and used["gpu_utilization"] is None
    assert ended == {"status": "succeeded", "results": [{"ok": True, "score": 0.5}] * 2, "failed": None, "cause": None}
    assert "[rank 0] token is ***" in done.stdout and "[rank 1] token is ***" in done.stdout and secret not in done.stdout
    cut = [line for line in done.stdout.splitlines() if "qqq" in line]
    assert len(cut) == 2 and all(line.endswith("[... line cut at 64 KiB]") and len(line) < 66_000 for line in cut)
    assert gone(int(daemon.read_text())), "a setsid daemon outlived the supervisor"
    assert not list(tmp_path.glob("exit.json.*")), "a temporary exit file was left"


def test_the_supervisor_stops_the_others_when_one_fails_and_masks_the_cause(tmp_path):
    secret = "sk-supervised-0123456789"
    plan = _plan(tmp_path, [{"sleep": 60}, {"fail": True}], secret)
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "bin" / "supervisor.py"), str(plan)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and time.monotonic() - began < 30
    ended = json.loads((tmp_path / "exit.json").read_text())
    assert ended["status"] == "failed" and ended["failed"] == "rank 1"
    assert ended["cause"] == "rank 1: Main.train() raised ValueError: ***"
    assert ended["results"][0] is None and ended["results"][1]["ok"] is False
    assert secret not in done.stdout + done.stderr + (tmp_path / "exit.json").read_text()


@pytest.mark.parametrize("during", ["the last group", "an earlier group"])
def test_the_supervisor_records_killed_on_sigterm(tmp_path, during):
    before = [{"sleep": 60}] if during == "an earlier group" else None
    plan = _plan(tmp_path, [{"sleep": 60}], "sk-supervised-0123456789", before=before)
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(tmp_path / "bin" / "supervisor.py"), str(plan)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "token is" not in (proc.stdout.readline() if proc.stdout else ""):
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    ended = json.loads((tmp_path / "exit.json").read_text())
    assert ended["status"] == "killed" and ended["results"] == [None]


def test_the_supervisor_s_own_failure_is_recorded_failed_not_killed(tmp_path):
    """"killed" in the exit record means the run was stopped (SIGTERM): sync then records the run killed. A fault of the
    supervisor itself (here a plan entry it cannot read) is recorded as a failure that names it."""
    from airflow_aicenter.runtime.supervisor import supervise

    plan = json.loads(_plan(tmp_path, [{}], "sk-supervised-0123456789").read_text())
    del plan["processes"][0]["argv"]
    with pytest.raises(KeyError):
        supervise(plan)
    ended = json.loads((tmp_path / "exit.json").read_text())
    assert ended["status"] == "failed" and ended["cause"] == "the user supervisor failed: KeyError: 'argv'", ended
