"""The house rules that keep the code readable, checked on the source itself (the import
rules — one direction, no cycles — are lint-imports' contracts in pyproject.toml, run by
the same test command)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "consumers", "producers", "tribunal")
MAX_LINES = 400
# Private by name but public by contract: a namedtuple's ``_replace``, ``os._exit``.
DOCUMENTED_PRIVATE = {"_replace", "_exit"}
UNTYPED = re.compile(r"\b(dict|Mapping|MutableMapping)\[str, Any\]")


def modules(*also: str) -> Iterator[Path]:
    for package in (*PACKAGES, *also):
        yield from sorted((ROOT / package).rglob("*.py"))


def public_functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Functions and methods outside ``_private`` names and classes (``__init__`` counts)."""

    def walk(node: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                if not child.name.startswith("_") or child.name == "__init__":
                    yield child
            elif isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                yield from walk(child)

    return walk(tree)


def test_modules_stay_small() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in modules()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these modules (over {MAX_LINES} lines)"


def test_no_private_member_is_used_from_outside() -> None:
    """``x._name`` only on ``self`` or ``cls``: what another module (or a library) keeps
    private is not ours to read or set."""
    found = []
    for path in modules("bench"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or node.attr in DOCUMENTED_PRIVATE:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            found.append(f"{where} {ast.unparse(node.value)}.{node.attr}")
    assert found == []


def test_public_signatures_are_typed() -> None:
    """No ``dict[str, Any]`` in a public signature: a record has a model, a read side a read
    model. Only raw input before validation is untyped, and it is named so: ``RawRecord``."""
    found = []
    for path in modules():
        for fn in public_functions(ast.parse(path.read_text())):
            annotations = [a.annotation for a in (*fn.args.args, *fn.args.kwonlyargs)]
            for annotation in [*annotations, fn.returns]:
                if annotation is not None and UNTYPED.search(ast.unparse(annotation)):
                    where = f"{path.relative_to(ROOT)}:{fn.lineno}"
                    found.append(f"{where} {fn.name}: {ast.unparse(annotation)}")
    assert found == []


@pytest.mark.parametrize("package", ["common", "consumers", "producers"])
def test_another_distributions_package_of_the_same_name_is_one_line(
    tmp_path: Path, package: str
) -> None:
    """tribunal installs top-level ``common``, ``consumers`` and ``producers``: when another
    distribution's package of one of those names shadows ours, the command says so."""
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text('"""Someone else\'s package."""\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "tribunal", "status"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"the package '{package}' found first, at {tmp_path / package}, is not tribunal's" in (
        proc.stderr
    )


def test_a_fleet_started_beside_a_folder_named_common_runs(tmp_path: Path) -> None:
    """The fleet's children run ``python -P -m tribunal``: the folder the fleet was started
    from is not on their path, so its ``common/`` cannot shadow tribunal's."""
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tribunal"), "demo", "--offline", "--limit", "5"],
        env={**env, "COLUMNS": "120"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"not settled\s*│\s*0", proc.stdout), proc.stdout[-2000:]


def test_every_error_of_ours_is_one_family_with_an_exit_code() -> None:
    """Each exception class defined in the packages descends from common.errors'
    TribunalError (one ``except`` catches them all; the CLI's exit code follows the branch)."""
    import importlib

    from common.errors import Busy, ConfigurationError, InputError, TribunalError, exit_code

    found = []
    for path in modules():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception"))
                for b in node.bases
            ):
                found.append(getattr(importlib.import_module(module), node.name))
    outside = [cls.__name__ for cls in found if not issubclass(cls, TribunalError)]
    assert outside == [], "derive these from a common.errors branch"
    assert len(found) >= 10
    assert [exit_code(e("x")) for e in (ConfigurationError, InputError, Busy)] == [2, 2, 1]
