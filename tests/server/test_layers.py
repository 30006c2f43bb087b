"""The server's layers, computed from its source (docs/architecture.md, "Rules").

Every import of an optreg.server module, at module level or inside a function, points
to the same layer or one below it, and the module graph has no cycle; no folder holds
more than a dozen modules.
"""
import ast
import pathlib

from conftest import ROOT

SRC = ROOT / "server" / "optreg" / "server"
# Lowest first: a module may import from its own layer and the ones before it.
LAYERS = ("model", "kernels", "storage", "steps", "sessions", "telemetry", "rpc", "dashboard", "assembly",
          "cluster", "cli", "__main__")
MAX_MODULES = 12


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("optreg", "server") + parts)] = path
    return out


def imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The optreg.server modules `name` imports (`from pkg import module` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a module named a.b
                target = target.rpartition(".")[0]
            if target and target != name and target != "optreg.server":
                found.add(target)
    return found


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) < 3:
        return -1  # optreg.server itself: empty
    return LAYERS.index(parts[2])


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in imports(name, path, known) if not name.startswith(t + ".")}  # not its own package
            for name, path in known.items()}


def test_every_module_sits_in_a_layer():
    unplaced = [n for n in modules() if len(n.split(".")) > 2 and n.split(".")[2] not in LAYERS]
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def test_imports_point_down_or_across_never_up():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))


def test_the_module_graph_has_no_cycle():
    edges = graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_folder_holds_more_than_a_dozen_modules():
    crowded = {}
    for folder in [SRC, *[p for p in SRC.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
        count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
        if count > MAX_MODULES:
            crowded[str(folder.relative_to(ROOT))] = count
    assert not crowded, crowded
