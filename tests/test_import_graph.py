"""The package's imports run one way and never in a circle: graph.ir <- ops <- graph (the rest)
<- partition <- runtime <- cluster <- the CLI and the package's front door, no module
reaches itself through its imports, and none imports another's private (``_x``) names.
Every import counts, function-level ones included; read from the source (ast), so nothing
is imported to check it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "bench", "examples"}
LAYERS = ["graph.ir", "ops", "graph", "partition", "runtime", "cluster"]   # then the rest


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or rel.parts[0].startswith("."):
            continue
        parts = list(rel.parts[:-1]) + ([] if path.name == "__init__.py" else [path.stem])
        found[".".join(["shardgrad", *parts])] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from m import name`` counts as m.name when
    that is a module, else m)."""
    edges = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                out.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names)
        edges[name] = {m for m in out if m in mods and m != name}
    return edges


def layer(module: str) -> int:
    rest = module.removeprefix("shardgrad.")
    for i, prefix in enumerate(LAYERS):
        if rest == prefix or rest.startswith(prefix + "."):
            return i
    return len(LAYERS)


def test_imports_only_point_down_the_layers():
    edges = imports(modules())
    assert len(edges) > 40 and "shardgrad.runtime.train" in edges
    upward = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs if layer(b) > layer(a))
    assert not upward, upward
    assert not any(b.startswith("shardgrad.cluster") for a, bs in edges.items()
                   if a.startswith("shardgrad.runtime") for b in bs)


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """The circles a depth-first walk meets (each as a path that ends where it starts)."""
    found, seen, stack = [], {}, []

    def visit(v):
        seen[v] = "open"
        stack.append(v)
        for w in sorted(deps.get(v, ())):
            if seen.get(w) == "open":
                found.append(stack[stack.index(w):] + [w])
            elif w not in seen:
                visit(w)
        stack.pop()
        seen[v] = "done"

    for v in sorted(deps):
        if v not in seen:
            visit(v)
    return found


def test_no_import_cycles():
    edges = imports(modules())
    # A package's __init__ re-exporting its own submodule is how a package presents its
    # parts (graph.nn exports nn.resnet's ResNet); every other edge is a dependency.
    deps = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in edges.items()}
    assert not cycles(deps), [" -> ".join(c) for c in cycles(deps)]


def test_the_checker_sees_function_level_imports_and_cycles():
    """The checker itself: a function-level import is an edge, and a circle is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    edges = imports(modules())
    assert "shardgrad.runtime.world" in edges["shardgrad.cli"]    # inside cmd_train
    assert layer("shardgrad.graph.ir") < layer("shardgrad.ops.shape") < layer(
        "shardgrad.graph.autodiff") < layer("shardgrad.partition.plan") < layer(
        "shardgrad.runtime.world") < layer("shardgrad.cluster.ray_launch") < layer(
        "shardgrad.cli")


# Private names another module may still import, as (importer, name), each with its reason.
PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def test_no_module_imports_another_modules_private_names():
    """What a second module needs of one is public and documented: no ``from m import _x``
    across modules (function-level imports too), beyond PRIVATE_IMPORTS."""
    mods = modules()
    found = set()
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shardgrad"):
                found.update((name, f"{node.module}.{a.name}") for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__"))
    assert found <= PRIVATE_IMPORTS, sorted(found - PRIVATE_IMPORTS)
