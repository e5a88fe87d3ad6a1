"""Execute the project notebooks headless with papermill (``python -m opdcells notebooks``).

The committed notebooks stay output-free; each executed copy, with its outputs, is written to
``RESULTS/notebooks/`` (replaced only once the run ends, also when a cell failed, so the copy shows the
error). Parameters are injected by papermill as a cell tagged ``injected-parameters`` right after the
cell tagged ``parameters``, so the notebook's own defaults stay visible above the overrides.

The kernel runs on this machine over IPC sockets (not TCP), with ``opdcells`` importable and TensorFlow's
start-up lines silenced (:mod:`opdcells.console`); whatever else the kernel process writes to its stderr
is logged as a warning when the notebook ends.

Several notebooks run concurrently (``--jobs``, default: as many as there are notebooks, up to the CPU
cores), each kernel then with its share of the cores for TensorFlow and BLAS
(:func:`thread_environment`); each notebook's wall and CPU seconds (its kernel's, read when the kernel is
shut down) are logged when it ends and summed up when all have ended (:class:`NotebookRun`). A failing
notebook fails the command with its name once the others have ended.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .console import EXIT_OK, allocator_environment, common_options, drop_noise, tensorflow_environment
from .errors import NotebookError, one_line

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("Final_Project.ipynb", "OPD_Model_and_DinoV2.ipynb")

log = logging.getLogger(__name__)

#: What a kernel writes to its stderr when it is shut down at the end of a run (not worth a warning).
KERNEL_SHUTDOWN = re.compile(r"KeyboardInterrupt caught in kernel")
#: Thread-pool sizes of TensorFlow and the BLAS/OpenMP libraries, set per kernel when notebooks run
#: concurrently: two kernels with their default pools (one thread per core each) put twice as many busy
#: threads on the cores as there are, and they fight (spin-waits; tests/conftest.py does the same per
#: pytest-xdist worker).
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def kernel_environment(environ: dict | None = None, threads: int | None = None) -> dict:
    """The notebook kernel's environment.

    Parameters
    ----------
    environ : dict, optional
        The environment to start from (default ``os.environ``); not changed.
    threads : int, optional
        Threads of TensorFlow's and the BLAS libraries' pools (:func:`thread_environment`); None: their
        defaults.

    Returns
    -------
    dict
        A copy with the repository first on ``PYTHONPATH`` (so ``import opdcells`` is this checkout),
        TensorFlow's start-up lines silenced and oneDNN on (:func:`opdcells.console.tensorflow_environment`)
        and glibc's allocator keeping freed memory (:func:`opdcells.console.allocator_environment`).
    """
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return thread_environment(allocator_environment(tensorflow_environment(env)), threads)


def thread_environment(environ: dict, threads: int | None) -> dict:
    """Set :data:`THREAD_VARIABLES` to ``threads`` in ``environ`` where the user has not set them.

    Parameters
    ----------
    environ : dict
        The environment to change.
    threads : int or None
        Threads per pool (at least 1); None changes nothing.

    Returns
    -------
    dict
        ``environ``.
    """
    if threads is not None:
        for name in THREAD_VARIABLES:
            environ.setdefault(name, str(max(1, int(threads))))
    return environ


def _process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` and its reaped children; None when unreadable."""
    try:
        import psutil  # installed with ipykernel
    except ImportError:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error as exc:
        log.debug("CPU time of kernel %s not read: %s", pid, exc)
        return None
    return times.user + times.system + times.children_user + times.children_system


def _kernel_manager_class(socket_dir: str, stderr, threads: int | None = None, usage: dict | None = None):
    """A jupyter kernel manager class whose kernels talk over IPC sockets in ``socket_dir`` (never TCP),
    write their stderr to the open file ``stderr`` and get ``threads`` threads per pool; the kernel's CPU
    seconds are put in ``usage["cpu_s"]`` as it is shut down. nbclient creates it, and so shuts its kernel
    down."""
    from jupyter_client import AsyncKernelManager
    from traitlets import CaselessStrEnum, default

    class KernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc")

        @default("ip")
        def _ip_default(self) -> str:
            return os.path.join(socket_dir, "kernel")

        async def start_kernel(self, **kw):
            kw.update(env=kernel_environment(threads=threads), stderr=stderr)
            return await super().start_kernel(**kw)

        async def shutdown_kernel(self, *args, **kw):
            process = getattr(self.provisioner, "process", None)
            if usage is not None and process is not None:
                usage["cpu_s"] = _process_cpu_s(process.pid)
            return await super().shutdown_kernel(*args, **kw)

    return KernelManager


