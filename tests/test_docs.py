"""Every code block in README.md and docs/*.md works as written.

A reader copies what the docs show. So ```python blocks must compile, ```bash blocks must pass
``bash -n``, ```json blocks must load, and every ``aicenter ...`` command line, in a block or
in inline code, must name a command and options the real parser (airflow_aicenter/cli.py) has.
``airflow ...`` lines are checked against Airflow's own command-line parser, in one subprocess
with a throw-away AIRFLOW_HOME. Placeholders (``NAME``, ``RUN``, ``NAME:VERSION``, ``<dag_id>``)
are replaced by sample values, and synopsis lines (``[--if better|always]``) are tried with each
optional part left out and with each alternative.

Each checker returns the problems it found (file:line and what is wrong), so one run lists them
all; the planted tests make sure a broken block is caught.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from airflow_aicenter.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts (the line after the fence) and its text."""

    path: Path
    line: int
    lang: str
    body: str

    def where(self, offset: int = 0) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line + offset}"


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def fenced_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown file, with their language (lower case, "" when none)."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(Block(path, i + 2, lang, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def inline_spans(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """Inline code spans outside fenced blocks, with their line (``\\|`` in tables is a ``|``)."""
    spans: list[tuple[int, str]] = []
    in_fence: str | None = None
    for n, line in enumerate((path.read_text() if text is None else text).splitlines(), 1):
        m = FENCE.match(line)
        if m:
            in_fence = None if in_fence and line.strip().startswith(in_fence) else (in_fence or m.group(2))
            continue
        if in_fence:
            continue
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", line):
            spans.append((n, span.replace("\\|", "|")))
    return spans


# -- checkers: each returns a list of problems ---------------------------------------------------


def check_python(block: Block) -> list[str]:
    try:
        ast.parse(block.body)
    except SyntaxError as exc:
        return [f"{block.where((exc.lineno or 1) - 1)}: python block does not compile: {exc.msg}"]
    return []


def check_json(block: Block) -> list[str]:
    try:
        json.loads(block.body)
    except json.JSONDecodeError as exc:
        return [f"{block.where(exc.lineno - 1)}: json block does not load: {exc.msg}"]
    return []


def check_bash(block: Block) -> list[str]:
    done = subprocess.run(["bash", "-n"], check=False, input=block.body, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return [f"{block.where()}: bash block fails `bash -n`: {done.stderr.strip()}"]
    return []


#: Blocks whose command lines are checked: shell, console, and unmarked or text blocks (a command shown
#: in one is still copied by readers; layouts and output have no line that starts with the command).
COMMAND_BLOCKS = ("bash", "sh", "shell", "console", "", "text")
#: Sample values for the placeholders the docs use in synopsis lines.
PLACEHOLDERS = {
    "NAME": "churn", "NAME:VERSION": "churn:1.0", "NAME[:VERSION]": "churn:1.0", "VERSION": "1.0",
    "PATH": "./my_package", "DEST": "./out", "ALIAS": "production", "RUN": "aicenter_training/manual/train/1",
    "H": "24", "SOURCE": "./my_package", "TEXT": "text", "URI": "file:///tmp/aicenter", "DIR": "./folder",
}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*(\[?:[A-Z_]+\]?)?$")
#: Where a shell command line ends: the next command is not ours to check.
SHELL_END = re.compile(r"\s(?:\|\|?|&&|;|2?>>?|<)\s|;\s*$|\s&\s*$")


def command_lines(block: Block, program: str) -> list[tuple[int, str]]:
    """The ``program ...`` lines of a shell block (continuations joined, comments and what follows a pipe cut)."""
    found: list[tuple[int, str]] = []
    lines = block.body.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        i += 1
        text = re.sub(r"^\s*(\$\s+)?", "", text)
        text = re.sub(r"(^|\s)#.*$", "", text)  # a comment (the docs put none inside quotes)
        words = text.split()
        if words and (words[0] == program or words[0].endswith("/" + program)):
            found.append((start, SHELL_END.split(" " + text + " ", maxsplit=1)[0].strip()))
    return found


def variants(line: str) -> list[list[str]]:
    """The concrete command lines a synopsis stands for, placeholders filled in.

    ``[...]`` groups (an opening bracket at a word's start) are optional: one variant leaves them all
    out, the others keep them all with one alternative of one ``a|b`` choice at a time.
    """
    groups = re.findall(r"(?:(?<=\s)|^)\[([^\[\]]*)\]", line)
    bare = re.sub(r"(?:(?<=\s)|^)\[([^\[\]]*)\]", "", line)
    filled = re.sub(r"(?:(?<=\s)|^)\[([^\[\]]*)\]", r"\1", line)
    texts = [bare] if groups else [filled]
    choices = [(m.group(0), m.group(0).split("|")) for m in re.finditer(r"(?<!\S)[\w.-]+(?:\|[\w.-]+)+(?!\S)", filled)]
    first = filled
    for whole, options in choices:
        first = first.replace(whole, options[0], 1)
    texts.append(first)
    for whole, options in choices:
        base = filled
        for other, other_options in choices:
            if other != whole:
                base = base.replace(other, other_options[0], 1)
        texts.extend(base.replace(whole, option, 1) for option in options[1:])
    out: list[list[str]] = []
    for text in dict.fromkeys(texts):
        words = []
        for word in shlex.split(text):
            word = re.sub(r"\.\.\.$", "", word)
            if not word:
                continue
            word = re.sub(r"<[^<>]+>", "x", word)
            words.append(PLACEHOLDERS.get(word, "x") if PLACEHOLDER.match(word) and word not in ("-", "--") else word)
        out.append(words)
    return out


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_aicenter_line(words: list[str]) -> str | None:
    """None when the real parser accepts the words after ``aicenter``, else what it said."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exc:
            if exc.code not in (0, None):
                return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


def check_command_words(words: list[str], parser: argparse.ArgumentParser) -> str | None:
    """For a mention (inline code, may leave out required arguments): the commands and options exist."""
    options = set(parser._option_string_actions)
    for word in words[1:]:
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            if name not in options:
                return f"no option {name} (has: {', '.join(sorted(o for o in options if o.startswith('--')))})"
            continue
        children = subcommands(parser)
        if not children:
            continue  # a positional argument
        if word not in children:
            return f"no command {word!r} (has: {', '.join(children)})"
        parser = children[word]
        options |= set(parser._option_string_actions)
    return None


def check_aicenter(path: Path, text: str | None = None) -> list[str]:
    problems: list[str] = []
    for block in fenced_blocks(path, text):
        if block.lang not in COMMAND_BLOCKS:
            continue
        for offset, line in command_lines(block, "aicenter"):
            for words in variants(line):
                said = check_aicenter_line(words)
                if said:
                    problems.append(f"{block.where(offset)}: `{' '.join(words)}`: {said}")
    for n, span in inline_spans(path, text):
        if not re.match(r"(\S*/)?aicenter\s", span):
            continue
        line = SHELL_END.split(" " + span + " ", maxsplit=1)[0].strip()
        for words in variants(line):
            said = check_command_words(words, build_parser())
            if said:
                rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                problems.append(f"{rel}:{n}: `{span}`: {said}")
    return problems


#: Run by a fresh interpreter: checks the command lines it reads on stdin against Airflow's own parser.
AIRFLOW_CHECK = r"""
import argparse, contextlib, io, json, sys
from airflow.cli.cli_parser import get_parser
parser = get_parser()
def children(p):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}
out = []
for where, words, full in json.load(sys.stdin):
    if full:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(words[1:])
            except SystemExit as exc:
                if exc.code not in (0, None):
                    out.append(f"{where}: `{' '.join(words)}`: {err.getvalue().strip().splitlines()[-1]}")
        continue
    p = parser
    for word in words[1:]:
        if word.startswith("-"):
            break
        c = children(p)
        if not c:
            break
        if word not in c:
            out.append(f"{where}: `{' '.join(words)}`: no airflow command {word!r}")
            break
        p = c[word]
print(json.dumps(out))
"""


def airflow_lines(path: Path, text: str | None = None) -> list[tuple[str, list[str], bool]]:
    """(where, words, full): full lines from shell blocks, command mentions from inline code."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found: list[tuple[str, list[str], bool]] = []
    for block in fenced_blocks(path, text):
        if block.lang in COMMAND_BLOCKS:
            for offset, line in command_lines(block, "airflow"):
                found.extend((block.where(offset), words, True) for words in variants(line))
    for n, span in inline_spans(path, text):
        if re.match(r"airflow\s+[a-z]", span):
            found.extend((f"{rel}:{n}", words, False) for words in variants(span))
    return found


def check_airflow(lines: list[tuple[str, list[str], bool]], home: Path) -> list[str]:
    if not lines:
        return []
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    done = subprocess.run([sys.executable, "-c", AIRFLOW_CHECK], check=False, input=json.dumps(lines), capture_output=True,
                          text=True, env=env, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1]))



def _checked(module: str) -> bool:
    """Imports from the provider and from Airflow are checked; others (datetime, ...) are the reader's."""
    return module.split(".", maxsplit=1)[0] in ("airflow_aicenter", "aicenter", "airflow")


def _has(module: str, name: str) -> bool:
    """``from module import name`` works (``airflow.sdk`` resolves its names lazily, so ask, do not list)."""
    try:
        getattr(importlib.import_module(module), name)
    except AttributeError:
        return False
    return True


def _parameters(cls: type) -> set[str]:
    """Every keyword an operator class takes: its own and those of each class it passes ``**kwargs`` to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {p.name for p in inspect.signature(init).parameters.values()
                      if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
    return names


def check_python_names(block: Block) -> list[str]:
    """What a python block imports from the provider or Airflow exists, and operator calls use real arguments."""
    try:
        tree = ast.parse(block.body)
    except SyntaxError:
        return []  # check_python reports it
    problems: list[str] = []
    imported: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not _checked(node.module):
                continue
            for alias in node.names:
                if not _has(node.module, alias.name):
                    problems.append(f"{block.where(node.lineno - 1)}: `from {node.module} import {alias.name}`: "
                                    f"{node.module} has no {alias.name}")
                else:
                    imported[alias.asname or alias.name] = getattr(importlib.import_module(node.module), alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("PipelineOperator"):
            # a fragment (a signature excerpt) may leave the import out: the operators' module is meant
            cls = imported.get(node.func.id) or getattr(importlib.import_module("airflow_aicenter.operators"),
                                                        node.func.id, None)
            if not isinstance(cls, type):
                problems.append(f"{block.where(node.lineno - 1)}: there is no operator {node.func.id}")
                continue
            known = _parameters(cls)
            for kw in node.keywords:
                if kw.arg is not None and kw.arg not in known:
                    problems.append(f"{block.where(kw.lineno - 1)}: {node.func.id} has no argument {kw.arg!r}")
    return problems

# -- the docs as they are ----------------------------------------------------------------------------

IDS = [str(p.relative_to(ROOT)) for p in DOC_FILES]


@pytest.mark.parametrize("path", DOC_FILES, ids=IDS)
def test_code_blocks_parse(path: Path) -> None:
    checks = {"python": check_python, "py": check_python, "json": check_json, "bash": check_bash,
              "sh": check_bash, "shell": check_bash}
    problems = [p for b in fenced_blocks(path) if b.lang in checks for p in checks[b.lang](b)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=IDS)
def test_python_blocks_use_names_that_exist(path: Path) -> None:
    """Imports from the provider and Airflow resolve; operator calls pass only arguments the operators take."""
    problems = [p for b in fenced_blocks(path) if b.lang in ("python", "py") for p in check_python_names(b)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=IDS)
def test_aicenter_commands_exist(path: Path) -> None:
    problems = check_aicenter(path)
    assert not problems, "\n".join(problems)


def test_airflow_commands_exist(tmp_path: Path) -> None:
    lines = [line for path in DOC_FILES for line in airflow_lines(path)]
    assert lines, "the docs show airflow commands (connections add, dags test): none found, is the extraction broken?"
    problems = check_airflow(lines, tmp_path)
    assert not problems, "\n".join(problems)


def test_every_page_is_linked_from_the_index() -> None:
    """docs/README.md is the way in: every page is linked from it, and every link there resolves."""
    index = (ROOT / "docs" / "README.md").read_text()
    linked = set(re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]*)?\)", index))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked, f"pages not linked from docs/README.md: {sorted(pages - linked)}"
    assert all((ROOT / "docs" / name).is_file() for name in linked), sorted(n for n in linked if not (ROOT / "docs" / n).is_file())


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub and the UI's renderer make them."""
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", path.read_text(), re.MULTILINE):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


def link_problems(path: Path) -> list[str]:
    """Relative links of a Markdown file whose file, or heading, does not exist."""
    problems = []
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for n, line in enumerate(path.read_text().splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:|#", target):
                continue
            file, _, anchor = target.partition("#")
            if not (path.parent / file).exists():
                problems.append(f"{rel}:{n}: link to {target}, which does not exist")
            elif anchor and file.endswith(".md") and anchor not in anchors(path.parent / file):
                problems.append(f"{rel}:{n}: link to {target}: {file} has no heading with that anchor "
                                f"(it has: {', '.join(sorted(anchors(path.parent / file)))})")
    return problems


def test_relative_links_resolve() -> None:
    """A link to another file of the repository (README -> docs/x.md, x.md -> y.md#z) names one, and a heading, that exist."""
    problems = [p for path in DOC_FILES for p in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_no_notes_to_implementers() -> None:
    """User docs speak to users: no wave numbers, closing notes or briefs."""
    pattern = re.compile(r"closing note|from this wave|\bwave \d|tests/unit/|\bthe brief\b", re.IGNORECASE)
    problems = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in DOC_FILES
                for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not problems, "\n".join(problems)


# -- planted broken blocks: the checkers catch them -------------------------------------------------

PLANTED = """\
# Planted

```python
from airflow.sdk import DAG
with DAG("x") as dag:
    TrainPipelineOperator(task_id="train", package="churn"
```

```bash
if true; then echo yes
```

```python
from airflow_aicenter.operators import TrainPipelineOperator, TuneOperator

TrainPipelineOperator(task_id="train", package="churn", dataset="s3://b/d/", save_data=True, retries=2)
```

```json
{"storage": "s3://bucket/prefix",}
```

```bash
aicenter package upload ./pkg --name churn
aicenter package publish churn:1.0 --alias production
aicenter package validate ./pkg --pipeline deploy
aicenter runs list --pakage churn
aicenter package promote NAME:VERSION --alias ALIAS [--if better|always|sometimes]
airflow dags tset my_dag
airflow connections add aicenter_default --conn-type aicenter --conn-extras '{}'
```

Mentioned: `aicenter package remove`, `aicenter gc --grace 1`, `airflow dag test`.
"""


def test_planted_broken_blocks_are_caught(tmp_path: Path) -> None:
    path = tmp_path / "planted.md"
    path.write_text(PLANTED)
    blocks = fenced_blocks(path)
    assert [b.lang for b in blocks] == ["python", "bash", "python", "json", "bash"]
    assert check_python(blocks[0]) and check_bash(blocks[1]) and check_json(blocks[3])
    assert not check_bash(blocks[4])
    names = "\n".join(check_python_names(blocks[2]))
    assert "TuneOperator" in names and "'save_data'" in names and "retries" not in names and "dataset" not in names, names  # well-formed shell, wrong commands: the next checks
    problems = "\n".join(check_aicenter(path))
    for wrong in ("publish", "deploy", "--pakage", "sometimes", "remove", "--grace"):
        assert wrong in problems, (wrong, problems)
    assert "upload ./pkg" not in problems and "--if better" not in problems and "--if always" not in problems, problems
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    (tmp_path / "links.md").write_text("[ok](other.md#a-section), [no](other.md#b-section), [gone](gone.md)\n")
    links = "\n".join(link_problems(tmp_path / "links.md"))
    assert "#b-section" in links and "gone.md" in links and "#a-section:" not in links, links
    airflow = "\n".join(check_airflow(airflow_lines(path), tmp_path / "home"))
    for wrong in ("tset", "--conn-extras", "'dag'"):
        assert wrong in airflow, (wrong, airflow)


def test_synopsis_variants() -> None:
    assert variants("aicenter gc [--grace-hours H] [--dry-run]") == [
        ["aicenter", "gc"], ["aicenter", "gc", "--grace-hours", "24", "--dry-run"]]
    assert ["aicenter", "package", "validate", "./my_package", "--pipeline", "serve"] in variants(
        "aicenter package validate PATH [--pipeline train|evaluate|full|serve]")
    assert variants("aicenter runs compare RUN RUN ...")[0][-1] == PLACEHOLDERS["RUN"]



def test_every_operator_argument_is_documented() -> None:
    """docs/operators.md lists every argument the four operators take (their own and the shared base's)."""
    from airflow_aicenter.operators import base, pipeline

    page = (ROOT / "docs" / "operators.md").read_text()
    classes = [base.BasePipelineOperator, pipeline.TrainPipelineOperator, pipeline.EvaluatePipelineOperator,
               pipeline.FullPipelineOperator, pipeline.PredictPipelineOperator]
    missing = sorted({f"{cls.__name__}({name})" for cls in classes
                      for name, p in inspect.signature(cls).parameters.items()
                      if p.kind is p.KEYWORD_ONLY and f"`{name}`" not in page})
    assert not missing, f"docs/operators.md does not document: {', '.join(missing)}"


def test_every_connection_extra_is_documented() -> None:
    """The README's list of connection extras names every field of the connection form."""
    from airflow_aicenter.provider_info import get_provider_info

    readme = (ROOT / "README.md").read_text()
    fields = [f for ct in get_provider_info()["connection-types"] for f in ct.get("conn-fields", {})]
    assert fields, "the aicenter connection type has form fields"
    missing = [f for f in fields if f"`{f}`" not in readme]
    assert not missing, f"README.md does not name the connection extras {missing}"
