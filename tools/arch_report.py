"""The architecture's figures, measured from the source (issue #22):
import cycles, upward imports, private names used across modules, the
longest functions, module sizes, and the lint and type-check counts.

    python tools/arch_report.py            # table on stdout
    python tools/arch_report.py --json F   # and the figures as JSON

``tests/test_layering.py`` asserts the first three are zero, with the same
code.  Rules, so the figures mean something:

- **Imports** are every ``import`` / ``from`` statement in a module, lazy ones
  inside functions included (a lazy import is still a dependency).
- **Layers** (:data:`LAYERS`), lowest first: a module may import its own
  layer and the ones below.  ``zero_sf/__init__.py`` (the facade) and the
  alias modules of old names sit on top.
- **A private cross-module access** is ``obj._name`` (or ``from m import
  _name``) in one zero_sf module, where ``_name`` is not defined in that
  module but is defined in another zero_sf module (a function, class,
  method or ``self._name`` attribute) and ``obj`` is not ``self``, ``cls`` or
  ``super()`` (a subclass may use its base's protected API).  Dunders do
  not count; neither do
  private names of torch or DeepSpeed (those are integration costs,
  counted apart as ``foreign_private``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "zero_sf"

# Lowest first.  A module's layer is that of the longest prefix listed.
LAYERS: list[tuple[str, list[str]]] = [
    ("math and formats", ["zero_sf.spec", "zero_sf.storage", "zero_sf.layout"]),
    ("backends", ["zero_sf.kernels", "zero_sf.cpu", "zero_sf.dtensor"]),
    ("dispatch", ["zero_sf.dispatch"]),
    ("single-device optimizers", ["zero_sf.optim"]),
    ("sharding", ["zero_sf.sharding"]),
    ("checkpoints and modes", ["zero_sf.checkpoint", "zero_sf.modes", "zero_sf.export"]),
    ("integrations", ["zero_sf.integrations"]),
    ("facade, self-check, aliases", ["zero_sf.check", "zero_sf.deepspeed", "zero_sf.functional",
                                     "zero_sf.sharding.layout", "zero_sf.kernels.launch", "zero_sf"]),
]


def layer_of(module: str) -> int:
    best, rank = -1, len(LAYERS)
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    rel: str  # path relative to the tree's root
    imports: list[tuple[str, int]] = field(default_factory=list)  # (module, line)


def modules(root: Path = ROOT) -> dict[str, Module]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        text = path.read_text()
        out[name] = Module(name, path, ast.parse(text), len(text.splitlines()),
                           str(path.relative_to(root)))
    for m in out.values():
        m.imports = _imports(m, out)
    return out


def _imports(m: Module, known: dict[str, Module]) -> list[tuple[str, int]]:
    is_pkg = m.path.name == "__init__.py"
    here = m.name.split(".") if is_pkg else m.name.split(".")[:-1]
    found = []
    for node in ast.walk(m.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                    found.append((_known_prefix(a.name, known), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            for a in node.names:  # ``from . import functional`` names a module
                sub = f"{target}.{a.name}"
                found.append((sub if sub in known else _known_prefix(target, known), node.lineno))
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: an edge too
    # (the root facade aside), or a cycle through a package's __init__ hides.
    for t, line in list(found):
        parts = t.split(".")
        for k in range(2, len(parts)):
            found.append((".".join(parts[:k]), line))
    return [(t, line) for t, line in dict.fromkeys(found) if t != m.name
            and not m.name.startswith(t + ".")]


def _known_prefix(name: str, known: dict[str, Module]) -> str:
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def import_graph(mods: dict[str, Module]) -> dict[str, set[str]]:
    return {m.name: {t for t, _ in m.imports} for m in mods.values()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), the
    facade ``zero_sf`` left out: it imports everything by design, and a
    submodule's ``from .. import x`` resolves to the submodule x."""
    g = {k: {t for t in v if t != PACKAGE} for k, v in graph.items() if k != PACKAGE}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward_imports(mods: dict[str, Module]) -> list[str]:
    out = []
    for m in mods.values():
        for target, line in m.imports:
            if layer_of(target) > layer_of(m.name):
                out.append(f"{m.rel}:{line}: {m.name} "
                           f"({LAYERS[layer_of(m.name)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]})")
    return out


