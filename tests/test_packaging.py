"""Packaging: the console scripts point at the command lines, and a missing optional package says which extra installs it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import tlkit
from tlkit import course, sweep
from tlkit._extras import MissingExtraError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


@pytest.mark.parametrize("script", ["tlkit-predict", "tlkit-sweep", "tlkit-course"])
def test_each_console_script_is_the_python_m_command(script, capsys):
    module, function = PYPROJECT["project"]["scripts"][script].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


def test_import_tlkit_needs_only_the_declared_dependencies():
    declared = {d.split(">")[0].split("=")[0].strip().lower().replace("-", "_") for d in PYPROJECT["project"]["dependencies"]}
    extras = {"papermill", "nbformat", "ipywidgets", "tabulate", "filelock", "distributed"}
    assert not extras & declared
    # this process may have imported extras elsewhere; what matters is that tlkit's own modules did not at import time
    for name, module in list(sys.modules.items()):
        if name.startswith("tlkit") and module is not None:
            source = Path(module.__file__).read_text() if getattr(module, "__file__", None) else ""
            for extra in extras:
                assert f"\nimport {extra}" not in source and f"\nfrom {extra} " not in source, (name, extra)


@pytest.mark.parametrize("package, call, extra", [
    ("papermill", lambda tmp: course.notebook_parameter_names(tmp / "x.ipynb"), "course"),
    ("ipywidgets", lambda tmp: tlkit.FreezePanel(tlkit.create_model("efficientnet_lite0", 2, weights=None), [], []), "widgets"),
    ("distributed", lambda tmp: sweep.dask_executor("tcp://127.0.0.1:1").__enter__(), "cluster"),
])
def test_a_missing_extra_names_the_feature_and_how_to_install_it(monkeypatch, tmp_path, package, call, extra):
    monkeypatch.setitem(sys.modules, package, None)  # what an environment without the package gives: ImportError
    with pytest.raises(MissingExtraError, match=rf"needs the optional package '{package}', which is not installed: pip install 'tlkit\[{extra}\]'"):
        call(tmp_path)
