# cohortlens — two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= profiles/local

.PHONY: demo test test-fast test-models install lint bench archive clean

$(BIN)/snakemake: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the local CPU wheel where pip's config names one (find-links)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/snakemake

demo: install
	$(BIN)/snakemake --profile $(PROFILE)
	@echo "report: $(CURDIR)/results/report/index.html"

# the finished run as an archive (docs/report.md). KIND=publication (default): aggregates only, release-checked
# (no subject ids, exact dates, file paths, DICOM identifiers or cells below k); KIND=internal: everything, for
# the lab's own storage
KIND ?= publication
archive: install
	$(BIN)/snakemake --profile $(PROFILE) results/archive/cohortlens-$(KIND).tar.gz
	@echo "archive: $(CURDIR)/results/archive/cohortlens-$(KIND).tar.gz"

# the whole suite (docs/testing.md): unit tests, the session's demo run, end-to-end workflows, SLURM; the slowest
# tests are printed so the 20-minute budget stays visible. Two pytest-xdist workers, each running whole groups
# (tests/conftest.py): one pytest process alone keeps 2 cores about half busy (Python start-up of every workflow
# job, SLURM's status polls). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)
test: install
	$(BIN)/python -m pytest -q tests -m "not trained_models" $(XDIST) --durations=25

# tests that train the demo vae/dae: the confounded and null scenarios, the DAE counterfactuals (~25 min on 2 cores;
# docs/testing.md)
test-models: install
	$(BIN)/python -m pytest -q tests -m trained_models $(XDIST) --durations=10

# the inner loop (< 3 min): no test marked slow, demo, workflow or slurm
test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow and not demo and not workflow and not slurm" $(XDIST) --durations=10

lint: install
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

bench: install
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/dag.py

clean:
	rm -rf results .snakemake
