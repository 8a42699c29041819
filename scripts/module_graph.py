"""Print tlkit's internal import graph, read from the source files with ast (tlkit itself is never imported).

    python scripts/module_graph.py [--root PATH] [--dot]

One line per module, ``module -> the modules of the package it imports``, in layer order (a module comes after
everything it imports), then the import cycles, then the modules that import the package root. Lazy imports (in a
function, or under ``if TYPE_CHECKING:``) count like module-level ones and are marked ``*``: a lazy import still
ties the two modules together. tests/test_layers.py checks the layer rules with these functions. The exit status
is always 0: this is a report, the tests are the gate.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

# module -> {module of the package it imports: True when it is imported only lazily}.
# The root (__init__.py) is named after the package, e.g. "tlkit".
Graph = dict[str, dict[str, bool]]

LEGEND = "module -> the modules it imports, in layer order (* only lazily: in a function or under TYPE_CHECKING)"


def module_files(root: Path) -> dict[str, Path]:
    """The package's modules (root/*.py) by name; ``__init__`` is named after the package."""
    root = root.resolve()
    return {root.name if path.stem == "__init__" else path.stem: path for path in sorted(root.glob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST, lazy: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under node, and whether it is lazy (runs only when a function is called, or never)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, lazy
        return
    # A class body runs at import time, so only functions make their imports lazy.
    lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children = [(child, True) for child in node.body] + [(child, lazy) for child in node.orelse]
    else:
        children = [(child, lazy) for child in ast.iter_child_nodes(node)]
    for child, child_lazy in children:
        yield from _imports(child, child_lazy)


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: set[str]) -> list[str]:
    """The package's modules one import statement loads; the package name stands for the root (``__init__``).

    A name that is not a module file (``from . import fit``, ``from tlkit import fit``, ``import tlkit``) can
    only come from the root, so it counts as importing the root.
    """

    def module_or_root(name: str) -> str:
        return name if name in modules else package

    if isinstance(node, ast.Import):
        parts = [alias.name.split(".") for alias in node.names]
        return [module_or_root(p[1]) if len(p) > 1 else package for p in parts if p[0] == package]
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != package:
            return []  # another library
        within = parts[1:]
    elif node.level == 1:
        within = node.module.split(".") if node.module else []
    else:
        return []  # `from .. import`: above the package
    if within:
        return [module_or_root(within[0])]
    return [module_or_root(alias.name) for alias in node.names]  # `from . import a, b`: each a module or a root name


def build_graph(root: Path) -> Graph:
    """Each module of the package at root -> the package's modules it imports (True: only lazily)."""
    package = root.resolve().name
    files = module_files(root)
    graph: Graph = {}
    for name, path in files.items():
        edges: dict[str, bool] = {}
        for node, lazy in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            for target in _targets(node, package, set(files)):
                if target != name:  # the root's own `from . import name`
                    edges[target] = edges.get(target, True) and lazy  # one eager import makes the edge eager
        graph[name] = edges
    graph.setdefault(package, {})  # imports of the root count even without an __init__.py
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The graph's strongly connected components (Tarjan), each sorted, a module's imports' components first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:  # node is the first of its component: pop the component
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def layers(graph: Graph) -> dict[str, int]:
    """Each module's layer: 0 if it imports nothing of the package, else one above the highest layer it imports.

    The modules of a cycle share one layer, so the order stays defined while cycles remain.
    """
    layer: dict[str, int] = {}
    for component in strongly_connected(graph):  # imported components come first, so their layers are known
        below = [layer[target] for module in component for target in graph[module] if target not in component]
        for module in component:
            layer[module] = 1 + max(below, default=-1)
    return layer


def layer_order(graph: Graph) -> list[str]:
    """The modules by layer, then by name: a topological order when there is no cycle."""
    layer = layers(graph)
    return sorted(graph, key=lambda module: (layer[module], module))


def _shortest_path(graph: Graph, start: str, goal: str, within: set[str]) -> list[str]:
    """The shortest import chain [start, ..., goal] through the modules in within (breadth first, names in order)."""
    previous = {start: start}
    queue = deque([start])
    while queue and goal not in previous:
        node = queue.popleft()
        for target in sorted(graph[node]):
            if target in within and target not in previous:
                previous[target] = node
                queue.append(target)
    path = [goal]
    while path[-1] != start:
        path.append(previous[path[-1]])
    return path[::-1]


def cycles(graph: Graph) -> list[list[str]]:
    """For each import that lies on a cycle, the shortest cycle through it, as [a, b, ..., a], each cycle once.

    All elementary cycles can run to thousands; one per import shows every import that keeps a cycle closed.
    """
    found: set[tuple[str, ...]] = set()
    for component in strongly_connected(graph):
        members = set(component)
        for source in component:
            for target in graph[source]:
                if target in members:  # self-imports are not in the graph, so this is a cycle of two or more
                    loop = [source, *_shortest_path(graph, target, source, members)[:-1]]
                    first = loop.index(min(loop))  # the same cycle found from another import starts at the same place
                    found.add(tuple(loop[first:] + loop[:first]))
    return [[*loop, loop[0]] for loop in sorted(found, key=lambda loop: (len(loop), loop))]


def root_importers(graph: Graph, package: str) -> list[str]:
    """The modules that import the package root (its __init__ imports them, so each such import is a cycle)."""
    return sorted(module for module, edges in graph.items() if package in edges)


def _chain(graph: Graph, modules: list[str]) -> str:
    """``a -> b* -> c``: * marks a module that the one before it imports only lazily."""
    marked = [modules[0]] + [f"{b}*" if graph[a][b] else b for a, b in zip(modules, modules[1:])]
    return " -> ".join(marked)


def report(graph: Graph, package: str) -> str:
    """The text report: the modules in layer order with their imports, the cycles, the root importers."""
    order = layer_order(graph)
    width = max(map(len, order))
    lines = [f"# {package}: {LEGEND}"]
    for module in order:
        imported = ", ".join(f"{t}*" if graph[module][t] else t for t in sorted(graph[module]))
        lines.append(f"{module:<{width}} -> {imported or '(none)'}")
    found = cycles(graph)
    lines += ["cycles:", *(f"  {_chain(graph, cycle)}" for cycle in found)] if found else ["cycles: none"]
    lines.append(f"imports the package root: {', '.join(root_importers(graph, package)) or 'none'}")
    return "\n".join(lines)


def dot(graph: Graph, package: str) -> str:
    """Graphviz dot: one row per layer (layer 0 at the bottom), dashed lazy imports, red imports on a cycle."""
    layer = layers(graph)
    on_cycle = {(a, b) for cycle in cycles(graph) for a, b in zip(cycle, cycle[1:])}
    lines = [f'digraph "{package}" {{', '  node [shape=box, fontname="Helvetica"];']
    for level in sorted(set(layer.values()), reverse=True):
        names = " ".join(f'"{module}"' for module in sorted(module for module in graph if layer[module] == level))
        lines.append(f"  {{ rank=same; {names} }}  // layer {level}")
    for source in layer_order(graph):
        for target in sorted(graph[source]):
            style = (["style=dashed"] if graph[source][target] else []) + (["color=red"] if (source, target) in on_cycle else [])
            lines.append(f'  "{source}" -> "{target}"' + (f" [{', '.join(style)}]" if style else "") + ";")
    lines.append("}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print tlkit's internal module import graph (read with ast).")
    default_root = Path(__file__).resolve().parent.parent / "tlkit"
    parser.add_argument("--root", type=Path, default=default_root, help="the package folder (default: tlkit next to scripts/)")
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot instead (dashed: lazy import, red: on a cycle)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not module_files(root):
        print(f"no modules (*.py) in {root}", file=sys.stderr)
        return 0
    graph = build_graph(root)
    print(dot(graph, root.name) if args.dot else report(graph, root.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
