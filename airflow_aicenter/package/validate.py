"""Static validation of the ML package contract.

Package code is parsed with ``ast`` and never imported or executed: validation runs in the
Airflow worker (before any compute starts), where user code must not run.

What is checked statically and where it is lenient:

- ``class Main`` must be bound at the top level of ``main.py`` / ``train.py``. The last
  top-level binding of ``Main`` wins, as at import time. ``Main = Other`` follows ``Other``
  when it is a class of the same file. ``Main`` imported from elsewhere cannot be inspected,
  so its methods are not checked.
- Methods are the plain ``def`` statements in the class body and in its base classes defined
  in the same file (depth-first, left to right). When some base cannot be resolved in the
  file (imported, ``module.Base``, ``Generic[T]``), missing methods are *not* reported: they
  may come from that base. Methods defined by assignment in the class body are ignored.
- Every method of the contract that is present must accept AI Center's call (``*args`` and
  defaults count); a method with other decorators than ``staticmethod``/``classmethod`` is
  not arity-checked, as the decorator may change its signature.

Validation runs in the worker, so its cost is bounded before any parsing: a contract file over
``MAX_CONTRACT_FILE_BYTES`` is refused from its size alone (parsing a 5 MB source took 17 s and
2.4 GB), source that nests beyond the parser's limits is a ``PackageError``, and only the
module's top-level statements and the bodies of the classes ``Main`` derives from are walked,
without recursion, at most ``MAX_BASE_DEPTH`` base classes deep.
"""

from __future__ import annotations

import ast
import io
import json
import os
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from airflow_aicenter.errors import PackageError
from airflow_aicenter.package.requirements import check_requirements_file
from airflow_aicenter.plans import CONTRACTS, PLANS

PIPELINES = tuple(sorted(CONTRACTS, key=lambda name: name != "serve"))
"""What a package can be checked for (``PipelinePlan.contract``): serving, which every package must meet, first."""

REQUIRED_METHODS: dict[str, tuple[str, ...]] = {
    plan.contract: plan.calls if plan.source == "train.py" else () for plan in PLANS.values()
}
"""Methods ``train.py``'s ``Main`` needs per pipeline (the plan's calls), besides ``__init__`` (always needed)."""

MAIN_METHODS = ("__init__", "predict")
"""Methods ``main.py``'s ``Main`` always needs: serving is what every package is for."""

EXPECTED_PARAMS: dict[str, tuple[str, ...]] = {
    "__init__": (),
    "predict": ("input",),
    "train": ("training_directory",),
    "evaluate": ("evaluation_directory",),
    "save": (),
    "process_data": ("input_directory",),
}
"""The positional arguments AI Center passes to each method (after ``self``)."""

_PURPOSE = {
    "__init__": "it sets up the object (and loads the model); AI Center calls Main() with no arguments",
    "predict": "it returns the prediction for one input",
    "train": "it trains on the files in training_directory",
    "evaluate": "it returns one number, the score",
    "save": "it persists the model into the package folder (e.g. ./model.pkl) so main.py can load it",
    "process_data": "it splits input_directory into the training_data_directory and evaluation_data_directory folders",
}

MAX_CONTRACT_FILE_BYTES = 1 << 20
"""Largest contract file (``main.py``, ``train.py``, ``aicenter.json``) validation reads: real ones
are a few KB; tables or weights pasted into source belong in a data file the code loads."""

MAX_BASE_DEPTH = 100
"""How many same-file base classes deep validation follows ``Main``: real hierarchies are a few
levels; a generated chain of thousands would only make the worker do the work."""

TRAINING_PIPELINES = tuple(plan.contract for plan in PLANS.values() if plan.makes_version)
"""Pipelines that make a new version; ``aicenter.json`` ``retrainable: false`` forbids them."""

CONTRACT_FILES = frozenset({"main.py", "train.py", "requirements.txt", "train_requirements.txt", "aicenter.json"})
_IGNORED_DIRS = ("__MACOSX",)


