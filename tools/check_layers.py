"""Layer facts of the geoseg package, checked from the source (no import of geoseg): run in CI by tests/test_layers.py.

    python tools/check_layers.py [--graph]

1. No import cycle among geoseg modules (every import counts, module level or inside a function: a cycle
   through a lazy import is still a cycle a reader has to untangle).
2. Only the Ray engines (``geoseg.engines.ray`` for inference, ``geoseg.engines.ray_train`` for training)
   import ray.
3. No ``_private`` name imported from another module (``from geoseg.x import _y``).
4. No module over 600 lines.

Exits 1 and prints one line per violation; prints the facts and exits 0 otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "geoseg"
MAX_LINES = 600
RAY_MODULES = {"geoseg.engines.ray", "geoseg.engines.ray_train"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(geoseg module -> geoseg modules it imports, ray importers, private-name imports)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    ray_users: list[str] = []
    private: list[str] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node)
                targets = [src]
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:
                        targets.append(sub)  # ``from geoseg.io import store`` imports the module geoseg.io.store
                    elif a.name.startswith("_") and not a.name.startswith("__") and src.startswith("geoseg"):
                        private.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {a.name} from {src}")
            for t in targets:
                if t == "ray" or t.startswith("ray."):
                    ray_users.append(mod)
                # a module's own package __init__ runs first on any import of it; it is not a dependency edge
                if t.startswith("geoseg") and t in mods and t != mod:
                    graph[mod].add(t)
    return graph, sorted(set(ray_users)), private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_edge(a: str, b: str) -> bool:
    """``geoseg.x`` -> ``geoseg`` (or a parent package): importing a submodule runs its parents' ``__init__``."""
    return a.startswith(b + ".")


def check() -> tuple[list[str], dict]:
    mods = modules()
    graph, ray_users, private = imports(mods)
    # Edges into a parent package are Python's package mechanics, not layering; the parent's own imports of
    # its children are real edges (an ``__init__`` re-exporting its modules' public names).
    layered = {m: {t for t in ts if not _is_package_edge(m, t)} for m, ts in graph.items()}
    problems: list[str] = []
    for comp in cycles(layered):
        problems.append("import cycle: " + " <-> ".join(comp))
    for m in ray_users:
        if m not in RAY_MODULES:
            problems.append(f"{mods[m].relative_to(ROOT)}: imports ray (only {', '.join(sorted(RAY_MODULES))} may)")
    problems += [f"private name across modules: {p}" for p in private]
    sizes = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    for m, n in sorted(sizes.items()):
        if n > MAX_LINES:
            problems.append(f"{mods[m].relative_to(ROOT)}: {n} lines (at most {MAX_LINES})")
    facts = {"modules": len(mods), "edges": sum(len(v) for v in layered.values()), "ray_modules": ray_users,
             "largest": max(sizes.items(), key=lambda kv: kv[1]), "graph": layered}
    return problems, facts


def main(argv: list[str]) -> int:
    problems, facts = check()
    if "--graph" in argv:
        for m, ts in sorted(facts["graph"].items()):
            print(f"{m}: {', '.join(sorted(ts))}")
    for p in problems:
        print(p)
    if problems:
        return 1
    name, n = facts["largest"]
    print(f"ok: {facts['modules']} modules, {facts['edges']} import edges, no cycle; ray only in "
          f"{', '.join(facts['ray_modules'])}; no private name imported across modules; largest {name} ({n} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
