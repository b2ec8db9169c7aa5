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


# ----- serving reaches the device through the pipeline's transfer functions ---------------------
TRANSFERS = {"engine.serving.pipeline": {"to_device", "place"}}  # per request: to_device; set-up/refresh: place
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
    moves = {f for f, _, _ in device_moves(ast.parse(MODULES["engine.serving.pipeline"].read_text()))}
    assert moves == TRANSFERS["engine.serving.pipeline"]


def test_serving_modules_import_no_private_names():
    """The serving room shares state through public methods (ScoringPipeline), never another module's privates."""
    for name in (m for m in MODULES if m.startswith("engine.serving")):
        tree = ast.parse(MODULES[name].read_text())
        private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   for alias in node.names if alias.name.startswith("_")]
        assert not private, f"{name} imports private names {private}"