def is_contract_file(name: str) -> bool:
    """Whether a zip entry is one of the files validation reads (at the top or under one root folder).

    Lets a caller extract only these from a multi-GB package zip to validate it.
    """
    parts = name.strip("/").split("/")
    return len(parts) <= 2 and parts[-1] in CONTRACT_FILES


class PackageMetadata(BaseModel):
    """Optional ``aicenter.json``: what AI Center's upload form asks for. Unknown keys are kept."""

    model_config = ConfigDict(extra="allow", strict=True)

    description: StrictStr = ""
    gpu: StrictBool | Annotated[StrictInt, Field(ge=0)] = False
    retrainable: StrictBool = True
    input_type: Literal["json", "file", "files"] = "json"


@dataclass
class PackageInfo:
    """What validation learned about a package, for the registry and the runtime."""

    root: Path
    has_train: bool
    main_methods: frozenset[str]
    train_methods: frozenset[str]
    metadata: PackageMetadata
    requirements: list[str]


def iter_package_files(root: Path) -> Iterator[Path]:
    """Relative paths of the package's files (and links, so callers can refuse them), sorted by POSIX path.

    ``__pycache__`` and ``*.pyc`` are left out: they are byproducts of running the code, not
    part of a version. Directory links are listed, never followed.
    """
    root = Path(root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root)
        keep = []
        for d in dirnames:
            if d == "__pycache__":
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                found.append((rel / d).as_posix())
            else:
                keep.append(d)
        dirnames[:] = keep
        found.extend((rel / f).as_posix() for f in filenames if not f.endswith(".pyc"))
    for name in sorted(found):
        yield Path(name)


def _visible_subdirs(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in _IGNORED_DIRS)


def find_package_root(path: Path) -> Path:
    """The folder holding ``main.py``: ``path`` itself, or its single subfolder with ``main.py``.

    AI Center zips have one root folder, so an extracted zip has the package one level down.
    """
    path = Path(path)
    if (path / "main.py").is_file() or not path.is_dir():
        return path
    candidates = [d for d in _visible_subdirs(path) if (d / "main.py").is_file()]
    return candidates[0] if len(candidates) == 1 else path


def _check_size(path: Path, name: str) -> None:
    """Refuse a contract file over ``MAX_CONTRACT_FILE_BYTES`` from its size alone, before a byte is read."""
    size = path.stat().st_size
    if size <= MAX_CONTRACT_FILE_BYTES:
        return
    if name.endswith(".py"):
        fix = (f"move large data such as tables or weights into a data file of the package that the code loads at "
               f"run time, or split the code into modules that {name} imports")
    else:
        fix = f"{name} holds only {'requirements' if name.endswith('.txt') else 'package metadata'}: keep data in other files"
    raise PackageError(
        f"{name} is {size} bytes, over the limit of {MAX_CONTRACT_FILE_BYTES} bytes for a contract file "
        f"(it is parsed in the Airflow worker before the run): {fix}"
    )


def _read_text(path: Path, name: str) -> str:
    _check_size(path, name)
    data = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline) if name.endswith(".py") else ("utf-8-sig", [])
        return data.decode(encoding)
    except (UnicodeDecodeError, SyntaxError, LookupError) as e:
        raise PackageError(f"{name} is not valid UTF-8 text ({e}): save it with UTF-8 encoding") from e


def _parse(path: Path, name: str) -> ast.Module:
    source = _read_text(path, name)
    try:
        return ast.parse(source, filename=name)
    except SyntaxError as e:
        raise PackageError(f"{name}:{e.lineno or 1}: {e.msg}") from e
    except ValueError as e:  # e.g. null bytes on Python 3.11
        raise PackageError(f"{name}: {e}: save it as a plain UTF-8 Python source file") from e
    except (RecursionError, MemoryError) as e:  # the parser's stack, e.g. thousands of nested operators
        raise PackageError(
            f"{name} nests expressions or blocks too deeply to be parsed ({type(e).__name__}): "
            f"split the deeply nested expression into separate statements"
        ) from e


