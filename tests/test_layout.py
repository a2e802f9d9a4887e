"""The code's shape: the runtime runs without torch and the exporter, and nothing imports in a circle."""

from __future__ import annotations

import subprocess
import sys

from tools import import_graph

# Imports every runtime module with torch, the exporter and the benchmarks made unimportable
_ISOLATED = r"""
import importlib, importlib.abc, pkgutil, sys
BLOCKED = ("torch", "diffusers", "transformers", "sdrt.export", "sdrt.benchmarks")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Block())
import sdrt.runtime
names = [m.name for m in pkgutil.walk_packages(sdrt.runtime.__path__, "sdrt.runtime.")]
for name in names:
    importlib.import_module(name)
import sdrt, sdrt.cli
sdrt.Pipeline
leaked = sorted(n for n in sys.modules if any(n == b or n.startswith(b + ".") for b in BLOCKED))
print(len(names), leaked)
"""


def test_runtime_imports_without_torch_or_the_exporter():
    out = subprocess.run([sys.executable, "-c", _ISOLATED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    count, leaked = out.stdout.split(" ", 1)
    assert int(count) >= 25 and leaked.strip() == "[]"


def test_no_import_cycles_lazy_ones_included():
    g = import_graph.graph()
    assert len(g) >= 40 and import_graph.cycles(g) == []


def test_the_runtime_imports_neither_the_exporter_nor_the_benchmarks():
    g = import_graph.graph()
    for name, targets in g.items():
        if name.startswith("sdrt.runtime"):
            assert not [t for t in targets if t.startswith(("sdrt.export", "sdrt.benchmarks"))], name
            assert not [t for t in targets if not t.startswith("sdrt.runtime")], name


def test_the_cycle_finder_finds_cycles():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_graph.cycles({"a": {"b"}, "b": set()}) == []


def test_the_kernels_library_is_found_where_the_install_put_it():
    """A regular install has it beside the sources; an editable one (pip install -e .) only in the
    installed distribution's files, which is where the runtime must look then."""
    import importlib.metadata
    from pathlib import Path

    import pytest

    from sdrt.runtime.backends import kernels

    listed = [f for f in importlib.metadata.distribution("sdrt").files or () if f.name == kernels.library_path().name]
    if not listed:
        pytest.skip("this installation has no kernels library")
    installed = {Path(importlib.metadata.distribution("sdrt").locate_file(f)).resolve() for f in listed}
    assert kernels.available() and kernels.library_path().resolve() in installed
