"""The declared dependencies are the imported ones: every third-party module the package imports is
declared (in ``dependencies``, or an extra where it is optional), and every declared one is imported."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("edgeff", "cli", "exporters", "firmware_sim")
DIST = {"PIL": "pillow", "serial": "pyserial"}  # import name -> distribution, where they differ


def imported() -> dict[str, set[str]]:
    """Top-level third-party modules imported by the package -> the files importing them."""
    found: dict[str, set[str]] = {}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    top = name.split(".")[0]
                    if top != "edgeff" and top not in sys.stdlib_module_names:
                        found.setdefault(DIST.get(top, top), set()).add(str(path.relative_to(ROOT)))
    return found


def declared() -> tuple[set[str], dict[str, set[str]]]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", text, re.DOTALL | re.MULTILINE)
    assert block
    name = lambda spec: re.split(r"[<>=!~ \[]", spec.strip().strip('"'))[0].lower()
    core = {name(s) for s in re.findall(r'"([^"]+)"', block.group(1))}
    extras = {m.group(1): {name(s) for s in re.findall(r'"([^"]+)"', m.group(2))}
              for m in re.finditer(r'^(\w+) = \[(.*?)\]', text.split("[project.optional-dependencies]")[1]
                                   .split("[project.scripts]")[0], re.MULTILINE)}
    return core, extras


def test_every_import_is_declared_and_every_dependency_imported() -> None:
    used = imported()
    core, extras = declared()
    optional = extras["plot"]
    undeclared = {m: sorted(f) for m, f in used.items() if m.lower() not in core | optional}
    assert not undeclared, f"imported but not declared: {undeclared}"
    unused = core - {m.lower() for m in used}
    assert not unused, f"declared but never imported: {unused}"


def test_the_edge_requirements_hold_no_torch() -> None:
    reqs = {re.split(r"[<>=!~ ]", line)[0].lower() for line in (ROOT / "requirements-edge.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert "torch" not in reqs and {"numpy", "onnxruntime", "pyserial", "typer", "rich"} <= reqs
