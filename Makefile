# Two commands do all set-up on a fresh machine: `make course` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: course test test-fast lab bench reference reference-cl clean-venv

# (Re)install when requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import torch, torchvision, timm, tlkit; print('installed: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

# Run every notebook in order with papermill into outputs/, then print a summary.
course: $(STAMP)
	$(PY) -m tlkit.course

# ruff (pyproject.toml's rules), then unit tests, papermill runs with small parameters, and nbval over the notebooks as committed, on
# TEST_JOBS processes with one thread each (two 1-thread runs get more done on 2 cores than one 2-thread
# run); each file stays on one process, so a notebook's cells run in order. TEST_JOBS=0: one process.
TEST_JOBS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=$(if $(filter 0,$(TEST_JOBS)),$${OMP_NUM_THREADS:-2},1) $(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --durations=10 --nbval-lax notebooks tests

# Unit tests only (no notebooks, no papermill runs, no browser), on the same TEST_JOBS processes as make test.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=$(if $(filter 0,$(TEST_JOBS)),$${OMP_NUM_THREADS:-2},1) $(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --durations=10 -m "not notebook and not browser" tests

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

bench: $(STAMP)
	$(PY) bench/feature_cache.py
	$(PY) bench/fit_overhead.py
	$(PY) bench/data_pipeline.py

# fastai for bench/fastai_reference.py only (optional: the course and its tests never import it): the pins of
# pyproject.toml's `reference` extra, installed with --no-deps so that pip changes nothing the course installed (torch,
# numpy stay as requirements.txt has them) and skips fastai's spacy; the last line checks the import and torch.
reference: $(STAMP)
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['reference']))" > $(VENV)/reference.txt
	$(PY) -m pip install --quiet --no-deps -r $(VENV)/reference.txt
	$(PY) -c "import fastai, fastai.vision.all, torch; print('installed: fastai', fastai.__version__, 'with torch', torch.__version__)"

# Avalanche for bench/avalanche_reference.py only (optional, as `reference`): the pins of pyproject.toml's `reference-cl`
# extra, --no-deps so that torch, numpy and the rest stay as requirements.txt has them; the last line checks the import.
reference-cl: $(STAMP)
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['reference-cl']))" > $(VENV)/reference-cl.txt
	$(PY) -m pip install --quiet --no-deps -r $(VENV)/reference-cl.txt
	$(PY) -W ignore -c "import avalanche, avalanche.training, torch; print('installed: avalanche', avalanche.__version__, 'with torch', torch.__version__)"

clean-venv:
	rm -rf $(VENV)
