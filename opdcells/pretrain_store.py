"""What a pretraining run keeps on disk besides its encoder folder: float16 copies of weights files, and
the checkpoint that lets a long run continue in a later session (``pretrain --resume``).

Float16 weights: Keras ``.weights.h5`` files are HDF5 groups of plain numeric datasets (no code, no
pickles); :func:`cast_weights_file` rewrites every float32 dataset as float16 (half the size; IEEE
half precision keeps 11 significant bits, a relative rounding error <= 2**-11 ~ 4.9e-4 per weight) and
``keras.Model.load_weights`` casts them back into the model's float32 variables on loading.

A checkpoint folder (``<out>.checkpoint``, written atomically at the end of every epoch) holds
``variables.h5`` -- every variable of the pretraining model (encoder, heads, EMA teachers, DINO centre)
and of its optimiser (step counter, AdamW moments), in creation order -- and ``state.json``: the run's
arguments, epochs and steps done, the history so far, the probes of the starting encoder and one record
per chunk (command, git commit, times). No TensorFlow is imported here; variables are anything with
``numpy()`` and ``assign()``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np

from .errors import ModelError
from .files import json_default, staging

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_STATE", "CHECKPOINT_VARIABLES", "WEIGHTS_DTYPES",
           "cast_weights_file", "weights_file_dtypes", "checkpoint_folder", "write_checkpoint",
           "read_checkpoint_state", "restore_checkpoint"]

CHECKPOINT_FORMAT = "opdcells-pretrain-checkpoint"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_VARIABLES = "variables.h5"
#: Storage dtypes of an encoder's weights file.
WEIGHTS_DTYPES = ("float32", "float16")
_FLOAT16_MAX = float(np.finfo(np.float16).max)   # 65504


def cast_weights_file(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float16") -> Path:
    """Copy a Keras ``.weights.h5`` file with every float32 dataset stored as ``dtype``.

    Groups, attributes and non-float32 datasets (integer counters) are copied unchanged; the file is
    written beside ``dst`` and renamed into place.

    Parameters
    ----------
    src : str or os.PathLike
        The weights file.
    dst : str or os.PathLike
        The copy (may be ``src``: replaced atomically).
    dtype : {"float16", "float32"}
        Storage dtype of the float weights.

    Returns
    -------
    pathlib.Path
        ``dst``.

    Raises
    ------
    ValueError
        An unknown ``dtype``, or a weight beyond float16's range (|w| > 65504) that would become inf.
    """
    if dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights dtype {dtype!r}: choose one of {', '.join(WEIGHTS_DTYPES)}")
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        with h5py.File(src, "r") as fin, h5py.File(tmp, "w") as fout:
            _copy_group(fin, fout, np.dtype(dtype), Path(src))
        shutil.copymode(src, tmp)   # mkstemp's file is private (0600); keep the source's permissions
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def _copy_group(fin: h5py.Group, fout: h5py.Group, dtype: np.dtype, src: Path) -> None:
    fout.attrs.update(fin.attrs)
    for name, item in fin.items():
        if isinstance(item, h5py.Group):
            _copy_group(item, fout.create_group(name), dtype, src)
            continue
        data = item[()]
        if isinstance(data, np.ndarray) and data.dtype in (np.float32, np.float16):
            if dtype == np.float16 and data.size and np.nanmax(np.abs(data)) > _FLOAT16_MAX:
                raise ValueError(f"{src}: weight {item.name} exceeds float16's range (65504)")
            data = data.astype(dtype)
        fout.create_dataset(name, data=data).attrs.update(item.attrs)


def weights_file_dtypes(path: str | os.PathLike) -> set[str]:
    """The dtypes of the float datasets of a weights file (e.g. ``{"float16"}``).

    Parameters
    ----------
    path : str or os.PathLike
        A ``.weights.h5`` file.

    Returns
    -------
    set of str
    """
    found: set[str] = set()

    def visit(_name, item):
        if isinstance(item, h5py.Dataset) and item.dtype.kind == "f":
            found.add(str(item.dtype))

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
    return found


def checkpoint_folder(out: str | os.PathLike) -> Path:
    """The checkpoint folder of the encoder folder ``out``: ``<out>.checkpoint`` beside it.

    Parameters
    ----------
    out : str or os.PathLike
        The encoder folder a run writes.

    Returns
    -------
    pathlib.Path
    """
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def write_checkpoint(folder: str | os.PathLike, state: dict, groups: dict[str, list]) -> Path:
    """Write a checkpoint atomically: ``state.json`` and the values of every variable in ``groups``.

    Parameters
    ----------
    folder : str or os.PathLike
        The checkpoint folder (replaced as a whole; a crash leaves the previous checkpoint).
    state : dict
        JSON-ready run state (arguments, epochs done, history, chunks).
    groups : dict of str to list
        Group name (``"model"``, ``"optimizer"``) -> variables in creation order.

    Returns
    -------
    pathlib.Path
        ``folder``.
    """
    folder = Path(folder)
    with staging(folder) as tmp:
        with h5py.File(tmp / CHECKPOINT_VARIABLES, "w") as h5:
            for group, variables in groups.items():
                g = h5.create_group(group)
                g.attrs["n"] = len(variables)
                for i, v in enumerate(variables):
                    g.create_dataset(f"{i:05d}", data=np.asarray(v.numpy())).attrs["path"] = str(
                        getattr(v, "path", getattr(v, "name", "")))
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, **state}, indent=1,
                                                       default=json_default) + "\n")
    log.info("checkpoint: epoch %s, step %s -> %s", state.get("epochs_done"), state.get("steps_done"), folder)
    return folder


def read_checkpoint_state(folder: str | os.PathLike) -> dict:
    """The ``state.json`` of a checkpoint folder.

    Parameters
    ----------
    folder : str or os.PathLike
        A checkpoint folder (:func:`write_checkpoint`).

    Returns
    -------
    dict

    Raises
    ------
    ModelError
        No such folder, no ``state.json``/``variables.h5``, unreadable, or not a pretraining checkpoint.
    """
    folder = Path(folder)
    path = folder / CHECKPOINT_STATE
    if not path.is_file() or not (folder / CHECKPOINT_VARIABLES).is_file():
        raise ModelError(folder, f"not a pretraining checkpoint (needs {CHECKPOINT_STATE} and "
                                 f"{CHECKPOINT_VARIABLES}; pretrain writes <out>.checkpoint)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(path, f"unreadable checkpoint state ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(path, f"not a pretraining checkpoint (format is not {CHECKPOINT_FORMAT})")
    return state


def restore_checkpoint(folder: str | os.PathLike, groups: dict[str, list]) -> None:
    """Assign the values of a checkpoint to ``groups``' variables (same order, shapes checked first).

    Parameters
    ----------
    folder : str or os.PathLike
        The checkpoint folder.
    groups : dict of str to list
        Group name -> the variables of a model built as the checkpointed one was.

    Raises
    ------
    ModelError
        The checkpoint holds other variables (count or shape): another backbone, method or width.
    """
    path = Path(folder) / CHECKPOINT_VARIABLES
    try:
        with h5py.File(path, "r") as h5:
            values = {group: [h5[group][f"{i:05d}"][()] for i in range(int(h5[group].attrs["n"]))]
                      for group in groups}
    except (OSError, KeyError) as exc:
        raise ModelError(path, f"unreadable checkpoint variables ({exc})") from None
    for group, variables in groups.items():
        shapes = [tuple(v.shape) for v in variables]
        saved = [np.shape(a) for a in values[group]]
        if shapes != saved:
            first = next((i for i, (a, b) in enumerate(zip(shapes, saved, strict=False)) if a != b),
                         min(len(shapes), len(saved)))
            raise ModelError(path, f"{group} variables do not match the model built from the checkpoint's "
                                   f"arguments ({len(saved)} saved, {len(shapes)} built; first difference at "
                                   f"#{first})")
    for group, variables in groups.items():
        for v, a in zip(variables, values[group], strict=True):
            v.assign(a)
