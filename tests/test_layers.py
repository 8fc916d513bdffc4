"""The package's layering, read from the source: imports point down, packages form no cycle, and
imports sit at the top of modules (inside functions only for optional dependencies).

Run as a script to print the import graph between src/animatediff's packages:
    python tests/test_layers.py
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "animatediff"

# Lowest first. A package may import from its own layer or below, never from above.
LAYERS: list[set[str]] = [
    {"errors", "schedule", "options", "processes"},  # plain data, error types; torch-free
    {"motion", "checkpoints", "video", "vae", "lora", "provenance"},  # models and files
    {"builtin"},  # the default model's files
    {"control", "pipeline"},  # sampling
    {"training"},
    {"world", "ui"},
    {"cli", "__main__"},
]
# Imported inside functions on purpose: optional extras, and the command line's heavy halves.
OPTIONAL = {"bitsandbytes", "wandb", "gradio", "playwright", "tensorboard", "deepspeed"}


def package_of(module: str) -> str | None:
    """`animatediff.pipeline.noise` -> "pipeline"; `animatediff.options` -> "options"."""
    parts = module.split(".")
    if parts[0] != "animatediff" or len(parts) < 2:
        return None
    exists = (SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").is_file()
    return parts[1] if exists else None  # a name the package root re-exports


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    if node.module is None or node.level and not node.module:
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level, i.e. not inside a function?) for every import."""
    module, tree = _module_name(path), ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        top = id(node) not in in_function
        if isinstance(node, ast.Import):
            found += [(a.name, top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(node, module, path.name == "__init__.py")
            found += [(n, top) for n in names]
    return found


def graph() -> dict[str, set[str]]:
    """package -> the packages it imports (within animatediff)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(SRC.rglob("*.py")):
        source = package_of(_module_name(path))
        if source is None:
            continue  # the package root re-exports names lazily
        for name, _ in imports(path):
            target = package_of(name)
            if target and target != source:
                edges[source].add(target)
    return edges


def module_graph() -> dict[str, set[str]]:
    """module -> the modules of animatediff it imports at module level."""
    paths = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in paths.items():
        for name, top in imports(path):
            parts = name.split(".")
            while parts and ".".join(parts) not in paths:
                parts.pop()  # `from .pack import pack` names pack.pack: the module is pack
            target = ".".join(parts)
            if top and target and target != module:
                edges[module].add(target)
    return edges


def test_modules_form_no_cycle():
    """Within packages too: no two modules import each other, directly or around a loop (a
    package's `__init__` re-exporting its modules is not a loop back into it)."""
    edges = module_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    loops: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt.startswith(node + ".") and node == nxt.rsplit(".", 1)[0]:
                continue  # a package's __init__ importing its own module
            if state.get(nxt) == 1:
                loops.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not loops, [" -> ".join(loop) for loop in loops]


def layer(package: str) -> int:
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    raise AssertionError(f"package {package!r} is in no layer: add it to LAYERS")


def test_every_import_points_down():
    upward = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in graph().items()
        for b in targets
        if layer(b) > layer(a)
    ]
    assert not upward, upward


def test_packages_form_no_cycle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, " -> ".join(cycle)


def test_imports_sit_at_the_top_of_modules():
    """Inside a function only an optional dependency may be imported (the CLI imports its
    heavy halves with importlib, after checking arguments)."""
    late = [
        f"{path.relative_to(SRC.parent)}: {name}"
        for path in sorted(SRC.rglob("*.py"))
        for name, at_top in imports(path)
        if not at_top and name.split(".")[0] not in OPTIONAL
    ]
    assert not late, late


if __name__ == "__main__":
    for source, targets in sorted(graph().items(), key=lambda kv: layer(kv[0])):
        print(f"{source:<12} (layer {layer(source)}) -> {', '.join(sorted(targets))}")
    sys.exit(0)
