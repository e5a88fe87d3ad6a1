"""Predict the class of every map in new export files with a saved model.

Exports go through :func:`opdcells.ingest.iter_processed` -- the same readers, metadata checks and
preprocessing as ``load_data.py`` -- with the output pixel size and map size taken from the model's
config, so the model sees maps made exactly like its training maps (exports at another pixel size are
resampled to the model's; the log says so). Maps are predicted in batches. The CSV has one row per map
(or per cell with ``fields``), columns :func:`csv_columns` (documented in the README): the map's identity,
its position in the field, dry mass and area, the predicted class and one ``p_<class>`` probability per
class, then ``ood_score, ood_flag`` for models with an out-of-distribution detector (``opdcells.ood``).
Everything that yields no prediction -- a bad file or map, a cell cut by the edge or refused by
preprocessing, an object segmentation dropped -- is a row of ``OUT.dropped.csv`` with its reason
(:func:`dropped_path`), summarised in the log. Both files are written to a temporary file and renamed
into place, so an interrupted run leaves any old CSV as it was. A bad file is reported and skipped,
never fatal.
"""
from __future__ import annotations

import abc
import collections
import contextlib
import csv
import logging
import math
import multiprocessing
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .console import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED
from .errors import ExportError, storable_text
from .ingest import Dropped, IngestOptions, discover, iter_processed
from .ood import PredictionCheck
from .preprocess import ProcessedMap

log = logging.getLogger(__name__)

__all__ = ["PredictResult", "predict_files", "expand_exports", "ingest_options", "csv_columns",
           "dropped_path", "DROPPED_COLUMNS", "ExportMaps", "read_export", "read_exports", "default_workers"]

#: Which map a row is: the export, the map in it, the cell's number among those cut from its field of
#: view and its label in the field's label image (both empty for whole maps).
ID_COLUMNS = ("file", "index", "cell", "object")
#: Where the cell lies in its field of view (export pixels and um; bbox end exclusive); empty for whole maps.
POSITION_COLUMNS = ("centroid_row_px", "centroid_col_px", "centroid_row_um", "centroid_col_um",
                    "bbox_row0", "bbox_col0", "bbox_row1", "bbox_col1")
#: What preprocessing measured of the cell (``preprocess.dry_mass_pg``, mask area).
MEASURE_COLUMNS = ("dry_mass_pg", "area_um2")
#: Out-of-distribution columns after the probabilities, for models with a detector (``ood.PredictionCheck``).
OOD_COLUMNS: tuple[str, ...] = ("ood_score", "ood_flag")
#: Columns of ``OUT.dropped.csv``: identity (index empty for a whole file), bbox where known, reason.
DROPPED_COLUMNS = (*ID_COLUMNS, "bbox_row0", "bbox_col0", "bbox_row1", "bbox_col1", "reason")


@dataclass
class PredictResult:
    """What :func:`predict_files` did: the CSVs, counts and every skipped file or map ("path: reason").

    Attributes
    ----------
    out : Path
        The predictions CSV.
    n_maps : int
        Maps (cells) predicted.
    n_files : int
        Files with at least one prediction.
    skipped_files : list of str
        "path: reason" of every file that could not be read.
    skipped_maps : list of str
        "path [map i]: reason" of every map that could not be preprocessed.
    dropped : list of Dropped
        Every map, cell or object that yields no prediction (see :class:`opdcells.ingest.Dropped`),
        written to ``OUT.dropped.csv``.
    """

    out: Path
    n_maps: int = 0
    n_files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    skipped_maps: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)

    @property
    def dropped_out(self) -> Path:
        return dropped_path(self.out)

    @property
    def status(self) -> int:
        """0 all predicted, 1 some files or maps skipped, 2 nothing predicted (like load_data.py)."""
        if not self.skipped_files and not self.skipped_maps:
            return EXIT_OK if self.n_files else EXIT_FAILED
        return EXIT_SKIPPED if self.n_files else EXIT_FAILED


def dropped_path(out: str | os.PathLike) -> Path:
    """The list of dropped objects beside the predictions CSV.

    Parameters
    ----------
    out : path
        The predictions CSV, e.g. ``preds.csv``.

    Returns
    -------
    Path
        ``preds.dropped.csv`` in the same folder.
    """
    out = Path(out)
    return out.with_name(f"{out.stem}.dropped{out.suffix or '.csv'}")


