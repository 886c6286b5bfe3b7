"""The import layers of ARCHITECTURE.md, read from the source: every `import` of a cirlab module, including
the ones inside functions, must point to its own layer or one below, and no modules may import each other
round in a cycle."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module belongs to the first layer with a prefix of its name.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cirlab.files", "cirlab.config", "cirlab.devices"),
    ("cirlab.data",),                                  # readers and generators: know no image pipeline
    ("cirlab.images", "cirlab.image_batches"),         # decoding, preprocessing, pixel batches, cached maps
    ("cirlab.encoders",),
    ("cirlab.masks",),
    ("cirlab.models", "cirlab.losses"),                # methods: know no dataset format
    ("cirlab.acceleration", "cirlab.checkpoint", "cirlab.distributed", "cirlab.evaluate", "cirlab.explain",
     "cirlab.provenance", "cirlab.report", "cirlab.selection", "cirlab.train", "cirlab.dataset_check", "cirlab.demo"),
    ("cirlab.index",),                                 # loads checkpoints to embed a gallery; knows no web
    ("cirlab.serve",),
    ("cirlab.cli", "cirlab.__main__"),
)
# (importer, imported) prefixes refused whatever the layers: encoders and methods know no dataset format
# (the image pipeline's `DataFormatError` is the one thing below them that data defines), and the index and
# the server never train.
NEVER = {("cirlab.encoders", "cirlab.data"), ("cirlab.masks", "cirlab.data"), ("cirlab.models", "cirlab.data"),
         ("cirlab.index", "cirlab.train"), ("cirlab.serve", "cirlab.train")}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The cirlab modules `path` imports anywhere in its body (`from cirlab.x import y` counts as
    cirlab.x.y when that is a module, else as cirlab.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
    return {name for name in found if name in modules}


@functools.cache
def parsed_graph() -> dict[str, frozenset[str]]:
    paths = sorted((SOURCE / "cirlab").rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): frozenset(imported_modules(path, modules) - {module_name(path)}) for path in paths}


def import_graph() -> dict[str, set[str]]:
    """Module -> the cirlab modules it imports (a fresh copy each call, for the tests to alter)."""
    return {module: set(imported) for module, imported in parsed_graph().items()}


def layer_of(module: str) -> int:
    if module == "cirlab":  # the package's __init__ sits on top of everything
        return len(LAYERS)
    for rank, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            if layer_of(target) > layer_of(importer):
                found.append(f"{importer} imports {target}, a layer above it")
            if any(within(importer, a) and within(target, b) for a, b in NEVER):
                found.append(f"{importer} imports {target}, which it must never use")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_the_layers() -> None:
    assert layer_violations(import_graph()) == []


def test_no_modules_import_each_other_in_a_cycle() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(("importer", "target"), [
    ("cirlab.data.css", "cirlab.encoders.image"),
    ("cirlab.data.fashioniq", "cirlab.models.tirg"),
    ("cirlab.models.offset", "cirlab.data.garments"),
    ("cirlab.index.build", "cirlab.serve.app"),
    ("cirlab.serve.app", "cirlab.train"),
    ("cirlab.index.build", "cirlab.train"),
])
def test_a_bad_import_is_caught(importer: str, target: str) -> None:
    graph = import_graph()
    graph[importer] = graph[importer] | {target}
    assert any(line.startswith(f"{importer} imports {target}") for line in layer_violations(graph))


def test_a_cycle_is_caught() -> None:
    graph = import_graph()
    graph["cirlab.encoders.base"] = graph["cirlab.encoders.base"] | {"cirlab.encoders.clip"}
    assert ["cirlab.encoders.base", "cirlab.encoders.clip"] in cycles(graph)


def test_imports_inside_functions_count(tmp_path: Path) -> None:
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from cirlab.models.tirg import TIRG\n    import cirlab.index.base\n")
    assert imported_modules(module, {"cirlab.models.tirg", "cirlab.index.base"}) == {"cirlab.models.tirg",
                                                                                       "cirlab.index.base"}
