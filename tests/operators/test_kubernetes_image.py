"""The runtime image (docker/): what the pod's Python needs and must not have.

Docker cannot run here, so the image is checked through what it is made of: the runtime's
import closure (static), docker/requirements.txt against pyproject.toml, the Dockerfile's
user and entrypoint, and a venv built like the image (tests/operators/kube_api.py) that
trains the example package in test_kubernetes_dags.py and runs every test pod.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.operators.kube_api import image_sources

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "airflow_aicenter"
#: What runs in the pod: the runtime's entry point and the package contract.
ENTRY_POINTS = ("airflow_aicenter.runtime.__main__", "airflow_aicenter.package")
FORBIDDEN = {"airflow", "kubernetes", "kubernetes_asyncio"}


def module_file(name: str) -> Path:
    path = REPO / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(name: str) -> set[str]:
    """Absolute names of every module ``name`` imports, at any depth of its code (lazy imports too)."""
    path = module_file(name)
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}").exists())
    return found


def runtime_closure() -> tuple[set[str], set[str]]:
    """(our modules the runtime loads, the top-level third-party/stdlib names they import)."""
    ours: set[str] = set()
    others: set[str] = set()
    todo = list(ENTRY_POINTS)
    while todo:
        name = todo.pop()
        if name in ours:
            continue
        ours.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) not in ours]  # parent packages run too
        for imported in imports_of(name):
            if imported.split(".")[0] == "airflow_aicenter":
                if module_file(imported).exists():
                    todo.append(imported)
            else:
                others.add(imported.split(".")[0])
    return ours, others


def test_the_runtime_imports_neither_airflow_nor_kubernetes() -> None:
    ours, others = runtime_closure()
    assert "airflow_aicenter.runtime.agent" in ours and "airflow_aicenter.storage.store" in ours
    assert not others & FORBIDDEN, f"the pod's code imports {sorted(others & FORBIDDEN)}"
    third_party = {name for name in others if name not in sys.stdlib_module_names and name != "__future__"}
    image = {"obstore", "pydantic", "uv", "zstandard"}
    assert third_party <= image, f"docker/requirements.txt lacks {sorted(third_party - image)}"
    # and the image holds every module of that closure
    copied = [REPO / source for source in image_sources()]
    for name in ours:
        assert any(module_file(name).is_relative_to(path) or module_file(name) == path for path in copied), \
            f"docker/Dockerfile does not copy {name}"


def test_docker_requirements_follow_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {re.split(r"[<>=!~ ]", dep, maxsplit=1)[0]: dep.replace(" ", "") for dep in pyproject["project"]["dependencies"]}
    lines = [line.split("#")[0].strip() for line in (REPO / "docker" / "requirements.txt").read_text().splitlines()]
    pinned = {re.split(r"[<>=!~ ]", line, maxsplit=1)[0]: line.replace(" ", "") for line in lines if line}
    assert set(pinned) == {"obstore", "pydantic", "uv", "zstandard"}
    for name, requirement in pinned.items():
        assert requirement == wanted[name], f"docker/requirements.txt has {requirement}, pyproject.toml {wanted[name]}"


def test_dockerfile_runs_the_runtime_as_non_root() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile, re.M) and "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert "useradd --uid 10001" in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "airflow_aicenter.runtime"]' in dockerfile
    assert "AICENTER_WORKDIR=/aicenter/work" in dockerfile


def test_image_python_runs_the_runtime_without_airflow(runtime_python: Path) -> None:
    probe = "\n".join((
        "import importlib.util, airflow_aicenter.runtime, obstore, pydantic",
        "print([m for m in ('airflow', 'kubernetes', 'kubernetes_asyncio', 'boto3') if importlib.util.find_spec(m)])",
    ))
    done = subprocess.run([str(runtime_python), "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    usage = subprocess.run([str(runtime_python), "-m", "airflow_aicenter.runtime"], capture_output=True, text=True, check=False,
                           env={"PATH": "/usr/bin:/bin"})
    assert usage.returncode == 2 and "AICENTER_RUN_SPEC" in usage.stderr
