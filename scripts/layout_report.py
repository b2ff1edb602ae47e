"""Figures for the pipeline/ layout: lines per module, largest functions, internal imports (top-level vs inside
functions), import cycles, ``Any`` annotations. Used for the before/after table of the reshaping.

    uv run python scripts/layout_report.py [pipeline]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _resolve(target: str, mods: dict[str, Path]) -> str | None:
    while target:
        if target in mods:
            return target
        target = target.rpartition(".")[0]
    return None


def imports(path: Path, mods: dict[str, Path], pkg: str) -> tuple[set[str], set[str], int, int]:
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    every: set[str] = set()
    n_top = n_lazy = 0
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        internal = [m for m in (_resolve(n, mods) for n in names) if m and m.split(".")[0] == pkg]
        if not internal:
            continue
        every.update(internal)
        is_top = node in tree.body or any(
            node in getattr(b, "body", []) for b in tree.body if isinstance(b, ast.If)
        )
        if is_top:
            n_top += 1
            top.update(internal)
        else:
            n_lazy += 1
    return top, every, n_top, n_lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(pkg: str = "pipeline") -> None:
    root = Path(pkg)
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    all_graph: dict[str, set[str]] = {}
    tot_top = tot_lazy = n_any = 0
    funcs: list[tuple[int, str]] = []
    rows = []
    for name, path in mods.items():
        text = path.read_text()
        top, every, n_top, n_lazy = imports(path, mods, pkg)
        graph[name] = {m for m in top if m != name and not name.startswith(m + ".") and m != pkg}
        all_graph[name] = {m for m in every if m != name and not name.startswith(m + ".") and m != pkg}
        tot_top += n_top
        tot_lazy += n_lazy
        n_any += text.count("Any")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                funcs.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
        rows.append((len(text.splitlines()), name))
    print(f"modules: {len(mods)}, lines: {sum(r[0] for r in rows)}")
    for n, name in sorted(rows, reverse=True)[:12]:
        print(f"  {n:6d}  {name}")
    print("largest functions:")
    for n, name in sorted(funcs, reverse=True)[:8]:
        print(f"  {n:6d}  {name}")
    print(f"internal imports: {tot_top} top-level, {tot_lazy} inside functions")
    print(f"'Any' occurrences: {n_any}")
    cyc = cycles(graph)
    print(f"import cycles among top-level imports: {len(cyc)} {cyc}")
    cyc = cycles(all_graph)
    print(f"import cycles counting imports inside functions: {len(cyc)} {cyc}")


if __name__ == "__main__":
    main(*sys.argv[1:])
