"""The package's import rule, checked on the source: layers import only downwards, and no module imports itself
back through a cycle.

    PYTHONPATH=src python -m pytest -q tests/test_layout.py

Every module under src/sarcasm_dpo is parsed with `ast`; every import counts, wherever it stands (top of the
file, inside a function, under TYPE_CHECKING), absolute or relative, and so does `importlib.import_module` or
`__import__` of a literal name.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from conftest import ROOT

PACKAGE = "sarcasm_dpo"

# The rule (README, "How the code is laid out" quotes it). Layers from the top down: a module may import modules
# of its own layer and of the layers below it, never of a layer above. Each entry names top-level names inside
# the package; a folder stands for everything in it; "*" is every other top-level module (and the package itself).
LAYERS = (
    ("entry point", ("__main__",)),  # `python -m sarcasm_dpo`, if it exists: the only importer of cli.py
    ("command line", ("cli",)),
    ("stages", ("stages",)),  # one module per CLI stage, and the stage registry
    ("training", ("training",)),  # trainers, callbacks, checkpoints, signals: what sft and dpo share
    ("task and infrastructure", ("*",)),  # data, prompts, scoring, metrics, ...; models, rundir, tracking, ...
)
# Imported by every layer. They live in the bottom layer, so that stays true only while they do (checked below).
SHARED = ("settings", "config", "errors", "run_context")

# Import cycles allowed: none. (A frozenset of module names here would excuse one; the test also fails when a
# listed cycle no longer exists, so such a list cannot go stale.)
KNOWN_CYCLES: dict[frozenset, str] = {}

SRC = ROOT / "src" / PACKAGE


@functools.cache
def modules() -> dict[str, tuple[Path, bool]]:
    """Module name relative to the package ("" for the package itself) -> (file, is a package)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    """Absolute dotted names each import in `tree` reaches; `package` is the importing module's package."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names += [f"{module}.{alias.name}" for alias in node.names]  # a submodule, or a name in `module`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                names.append(node.args[0].value)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names relative to the package, as in LAYERS)."""
    found = modules()
    graph = {}
    for name, (path, is_package) in found.items():
        absolute = ".".join(filter(None, (PACKAGE, name)))
        package = absolute if is_package else absolute.rpartition(".")[0]
        targets = set()
        for imported in _imported_names(ast.parse(path.read_text(), str(path)), package):
            if imported != PACKAGE and not imported.startswith(PACKAGE + "."):
                continue  # another library
            target = imported[len(PACKAGE) + 1:]
            while target and target not in found:  # `from .x import name`: the module x, not the name
                target = target.rpartition(".")[0]
            if target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def layer_of(module: str) -> int | None:
    """Index into LAYERS (0 is the top), or None for a module the rule does not place."""
    head, _, rest = module.partition(".")
    top_level_file = module == "" or not rest and not modules()[module][1]
    for index, (_, members) in enumerate(LAYERS):
        if head in members or "*" in members and top_level_file:
            return index
    return None


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def one_cycle(graph: dict[str, set[str]], component: frozenset[str]) -> str:
    """A readable path around a component: "a -> b -> a"."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:  # breadth-first inside the component, back to `start`
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return " -> ".join(paths[node] + [start])
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"{sorted(component)} is not a cycle")


def test_the_graph_sees_every_kind_of_import():
    """The parser itself: relative (one and two dots), absolute, inside functions, submodules by `from`."""
    tree = ast.parse("from . import errors\nfrom ..training import runtime\nfrom .x import name\n"
                     "def f():\n    import sarcasm_dpo.stages.sft\n    importlib.import_module('sarcasm_dpo.cli')\n")
    assert _imported_names(tree, "sarcasm_dpo.stages") == [
        "sarcasm_dpo.stages.errors", "sarcasm_dpo.training.runtime", "sarcasm_dpo.stages.x.name",
        "sarcasm_dpo.stages.sft", "sarcasm_dpo.cli"]
    graph = import_graph()
    # Known edges of today's tree, one per kind: a relative import, a `from ..` import and a function-level one.
    assert "errors" in graph["atomic"] and "atomic" in graph["stages.compare"]
    assert "training.checkpoints" in graph["stages.pipeline"]


def test_every_module_has_a_layer_and_the_shared_ones_are_at_the_bottom():
    unplaced = sorted(m for m in modules() if layer_of(m) is None)
    assert not unplaced, f"modules outside every layer of LAYERS (add them to a layer): {unplaced}"
    for name in SHARED:
        assert name in modules(), f"SHARED names {name}, which is not a module any more"
        assert layer_of(name) == len(LAYERS) - 1, f"{name} must stay in the bottom layer: every layer imports it"


def test_imports_point_down():
    graph = import_graph()
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in sorted(graph.items()) for target in sorted(targets)
              if layer_of(target) < layer_of(module)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycles_beyond_the_known_ones():
    graph = import_graph()
    found = cycles(graph)
    new = [one_cycle(graph, c) for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(new)
    gone = [f"{sorted(c)} ({why})" for c, why in KNOWN_CYCLES.items() if c not in found]
    assert not gone, "KNOWN_CYCLES lists cycles that no longer exist; delete them:\n" + "\n".join(gone)
