"""Operating points set on a negative control: ``python -m opdcells calibrate-threshold``.

A negative control is a sample with no target cells -- healthy donor blood, or a blood-only fraction --
imaged on the same instrument and day as the sample to be screened; clinical assays set their cut-off on
it. :func:`calibrate_control` scores the control exactly as ``screen`` scores a sample
(:func:`opdcells.screen.screen_files`, whose outputs for the control are kept in ``OUT/control/``), sets
the threshold for the wanted false-positive rate on the control's in-distribution scores
(:func:`opdcells.calibration.control_point`) and writes it as ``OUT/operating_point.json``
(:func:`opdcells.calibration.save_operating_point`), which ``screen --operating-point`` reads. The model
folder is never written to.

The threshold is the Neyman-Pearson order statistic of the control (Tong, Feng and Li 2018, Sci. Adv.
4:eaao1659): the false-positive rate on new blood cells of the session is at most ``fpr`` with
probability ``confidence`` (default 0.95, ``--fpr-confidence``). A control too small for that (fewer than
:func:`opdcells.calibration.negatives_needed` in-distribution maps, 2,995 for 1e-3 at 0.95) is refused
with the size needed (the control's screening outputs stay in ``OUT/control/``; no operating point is
written).

Maps the out-of-distribution detector flags in the control are left out of the threshold: a screen never
flags such maps, so a debris-like control map with a high score must not raise the threshold, and the
rate is per in-distribution map (a screen's expected false positives are its in-distribution maps times
that rate).

Test-time augmentation refines the maps near the threshold only (:func:`opdcells.screen.near_threshold`),
so the control is first scored around the validation threshold; when the control's threshold lies lower,
the maps near it were not all refined, and the control is scored again around its own threshold, so its
scores are those ``screen --operating-point`` gives the sample's maps.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .calibration import (
    DEFAULT_CONFIDENCE,
    OperatingPoint,
    apply_temperature,
    control_point,
    load_validation_scores,
    negatives_needed,
    save_operating_point,
    target_score,
)
from .errors import ScreenError
from .ingest import IngestOptions
from .screen import ScreenResult, screen_files, screen_settings

log = logging.getLogger(__name__)

#: The operating-point file ``calibrate-threshold`` writes into its ``--out`` folder.
POINT_FILE = "operating_point.json"
#: Sub-folder of ``--out`` with the control's own screening outputs (scores.csv, report.html, ...).
CONTROL_SCREEN = "control"


@dataclasses.dataclass
class ControlResult:
    """What :func:`calibrate_control` did.

    Attributes
    ----------
    point : OperatingPoint
        The control's operating point (``source="control"``).
    path : Path
        The operating-point file written.
    screen : ScreenResult or None
        The control's screening run (its outputs in ``OUT/control/``; None when an earlier one was used).
    passes : int
        Scoring passes over the control (2 when its threshold lay below the validation one).
    """

    point: OperatingPoint
    path: Path
    screen: ScreenResult | None
    passes: int


def control_scores(folder: str | os.PathLike) -> tuple[np.ndarray, int, list[str]]:
    """The in-distribution target scores of a screen's ``scores.csv``, the number of maps it vetoed as out
    of distribution, and its files.

    Parameters
    ----------
    folder : path
        A screen's output folder.

    Returns
    -------
    (scores, n_out_of_distribution, files)
        ``scores`` (n,) float64: ``p_target`` as written (6 significant digits, as a screen compares it).
    """
    with open(Path(folder) / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    ood = np.asarray([r["ood_flag"] == "True" for r in rows], dtype=bool)
    scores = np.asarray([float(r["p_target"]) for r in rows], dtype=np.float64)
    return scores[~ood], int(ood.sum()), sorted({r["file"] for r in rows})


def _validation_positives(model, targets: list[str], temperature: float):
    """Calibrated target scores and groups of the model's validation target maps (None, None if not kept)."""
    kept = load_validation_scores(model.folder)
    if kept is None:
        return None, None
    score = target_score(apply_temperature(kept["proba"], temperature), model.class_names, targets)
    is_target = np.isin(kept["labels"], [model.class_names.index(t) for t in targets])
    return score[is_target], kept["groups"][is_target]


