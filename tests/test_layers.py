"""The router's rooms and their layers: a room imports only rooms below it, no module imports itself back, and the
top level of `router/` stays small. Imports are read from the sources (function-level and TYPE_CHECKING ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROUTER = Path(__file__).resolve().parent.parent / "router"
# Bottom to top. A top-level module names its own layer: the base that every room may use, or the app on top.
LAYERS = ("base", "models", "pool", "pipeline", "api", "middleware", "app")
TOP_LEVEL = {"__init__": "base", "errors": "base", "settings": "base", "metrics": "base", "request_labels": "base",
             "loops": "base", "telemetry": "base", "app": "app", "__main__": "app"}
MAX_TOP_LEVEL = 12


def _module(path: Path) -> str:
    parts = path.relative_to(ROUTER).with_suffix("").parts
    return ".".join(("sie_router", *parts)).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module(path): path for path in ROUTER.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The router modules this file imports (`from sie_router.api import health` is the module `...api.health`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sie_router"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sie_router"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in known else node.module)
    return {name for name in found if name in known}


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if len(parts) == 2 and (ROUTER / f"{parts[1]}.py").is_file():
        return TOP_LEVEL[parts[1]]
    return parts[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_the_top_level_is_small_and_every_module_in_it_has_a_layer() -> None:
    top = sorted(path.stem for path in ROUTER.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"router/ has {len(top)} top-level modules: {top}; put them in a room"
    assert set(top) <= set(TOP_LEVEL), f"give {sorted(set(top) - set(TOP_LEVEL))} a layer in TOP_LEVEL, or a room"


def test_every_room_is_a_layer() -> None:
    rooms = {path.parent.name for path in ROUTER.glob("*/__init__.py")} - {"bundles"}
    assert rooms <= set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}"


def test_a_room_imports_only_rooms_below_it() -> None:
    upward = []
    for module, imported in _graph().items():
        for target in imported:
            here, there = _room(module), _room(target)
            if here != there and LAYERS.index(there) >= LAYERS.index(here):
                upward.append(f"{module} ({here}) imports {target} ({there})")
    assert not upward, "imports that go up or across:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_opens_with_a_docstring() -> None:
    missing = [name for name, path in _modules().items() if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, f"modules without an opening docstring: {sorted(missing)}"
