"""The package's imports point one way (DESIGN.md, "Layers").

Every module of ``src/medsynth`` is parsed with ``ast``; its imports (at module level and inside
functions, relative imports resolved; ``from package import name`` counts as importing the
submodule when ``name`` is one, else the package) make a graph of medsynth modules. Checked:

(a) no import circle among modules (no strongly connected component of two or more modules);
(b) no module imports a module of a higher layer, in the order
    cli > demo > api > recipes > inverse > services (diffusion, motion, evaluate, report) > nets > data > ground floor
    (training, runs, config, console, errors, seeds, latent_space, the package ``__init__``);
(c) the services of one layer do not import each other in a circle at the package level
    (``evaluate`` may use ``report``, but then ``report`` must not use ``evaluate``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import medsynth

SRC = Path(medsynth.__file__).parent
LAYERS = {  # top-level name under medsynth -> layer (higher imports lower)
    "cli": 8, "__main__": 8, "demo": 7, "api": 6, "plan": 6, "folds": 6, "recipes": 5, "inverse": 4,
    "diffusion": 3, "motion": 3, "evaluate": 3, "report": 3, "nets": 2, "data": 1,
    "training": 0, "runs": 0, "config": 0, "console": 0, "errors": 0, "seeds": 0, "latent_space": 0, "__init__": 0,
}


def module_name(path: Path) -> str:
    parts = ("medsynth", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The medsynth modules that module ``name`` imports, anywhere in its body."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import medsynth.data.io.x` -> the deepest module that exists
                target = target.rpartition(".")[0]
            if target.startswith("medsynth") and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more nodes (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in graph.get(node, ()):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
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


def test_every_module_has_a_layer():
    assert sorted({top(name) for name in MODULES} - set(LAYERS)) == []


def test_no_import_circle():
    assert circles(GRAPH) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets
                    if LAYERS.get(top(target), 0) > LAYERS.get(top(name), 0))
    assert upward == []


def test_services_of_one_layer_do_not_import_each_other_in_a_circle():
    packages: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        for target in targets:
            if top(name) != top(target) and LAYERS.get(top(name)) == LAYERS.get(top(target)):
                packages.setdefault(top(name), set()).add(top(target))
    assert circles(packages) == []


def test_the_walk_sees_function_level_and_relative_imports():
    # api imports the data preparation inside a function: the walk must see it.
    assert "medsynth.data.prepare" in GRAPH["medsynth.api"]
    assert "medsynth.recipes.base" in GRAPH["medsynth.recipes"]
