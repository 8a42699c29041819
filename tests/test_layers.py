"""tlkit's import layers (issue 13), read from the source with ast: no cycles, no imports of the package root,
lessons apart, every import going down a layer, a literal public API.

The graph functions are those of scripts/module_graph.py (``python scripts/module_graph.py`` prints the graph).
The first tests hold tlkit to the rules; the last ones run the graph functions and the checks on tiny fake
packages, so that each rule is seen to fail when broken.
"""

from __future__ import annotations

import ast
import importlib.util
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TLKIT = REPO / "tlkit"

_spec = importlib.util.spec_from_file_location("module_graph", REPO / "scripts" / "module_graph.py")
module_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(module_graph)
build_graph, cycles, layer_order, root_importers = module_graph.build_graph, module_graph.cycles, module_graph.layer_order, module_graph.root_importers

# The layers of issue 13, bottom to top: a module imports only modules of lower layers (lessons never each other).
LAYERS: dict[str, int] = {
    **dict.fromkeys(["_version", "params", "compare", "metrics", "_io", "_extras", "_runtime"], 0),  # basics: numbers, file writes
    **dict.fromkeys(["transforms", "results", "_cache"], 1), "models": 2,  # images, then the models that say how to normalise them
    **dict.fromkeys(["checkpoints", "data", "optim"], 3),  # optim: the optimizers the training loop builds
    "train": 4,  # the training loop
    **dict.fromkeys(["prefix_cache", "lr_finder"], 5),  # blocks several lessons share
    **dict.fromkeys(["features", "finetune", "augment", "imbalance", "incremental", "tuning"], 6),  # one module per lesson
    **dict.fromkeys(["recipes", "plots", "course", "notebook_params", "inference"], 7),  # on top: whole runs, figures, the course
    **dict.fromkeys(["widgets", "sweep", "predict", "lesson", "evaluation"], 8),  # the freeze panel draws with plots; sweeps, the CLI, scoring runs
    "tlkit": 9,  # the package root, which picks the public API
}
LOWER = {name for name, layer in LAYERS.items() if layer < 6}
LESSONS = {name for name, layer in LAYERS.items() if layer == 6}
TOP = {name for name, layer in LAYERS.items() if 6 < layer < LAYERS["tlkit"]}
MAX_PUBLIC_NAMES = 75


def _how(lazy: bool) -> str:
    return " (lazily)" if lazy else ""


def lesson_imports(graph: dict[str, dict[str, bool]]) -> list[str]:
    """Lesson modules that import another lesson module."""
    return [f"{module} imports {target}{_how(lazy)}" for module in sorted(LESSONS & set(graph))
            for target, lazy in sorted(graph[module].items()) if target in LESSONS]


def upward_imports(graph: dict[str, dict[str, bool]]) -> list[str]:
    """Modules below the lessons that import a lesson or a top module."""
    return [f"{module} imports {target}{_how(lazy)}" for module in sorted(LOWER & set(graph))
            for target, lazy in sorted(graph[module].items()) if target in LESSONS | TOP]


def imports_not_downward(graph: dict[str, dict[str, bool]]) -> list[str]:
    """Imports that do not go to a lower layer, and modules no layer names (a new module must be placed)."""
    unplaced = [f"{module} is in no layer of LAYERS" for module in sorted(set(graph) - set(LAYERS))]
    return unplaced + [f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]}){_how(lazy)}"
                       for module in sorted(set(graph) & set(LAYERS)) for target, lazy in sorted(graph[module].items())
                       if target in LAYERS and LAYERS[target] >= LAYERS[module]]


def bound_names(tree: ast.Module) -> set[str]:
    """The names a module binds at module level: imports, defs, classes, assignments (also in top-level if/try/for/with)."""
    names: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)  # `import a.b` binds a
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)  # its body is another scope
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif not isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):  # own scopes
            todo.extend(ast.iter_child_nodes(node))
    return names


