# Two commands matter: `make demo` (the main job on simulated exports) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := data
SIM    := $(DATA)/simulated_exports
DATASET := $(DATA)/opd_dataset.h5
N_PER_CLASS ?= 400
SEED ?= 0
PROFILE ?= quick
# pytest-xdist workers: one per core of a 2-core machine (each holds TensorFlow, ~1.5 GB); whole files per
# worker, the slowest first (tests/conftest.py SLOW_FILES); one TensorFlow/BLAS thread per worker
# (tests/conftest.py; OPDCELLS_TEST_THREADS=0 keeps the libraries' defaults, OPDCELLS_TEST_CPU=FILE
# records each test's CPU and wall seconds)
TEST_WORKERS ?= 2

.PHONY: demo test venv lint bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: $(STAMP) $(SIM)/truth.csv
	$(BIN)/python -m opdcells load $(SIM) --out $(DATASET) --out-pixel-size-um 0.25 --out-size 128
	$(BIN)/python -m opdcells notebooks --data $(DATASET) --profile $(PROFILE)

# Simulated once: re-running the demo re-uses the exports (load then adds nothing new).
$(SIM)/truth.csv: | $(STAMP)
	$(BIN)/python -m opdcells simulate --out $(SIM) --n-per-class $(N_PER_CLASS) --seed $(SEED)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-demo:
	rm -rf $(SIM) $(DATASET)
