"""The house rules of the layout, read from the source: serving code never imports the training harness
or the benchmarks, storage imports neither kernels nor engine, the import graph has no cycle, and no
source file grows past ~400 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "weights", "bench")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Project modules that `path` imports (at module level only, if asked), resolved to known module names."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in MODULES}
    return found


def _serving() -> list[str]:
    return [name for name in MODULES if name.startswith("engine") and not name.startswith("engine.training")
            and name != "engine.cli"]


def test_serving_code_never_imports_the_harness_or_bench():
    assert "engine.serving.scorer" in _serving() and "engine.backbone.split" in _serving()
    for name in _serving():
        bad = {m for m in _imports(MODULES[name]) if m.startswith(("engine.training", "bench"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_the_command_line_loads_the_harness_only_inside_its_training_commands():
    assert not {m for m in _imports(MODULES["engine.cli"], top_level_only=True)
                if m.startswith(("engine.training", "bench"))}
    assert not {m for m in _imports(MODULES["engine.cli"]) if m.startswith("bench")}


def test_storage_imports_neither_kernels_nor_engine():
    for name in (m for m in MODULES if m.startswith("weights")):
        bad = {m for m in _imports(MODULES[name]) if m.startswith(("kernels", "engine", "bench"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_engine_and_kernels_never_import_bench():
    for name in (m for m in MODULES if m.startswith(("engine", "kernels", "weights"))):
        assert not {m for m in _imports(MODULES[name]) if m.startswith("bench")}, name


def test_import_graph_has_no_cycle():
    graph = {name: _imports(path, top_level_only=True) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_source_files_stay_small():
    sizes = {path: len(path.read_text().splitlines()) for path in MODULES.values()}
    too_big = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_big, too_big
