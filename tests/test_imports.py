"""The package's imports, read from its source: no cycles, and the tools a user runs after training
(predict, report, the demo, attention_maps) import neither the training loop nor the optimizer.

The graph is built with `ast` from every scratchvit/**/*.py, with the imports at module level and
inside functions alike (an import inside a function is still a dependency, only a later one):
- `from .x import y` and `import scratchvit.x` depend on module x; where y is itself a module
  (x is a package), on x.y too; `from . import x` depends on x where x is a module, else on the package;
- a cycle is a strongly connected component of two or more modules. A package's __init__ importing
  its own submodules is not a cycle with them: a submodule's import of a sibling is an edge to the
  sibling only, not to the package around it;
- what importing a module runs (the reachability test) also counts the __init__ of every package on
  the way to each module it imports, since Python runs those first.
"""
import ast
import pathlib

import pytest

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1] / "scratchvit"

TRAINING_ONLY = ("scratchvit.train", "scratchvit.optim")     # the training loop and the optimizer


def module_names(root):
    """{module name: path} for every .py file under the package folder `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_package(name, names):
    return names[name].name == "__init__.py"


def import_graph(root):
    """{module: set of the package's modules it imports by name}, from the source under `root`."""
    names = module_names(root)
    graph = {}
    for name, path in names.items():
        package = name if _is_package(name, names) else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = ".".join(base[:len(base) - (node.level - 1)])
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module
                submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in names]
                targets.update(submodules)
                if node.module or len(submodules) < len(node.names):   # names from the module itself, not only modules
                    targets.add(module)
        graph[name] = {target for target in targets if target in names and target != name}
    return graph


def cycles(graph):
    """The strongly connected components of two or more modules (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _with_packages(name):
    """`name` and every package above it: what `import name` runs."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)}


def imported_by(graph, start):
    """Every module that importing `start` runs (start included), following imports in function bodies too."""
    seen, todo = set(), sorted(_with_packages(start))
    while todo:
        name = todo.pop()
        if name in seen or name not in graph:
            continue
        seen.add(name)
        for target in graph[name]:
            todo.extend(_with_packages(target))
    return seen


def write_package(root, files):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# ------------------------------------------------------------------------------------------------
# the walker, on small packages written for the test

def test_the_walker_reads_every_kind_of_import(tmp_path):
    root = write_package(tmp_path / "pkg", {
        "__init__.py": "from .a import A\n",
        "a.py": "import os\nfrom . import b\nfrom .sub import c\n\ndef f():\n    from .sub.d import D\n",
        "b.py": "import pkg.sub\n",
        "sub/__init__.py": "X = 1\n",
        "sub/c.py": "from .. import b\nfrom ..sub import X\n",
        "sub/d.py": "from pkg import a as _\n"})
    graph = import_graph(root)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"},
                     "pkg.b": {"pkg.sub"}, "pkg.sub": set(), "pkg.sub.c": {"pkg.b", "pkg.sub"},
                     "pkg.sub.d": {"pkg", "pkg.a"}}
    assert imported_by(graph, "pkg.b") == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"}


def test_a_cycle_is_found_also_through_a_function_level_import(tmp_path):
    root = write_package(tmp_path / "pkg", {
        "__init__.py": "from .a import A\nfrom .b import B\n",     # a package importing its own modules: no cycle
        "a.py": "A = 1\n\ndef f():\n    from .c import C\n",
        "b.py": "from .a import A\nB = 2\n",
        "c.py": "C = 3\n"})
    assert cycles(import_graph(root)) == []
    (root / "c.py").write_text("C = 3\n\ndef g():\n    from . import b\n")      # a -> c -> b -> a
    assert cycles(import_graph(root)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_module_importing_names_from_its_own_package_is_a_cycle(tmp_path):
    root = write_package(tmp_path / "pkg", {"__init__.py": "from .a import A\nLIMIT = 3\n",
                                            "a.py": "from . import LIMIT\nA = LIMIT\n"})
    assert cycles(import_graph(root)) == [["pkg", "pkg.a"]]


# ------------------------------------------------------------------------------------------------
# scratchvit itself

GRAPH = import_graph(PACKAGE_ROOT)


def test_the_package_has_no_import_cycle():
    assert cycles(GRAPH) == []


def _user_facing():
    names = ["scratchvit.predict", "scratchvit.report", "scratchvit.attention_maps"]
    names += sorted(name for name in GRAPH if name == "scratchvit.demo" or name.startswith("scratchvit.demo."))
    return names


@pytest.mark.parametrize("module", _user_facing())
def test_predict_report_demo_and_attention_maps_import_no_training(module):
    assert module in GRAPH
    reached = imported_by(GRAPH, module)
    assert not reached & set(TRAINING_ONLY), f"{module} imports {sorted(reached & set(TRAINING_ONLY))}"


def test_the_user_facing_modules_are_all_there():
    """The list above names real modules: a renamed one would otherwise pass the test above by absence."""
    for name in ("scratchvit.predict", "scratchvit.report", "scratchvit.attention_maps", "scratchvit.demo",
                 "scratchvit.demo.api", "scratchvit.demo.server", "scratchvit.demo.__main__", *TRAINING_ONLY):
        assert name in GRAPH, name
