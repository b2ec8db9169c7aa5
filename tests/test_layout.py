"""The house rules of the layout, read from the source (AST only: nothing is imported).

Imports: each room imports only the rooms its row of ROOMS allows (serving never the training harness, storage
neither kernels nor engine, nothing of engine the benchmarks); the command line loads the harness only inside
its command functions; the import graph, imports inside functions included, has no cycle; no module imports
another module's private (_underscore) names. Files: no two modules share a file name, no engine folder holds
more than 12 modules, no source file grows past ~400 lines, tests live in tests/<room>/ folders, and the tests
that start ranks, load SmolLM2 or run a script end to end carry the `slow` marker (`make test-fast` skips them).
"""
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "weights", "bench")
MAX_LINES = 400
MAX_MODULES_PER_FOLDER = 12

_ENGINE_ROOMS = ("engine.backbone", "engine.config", "engine.deploy", "engine.distributed", "engine.encoding",
                 "engine.export", "engine.features", "engine.model", "engine.serving")
_SERVING = (*(r for r in _ENGINE_ROOMS if r not in ("engine.serving", "engine.deploy", "engine.export")), "kernels",
            "weights")
# What each room may import besides itself. A module's room is the longest key its dotted name starts with
# ("engine" is the package's __init__ alone). An entry names a room, or one module of a room when only that
# module is meant (encoding packs id lists with `engine.model.packing`; it never runs the model).
ROOMS: dict[str, tuple[str, ...]] = {
    "weights": (),                                    # storage only: files, tables, embedded models
    "kernels": (),                                    # one fused op per module, its PyTorch reference beside it
    "engine.features": (),                            # side inputs as pure functions, shared by training and serving
    "engine.config": ("engine.features",),            # ModelConfig.window_start is features.history_window's rule
    "engine.distributed": (),                         # torchrun launch and the process group
    "engine.backbone": ("kernels", "weights"),
    "engine.model": ("engine.backbone", "engine.config", "engine.features", "kernels", "weights"),
    "engine.encoding": ("engine.backbone", "engine.config", "engine.distributed", "engine.model.packing",
                        "kernels", "weights"),
    "engine.serving": _SERVING,
    # id-keyed serving (the user-history store, IdRanker): a sub-room of serving, which never imports it
    "engine.serving.by_id": ("engine.serving", *_SERVING),
    # what runs in front of a BAHEScorer in production: the request queue, versioned folders, the hot-swap handle
    "engine.deploy": ("engine.config", "engine.serving", "kernels", "weights"),
    # BAHE as a feature provider: the feature block, the training record, the block of live requests (a scorer's
    # outputs for another ranker); the offline export of a log drives the trainer, so it lives in the harness
    "engine.export": ("engine.config", "engine.features", "engine.model", "engine.serving", "weights"),
    "engine.training": (*_ENGINE_ROOMS, "kernels", "weights"),
    "engine.cli": (*_ENGINE_ROOMS, "engine.training", "weights"),  # the harness only lazily (LAZY_ONLY)
    "bench": ("engine", *_ENGINE_ROOMS, "engine.training", "kernels", "weights"),
    "engine": (),                                     # names resolved on first use (importlib), no import statement
}
LAZY_ONLY = {"engine.cli": ("engine.training",)}  # rooms a module may import only inside a function


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


@dataclass(frozen=True)
class Import:
    module: str            # the project module imported
    name: str | None       # the name taken from it (`from module import name`), None for the module itself
    lazy: bool             # inside a function (runs when called, not when the importer is imported)
    line: int


def _imports_of(source: str, known: set[str] | dict = MODULES, package: str = "") -> list[Import]:
    """Every import statement of `source` that names a known module, wherever it stands (module level, under
    if/try, inside functions and methods); relative imports resolved against `package`."""
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, None, lazy, child.lineno) for a in child.names if a.name in known)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                for a in child.names:
                    if f"{base}.{a.name}" in known:
                        found.append(Import(f"{base}.{a.name}", None, lazy, child.lineno))
                    elif base in known:
                        found.append(Import(base, a.name, lazy, child.lineno))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


IMPORTS = {name: _imports_of(path.read_text(), MODULES, _package(name)) for name, path in MODULES.items()}


