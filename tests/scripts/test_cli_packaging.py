"""Each `bahe` command works after the install the README shows for it: every module the command reaches (its
lazy imports inside engine/cli.py, the functions it calls there, the `python -m` modules it runs, and what those
import in turn) imports, and every third-party package they import is in setup.py's install_requires or in the
extra the README's `pip install` line names for that command."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import runpy
import sys
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("engine", "kernels", "weights", "bench", "tests")
CLI = ast.parse((ROOT / "engine" / "cli.py").read_text())
FUNCTIONS = {node.name: node for node in CLI.body if isinstance(node, ast.FunctionDef)}


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _optional(tree: ast.AST) -> set[int]:
    """ids of import nodes inside `try: ... except ImportError` (the code runs without the package)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") or
                isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") in ("ImportError", "ModuleNotFoundError")
                                                      for e in h.type.elts) for h in node.handlers):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def _imported(nodes, optional: set[int] = frozenset()) -> set[str]:
    """Dotted names imported by the import statements among `nodes` (a `from m import x` gives m and m.x when
    m.x is a module), optional ones left out."""
    names = set()
    for node in nodes:
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if _module_path(f"{node.module}.{a.name}")}
    return names


def _commands() -> dict[str, str]:
    """command -> its cmd_ function, read from build_parser: each `sub.add_parser(NAME)` up to its
    `set_defaults(func=...)`."""
    out, current = {}, None
    for node in (n for statement in FUNCTIONS["build_parser"].body for n in ast.walk(statement)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "add_parser":
                current = node.args[0].value
            elif node.func.attr == "set_defaults":
                out[current] = next(k.value.id for k in node.keywords if k.arg == "func")
    return out


def _cli_reach(function: str, seen: set[str] | None = None) -> set[str]:
    """What `function` of engine/cli.py imports inside itself and the cli functions it calls, and the modules it
    runs as `python -m` (`_run_module("bench.compare", ...)`)."""
    seen = set() if seen is None else seen
    seen.add(function)
    tree = FUNCTIONS[function]
    names = _imported(ast.walk(tree), _optional(tree))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            if node.func.id == "_run_module" and isinstance(node.args[0], ast.Constant):
                names.add(node.args[0].value)
            if node.func.id not in seen:
                names |= _cli_reach(node.func.id, seen)
    return names


def _reach(command: str) -> tuple[set[str], set[str]]:
    """(project modules, third-party top-level packages) that `bahe command` reaches: engine/cli.py's module-level
    imports, the command's own, then every import (lazy ones too) of each project module reached, transitively."""
    start = _imported(CLI.body) | _cli_reach(_commands()[command])
    modules, third, todo = set(), set(), sorted(start)
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if top in PROJECT:
            path = _module_path(name)
            if path is None or name in modules:
                continue
            modules.add(name)
            parts = name.split(".")
            todo += [".".join(parts[:k]) for k in range(1, len(parts))]  # importing a.b.c runs a.b first
            tree = ast.parse(path.read_text())
            todo += sorted(_imported(ast.walk(tree), _optional(tree)))
        elif top not in sys.stdlib_module_names and top != "__future__":
            third.add(top)
    return modules, third


def _normal(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, {extra: requirements}) as distribution names, from running setup.py with setup() caught."""
    caught = {}
    original = setuptools.setup
    setuptools.setup = lambda **kwargs: caught.update(kwargs)
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original

    def names(requirements):
        return {_normal(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}
    return names(caught["install_requires"]), {k: names(v) for k, v in caught["extras_require"].items()}


def _readme_extras() -> dict[str, set[str]]:
    """command -> the extras the README's `pip install .` / `pip install '.[x]'  # [+] bahe a, b` lines name for it
    ('' for the plain install)."""
    out: dict[str, set[str]] = {}
    commands = set(_commands())
    for line in (ROOT / "README.md").read_text().splitlines():
        found = re.match(r"\s*pip install '?\.(?:\[([\w,-]+)\])?'?\s+#\s*\+?\s*bahe (.*)", line)
        if found:
            for word in re.findall(r"[\w-]+", found.group(2).split("(")[0]):
                if word in commands:
                    out.setdefault(word, set()).update((found.group(1) or "").split(","))
    return out


COMMANDS = sorted(_commands())


def test_every_command_is_read_from_the_parser():
    assert {"encode", "train", "score", "demo", "bench", "profile", "models", "info"} <= set(COMMANDS)
    assert set(_commands().values()) <= set(FUNCTIONS)


def test_the_readme_names_an_install_for_every_command():
    extras = _readme_extras()
    assert set(extras) == set(COMMANDS), f"commands without a README install line: {set(COMMANDS) - set(extras)}"
    _, declared = _declared()
    assert all(e in declared for names in extras.values() for e in names if e), "an extra setup.py does not define"


def test_reach_follows_lazy_imports_helpers_and_python_m_modules():
    demo, _ = _reach("demo")
    assert "engine.training.studies.demo" in demo and "engine.training.baselines.classic" in demo
    encode = _reach("encode")[0]
    assert "engine.distributed" in encode, "through _launch, a helper cmd_encode calls"
    assert "engine.encoding.text_checks" in encode, "through engine.encoding.text_files, imported inside cmd_encode"
    assert {"bench.compare", "bench.report"} <= _reach("bench")[0], "bahe bench runs python -m bench.compare"
    assert not [m for m in _reach("score")[0] if m.startswith("engine.training")], "bahe score loads no harness"


@pytest.mark.parametrize("command", COMMANDS)
def test_command_modules_import_and_their_packages_are_declared(command):
    modules, third = _reach(command)
    for name in sorted(modules):
        importlib.import_module(name)
    required, extras = _declared()
    allowed = required | {d for extra in _readme_extras()[command] if extra for d in extras[extra]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for top in sorted(third):
        assert top in distributions, f"bahe {command} imports {top!r}, which no installed distribution provides"
        names = {_normal(d) for d in distributions[top]}
        if not names & allowed:
            missing[top] = sorted(names)
    assert not missing, (f"bahe {command} imports {missing}, declared neither in install_requires nor in the extra "
                         f"the README names for it ({sorted(_readme_extras()[command] - {''}) or 'none'})")