def _top_level_bindings(tree: ast.Module) -> dict[str, ast.stmt]:
    """Last top-level statement binding each name, as import would leave it."""
    out: dict[str, ast.stmt] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out[stmt.name] = stmt
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                out[(alias.asname or alias.name).split(".")[0]] = stmt
        elif isinstance(stmt, ast.Assign):
            for name in _assigned_names(stmt.targets):
                out[name] = stmt
        elif (isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and isinstance(stmt.target, ast.Name)
              and (not isinstance(stmt, ast.AnnAssign) or stmt.value is not None)):
            out[stmt.target.id] = stmt
    return out


def _assigned_names(targets: list[ast.expr]) -> Iterator[str]:
    """Names an assignment binds (``a = ...``, ``a, (b, *c) = ...``); subscripts and attributes bind none."""
    pending = list(targets)
    while pending:
        target = pending.pop()
        if isinstance(target, ast.Name):
            yield target.id
        elif isinstance(target, (ast.Tuple, ast.List)):
            pending.extend(target.elts)
        elif isinstance(target, ast.Starred):
            pending.append(target.value)


@dataclass
class _Class:
    node: ast.ClassDef | None  # None: Main comes from elsewhere (imported), not inspectable
    methods: dict[str, ast.FunctionDef | ast.AsyncFunctionDef]
    open_bases: bool  # some base is not in this file: missing methods may come from it


def _resolve_class(name: str, bindings: dict[str, ast.stmt]) -> ast.ClassDef | Literal[False] | None:
    """The same-file class bound to ``name``; ``None`` if it is not inspectable; ``False`` if not a class.

    Follows ``A = B`` chains in a loop (a chain may be as long as the file allows).
    """
    seen = {name}
    while True:
        stmt = bindings.get(name)
        if isinstance(stmt, ast.ClassDef):
            return stmt
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) or stmt is None:
            return None
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Name) and stmt.value.id not in seen:
            name = stmt.value.id
            seen.add(name)
            continue
        return False


def _collect(node: ast.ClassDef, bindings: dict[str, ast.stmt], file: str) -> _Class:
    """Methods of ``node`` and its same-file bases (depth-first, left to right, subclass first).

    An explicit stack, not recursion: a chain of thousands of classes gives a ``PackageError``
    at ``MAX_BASE_DEPTH``, never a ``RecursionError``.
    """
    order: list[ast.ClassDef] = []
    visited: set[int] = set()
    open_bases = False
    stack: list[tuple[ast.ClassDef, int]] = [(node, 0)]
    while stack:
        cls, depth = stack.pop()
        if id(cls) in visited:
            continue
        if depth > MAX_BASE_DEPTH:
            raise PackageError(
                f"{file}:{cls.lineno}: class Main derives from same-file classes more than {MAX_BASE_DEPTH} levels deep "
                f"(class {cls.name} is level {depth}): validation follows base classes only that far; "
                f"flatten the class hierarchy"
            )
        visited.add(id(cls))
        order.append(cls)
        bases: list[ast.ClassDef] = []
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id == "object" and "object" not in bindings:
                continue
            resolved = _resolve_class(base.id, bindings) if isinstance(base, ast.Name) else None
            if isinstance(resolved, ast.ClassDef):
                bases.append(resolved)
            else:
                open_bases = True
        stack.extend((base, depth + 1) for base in reversed(bases))  # the first base is visited next

    decided: dict[str, ast.FunctionDef | ast.AsyncFunctionDef | None] = {}
    for cls in order:
        own: dict[str, ast.FunctionDef | ast.AsyncFunctionDef | None] = {}
        for stmt in cls.body:  # the last binding in the body wins; an assignment is not a method
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                own[stmt.name] = stmt
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                for target in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                    if isinstance(target, ast.Name):
                        own[target.id] = None
        for name, func in own.items():
            decided.setdefault(name, func)
    return _Class(node, {k: v for k, v in decided.items() if v is not None}, open_bases)


