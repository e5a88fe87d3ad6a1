"""Execute the project notebooks headless with papermill (``python -m opdcells notebooks``).

The committed notebooks stay output-free; each executed copy, with its outputs, is written to
``RESULTS/notebooks/`` (replaced only once the run ends, also when a cell failed, so the copy shows the
error). Parameters are injected by papermill as a cell tagged ``injected-parameters`` right after the
cell tagged ``parameters``, so the notebook's own defaults stay visible above the overrides.

The kernel runs on this machine over IPC sockets (not TCP), with ``opdcells`` importable and TensorFlow's
start-up lines silenced (:mod:`opdcells.console`); whatever else the kernel process writes to its stderr
is logged as a warning when the notebook ends.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from .console import EXIT_OK, common_options, drop_noise, quiet_tensorflow_environment
from .errors import NotebookError, one_line

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("Final_Project.ipynb", "OPD_Model_and_DinoV2.ipynb")

log = logging.getLogger(__name__)

#: What a kernel writes to its stderr when it is shut down at the end of a run (not worth a warning).
KERNEL_SHUTDOWN = re.compile(r"KeyboardInterrupt caught in kernel")


def kernel_environment(environ: dict | None = None) -> dict:
    """The notebook kernel's environment.

    Parameters
    ----------
    environ : dict, optional
        The environment to start from (default ``os.environ``); not changed.

    Returns
    -------
    dict
        A copy with the repository first on ``PYTHONPATH`` (so ``import opdcells`` is this checkout) and
        TensorFlow's start-up lines silenced (:func:`opdcells.console.quiet_tensorflow_environment`).
    """
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return quiet_tensorflow_environment(env)


def _kernel_manager_class(socket_dir: str, stderr):
    """A jupyter kernel manager class whose kernels talk over IPC sockets in ``socket_dir`` (never TCP) and
    write their stderr to the open file ``stderr``; nbclient creates it, and so shuts its kernel down."""
    from jupyter_client import AsyncKernelManager
    from traitlets import CaselessStrEnum, default

    class KernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc")

        @default("ip")
        def _ip_default(self) -> str:
            return os.path.join(socket_dir, "kernel")

        async def start_kernel(self, **kw):
            kw.update(env=kernel_environment(), stderr=stderr)
            return await super().start_kernel(**kw)

    return KernelManager


def execute_notebook(path, parameters: dict | None = None, output_dir=None, timeout: int = 3600,
                     cwd=None, progress: bool = False) -> Path:
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
    progress : bool
        Show papermill's progress bar (cells executed).

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
                kernel_manager_class=_kernel_manager_class(sockets, stderr))
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
    p.set_defaults(run=run)


def run(args) -> int:
    """Execute each notebook in turn; a failing cell stops with one line (exit 2 via the CLI).

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
        At the first notebook that fails (a cell's error, a timeout), naming it and the cell.
    """
    parameters = notebook_parameters(args)
    for name in args.names:
        start = time.perf_counter()
        path = Path(name) if Path(name).exists() else REPO / name
        out = execute_notebook(path, parameters, output_dir=Path(args.results) / "notebooks",
                               timeout=args.timeout, cwd=Path.cwd(), progress=not args.quiet)
        log.info("%s done in %.0f s -> %s", name, time.perf_counter() - start, out)
    return EXIT_OK
