"""Lines of Python in ``pipeline/``, ``spar_core/`` and ``jobs/`` at one or more git revisions: all lines, and code
lines (not blank, not a comment line, not part of a docstring). The line figures of the architecture issue.

    python scripts/line_count.py                 # the working tree
    python scripts/line_count.py d97bbe4 HEAD    # each revision, read with git show (no checkout)
    python scripts/line_count.py -v HEAD         # per file too, largest first
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGES = ("pipeline", "spar_core", "jobs")


def count(source: str) -> tuple[int, int]:
    """(all lines, code lines) of one module's source."""
    lines = source.splitlines()
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    docstring_lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    code = sum(
        1
        for i, line in enumerate(lines, 1)
        if line.strip() and not line.strip().startswith("#") and i not in docstring_lines
    )
    return len(lines), code


def sources(rev: str | None) -> dict[str, str]:
    """path -> source of every .py file under PACKAGES, at ``rev`` (None: the working tree)."""
    if rev is None:
        paths = [p for pkg in PACKAGES for p in sorted(Path(pkg).rglob("*.py"))]
        return {str(p): p.read_text() for p in paths}
    listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, *PACKAGES],
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return {
        p: subprocess.run(["git", "show", f"{rev}:{p}"], capture_output=True, text=True, check=True).stdout
        for p in listing
        if p.endswith(".py")
    }


def main(argv: list[str]) -> None:
    verbose = "-v" in argv
    revs: list[str | None] = [a for a in argv if a != "-v"] or [None]
    for rev in revs:
        rows = sorted(((*count(src), path) for path, src in sources(rev).items()), reverse=True)
        if verbose:
            for total, code, path in rows:
                print(f"{total:6d} {code:6d}  {path}")
        total, code = sum(r[0] for r in rows), sum(r[1] for r in rows)
        print(f"{rev or 'working tree'}: {len(rows)} files, {total} lines, {code} code lines")


if __name__ == "__main__":
    main(sys.argv[1:])
