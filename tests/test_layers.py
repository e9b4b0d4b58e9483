"""The package's layer facts (tools/check_layers.py): no import cycle, ray only in the Ray engines, no private
name imported across modules, no module over 600 lines. And the checker itself catches each kind of breach."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import check_layers  # noqa: E402


def test_the_package_keeps_its_layers():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no cycle" in res.stdout


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """A throwaway ``geoseg`` tree the checker is pointed at."""
    pkg = tmp_path / "geoseg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(check_layers, "ROOT", tmp_path)
    monkeypatch.setattr(check_layers, "PACKAGE", pkg)

    def write(name: str, text: str) -> None:
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))

    return write


def test_checker_finds_a_cycle_through_a_lazy_import(fake_package):
    fake_package("a.py", "from geoseg import b\n")
    fake_package("b.py", "def f():\n    from geoseg.a import x\n")
    problems, _ = check_layers.check()
    assert problems == ["import cycle: geoseg.a <-> geoseg.b"]


def test_checker_finds_ray_private_names_and_size(fake_package):
    fake_package("engines/__init__.py", "")
    fake_package("engines/ray.py", "import ray\n")
    fake_package("other.py", "import ray.train\nfrom geoseg.engines.ray import _hidden\n" + "x = 1\n" * 600)
    problems, _ = check_layers.check()
    assert any("other.py: imports ray" in p for p in problems)
    assert any("imports _hidden from geoseg.engines.ray" in p for p in problems)
    assert any("other.py: 602 lines" in p for p in problems)
    assert not any("engines/ray.py" in p for p in problems)
