"""The packages' layout: the engine never imports the lab, and nothing imports in circles.

``migrate`` is the engine an orchestrator embeds; ``lab`` (namespaces, QEMU launcher,
test guest, probe, demo) and matplotlib (``bench``'s plots) are not part of it. Only
the CLI's handlers may load the lab, when the command that needs it runs.
"""

from __future__ import annotations

import ast
import graphlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("migrate", "dirtytrack", "cpumodel", "bench", "lab")

# Imports every module of the engine, then builds the CLI's parser and asks for
# `livemig migrate --help`; prints what got loaded.
_LOAD_ENGINE = """
import contextlib, io, json, pkgutil, sys
import migrate, migrate.engine, migrate.cli
for info in pkgutil.walk_packages(migrate.__path__, "migrate."):
    __import__(info.name)
with contextlib.redirect_stdout(io.StringIO()):
    try:
        migrate.cli.main(["migrate", "--help"])
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*packages: str) -> dict[str, Path]:
    return {
        _module_name(path): path for package in packages for path in (ROOT / package).rglob("*.py")
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside a function, not under
    ``if TYPE_CHECKING:``; inside classes, try/except, other ifs and withs they count."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names ``node`` imports: modules, or ``package.name`` for from-imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _names_lab(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        names = [node.module or ""] if node.level == 0 else []
    else:
        names = [alias.name for alias in node.names]
    return any(name == "lab" or name.startswith("lab.") for name in names)


def test_engine_and_its_cli_parser_load_no_lab_and_no_matplotlib() -> None:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_ENGINE],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert "migrate.cli_bench" in loaded and "migrate.engine" in loaded
    lab = [m for m in loaded if m == "lab" or m.startswith("lab.")]
    plots = [m for m in loaded if m.split(".")[0] == "matplotlib" or m == "bench.plots"]
    assert lab == [], f"the engine loaded lab modules: {lab}"
    assert plots == [], f"the engine loaded matplotlib: {plots[:5]}"


def _every_import(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import of ``tree`` and whether it sits inside a function."""
    todo: list[tuple[ast.AST, bool]] = [(node, False) for node in tree.body]
    while todo:
        node, in_function = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, in_function
            continue
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        todo.extend((child, inner) for child in ast.iter_child_nodes(node))


def test_no_module_of_the_engine_imports_the_lab() -> None:
    """At module level nowhere (``TYPE_CHECKING`` blocks included); inside a function
    only in the CLI (``migrate/cli*.py``), whose handlers run the lab's commands."""
    offenders = []
    for module, path in _sources("migrate").items():
        is_cli = module.startswith("migrate.cli") and module.count(".") == 1
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, in_function in _every_import(tree):
            if not _names_lab(node):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if not in_function:
                offenders.append(f"{where}: module-level import of the lab")
            elif not is_cli:
                offenders.append(f"{where}: only the CLI's handlers may import the lab")
    assert offenders == []


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of our packages it imports at module level. Importing
    ``a.b`` also runs ``a/__init__``; those implicit edges are left out, as Python
    initialises a parent package before its modules."""
    sources = _sources(*PACKAGES)
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        deps: set[str] = set()
        for node in _module_level_imports(tree):
            names = _imported_names(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                # `from pkg import module, name`: the module, and pkg for the name.
                base, *members = names
                modules = [name for name in members if name in sources]
                names = modules + ([base] if len(modules) < len(members) else [])
            for name in names:
                while name not in sources and "." in name:
                    name = name.rpartition(".")[0]
                if name in sources and name != module:
                    deps.add(name)
        graph[module] = deps
    return graph


def test_the_import_graph_is_read_right() -> None:
    graph = _import_graph()
    assert "migrate.errors" in graph["lab.errors"]
    assert "cpumodel.flags" in graph["cpumodel.host"]  # from cpumodel import flags as F
    assert "migrate.cli" in graph["migrate.cli_bench"]
    assert not any(dep.startswith("bench.") for dep in graph["migrate.cli_bench"])  # lazy/typing
    assert "migrate.cli_bench" not in graph["migrate.cli"]  # inside build_parser


def test_no_import_cycles_at_module_level() -> None:
    graph = _import_graph()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"module-level import cycle: {' -> '.join(exc.args[1])}") from None
