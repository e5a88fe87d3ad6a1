"""Predict the class of every map in new export files with a saved model.

Exports go through :func:`opdcells.ingest.iter_processed` -- the same readers, metadata checks and
preprocessing as ``load_data.py`` -- with the output pixel size and map size taken from the model's
config, so the model sees maps made exactly like its training maps. Maps are predicted in batches;
the CSV has one row per map (or per cell with ``fields``): ``file, index, cell, predicted`` and one
``p_<class>`` probability column per class. A bad file is reported and skipped, never fatal.
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .console import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED
from .errors import ExportError, storable_text
from .ingest import IngestOptions, discover, iter_processed

log = logging.getLogger(__name__)

__all__ = ["PredictResult", "predict_files", "expand_exports", "ingest_options", "csv_columns"]


@dataclass
class PredictResult:
    """What :func:`predict_files` did: the CSV, counts and every skipped file or map ("path: reason")."""

    out: Path
    n_maps: int = 0
    n_files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    skipped_maps: list[str] = field(default_factory=list)

    @property
    def status(self) -> int:
        """0 all predicted, 1 some files or maps skipped, 2 nothing predicted (like load_data.py)."""
        if not self.skipped_files and not self.skipped_maps:
            return EXIT_OK if self.n_files else EXIT_FAILED
        return EXIT_SKIPPED if self.n_files else EXIT_FAILED


def expand_exports(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Export files named in ``paths``: files as given, folders walked (export suffixes, sorted);
    each file once."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [found.path for found in discover([path], label="-")]
        else:
            files.append(path)  # a missing file is reported when it is read
    return list(dict.fromkeys(files))


def ingest_options(model, **user) -> IngestOptions:
    """IngestOptions for ``model``: its preprocessing (pixel size, size, background, alpha) plus the
    user's reading options and metadata (``units``, ``wavelength_nm``, ``pixel_size_um``, ``var``, ...)."""
    return IngestOptions(**{k: v for k, v in user.items() if v is not None}, config=model.preprocess_config)


def csv_columns(class_names) -> list[str]:
    return ["file", "index", "cell", "predicted", *(f"p_{name}" for name in class_names)]


def _maps_of(path: Path, options: IngestOptions,
             result: PredictResult) -> Iterator[tuple[int, int, np.ndarray]]:
    """(source index, cell number, OPD map) of every usable map of one export; bad maps are reported."""
    def bad_map(exc: ExportError) -> None:
        log.warning("skipped %s", exc)
        result.skipped_maps.append(str(exc))

    last, cell = None, 0
    for index, processed, _meta in iter_processed(path, options, on_error=bad_map):
        cell = cell + 1 if index == last else 0
        last = index
        yield index, cell, processed.opd


class _Batcher:
    """Maps of several files gathered into batches for ``predict_proba``; rows are kept per file so a
    file that fails half-way can be dropped whole, and written in file order once complete."""

    def __init__(self, model, batch_size: int, tta: bool | None = None):
        self.model, self.batch_size, self.tta = model, batch_size, tta
        self.maps: list[np.ndarray] = []
        self.keys: list[tuple[Path, int, int]] = []
        self.rows: dict[Path, list[list]] = {}

    def add(self, path: Path, index: int, cell: int, opd: np.ndarray) -> None:
        self.rows.setdefault(path, [])
        self.maps.append(opd)
        self.keys.append((path, index, cell))
        if len(self.maps) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.maps:
            return
        proba = self.model.predict_proba(np.stack(self.maps), batch_size=self.batch_size, tta=self.tta)
        names = self.model.class_names
        for (path, index, cell), p in zip(self.keys, proba, strict=True):
            predicted = names[int(np.argmax(p))]
            self.rows[path].append([storable_text(str(path)), index, cell, predicted,  # CSV is UTF-8
                                    *(f"{v:.6g}" for v in p)])
        self.maps.clear()
        self.keys.clear()

    def drop(self, path: Path) -> None:
        keep = [i for i, key in enumerate(self.keys) if key[0] != path]
        self.maps = [self.maps[i] for i in keep]
        self.keys = [self.keys[i] for i in keep]
        self.rows.pop(path, None)

    def pending(self, path: Path) -> bool:
        return any(key[0] == path for key in self.keys)


def predict_files(model, paths: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                  options: IngestOptions | None = None, batch_size: int = 64, tta: bool | None = None,
                  progress: bool = False) -> PredictResult:
    """Predict every map of the exports ``paths`` (files or folders) with ``model`` (a SavedModel);
    write the CSV ``out``. Maps of consecutive files share batches; a file's rows are written only once
    the whole file has been read (a file failing half-way leaves no rows). ``tta``: test-time
    augmentation as in ``SavedModel.predict_proba`` (default: the model's own setting)."""
    from tqdm import tqdm

    options = options or ingest_options(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = PredictResult(out)
    batcher = _Batcher(model, batch_size, tta)
    done: list[Path] = []   # files read completely whose rows are not written yet

    def write_done(writer, final: bool = False) -> None:
        while done and (final or not batcher.pending(done[0])):
            rows = batcher.rows.pop(done.pop(0))
            writer.writerows(rows)
            result.n_files += 1
            result.n_maps += len(rows)

    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(csv_columns(model.class_names))
        for path in tqdm(expand_exports(paths), unit="file", disable=not progress, mininterval=0.5):
            n = 0
            try:
                for index, cell, opd in _maps_of(path, options, result):
                    batcher.add(path, index, cell, opd)
                    n += 1
                if n == 0:
                    raise ExportError(path, "no usable map" + (" (no cells found)" if options.fields
                                                               else ""))
            except ExportError as exc:
                batcher.drop(path)
                log.warning("skipped %s", exc)
                result.skipped_files.append(str(exc))
                continue
            done.append(path)
            write_done(writer)
        batcher.flush()
        write_done(writer, final=True)
    log.info("%s: %d maps from %d files predicted with %s; %d files skipped", out, result.n_maps,
             result.n_files, model.name, len(result.skipped_files))
    return result