def calibrate_control(model, paths: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                      options: IngestOptions, fpr: float | None = None,
                      confidence: float = DEFAULT_CONFIDENCE, targets: list[str] | None = None, ood=None,
                      batch_size: int = 256, workers: int = 1, n_boot: int = 500, progress: bool = False,
                      screened: str | os.PathLike | None = None) -> ControlResult:
    """Score a negative control and write the operating point for ``fpr`` set on it.

    Parameters
    ----------
    model : SavedModel
        A loaded, calibrated model (:func:`opdcells.modelfolder.load_model`).
    paths : iterable of paths
        The control's export files or folders (blood only, the sample's session).
    out : path
        Output folder: ``operating_point.json`` (must not exist yet) and ``control/`` (the control's
        screening outputs).
    options : IngestOptions
        Reading options and the model's preprocessing (:func:`opdcells.predict.ingest_options`).
    fpr : float, optional
        Wanted false-positive rate (default: the model's operating point's, 1e-3).
    confidence : float
        Wanted probability that the rate on new non-target maps is at most ``fpr`` (0.95; 0.5 gives about
        the control's plain ``1 - fpr`` quantile).
    targets : list of str, optional
        Target classes (default: the model's).
    ood : callable, optional
        The model's out-of-distribution check (:func:`opdcells.screen.ood_check`).
    batch_size : int
        Maps per inference batch.
    workers : int
        Reading processes.
    n_boot : int
        Bootstrap replicates of the threshold's interval.
    progress : bool
        Show a progress bar.
    screened : path, optional
        An earlier screen of the control with this model at its validation operating point (a ``control/``
        folder this function wrote): its scores are used instead of scoring the control again, unless the
        threshold comes out below that screen's (then the control is scored again into ``OUT/control/``).

    Returns
    -------
    ControlResult

    Raises
    ------
    ScreenError
        ``OUT/operating_point.json`` exists, the model cannot screen
        (:func:`opdcells.screen.screen_settings`), no control map was read or all were out of
        distribution, or the control is too small for ``fpr`` at ``confidence`` (the message names the
        size needed; :func:`opdcells.calibration.control_too_small`).
    """
    out = Path(out)
    path = out / POINT_FILE
    if path.exists():
        raise ScreenError(path, "exists: choose another --out (an operating point is never overwritten)")
    settings = screen_settings(model, targets=targets, fpr=fpr)
    try:       # a rate or confidence outside (0, 1) is refused before the control is scored
        needed = negatives_needed(settings.point.fpr, confidence)
    except ValueError as err:
        raise ScreenError(out, str(err)) from err
    log.info("a false-positive rate of %g at %g confidence needs at least %d in-distribution control maps",
             settings.point.fpr, confidence, needed)
    positives, groups = _validation_positives(model, settings.targets, settings.temperature)
    screen_dir, passes, result = out / CONTROL_SCREEN, 0, None
    while True:
        passes += 1
        if screened is not None and passes == 1:
            screen_dir = Path(screened)
        else:
            screen_dir = out / CONTROL_SCREEN
            result = screen_files(model, paths, screen_dir, settings, options=options, ood=ood,
                                  batch_size=batch_size, workers=workers, progress=progress)
            if not result.n_maps:
                raise ScreenError(out, "no map of the control could be read (see control/scores.dropped.csv)")
        scores, n_ood, files = control_scores(screen_dir)
        try:
            point = control_point(scores, settings.point.fpr, confidence=confidence,
                                  n_out_of_distribution=n_ood, validation_positives=positives,
                                  positive_groups=groups, files=files, n_boot=n_boot)
        except ValueError as err:
            raise ScreenError(out, f"control: {err}") from err
        if passes > 1 or point.threshold >= settings.point.threshold:
            break
        log.info("the control's threshold %.4g lies below the validation threshold %.4g: scoring the control "
                 "again around its own threshold", point.threshold, settings.point.threshold)
        settings = dataclasses.replace(settings, point=point)
    out.mkdir(parents=True, exist_ok=True)
    save_operating_point(path, point, model=model, targets=settings.targets, temperature=settings.temperature)
    log.info("operating point for a false-positive rate of %g at %g confidence: threshold %.4g (95%% CI "
             "%.4g-%.4g), %s; control rate %d/%d", point.fpr, confidence, point.threshold,
             *point.threshold_ci, point.basis, point.control["n_above"], point.control["n_in_distribution"])
    return ControlResult(point, path, result, passes)