def public_api_problems(source: str) -> list[str]:
    """What is wrong with a package root's ``__all__``: it must be one literal list of distinct string constants,
    at most MAX_PUBLIC_NAMES, each bound in the module."""
    tree = ast.parse(source)
    assignments = [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                   and any(isinstance(t, ast.Name) and t.id == "__all__" for t in getattr(node, "targets", [getattr(node, "target", None)]))]
    if len(assignments) != 1 or isinstance(assignments[0], ast.AugAssign):
        return [f"__all__ is assigned {len(assignments)} times at module level (want one literal list)"]
    value = assignments[0].value
    if not (isinstance(value, ast.List) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts)):
        return [f"__all__ is not a literal list of strings: {ast.unparse(value)[:80]}"]
    names = [element.value for element in value.elts]
    problems = []
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        problems.append(f"duplicates in __all__: {duplicates}")
    if len(names) > MAX_PUBLIC_NAMES:
        problems.append(f"__all__ has {len(names)} names (at most {MAX_PUBLIC_NAMES})")
    if unbound := sorted(set(names) - bound_names(tree)):
        problems.append(f"in __all__ but not bound in the module: {unbound}")
    return problems


# --- tlkit itself -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, bool]]:
    return build_graph(TLKIT)


def test_the_graph_reads_tlkit(graph):
    assert {"tlkit", "train", "data", "models"} <= set(graph)  # the rules below would pass vacuously on a wrong path
    assert "train" in graph["tlkit"]


def test_no_import_cycles_lazy_imports_included(graph):
    found = cycles(graph)
    assert not found, "import cycles (* only lazily):\n" + "\n".join(module_graph._chain(graph, cycle) for cycle in found)


def test_no_submodule_imports_the_package_root(graph):
    found = root_importers(graph, "tlkit")
    assert not found, f"modules importing the package root (import tlkit, from tlkit import NAME, from . import NAME): {found}"


def test_lessons_do_not_import_each_other(graph):
    found = lesson_imports(graph)
    assert not found, "lesson modules importing lesson modules:\n" + "\n".join(found)


def test_lower_layers_do_not_import_lessons_or_top_modules(graph):
    found = upward_imports(graph)
    assert not found, "lower layers importing lesson or top modules:\n" + "\n".join(found)


def test_every_module_has_a_layer_and_imports_only_lower_layers(graph):
    found = imports_not_downward(graph)
    assert not found, "imports that do not go down a layer (see LAYERS):\n" + "\n".join(found)


def test_public_api_is_a_literal_list_of_bound_names():
    problems = public_api_problems((TLKIT / "__init__.py").read_text(encoding="utf-8"))
    assert not problems, "tlkit/__init__.py:\n" + "\n".join(problems)


# --- the graph functions and the checks, on fake packages ---------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package folder root with a module name.py for each entry of files (sources dedented)."""
    root.mkdir()
    for name, source in files.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = write_package(tmp_path / "pkg", {"__init__": "", "a": "from .b import f\n", "b": "def f():\n    from .a import g\n"})
    graph = build_graph(pkg)
    assert graph["a"] == {"b": False} and graph["b"] == {"a": True}  # True: only lazily
    assert cycles(graph) == [["a", "b", "a"]]


def test_a_cycle_through_a_type_checking_import_is_found(tmp_path):
    pkg = write_package(tmp_path / "pkg", {
        "a": "from .b import x\n",
        "b": "import typing\nif typing.TYPE_CHECKING:\n    from .c import y\nelse:\n    import json\n",
        "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import z\n",
    })
    graph = build_graph(pkg)
    assert graph["b"] == {"c": True} and graph["c"] == {"a": True}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_an_eager_import_anywhere_makes_the_edge_eager(tmp_path):
    pkg = write_package(tmp_path / "pkg", {"a": "def f():\n    from .b import x\nclass C:\n    from .b import y\n", "b": ""})
    assert build_graph(pkg)["a"] == {"b": False}  # a class body runs at import time


def test_from_dot_import_of_a_submodule_counts_as_that_module(tmp_path):
    pkg = write_package(tmp_path / "pkg", {"__init__": "from . import x\n", "x": "from . import y\n", "y": ""})
    graph = build_graph(pkg)
    assert graph == {"pkg": {"x": False}, "x": {"y": False}, "y": {}}
    assert root_importers(graph, "pkg") == [] and cycles(graph) == []


def test_from_dot_import_of_a_name_counts_as_the_package_root(tmp_path):
    pkg = write_package(tmp_path / "pkg", {"__init__": "from .x import f\nfrom .y import thing\n", "x": "def f():\n    from . import thing\n",
                                           "y": "thing = 1\n"})
    graph = build_graph(pkg)
    assert graph["x"] == {"pkg": True}
    assert root_importers(graph, "pkg") == ["x"]
    assert cycles(graph) == [["pkg", "x", "pkg"]]  # the root imports x, so importing the root back is a cycle