def _imports(name: str, *, eager_only: bool = False) -> set[str]:
    return {i.module for i in IMPORTS[name] if not (eager_only and i.lazy)}


def _room(name: str) -> str | None:
    if name == "engine":
        return "engine"
    keys = [k for k in ROOMS if k != "engine" and (name == k or name.startswith(k + "."))]
    return max(keys, key=len) if keys else None


def _allowed(target: str, entries: tuple[str, ...]) -> bool:
    return any(target == e or target.startswith(e + ".") for e in entries)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    for root in graph:
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path, state[root] = [root], 1
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return None


def _serving() -> list[str]:
    return [name for name in MODULES if name.startswith("engine") and not name.startswith("engine.training")
            and name != "engine.cli"]


# ----- the checker itself: each rule below fails when its subject is there -----

def test_checker_sees_imports_inside_functions_methods_and_try_blocks():
    source = ("import engine.config\ntry:\n    from kernels import ops\nexcept ImportError:\n    pass\n"
              "class A:\n    def f(self):\n        from engine.model.head import _private\n"
              "def g():\n    from . import split\n")
    known = {"engine.config", "kernels.ops", "engine.model.head", "engine.backbone.split"}
    got = {(i.module, i.name, i.lazy) for i in _imports_of(source, known, package="engine.backbone")}
    assert got == {("engine.config", None, False), ("kernels.ops", None, False),
                   ("engine.model.head", "_private", True), ("engine.backbone.split", None, True)}


def test_checker_finds_a_cycle_and_passes_a_tree():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"],
                                                                            ["b", "c", "a", "b"])
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_checker_reads_the_lazy_imports_of_the_command_line():
    lazy = {i.module for i in IMPORTS["engine.cli"] if i.lazy}
    assert {"engine.training.studies.demo", "engine.serving.scorer", "weights.table"} <= lazy


# ----- imports -----

def test_imports_every_module_belongs_to_a_room_of_the_table():
    assert not [name for name in MODULES if _room(name) is None]
    assert set(ROOMS) == {_room(name) for name in MODULES}, "a room of the table that holds no module"


def test_imports_each_room_imports_only_what_its_row_allows():
    bad = [f"{name} ({_room(name)}) imports {target}" for name in MODULES for target in sorted(_imports(name))
           if _room(target) != _room(name) and not _allowed(target, ROOMS[_room(name)])]
    assert not bad, "\n".join(bad)


def test_imports_lazy_only_rooms_are_imported_only_inside_functions():
    bad = [f"{name}:{i.line} imports {i.module} at module level" for name, rooms in LAZY_ONLY.items()
           for i in IMPORTS[name] if not i.lazy and _allowed(i.module, rooms)]
    assert not bad, "\n".join(bad)