def execute_notebook(path, parameters: dict | None = None, output_dir=None, timeout: int = 3600,
                     cwd=None, progress: bool | dict = False, threads: int | None = None,
                     usage: dict | None = None) -> Path:
    """Execute notebook ``path`` with papermill, ``parameters`` injected; write the executed copy.

    Parameters
    ----------
    path : path-like
        The notebook (``.ipynb``).
    parameters : dict, optional
        Name -> value (Python literals) injected after the cell tagged ``parameters``.
    output_dir : path-like, optional
        Folder of the executed copy (default ``REPO/results/notebooks``); the copy keeps the file name.
    timeout : int
        Longest time one cell may run (s).
    cwd : path-like, optional
        Working directory of the kernel (default the notebook's folder).
    progress : bool or dict
        Show papermill's progress bar (cells executed); a dict gives tqdm's options (``desc``,
        ``position``).
    threads : int, optional
        Threads of the kernel's TensorFlow and BLAS pools (:func:`thread_environment`; default theirs).
    usage : dict, optional
        Filled with ``cpu_s``, the kernel's CPU seconds (user + system; None when unreadable).

    Returns
    -------
    Path
        The executed copy.

    Raises
    ------
    NotebookError
        A cell failed (one line naming the notebook and the cell), or the kernel could not run it.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    path = Path(path)
    output_dir = Path(output_dir or REPO / "results" / "notebooks")
    output_dir.mkdir(parents=True, exist_ok=True)
    out_path = output_dir / path.name
    partial = output_dir / f".{path.stem}.partial.ipynb"
    log.info("executing %s -> %s", path, out_path)
    with tempfile.TemporaryDirectory(prefix="opdcells-kernel-") as sockets, \
            tempfile.TemporaryFile() as stderr:
        try:
            papermill.execute_notebook(
                str(path), str(partial), parameters=parameters or {}, kernel_name="python3",
                cwd=str(cwd or path.parent), progress_bar=progress, log_output=False,
                execution_timeout=timeout,
                kernel_manager_class=_kernel_manager_class(sockets, stderr, threads, usage))
        except PapermillExecutionError as err:
            raise NotebookError(f"{path}: cell In [{err.exec_count}] failed: {err.ename}: "
                                f"{one_line(err.evalue)} (executed copy: {out_path})") from None
        except (OSError, RuntimeError, TimeoutError) as err:   # kernel died, timed out or did not start
            raise NotebookError(f"{path}: {one_line(f'{type(err).__name__}: {err}')}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.replace(partial, out_path)
            stderr.seek(0)
            for line in drop_noise(stderr.read().decode(errors="replace")):
                if not KERNEL_SHUTDOWN.search(line):
                    log.warning("%s kernel: %s", path.name, line)
    return out_path


@dataclass
class NotebookRun:
    """One executed notebook: where its copy went, its times, and its error.

    Attributes
    ----------
    name : str
        The notebook's file name.
    out : Path or None
        The executed copy (None when the kernel did not start).
    wall_s : float
        Wall time of the run (s).
    cpu_s : float or None
        CPU time of its kernel, user + system (s); None when unreadable.
    error : NotebookError or None
        Why it failed; None when every cell ran.
    """

    name: str
    out: Path | None
    wall_s: float
    cpu_s: float | None
    error: NotebookError | None = None

    def line(self) -> str:
        """``NAME: 512 s wall, 701 s CPU`` (CPU left out when unknown)."""
        cpu = "" if self.cpu_s is None else f", {self.cpu_s:.0f} s CPU"
        return f"{self.name}: {self.wall_s:.0f} s wall{cpu}" + (" (failed)" if self.error else "")


def _timed_run(path: Path, parameters: dict, output_dir: Path, *, timeout: int, cwd, progress,
               threads: int | None) -> NotebookRun:
    """Execute one notebook; its error, if any, is kept in the returned :class:`NotebookRun`."""
    usage: dict = {}
    start = time.perf_counter()
    try:
        out, error = execute_notebook(path, parameters, output_dir=output_dir, timeout=timeout, cwd=cwd,
                                      progress=progress, threads=threads, usage=usage), None
    except NotebookError as exc:
        out, error = output_dir / path.name, exc
    run = NotebookRun(path.name, out if out.exists() else None, time.perf_counter() - start,
                      usage.get("cpu_s"), error)
    log.info("%s -> %s", run.line(), run.out)
    return run


def run_notebooks(paths, parameters: dict | None = None, *, output_dir=None, timeout: int = 3600, cwd=None,
                  progress: bool = False, jobs: int = 1) -> list[NotebookRun]:
    """Execute ``paths``, ``jobs`` at a time; a failure stops a sequential run at that notebook and lets
    concurrent ones end.

    With ``jobs`` > 1 each kernel gets ``os.cpu_count() // jobs`` threads (at least one) for TensorFlow
    and BLAS (:func:`thread_environment`, where the environment does not set them) and its own progress
    bar line.

    Parameters
    ----------
    paths : sequence of path-like
        The notebooks.
    parameters : dict, optional
        Injected into each (:func:`execute_notebook`).
    output_dir : path-like, optional
        Folder of the executed copies (default ``REPO/results/notebooks``).
    timeout : int
        Longest time one cell may run (s).
    cwd : path-like, optional
        Working directory of the kernels.
    progress : bool
        Show a progress bar per notebook (cells executed).
    jobs : int
        Notebooks executed at once (at least 1).

    Returns
    -------
    list of NotebookRun
        One per notebook run, in the order of ``paths`` (a sequential run ends at the first failure).
    """
    paths = [Path(p) for p in paths]
    output_dir = Path(output_dir or REPO / "results" / "notebooks")
    jobs = max(1, min(int(jobs), len(paths)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def one(i: int) -> NotebookRun:
        bar = ({"desc": paths[i].name, "position": i} if jobs > 1 else True) if progress else False
        return _timed_run(paths[i], parameters or {}, output_dir, timeout=timeout, cwd=cwd, progress=bar,
                          threads=threads)

    if jobs == 1:
        runs = []
        for i in range(len(paths)):
            runs.append(one(i))
            if runs[-1].error:
                break
        return runs
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="notebook") as pool:
        return list(pool.map(one, range(len(paths))))


def _own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def notebook_parameters(args) -> dict:
    """Parameters injected into every notebook from the command line.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``notebooks``.

    Returns
    -------
    dict
        ``QUICK``, ``DATA_PATH``, ``SEED``, ``SAVED_MODELS``, ``RESULTS`` and, when given, ``EPOCHS``.
    """
    params = {"QUICK": args.profile == "quick", "DATA_PATH": str(args.data), "SEED": args.seed,
              "SAVED_MODELS": str(args.saved_models), "RESULTS": str(args.results)}
    if args.epochs is not None:
        params["EPOCHS"] = args.epochs
    return params


def register(subparsers) -> None:
    """Add the ``notebooks`` subcommand (see ``opdcells.cli``).

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The subcommands of ``python -m opdcells``.
    """
    p = subparsers.add_parser("notebooks", parents=[common_options()],
                              help="execute the project notebooks headless",
                              description="Execute the notebooks headless with papermill and injected "
                                          "parameters; the executed copies (with outputs) go to "
                                          "RESULTS/notebooks/.")
    p.add_argument("names", nargs="*", default=list(NOTEBOOKS), metavar="NOTEBOOK",
                   help="notebooks to run (default: both)")
    p.add_argument("--data", default="data/opd_dataset.h5", metavar="DATASET.h5",
                   help="dataset the notebooks use (default data/opd_dataset.h5)")
    p.add_argument("--profile", choices=("quick", "full"), default="quick", help="default quick")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="override the profile's epochs")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--saved-models", default="saved_models", metavar="DIR", help="default saved_models")
    p.add_argument("--results", default="results", metavar="DIR", help="default results")
    p.add_argument("--timeout", type=int, default=3600, metavar="S",
                   help="longest time one cell may run, seconds (default 3600)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="notebooks executed at once, each kernel with its share of the CPU cores (default: "
                        "one per notebook, at most one per core)")
    p.set_defaults(run=run)


def default_jobs(n_notebooks: int) -> int:
    """Notebooks executed at once by default: one per notebook, at most one per CPU core.

    Parameters
    ----------
    n_notebooks : int
        Notebooks to run.

    Returns
    -------
    int
        At least 1.
    """
    return max(1, min(n_notebooks, os.cpu_count() or 1))


def run(args) -> int:
    """Execute the notebooks (``--jobs`` at a time); log each one's wall and CPU time and the total.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options of ``notebooks``.

    Returns
    -------
    int
        0 when every notebook ran.

    Raises
    ------
    NotebookError
        A notebook failed (a cell's error, a timeout): the first one's line, naming it and the cell, once
        the notebooks running beside it have ended; a sequential run stops there.
    """
    parameters = notebook_parameters(args)
    paths = [Path(name) if Path(name).exists() else REPO / name for name in args.names]
    jobs = args.jobs if args.jobs is not None else default_jobs(len(paths))
    if jobs < 1:
        raise NotebookError(f"--jobs must be at least 1, not {jobs}")
    start, cpu = time.perf_counter(), _own_cpu_s()
    runs = run_notebooks(paths, parameters, output_dir=Path(args.results) / "notebooks", timeout=args.timeout,
                         cwd=Path.cwd(), progress=not args.quiet, jobs=jobs)
    log.info("notebooks: %s; all: %.0f s wall, %.0f s CPU (%s)", "; ".join(r.line() for r in runs),
             time.perf_counter() - start, _own_cpu_s() - cpu,   # the kernels are reaped children by now
             f"{jobs} at a time" if jobs > 1 else "one at a time")
    failed = [r.error for r in runs if r.error]
    if failed:
        raise failed[0]
    return EXIT_OK