def expand_exports(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Export files named in ``paths``: files as given, folders walked (export suffixes, sorted);
    each file once.

    Parameters
    ----------
    paths : iterable of str or os.PathLike
        Files and folders; a missing file is kept and reported when it is read.

    Returns
    -------
    list of Path
        The files, in order, without repeats.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [found.path for found in discover([path], label="-")]
        else:
            files.append(path)  # a missing file is reported when it is read
    return list(dict.fromkeys(files))


def ingest_options(model, **user) -> IngestOptions:
    """IngestOptions for ``model``: its preprocessing (pixel size, size, background, alpha) plus the
    user's reading options and metadata (``units``, ``wavelength_nm``, ``pixel_size_um``, ``var``, ...).

    Parameters
    ----------
    model : SavedModel
        A loaded model (:func:`opdcells.modelfolder.load_model`); its ``preprocess_config`` is used, so
        new maps are preprocessed as the training maps were.
    **user
        Reading options and metadata (wavelength in nm, pixel size in um, ...); None values are left out.

    Returns
    -------
    IngestOptions

    Raises
    ------
    TypeError
        For an option IngestOptions does not take.
    ValueError
        For an invalid value (units, numbers, sideband, ...).
    """
    return IngestOptions(**{k: v for k, v in user.items() if v is not None}, config=model.preprocess_config)


def csv_columns(class_names, ood_columns: Iterable[str] = ()) -> list[str]:
    """The header of the predictions CSV (the one place it is built; :func:`csv_row` fills it).

    Parameters
    ----------
    class_names : sequence of str
        The model's classes: one ``p_<class>`` probability column each.
    ood_columns : iterable of str
        Out-of-distribution columns, last: ``OOD_COLUMNS`` for a model with a detector, else none.

    Returns
    -------
    list of str
        ``ID_COLUMNS``, ``POSITION_COLUMNS`` (px and um), ``MEASURE_COLUMNS`` (pg, um^2), ``predicted``,
        the probabilities, then ``ood_columns``.
    """
    return [*ID_COLUMNS, *POSITION_COLUMNS, *MEASURE_COLUMNS, "predicted",
            *(f"p_{name}" for name in class_names), *ood_columns]


def _blank(value) -> str:
    """CSV text of ``value``; empty for None (not known)."""
    return "" if value is None else str(value)


def position_values(processed: ProcessedMap) -> list[str]:
    """cell, object and the POSITION_COLUMNS of a map (empty for whole maps).

    Parameters
    ----------
    processed : ProcessedMap
        A preprocessed map; its ``position`` is set for cells cut from fields of view.

    Returns
    -------
    list of str
        ``2 + len(POSITION_COLUMNS)`` values: cell number, object label, centroid (px, then um) and the
        crop window (px); all empty strings when the map is a whole single-cell export.
    """
    pos = processed.position
    if pos is None:
        return [""] * (2 + len(POSITION_COLUMNS))
    return [str(pos.cell), str(pos.label), *(f"{v:.6g}" for v in (*pos.centroid_px, *pos.centroid_um)),
            *map(str, pos.bbox)]


def csv_row(path: Path, index: int, processed: ProcessedMap, proba: np.ndarray, class_names,
            ood_values: Iterable = ()) -> list:
    """One row of the predictions CSV, in :func:`csv_columns` order.

    Parameters
    ----------
    path : Path
        The export.
    index : int
        The map inside it.
    processed : ProcessedMap
        The map as preprocessing made it (dry mass, area, ``position`` in its field or None).
    proba : (K,) array
        The model's class probabilities.
    class_names : sequence of str
        The model's K classes.
    ood_values : iterable
        Values of the OOD columns (empty for models without a detector).

    Returns
    -------
    list
        CSV fields (numbers as text with 6 significant digits, empty where not recorded).
    """
    return [storable_text(str(path)), index, *position_values(processed),   # CSV is UTF-8
            f"{processed.dry_mass_pg:.6g}", f"{processed.area_um2:.6g}",
            class_names[int(np.argmax(proba))], *(f"{v:.6g}" for v in proba), *ood_values]


def dropped_row(dropped: Dropped) -> list:
    """One row of ``OUT.dropped.csv``, in ``DROPPED_COLUMNS`` order.

    Parameters
    ----------
    dropped : Dropped
        A map, cell or object that yields no prediction.

    Returns
    -------
    list
        File, index, cell, object, crop window (px; blank when unknown) and the reason, as storable text.
    """
    bbox = dropped.bbox or ("",) * 4
    return [storable_text(str(dropped.path)), _blank(dropped.index), _blank(dropped.cell),
            _blank(dropped.label), *bbox, storable_text(dropped.reason)]


@dataclass
class ExportMaps:
    """What reading one export gave (:func:`read_export`), in the order the maps lie in the file.

    Attributes
    ----------
    path : Path
        The export.
    maps : list of (int, ProcessedMap)
        Source index and preprocessed map of every usable map (or cell).
    pixel_sizes : list of float
        The export's pixel sizes (um), for the log line on resampling.
    skipped_maps : list of str
        "path [map i]: reason" of every bad map.
    dropped : list of Dropped
        Every map, cell or object that yields no map, in the order met.
    error : str or None
        Why the whole file failed (ExportError's reason), else None; its maps are then not to be used.
    morphology : (n_maps, F) array or None
        ``opdcells.features.feature_matrix`` of ``maps`` (``F = len(FEATURE_NAMES)``) when asked for.
    """

    path: Path
    maps: list[tuple[int, ProcessedMap]] = field(default_factory=list)
    pixel_sizes: list[float] = field(default_factory=list)
    skipped_maps: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    error: str | None = None
    morphology: np.ndarray | None = None


def read_export(path: str | os.PathLike, options: IngestOptions, morphology: bool = False) -> ExportMaps:
    """Read and preprocess every map of one export; never raises for a bad file (see ``error``).

    Parameters
    ----------
    path : path
        The export.
    options : IngestOptions
        Reading options and preprocessing (:func:`ingest_options`).
    morphology : bool
        Also measure each map's morphology features (the OOD detector's ``morphology`` block), so
        they are made in the reading processes.

    Returns
    -------
    ExportMaps
        Picklable: it travels back from a worker process.
    """
    read = ExportMaps(Path(path))
    try:
        for index, processed, meta in iter_processed(read.path, options, on_error=read_error(read),
                                                     on_drop=read.dropped.append):
            if meta.pixel_size_um not in read.pixel_sizes:
                read.pixel_sizes.append(meta.pixel_size_um)
            read.maps.append((index, processed))
        if not read.maps:
            raise ExportError(read.path, "no usable map" + (" (no cells found)" if options.fields else ""))
    except ExportError as exc:
        read.error = exc.reason
        return read
    if morphology:
        from .features import feature_matrix

        read.morphology = feature_matrix([p.opd for _, p in read.maps], options.config.out_pixel_size_um)[0]
    return read


def read_error(read: ExportMaps):
    """``on_error`` of :func:`read_export`: a bad map is kept as text (exceptions of opdcells do not
    pickle), and logged by :meth:`FileBatches.add_read` in the main process (a worker's log is not
    shown).

    Parameters
    ----------
    read : ExportMaps
        The file being read; each error's text is appended to its ``skipped_maps``.

    Returns
    -------
    callable
        ``on_error(exc)``.
    """
    return lambda exc: read.skipped_maps.append(str(exc))


def default_workers() -> int:
    """Reading processes by default: the cores this process may run on.

    Returns
    -------
    int
        The CPUs of this process's affinity mask (``os.cpu_count()`` where there is none), at least 1.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def read_exports(paths: Sequence[Path], options: IngestOptions, *, workers: int = 1,
                 morphology: bool = False) -> Iterator[ExportMaps]:
    """:func:`read_export` of each of ``paths``, in order, read by ``workers`` processes.

    At most ``2 * workers`` files are read ahead of the one being consumed (a bounded queue: memory
    stays at a few files' maps whatever the sample's size). Results are those of one process, in the
    same order. Workers are started by a fork server: the caller's TensorFlow threads are not forked.

    Parameters
    ----------
    paths : sequence of Path
        The export files.
    options : IngestOptions
        Reading options, metadata and preprocessing.
    workers : int
        Reading processes; 1 (or one file) reads in this process.
    morphology : bool
        Also compute each map's morphology features (:attr:`ExportMaps.morphology`).

    Yields
    ------
    ExportMaps
        One per path, in the order of ``paths``; a bad file is reported in its ``error``, not raised.
    """
    workers = min(workers, len(paths))
    if workers <= 1:
        yield from (read_export(path, options, morphology) for path in paths)
        return
    ahead: collections.deque = collections.deque()
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        queue = iter(paths)
        for path in queue:
            ahead.append(pool.submit(read_export, path, options, morphology))
            if len(ahead) >= 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _note_resampling(pixel_size_um: float, options: IngestOptions, seen: set) -> None:
    """Log once per export pixel size that maps are resampled to the model's."""
    model_px = options.config.out_pixel_size_um
    if pixel_size_um in seen:
        return
    seen.add(pixel_size_um)
    if not math.isclose(pixel_size_um, model_px, rel_tol=1e-6):
        log.info("exports at %g um/px are resampled to the model's %g um/px (dry mass and area are measured "
                 "before, at the exports' own pixel size)", pixel_size_um, model_px)


class FileBatches(abc.ABC):
    """Maps of several files gathered into batches of ``batch_size``; the rows :meth:`rows_of` makes of a
    batch are kept per file, and written in file order once complete (used by ``predict`` and ``screen``).
    Each map may carry its morphology features (:attr:`ExportMaps.morphology`).

    Parameters
    ----------
    batch_size : int
        Maps per call of :meth:`rows_of` (the model's batch); a batch may span files.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.maps: list[np.ndarray] = []
        self.morphology: list[np.ndarray | None] = []
        self.keys: list[tuple[Path, int, ProcessedMap]] = []
        self.rows: dict[Path, list] = {}

    def add(self, path: Path, index: int, processed: ProcessedMap,
            morphology: np.ndarray | None = None) -> None:
        self.rows.setdefault(path, [])
        self.maps.append(processed.opd)
        self.morphology.append(morphology)
        self.keys.append((path, index, processed))
        if len(self.maps) >= self.batch_size:
            self.flush()

    @abc.abstractmethod
    def rows_of(self, maps: np.ndarray, keys: list[tuple[Path, int, ProcessedMap]],
                morphology: np.ndarray | None = None) -> list:
        """One row per map of a batch, ``maps`` (N, S, S) with their ``keys`` (path, index, ProcessedMap)
        and, when every map carries it, their morphology features (N, F)."""

    def flush(self) -> None:
        if not self.maps:
            return
        morphology = (np.stack(self.morphology) if all(m is not None for m in self.morphology) else None)
        rows = self.rows_of(np.stack(self.maps), self.keys, morphology)
        for (path, _, _), row in zip(self.keys, rows, strict=True):
            self.rows[path].append(row)
        self.maps.clear()
        self.morphology.clear()
        self.keys.clear()

    def pending(self, path: Path) -> bool:
        return any(key[0] == path for key in self.keys)

    def add_read(self, read: ExportMaps, options: IngestOptions, result, pixel_sizes: set) -> bool:
        """Add the maps of one read export; a file that failed, or yielded no map, adds nothing and is
        logged and recorded in ``result`` (``skipped_files``, ``dropped``), as are its bad maps.

        Returns
        -------
        bool
            Whether the file was read completely.
        """
        for skipped in read.skipped_maps:
            log.warning("skipped %s", skipped)
        result.skipped_maps += read.skipped_maps
        result.dropped += read.dropped
        if read.error is not None:
            exc = ExportError(read.path, read.error)
            log.warning("skipped %s", exc)
            result.skipped_files.append(str(exc))
            result.dropped.append(Dropped(read.path, None, None, None, None, read.error))
            return False
        for pixel_size in read.pixel_sizes:
            _note_resampling(pixel_size, options, pixel_sizes)
        features = read.morphology if read.morphology is not None else [None] * len(read.maps)
        for (index, processed), morphology in zip(read.maps, features, strict=True):
            self.add(read.path, index, processed, morphology)
        return True


class _Batcher(FileBatches):
    """Batches for ``predict_proba``: rows of the predictions CSV (:func:`csv_row`)."""

    def __init__(self, model, batch_size: int, tta: bool | None = None):
        super().__init__(batch_size)
        self.model, self.tta = model, tta
        self.ood = PredictionCheck(model)   # ood_score, ood_flag (none for models without ood.npz)

    def rows_of(self, maps: np.ndarray, keys, morphology=None) -> list:
        proba = self.model.predict_proba(maps, batch_size=self.batch_size, tta=self.tta)
        names, ood = self.model.class_names, self.ood.values(maps, morphology)
        return [csv_row(path, index, processed, p, names, extra)
                for (path, index, processed), p, extra in zip(keys, proba, ood, strict=True)]


@contextlib.contextmanager
def _atomic_csv(path: Path) -> Iterator[csv.writer]:
    """A CSV writer on a temporary file beside ``path``, renamed over it only when the block completes
    (an interrupted or failed run leaves ``path`` as it was, and no temporary file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "x", newline="", encoding="utf-8") as fh:
            yield csv.writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _log_model_geometry(model, options: IngestOptions) -> None:
    """Say at which geometry maps are made (the model's), and repeat any geometry warning of its encoder."""
    config = options.config
    log.info("maps are made at %s's geometry: %d px at %g um/px (a %g um window), as it was trained",
             model.name, config.out_size, config.out_pixel_size_um,
             config.out_size * config.out_pixel_size_um)
    warning = model.config.get("model_info", {}).get("geometry_warning")
    if warning:
        log.warning("model %s: %s", model.name, warning)


def _summarise_dropped(result: PredictResult) -> None:
    """One log line: how many objects were dropped, by reason, and where they are listed."""
    if not result.dropped:
        return
    kinds = collections.Counter(_reason_kind(d.reason) for d in result.dropped)
    n = len(result.dropped)
    log.info("%d %s dropped (%s); listed in %s", n, "object" if n == 1 else "objects",
             ", ".join(f"{k} {kind}" for kind, k in kinds.most_common()), result.dropped_out)


def _reason_kind(reason: str) -> str:
    """The first clause of a reason ("segmentation: too small", "implausible cell", ...)."""
    head = reason.split(";")[0]
    if head.startswith("segmentation: "):
        return head.split(" (")[0]
    return head.split(":")[0].split(" (")[0][:60]


def predict_files(model, paths: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                  options: IngestOptions | None = None, batch_size: int = 64, tta: bool | None = None,
                  workers: int = 1, progress: bool = False) -> PredictResult:
    """Predict every map of the exports ``paths`` with ``model``; write the CSV ``out`` and the list of
    dropped objects beside it (:func:`dropped_path`).

    Parameters
    ----------
    model : opdcells.modelfolder.SavedModel
        The model; maps are made at its pixel size and window (:func:`ingest_options`).
    paths : iterable of path
        Export files or folders (walked).
    out : path
        The predictions CSV (columns :func:`csv_columns`); replaced atomically.
    options : IngestOptions, optional
        How to read the exports (default: the model's preprocessing, nothing else given).
    batch_size : int
        Maps per ``predict_proba`` call; maps of consecutive files share batches.
    tta : bool, optional
        Test-time augmentation as in ``SavedModel.predict_proba`` (default: the model's own setting).
    workers : int
        Processes reading and preprocessing the exports (:func:`read_exports`); the CSV is the same
        for any number.
    progress : bool
        Show a progress bar over the files.

    Returns
    -------
    PredictResult
        A file's rows are written only once the whole file has been read (a file failing half-way leaves
        no rows, and a ``dropped`` row for the file).
    """
    from tqdm import tqdm

    options = options or ingest_options(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = PredictResult(out)
    batcher = _Batcher(model, batch_size, tta)
    done: list[Path] = []   # files read completely whose rows are not written yet
    pixel_sizes: set = set()
    _log_model_geometry(model, options)

    def write_done(writer, final: bool = False) -> None:
        while done and (final or not batcher.pending(done[0])):
            rows = batcher.rows.pop(done.pop(0))
            writer.writerows(rows)
            batcher.ood.written(rows)
            result.n_files += 1
            result.n_maps += len(rows)

    with _atomic_csv(out) as writer:
        writer.writerow(csv_columns(model.class_names, batcher.ood.columns))
        files = expand_exports(paths)
        reads = read_exports(files, options, workers=workers, morphology=batcher.ood.morphology)
        for read in tqdm(reads, total=len(files), unit="file", disable=not progress, mininterval=0.5):
            if not batcher.add_read(read, options, result, pixel_sizes):
                continue
            done.append(read.path)
            write_done(writer)
        batcher.flush()
        write_done(writer, final=True)
        with _atomic_csv(result.dropped_out) as dropped_writer:
            dropped_writer.writerow(DROPPED_COLUMNS)
            dropped_writer.writerows(dropped_row(d) for d in result.dropped)
    log.info("%s: %d maps from %d files predicted with %s; %d files skipped", out, result.n_maps,
             result.n_files, model.name, len(result.skipped_files))
    _summarise_dropped(result)
    if batcher.ood.summary():
        log.info("%s", batcher.ood.summary())
    return result
