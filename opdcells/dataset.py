"""The opdcells HDF5 dataset: schema, atomic appends and lazy reading.

Schema (``schema_version`` 1)
-----------------------------
One HDF5 file. ``N`` maps of ``S x S`` pixels, ``K`` classes, ``M`` ingested export files.

File attributes:

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

Per-map datasets (first axis ``N``, resizable, rows never reordered or removed):

========================  ===========  =========================================================
``opd``                   (N,S,S) f4   optical path delay in nm, background ~0, cell centred;
                                       chunked one map per chunk
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
========================  ===========  =========================================================

Other datasets:

========================  ===========  =========================================================
``class_names``           (K,) str     class name of each label id; ids are never renumbered
``files/key``             (M,) str     identity of each ingested export: SHA-256 plus the reading
                                       options (variable, stack axis, fields, hologram)
``files/path``            (M,) str     path of that export when it was ingested
``files/n_maps``          (M,) i4      maps it contributed
========================  ===========  =========================================================

Strings are variable-length UTF-8. Writes are atomic: :class:`DatasetWriter` copies the dataset to
a temporary file in the same folder, appends there, fsyncs and ``os.replace``-s it over the
original, so a reader (or a killed run) only ever sees the old or the new content.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
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
SCHEMA_VERSION = 1

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
FILE_COLUMNS: dict[str, object] = {"key": _STR, "path": _STR, "n_maps": np.int32}
#: Attributes that describe how maps were preprocessed; an append must match them.
SETTINGS = ("pixel_size_um", "out_size", "alpha_ml_per_g", "background_order")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def settings_of(config: PreprocessConfig) -> dict:
    """Dataset-level preprocessing settings (the ``SETTINGS`` attrs) of a PreprocessConfig."""
    return {"pixel_size_um": float(config.out_pixel_size_um), "out_size": int(config.out_size),
            "alpha_ml_per_g": float(config.alpha_ml_per_g),
            "background_order": int(config.background_order)}


# --------------------------------------------------------------------------------------------- reading


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    if not path.exists():
        raise DatasetError(path, "no such dataset file")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise DatasetError(path, f"not a readable HDF5 file ({exc})") from None


def _check_layout(h5: h5py.File, path: Path) -> None:
    """Raise DatasetError unless ``h5`` is an opdcells dataset this code can read."""
    fmt = h5.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise DatasetError(path, "not an opdcells dataset (no format='opdcells-dataset' attribute)")
    version = int(h5.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise DatasetError(path, f"written with schema version {version}, newer than this opdcells "
                                 f"({__version__}, schema {SCHEMA_VERSION}); upgrade opdcells")
    if version < 1:
        raise DatasetError(path, f"invalid schema_version {version}")
    missing = [k for k in ("opd", "class_names", *MAP_COLUMNS) if k not in h5]
    missing += [f"files/{k}" for k in FILE_COLUMNS if f"files/{k}" not in h5]
    missing += [k for k in SETTINGS if k not in h5.attrs]
    if missing:
        raise DatasetError(path, "corrupt opdcells dataset, missing " + ", ".join(missing))
    n = h5["opd"].shape[0]
    ragged = [k for k in MAP_COLUMNS if h5[k].shape != (n,)]
    if ragged:
        raise DatasetError(path, f"corrupt opdcells dataset, {', '.join(ragged)} not of length {n}")


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
        self.path = Path(path)
        self._h5 = _open_h5(self.path)
        try:
            _check_layout(self._h5, self.path)
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
        """A per-map column (or ``class_names``) as a NumPy array, read once and cached."""
        if name not in self._cache:
            if name not in self._h5 or name == "opd":
                raise KeyError(f"{self.path}: no column {name!r}")
            self._cache[name] = _read_column(self._h5, name)
        return self._cache[name]

    @property
    def opd(self) -> h5py.Dataset:
        return self._h5["opd"]

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

        Hashes the schema version, pixel size, out size and the sorted
        (source SHA-256, source index, class name) triples.
        """
        if self._fingerprint is None:
            names = self.class_names
            triples = sorted(zip(self.source_sha256.tolist(), self.source_index.tolist(),
                                 (str(names[i]) for i in self.labels), strict=True))
            payload = json.dumps({"schema_version": SCHEMA_VERSION, "pixel_size_um": self.pixel_size_um,
                                  "out_size": self.out_size, "maps": triples}, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(payload.encode()).hexdigest()
        return self._fingerprint

    def read(self, indices: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Read maps ``indices`` as a float32 array (n, S, S) in the requested order.

        Reads from disk in sorted order, one contiguous run at a time; duplicates are read once.
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
        for start, stop, pos in _runs(uniq):
            self.opd.read_direct(out, np.s_[start:stop], np.s_[pos:pos + stop - start])
        result = out[inverse.ravel()]
        return result[0] if scalar else result


def open_dataset(path: str | os.PathLike) -> OPDDataset:
    """Open an opdcells dataset lazily; raise DatasetError naming the file if it is not one."""
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
        return cls(np.empty((size, out_size, out_size), np.float32), {k: [] for k in MAP_COLUMNS})

    def truncate(self, n: int) -> None:
        self.n = n
        for values in self.columns.values():
            del values[n:]


def _nan_if_none(value) -> float:
    return math.nan if value is None else float(value)


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DatasetWriter:
    """Atomic, append-only writer of an opdcells dataset.

    ``with DatasetWriter(path, config) as w: w.add_file(...)`` commits on a clean exit and discards
    everything on an exception. Nothing touches ``path`` before :meth:`commit`: the first append
    copies the existing dataset to ``.NAME.tmp-*`` in the same folder, rows go there, and commit
    flushes, fsyncs and ``os.replace``-s it over ``path``. A run that adds nothing writes nothing.
    A lock file ``.NAME.lock`` keeps two writers apart; temporary files left by killed runs are
    removed when the next writer starts.
    """

    def __init__(self, path: str | os.PathLike, config: PreprocessConfig, *, batch_size: int = 64):
        self.path = Path(path)
        self.settings = settings_of(config)
        self.batch_size = batch_size
        self._lock_fd: int | None = None
        self._h5: h5py.File | None = None
        self._tmp: Path | None = None
        self._keys: set[str] = set()
        self._class_names: list[str] = []
        self._new_files: list[tuple[str, str, int]] = []
        self._stored = 0          # rows already in the HDF5 file
        self._opened = False
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
        """Lock, clean stale temporary files and read what the existing dataset already holds."""
        if not self.path.parent.is_dir():
            raise DatasetError(self.path, f"output folder {self.path.parent} does not exist")
        self._lock()
        try:
            self._remove_stale_temps()
            if self.path.exists():
                self._load_existing()
        except BaseException:
            self._unlock()
            raise
        self._opened = True

    def _lock(self) -> None:
        if fcntl is None:
            return
        lock_path = self.path.with_name(f".{self.path.name}.lock")
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

    def _temp_glob(self) -> str:
        return f".{self.path.name}.tmp-*"

    def _remove_stale_temps(self) -> None:
        for stale in self.path.parent.glob(self._temp_glob()):
            log.info("removing %s left by an interrupted run", stale)
            with contextlib.suppress(OSError):
                stale.unlink()

    def _load_existing(self) -> None:
        with open_dataset(self.path) as ds:
            theirs = ds.settings
            for key, value in self.settings.items():
                if not math.isclose(float(theirs[key]), float(value), rel_tol=1e-9):
                    raise DatasetError(self.path, f"dataset was made with {key}={theirs[key]}, this run asks "
                                                  f"for {value}; omit the option or write a new dataset")
            self._class_names = [str(c) for c in ds.class_names]
            self._keys = set(_read_column(ds._h5, "files/key").tolist())
            self._stored = len(ds)

    # --- queries
    def has_file(self, key: str) -> bool:
        """True if an export with this identity (see ``files/key``) is already in the dataset."""
        return key in self._keys

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
        """
        if not self._opened:
            raise RuntimeError("DatasetWriter.open() (or a with block) must come before add_file()")
        mark, n_classes = len(self), len(self._class_names)
        try:
            for source_index, processed, meta in maps:
                self._append(processed, meta, label=label, source_file=path, source_index=source_index,
                             sha256=sha256, group=group)
        except BaseException:
            self._rollback(mark, n_classes)
            raise
        added = len(self) - mark
        if added:
            self._keys.add(key)
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
               "input_pixel_size_um": _nan_if_none(meta.pixel_size_um)}
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
            for name in ("opd", *MAP_COLUMNS):
                self._h5[name].resize(mark, axis=0)
            self._stored = mark
        del self._class_names[n_classes:]

    def _ensure_temp(self) -> h5py.File:
        """Open the temporary copy (copying the original, or creating a new file) on first use."""
        if self._h5 is None:
            self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                if self.path.exists():
                    shutil.copyfile(self.path, self._tmp)
                    shutil.copymode(self.path, self._tmp)
                    self._h5 = h5py.File(self._tmp, "r+")
                else:
                    self._h5 = h5py.File(self._tmp, "w")
                    self._create_layout(self._h5)
            except OSError as exc:
                self._discard_temp()
                raise DatasetError(self.path, f"cannot write temporary copy {self._tmp} ({exc})") from None
        return self._h5

    def _create_layout(self, h5: h5py.File) -> None:
        size = self.settings["out_size"]
        now = _now()
        h5.attrs.update({"format": FORMAT, "schema_version": SCHEMA_VERSION, "opdcells_version": __version__,
                         "created": now, "modified": now, **self.settings,
                         "wavelength_nm": math.nan, "medium_index": math.nan})
        h5.create_dataset("opd", shape=(0, size, size), maxshape=(None, size, size), dtype=np.float32,
                          chunks=(1, size, size))
        for name, dtype in MAP_COLUMNS.items():
            h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
        h5.create_dataset("class_names", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        files = h5.create_group("files")
        for name, dtype in FILE_COLUMNS.items():
            files.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))

    def _flush(self) -> None:
        batch = self._batch
        if batch.n == 0:
            return
        h5 = self._ensure_temp()
        start, stop = self._stored, self._stored + batch.n
        h5["opd"].resize(stop, axis=0)
        h5["opd"][start:stop] = batch.opd[:batch.n]
        for name, values in batch.columns.items():
            h5[name].resize(stop, axis=0)
            h5[name][start:stop] = np.asarray(values, dtype=object if MAP_COLUMNS[name] is _STR
                                              else MAP_COLUMNS[name])
        self._stored = stop
        batch.truncate(0)

    @staticmethod
    def _append_column(dset: h5py.Dataset, values: list) -> None:
        start = dset.shape[0]
        dset.resize(start + len(values), axis=0)
        dset[start:] = values

    def _finish_tables(self, h5: h5py.File) -> None:
        """Write class names, the files table and the summary attributes."""
        names = h5["class_names"]
        known = names.shape[0]
        if len(self._class_names) > known:
            self._append_column(names, self._class_names[known:])
        for i, name in enumerate(FILE_COLUMNS):
            self._append_column(h5["files"][name], [row[i] for row in self._new_files])
        for key in ("wavelength_nm", "medium_index"):
            values = np.unique(h5[key][()])
            h5.attrs[key] = float(values[0]) if values.size == 1 else math.nan
        h5.attrs["modified"] = _now()
        h5.attrs["opdcells_version"] = __version__

    def commit(self) -> bool:
        """Make the appended maps durable and visible atomically; True if the dataset changed."""
        try:
            self._flush()
            if self._h5 is None or not self._new_files:
                self._discard_temp()
                return False
            self._finish_tables(self._h5)
            self._h5.flush()
            self._h5.close()
            self._h5 = None
            _fsync_path(self._tmp)
            os.replace(self._tmp, self.path)
            self._tmp = None
            _fsync_path(self.path.parent, directory=True)
            log.debug("committed %d maps to %s", self.n_added, self.path)
            return True
        except BaseException:
            self._discard_temp()
            raise
        finally:
            self._unlock()

    def abort(self) -> None:
        """Discard everything appended; the original dataset stays as it was."""
        self._discard_temp()
        self._unlock()

    def _discard_temp(self) -> None:
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tmp = None
