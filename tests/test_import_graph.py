"""tools/import_graph.py: the package's import graph has no new cycle and no new upward import (beyond its KNOWN
list, which may only shrink), and the checker catches both on a small fake package."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


@pytest.fixture(scope="module")
def ig():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = mod  # dataclasses look their module up here
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("import_graph", None)


def test_the_package_has_no_new_cycle_or_upward_import(ig):
    report = ig.check()
    assert report.ok, "\n" + ig.format_report(report)
    assert "breastfusion.data.images" in report.graph.files
    # the two file-level cycles broken in issue 12 stay broken
    for a, b in [("breastfusion.data.images", "breastfusion.data.cleaning"),
                 ("breastfusion.data.fingerprint", "breastfusion.training.fit")]:
        assert not report.graph.lines(a, b), f"{a} imports {b} again"
    assert not any(m.startswith("breastfusion.data.") and b.startswith("breastfusion.training")
                   for m, targets in report.graph.edges.items() for b in targets)


def test_command_line_report_and_json(ig, capsys):
    assert ig.main([]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("OK")
    assert ig.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and "breastfusion.data.cleaning" in data["modules"]
    imports = {i["module"] for i in data["modules"]["breastfusion.data.cleaning"]["imports"]}
    assert "breastfusion.data.images" in imports


def _write(root: Path, rel: str, text: str = "") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.fixture
def fake(tmp_path):
    """fakepkg: low.a -> low.b -> low.a (a cycle; one import relative, inside a function), low.c -> high.h (a low
    layer importing a high one), high.h -> low.a and low (allowed: downward)."""
    src = tmp_path / "src"
    _write(src, "fakepkg/__init__.py")
    _write(src, "fakepkg/low/__init__.py", "X = 1\n")
    _write(src, "fakepkg/low/a.py", "import os\n\nfrom fakepkg.low import b\n")
    _write(src, "fakepkg/low/b.py", "def f():\n    from . import a\n    return a\n")
    _write(src, "fakepkg/low/c.py", "\n\nimport fakepkg.high.h\n")
    _write(src, "fakepkg/high/__init__.py")
    _write(src, "fakepkg/high/h.py", "from fakepkg.low.a import b\nfrom fakepkg.low import X\nfrom .. import low\n")
    return src


LAYERS = [["low", "__init__"], ["high"]]
CYCLE = {("fakepkg.low.a", "fakepkg.low.b"), ("fakepkg.low.b", "fakepkg.low.a")}
UPWARD = ("fakepkg.low.c", "fakepkg.high.h")


def test_graph_resolves_submodules_names_and_relative_imports(ig, fake):
    g = ig.build_graph(fake, "fakepkg")
    assert set(g.files) == {"fakepkg", "fakepkg.low", "fakepkg.low.a", "fakepkg.low.b", "fakepkg.low.c",
                            "fakepkg.high", "fakepkg.high.h"}
    assert g.edges["fakepkg.low.a"] == {"fakepkg.low.b": [3]}  # `from pkg.low import b`: the submodule
    assert g.edges["fakepkg.low.b"] == {"fakepkg.low.a": [2]}  # relative, inside a function
    assert g.edges["fakepkg.low.c"] == {"fakepkg.high.h": [3]}
    # `from pkg.low.a import b` (a name in a): the module a; `from pkg.low import X` (a name) and `from .. import
    # low` (a subpackage): the package's __init__
    assert g.edges["fakepkg.high.h"] == {"fakepkg.low.a": [1], "fakepkg.low": [2, 3]}


def test_catches_a_cycle_and_an_upward_import(ig, fake):
    report = ig.check(fake, LAYERS, known=set(), package="fakepkg")
    assert not report.ok
    assert report.cycles == [["fakepkg.low.a", "fakepkg.low.b"]]
    assert set(report.unexpected_cycle_edges) == CYCLE
    assert [v.edge for v in report.unexpected_violations] == [UPWARD]
    v = report.unexpected_violations[0]
    assert (v.importer_layer, v.imported_layer, v.lines) == (0, 1, (3,))
    text = ig.format_report(report, LAYERS, set())
    assert "fakepkg.low.a -> fakepkg.low.b (line 3)" in text and "fakepkg.low.b -> fakepkg.low.a (line 2)" in text
    assert "fakepkg.low.c [layer 0] -> fakepkg.high.h [layer 1] (line 3)" in text and "FAILED" in text


def test_known_entries_pass_and_a_stale_one_fails(ig, fake):
    assert ig.check(fake, LAYERS, known=CYCLE | {UPWARD}, package="fakepkg").ok
    # a missing one still fails
    assert not ig.check(fake, LAYERS, known=CYCLE, package="fakepkg").ok
    # an entry that no longer breaks a rule fails: the list only shrinks
    (fake / "fakepkg/low/b.py").write_text("def f():\n    return 1\n")  # cycle broken
    report = ig.check(fake, LAYERS, known=CYCLE | {UPWARD}, package="fakepkg")
    assert not report.ok and report.cycles == []
    assert report.stale_known == [("fakepkg.low.a", "fakepkg.low.b"), ("fakepkg.low.b", "fakepkg.low.a")]
    assert "no longer break a rule" in ig.format_report(report, LAYERS, CYCLE | {UPWARD})
    assert ig.check(fake, LAYERS, known={UPWARD}, package="fakepkg").ok


def test_a_name_missing_from_the_layers_fails(ig, fake):
    _write(fake, "fakepkg/extra.py", "from fakepkg.low import a\n")
    report = ig.check(fake, LAYERS, known=CYCLE | {UPWARD}, package="fakepkg")
    assert not report.ok and report.unlayered == ["extra"]
    assert "add them to LAYERS" in ig.format_report(report, LAYERS, CYCLE | {UPWARD})
    assert ig.check(fake, LAYERS + [["extra"]], known=CYCLE | {UPWARD}, package="fakepkg").ok