def test_absolute_imports_of_modules_and_of_the_root(tmp_path):
    pkg = write_package(tmp_path / "pkg", {
        "a": "import pkg.b\nfrom pkg import c\nfrom pkg.d import z\nimport pkgextra\nfrom .. import other\n",
        "b": "import pkg\n",
        "c": "from pkg import name\n",
        "d": "import os, pkg.a as a2\n",
    })
    graph = build_graph(pkg)
    assert graph["a"] == {"b": False, "c": False, "d": False}
    assert graph["b"] == {"pkg": False} and graph["c"] == {"pkg": False} and graph["d"] == {"a": False}
    assert root_importers(graph, "pkg") == ["b", "c"]


def test_report_lists_modules_in_layer_order_then_cycles_and_root_importers(tmp_path, capsys):
    pkg = write_package(tmp_path / "pkg", {"__init__": "from .b import x\n", "b": "from .a import y\n", "a": "def f():\n    import json\n"})
    assert layer_order(build_graph(pkg)) == ["a", "b", "pkg"]
    assert module_graph.main(["--root", str(pkg)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "a   -> (none)", "b   -> a", "pkg -> b", "cycles: none", "imports the package root: none"]

    cyclic = write_package(tmp_path / "cyc", {"__init__": "from .a import f\n", "a": "from .b import g\n", "b": "def g():\n    from . import f\n"})
    assert module_graph.main(["--root", str(cyclic)]) == 0  # a report: cycles do not change the exit status
    out = capsys.readouterr().out
    assert "cycles:\n  a -> b -> cyc* -> a\n" in out and out.endswith("imports the package root: b\n")
    assert module_graph.main(["--root", str(cyclic), "--dot"]) == 0
    assert '"b" -> "cyc" [style=dashed, color=red];' in capsys.readouterr().out


def test_layer_checks_report_lessons_importing_lessons_and_upward_imports():
    graph = {"features": {"finetune": True, "train": False}, "finetune": {}, "train": {"plots": False, "data": False},
             "data": {"augment": True}, "recipes": {"features": False}, "augment": {}, "plots": {}}
    assert lesson_imports(graph) == ["features imports finetune (lazily)"]
    assert upward_imports(graph) == ["data imports augment (lazily)", "train imports plots"]
    graph["optim"], graph["mystery"] = {"train": False, "models": False}, {}
    assert imports_not_downward(graph) == [
        "mystery is in no layer of LAYERS", "data (layer 3) imports augment (layer 6) (lazily)",
        "features (layer 6) imports finetune (layer 6) (lazily)", "optim (layer 3) imports train (layer 4)",
        "train (layer 4) imports plots (layer 7)",
    ]


@pytest.mark.parametrize(("source", "problem"), [
    ("from .a import f\n__all__ = ['f']\n", None),
    ("import sys\n__all__ = sorted(n for n in globals() if not n.startswith('_'))\n", "not a literal list"),
    ("__all__ = ['f', 1]\nf = 0\n", "not a literal list"),
    ("from .a import f\n__all__ = ['f']\n__all__ += ['g']\n", "assigned 2 times"),
    ("from .a import f\n__all__ = ['f', 'f']\n", "duplicates in __all__: ['f']"),
    ("from .a import f\n__all__ = ['f', 'g']\n", "not bound in the module: ['g']"),
    ("from .a import *\nfrom .b import c as d\n__all__ = ['c']\n", "not bound in the module: ['c']"),
    ("\n".join(f"n{i} = {i}" for i in range(76)) + "\n__all__ = [" + ", ".join(f"'n{i}'" for i in range(76)) + "]\n", "76 names"),
])
def test_public_api_check(source, problem):
    problems = public_api_problems(source)
    assert problems == [] if problem is None else any(problem in p for p in problems), problems


def test_bound_names_cover_the_ways_a_module_binds_a_name():
    tree = ast.parse(textwrap.dedent("""
        import os.path
        import numpy as np
        from .x import a, b as c
        def f(): inner = 1
        class K: attr = 1
        V = W = 0
        X, (Y, Z) = 1, (2, 3)
        T: int = 1
        try:
            from .y import e
        except ImportError:
            e = None
        [comp for comp in range(2)]
    """))
    assert bound_names(tree) == {"os", "np", "a", "c", "f", "K", "V", "W", "X", "Y", "Z", "T", "e"}
