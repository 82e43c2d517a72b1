from __future__ import annotations

import os
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from airflow_aicenter.errors import PackageError
from airflow_aicenter.package import (
    REQUIRED_METHODS,
    PackageMetadata,
    find_package_root,
    is_contract_file,
    iter_package_files,
    validate_package,
    write_zip,
)
from tests.packages import MAIN, TRAIN, TRAIN_ONLY, MakePackage, write_package


def error(root: Path, pipeline: str = "serve") -> str:
    with pytest.raises(PackageError) as e:
        validate_package(root, pipeline)
    return str(e.value)


# -- valid packages ----------------------------------------------------------------------


def test_serve_only_package(make_package: MakePackage) -> None:
    root = make_package(train=None, requirements="numpy==2.0\n\n# a comment\n  scikit-learn>=1.4  \n")
    info = validate_package(root)
    assert info.root == root
    assert not info.has_train
    assert {"__init__", "predict"} <= info.main_methods
    assert info.train_methods == frozenset()
    assert info.requirements == ["numpy==2.0", "scikit-learn>=1.4"]
    assert info.metadata == PackageMetadata()


@pytest.mark.parametrize("pipeline", ["serve", "train", "evaluate", "full"])
def test_full_package_passes_every_pipeline(make_package: MakePackage, pipeline: str) -> None:
    info = validate_package(make_package(), pipeline)
    assert info.has_train
    assert set(REQUIRED_METHODS["full"]) | {"__init__"} <= info.train_methods


def test_train_only_package_passes_train_but_not_evaluate_or_full(make_package: MakePackage) -> None:
    root = make_package(train=TRAIN_ONLY)
    assert validate_package(root, "train").train_methods == {"__init__", "train", "save"}
    assert ("class Main has no method evaluate (needed by the evaluate pipeline): "
            "add `def evaluate(self, evaluation_directory):`") in error(root, "evaluate")
    assert ("no method process_data (needed by the full pipeline): "
            "add `def process_data(self, input_directory):`") in error(root, "full")


def test_evaluate_only_package(make_package: MakePackage) -> None:
    root = make_package(train="class Main:\n    def __init__(self): pass\n"
                              "    def evaluate(self, evaluation_directory): return 0.5\n")
    assert validate_package(root, "evaluate").train_methods == {"__init__", "evaluate"}
    assert "no method train" in error(root, "train")


def test_flexible_signatures_are_accepted(make_package: MakePackage) -> None:
    train = """
    class Main:
        def __init__(self, config=None, *, verbose=False):
            pass
        def process_data(self, *args):
            pass
        def train(self, training_directory, epochs=3, **kwargs):
            pass
        def evaluate(self, evaluation_directory, /):
            return 1.0
        @staticmethod
        def save():
            pass
    """
    main = "class Main:\n    def __init__(self, *a, **k): pass\n    @classmethod\n    def predict(cls, input): return input\n"
    info = validate_package(make_package(main=main, train=train), "full")
    assert info.main_methods == {"__init__", "predict"}
    assert info.train_methods == {"__init__", "process_data", "train", "evaluate", "save"}


def test_aicenter_zip_layout_with_one_root_folder(tmp_path: Path) -> None:
    inner = write_package(tmp_path / "outer" / "churn")
    (tmp_path / "outer" / "__MACOSX").mkdir()
    (tmp_path / "outer" / ".hidden").mkdir()
    (tmp_path / "outer" / ".hidden" / "main.py").write_text(MAIN)
    assert find_package_root(tmp_path / "outer") == inner
    assert validate_package(tmp_path / "outer", "full").root == inner


def test_find_package_root_keeps_the_folder_when_main_py_is_at_the_top(make_package: MakePackage) -> None:
    root = make_package(files={"sub/main.py": MAIN})
    assert find_package_root(root) == root


def test_methods_from_same_file_bases_count(make_package: MakePackage) -> None:
    train = """
    class Base:
        def __init__(self):
            pass
        def train(self, training_directory):
            pass

    class Middle(Base):
        def save(self):
            pass

    class Main(Middle, object):
        def evaluate(self, evaluation_directory):
            return 1.0
    """
    info = validate_package(make_package(train=train), "train")
    assert {"__init__", "train", "save", "evaluate"} <= info.train_methods