def _private_defs(m: Module) -> set[str]:
    names = set()
    for node in ast.walk(m.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _own(value: ast.expr) -> bool:
    """``self.x`` / ``cls.x`` / ``super().x``."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id == "super")


# torch.Tensor's own private attributes (``p._version``): torch's, not ours
_TENSOR_PRIVATE = {"_version", "_base", "_cdata", "_local_tensor", "_spec"}


def private_accesses(mods: dict[str, Module]) -> tuple[list[str], list[str]]:
    """(zero_sf's private names used in another zero_sf module, private
    names of other libraries used in zero_sf)."""
    defs = {name: _private_defs(m) for name, m in mods.items()}
    everywhere = set().union(*defs.values())
    ours, foreign = [], []
    for m in mods.values():
        seen = set()
        for node in ast.walk(m.tree):
            names = []
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                if _own(node.value):  # a subclass using its base's protected API
                    continue
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
            for n in names:
                if not n.startswith("_") or n.startswith("__") or n in defs[m.name]:
                    continue
                where = f"{m.rel}:{node.lineno}: {n}"
                if where in seen:
                    continue
                seen.add(where)
                (ours if n in everywhere and n not in _TENSOR_PRIVATE else foreign).append(where)
    return ours, foreign


def functions(mods: dict[str, Module]) -> list[tuple[int, str]]:
    out = []
    for m in mods.values():
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                out.append((n, f"{m.name}.{node.name}"))
    return sorted(out, reverse=True)


def _tool_count(cmd: list[str], pattern: str) -> Optional[int]:
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = r.stdout + r.stderr
    if r.returncode == 0:
        return 0
    found = re.search(pattern, text)
    return int(found.group(1)) if found else None


def lint_counts() -> dict[str, Optional[int]]:
    """ruff and mypy findings in zero_sf (``make lint``'s rules)."""
    py = sys.executable
    return {
        # the rule set of pyproject.toml spelled out, so that a tree without
        # that configuration (before issue #22) is measured the same way
        "ruff": _tool_count([py, "-m", "ruff", "check", "--select", "F,E,W,B,I",
                             "--line-length", "100", PACKAGE], r"Found (\d+) error"),
        "mypy": _tool_count([py, "-m", "mypy", "--check-untyped-defs",
                             "--ignore-missing-imports", PACKAGE], r"Found (\d+) error"),
    }


def report(with_lint: bool = True) -> dict:
    mods = modules()
    graph = import_graph(mods)
    ours, foreign = private_accesses(mods)
    sizes = sorted(((m.lines, m.name) for m in mods.values()), reverse=True)
    out = {
        "cycles": cycles(graph),
        "upward_imports": upward_imports(mods),
        "private_cross_module": ours,
        "foreign_private": len(foreign),
        "longest_functions": functions(mods)[:6],
        "largest_modules": sizes[:6],
        "modules": len(mods),
        "lines": sum(m.lines for m in mods.values()),
    }
    if with_lint:
        out.update(lint_counts())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--no-lint", action="store_true")
    args = ap.parse_args()
    r = report(with_lint=not args.no_lint)
    print(f"modules: {r['modules']}, lines: {r['lines']}")
    print(f"import cycles: {len(r['cycles'])}")
    for c in r["cycles"]:
        print("   ", " <-> ".join(c))
    print(f"upward imports: {len(r['upward_imports'])}")
    for u in r["upward_imports"]:
        print("   ", u)
    print(f"private cross-module accesses: {len(r['private_cross_module'])}")
    for p in r["private_cross_module"]:
        print("   ", p)
    print(f"private names of torch/DeepSpeed used: {r['foreign_private']}")
    print("longest functions:", ", ".join(f"{n} {f}" for n, f in r["longest_functions"]))
    print("largest modules:", ", ".join(f"{n} {f}" for n, f in r["largest_modules"]))
    if "ruff" in r:
        print(f"ruff findings: {r['ruff']}, mypy errors: {r['mypy']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
