"""bench/fastai_reference.py and bench/avalanche_reference.py: fastai and Avalanche stay optional (pinned in the
`reference` and `reference-cl` extras, installed by make reference / make reference-cl), and each bench says how to
install its library when it is missing."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def load_bench(name: str = "fastai_reference"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("library, bench_name, importer, message, extra", [
    ("fastai", "fastai_reference", "import_fastai", "fastai package, which is not importable here", "reference"),
    ("avalanche", "avalanche_reference", "import_avalanche", "Avalanche library, which is not importable here", "reference-cl"),
])
def test_without_its_library_a_bench_loads_and_exits_saying_how_to_install_it(monkeypatch, library, bench_name, importer, message, extra):
    monkeypatch.setitem(sys.modules, library, None)  # what an environment without the library gives: ImportError
    bench = load_bench(bench_name)  # importing the bench must not import the library
    with pytest.raises(SystemExit) as stop:
        getattr(bench, importer)()
    said = str(stop.value.code)
    assert message in said
    assert f"make {extra}" in said and f"'{extra}' extra" in said


def test_the_reference_extra_is_pinned_and_make_reference_installs_it_without_dependencies():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["reference"]
    assert "fastai==2.8.12" in extra and "fastprogress==1.0.3" in extra  # fastprogress 1.1 imports fasthtml
    assert all("==" in requirement for requirement in extra), extra  # --no-deps: only the pins guard the versions
    target = re.search(r"^reference:.*?(?=^\S|\Z)", (ROOT / "Makefile").read_text(), re.M | re.S)
    assert target and "--no-deps" in target.group(0) and "'reference'" in target.group(0)


def test_the_reference_cl_extra_is_pinned_leaves_the_course_stack_alone_and_make_reference_cl_installs_it_without_dependencies():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["reference-cl"]
    assert "avalanche-lib==0.6.0" in extra
    assert all("==" in requirement for requirement in extra), extra  # --no-deps: only the pins guard the versions
    names = {re.split(r"[=<>]", requirement)[0].lower() for requirement in extra}
    assert not names & {"torch", "torchvision", "numpy", "timm", "torchmetrics", "scikit-learn"}, names  # the course's pins rule those
    target = re.search(r"^reference-cl:.*?(?=^\S|\Z)", (ROOT / "Makefile").read_text(), re.M | re.S)
    assert target and "--no-deps" in target.group(0) and "'reference-cl'" in target.group(0)