def test_wrong_arity_in_a_same_file_base_is_reported(make_package: MakePackage) -> None:
    train = ("class Base:\n    def train(self):\n        pass\n\n"
             "class Main(Base):\n    def __init__(self): pass\n    def save(self): pass\n")
    assert "train.py:2: Main.train(self) has the wrong parameters" in error(make_package(train=train), "train")


def test_missing_method_with_imported_base_is_assumed_inherited(make_package: MakePackage) -> None:
    train = "from mylib import Trainer\n\nclass Main(Trainer):\n    def save(self):\n        pass\n"
    info = validate_package(make_package(train=train), "full")
    assert info.train_methods == {"save"}


def test_imported_main_is_not_inspected(make_package: MakePackage) -> None:
    root = make_package(main="from model import Main\n", train="from model import Predictor as _P\nMain = _P\n")
    info = validate_package(root, "full")
    assert info.has_train and info.main_methods == frozenset() and info.train_methods == frozenset()


def test_main_bound_by_assignment_to_a_same_file_class(make_package: MakePackage) -> None:
    train = "class Trainer:\n    def __init__(self): pass\n    def train(self, training_directory): pass\n\nMain = Trainer\n"
    root = make_package(train=train)
    assert "no method save" in error(root, "train")
    assert validate_package(root, "serve").train_methods == {"__init__", "train"}


