"""The opdcells HDF5 dataset: schema, a sharded append-only store and lazy reading.

Layout (``schema_version`` 3)
-----------------------------
A dataset is the file users name, ``DATASET.h5`` (the *index*), plus the folder beside it,
``DATASET.h5.shards/``, of immutable *shards*. Each append writes one new shard (its maps and their
per-map columns) and then a new index, which is small, atomically in place of the old one:

- ``DATASET.h5`` holds the attributes, the per-map columns (copied from the shards), the class names,
  the files table, the shard table and ``opd``: an HDF5 *virtual dataset* over the shards' ``opd``,
  so readers see one ``(N, S, S)`` array. Shard paths are stored relative to the index's folder (HDF5
  resolves relative virtual sources against the folder of the virtual dataset's file), so moving or
  copying the folder that holds both keeps the dataset readable. ``HDF5_VDS_PREFIX`` must not be set.
- ``DATASET.h5.shards/NNNNNN-XXXXXXXX.h5`` hold ``opd`` and the per-map columns of the maps one run
  appended. They are never modified, and never deleted once an index names them.

A schema 1 dataset (one file holding everything) is still read as it is; the next append migrates it
by hard-linking (else copying) the old file into the shard folder as the first shard.

Schema 3 adds the *trace* columns (where each map lies in its file: the cell's number, centroid and
bounding box in its field of view). Datasets of schema 1 and 2 have none: they read as the columns' fill
values (-1 / NaN: "not recorded"), and the next append writes them, filled so, for the old rows. The
version was raised because an older opdcells appending to a schema 3 dataset would drop these columns.

N maps of S x S pixels, K classes, M ingested export files, H shards.

File attributes of the index:

==================  ======================================================================
``format``          ``"opdcells-dataset"`` (files without it are refused)
``schema_version``  int; a file with a newer version than this code knows is refused
``opdcells_version`` version of opdcells that last wrote the file
``created``         ISO 8601 UTC time of creation
``modified``        ISO 8601 UTC time of the last append
``pixel_size_um``   common pixel size of every map in ``opd`` (micrometres)
``out_size``        ``S``
``alpha_ml_per_g``  specific refraction increment used for ``dry_mass_pg``
``background_order`` order of the fitted background surface (1 = plane, 2 = quadratic)
``wavelength_nm``   imaging wavelength shared by all maps, NaN when unknown or mixed
``medium_index``    medium refractive index shared by all maps, NaN when unknown or mixed
==================  ======================================================================

Per-map datasets (first axis ``N``, rows never reordered or removed):

========================  ===========  =========================================================
``opd``                   (N,S,S) f4   optical path delay in nm, background ~0, cell centred;
                                       virtual over the shards (chunked one map per chunk there);
                                       NaN where a shard cannot be read
``label``                 (N,) i2      index into ``class_names``
``source_file``           (N,) str     export file the map came from
``source_index``          (N,) i4      position of the map inside that file (0 for single maps)
``source_sha256``         (N,) str     SHA-256 of the export file's bytes
``group``                 (N,) str     acquisition group: the stack / field-of-view file, or the
                                       folder of single-map files (relative to the source root)
``dry_mass_pg``           (N,) f4      cell dry mass in picograms
``area_um2``              (N,) f4      cell area in square micrometres
``wavelength_nm``         (N,) f4      imaging wavelength, NaN if unknown
``medium_index``          (N,) f4      medium refractive index, NaN if unknown
``input_pixel_size_um``   (N,) f4      pixel size of the export before resampling
``cell``                  (N,) i4      schema 3: number of the cell among those cut from its field
                                       of view (0, 1, ...); -1 for a whole map (stacks, single maps)
``centroid_row_px``       (N,) f4      schema 3: centroid of the cell's segment in the field, in
                                       export pixels (times ``input_pixel_size_um``: um); NaN for
                                       a whole map
``centroid_col_px``       (N,) f4      schema 3: the same, column
``bbox_row0``             (N,) i4      schema 3: the cell's bounding box in the field (export px,
                                       end exclusive): first row; -1 for a whole map
``bbox_col0``             (N,) i4      schema 3: first column (-1 for a whole map)
``bbox_row1``             (N,) i4      schema 3: row after the last (-1 for a whole map)
``bbox_col1``             (N,) i4      schema 3: column after the last (-1 for a whole map)
========================  ===========  =========================================================

Other datasets:

========================  ===========  =========================================================
``class_names``           (K,) str     class name of each label id; ids are never renumbered
``files/key``             (M,) str     identity of each ingested export: SHA-256 plus the reading
                                       options (variable, stack axis, fields, hologram)
``files/path``            (M,) str     path of that export when it was ingested
``files/n_maps``          (M,) i4      maps it contributed
``shards/name``           (H,) str     shard file, relative to the index's folder, in row order
``shards/rows``           (H,) i8      maps in that shard
========================  ===========  =========================================================

Strings are variable-length UTF-8. An append (:class:`DatasetWriter`) costs what it adds plus the
small index (a few hundred bytes per map, under 1% of the maps' bytes): the new shard is written and
fsynced, then the new index is built in memory, written to a temporary file, fsynced and
``os.replace``-d over the old one, and the folder is fsynced. A reader or a killed run only ever sees
the old or the new dataset; a journal ``.DATASET.h5.pending`` names the shards a run has started, so
the next writer deletes those of a killed run (and only those). The writer locks ``.DATASET.h5.lock``
beside the real file (symbolic links resolved), writes through a symbolic link to its target, refuses
a hard-linked index, treats failed fsyncs as errors and reports a full disk as one
:class:`DatasetError` with the dataset intact.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from . import __version__
from .errors import DatasetError

if TYPE_CHECKING:  # pragma: no cover
    from .metadata import Meta
    from .preprocess import PreprocessConfig, ProcessedMap

try:  # advisory lock against two writers on one dataset (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

FORMAT = "opdcells-dataset"
SCHEMA_VERSION = 3
#: Version of what a map's identity means, hashed by ``OPDDataset.fingerprint`` (schema 1 and 2 alike).
CONTENT_VERSION = 1
#: Oldest schema still read (schema 1: one self-contained file, migrated on the next append).
OLDEST_SCHEMA = 1

_STR = h5py.string_dtype("utf-8")
#: Per-map 1-D columns: name -> dtype (``opd`` is handled apart).
MAP_COLUMNS: dict[str, object] = {
    "label": np.int16,
    "source_file": _STR,
    "source_index": np.int32,
    "source_sha256": _STR,
    "group": _STR,
    "dry_mass_pg": np.float32,
    "area_um2": np.float32,
    "wavelength_nm": np.float32,
    "medium_index": np.float32,
    "input_pixel_size_um": np.float32,
}
#: Schema 3 per-map columns, where each map lies in its file: name -> (dtype, fill value meaning "not
#: recorded": a whole map, or a dataset written before schema 3).
TRACE_COLUMNS: dict[str, tuple[object, object]] = {
    "cell": (np.int32, -1),
    "centroid_row_px": (np.float32, math.nan),
    "centroid_col_px": (np.float32, math.nan),
    "bbox_row0": (np.int32, -1),
    "bbox_col0": (np.int32, -1),
    "bbox_row1": (np.int32, -1),
    "bbox_col1": (np.int32, -1),
}
#: Every per-map column a new shard or index holds.
WRITTEN_COLUMNS: dict[str, object] = {**MAP_COLUMNS, **{k: dtype for k, (dtype, _) in TRACE_COLUMNS.items()}}
FILE_COLUMNS: dict[str, object] = {"key": _STR, "path": _STR, "n_maps": np.int32}
SHARD_COLUMNS: dict[str, object] = {"name": _STR, "rows": np.int64}
SHARD_FORMAT = "opdcells-shard"
#: Attributes that describe how maps were preprocessed; an append must match them.
SETTINGS = ("pixel_size_um", "out_size", "alpha_ml_per_g", "background_order")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def settings_of(config: PreprocessConfig) -> dict:
    """Dataset-level preprocessing settings (the ``SETTINGS`` attrs) of a PreprocessConfig.

    Parameters
    ----------
    config : PreprocessConfig
        The preprocessing the maps are made with.

    Returns
    -------
    dict
        ``pixel_size_um`` (um, the output pixel size), ``out_size`` (px), ``alpha_ml_per_g`` (mL/g),
        ``background_order``.
    """
    return config.as_settings()


# --------------------------------------------------------------------------------------------- reading


def real_path(path: str | os.PathLike) -> Path:
    """``path`` with every symbolic link (of the file or a folder above it) resolved.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    Path
    """
    return Path(os.path.realpath(path))


def shard_folder(real: Path) -> Path:
    """The folder of the shards of the dataset whose (real) index is ``real``.

    Parameters
    ----------
    real : Path
        The dataset index file, links resolved (:func:`real_path`).

    Returns
    -------
    Path
        ``DATASET.h5.shards`` beside it.
    """
    return real.with_name(f"{real.name}.shards")


def _open_h5(path: Path, real: Path) -> h5py.File:
    """Open ``real`` (the resolved ``path``: relative virtual sources follow the real folder)."""
    if not real.exists():
        raise DatasetError(path, "no such dataset file")
    try:
        return h5py.File(real, "r")
    except OSError as exc:
        raise DatasetError(path, f"not a readable HDF5 file ({exc})") from None


def _check_layout(h5: h5py.File, path: Path, real: Path) -> None:
    """Raise DatasetError unless ``h5`` is an opdcells dataset this code can read, shards included."""
    fmt = h5.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise DatasetError(path, "not an opdcells dataset (no format='opdcells-dataset' attribute)")
    version = int(h5.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise DatasetError(path, f"written with schema version {version}, newer than this opdcells "
                                 f"({__version__}, schema {SCHEMA_VERSION}); upgrade opdcells")
    if version < OLDEST_SCHEMA:
        raise DatasetError(path, f"invalid schema_version {version}")
    missing = [k for k in ("opd", "class_names", *MAP_COLUMNS) if k not in h5]
    missing += [f"files/{k}" for k in FILE_COLUMNS if f"files/{k}" not in h5]
    if version >= 2:
        missing += [f"shards/{k}" for k in SHARD_COLUMNS if f"shards/{k}" not in h5]
    missing += [k for k in SETTINGS if k not in h5.attrs]
    if missing:
        raise DatasetError(path, "corrupt opdcells dataset, missing " + ", ".join(missing))
    n = h5["opd"].shape[0]
    ragged = [k for k in WRITTEN_COLUMNS if k in h5 and h5[k].shape != (n,)]
    if ragged:
        raise DatasetError(path, f"corrupt opdcells dataset, {', '.join(ragged)} not of length {n}")
    if version >= 2:
        _check_shards(h5, path, real, n)


def _shard_table(h5: h5py.File) -> list[tuple[str, int]]:
    """(name relative to the index's folder, rows) of every shard, in row order (schema 2)."""
    if "shards" not in h5:
        return []
    names = h5["shards/name"].asstr()[()].tolist()
    return list(zip(names, (int(r) for r in h5["shards/rows"][()]), strict=True))


def _check_shards(h5: h5py.File, path: Path, real: Path, n: int) -> None:
    """Every shard the index names must exist (HDF5 would silently read fill values instead)."""
    shards = _shard_table(h5)
    if sum(rows for _, rows in shards) != n:
        raise DatasetError(path, f"corrupt opdcells dataset, shards hold {sum(r for _, r in shards)} maps, "
                                 f"opd {n}")
    for name, _ in shards:
        if not (real.parent / name).is_file():
            raise DatasetError(path, f"shard {name} is missing; a dataset is {real.name} together with "
                                     f"its {shard_folder(real).name}/ folder: move or copy both")


def _read_column(h5: h5py.File, name: str) -> np.ndarray:
    dset = h5[name]
    if h5py.check_string_dtype(dset.dtype) is not None:
        return np.asarray(dset.asstr()[()], dtype=object)
    return dset[()]


def _runs(sorted_unique: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs of sorted unique indices as (start_value, stop_value, position)."""
    if sorted_unique.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [sorted_unique.size]))
    return [(int(sorted_unique[a]), int(sorted_unique[b - 1]) + 1, int(a)) for a, b in zip(starts, stops,
                                                                                             strict=True)]


class OPDDataset:
    """A read-only, lazily opened opdcells dataset (see the module docstring for the schema).

    Only small per-map columns are read (and cached) on first access; ``opd`` stays on disk:
    use :attr:`opd` (the h5py dataset) or :meth:`read`.
    """

    def __init__(self, path: str | os.PathLike):
        """Open the index and its shards read-only and check the layout; no map is read.

        Parameters
        ----------
        path : str or os.PathLike
            The dataset (HDF5 index file; may be a symbolic link).

        Raises
        ------
        DatasetError
            When the file is missing or not an opdcells dataset (wrong or newer schema, missing or
            inconsistent columns or shards), naming the file.
        """
        self.path = Path(path)
        self.real_path = real_path(self.path)
        self._h5 = _open_h5(self.path, self.real_path)
        try:
            _check_layout(self._h5, self.path, self.real_path)
        except BaseException:
            self._h5.close()
            raise
        self._cache: dict[str, np.ndarray] = {}
        self._fingerprint: str | None = None

    # --- lifecycle
    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> OPDDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._h5["opd"].shape[0])

    def __repr__(self) -> str:
        return (f"OPDDataset({str(self.path)!r}, n={len(self)}, classes={list(self.class_names)}, "
                f"pixel_size_um={self.pixel_size_um}, out_size={self.out_size})")

    # --- columns
    def column(self, name: str) -> np.ndarray:
        """A per-map column (or ``class_names``) as a NumPy array, read once and cached.

        A trace column (``TRACE_COLUMNS``) of a dataset written before schema 3 reads as its fill value.
        """
        if name not in self._cache:
            if name in TRACE_COLUMNS and name not in self._h5:
                dtype, fill = TRACE_COLUMNS[name]
                self._cache[name] = np.full(len(self), fill, dtype=dtype)
            elif name not in self._h5 or name == "opd":
                raise KeyError(f"{self.path}: no column {name!r}")
            else:
                self._cache[name] = _read_column(self._h5, name)
        return self._cache[name]

    def origins(self, indices=None) -> dict[str, np.ndarray]:
        """Where maps ``indices`` (default all) came from inside their files.

        Returns
        -------
        dict of (n,) arrays: ``source_file``, ``source_index`` (map in the file), ``cell`` (number of the
        cell cut from a field of view, -1 for a whole map), ``centroid_row_px``, ``centroid_col_px``,
        ``centroid_row_um``, ``centroid_col_um`` (centroid in the field, export px and um; NaN for a whole
        map) and ``bbox_row0``, ``bbox_col0``, ``bbox_row1``, ``bbox_col1`` (the cell's bounding box in the
        field, export px, end exclusive; -1 for a whole map). Datasets before schema 3 give the fill
        values for the field columns.
        """
        idx = slice(None) if indices is None else np.asarray(indices, dtype=np.int64)
        out = {name: self.column(name)[idx] for name in ("source_file", "source_index", *TRACE_COLUMNS)}
        px = self.column("input_pixel_size_um")[idx].astype(np.float64)
        for axis in ("row", "col"):
            out[f"centroid_{axis}_um"] = out[f"centroid_{axis}_px"] * px
        return out

    @property
    def opd(self) -> h5py.Dataset:
        """All maps as one lazy ``(N, S, S)`` float32 array (virtual over the shards in schema 2)."""
        return self._h5["opd"]

    @property
    def shards(self) -> list[tuple[str, int]]:
        """(file relative to the index's folder, maps) of each shard; empty for a schema 1 file."""
        return _shard_table(self._h5)

    @property
    def attrs(self) -> dict:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._h5.attrs.items()}

    labels = property(lambda self: self.column("label"))
    class_names = property(lambda self: self.column("class_names"))
    groups = property(lambda self: self.column("group"))
    source_file = property(lambda self: self.column("source_file"))
    source_index = property(lambda self: self.column("source_index"))
    source_sha256 = property(lambda self: self.column("source_sha256"))
    dry_mass_pg = property(lambda self: self.column("dry_mass_pg"))
    area_um2 = property(lambda self: self.column("area_um2"))
    pixel_size_um = property(lambda self: float(self._h5.attrs["pixel_size_um"]))
    out_size = property(lambda self: int(self._h5.attrs["out_size"]))

    @property
    def settings(self) -> dict:
        """Preprocessing settings every map was made with (``SETTINGS`` attrs)."""
        return {k: self.attrs[k] for k in SETTINGS}

    @property
    def fingerprint(self) -> str:
        """Stable SHA-256 of the content identity, independent of row order and label numbering.

        Hashes the content version (``CONTENT_VERSION``, not the storage schema: sharding did not change
        what a dataset holds, so models keep recognising their data), pixel size, out size and the
        sorted (source SHA-256, source index, class name) triples.
        """
        if self._fingerprint is None:
            names = self.class_names
            triples = sorted(zip(self.source_sha256.tolist(), self.source_index.tolist(),
                                 (str(names[i]) for i in self.labels), strict=True))
            payload = json.dumps({"schema_version": CONTENT_VERSION, "pixel_size_um": self.pixel_size_um,
                                  "out_size": self.out_size, "maps": triples}, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(payload.encode()).hexdigest()
        return self._fingerprint

    def read(self, indices: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Read maps ``indices`` as a float32 array (n, S, S) in the requested order.

        Reads from disk in sorted order, one contiguous run at a time; duplicates are read once.
        A damaged file raises DatasetError naming the dataset.
        """
        n = len(self)
        if isinstance(indices, slice):
            indices = np.arange(n)[indices]
        idx = np.asarray(indices)
        scalar = idx.ndim == 0
        idx = np.atleast_1d(idx)
        if idx.dtype.kind not in "iu":
            if idx.size:
                raise TypeError(f"indices must be integers, not {idx.dtype}")
            idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"{self.path}: index out of range for {n} maps")
        uniq, inverse = np.unique(idx, return_inverse=True)
        out = np.empty((uniq.size, self.out_size, self.out_size), np.float32)
        try:
            for start, stop, pos in _runs(uniq):
                self.opd.read_direct(out, np.s_[start:stop], np.s_[pos:pos + stop - start])
        except OSError as exc:  # a damaged shard (or schema 1 file)
            raise DatasetError(self.path, f"cannot read maps: {_one_line(exc)}") from None
        result = out[inverse.ravel()]
        return result[0] if scalar else result


def open_dataset(path: str | os.PathLike) -> OPDDataset:
    """Open an opdcells dataset lazily; raise DatasetError naming the file if it is not one.

    Parameters
    ----------
    path : str or os.PathLike
        The dataset (HDF5 index file).

    Returns
    -------
    OPDDataset
        Open (a context manager; close it). Maps are (N, S, S) float32 OPD in nm at ``pixel_size_um``.

    Raises
    ------
    DatasetError
        When the file is missing or not an opdcells dataset.
    """
    return OPDDataset(path)


# --------------------------------------------------------------------------------------------- writing


@dataclass
class _Batch:
    """Rows appended in memory and not yet written to HDF5 (bounded by ``batch_size``)."""

    opd: np.ndarray
    columns: dict[str, list]
    n: int = 0

    @classmethod
    def empty(cls, size: int, out_size: int) -> _Batch:
        return cls(np.empty((size, out_size, out_size), np.float32), {k: [] for k in WRITTEN_COLUMNS})

    def truncate(self, n: int) -> None:
        self.n = n
        for values in self.columns.values():
            del values[n:]


def _trace_row(position) -> dict:
    """The trace columns of a map: its FieldPosition (a cell cut from a field), or the fill values."""
    if position is None:
        return {name: fill for name, (_, fill) in TRACE_COLUMNS.items()}
    row0, col0, row1, col1 = position.bbox
    return {"cell": position.cell, "centroid_row_px": position.centroid_px[0],
            "centroid_col_px": position.centroid_px[1], "bbox_row0": row0, "bbox_col0": col0,
            "bbox_row1": row1, "bbox_col1": col1}


def _nan_if_none(value) -> float:
    return math.nan if value is None else float(value)


def _fsync_path(path: Path, directory: bool = False) -> None:
    """fsync ``path``; a failure raises OSError (only a folder that cannot be fsynced is let pass)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (directory and exc.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when HDF5 reports it only in its message."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "errno = 28," in text or "Disk quota exceeded" in text


#: Free space kept for HDF5's own metadata when a file is closed. HDF5 crashes the process (at exit)
#: when it cannot flush a file it is closing, so a write that would leave less free is refused before
#: HDF5 sees a full disk.
SPACE_RESERVE = 2 * 2**20


def _ensure_space(folder: Path, need: int) -> None:
    """Raise OSError(ENOSPC) unless ``folder``'s file system has ``need`` + SPACE_RESERVE bytes free."""
    try:
        stat = os.statvfs(folder)
    except (AttributeError, OSError):  # no statvfs (Windows): rely on the write errors
        return
    if stat.f_bavail * stat.f_frsize < need + SPACE_RESERVE:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _create_map_layout(h5: h5py.File, size: int) -> None:
    """Empty resizable ``opd`` and per-map columns (the content of a shard)."""
    h5.create_dataset("opd", shape=(0, size, size), maxshape=(None, size, size), dtype=np.float32,
                      chunks=(1, size, size))
    for name, dtype in WRITTEN_COLUMNS.items():
        h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))


def _table(h5: h5py.File, name: str, dtype, values, old: h5py.File | None = None, block: int = 65536,
           fill=None) -> None:
    """Contiguous dataset ``name``: the old file's ``name`` (if any) followed by ``values``.

    The index is written once and never resized, so no chunk is half empty; the old rows are
    copied ``block`` rows at a time (bounded memory). ``fill``: the value of the old rows of a per-map
    column the old file lacks (a trace column of a dataset before schema 3).
    """
    missing = old is not None and name not in old and fill is not None
    n_old = old["opd"].shape[0] if missing else old[name].shape[0] if old is not None and name in old else 0
    dset = h5.create_dataset(name, shape=(n_old + len(values),), dtype=dtype)
    for start in range(0, n_old, block):
        stop = min(start + block, n_old)
        dset[start:stop] = np.full(stop - start, fill, dtype=dtype) if missing else old[name][start:stop]
    if len(values):
        dset[n_old:] = values


class DatasetWriter:
    """Atomic, append-only writer of an opdcells dataset (one new shard per run).

    ``with DatasetWriter(path, config) as w: w.add_file(...)`` commits on a clean exit and discards
    everything on an exception. Rows go to a new shard in ``DATASET.h5.shards/``; :meth:`commit`
    fsyncs it, writes the new index to ``.NAME.tmp-*``, fsyncs it and ``os.replace``-s it over the
    index, so ``path`` changes only then, atomically. A run that adds nothing writes nothing. ``path``
    may be a symbolic link: its target is written. Storage failures (full disk, failed fsync) raise
    one :class:`DatasetError` after removing what the run wrote.
    """

    def __init__(self, path: str | os.PathLike, config: PreprocessConfig, *, batch_size: int = 64):
        """Prepare a run; nothing is opened or written before :meth:`open` (or ``with``).

        Parameters
        ----------
        path : str or os.PathLike
            The dataset index file (created if missing; a symbolic link writes its target).
        config : PreprocessConfig
            The preprocessing of the maps added; it must match an existing dataset's settings.
        batch_size : int
            Maps buffered before they are written to the shard.
        """
        self.path = Path(path)
        self.real = real_path(self.path)
        self.settings = settings_of(config)
        self.batch_size = batch_size
        self._lock_fd: int | None = None
        self._shard_h5: h5py.File | None = None
        self._shard: Path | None = None        # absolute path of the shard this run writes
        self._shard_name = ""                  # ... relative to the index's folder
        self._tmp: Path | None = None
        self._keys: set[str] = set()
        self._labels_by_sha: dict[str, set[str]] = {}   # source SHA-256 -> class names it was stored as
        self._class_names: list[str] = []
        self._new_files: list[tuple[str, str, int]] = []
        self._shards: list[tuple[str, int]] = []   # shards of the existing dataset
        self._version: int | None = None       # schema of the existing dataset, None if new
        self._base = 0            # rows in the existing dataset
        self._stored = 0          # rows in the existing dataset plus those written to the new shard
        self._opened = False
        self._failed: DatasetError | None = None
        self._batch = _Batch.empty(batch_size, self.settings["out_size"])
        self.n_added = 0

    # --- lifecycle
    def __enter__(self) -> DatasetWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> None:
        """Lock, clean what killed runs left and read what the existing dataset already holds."""
        self.real = real_path(self.path)
        if not self.real.parent.is_dir():
            raise DatasetError(self.path, f"output folder {self.real.parent} does not exist")
        self._lock()
        try:
            self._remove_stale_temps()
            if self.real.exists():
                self._load_existing()
            self._recover_journal()
            self._refuse_hard_links()
        except BaseException:
            self._unlock()
            raise
        self._opened = True

    def _lock(self) -> None:
        if fcntl is None:
            return
        lock_path = self.real.with_name(f".{self.real.name}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DatasetError(self.path, f"cannot create lock file {lock_path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DatasetError(self.path, "another opdcells process is writing this dataset") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _refuse_hard_links(self) -> None:
        if self.real.exists() and (links := os.stat(self.real).st_nlink) > 1:
            raise DatasetError(self.path, f"has {links} hard links; an append replaces the file and would "
                                          "split them: keep one name (symbolic links are fine)")

    def _remove_stale_temps(self) -> None:
        for stale in self.real.parent.glob(f".{self.real.name}.tmp-*"):
            log.info("removing %s left by an interrupted run", stale)
            with contextlib.suppress(OSError):
                stale.unlink()

    # --- journal of shards started by a run: what a killed run leaves is exactly what it lists
    @property
    def _journal(self) -> Path:
        return self.real.with_name(f".{self.real.name}.pending")

    def _journal_add(self, name: str) -> None:
        with open(self._journal, "a", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(self.real.parent, directory=True)

    def _recover_journal(self) -> None:
        """Delete the shards a killed run started and no index names; never one the index names."""
        if not self._journal.exists():
            return
        named = {name for name, _ in self._shards}
        for name in self._journal.read_text(encoding="utf-8").split():
            shard = self.real.parent / name
            if name not in named and shard.parent == shard_folder(self.real) and shard.exists():
                log.info("removing %s left by an interrupted run", shard)
                shard.unlink()
        self._journal.unlink()

    def _load_existing(self) -> None:
        with open_dataset(self.real) as ds:
            theirs = ds.settings
            for key, value in self.settings.items():
                if not math.isclose(float(theirs[key]), float(value), rel_tol=1e-9):
                    raise DatasetError(self.path, f"dataset was made with {key}={theirs[key]}, this run asks "
                                                  f"for {value}; omit the option or write a new dataset")
            self._class_names = [str(c) for c in ds.class_names]
            self._keys = set(_read_column(ds._h5, "files/key").tolist())
            for sha, label in zip(ds.column("source_sha256").tolist(), ds.labels.tolist(), strict=True):
                self._labels_by_sha.setdefault(str(sha), set()).add(self._class_names[int(label)])
            self._version = int(ds.attrs["schema_version"])
            self._shards = ds.shards
            self._base = self._stored = len(ds)

    # --- queries
    def has_file(self, key: str) -> bool:
        """True if an export with this identity (see ``files/key``) is already in the dataset."""
        return key in self._keys

    def labels_of(self, sha256: str) -> set[str]:
        """Class names under which an export with these bytes is stored (empty if it is not)."""
        return set(self._labels_by_sha.get(sha256, ()))

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    def __len__(self) -> int:
        return self._stored + self._batch.n

    # --- appending
    def add_file(self, key: str, *, path: str, sha256: str, label: str, group: str,
                 maps: Iterable[tuple[int, ProcessedMap, Meta]]) -> int:
        """Append every map of one export; all or nothing.

        If ``maps`` raises, the rows of this file (and a class it introduced) are rolled back and
        the exception propagates. A file that yields no map is not recorded. Returns maps added.
        A storage failure raises DatasetError and leaves the writer able only to :meth:`abort`.
        """
        if not self._opened:
            raise RuntimeError("DatasetWriter.open() (or a with block) must come before add_file()")
        if self._failed is not None:
            raise self._failed
        mark, n_classes = len(self), len(self._class_names)
        try:
            for source_index, processed, meta in maps:
                self._append(processed, meta, label=label, source_file=path, source_index=source_index,
                             sha256=sha256, group=group)
        except BaseException:
            if self._failed is None:
                self._rollback(mark, n_classes)
            raise
        added = len(self) - mark
        if added:
            self._keys.add(key)
            self._labels_by_sha.setdefault(sha256, set()).add(label)
            self._new_files.append((key, path, added))
            self.n_added += added
        return added

    def _label_id(self, name: str) -> int:
        if name not in self._class_names:
            if len(self._class_names) >= np.iinfo(np.int16).max:
                raise DatasetError(self.path, "too many classes")
            self._class_names.append(name)
        return self._class_names.index(name)

    def _append(self, processed: ProcessedMap, meta: Meta, *, label: str, source_file: str,
                source_index: int, sha256: str, group: str) -> None:
        size = self.settings["out_size"]
        if processed.opd.shape != (size, size):
            raise DatasetError(self.path, f"map of shape {processed.opd.shape} from {source_file}, "
                                          f"dataset holds {size}x{size} maps")
        batch = self._batch
        batch.opd[batch.n] = processed.opd
        row = {"label": self._label_id(label), "source_file": source_file, "source_index": source_index,
               "source_sha256": sha256, "group": group, "dry_mass_pg": processed.dry_mass_pg,
               "area_um2": processed.area_um2, "wavelength_nm": _nan_if_none(meta.wavelength_nm),
               "medium_index": _nan_if_none(meta.medium_index),
               "input_pixel_size_um": _nan_if_none(meta.pixel_size_um), **_trace_row(processed.position)}
        for name, value in row.items():
            batch.columns[name].append(value)
        batch.n += 1
        if batch.n == self.batch_size:
            self._flush()

    def _rollback(self, mark: int, n_classes: int) -> None:
        if mark >= self._stored:
            self._batch.truncate(mark - self._stored)
        else:
            self._batch.truncate(0)
            for name in ("opd", *WRITTEN_COLUMNS):
                self._shard_h5[name].resize(mark - self._base, axis=0)
            self._stored = mark
        del self._class_names[n_classes:]

    def _storage_error(self, exc: BaseException, doing: str) -> DatasetError:
        """The one-line DatasetError for a failed write; the writer then only aborts."""
        if isinstance(exc, DatasetError):
            error = exc
        elif _is_disk_full(exc):
            error = DatasetError(self.path, f"disk full while {doing}; nothing was changed, free some "
                                            "space and run again")
        else:
            error = DatasetError(self.path, f"cannot write ({doing}): {_one_line(exc)}; nothing was changed")
        self._failed = error
        return error

    def _ensure_shard(self) -> h5py.File:
        """Create this run's shard on first use (listed in the journal before it exists)."""
        if self._shard_h5 is None:
            folder = shard_folder(self.real)
            self._shard_name = f"{folder.name}/{len(self._shards):06d}-{uuid.uuid4().hex[:8]}.h5"
            self._journal_add(self._shard_name)
            folder.mkdir(exist_ok=True)
            self._shard = self.real.parent / self._shard_name
            self._shard_h5 = h5py.File(self._shard, "w")
            self._shard_h5.attrs.update({"format": SHARD_FORMAT, "opdcells_version": __version__})
            _create_map_layout(self._shard_h5, self.settings["out_size"])
        return self._shard_h5

    def _flush(self) -> None:
        batch = self._batch
        if batch.n == 0:
            return
        try:
            _ensure_space(self.real.parent, batch.opd[:batch.n].nbytes + 1024 * batch.n)
            h5 = self._ensure_shard()
            start, stop = self._stored - self._base, self._stored - self._base + batch.n
            h5["opd"].resize(stop, axis=0)
            h5["opd"][start:stop] = batch.opd[:batch.n]
            for name, values in batch.columns.items():
                h5[name].resize(stop, axis=0)
                h5[name][start:stop] = np.asarray(values, dtype=object if WRITTEN_COLUMNS[name] is _STR
                                                  else WRITTEN_COLUMNS[name])
        except (OSError, RuntimeError) as exc:
            raise self._storage_error(exc, f"writing {self._shard_name or 'a new shard'}") from None
        self._stored += batch.n
        batch.truncate(0)

    def _close_shard(self) -> None:
        """Flush, close and fsync the new shard and its folder."""
        self._shard_h5.attrs["rows"] = self._stored - self._base
        self._shard_h5.close()
        self._shard_h5 = None
        _fsync_path(self._shard)
        _fsync_path(self._shard.parent, directory=True)

    def _migrate(self) -> list[tuple[str, int]]:
        """Shards of the existing dataset; a schema 1 file becomes the first shard (hard link, else copy)."""
        if self._version is None or self._version >= 2:
            return list(self._shards)
        folder = shard_folder(self.real)
        name = f"{folder.name}/{0:06d}-{uuid.uuid4().hex[:8]}-v1.h5"
        self._journal_add(name)
        folder.mkdir(exist_ok=True)
        try:
            os.link(self.real, self.real.parent / name)
        except OSError:
            shutil.copyfile(self.real, self.real.parent / name)
            _fsync_path(self.real.parent / name)
        _fsync_path(folder, directory=True)
        log.info("%s: migrating schema %d to %d (old file kept as shard %s)", self.path, self._version,
                 SCHEMA_VERSION, name)
        return [(name, self._base)]

    def _write_index(self, shards: list[tuple[str, int]]) -> Path:
        """Write the new index to a temporary file beside the old one and fsync it; return its path.

        The index is built in memory and written with plain file I/O: on a full disk that is a clean
        OSError, where HDF5 writing the file itself could crash the process when it fails to flush.
        """
        image = self._build_index(shards)
        self._tmp = self.real.with_name(f".{self.real.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(self._tmp, "xb") as f:
            f.write(image)
            f.flush()
            os.fsync(f.fileno())
        return self._tmp

    def _build_index(self, shards: list[tuple[str, int]]) -> bytes:
        """The new index as an HDF5 file image: old columns copied in blocks, new rows from the shard."""
        size = self.settings["out_size"]
        old = h5py.File(self.real, "r") if self._version is not None else None
        try:
            with h5py.File(f"index-{uuid.uuid4().hex}", "w", driver="core", backing_store=False) as h5, \
                    h5py.File(self._shard, "r") as shard:
                now = _now()
                h5.attrs.update(dict(old.attrs) if old is not None else {"created": now, **self.settings})
                h5.attrs.update({"format": FORMAT, "schema_version": SCHEMA_VERSION,
                                 "opdcells_version": __version__, "modified": now})
                for name, dtype in WRITTEN_COLUMNS.items():
                    _table(h5, name, dtype, shard[name][()], old, fill=TRACE_COLUMNS.get(name, (0, None))[1])
                for i, (name, dtype) in enumerate(FILE_COLUMNS.items()):
                    _table(h5, f"files/{name}", dtype, [row[i] for row in self._new_files], old)
                _table(h5, "class_names", _STR, self._class_names)
                for i, (name, dtype) in enumerate(SHARD_COLUMNS.items()):
                    _table(h5, f"shards/{name}", dtype, [row[i] for row in shards])
                layout = h5py.VirtualLayout((self._stored, size, size), np.float32)
                start = 0
                for name, rows in shards:
                    layout[start:start + rows] = h5py.VirtualSource(name, "opd", shape=(rows, size, size))
                    start += rows
                h5.create_virtual_dataset("opd", layout, fillvalue=np.nan)
                for key in ("wavelength_nm", "medium_index"):
                    values = np.unique(h5[key][()])
                    h5.attrs[key] = float(values[0]) if values.size == 1 else math.nan
                h5.flush()
                return h5.id.get_file_image()
        finally:
            if old is not None:
                old.close()

    def commit(self) -> bool:
        """Make the appended maps durable and visible atomically; True if the dataset changed.

        Raises DatasetError (one line, the dataset unchanged) when the disk is full or an fsync fails.
        """
        replaced = False
        try:
            if self._failed is not None:
                raise self._failed
            self._flush()
            if self._shard_h5 is None or not self._new_files:
                self._discard()
                return False
            self._close_shard()
            shards = [*self._migrate(), (self._shard_name, self._stored - self._base)]
            os.replace(self._write_index(shards), self.real)
            replaced, self._tmp = True, None
            _fsync_path(self.real.parent, directory=True)
            self._journal.unlink()
            log.debug("committed %d maps to %s", self.n_added, self.path)
            return True
        except BaseException as exc:
            if not replaced:
                self._discard()
            if isinstance(exc, (OSError, RuntimeError)):
                doing = "making the new index durable" if replaced else "committing the new maps"
                raise self._storage_error(exc, doing) from None
            raise
        finally:
            self._unlock()

    def abort(self) -> None:
        """Discard everything appended; the original dataset stays as it was."""
        self._discard()
        self._unlock()

    def _discard(self) -> None:
        """Remove this run's shard, temporary index and journal (never a shard an index names)."""
        if self._shard_h5 is not None:
            # Emptied first: on a full disk HDF5 could not flush it at close (nor at exit: a crash)
            with contextlib.suppress(OSError):
                os.truncate(self._shard, 0)
            with contextlib.suppress(Exception):
                self._shard_h5.close()
            self._shard_h5 = None
        for path in (self._tmp, self._shard):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
        self._tmp = self._shard = None
        if self._opened:
            with contextlib.suppress(OSError):
                self._recover_journal()
