"""Rare-cell screening: score every map of a sample, flag the target cells at a stated false-positive rate.

``python -m opdcells screen MODEL EXPORTS... --out DIR`` reads exports like ``predict`` (the same ingest
path and reading options), scores each map with the model's calibrated probability of a target class
(:mod:`opdcells.calibration`: temperature and operating point fitted on the model's validation groups),
and writes to ``DIR``:

* ``scores.csv``: one row per map: ``file, index, cell, p_target, predicted, dry_mass_pg, area_um2,
  ood_score, ood_flag, flagged`` (``flagged``: at or above the threshold and not out of distribution);
* ``candidates.csv``: the flagged rows, most probable first;
* ``summary.json``: maps read and skipped, flagged, the operating point, the expected false positives
  and purity at ``prevalence``, maps per second;
* ``report.html``: one self-contained page with the candidates as OPD thumbnails, the score histogram
  with the threshold and the run's settings;
* ``candidates.npz``: the candidates' maps (float16), so shard outputs can be merged into one report.

Speed: maps are predicted in large batches without test-time augmentation; only maps whose score comes
within :data:`REFINE_MARGIN_LOGIT` of the threshold are predicted again with it (8 views). ``shard=(k, n)``
screens every n-th file starting with the k-th (1-based), for job arrays; :func:`merge_screens` joins
the shards' folders into the same outputs a single run gives.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import special

from .calibration import (
    DEFAULT_FPR,
    OperatingPoint,
    apply_temperature,
    default_targets,
    expected_yield,
    load_validation_scores,
    operating_point,
    target_score,
)
from .console import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED
from .errors import ScreenError, storable_text
from .ingest import Dropped, IngestOptions
from .predict import (
    DROPPED_COLUMNS,
    ID_COLUMNS,
    MEASURE_COLUMNS,
    POSITION_COLUMNS,
    FileBatches,
    dropped_row,
    expand_exports,
    position_values,
)

log = logging.getLogger(__name__)

#: Maps whose first-pass target score lies within this many logits below the threshold (or above it) are
#: predicted again with test-time augmentation; the rest keep their fast score.
REFINE_MARGIN_LOGIT = 2.0
#: Default prevalence of target cells for the expected purity (1 tumour cell in 10^5 blood cells).
DEFAULT_PREVALENCE = 1e-5
#: Candidates shown (and kept as maps) in the report, most probable first.
GALLERY_SIZE = 120
#: Columns of scores.csv: the map's identity, position and measures as in predict's CSV, then the screen's.
SCORE_COLUMNS = (*ID_COLUMNS, *POSITION_COLUMNS, *MEASURE_COLUMNS, "p_target", "predicted", "ood_score",
                 "ood_flag", "flagged")



@dataclass
class ScreenSettings:
    """What a screening run uses.

    Attributes
    ----------
    targets : list of str
        Target (cancer) classes of the model; the score is their summed calibrated probability.
    temperature : float
        Calibration temperature of the model (:func:`opdcells.calibration.fit_temperature`).
    point : OperatingPoint
        Threshold for the false-positive rate, set on the model's validation maps.
    prevalence : float
        Assumed fraction of target cells, for the expected false positives and purity.
    shard : (int, int)
        ``(k, n)``: this run screens files ``k-1, k-1+n, ...`` of the sorted file list.
    """

    targets: list[str]
    temperature: float
    point: OperatingPoint
    prevalence: float = DEFAULT_PREVALENCE
    shard: tuple[int, int] = (1, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "point": self.point.as_dict()}


def screen_settings(model, *, targets: Sequence[str] | None = None, fpr: float | None = None,
                    prevalence: float = DEFAULT_PREVALENCE,
                    shard: tuple[int, int] = (1, 1)) -> ScreenSettings:
    """The calibration and operating point of ``model`` for ``targets`` at ``fpr``.

    The operating point stored at training time is used when it fits; other targets or rates are set
    again on the validation scores kept in the model folder.

    Raises
    ------
    ScreenError
        The model has no calibration (trained before screening existed), a target is not one of its
        classes, no target class can be found, or a shard is not ``1 <= k <= n``.
    """
    record = model.config.get("calibration")
    if not record:
        raise ScreenError(model.folder, "the model has no calibration (it was trained before opdcells "
                                        "calibrated models): train it again to screen with it")
    names = model.class_names
    targets = list(targets or record.get("targets") or default_targets(names))
    unknown = [t for t in targets if t not in names]
    if unknown or not targets:
        raise ScreenError(model.folder, f"target classes {', '.join(unknown) or '(none found)'} are not "
                                        f"classes of the model ({', '.join(names)}); give --target")
    k, n = shard
    if not 1 <= k <= n:
        raise ScreenError(model.folder, f"shard {k}/{n}: K must be between 1 and N")
    stored = record.get("operating_point")
    wanted = fpr if fpr is not None else (stored or {}).get("fpr", DEFAULT_FPR)
    if stored and stored["fpr"] == wanted and targets == record.get("targets"):
        point = OperatingPoint.from_dict(stored)
    else:
        point = _new_point(model, record["temperature"], targets, wanted)
    return ScreenSettings(targets, float(record["temperature"]), point, prevalence, shard)


def _new_point(model, temperature: float, targets: list[str], fpr: float) -> OperatingPoint:
    scores = load_validation_scores(model.folder)
    if scores is None:
        raise ScreenError(model.folder, "the model keeps no validation scores, so no operating point can be "
                                        "set for other targets or rates; use its own (leave out --target "
                                        "and --fpr) or train it again")
    calibrated = apply_temperature(scores["proba"], temperature)
    is_target = np.isin(scores["labels"], [model.class_names.index(t) for t in targets])
    try:
        return operating_point(target_score(calibrated, model.class_names, targets), is_target, fpr,
                               groups=scores["groups"])
    except ValueError as err:
        raise ScreenError(model.folder, str(err)) from err


@dataclass
class ScreenResult:
    """What :func:`screen_files` did: the output folder, counts, and every skipped file or map."""

    out: Path
    n_maps: int = 0
    n_files: int = 0
    n_flagged: int = 0
    n_ood: int = 0
    skipped_files: list[str] = field(default_factory=list)
    skipped_maps: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> int:
        """0 all screened, 1 some files or maps skipped, 2 nothing screened (like load_data.py)."""
        if not self.n_files:
            return EXIT_FAILED
        return EXIT_SKIPPED if self.skipped_files or self.skipped_maps else EXIT_OK


class _Scorer(FileBatches):
    """Batches scored by a fast pass, refined near the threshold; keeps the candidates' maps."""

    def __init__(self, model, settings: ScreenSettings, ood, batch_size: int):
        super().__init__(batch_size)
        self.model, self.settings, self.ood = model, settings, ood
        self.kept: dict[tuple, np.ndarray] = {}  # candidate maps by (file, index, cell)

    def score(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities and target scores; maps near the threshold refined with TTA."""
        s = self.settings
        proba = apply_temperature(self.model.predict_proba(maps, self.batch_size, tta=False), s.temperature)
        p_target = target_score(proba, self.model.class_names, s.targets)
        near = special.logit(np.clip(p_target, 1e-9, 1 - 1e-9)) >= (
            special.logit(np.clip(s.point.threshold, 1e-9, 1 - 1e-9)) - REFINE_MARGIN_LOGIT)
        if near.any() and self.model.tta:
            refined = self.model.predict_proba(maps[near], self.batch_size, tta=True)
            proba[near] = apply_temperature(refined, s.temperature)
            p_target[near] = target_score(proba[near], self.model.class_names, s.targets)
        return proba, p_target

    def rows_of(self, maps: np.ndarray, keys) -> list[dict]:
        proba, p_target = self.score(maps)
        ood_score, ood_flag = self.ood(maps) if self.ood else (np.full(len(maps), np.nan),
                                                              np.zeros(len(maps), bool))
        names, rows = self.model.class_names, []
        for i, (path, index, processed) in enumerate(keys):
            flagged = bool(p_target[i] >= self.settings.point.threshold and not ood_flag[i])
            identity = [storable_text(str(path)), index, *position_values(processed)]
            row = dict(zip((*ID_COLUMNS, *POSITION_COLUMNS), identity, strict=True))
            row.update(dry_mass_pg=f"{processed.dry_mass_pg:.6g}", area_um2=f"{processed.area_um2:.6g}",
                       p_target=float(p_target[i]), predicted=names[int(np.argmax(proba[i]))],
                       ood_score=f"{ood_score[i]:.6g}", ood_flag=bool(ood_flag[i]), flagged=flagged)
            rows.append(row)
            if flagged:
                self.kept[_key(row)] = maps[i].astype(np.float16)
        return rows

    def drop(self, path: Path) -> list:
        rows = super().drop(path)
        for row in rows:
            self.kept.pop(_key(row), None)
        return rows


def ood_check(model):
    """``maps -> (score, flag)`` of the model's out-of-distribution detector (:mod:`opdcells.ood`), or None
    for a model saved without one (logged)."""
    from .ood import load_detector, model_inputs

    detector = load_detector(model)
    if detector is None:
        log.info("model %s has no out-of-distribution detector (ood.npz): no map is vetoed as unlike the "
                 "training data", model.name)
        return None

    def check(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = detector.score(model_inputs(model.learner, maps, model.config["pixel_size_um"]))
        return scores, np.asarray(detector.flag(scores), dtype=bool)

    return check


def shard_files(files: Sequence[Path], shard: tuple[int, int]) -> list[Path]:
    """Files of shard ``(k, n)``: every n-th of ``files`` starting with the k-th (1-based)."""
    k, n = shard
    return list(files[k - 1::n])


def screen_files(model, paths: Iterable[str | os.PathLike], out: str | os.PathLike, settings: ScreenSettings,
                 *, options: IngestOptions, ood=None, batch_size: int = 256,
                 progress: bool = False) -> ScreenResult:
    """Screen every map of the exports ``paths`` (files or folders) and write the outputs to ``out``.

    Parameters
    ----------
    model : SavedModel
    paths : iterable of paths
        Export files or folders (walked, sorted); ``settings.shard`` picks this run's share.
    out : path
        Output folder (created); its outputs are replaced atomically, file by file.
    settings : ScreenSettings
    options : IngestOptions
        Reading options and the model's preprocessing (:func:`opdcells.predict.ingest_options`).
    ood : callable, optional
        ``maps -> (score, flag)`` of the model's out-of-distribution detector.
    batch_size : int
        Maps per inference batch.

    Returns
    -------
    ScreenResult
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = ScreenResult(out)
    scorer = _Scorer(model, settings, ood, batch_size)
    files = shard_files(sorted(expand_exports(paths), key=str), settings.shard)
    start = time.perf_counter()
    read: list[Path] = []
    pixel_sizes: set = set()
    for path in tqdm(files, unit="file", disable=not progress, mininterval=0.5, desc="screening"):
        if scorer.add_file(path, options, result, pixel_sizes):
            read.append(path)
    scorer.flush()
    rows = [row for path in read for row in scorer.rows.get(path, [])]
    result.n_files, result.seconds = len(read), time.perf_counter() - start
    write_outputs(out, rows, scorer.kept, settings, result, model_name=model.name)
    return result


def _key(row: dict) -> tuple:
    """Identity of a row: (file, index, cell number; -1 for a whole map)."""
    return (row["file"], int(row["index"]), int(row["cell"]) if str(row["cell"]) != "" else -1)



def write_outputs(out: Path, rows: list[dict], kept: dict, settings: ScreenSettings, result: ScreenResult,
                  *, model_name: str) -> None:
    """Write scores.csv, candidates.csv, candidates.npz, summary.json and report.html (each atomically)."""
    rows = sorted(rows, key=_key)
    candidates = sorted((r for r in rows if _true(r["flagged"])),   # as written: shards merge identically
                        key=lambda r: (-float(f"{float(r['p_target']):.6g}"), *_key(r)))
    result.n_maps, result.n_flagged = len(rows), len(candidates)
    result.n_ood = sum(_true(r["ood_flag"]) for r in rows)
    _atomic_csv(out / "scores.csv", rows)
    _atomic_csv(out / "candidates.csv", candidates)
    _atomic(out / "scores.dropped.csv", lambda fh: _write_dropped(fh, result.dropped))
    gallery = candidates[:GALLERY_SIZE]
    keys = [_key(r) for r in gallery]
    maps = np.stack([kept[k] for k in keys]) if keys else np.zeros((0, 1, 1), np.float16)
    _atomic(out / "candidates.npz", lambda fh: np.savez_compressed(
        fh, maps=maps, files=np.asarray([k[0] for k in keys], dtype=str),
        index=np.asarray([k[1] for k in keys], dtype=np.int64),
        cell=np.asarray([k[2] for k in keys], dtype=np.int64)), binary=True)
    summary = _summary(rows, settings, result, model_name)
    _atomic(out / "summary.json", lambda fh: json.dump(summary, fh, indent=2))
    from .report import screening_report

    _atomic(out / "report.html", lambda fh: fh.write(screening_report(summary, gallery, maps, rows)))
    log.info("%s: %d maps screened, %d flagged (%d out of distribution not flagged), %.0f maps/s",
             out, result.n_maps, result.n_flagged, result.n_ood, summary["maps_per_second"] or 0)


def _true(value) -> bool:
    return value is True or str(value) in ("True", "true", "1")


def _summary(rows: list[dict], settings: ScreenSettings, result: ScreenResult, model_name: str) -> dict:
    n = len(rows)
    expected = expected_yield(n, settings.prevalence, settings.point)
    return {
        "model": model_name, "maps_read": n, "files_read": result.n_files,
        "files_skipped": len(result.skipped_files), "maps_skipped": len(result.skipped_maps),
        "skipped": result.skipped_files + result.skipped_maps,
        "flagged": result.n_flagged, "out_of_distribution": result.n_ood,
        "targets": settings.targets, "temperature": settings.temperature,
        "operating_point": settings.point.as_dict(), "prevalence": settings.prevalence,
        "expected_false_positives": expected["expected_false_positives"],
        "expected_true_positives": expected["expected_true_positives"],
        "expected_purity": expected["expected_purity"],
        "seconds": result.seconds, "maps_per_second": n / result.seconds if result.seconds > 0 else None,
        "shard": list(settings.shard), "settings": settings.as_dict(),
    }


def _atomic(path: Path, write, binary: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
        write(fh)
    os.replace(tmp, path)


def _write_dropped(fh, dropped: list[Dropped]) -> None:
    writer = csv.writer(fh)
    writer.writerow(DROPPED_COLUMNS)
    writer.writerows(sorted(map(dropped_row, dropped), key=lambda r: [str(v) for v in r]))


def _atomic_csv(path: Path, rows: list[dict]) -> None:
    def write(fh) -> None:
        writer = csv.DictWriter(fh, fieldnames=SCORE_COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "p_target": f"{float(r['p_target']):.6g}"} for r in rows)
    _atomic(path, write)


def merge_screens(folders: Sequence[str | os.PathLike], out: str | os.PathLike) -> ScreenResult:
    """Join the outputs of shard runs into the outputs one run over all files would have written.

    Raises
    ------
    ScreenError
        A folder without a screening summary, or shards screened with other settings or models.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [_read_summary(Path(f)) for f in folders]
    first = summaries[0]
    for folder, s in zip(folders, summaries, strict=True):
        if s["model"] != first["model"] or s["operating_point"] != first["operating_point"] \
                or s["targets"] != first["targets"]:
            raise ScreenError(folder, "screened with another model or operating point than "
                                      f"{folders[0]}: shards must share both")
    rows, kept, dropped = [], {}, []
    for folder in map(Path, folders):
        with open(folder / "scores.csv", newline="", encoding="utf-8") as fh:
            rows += list(csv.DictReader(fh))
        with open(folder / "scores.dropped.csv", newline="", encoding="utf-8") as fh:
            dropped += [_dropped_of(r) for r in csv.DictReader(fh)]
        with np.load(folder / "candidates.npz", allow_pickle=False) as data:
            for m, f, i, c in zip(data["maps"], data["files"], data["index"], data["cell"], strict=True):
                kept[(str(f), int(i), int(c))] = m
    settings = ScreenSettings(first["targets"], first["temperature"],
                              OperatingPoint.from_dict(first["operating_point"]), first["prevalence"], (1, 1))
    result = ScreenResult(out, n_files=sum(s["files_read"] for s in summaries),
                          seconds=sum(s["seconds"] for s in summaries))
    for s in summaries:
        result.skipped_files += s["skipped"][:s["files_skipped"]]
        result.skipped_maps += s["skipped"][s["files_skipped"]:]
    result.dropped = dropped
    write_outputs(out, rows, kept, settings, result, model_name=first["model"])
    return result


def _dropped_of(row: dict) -> Dropped:
    """A row of scores.dropped.csv read back (values as written, so rows are rewritten the same)."""
    bbox = tuple(row[k] for k in DROPPED_COLUMNS[4:8])
    return Dropped(row["file"], row["index"] or None, row["cell"] or None, row["object"] or None,
                   bbox if any(bbox) else None, row["reason"])


def _read_summary(folder: Path) -> dict:
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ScreenError(folder, f"not a screening output folder ({type(err).__name__}: {err})") from err
