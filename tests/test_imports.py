"""No import circles among the package's modules: the graph of every import statement (module level and inside
functions, ``TYPE_CHECKING`` blocks included) between edgeff's modules, as installed (``cli/`` is
``edgeff.cli``, ``exporters/`` ``edgeff.exporters``, ``firmware_sim/`` ``edgeff.firmware_sim``), has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"edgeff": "edgeff", "cli": "edgeff.cli", "exporters": "edgeff.exporters", "firmware_sim": "edgeff.firmware_sim"}


def modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in ROOMS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import name`` counts as the submodule ``pkg.name``
    where there is one, else as ``pkg``)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root, targets in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(targets)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "edgeff.cli.app" in graph and "edgeff.edge.learner" in graph
    planted = {k: set(v) for k, v in graph.items()}
    planted["edgeff.names"].add("edgeff.presets")  # presets imports config, which imports names
    assert any("edgeff.names" in c for c in cycles(planted))


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_no_training_math_outside_the_runtimes() -> None:
    """The device and the exporters hold no optimizer step, loss or backward pass of their own: they call the
    edge runtime's learners (one numpy runtime)."""
    banned = ("backward", "loss", "softplus", "sigmoid", "adam", "sgd", "_update", "grad")
    for folder in ("firmware_sim", "exporters"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    assert not any(b in node.name.lower() for b in banned), f"{path.name}: {node.name}"
