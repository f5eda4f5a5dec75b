"""The package's shape: no import cycles, and the library imports nothing from benchmarks/."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "shortcut_jax")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def _imports(module: str, path: str, known: dict) -> set[str]:
    """Package modules ``module`` imports, at the top or inside functions alike."""
    found = set()
    is_package = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            # a submodule importing its own package's __init__ is not a cycle
            if name in known and name != module and not module.startswith(name + "."):
                found.add(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert "shortcut_jax.training.loop" in graph["shortcut_jax.main"]  # the walk sees imports inside functions
    assert _cycles(graph) == []
    # the checker finds a cycle when there is one
    graph["shortcut_jax.objectives.sampling"] = graph["shortcut_jax.objectives.sampling"] | {
        "shortcut_jax.training.loop"
    }
    assert any("shortcut_jax.objectives.sampling" in c for c in _cycles(graph))


def test_the_library_imports_nothing_from_benchmarks():
    for path in _modules().values():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "benchmarks":
                raise AssertionError(f"{path} imports {node.module}")
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "benchmarks" for a in node.names), path


COMMANDS = {
    f"shortcut_jax.{name}"
    for name in ("main", "sample", "encode", "evaluate", "import_official", "reflow_pairs", "fid_stats", "seeded_vae")
} | {"shortcut_jax.evaluation.train_classifier"}
# package -> what it may not import (beside the commands, which no library module imports)
FLOORS = {
    "shortcut_jax.models": (
        "shortcut_jax.infra",
        "shortcut_jax.objectives",
        "shortcut_jax.data",
        "shortcut_jax.evaluation",
        "shortcut_jax.training",
        "shortcut_jax.config_lib",
    ),
    "shortcut_jax.infra": (
        "shortcut_jax.models",
        "shortcut_jax.objectives",
        "shortcut_jax.data",
        "shortcut_jax.evaluation",
        "shortcut_jax.training",
        "shortcut_jax.config_lib",
    ),
    "shortcut_jax.objectives": (
        "shortcut_jax.data",
        "shortcut_jax.evaluation",
        "shortcut_jax.training",
        "shortcut_jax.config_lib",
    ),
    "shortcut_jax.data": (
        "shortcut_jax.objectives",
        "shortcut_jax.evaluation",
        "shortcut_jax.training",
        "shortcut_jax.config_lib",
    ),
    "shortcut_jax.evaluation": ("shortcut_jax.training", "shortcut_jax.config_lib"),
    "shortcut_jax.config_lib": ("shortcut_jax.training",),
}


def _floor_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if target in COMMANDS and module not in COMMANDS:
                out.append(f"{module} imports the command {target}")
            for package, banned in FLOORS.items():
                if module == package or module.startswith(package + "."):
                    for b in banned:
                        if target == b or target.startswith(b + "."):
                            out.append(f"{module} imports {target} from above its floor")
    return out


def test_each_floor_imports_only_from_its_floor_or_below():
    """models/ imports nothing outside models/; infra/ nothing but infra/; data/ nothing from
    objectives/ or training; objectives/ nothing from training, commands or evaluation; no library
    module imports a command."""
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert _floor_violations(graph) == []
    # the rule sees a violation when there is one
    graph["shortcut_jax.models.dit"] = graph["shortcut_jax.models.dit"] | {"shortcut_jax.config_lib"}
    graph["shortcut_jax.training.loop"] = graph["shortcut_jax.training.loop"] | {"shortcut_jax.evaluate"}
    assert len(_floor_violations(graph)) == 2
