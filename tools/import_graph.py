"""The import graph of ``src/breastfusion``: cycles between modules and imports that run up the layers.

Every ``src/breastfusion/**/*.py`` is parsed with :mod:`ast` (nothing is imported or run) and each import of a
``breastfusion`` module is an edge, wherever it stands (module level, inside a function, under ``if``/``try``):

* ``import breastfusion.x.y`` and ``from breastfusion.x.y import name``: an edge to ``breastfusion.x.y``;
* ``from breastfusion.x import y`` where ``breastfusion/x/y.py`` (or ``y/``) exists: an edge to ``breastfusion.x.y``;
  ``from breastfusion.x import name`` (a function, a class, a constant): an edge to ``breastfusion.x``;
* relative imports are resolved against the importing module's package;
* ``importlib.import_module("breastfusion.x.y")`` with a literal name counts too (a computed name cannot be seen);
* importing a package ``breastfusion.x`` means importing ``breastfusion/x/__init__.py`` only (the parents'
  ``__init__`` that Python also runs are not edges: they would tie every module to its package).

Two checks:

* **cycles**: strongly connected components of more than one module; each is printed with its edges
  ``a -> b (line N)``, N being the line of the import in ``a``;
* **layers**: each module belongs to the layer of its top-level name under ``breastfusion`` (a folder or a
  module; the package's own ``__init__`` is ``"__init__"``), :data:`LAYERS` listing them bottom first. A module
  may import its own layer and those below, never one above. A top-level name absent from :data:`LAYERS` is an
  error: add it there.

:data:`KNOWN` lists the edges (``(importer, imported)``) that are known to break a rule today and are tolerated
until they are removed. Every other cycle edge or layer violation fails the check, and so does an entry of
:data:`KNOWN` that no longer breaks a rule (the edge is gone, or no longer in a cycle and no longer upward):
remove it, so the list only shrinks.

Usage: ``python tools/import_graph.py`` (report; exit status 1 on any failure), ``python tools/import_graph.py
--json`` (the graph, cycles and violations as JSON). ``tests/test_import_graph.py`` runs the check on the tree.
Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "breastfusion"
SRC = Path(__file__).resolve().parents[1] / "src"

#: Top-level names under ``breastfusion``, bottom layer first. Same-layer imports are allowed.
LAYERS: list[list[str]] = [
    ["errors", "utils", "version", "missing", "distributed", "devices"],
    ["config"],
    ["data"],
    ["features", "models", "tabular_inputs"],
    ["bundles"],  # bundle folders: write, load, integrity seal, model card
    ["segmentation", "training"],
    ["inference", "evaluation", "explain"],  # to be refined by the redesign
    ["tasks", "experiment", "run_state"],
    ["serve", "demo"],
    ["cli", "__init__"],  # __init__: the package's face (import breastfusion as bf), names imported on first use
]

#: Edges (importer, imported) that break a rule today and are tolerated until removed. An entry that no longer
#: breaks a rule fails the check (remove it): this list only shrinks.
KNOWN: set[tuple[str, str]] = set(  # none left today (a set: an empty {} would be a dict)
    # -- cycles (every edge inside one) --
    # -- layer violations (a lower layer importing a higher one) --
)

Edge = tuple[str, str]


# -- the graph -------------------------------------------------------------------------------------------------

@dataclass
class Graph:
    """``files``: module -> its file; ``edges``: importer -> {imported: [line, ...]} (each list sorted)."""

    files: dict[str, Path]
    edges: dict[str, dict[str, list[int]]]

    def lines(self, a: str, b: str) -> list[int]:
        return self.edges.get(a, {}).get(b, [])


def module_name(path: Path, src: Path) -> str:
    """``src/breastfusion/data/images.py`` -> ``breastfusion.data.images``; a package's ``__init__.py``: the package."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``src``: name -> file, sorted by name."""
    root = src / package
    if not (root / "__init__.py").is_file():
        raise FileNotFoundError(f"no package '{package}' under {src}")
    files = {module_name(p, src): p for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    return dict(sorted(files.items()))


def _is_package(name: str, files: Mapping[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def _existing(name: str, files: Mapping[str, Path]) -> str:
    """The module ``name`` names, or its longest existing prefix (a name the tree does not have: an attribute)."""
    while name not in files and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _relative_base(importer: str, level: int, files: Mapping[str, Path]) -> str | None:
    """The package a relative import of ``level`` dots in ``importer`` starts from (None: above the top)."""
    parts = importer.split(".")
    if not _is_package(importer, files):
        parts = parts[:-1]  # a module's imports are relative to its package
    if level - 1 >= len(parts):
        return None
    return ".".join(parts[:len(parts) - (level - 1)])


def _targets(node: ast.AST, importer: str, files: Mapping[str, Path], package: str) -> Iterable[str]:
    """The modules of ``package`` that one import statement (or ``importlib.import_module`` call) imports."""
    def ours(name: str | None) -> bool:
        return bool(name) and (name == package or name.startswith(package + "."))

    if isinstance(node, ast.Import):
        for alias in node.names:
            if ours(alias.name):
                yield _existing(alias.name, files)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = _relative_base(importer, node.level, files)
            if base is None:
                return
            mod = f"{base}.{node.module}" if node.module else base
        else:
            mod = node.module
        if not ours(mod):
            return
        for alias in node.names:
            sub = f"{mod}.{alias.name}"
            yield sub if alias.name != "*" and sub in files else _existing(mod, files)
    elif isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and ours(node.args[0].value):
            yield _existing(node.args[0].value, files)


def module_imports(path: Path, importer: str, files: Mapping[str, Path],
                   package: str = PACKAGE) -> dict[str, list[int]]:
    """imported module -> sorted lines, for one file (imports of itself left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: dict[str, set[int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)):
            for target in _targets(node, importer, files, package):
                if target != importer:
                    out.setdefault(target, set()).add(node.lineno)
    return {k: sorted(v) for k, v in sorted(out.items())}


def build_graph(src: Path = SRC, package: str = PACKAGE) -> Graph:
    files = discover(src, package)
    return Graph(files, {m: module_imports(p, m, files, package) for m, p in files.items()})


# -- cycles ----------------------------------------------------------------------------------------------------

def find_cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted, sorted by first member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    nodes = sorted(set(graph.edges) | {b for targets in graph.edges.values() for b in targets})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.edges.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.edges.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def cycle_edges(graph: Graph, cycle: Iterable[str]) -> list[Edge]:
    """The edges between the modules of one cycle (strongly connected component)."""
    members = set(cycle)
    return [(a, b) for a in sorted(members) for b in graph.edges.get(a, {}) if b in members]


# -- layers ----------------------------------------------------------------------------------------------------

def top_name(module: str, package: str = PACKAGE) -> str:
    """``breastfusion.data.images`` -> ``data``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_index(layers: list[list[str]]) -> dict[str, int]:
    where: dict[str, int] = {}
    for i, names in enumerate(layers):
        for n in names:
            if n in where:
                raise ValueError(f"'{n}' is in two layers of LAYERS ({where[n]} and {i})")
            where[n] = i
    return where


def unlayered(graph: Graph, layers: list[list[str]], package: str = PACKAGE) -> list[str]:
    """Top-level names of the tree that :data:`LAYERS` does not place."""
    where = layer_index(layers)
    return sorted({top_name(m, package) for m in graph.files} - set(where))


@dataclass(frozen=True)
class Violation:
    importer: str
    imported: str
    importer_layer: int
    imported_layer: int
    lines: tuple[int, ...]

    @property
    def edge(self) -> Edge:
        return self.importer, self.imported


def layer_violations(graph: Graph, layers: list[list[str]], package: str = PACKAGE) -> list[Violation]:
    """Imports of a module of a higher layer (names missing from ``layers`` are skipped: see :func:`unlayered`)."""
    where = layer_index(layers)
    out = []
    for a, targets in graph.edges.items():
        la = where.get(top_name(a, package))
        for b, lines in targets.items():
            lb = where.get(top_name(b, package))
            if la is not None and lb is not None and lb > la:
                out.append(Violation(a, b, la, lb, tuple(lines)))
    return sorted(out, key=lambda v: v.edge)


# -- the check -------------------------------------------------------------------------------------------------

@dataclass
class Report:
    graph: Graph
    cycles: list[list[str]]
    violations: list[Violation]
    unlayered: list[str]
    unexpected_cycle_edges: list[Edge] = field(default_factory=list)
    unexpected_violations: list[Violation] = field(default_factory=list)
    stale_known: list[Edge] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unlayered or self.unexpected_cycle_edges or self.unexpected_violations or self.stale_known)


def check(src: Path = SRC, layers: list[list[str]] | None = None, known: Iterable[Edge] | None = None,
          package: str = PACKAGE) -> Report:
    """Build the graph of ``package`` under ``src`` and compare its cycles and layer violations with ``known``."""
    layers = LAYERS if layers is None else layers
    known = set(KNOWN if known is None else known)
    graph = build_graph(src, package)
    cycles = find_cycles(graph)
    violations = layer_violations(graph, layers, package)
    in_cycles = {e for c in cycles for e in cycle_edges(graph, c)}
    bad = in_cycles | {v.edge for v in violations}
    return Report(graph, cycles, violations, unlayered(graph, layers, package),
                  unexpected_cycle_edges=sorted(in_cycles - known),
                  unexpected_violations=[v for v in violations if v.edge not in known],
                  stale_known=sorted(known - bad))


def _lines(lines: Iterable[int]) -> str:
    lines = list(lines)
    return f"line {lines[0]}" if len(lines) == 1 else "lines " + ", ".join(map(str, lines))


def format_report(report: Report, layers: list[list[str]] | None = None, known: Iterable[Edge] | None = None) -> str:
    layers = LAYERS if layers is None else layers
    known = set(KNOWN if known is None else known)
    g = report.graph
    n_edges = sum(len(t) for t in g.edges.values())
    out = [f"{len(g.files)} modules, {n_edges} imports between them."]
    if report.unlayered:
        out.append("")
        out.append("Top-level names not in LAYERS (add them to LAYERS in tools/import_graph.py): "
                   + ", ".join(report.unlayered))
    out.append("")
    out.append(f"Cycles: {len(report.cycles)}")
    unexpected = set(report.unexpected_cycle_edges)
    for i, cycle in enumerate(report.cycles, 1):
        out.append(f"  cycle {i} ({len(cycle)} modules): {', '.join(cycle)}")
        for a, b in cycle_edges(g, cycle):
            mark = "   NEW" if (a, b) in unexpected else "   (known)" if (a, b) in known else ""
            out.append(f"    {a} -> {b} ({_lines(g.lines(a, b))}){mark}")
    out.append("")
    out.append(f"Layer violations (a module importing a higher layer): {len(report.violations)}")
    new = {v.edge for v in report.unexpected_violations}
    for v in report.violations:
        mark = "   NEW" if v.edge in new else "   (known)" if v.edge in known else ""
        out.append(f"  {v.importer} [layer {v.importer_layer}] -> {v.imported} [layer {v.imported_layer}] "
                   f"({_lines(v.lines)}){mark}")
    if report.stale_known:
        out.append("")
        out.append("KNOWN entries that no longer break a rule (remove them from KNOWN in tools/import_graph.py):")
        out += [f"  {a} -> {b}" for a, b in report.stale_known]
    out.append("")
    if report.ok:
        out.append("OK: every cycle edge and layer violation is in KNOWN "
                   f"({len(known)} entries left to remove).")
    else:
        n = len(report.unexpected_cycle_edges) + len(report.unexpected_violations)
        out.append(f"FAILED: {n} new cycle edges or layer violations, {len(report.stale_known)} stale KNOWN "
                   f"entries, {len(report.unlayered)} names missing from LAYERS.")
    return "\n".join(out)


def to_json(report: Report, package: str = PACKAGE) -> dict:
    g = report.graph
    root = g.files[package].parents[1] if package in g.files else None
    return {
        "modules": {m: {"file": str(p.relative_to(root)) if root else str(p), "top_name": top_name(m, package),
                        "imports": [{"module": b, "lines": lines} for b, lines in g.edges[m].items()]}
                    for m, p in g.files.items()},
        "cycles": [{"modules": c, "edges": [{"from": a, "to": b, "lines": g.lines(a, b)}
                                            for a, b in cycle_edges(g, c)]} for c in report.cycles],
        "layer_violations": [{"from": v.importer, "to": v.imported, "from_layer": v.importer_layer,
                              "to_layer": v.imported_layer, "lines": list(v.lines)} for v in report.violations],
        "unlayered": report.unlayered,
        "unexpected": [list(e) for e in report.unexpected_cycle_edges]
                      + [list(v.edge) for v in report.unexpected_violations],
        "stale_known": [list(e) for e in report.stale_known],
        "ok": report.ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the graph, cycles and violations as JSON")
    ap.add_argument("--src", type=Path, default=SRC, help="the folder holding the package (default: %(default)s)")
    args = ap.parse_args(argv)
    report = check(args.src)
    if args.json:
        print(json.dumps(to_json(report), indent=1))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
