"""bench/fastai_reference.py: fastai stays optional (pinned in the `reference` extra, installed by make reference), and
the bench says how to install it when it is missing."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def load_bench():
    spec = importlib.util.spec_from_file_location("fastai_reference", ROOT / "bench" / "fastai_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_fastai_the_bench_loads_and_exits_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastai", None)  # what an environment without fastai gives: ImportError
    bench = load_bench()  # importing the bench must not import fastai
    with pytest.raises(SystemExit) as stop:
        bench.import_fastai()
    message = str(stop.value.code)
    assert "fastai package, which is not importable here" in message
    assert "make reference" in message and "'reference' extra" in message


def test_the_reference_extra_is_pinned_and_make_reference_installs_it_without_dependencies():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["reference"]
    assert "fastai==2.8.12" in extra and "fastprogress==1.0.3" in extra  # fastprogress 1.1 imports fasthtml
    assert all("==" in requirement for requirement in extra), extra  # --no-deps: only the pins guard the versions
    target = re.search(r"^reference:.*?(?=^\S|\Z)", (ROOT / "Makefile").read_text(), re.M | re.S)
    assert target and "--no-deps" in target.group(0) and "'reference'" in target.group(0)
