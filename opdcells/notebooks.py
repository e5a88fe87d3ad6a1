"""Execute the project notebooks headless with injected parameters (papermill convention, via nbclient).

The committed notebooks stay output-free; each executed copy, with its outputs, is written to
``results/notebooks/``. Parameters are injected as a new cell right after the cell tagged
``parameters`` so the notebook's own defaults stay visible above the overrides.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import OPDCellsError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("Final_Project.ipynb", "OPD_Model_and_DinoV2.ipynb")

log = logging.getLogger(__name__)


class NotebookError(OPDCellsError, RuntimeError):
    """A notebook cell failed while executing headless."""


def parameter_cell_source(parameters: dict) -> str:
    """Python source assigning each parameter (values rendered with repr)."""
    lines = ["# Parameters injected by opdcells.notebooks"]
    lines += [f"{name} = {value!r}" for name, value in parameters.items()]
    return "\n".join(lines)


def inject_parameters(nb, parameters: dict):
    """Insert an ``injected-parameters`` cell after the ``parameters`` cell (or first); return nb."""
    import nbformat

    cell = nbformat.v4.new_code_cell(parameter_cell_source(parameters))
    cell.metadata["tags"] = ["injected-parameters"]
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    position = tagged[0] + 1 if tagged else 0
    nb.cells.insert(position, cell)
    return nb


def execute_notebook(path, parameters: dict | None = None, output_dir=None, timeout: int = 3600,
                     cwd=None) -> Path:
    """Execute notebook ``path`` with ``parameters``; write the executed copy and return its path.

    Raises :class:`NotebookError` naming the notebook and the failing cell when a cell fails.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    output_dir = Path(output_dir or REPO / "results" / "notebooks")
    output_dir.mkdir(parents=True, exist_ok=True)
    nb = inject_parameters(nbformat.read(path, as_version=4), parameters or {})
    workdir = Path(cwd or path.parent)
    env_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = env_path  # the kernel inherits it, so `import opdcells` works
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    out_path = output_dir / path.name
    log.info("executing %s -> %s", path, out_path)
    try:
        client.execute()
    except CellExecutionError as err:
        raise NotebookError(f"{path}: a cell failed while executing headless:\n{err}") from None
    finally:
        nbformat.write(nb, out_path)
    return out_path


def notebook_parameters(args) -> dict:
    """Parameters injected into every notebook from the command line."""
    params = {"QUICK": args.profile == "quick", "DATA_PATH": str(args.data), "SEED": args.seed,
              "SAVED_MODELS": str(args.saved_models), "RESULTS": str(args.results)}
    if args.epochs is not None:
        params["EPOCHS"] = args.epochs
    return params


def register(subparsers) -> None:
    """Add the ``notebooks`` subcommand (see ``opdcells.cli``)."""
    from .cli import _common

    p = subparsers.add_parser("notebooks", parents=[_common()], help="execute the project notebooks headless",
                              description="Execute the notebooks headless with injected parameters; the "
                                          "executed copies (with outputs) go to RESULTS/notebooks/.")
    p.add_argument("names", nargs="*", default=list(NOTEBOOKS), help="notebooks to run (default: both)")
    p.add_argument("--data", default="data/opd_dataset.h5", help="dataset the notebooks use")
    p.add_argument("--profile", choices=("quick", "full"), default="quick")
    p.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--saved-models", default="saved_models")
    p.add_argument("--results", default="results")
    p.set_defaults(run=run)


def run(args) -> int:
    """Execute each notebook in turn; a failing cell stops with a clear error (exit 2 via the CLI)."""
    import time

    parameters = notebook_parameters(args)
    for name in args.names:
        start = time.perf_counter()
        path = Path(name) if Path(name).exists() else REPO / name
        out = execute_notebook(path, parameters, output_dir=Path(args.results) / "notebooks", cwd=Path.cwd())
        log.info("%s done in %.0f s -> %s", name, time.perf_counter() - start, out)
    return 0