def test_imports_serving_code_never_imports_the_harness_or_bench():
    assert "engine.serving.scorer" in _serving() and "engine.backbone.split" in _serving()
    for name in _serving():
        bad = {m for m in _imports(name) if m.startswith(("engine.training", "bench"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_imports_the_command_line_loads_the_harness_only_inside_its_commands():
    assert not {m for m in _imports("engine.cli", eager_only=True) if m.startswith(("engine.training", "bench"))}
    assert not {m for m in _imports("engine.cli") if m.startswith("bench")}


def test_imports_storage_imports_neither_kernels_nor_engine():
    for name in (m for m in MODULES if m.startswith("weights")):
        bad = {m for m in _imports(name) if m.startswith(("kernels", "engine", "bench"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_imports_engine_and_kernels_never_import_bench():
    for name in (m for m in MODULES if m.startswith(("engine", "kernels", "weights"))):
        assert not {m for m in _imports(name) if m.startswith("bench")}, name


def test_imports_graph_has_no_cycle_counting_imports_inside_functions():
    """Every import counts, a lazy one too: a function-level import that closes a cycle only hides it. Importing
    a.b.c from outside package a.b also runs a.b's __init__, so that edge counts as well."""
    graph = {name: _imports(name) - {name} for name in MODULES}
    for name in MODULES:
        for target in list(graph[name]):
            parts = target.split(".")
            graph[name] |= {p for p in (".".join(parts[:k]) for k in range(1, len(parts)))
                            if p in MODULES and not name.startswith(p + ".") and p != name}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_no_module_takes_another_modules_private_names():
    """`from m import _x` or `m._x` from another module: the helper wants a public name, or a home both use."""
    bad = [f"{name}:{i.line} imports {i.module}.{i.name}" for name, found in IMPORTS.items() for i in found
           if i.name and i.name.startswith("_") and not i.name.startswith("__") and i.module != name]
    for name, path in MODULES.items():
        aliases = {}
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
            elif isinstance(node, ast.ImportFrom) and node.module:
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in MODULES})
        bad += [f"{name}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}" for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != name]
    assert not bad, "\n".join(bad)


# ----- files -----

def test_files_no_two_modules_share_a_file_name():
    """`incremental.py` in serving and in bench reads as one thing in tracebacks, greps and `-m` commands."""
    by_name = defaultdict(list)
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            by_name[path.name].append(name)
    assert not {file: names for file, names in by_name.items() if len(names) > 1}


def test_files_no_engine_folder_holds_more_than_12_modules():
    counts = {str(folder.relative_to(ROOT)): sum(p.name != "__init__.py" for p in folder.glob("*.py"))
              for folder in [ROOT / "engine", *(ROOT / "engine").rglob("*")] if folder.is_dir()}
    assert counts["engine/serving"] > 0
    assert not {folder: n for folder, n in counts.items() if n > MAX_MODULES_PER_FOLDER}


def test_files_source_files_stay_small():
    sizes = {path: len(path.read_text().splitlines()) for path in MODULES.values()}
    too_big = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_big, too_big


# ----- serving reaches the device through the pipeline's transfer functions ---------------------
TRANSFERS = {"engine.serving.transfer": {"to_device", "place"}}  # per request: to_device; set-up/refresh: place
PLACEMENT = "engine.serving.placement"  # a table's placement, once per table size (ScoringPipeline.table_rows)
DEVICE_FACTORIES = ("tensor", "as_tensor", "asarray")  # torch.<f>(host data, device=...) copies to the device


def _names_a_device(node: ast.AST) -> bool:
    """An expression that reads as a device: a name or attribute with 'device' in it, 'cuda...' / 'cpu', or
    torch.device(...). (`x.to(model.compute_dtype)` converts a dtype and is not a move.)"""
    if isinstance(node, ast.Name):
        return "device" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return "device" in node.attr.lower()
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.startswith("cuda") or node.value == "cpu"
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Attribute) and node.func.attr == "device"
    return False


def device_moves(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(enclosing function, line, call) of every call that moves data to a device: x.to(<device>, ...) or with
    non_blocking, x.cuda(), x.pin_memory(), torch.tensor / as_tensor / asarray(..., device=...)."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, keywords = node.func.attr, {k.arg: k.value for k in node.keywords}
            moves = (attr == "to" and (any(_names_a_device(a) for a in node.args) or "non_blocking" in keywords
                                       or ("device" in keywords))
                     or attr in ("cuda", "pin_memory")
                     or attr in DEVICE_FACTORIES and "device" in keywords)
            if moves:
                found.append((function, node.lineno, attr))
        for child in ast.iter_child_nodes(node):
            visit(child, function)
    visit(tree, "<module>")
    return found


def test_the_device_move_detector_sees_moves_and_not_dtype_casts():
    tree = ast.parse("def f(x, rows, model, device):\n"
                     "    a = x.to(device)\n    b = x.to(rows.device, non_blocking=True)\n    c = x.cuda()\n"
                     "    d = torch.tensor([0, 1], device=rows.device)\n    e = x.to('cuda:0')\n"
                     "    g = x.to(model.compute_dtype)\n    h = torch.zeros(3, device=device)\n"
                     "    k = x.to(x.dtype)\n")
    assert [line for _, line, _ in device_moves(tree)] == [2, 3, 4, 5, 6]


def test_serving_reaches_the_device_only_through_the_pipeline_transfer():
    """Per request, a serving module's host arrays go to the device in the pipeline's one pinned transfer
    (`to_device`); weights and item vectors move at set-up or refresh (`place`), tables through placement."""
    serving = [name for name in MODULES if name.startswith("engine.serving")]
    assert "engine.serving.pipeline" in serving and "engine.serving.incremental" in serving
    for name in serving:
        if name == PLACEMENT:
            continue
        allowed = TRANSFERS.get(name, set())
        bad = [(f, line, call) for f, line, call in device_moves(ast.parse(MODULES[name].read_text()))
               if f not in allowed]
        assert not bad, f"{name} moves data to the device outside the pipeline's transfer functions: {bad}"
    moves = {f for f, _, _ in device_moves(ast.parse(MODULES["engine.serving.transfer"].read_text()))}
    assert moves == TRANSFERS["engine.serving.transfer"]


# ----- tests -----

TEST_ROOMS = ("backbone", "encoding", "features", "kernels", "reliability", "scripts", "serving", "storage",
              "training")  # storage: weights/; scripts: the command line and bench; reliability: errors.md's claims
TEST_DATA = ("fixtures",)


def test_tests_live_in_room_folders():
    tests = ROOT / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(TEST_ROOMS) | set(TEST_DATA), "a folder under tests/ that is no test room"
    assert all((tests / room / "__init__.py").is_file() for room in TEST_ROOMS)
    assert not list((tests / "fixtures").rglob("*.py"))
    misplaced = [str(p.relative_to(ROOT)) for p in tests.rglob("test_*.py")
                 if p.parent.parent != tests and p != tests / "test_layout.py"
                 or p.parent.parent == tests and p.parent.name not in TEST_ROOMS]
    assert not misplaced, misplaced
    elsewhere = [str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("test_*.py")
                 if not (package == "bench" and p.parent == ROOT / "bench" and p.name.startswith("test_bench_"))]
    assert not elsewhere, "tests outside tests/ (bench/test_bench_*.py are the benchmark suites)"


# What makes a test slow: starting ranks (tests.multiprocess.torchrun, torch.multiprocessing's start_processes or
# spawn), loading the real SmolLM2 (prepare_smollm2), running the demo or a benchmark script's main end to end.
SLOW_CALLS = ("torchrun", "start_processes", "spawn", "prepare_smollm2", "run_demo", "bench.main")


def _needs_slow(tree: ast.Module) -> dict[str, str]:
    """test name -> the slow call it reaches, itself or through a module-level helper or fixture (a parameter
    named for one), for the test functions of `tree`."""
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    bench = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "bench"
             for a in n.names}

    def called(fn: ast.FunctionDef) -> set[str]:
        out = {a.arg for a in fn.args.args if a.arg in functions}
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                f = node.func
                out.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
                if isinstance(f, ast.Attribute) and f.attr == "main" and getattr(f.value, "id", None) in bench:
                    out.add("bench.main")
        return out

    def reason(name: str, seen: set[str]) -> str | None:
        seen.add(name)
        direct = called(functions[name])
        hit = next((c for c in SLOW_CALLS if c in direct), None)
        return hit or next((r for c in sorted(direct & set(functions) - seen) if (r := reason(c, seen))), None)

    return {name: r for name in functions if name.startswith("test_") and (r := reason(name, set()))}


def _marked_slow(tree: ast.Module, name: str) -> bool:
    module = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                 and "mark.slow" in ast.unparse(n.value) for n in tree.body)
    test = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return module or any("mark.slow" in ast.unparse(d) for d in test.decorator_list)


def test_tests_that_start_ranks_load_smollm2_or_run_scripts_end_to_end_are_marked_slow():
    found, unmarked = {}, []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        for name, why in _needs_slow(tree).items():
            found[f"{path.relative_to(ROOT)}::{name}"] = why
            if not _marked_slow(tree, name):
                unmarked.append(f"{path.relative_to(ROOT)}::{name} ({why})")
    assert found["tests/encoding/test_abe_sharded.py::test_three_ranks_equal_one_and_a_dead_rank_leaves_the_old_table"]
    assert {"torchrun", "start_processes", "prepare_smollm2", "run_demo", "bench.main"} <= set(found.values())
    assert not unmarked, "missing @pytest.mark.slow:\n" + "\n".join(unmarked)


if __name__ == "__main__":
    sys.exit("run with pytest: python -m pytest tests/test_layout.py")
