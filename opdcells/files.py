"""Shared helpers of the learning side's files: JSON and CSV records, folders replaced atomically, the
versions of the libraries a run used, and datasets read a block at a time.

Used by :mod:`opdcells.train`, :mod:`opdcells.modelfolder`, :mod:`opdcells.evaluate`,
:mod:`opdcells.learners`, :mod:`opdcells.pretrain` and :mod:`opdcells.crossval`. No TensorFlow.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .dataset import open_dataset

log = logging.getLogger(__name__)

__all__ = ["opened", "iter_maps", "versions", "write_json", "json_default", "write_history", "staging"]


@contextlib.contextmanager
def opened(data):
    """The dataset ``data``: opened here (and closed after) when it is a path.

    Parameters
    ----------
    data : str, os.PathLike or OPDDataset
        A dataset path, or a dataset already open (used as it is, left open).

    Yields
    ------
    OPDDataset
        The open dataset.
    """
    if isinstance(data, (str, os.PathLike)):
        with open_dataset(data) as ds:
            yield ds
    else:
        yield data


def iter_maps(dataset, indices, batch_size: int = 256):
    """Read maps of a dataset a block at a time (bounded memory).

    Parameters
    ----------
    dataset : OPDDataset
        An open dataset.
    indices : array of int, shape (N,)
        Rows to read, in this order.
    batch_size : int
        Maps per block.

    Yields
    ------
    numpy.ndarray, shape (n, S, S), float32, nm
        The OPD maps of the next ``n <= batch_size`` indices.
    """
    indices = np.asarray(indices, dtype=np.int64)
    for start in range(0, len(indices), batch_size):
        yield dataset.read(indices[start:start + batch_size])


def versions() -> dict:
    """The versions of opdcells, Python and the libraries a run used (recorded in config.json).

    Returns
    -------
    dict
        Name -> version string: opdcells, numpy, scikit-learn, h5py, python, and keras and tensorflow when
        they are installed.
    """
    import h5py
    import sklearn

    out = {"opdcells": __version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
           "h5py": h5py.__version__, "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import keras
        import tensorflow as tf

        out.update(keras=keras.__version__, tensorflow=tf.__version__)
    return out


def write_json(path: Path, data) -> None:
    """Write ``data`` as indented JSON (numpy scalars and arrays as numbers and lists).

    Written in place: callers write into a folder that :func:`staging` replaces atomically.

    Parameters
    ----------
    path : pathlib.Path
        The file to write.
    data : object
        JSON-serialisable, numpy values allowed (:func:`json_default`).
    """
    path.write_text(json.dumps(data, indent=1, default=json_default) + "\n", encoding="utf-8")


def json_default(obj):
    """``json.dumps``'s ``default``: numpy scalars as Python numbers, arrays as lists.

    Parameters
    ----------
    obj : object
        What ``json`` cannot serialise itself.

    Returns
    -------
    int, float, bool or list
        ``obj`` as plain Python.

    Raises
    ------
    TypeError
        ``obj`` is not a numpy value.
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_history(path: Path, history: dict) -> None:
    """Write a training history as CSV: an ``epoch`` column (from 1), then one column per metric.

    Parameters
    ----------
    path : pathlib.Path
        The CSV file (``history.csv``).
    history : dict of str to list of float
        Metric name -> value per epoch (per boosting iteration for ``features``); shorter columns are
        padded with NaN.
    """
    n = max((len(v) for v in history.values()), default=0)
    frame = pd.DataFrame({"epoch": np.arange(1, n + 1)})
    for key, values in history.items():
        frame[key] = list(values) + [np.nan] * (n - len(values))
    frame.to_csv(path, index=False)


@contextlib.contextmanager
def staging(out: Path):
    """A temporary sibling folder that replaces ``out`` only when the block succeeds.

    The old ``out`` is renamed aside, the new one moved in, then the old one deleted: a crash leaves the
    old folder or the new one, never a half-written one; on an exception the temporary folder is removed.

    Parameters
    ----------
    out : pathlib.Path
        The folder to write (a model or encoder folder).

    Yields
    ------
    pathlib.Path
        The temporary folder to write into.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        log.info("replaced the previous model in %s", out)
    else:
        os.replace(tmp, out)
