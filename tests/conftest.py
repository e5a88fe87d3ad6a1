"""Shared fixtures: paths to the real measured phase data beside the repository."""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Threads per pytest-xdist worker for TensorFlow's intra-/inter-op pools and BLAS/OpenMP. ``make test``
#: runs one worker per core; each worker with its default pools (one thread per core each, BLAS likewise)
#: would put 2-3x more busy threads on the cores than there are cores, and they fight (spin-waits, cache).
#: Set here, at conftest import, before any test module imports TensorFlow or NumPy's BLAS; the variables
#: are inherited by the subprocesses tests start (CLI commands, notebook kernels, distributed workers).
#: ``OPDCELLS_TEST_THREADS=0`` leaves the libraries' defaults; without xdist nothing is changed.
_THREADS = os.environ.get("OPDCELLS_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "0")
if _THREADS != "0":
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                      "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(_variable, _THREADS)

# glibc keeps the memory TensorFlow frees (as every opdcells command does): in this process and, through
# the environment, in the subprocesses tests start (pytest-xdist workers, CLI commands, notebook kernels).
from opdcells.console import keep_allocated_memory  # noqa: E402

keep_allocated_memory()


def _real_qpi_dir() -> Path:
    env = os.environ.get("OPDCELLS_REAL_QPI")
    return Path(env) if env else REPO.parent / "shared" / "real_qpi"


def pytest_report_header(config) -> list[str]:
    """Say once, at the top of every run, which real-data folders the tests found (their tests skip
    without them: about 30 tests and the real-cell figures)."""
    lines = []
    for name, path, variable in (("real QPI data", _real_qpi_dir(), "OPDCELLS_REAL_QPI"),
                                 ("failing-input cases", _cases_dir(), "OPDCELLS_CASES")):
        if path.is_dir():
            lines.append(f"opdcells: {name}: {path}")
        else:
            lines.append(f"opdcells: !!! {name} NOT FOUND at {path}: their tests are SKIPPED "
                         f"(put the shared folder beside the repository or set ${variable})")
    return lines


@pytest.fixture(scope="session")
def real_qpi() -> Path:
    """Folder ``shared/real_qpi`` (override with $OPDCELLS_REAL_QPI); tests skip loudly if absent."""
    path = _real_qpi_dir()
    if not path.is_dir():
        pytest.skip(f"real QPI data not found at {path}")
    return path


def _cases_dir() -> Path:
    env = os.environ.get("OPDCELLS_CASES")
    return Path(env) if env else REPO.parent / "shared" / "cases"


@pytest.fixture(scope="session")
def cases_dir() -> Path:
    """Folder ``shared/cases`` of failing real-world inputs (override with $OPDCELLS_CASES); tests skip
    loudly if absent."""
    path = _cases_dir()
    if not path.is_dir():
        pytest.skip(f"failing-input cases not found at {path}")
    return path


@pytest.fixture
def eager():
    """Keras steps and every other ``tf.function`` run eagerly during the test (helpers.eager_functions):
    for tests that train a small model as a means, not to test the traced training graph."""
    from helpers import eager_functions

    with eager_functions():
        yield


#: Folders of the repository that commands write to by default; tests must write to their own tmp_path
#: (several pytest-xdist workers run at once, and a developer's results must survive `make test`).
GUARDED = ("saved_models", "results", "data")


def _snapshot() -> dict[str, int]:
    """Relative path -> modification time (ns) of every file under the GUARDED folders."""
    return {str(path.relative_to(REPO)): path.stat().st_mtime_ns
            for folder in GUARDED for path in (REPO / folder).rglob("*") if path.is_file()}


@pytest.fixture(scope="session", autouse=True)
def repository_left_alone():
    """Fail the session if a test created, changed or removed a file under saved_models/, results/, data/."""
    before = _snapshot()
    yield
    after = _snapshot()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"tests wrote into the repository: {changed[:10]}"


#: The test files that take longest (sum of their tests' CPU seconds, slowest first, measured with
#: ``OPDCELLS_TEST_CPU=FILE``: CPU, not wall, on a shared machine). With ``--no-loadscope-reorder``
#: (``make test``), pytest-xdist's ``--dist loadfile`` hands the files to the workers in collection order:
#: one file each at the start, then the next file to a worker as soon as 2 or fewer of its tests are left
#: (so a file's last two tests run while the worker already holds its next file); by default it would
#: start with the files of most tests, which are quick ones, and leave a long file of few tests running
#: alone at the end while the other worker idles. Longest first (longest-processing-time-first scheduling)
#: keeps both workers busy to the end. Measured 2026-11-30 (725 tests, 783 s of CPU): test_transfer 156 s,
#: test_models 137, test_pretrain 120, test_train 51, test_notebooks 39, test_cli 31, test_load_data 21,
#: test_ood 12, test_screen 12, test_small_study 10; test_distribute 121 with MobileNetV2 in its two-worker
#: train command, 77 since (a tiny DINOv2). Replayed through that scheduling rule with CPU seconds as
#: durations, the slower worker gets 370 s of the 738 (the order of before the DINOv2 change: 370 s too):
#: the order balances the workers, only less CPU shortens the run.
SLOW_FILES = ("test_transfer.py", "test_models.py", "test_pretrain.py", "test_distribute.py", "test_train.py",
              "test_notebooks.py", "test_cli.py", "test_load_data.py", "test_ood.py", "test_screen.py",
              "test_small_study.py")


def pytest_collection_modifyitems(items) -> None:
    """Collect the SLOW_FILES first, slowest first; every other file after them in its usual order."""
    def rank(item) -> int:
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)   # stable: the order within a file, and of the other files, is kept


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``$OPDCELLS_TEST_CPU`` set to a file, append ``nodeid<TAB>cpu_s<TAB>wall_s<TAB>worker`` for each
    test (setup, call and teardown; CPU of the worker and of the subprocesses it waited for; the
    pytest-xdist worker, ``main`` without xdist): the measure of a test's cost on a shared machine, where wall
    time depends on the neighbours, and of how evenly the workers share the suite."""
    record = os.environ.get("OPDCELLS_TEST_CPU")
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    if record:
        cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(record, "a") as handle:
            handle.write(f"{item.nodeid}\t{cpu:.2f}\t{wall:.2f}\t{worker}\n")
