"""Airflow for real, shared by the tests under a real scheduler: PostgreSQL, api-server, dag-processor, scheduler.

A throw-away PostgreSQL cluster from the system packages, ``airflow db migrate``, then each
component as its own process group, LocalExecutor. The fixtures (``postgres``, ``stack``) are
in this folder's conftest.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.load.support import wait_for

BIN = Path(sys.executable).parent


def run_checked(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


# -- PostgreSQL ------------------------------------------------------------------------------
@dataclass
class Postgres:
    port: int
    database: str = "airflow"

    @property
    def sqlalchemy_url(self) -> str:
        # psycopg 3 serves both Airflow's engines: the sync one and the async one (create_async_engine)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=self.database) as db:
            rows: list[tuple[Any, ...]] = db.execute(sql, params).fetchall()
        return rows


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert found, "PostgreSQL is not installed: apt-get install -y postgresql (see .ci/run)"
    return found[-1].parent


# -- the Airflow processes -------------------------------------------------------------------
@dataclass
class Stack:
    """Airflow's components as separate processes, each leading its own process group."""

    home: Path
    env: dict[str, str]
    api_port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def airflow(self, *args: str, timeout: int = 240) -> str:
        return run_checked([str(BIN / "airflow"), *args], env=self.env, timeout=timeout)

    def up(self) -> None:
        """api-server, dag-processor, scheduler; the DAG files must be in place (they are listed once at start)."""
        started = time.monotonic()
        self.start("api-server", "api-server", "-H", "127.0.0.1", "-p", str(self.api_port), "-w", "1")
        self.start("dag-processor", "dag-processor")
        self.start("scheduler", "scheduler")
        wait_for("the api-server", lambda: self.check_alive() and api_ready(self.api_port), 180)
        print(f"[load] api-server up: {time.monotonic() - started:.1f} s")

    def start(self, name: str, *args: str) -> None:
        log = (self.home / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen([str(BIN / "airflow"), *args], env=self.env, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self, name: str) -> None:
        """SIGKILL the process group: the component and every worker it forked into it."""
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # what a component left in its group
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
        self.processes.clear()

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self) -> bool:
        """True, or the failure of a component that exited (with its log) instead of a timeout later."""
        for name, process in self.processes.items():
            assert process.poll() is None, f"airflow {name} exited ({process.returncode}):\n{self.log_tail(name)}"
        return True


def api_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def task_log_tails(home: Path, chars: int = 2500) -> str:
    logs = sorted((home / "logs").rglob("*.log"))
    return "\n".join(f"--- {p.relative_to(home)}\n{p.read_text(errors='replace')[-chars:]}" for p in logs[-6:])
