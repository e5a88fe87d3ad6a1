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
# processes of `simulate` (its files do not depend on it)
DEMO_WORKERS ?= 2
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

# The demo ends with one line of wall seconds per stage (`opdcells notebooks` logs each notebook's wall and
# CPU seconds before it); the two notebooks run side by side, one core each (`notebooks --jobs`).
demo: $(STAMP)
	@t0=$$(date +%s); \
	$(MAKE) --no-print-directory $(SIM)/truth.csv && t1=$$(date +%s) && \
	$(BIN)/python -m opdcells load $(SIM) --out $(DATASET) --out-pixel-size-um 0.25 --out-size 128 && \
	t2=$$(date +%s) && \
	$(BIN)/python -m opdcells notebooks --data $(DATASET) --profile $(PROFILE) && t3=$$(date +%s) && \
	echo "make demo: simulate $$((t1 - t0)) s, load $$((t2 - t1)) s, notebooks $$((t3 - t2)) s;" \
	     "total $$((t3 - t0)) s wall"

# Simulated once, one session per process on each core (the same files as one process): re-running the
# demo re-uses the exports (load then adds nothing new).
$(SIM)/truth.csv: | $(STAMP)
	$(BIN)/python -m opdcells simulate --out $(SIM) --n-per-class $(N_PER_CLASS) --seed $(SEED) \
	    --workers $(DEMO_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-demo:
	rm -rf $(SIM) $(DATASET)