def test_validation_never_executes_package_code(make_package: MakePackage, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = textwrap.dedent(f"""
        import pathlib, sys
        pathlib.Path({str(marker)!r}).write_text("ran")
        raise SystemExit("package code ran")
    """)
    root = make_package(main=payload + MAIN, train=payload + TRAIN, files={"helper.py": payload})
    info = validate_package(root, "full")
    assert info.has_train
    assert not marker.exists()
    assert "main" not in sys.modules and "train" not in sys.modules


# -- bad input ---------------------------------------------------------------------------


def test_unknown_pipeline(make_package: MakePackage) -> None:
    assert error(make_package(), "training") == "unknown pipeline 'training': use one of train, evaluate, full, predict, serve"


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist: pass the folder that holds main.py" in error(tmp_path / "nope")


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "pkg.zip").write_bytes(b"PK")
    assert "is not a folder" in error(tmp_path / "pkg.zip")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "__pycache__").mkdir(parents=True)
    (tmp_path / "empty" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    message = error(tmp_path / "empty")
    assert "is empty: put main.py" in message and "requirements.txt" in message


def test_missing_main_py(make_package: MakePackage) -> None:
    message = error(make_package(main=None))
    assert message.startswith("main.py is missing from the package root: add main.py with class Main")


def test_missing_main_py_with_several_candidate_folders(tmp_path: Path) -> None:
    write_package(tmp_path / "outer" / "a")
    write_package(tmp_path / "outer" / "b")
    message = error(tmp_path / "outer")
    assert "main.py is missing from the package root (found it in 'a/', 'b/': point to that folder instead)" in message


def test_missing_requirements(make_package: MakePackage) -> None:
    message = error(make_package(requirements=None))
    assert message == (
        "requirements.txt is missing: add it to the package root "
        "(create an empty requirements.txt if the package needs nothing)"
    )


@pytest.mark.parametrize("file", ["main.py", "train.py"])
def test_syntax_error_is_reported_as_file_line_message(make_package: MakePackage, file: str) -> None:
    source = "import os\n\nclass Main:\n    def __init__(self)\n        pass\n"
    with pytest.raises(SyntaxError) as expected:
        compile(source, file, "exec")
    root = make_package(**{file.removesuffix(".py"): source})
    assert error(root) == f"{file}:4: {expected.value.msg}"
    assert expected.value.lineno == 4


def test_non_utf8_source(make_package: MakePackage) -> None:
    root = make_package(files={"train.py": "# caf\xe9\nclass Main: pass\n".encode("latin-1")})
    message = error(root)
    assert message.startswith("train.py is not valid UTF-8 text") and message.endswith("save it with UTF-8 encoding")


def test_declared_source_encoding_is_honoured(make_package: MakePackage) -> None:
    main = "# -*- coding: latin-1 -*-\n# caf\xe9\n" + textwrap.dedent(MAIN).replace("str(input)", "'r\xe9sum\xe9: ' + str(input)")
    with pytest.raises(UnicodeDecodeError):  # read as UTF-8, this file would be refused
        main.encode("latin-1").decode("utf-8")
    root = make_package(files={"main.py": main.encode("latin-1")})
    assert validate_package(root).main_methods == {"__init__", "predict"}


def test_null_bytes_in_source(make_package: MakePackage) -> None:
    message = error(make_package(files={"main.py": b"class Main:\x00 pass\n"}))
    assert message.startswith("main.py")
    assert "null" in message.lower()


def test_no_class_main(make_package: MakePackage) -> None:
    message = error(make_package(main="class Model:\n    def predict(self, input): pass\n"))
    assert message.startswith("main.py has no top-level class Main: define `class Main:` at the top level of main.py")


def test_class_main_nested_in_a_function_does_not_count(make_package: MakePackage) -> None:
    main = "def build():\n    class Main:\n        pass\n    return Main\n"
    assert "main.py has no top-level class Main" in error(make_package(main=main))


@pytest.mark.parametrize("source", ["Main = 3\n", "def Main():\n    pass\n", "class Main: pass\nMain = Main()\n"])
def test_main_that_is_not_a_class(make_package: MakePackage, source: str) -> None:
    message = error(make_package(train=source))
    assert "train.py:" in message and "Main is defined but is not a class: define `class Main:`" in message


def test_main_missing_predict(make_package: MakePackage) -> None:
    message = error(make_package(main="class Main:\n    def __init__(self):\n        pass\n"))
    assert message == (
        "main.py:1: class Main has no method predict (needed to serve the package): "
        "add `def predict(self, input):` to Main; it returns the prediction for one input"
    )


@pytest.mark.parametrize("pipeline", ["train", "full"])
def test_training_a_package_whose_main_has_no_save(make_package: MakePackage, pipeline: str) -> None:
    """save() persists the trained model into the new version: without it a training run would make a version
    holding no model."""
    train = TRAIN.replace("    def save(self):\n        pass\n", "")
    assert "def save" not in train
    root = make_package(train=train)
    assert validate_package(root, "evaluate").train_methods == {"__init__", "process_data", "train", "evaluate"}
    assert error(root, pipeline) == (
        f"train.py:2: class Main has no method save (needed by the {pipeline} pipeline): add `def save(self):` to Main; "
        "it persists the model into the package folder (e.g. ./model.pkl) so main.py can load it"
    )


def test_train_main_missing_init(make_package: MakePackage) -> None:
    message = error(make_package(train="class Main:\n    def train(self, training_directory): pass\n"))
    assert "train.py:1: class Main has no method __init__" in message and "add `def __init__(self):`" in message


def test_method_assigned_in_class_body_counts_as_missing(make_package: MakePackage) -> None:
    train = ("def _train(self, d):\n    pass\n\n"
             "class Main:\n    def __init__(self): pass\n    def save(self): pass\n    train = _train\n")
    assert "no method train (needed by the train pipeline)" in error(make_package(train=train), "train")


def test_train_without_training_directory(make_package: MakePackage) -> None:
    train = ("class Main:\n    def __init__(self):\n        pass\n    def train(self):\n        pass\n"
             "    def save(self):\n        pass\n")
    assert error(make_package(train=train), "train") == (
        "train.py:4: Main.train(self) has the wrong parameters: AI Center calls Main().train(training_directory); "
        "define it as `def train(self, training_directory):`"
    )


def test_wrong_arity_is_reported_even_when_the_pipeline_does_not_call_it(make_package: MakePackage) -> None:
    main = "class Main:\n    def __init__(self): pass\n    def predict(self, input, extra): pass\n"
    assert "main.py:3: Main.predict(self, input, extra) has the wrong parameters" in error(make_package(main=main))


def test_init_with_required_arguments(make_package: MakePackage) -> None:
    main = "class Main:\n    def __init__(self, model_path):\n        pass\n    def predict(self, input): pass\n"
    message = error(make_package(main=main))
    assert message.startswith(
        "main.py:2: Main.__init__(self, model_path) needs arguments, but AI Center creates Main() with none")
    assert "give the extra parameters default values or remove them" in message


def test_required_keyword_only_argument(make_package: MakePackage) -> None:
    train = TRAIN.replace("def save(self):", "def save(self, *, path):")
    assert "Main.save(self, *, path) has the wrong parameters" in error(make_package(train=train), "train")


def test_async_method(make_package: MakePackage) -> None:
    train = TRAIN.replace("def train(", "async def train(")
    assert ("Main.train is `async def`, but AI Center calls it synchronously: "
            "make it `def train(self, training_directory):`") in error(make_package(train=train), "train")


def test_training_a_package_without_train_py(make_package: MakePackage) -> None:
    message = error(make_package(train=None), "train")
    assert message.startswith(
        "package has no train.py, so it can be registered and served but not trained: add train.py with class Main")
    assert "train(self, training_directory), save(self)" in message


def test_retrainable_false_refuses_training(make_package: MakePackage) -> None:
    root = make_package(files={"aicenter.json": '{"retrainable": false, "description": "frozen"}'})
    assert validate_package(root, "serve").metadata.retrainable is False
    validate_package(root, "evaluate")  # scoring makes no new version
    message = error(root, "full")
    assert 'aicenter.json sets "retrainable": false' in message and 'set "retrainable": true' in message


def test_metadata_is_read_with_extra_keys(make_package: MakePackage) -> None:
    root = make_package(files={"aicenter.json": '{"description": "churn", "gpu": 2, "input_type": "file", "owner": "ml-team"}'})
    meta = validate_package(root).metadata
    assert (meta.description, meta.gpu, meta.input_type) == ("churn", 2, "file")
    assert meta.model_extra == {"owner": "ml-team"}
    assert validate_package(make_package(files={"aicenter.json": '{"gpu": true}'})).metadata.gpu is True


def test_metadata_invalid_json(make_package: MakePackage) -> None:
    message = error(make_package(files={"aicenter.json": '{\n  "gpu": true,\n}\n'}))
    assert message.startswith("aicenter.json:3: ")
    assert "fix the JSON or remove the file" in message


@pytest.mark.parametrize(
    ("content", "field"),
    [('{"gpu": "yes"}', "gpu"), ('{"gpu": -1}', "gpu"), ('{"retrainable": "no"}', "retrainable"),
     ('{"input_type": "csv"}', "input_type"), ('{"description": 3}', "description")],
)
def test_metadata_wrong_types_name_the_field(make_package: MakePackage, content: str, field: str) -> None:
    message = error(make_package(files={"aicenter.json": content}))
    assert message.startswith(f"aicenter.json: field {field!r}")


def test_metadata_not_an_object(make_package: MakePackage) -> None:
    assert "aicenter.json must hold a JSON object" in error(make_package(files={"aicenter.json": "[1, 2]"}))


# -- files -------------------------------------------------------------------------------


def test_iter_package_files_is_sorted_relative_and_skips_bytecode(make_package: MakePackage) -> None:
    root = make_package(files={"a-b.txt": "x", "a/b.txt": "x",
        "__pycache__/main.cpython-311.pyc": b"\0", "sub/__pycache__/x.pyc": b"\0", "sub/old.pyc": b"\0", ".env": "x"})
    names = [p.as_posix() for p in iter_package_files(root)]
    assert names == [".env", "a-b.txt", "a/b.txt", "main.py", "requirements.txt", "train.py"]


def test_iter_package_files_leaves_out_everything_under_pycache(make_package: MakePackage, tmp_path: Path) -> None:
    """``__pycache__`` is a byproduct of running the code, whatever its files are called."""
    root = make_package(files={"__pycache__/main.cpython-311.pyc": b"\0", "__pycache__/notes.txt": "x",
                               "__pycache__/sub/state.json": "{}", "lib/__pycache__/lib.cpython-311.opt-1.pyc": b"\0",
                               "lib/__pycache__/README": "x", "lib/util.py": "", "lib/pycache_notes.txt": "kept"})
    names = [p.as_posix() for p in iter_package_files(root)]
    assert names == ["lib/pycache_notes.txt", "lib/util.py", "main.py", "requirements.txt", "train.py"]
    write_zip(root, tmp_path / "p.zip")
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        assert sorted(zf.namelist()) == names


def test_iter_package_files_lists_links_without_following(make_package: MakePackage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "secret").write_text("x")
    root = make_package()
    os.symlink(outside, root / "linked_dir")
    os.symlink(outside / "deep" / "secret", root / "linked_file")
    names = [p.as_posix() for p in iter_package_files(root)]
    assert "linked_dir" in names and "linked_file" in names
    assert not any(n.startswith("linked_dir/") for n in names)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("main.py", True), ("pkg/train.py", True), ("pkg/aicenter.json", True), ("requirements.txt", True),
     ("pkg/sub/main.py", False), ("pkg/model.bin", False), ("pkg/", False)],
)
def test_is_contract_file(name: str, expected: bool) -> None:
    assert is_contract_file(name) is expected
