"""sdrt's import graph, read from the sources (every import statement, those inside functions too).

    python -m tools.import_graph            # the graph between sdrt's packages
    python -m tools.import_graph --modules  # between modules

``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; importing
``a.b.c`` runs ``a/b/__init__`` first, which is not counted as an edge (a package's ``__init__``
that re-exports its submodules would otherwise always close a loop with them).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# sdrt's packages and the source folders they are installed from (pyproject's wheel.packages)
SOURCES = {"sdrt": REPO / "src" / "sdrt", "sdrt.runtime": REPO / "runtime", "sdrt.export": REPO / "export",
           "sdrt.benchmarks": REPO / "benchmarks"}


def modules() -> dict[str, Path]:
    """{module name: source file} for every sdrt module."""
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((package, *rel))] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The sdrt modules that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _executed(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _executed(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_executed(child)])
            continue
        yield node
        yield from _executed(node)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    """The concern a module belongs to: ``sdrt.runtime.sampling.noise`` -> ``runtime.sampling``."""
    parts = module.split(".")[1:]
    if not parts:
        return "sdrt"
    if parts[0] in ("runtime", "export", "benchmarks"):
        path = SOURCES[f"sdrt.{parts[0]}"].joinpath(*parts[1:2])
        return ".".join(parts[:2]) if len(parts) > 1 and path.is_dir() else parts[0]
    return "sdrt"


def package_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, targets in g.items():
        out.setdefault(package_of(a), set()).update(package_of(b) for b in targets if package_of(b) != package_of(a))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="module to module instead of package to package")
    args = parser.parse_args()
    g = graph()
    shown = g if args.modules else package_graph(g)
    for name in sorted(shown):
        print(f"{name} -> {', '.join(sorted(shown[name])) or '(nothing of sdrt)'}")
    found = cycles(g)
    print(f"cycles: {found if found else 'none'}")


if __name__ == "__main__":
    main()
