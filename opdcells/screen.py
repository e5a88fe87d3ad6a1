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
  with the threshold and the run's settings; ``report.png``: the same report as one picture (headline
  figures, histogram, the first :data:`opdcells.report.FIGURE_CANDIDATES` candidates);
* ``candidates.npz``: the maps (float16) of the :data:`GALLERY_SIZE` best in-distribution maps at or above
  the validation threshold (the gallery's maps whatever the sample check decides), so shard outputs can
  be merged into one report.

The threshold: the operating point's, checked on the sample itself
(:func:`opdcells.calibration.sample_checked_threshold`): a rare-cell sample is nearly all non-target
cells, so when more of it scores above the validation threshold than ``fpr`` (plus ``prevalence``)
allows, that is logged and recorded (``summary.json`` ``threshold_check``), and with ``sample_check``
(``--sample-check``) the threshold is raised to the sample's own upper quantile. Merged shards check it
on all their maps together, as one run does. With an operating-point file (``operating_point``,
``--operating-point``, written by ``calibrate-threshold`` from a negative control of the sample's session,
:mod:`opdcells.control`) the threshold is the control's; ``summary.json`` ``threshold_source`` says which
threshold flagged the maps ("validation", "control" or "sample-check").

The false-positive guarantee: a threshold set on a negative control, or on a validation set of at least
:func:`opdcells.calibration.negatives_needed` non-target maps, lies at the Neyman-Pearson order statistic
(Tong, Feng and Li 2018): the rate on new non-target maps like those is at most ``fpr`` with probability
``fpr_confidence`` (0.95 by default; recorded in ``summary.json`` with the operating point's
``rate_at_threshold``: the order statistic, the observed rate with its interval). The summary's
``expected_false_positives`` are those that threshold will really give
(:func:`opdcells.calibration.expected_yield`): the non-target maps (in distribution, for a control's
rate) times the expected rate at the threshold, with its interval; for a validation threshold
extrapolated from fewer maps, only the upper bound those maps support (``expected_false_positives_basis``
says "upper bound"); after the sample check raised the threshold, at most the maps flagged.

Speed: exports are read and preprocessed by ``workers`` processes (:func:`opdcells.predict.read_exports`,
which, with ``ood_morphology="all"``, also measure the OOD detector's morphology features there), a
bounded number of files ahead; maps are predicted in large batches without test-time augmentation, one
encoder pass giving both the probabilities and the OOD embedding (:func:`encoder_pass`: the encoder
converted in memory for TensorFlow Lite, :func:`lite_encoder`, 2.7 times less CPU than the traced Keras
graph, its scores within float32 rounding of the model's; the Keras graph where it does not convert);
only maps whose score comes within :data:`REFINE_MARGIN_LOGIT` of the threshold (:func:`near_threshold`)
are predicted again with it (8 views, through the traced Keras model in calls of fixed shape,
:func:`tta_pass`: ``predict_proba(tta=True)`` to float32 rounding, so with a model that uses test-time
augmentation every map that can be flagged gets the Keras model's own score), and only theirs have the
OOD detector's morphology features measured, and those of the maps predicted as a target class
(``ood_morphology="near"``, the default; the other maps' ``ood_score`` is their embedding's: the flagged
maps and candidates, and the OOD flags of every map called a target class, are those of measuring every
map, which ``"all"`` does, in the reading processes). The command sizes the main process's thread pools to the
cores the readers leave (:func:`share_cores`). ``shard=(k, n)`` screens every n-th file starting with the
k-th (1-based), for job arrays; :func:`merge_screens` joins the shards' folders into the same outputs a
single run gives.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import special

from .calibration import (
    DEFAULT_CONFIDENCE,
    DEFAULT_FPR,
    OperatingPoint,
    apply_temperature,
    default_targets,
    expected_yield,
    load_operating_point,
    load_validation_scores,
    operating_point,
    rate_at_threshold,
    sample_checked_threshold,
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
    read_exports,
)

log = logging.getLogger(__name__)

#: Maps whose first-pass target score lies within this many logits below the threshold (or above it) are
#: predicted again with test-time augmentation; the rest keep their fast score.
REFINE_MARGIN_LOGIT = 2.0
#: Maps per eager encoder call: the activations of a call are held at once (measured: 4.3 GB peak resident
#: memory screening with 256-map calls of a MobileNetV2 at 128 px); smaller calls bound it.
ENCODER_CHUNK = 64
#: Default prevalence of target cells for the expected purity (1 tumour cell in 10^5 blood cells).
DEFAULT_PREVALENCE = 1e-5
#: Candidates shown (and kept as maps) in the report, most probable first.
GALLERY_SIZE = 120
#: Which maps the OOD detector's morphology block scores (:attr:`ScreenSettings.ood_morphology`).
OOD_MORPHOLOGY = ("near", "all")
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
    sample_check : bool
        Raise the threshold when the sample check finds it flags more than ``fpr`` allows
        (:func:`opdcells.calibration.sample_checked_threshold`); False: the check is only reported (a
        sample holding more target cells than ``prevalence`` would have them capped).
    ood_morphology : {"near", "all"}
        Maps whose morphology features the OOD detector scores (when it has that block and the model
        gives an embedding): "near" (default) only the maps refined near or above the threshold
        (:data:`REFINE_MARGIN_LOGIT`) and those predicted as a target class, the rest on their embedding
        alone -- the candidates are the same, since only maps at or above the threshold can be flagged, and
        no map is called a target class without the full check; "all" every map.
    """

    targets: list[str]
    temperature: float
    point: OperatingPoint
    prevalence: float = DEFAULT_PREVALENCE
    shard: tuple[int, int] = (1, 1)
    sample_check: bool = False
    ood_morphology: str = "near"

    def as_dict(self) -> dict:
        return {**asdict(self), "point": self.point.as_dict()}


def screen_settings(model, *, targets: Sequence[str] | None = None, fpr: float | None = None,
                    prevalence: float = DEFAULT_PREVALENCE, shard: tuple[int, int] = (1, 1),
                    sample_check: bool = False, ood_morphology: str = "near",
                    operating_point: str | os.PathLike | None = None) -> ScreenSettings:
    """The calibration and operating point of ``model`` for ``targets`` at ``fpr``.

    The operating point stored at training time is used when it fits; other targets or rates are set
    again on the validation scores kept in the model folder. An ``operating_point`` file (a negative
    control's, ``calibrate-threshold``) replaces both.

    Parameters
    ----------
    model : SavedModel
        A loaded, calibrated model (:func:`opdcells.modelfolder.load_model`).
    targets : sequence of str, optional
        The classes screened for (e.g. the cancer cells); default: the stored targets, else
        :func:`default_targets` of the model's classes.
    fpr : float, optional
        Wanted false-positive rate of the operating point (a fraction); default: the stored one, else
        ``DEFAULT_FPR``.
    prevalence : float
        Assumed fraction of target cells in the sample (default ``DEFAULT_PREVALENCE``, 1e-5), for the
        expected precision the report shows.
    shard : tuple of int
        ``(k, n)``: this run screens the k-th of n shards of the files (1-based).
    sample_check : bool
        Compare the sample's score distribution with the validation data's.
    ood_morphology : {"near", "all"}
        Which maps the OOD detector's morphology block scores (:class:`ScreenSettings`).
    operating_point : path, optional
        An operating-point file for this model (:func:`opdcells.calibration.save_operating_point`): its
        targets, rate and threshold are used.

    Returns
    -------
    ScreenSettings

    Raises
    ------
    ScreenError
        The model has no calibration (trained before screening existed), a target is not one of its
        classes, no target class can be found, a shard is not ``1 <= k <= n``, ``ood_morphology`` is
        neither "near" nor "all", or the operating-point file is unreadable, was set with another model,
        or disagrees with ``targets`` or ``fpr``.
    """
    if ood_morphology not in OOD_MORPHOLOGY:
        raise ScreenError(model.folder, f"ood_morphology must be one of {', '.join(OOD_MORPHOLOGY)}, "
                                        f"not {ood_morphology!r}")
    record = model.config.get("calibration")
    if not record:
        raise ScreenError(model.folder, "the model has no calibration (it was trained before opdcells "
                                        "calibrated models): train it again to screen with it")
    names = model.class_names
    asked = list(targets or [])
    targets = list(targets or record.get("targets") or default_targets(names))
    unknown = [t for t in targets if t not in names]
    if unknown or not targets:
        raise ScreenError(model.folder, f"target classes {', '.join(unknown) or '(none found)'} are not "
                                        f"classes of the model ({', '.join(names)}); give --target")
    k, n = shard
    if not 1 <= k <= n:
        raise ScreenError(model.folder, f"shard {k}/{n}: K must be between 1 and N")
    if operating_point is not None:
        point = _file_point(model, operating_point, asked, fpr)
        return ScreenSettings(list(point["targets"]), point["temperature"], point["point"], prevalence, shard,
                              sample_check, ood_morphology)
    stored = record.get("operating_point")
    wanted = fpr if fpr is not None else (stored or {}).get("fpr", DEFAULT_FPR)
    if stored and stored["fpr"] == wanted and targets == record.get("targets"):
        point = _with_rate(model, record["temperature"], targets, OperatingPoint.from_dict(stored))
    else:
        point = _new_point(model, record["temperature"], targets, wanted)
    return ScreenSettings(targets, float(record["temperature"]), point, prevalence, shard, sample_check,
                          ood_morphology)


def _file_point(model, path, targets: list[str], fpr: float | None) -> dict:
    """The operating-point file ``path`` read for ``model``, checked against the asked targets (none: any)
    and rate."""
    try:
        loaded = load_operating_point(path, model)
    except ValueError as err:
        raise ScreenError(path, str(err)) from err
    if targets and targets != loaded["targets"]:
        raise ScreenError(path, f"set for targets {', '.join(loaded['targets'])}, not {', '.join(targets)}: "
                                "leave out --target or calibrate the threshold for them")
    if fpr is not None and fpr != loaded["point"].fpr:
        raise ScreenError(path, f"set for a false-positive rate of {loaded['point'].fpr:g}, not {fpr:g}: "
                                "leave out --fpr or calibrate the threshold for it")
    log.info("operating point from %s: threshold %.4g (%s)", path, loaded["point"].threshold,
             loaded["point"].basis)
    return loaded


def _validation_targets(model, temperature: float, targets: list[str]):
    """Calibrated target scores, target flags and groups of the kept validation maps (None if not kept)."""
    scores = load_validation_scores(model.folder)
    if scores is None:
        return None
    calibrated = apply_temperature(scores["proba"], temperature)
    is_target = np.isin(scores["labels"], [model.class_names.index(t) for t in targets])
    return target_score(calibrated, model.class_names, targets), is_target, scores["groups"]


def _new_point(model, temperature: float, targets: list[str], fpr: float) -> OperatingPoint:
    kept = _validation_targets(model, temperature, targets)
    if kept is None:
        raise ScreenError(model.folder, "the model keeps no validation scores, so no operating point can be "
                                        "set for other targets or rates; use its own (leave out --target "
                                        "and --fpr) or train it again")
    score, is_target, groups = kept
    try:
        return operating_point(score, is_target, fpr, groups=groups)
    except ValueError as err:
        raise ScreenError(model.folder, str(err)) from err


def _with_rate(model, temperature: float, targets: list[str], point: OperatingPoint) -> OperatingPoint:
    """A stored validation point with what its validation maps support about the rate at its threshold
    (:func:`opdcells.calibration.rate_at_threshold`), for models calibrated before that was recorded;
    the threshold is kept. Unchanged when it has it or the model keeps no validation scores."""
    kept = None if point.rate_at_threshold else _validation_targets(model, temperature, targets)
    if kept is None:
        return point
    negatives = kept[0][~kept[1]]
    if not len(negatives):
        return point
    above = int(np.sum(negatives >= point.threshold))
    order = None if point.extrapolated or above == len(negatives) else len(negatives) - above
    rate = rate_at_threshold(negatives, point.threshold, point.fpr, DEFAULT_CONFIDENCE, order)
    return replace(point, rate_at_threshold=rate)


@dataclass
class ScreenResult:
    """What :func:`screen_files` did: the output folder, counts, and every skipped file or map.

    Attributes
    ----------
    out : Path
        The output folder (scores.csv, candidates.csv, candidates.npz, summary.json, report.html).
    n_maps : int
        Maps (cells) screened.
    n_files : int
        Files read.
    n_flagged : int
        Maps flagged as candidates.
    n_ood : int
        Maps the out-of-distribution detector vetoed.
    skipped_files : list of str
        "path: reason" of every file that could not be read.
    skipped_maps : list of str
        "path [map i]: reason" of every map that could not be preprocessed.
    dropped : list of Dropped
        Every map, cell or object that yields no score (``scores.dropped.csv``).
    seconds : float
        Wall time of the run (s; the sum over shards once merged).
    """

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
        self.kept: dict[tuple, tuple] = {}  # (rank, map) of the best pool maps by (file, index, cell)
        self.forward = encoder_pass(model)
        self.call = model_call(model)   # the whole model, traced: the check below and test-time augmentation
        self.augmented = tta_pass(self.call) if model.tta and self.call is not None else None
        self.checked = False
        self.n_morphology = 0   # maps whose morphology was measured here (lazily, near the threshold)

    def first_pass(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Uncalibrated probabilities without test-time augmentation and, where one encoder pass gives
        both, the embedding (checked once against the model's own probabilities)."""
        if self.forward is None:
            return self.model.predict_proba(maps, self.batch_size, tta=False), None
        proba, embedding = self.forward(maps, self.batch_size)
        if not self.checked:
            own = self.call(maps[:8])
            self.checked = True
            if not np.allclose(proba[:8], own, atol=1e-4):
                if getattr(self.forward, "lite", False):
                    log.warning("model %s: the encoder run by TensorFlow Lite differs from the model's "
                                "predictions; running it with TensorFlow", self.model.name)
                    self.forward, self.checked = encoder_pass(self.model, lite=False), False
                else:
                    log.info("model %s: the encoder + classifier pass differs from the model's predictions; "
                             "predicting and embedding separately", self.model.name)
                    self.forward = None
                return self.first_pass(maps)
        return proba, embedding

    def score(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Calibrated probabilities, target scores (maps near the threshold refined with TTA), the
        first pass's embedding (None when the model gives none) and which maps were near the threshold
        (:func:`near_threshold` of the first pass)."""
        s = self.settings
        proba, embedding = self.first_pass(maps)
        proba = apply_temperature(proba, s.temperature)
        p_target = target_score(proba, self.model.class_names, s.targets)
        near = near_threshold(p_target, s.point.threshold)
        if near.any() and self.model.tta:
            refined = (self.augmented(maps[near]) if self.augmented is not None
                       else self.model.predict_proba(maps[near], self.batch_size, tta=True))
            proba[near] = apply_temperature(refined, s.temperature)
            p_target[near] = target_score(proba[near], self.model.class_names, s.targets)
        return proba, p_target, embedding, near

    def ood_of(self, maps: np.ndarray, morphology, embedding,
               near: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """OOD scores and flags; with ``ood_morphology="near"``, morphology features not yet measured are
        measured for the ``near`` maps only (:meth:`checked_fully`), the others are scored on their
        embedding alone."""
        lazy = (morphology is None and embedding is not None and getattr(self.ood, "morphology", False)
                and self.settings.ood_morphology == "near")
        if not lazy:
            known = {k: v for k, v in (("morphology", morphology), ("embedding", embedding)) if v is not None}
            return self.ood(maps, **known)
        from .features import FEATURE_NAMES, feature_matrix

        features = np.full((len(maps), len(FEATURE_NAMES)), np.nan)
        if near.any():
            features[near] = feature_matrix(maps[near], self.model.config["pixel_size_um"])[0]
        self.n_morphology += int(near.sum())
        return self.ood(maps, morphology=features, embedding=embedding, measured={"morphology": near})

    def checked_fully(self, proba: np.ndarray, near: np.ndarray) -> np.ndarray:
        """Maps every block of the OOD detector scores with ``ood_morphology="near"``: those near or above
        the threshold (which can be flagged) and those the model calls a target class (a cell type it never
        saw, e.g. a real leukaemia cell, is called cancer far below the threshold as often as above it;
        its ``predicted`` class must carry the full check)."""
        called = np.isin(np.asarray(self.model.class_names)[np.argmax(proba, axis=1)], self.settings.targets)
        return near | called

    def rows_of(self, maps: np.ndarray, keys, morphology=None) -> list[dict]:
        proba, p_target, embedding, near = self.score(maps)
        if self.ood is None:
            ood_score, ood_flag = np.full(len(maps), np.nan), np.zeros(len(maps), bool)
        else:
            ood_score, ood_flag = self.ood_of(maps, morphology, embedding, self.checked_fully(proba, near))
        names, rows = self.model.class_names, []
        for i, (path, index, processed) in enumerate(keys):
            flagged = bool(p_target[i] >= self.settings.point.threshold and not ood_flag[i])
            identity = [storable_text(str(path)), index, *position_values(processed)]
            row = dict(zip((*ID_COLUMNS, *POSITION_COLUMNS), identity, strict=True))
            row.update(dry_mass_pg=f"{processed.dry_mass_pg:.6g}", area_um2=f"{processed.area_um2:.6g}",
                       p_target=float(p_target[i]), predicted=names[int(np.argmax(proba[i]))],
                       ood_score=f"{ood_score[i]:.6g}", ood_flag=bool(ood_flag[i]), flagged=flagged)
            rows.append(row)
            if _in_pool(row, self.settings):
                self.kept[_key(row)] = (_rank(row), maps[i].astype(np.float16))
        if len(self.kept) > 2 * GALLERY_SIZE:   # bounded: only the best GALLERY_SIZE can be shown
            best = sorted(self.kept.items(), key=lambda item: item[1][0])[:GALLERY_SIZE]
            self.kept = dict(best)
        return rows


def near_threshold(p_target: np.ndarray, threshold: float) -> np.ndarray:
    """Maps whose target score lies at most :data:`REFINE_MARGIN_LOGIT` logits below ``threshold`` (or
    above it): those refined with test-time augmentation, and whose morphology the OOD detector scores.

    Parameters
    ----------
    p_target : (N,) ndarray
        Calibrated target scores (probabilities) of the first pass.
    threshold : float
        The operating point's threshold (a probability).

    Returns
    -------
    (N,) bool ndarray
    """
    logit = special.logit(np.clip(p_target, 1e-9, 1 - 1e-9))
    return logit >= special.logit(np.clip(threshold, 1e-9, 1 - 1e-9)) - REFINE_MARGIN_LOGIT


def encoder_pass(model, *, lite: bool = True):
    """``(maps, batch_size) -> (proba, embedding)`` from one pass of the encoder, for Keras models built as
    an encoder and a softmax ``classifier`` layer (:func:`opdcells.models.build_model`; dropout is off
    when predicting); None for other models. Screening needs both (the embedding for the OOD detector),
    and the encoder is nearly all of the inference time.

    The encoder runs in calls of one fixed shape (the last call padded with zero maps), its resize to the
    size it already has left out (:func:`without_identity_resize`): with ``lite``, converted in memory and
    run by TensorFlow Lite's interpreter (:func:`lite_encoder`, :data:`LITE_CHUNK` maps a call), else, or
    when the conversion fails, as one traced graph (:data:`ENCODER_CHUNK` maps a call). Measured on the
    OPD-pretrained MobileNetV2-0.35 at 128 px, 2 busy cores: 0.7 ms of CPU a map converted, 1.9 traced
    (4.7 eager); the converted encoder's embeddings lie within 1e-5 (float32 summation order, embeddings
    up to 4) of the traced graph's, which equals the Keras model bit for bit.

    Parameters
    ----------
    model : SavedModel
        A loaded model.
    lite : bool
        Run the encoder with TensorFlow Lite where it converts.

    Returns
    -------
    callable or None
        ``run(maps, batch_size)`` with ``maps`` (N, S, S) OPD (nm, as ``predict_proba`` takes them), giving
        ``proba`` (N, C) float64 and ``embedding`` (N, D) float32; ``run.lite`` says whether TensorFlow
        Lite runs the encoder. None when the model has no such layers.
    """
    keras_model = getattr(getattr(model, "learner", None), "model", None)
    try:
        encoder, head = keras_model.get_layer("encoder"), keras_model.get_layer("classifier")
        kernel, bias = (np.asarray(w, dtype=np.float64) for w in head.get_weights())
    except (AttributeError, ValueError):
        return None

    import tensorflow as tf

    encoder = without_identity_resize(encoder)
    compiled = lite_encoder(encoder, LITE_CHUNK) if lite else None
    if compiled is None:
        compiled = tf.function(lambda batch: encoder(batch, training=False))

    def run(maps: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(maps, np.float32)[..., None]
        step = LITE_CHUNK if run.lite else min(batch_size, ENCODER_CHUNK)
        embedding = np.concatenate([_padded_call(compiled, x[i:i + step], step)
                                    for i in range(0, len(x), step)])
        return special.softmax(embedding.astype(np.float64) @ kernel + bias, axis=1), embedding

    run.lite = getattr(compiled, "lite", False)
    return run


#: Maps per call of the encoder run by TensorFlow Lite (:func:`lite_encoder`): one fixed input shape.
#: Measured (MobileNetV2-0.35, 128 px, one thread): 0.64, 0.71, 0.77 ms of CPU a map at 16, 32, 64 maps.
LITE_CHUNK = 16


def without_identity_resize(encoder):
    """``encoder`` with each bilinear or nearest ``keras.layers.Resizing`` that keeps its input's size
    replaced by an identity layer (the other layers, and so the weights, shared): resampling a map to its
    own grid weighs each output pixel's own input pixel by 1 and its neighbours by 0, so the embeddings
    are the same bit for bit, without the resize's 0.3 ms of CPU a map (antialiased, MobileNetV2 at
    128 px) and the operation TensorFlow Lite has no kernel for.

    Parameters
    ----------
    encoder : keras.Model
        The model's ``encoder`` layer.

    Returns
    -------
    keras.Model
        The encoder without its identity resizes (``encoder`` itself when it has none, or when it cannot
        be cloned).
    """
    import keras

    def same_size(layer) -> bool:
        try:
            return (isinstance(layer, keras.layers.Resizing)
                    and layer.interpolation in ("bilinear", "nearest")
                    and tuple(layer.input.shape[1:3]) == (layer.height, layer.width))
        except (AttributeError, ValueError):   # a layer never called, or called more than once
            return False

    same = [layer for layer in getattr(encoder, "layers", []) if same_size(layer)]
    if not same:
        return encoder
    try:
        return keras.models.clone_model(encoder, clone_function=lambda layer: keras.layers.Identity(
            name=layer.name) if any(layer is s for s in same) else layer)
    except (TypeError, ValueError) as err:
        log.debug("encoder %s kept with its resize: %s", encoder.name, err)
        return encoder


def lite_encoder(encoder, batch: int, threads: int | None = None):
    """``encoder`` converted in memory for TensorFlow Lite (``tf.lite``, part of TensorFlow) and run by its
    interpreter with the XNNPACK delegate, in calls of ``batch`` maps: 2.5 times less CPU than the traced
    graph for MobileNetV2's depthwise convolutions (0.7 vs 1.9 ms a map, float32 both). The weights are
    frozen from the loaded model; nothing is read from the model folder or written anywhere. A failed
    conversion is logged once and gives None (the caller runs the Keras encoder).

    Parameters
    ----------
    encoder : keras.Model
        ``(N, S, S, 1) -> (N, D)``, evaluated with ``training=False``.
    batch : int
        Maps per call (the converted graph's fixed batch).
    threads : int, optional
        Interpreter threads; default TensorFlow's intra-op threads (:func:`share_cores`), else every core.

    Returns
    -------
    callable or None
        ``call(x)`` with ``x`` (batch, S, S, 1) float32, giving the embeddings (batch, D) float32; its
        ``lite`` attribute is True. None when the encoder does not convert.
    """
    import warnings

    import tensorflow as tf

    from .console import captured_stderr
    from .predict import default_workers

    threads = threads or tf.config.threading.get_intra_op_parallelism_threads() or default_workers()
    shape = tf.TensorSpec((batch, *encoder.input_shape[1:]), tf.float32)
    try:
        with captured_stderr() as lines, warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"(?s).*tf\.lite\.Interpreter is deprecated", UserWarning)
            traced = tf.function(lambda x: encoder(x, training=False)).get_concrete_function(shape)
            converter = tf.lite.TFLiteConverter.from_concrete_functions([traced], encoder)
            converter.experimental_lower_to_saved_model = False   # frozen in memory: no SavedModel written
            interpreter = tf.lite.Interpreter(model_content=converter.convert(), num_threads=threads)
            interpreter.allocate_tensors()
    except Exception as err:  # noqa: BLE001 - ConverterError for unsupported operations, others for the rest
        log.warning("encoder %s not converted for TensorFlow Lite (%s: %s): running it with TensorFlow",
                    encoder.name, type(err).__name__, (str(err).splitlines() or [""])[0][:200])
        log.debug("converter output:\n%s", "\n".join(lines))
        return None
    given, taken = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]

    def call(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(given, np.ascontiguousarray(x, np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(taken).copy()

    call.lite = True
    log.debug("encoder %s converted for TensorFlow Lite: %d maps a call, %d threads; its output:\n%s",
              encoder.name, batch, threads, "\n".join(lines))
    return call


def _padded_call(compiled, batch: np.ndarray, size: int) -> np.ndarray:
    """``compiled(batch)`` with ``batch`` padded with zero maps to ``size``: every call has one shape, so
    the graph is traced once (about 1 s of CPU) and each map's result does not depend on how many maps the
    call holds (shards and single runs score a map alike)."""
    pad = size - len(batch)
    if pad:
        batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
    return np.asarray(compiled(batch))[:size - pad]


#: Maps whose 8 dihedral views make one call of the test-time augmentation pass (:func:`tta_pass`).
TTA_GROUP = 8


def model_call(model):
    """``maps -> proba`` of the whole Keras model as one traced graph (a graph per call shape, traced
    once): the probabilities of ``model.predict`` bit for bit, without its per-call set-up (a data pipeline
    built and traced on every call: 0.1-1 s of CPU a call, once per batch when screening refined a few
    maps with test-time augmentation through it).

    Parameters
    ----------
    model : SavedModel
        A loaded model.

    Returns
    -------
    callable or None
        ``call(maps)`` with ``maps`` (N, S, S) OPD (nm), giving ``proba`` (N, C) float32; None for models
        that are not one Keras model (fused and features models predict with ``predict_proba``).
    """
    keras_model = getattr(getattr(model, "learner", None), "model", None)
    if keras_model is None or getattr(model, "fused", False):
        return None
    import tensorflow as tf

    compiled = tf.function(lambda batch: keras_model(batch, training=False))
    return lambda maps: np.asarray(compiled(np.asarray(maps, np.float32)[..., None]))


def tta_pass(call):
    """``maps -> proba`` with test-time augmentation, equal to ``model.predict_proba(maps, tta=True)``
    (the float32 mean over the 8 dihedral views), in calls of a fixed shape: the views of
    :data:`TTA_GROUP` maps a call, then of one map a call (two traced shapes). Equal bit for bit where the
    backend's kernels do not depend on the batch size; otherwise to float32 rounding (oneDNN on an AMD EPYC
    with AVX2 differs in the 8th significant digit).

    Parameters
    ----------
    call : callable
        The model's :func:`model_call`.

    Returns
    -------
    callable
        ``run(maps)`` with ``maps`` (N, S, S) OPD (nm), N >= 1, giving ``proba`` (N, C) float32.
    """
    from .pipeline import dihedral_views

    def run(maps: np.ndarray) -> np.ndarray:
        whole = len(maps) - len(maps) % TTA_GROUP
        groups = [maps[i:i + TTA_GROUP] for i in range(0, whole, TTA_GROUP)]
        groups += [maps[i:i + 1] for i in range(whole, len(maps))]
        return np.concatenate([call(np.concatenate(dihedral_views(g))).reshape(8, len(g), -1).mean(axis=0)
                               for g in groups])

    return run


def ood_check(model):
    """``(maps, morphology=None, embedding=None, measured=None) -> (score, flag)`` of the model's
    out-of-distribution detector (:mod:`opdcells.ood`; ``morphology``, ``embedding``: the maps' features
    and encoder embedding when already computed; ``measured``: per block, the maps whose input was
    measured, :meth:`opdcells.ood.OODDetector.score`), or None for a model saved without one (logged).
    ``check.morphology`` says whether the detector uses the features.

    Parameters
    ----------
    model : SavedModel
        A loaded model; its folder may hold ``ood.npz``.

    Returns
    -------
    callable or None
        ``check(maps, morphology=None, embedding=None, measured=None)`` with ``maps`` (N, S, S) OPD (nm),
        ``morphology`` (N, F) and ``embedding`` (N, D), giving ``scores`` (N,) and ``flags`` (N,) bool.
    """
    from .ood import load_detector, model_inputs

    detector = load_detector(model)
    if detector is None:
        log.info("model %s has no out-of-distribution detector (ood.npz): no map is vetoed as unlike the "
                 "training data", model.name)
        return None

    def check(maps: np.ndarray, morphology: np.ndarray | None = None, embedding: np.ndarray | None = None,
              measured: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        scores = detector.score(model_inputs(model.learner, maps, model.config["pixel_size_um"],
                                             morphology=morphology, embedding=embedding), measured)
        return scores, np.asarray(detector.flag(scores), dtype=bool)

    check.morphology = "morphology" in detector.blocks
    return check


#: Environment variables by which a user fixes the threads of TensorFlow and of BLAS (left as set).
TF_THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS",)
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def share_cores(workers: int) -> tuple[int, int]:
    """Size the main process's thread pools for screening beside ``workers`` reading processes: the cores
    they leave (at least one) for TensorFlow's operations and for BLAS (the OOD detector's Mahalanobis
    products), one TensorFlow thread for running operations side by side. The libraries' defaults (a
    thread per core in each pool, spinning while they wait) make the main process fight the readers for
    the cores: measured on 2 busy cores, 2.0 vs 2.4 ms of CPU a map for the encoder (MobileNetV2-0.35 at
    128 px) and 0.13 vs 0.28 for the OOD scores, with the same embeddings and scores bit for bit. Call it
    before TensorFlow runs its first operation (before loading the model); later, TensorFlow's pools are
    left as they are, as is a pool whose threads the user set (:data:`TF_THREAD_VARIABLES`,
    :data:`BLAS_THREAD_VARIABLES`).

    Parameters
    ----------
    workers : int
        Reading processes (:func:`opdcells.predict.read_exports`); with 1 the maps are read in this
        process, between inference calls, and inference gets every core.

    Returns
    -------
    (int, int)
        The intra-op and inter-op threads TensorFlow uses now.
    """
    import tensorflow as tf
    from threadpoolctl import threadpool_limits

    from .predict import default_workers

    cores = default_workers()
    threads = cores if workers <= 1 else max(1, cores - workers)
    if not any(name in os.environ for name in BLAS_THREAD_VARIABLES):
        threadpool_limits(limits=threads, user_api="blas")
    if not any(name in os.environ for name in TF_THREAD_VARIABLES):
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError as err:   # the runtime has started: its pools are fixed
            log.debug("TensorFlow's threads left as they are: %s", err)
    return (tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads())


def shard_files(files: Sequence[Path], shard: tuple[int, int]) -> list[Path]:
    """Files of shard ``(k, n)``: every n-th of ``files`` starting with the k-th (1-based).

    Parameters
    ----------
    files : sequence of Path
        All files, in a fixed order.
    shard : tuple of int
        ``(k, n)``, ``1 <= k <= n``.

    Returns
    -------
    list of Path
    """
    k, n = shard
    return list(files[k - 1::n])


def screen_files(model, paths: Iterable[str | os.PathLike], out: str | os.PathLike, settings: ScreenSettings,
                 *, options: IngestOptions, ood=None, batch_size: int = 256, workers: int = 1,
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
    workers : int
        Processes reading and preprocessing the exports (and measuring the OOD detector's morphology
        features), :func:`opdcells.predict.read_exports`; the outputs are the same for any number.

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
    in_workers = bool(getattr(ood, "morphology", False)) and (
        settings.ood_morphology == "all" or scorer.forward is None)
    reads = read_exports(files, options, workers=workers, morphology=in_workers)
    for export in tqdm(reads, total=len(files), unit="file", disable=not progress, mininterval=0.5,
                       desc="screening"):
        if scorer.add_read(export, options, result, pixel_sizes):
            read.append(export.path)
    scorer.flush()
    rows = [row for path in read for row in scorer.rows.get(path, [])]
    result.n_files, result.seconds = len(read), time.perf_counter() - start
    write_outputs(out, rows, {k: m for k, (_, m) in scorer.kept.items()}, settings, result,
                  model_name=model.name)
    return result


def _key(row: dict) -> tuple:
    """Identity of a row: (file, index, cell number; -1 for a whole map)."""
    return (row["file"], int(row["index"]), int(row["cell"]) if str(row["cell"]) != "" else -1)



def write_outputs(out: Path, rows: list[dict], kept: dict, settings: ScreenSettings, result: ScreenResult,
                  *, model_name: str) -> None:
    """Write scores.csv, candidates.csv, candidates.npz, summary.json, report.html and report.png (each
    atomically).

    Parameters
    ----------
    out : Path
        The output folder (exists).
    rows : list of dict
        One scores row per map (columns ``SCORE_COLUMNS``); each gets its ``flagged`` value.
    kept : dict
        ``(file, index, cell)`` -> (S, S) OPD map (nm) of the maps that may be shown in the gallery.
    settings : ScreenSettings
        Targets, calibration, operating point, prevalence.
    result : ScreenResult
        Updated with the numbers of maps, flagged and out-of-distribution maps.
    model_name : str
        The model, as the summary names it.
    """
    rows = sorted(rows, key=_key)
    threshold, check = _threshold(rows, settings)
    for row in rows:
        row["flagged"] = bool(_written(row) >= threshold and not _true(row["ood_flag"]))
    candidates = sorted((r for r in rows if r["flagged"]), key=_rank)
    result.n_maps, result.n_flagged = len(rows), len(candidates)
    result.n_ood = sum(_true(r["ood_flag"]) for r in rows)
    _atomic_csv(out / "scores.csv", rows)
    _atomic_csv(out / "candidates.csv", candidates)
    _atomic(out / "scores.dropped.csv", lambda fh: _write_dropped(fh, result.dropped))
    gallery = candidates[:GALLERY_SIZE]
    pool = [_key(r) for r in sorted((r for r in rows if _in_pool(r, settings)), key=_rank)[:GALLERY_SIZE]]
    _atomic(out / "candidates.npz", lambda fh: np.savez_compressed(
        fh, maps=_stacked(kept, pool), files=np.asarray([k[0] for k in pool], dtype=str),
        index=np.asarray([k[1] for k in pool], dtype=np.int64),
        cell=np.asarray([k[2] for k in pool], dtype=np.int64)), binary=True)
    maps = _stacked(kept, [_key(r) for r in gallery])
    summary = _summary(rows, settings, result, model_name, threshold, check)
    _atomic(out / "summary.json", lambda fh: json.dump(summary, fh, indent=2))
    from .report import report_figure, screening_report

    _atomic(out / "report.html", lambda fh: fh.write(screening_report(summary, gallery, maps, rows)))
    _atomic(out / "report.png", lambda fh: report_figure(summary, gallery, maps, rows).savefig(
        fh, format="png", dpi=100), binary=True)
    log.info("%s: %d maps screened, %d flagged (%d out of distribution not flagged), %.0f maps/s",
             out, result.n_maps, result.n_flagged, result.n_ood, summary["maps_per_second"] or 0)


def _true(value) -> bool:
    return value is True or str(value) in ("True", "true", "1")


def _rank(row: dict) -> tuple:
    """Sort key of candidates: most probable first, then by identity."""
    return (-_written(row), *_key(row))


def _in_pool(row: dict, settings: ScreenSettings) -> bool:
    """Whether a map may become a candidate whatever the sample check decides (at or above the
    validation threshold, which the check only raises, and in distribution)."""
    return _written(row) >= settings.point.threshold and not _true(row["ood_flag"])


def _stacked(kept: dict, keys: list[tuple]) -> np.ndarray:
    """The kept maps of ``keys`` as one (N, S, S) float16 array."""
    return np.stack([kept[k] for k in keys]) if keys else np.zeros((0, 1, 1), np.float16)


def _written(row: dict) -> float:
    """A row's target score as scores.csv holds it (6 significant digits): what shards merge from."""
    return float(f"{float(row['p_target']):.6g}")


def _threshold(rows: list[dict], settings: ScreenSettings) -> tuple[float, dict]:
    """The threshold of the run: the operating point's, checked on the sample's in-distribution maps
    (:func:`opdcells.calibration.sample_checked_threshold`)."""
    scores = [_written(r) for r in rows if not _true(r["ood_flag"])]
    threshold, check = sample_checked_threshold(scores, settings.point.threshold, settings.point.fpr,
                                                settings.prevalence)
    source = settings.point.source
    if source != "validation":    # the check's record names the threshold it checked
        check = {**check, "source": check["source"].replace("validation", source, 1)}
    if check["source"] == "sample":
        log.warning("%d of %d maps score at or above the %s threshold %.4g, more than the %d that a "
                    "false-positive rate of %g allows: this sample's non-target cells score higher than the "
                    "%s maps (or it holds more target cells than a prevalence of %g); %s",
                    check["above_validation_threshold"], check["n"], source, settings.point.threshold,
                    check["allowed"], settings.point.fpr, source, settings.prevalence,
                    f"the threshold is raised to {threshold:.4g} (the sample's own upper quantile)"
                    if settings.sample_check else "the threshold is kept (--sample-check raises it)")
        if not settings.sample_check:
            return settings.point.threshold, {**check, "source": f"{source} (sample check not applied)"}
    return threshold, check


def _summary(rows: list[dict], settings: ScreenSettings, result: ScreenResult, model_name: str,
             threshold: float, check: dict) -> dict:
    n = len(rows)
    expected = expected_yield(n, settings.prevalence, settings.point, n - result.n_ood)
    sample_set = check["source"] == "sample"
    if sample_set:   # at most (fpr + prevalence) n flagged, of them the targets found
        tp = expected["expected_true_positives"]
        fp = max(result.n_flagged - tp, 0.0)
        low = max(result.n_flagged - settings.prevalence * n, 0.0)
        expected = {"expected_false_positives": fp, "expected_false_positives_ci": [low, result.n_flagged],
                    "expected_false_positives_basis":
                        f"in-sample: the threshold was raised on this sample itself, so its false positives "
                        f"are at most the {result.n_flagged} maps flagged (at least those beyond the "
                        f"{settings.prevalence:g} prevalence of targets); no confidence about other samples",
                    "expected_true_positives": tp,
                    "expected_purity": tp / (tp + fp) if tp + fp > 0 else float("nan")}
    return {
        "threshold": threshold, "threshold_check": check,
        "threshold_source": "sample-check" if sample_set else settings.point.source,
        "control": settings.point.control,
        "model": model_name, "maps_read": n, "files_read": result.n_files,
        "files_skipped": len(result.skipped_files), "maps_skipped": len(result.skipped_maps),
        "skipped": result.skipped_files + result.skipped_maps,
        "flagged": result.n_flagged, "out_of_distribution": result.n_ood,
        "targets": settings.targets, "temperature": settings.temperature,
        "operating_point": settings.point.as_dict(), "prevalence": settings.prevalence,
        "expected_false_positives": expected["expected_false_positives"],
        "expected_false_positives_ci": expected["expected_false_positives_ci"],
        "expected_false_positives_basis": expected["expected_false_positives_basis"],
        "fpr_confidence": (settings.point.rate_at_threshold or {}).get("confidence"),
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


def merge_screens(folders: Sequence[str | os.PathLike], out: str | os.PathLike,
                  settings: ScreenSettings | None = None) -> ScreenResult:
    """Join the outputs of shard runs into the outputs one run over all files would have written.

    Parameters
    ----------
    folders : sequence of str or os.PathLike
        The shard runs' output folders.
    out : str or os.PathLike
        Folder for the joined outputs (created).
    settings : ScreenSettings, optional
        Flag at this operating point (e.g. a negative control's) instead of the shards' own: the outputs of
        screening with it, provided its threshold is not below the shards' (whose maps near and above their
        threshold, all those the new one can flag, were refined with test-time augmentation and kept).

    Returns
    -------
    ScreenResult
        The counts over all shards.

    Raises
    ------
    ScreenError
        A folder without a screening summary, shards screened with other settings or models, or
        ``settings`` with a threshold below the shards'.
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
    screened = ScreenSettings(first["targets"], first["temperature"],
                              OperatingPoint.from_dict(first["operating_point"]), first["prevalence"], (1, 1),
                              bool(first["settings"].get("sample_check", False)),
                              first["settings"].get("ood_morphology", "all"))
    if settings is not None and (settings.point.threshold < screened.point.threshold
                                 or settings.targets != screened.targets):
        raise ScreenError(folders[0], f"screened at threshold {screened.point.threshold:.4g} for "
                                      f"{', '.join(screened.targets)}: maps near a lower threshold or for "
                                      "other targets were not scored alike; screen again")
    settings = settings or screened
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