def _find_main(tree: ast.Module, file: str) -> _Class:
    bindings = _top_level_bindings(tree)
    stmt = bindings.get("Main")
    if stmt is None:
        raise PackageError(
            f"{file} has no top-level class Main: define `class Main:` at the top level of {file} (not inside a function or "
            "if-block)")
    resolved = _resolve_class("Main", bindings)
    if resolved is False:
        raise PackageError(
            f"{file}:{stmt.lineno}: Main is defined but is not a class: define `class Main:` at the top level of {file}")
    if resolved is None:
        return _Class(None, {}, True)
    return _collect(resolved, bindings, file)


def _signature(func: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"{func.name}({ast.unparse(func.args)})"
    except RecursionError:  # a default value nested hundreds deep: the name still tells which method
        return f"{func.name}(...)"


def _call_signature(name: str) -> str:
    return f"{name}({', '.join(('self', *EXPECTED_PARAMS[name]))})"


def _expected(name: str) -> str:
    return f"def {_call_signature(name)}:"


def _check_arity(func: ast.FunctionDef | ast.AsyncFunctionDef, file: str) -> None:
    name = func.name
    if isinstance(func, ast.AsyncFunctionDef):
        raise PackageError(
            f"{file}:{func.lineno}: Main.{name} is `async def`, but AI Center calls it synchronously: make it "
            f"`{_expected(name)}`")
    decorators = {d.id for d in func.decorator_list if isinstance(d, ast.Name)}
    if len(decorators) != len(func.decorator_list) or decorators - {"staticmethod", "classmethod"}:
        return  # another decorator may change the signature: cannot tell statically
    args = func.args
    wanted = len(EXPECTED_PARAMS[name]) + (0 if "staticmethod" in decorators else 1)
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    required_kwonly = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    if required <= wanted and (positional >= wanted or args.vararg is not None) and not required_kwonly:
        return
    if name == "__init__":
        raise PackageError(
            f"{file}:{func.lineno}: Main.{_signature(func)} needs arguments, but AI Center creates Main() with none: "
            f"give the extra parameters default values or remove them (`def __init__(self):`)"
        )
    call = f"Main().{name}({', '.join(EXPECTED_PARAMS[name])})"
    raise PackageError(
        f"{file}:{func.lineno}: Main.{_signature(func)} has the wrong parameters: AI Center calls {call}; define it as "
        f"`{_expected(name)}`")


def _check_class(cls: _Class, file: str, required: tuple[str, ...], why: str) -> frozenset[str]:
    for name, func in cls.methods.items():
        if name in EXPECTED_PARAMS:
            _check_arity(func, file)
    if not cls.open_bases:
        for name in required:
            if name not in cls.methods:
                where = f"{file}:{cls.node.lineno}" if cls.node else file
                raise PackageError(
                    f"{where}: class Main has no method {name} ({why}): add `{_expected(name)}` to Main; {_PURPOSE[name]}")
    return frozenset(cls.methods)


def _load_metadata(path: Path) -> PackageMetadata:
    if not path.exists():
        return PackageMetadata()
    if not path.is_file():
        raise PackageError("aicenter.json is not a file: make it a JSON file or remove it")
    text = _read_text(path, "aicenter.json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PackageError(f"aicenter.json:{e.lineno}: {e.msg}: fix the JSON or remove the file (it is optional)") from e
    if not isinstance(data, dict):
        raise PackageError(
            f"aicenter.json must hold a JSON object such as {{\"description\": \"...\"}}, not {type(data).__name__}")
    try:
        return PackageMetadata.model_validate(data)
    except ValidationError as e:
        fields: dict[str, str] = {}
        for err in e.errors():  # one line per top-level field (a union reports once per member)
            field = str(err["loc"][0]) if err["loc"] else "?"
            fields.setdefault(field, "should be true/false or a GPU count (0 or more)" if field == "gpu" else err["msg"])
        problems = "; ".join(f"field {field!r}: {msg}" for field, msg in fields.items())
        raise PackageError(
            f"aicenter.json: {problems}: expected description (string), gpu (true/false or a GPU count), "
            f"retrainable (true/false), input_type (\"json\", \"file\" or \"files\")"
        ) from e


def _read_requirements(path: Path) -> list[str]:
    if not path.is_file():
        raise PackageError(
            "requirements.txt is missing: add it to the package root (create an empty requirements.txt if the package needs "
            "nothing)")
    _check_size(path, "requirements.txt")
    return check_requirements_file(path.parent)  # requirements only: refusals name their line


def validate_package(root: Path, pipeline: str = "serve") -> PackageInfo:
    """Check ``root`` against the package contract for ``pipeline``, without running package code.

    ``pipeline``: a contract (``PIPELINES``) or a pipeline name as the operators use it (``plans.PLANS``).

    Raises ``PackageError`` naming the file, the problem and the fix; returns what was learned.
    """
    pipeline = PLANS[pipeline].contract if pipeline in PLANS else pipeline  # "predict": the serving contract
    if pipeline not in PIPELINES:
        raise PackageError(f"unknown pipeline {pipeline!r}: use one of {', '.join(dict.fromkeys((*PLANS, *PIPELINES)))}")
    given = Path(root)
    if not given.exists():
        raise PackageError(f"package folder {str(given)!r} does not exist: pass the folder that holds main.py, or its zip")
    if not given.is_dir():
        raise PackageError(
            f"package path {str(given)!r} is not a folder: pass the folder that holds main.py (or use open_package for a zip)")
    root = find_package_root(given)
    if next(iter_package_files(root), None) is None:
        raise PackageError(
            f"package folder {str(root)!r} is empty: put main.py (class Main with predict) and requirements.txt in it")
    main_py = root / "main.py"
    if not main_py.is_file():
        nested = [d.name for d in _visible_subdirs(root) if (d / "main.py").is_file()]
        hint = f" (found it in {', '.join(repr(n + '/') for n in nested)}: point to that folder instead)" if nested else ""
        raise PackageError(
            f"main.py is missing from the package root{hint}: add main.py with class Main defining __init__(self) and "
            "predict(self, input)")
    requirements = _read_requirements(root / "requirements.txt")
    main_cls = _find_main(_parse(main_py, "main.py"), "main.py")
    main_methods = _check_class(main_cls, "main.py", MAIN_METHODS, "needed to serve the package")

    train_py = root / "train.py"
    has_train = train_py.is_file()
    needed = REQUIRED_METHODS[pipeline]
    train_methods: frozenset[str] = frozenset()
    if has_train:
        train_cls = _find_main(_parse(train_py, "train.py"), "train.py")
        why = f"needed by the {pipeline} pipeline" if needed else "AI Center creates Main() before any pipeline method"
        train_methods = _check_class(train_cls, "train.py", ("__init__", *needed), why)
    elif pipeline != "serve":
        methods = ", ".join(_call_signature(m) for m in ("__init__", *needed))
        raise PackageError(
            f"package has no train.py, so it can be registered and served but not trained: add train.py with "
            f"class Main defining {methods} to run the {pipeline} pipeline"
        )

    metadata = _load_metadata(root / "aicenter.json")
    if pipeline in TRAINING_PIPELINES and not metadata.retrainable:
        raise PackageError(
            f"aicenter.json sets \"retrainable\": false, so the {pipeline} pipeline may not make new versions of it: "
            f"set \"retrainable\": true (or remove the key) to allow training"
        )
    return PackageInfo(root, has_train, main_methods, train_methods, metadata, requirements)


def capabilities(root: Path) -> dict[str, str | None]:
    """What each pipeline (``plans.PLANS``: train, evaluate, full, predict) makes of the package at ``root``.

    ``None`` where the package meets that pipeline's contract, else the reason it does not (the
    error a run would stop with, before compute). Upload only needs the serving contract, so a
    package that cannot be trained uploads: this tells its owner so then, not at the first run.
    """
    by_contract: dict[str, str | None] = {}
    for contract in dict.fromkeys(plan.contract for plan in PLANS.values()):
        try:
            validate_package(root, contract)
            by_contract[contract] = None
        except PackageError as exc:
            by_contract[contract] = str(exc)
    return {name: by_contract[plan.contract] for name, plan in PLANS.items()}
