"""Out-of-distribution (OOD) detection: flag maps unlike anything the model was trained on.

A classifier answers for every map, also for a cell type it never saw (a real HL60 leukaemia cell is
called SW480 at p = 0.95), an empty field or debris. This module gives each map an OOD score and a flag,
shared by ``predict`` and the screening work (issue 14).

Method (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples and
adversarial attacks", NeurIPS): class-conditional Gaussians with one shared covariance, fitted on the
training maps; a map's distance is the Mahalanobis distance to the nearest class mean. The classes are
the dataset's (finer than a task's: "blood" is three cell types). Two blocks of inputs are scored
separately, because they fail differently:

- ``embedding``: the Keras model's embedding (the encoder's pooled output, the input of the softmax head;
  no test-time augmentation);
- ``morphology``: the hand-made features of ``opdcells.features`` (dry mass, area, mean and peak OPD,
  shape, texture, radial profile), the same for every model (the ``features`` model's embedding is this
  block, so it has this block only). Real cells of other types and debris differ most here: measured on
  the demo's models, the embedding of a fine-tuned OPD-MobileNetV2 places every view of a real HL60 cell
  among the simulated cancer cells, the morphology block flags all of them.

Each block is standardised (training mean and standard deviation), and its shared covariance is
estimated with Ledoit-Wolf shrinkage (``sklearn.covariance.LedoitWolf``: maps are few against
embedding widths of hundreds). Each block's threshold is the ``1 - (1 - QUANTILE) / n_blocks`` quantile
(Bonferroni) of its distances over the validation maps (the training maps when there is no validation
part; a gamma fit to the squared distances when there are too few maps for the empirical quantile,
:func:`upper_quantile`), so that about ``1 - QUANTILE`` = 1% of maps like the training data are flagged
in all. A map's OOD score is its largest block distance over that block's threshold: above 1 it is
flagged (``ood_flag``). A map without a usable input (no cell: NaN features) scores ``inf``.

The fitted statistics are plain arrays in ``MODEL_FOLDER/ood.npz`` (read with ``allow_pickle=False``:
loading a model folder never runs code); the threshold and how it was set go into ``config.json``
(``config["ood"]``). Models saved without ``ood.npz`` predict as before, without OOD columns.

Entry points: :func:`fit_for_model` (``train``, after fitting) and :class:`PredictionCheck`
(``predict``: columns, per-map values and the summary line).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OODError
from .features import FEATURE_NAMES, feature_matrix

log = logging.getLogger(__name__)

OOD_FILE = "ood.npz"
OOD_FORMAT_VERSION = 1
#: Share of validation maps below the threshold: about 1% of in-distribution maps are flagged.
QUANTILE = 0.99
#: Training maps used to fit the Gaussians at most (a random subset beyond it): bounded time and memory.
MAX_FIT_MAPS = 4000
#: Calibration maps needed above the quantile for the empirical threshold (else a gamma fit).
MIN_TAIL = 5
#: Fewer calibration maps than this get a warning: thresholds from a few dozen maps flag several times
#: ``1 - QUANTILE`` of new maps like them (measured: 13% with 20 maps, 2-5% with 80-100).
MIN_CALIBRATION_MAPS = 50
BLOCKS = ("embedding", "morphology")
#: Morphology rows of the last dataset this process fitted a detector on, by row ("dataset": its real path
#: and fingerprint): the notebooks train several models on one dataset, and a 128 px map takes 8-25 ms.
_MORPHOLOGY: dict = {}
#: config["dataset"]["origin"] values (see ``opdcells.simulate.dataset_origin``) that mean simulated only.
SIMULATED = "simulated"

__all__ = ["OODDetector", "GaussianBlock", "OODError", "model_inputs", "upper_quantile", "supported_floor",
           "fit_for_model",
           "load_detector", "PredictionCheck", "OOD_FILE", "QUANTILE"]


# --------------------------------------------------------------------------------------------- inputs


def model_inputs(learner, maps, pixel_size_um: float, batch_size: int = 64,
                 morphology: np.ndarray | None = None,
                 embedding: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The input blocks of the detector for ``maps``: ``{"embedding": (N, D), "morphology": (N, F)}``
    (``features`` models: ``morphology`` only, their own feature vector).

    Parameters
    ----------
    learner : learners._KerasLearner or learners._FeaturesLearner
        The fitted model (``SavedModel.learner``).
    maps : array-like, (N, S, S)
        OPD maps in nm at the model's pixel size and size.
    pixel_size_um : float
        Their pixel size in um.
    batch_size : int
        Maps per encoder call.
    morphology : np.ndarray, (N, F), optional
        ``features.feature_matrix`` of the maps, when already measured.
    embedding : np.ndarray, (N, D), optional
        The encoder's embedding of the maps, when already computed (with the class probabilities).

    Returns
    -------
    dict[str, np.ndarray]
        float64 blocks; morphology rows are NaN for maps without a cell.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if morphology is None:
        morphology = feature_matrix(maps, pixel_size_um)[0]
    if hasattr(learner, "features"):   # the features model's embedding is the morphology itself
        return {"morphology": np.asarray(morphology, dtype=np.float64)}
    if embedding is None:
        from .explain import embed

        embedding = embed(learner.model.get_layer("encoder"), maps, batch_size=batch_size)
    return {"embedding": np.asarray(embedding, dtype=np.float64),
            "morphology": np.asarray(morphology, dtype=np.float64)}


# --------------------------------------------------------------------------------------------- detector


@dataclass
class GaussianBlock:
    """Class-conditional Gaussians with a shared (Ledoit-Wolf) covariance on one block of inputs.

    Attributes
    ----------
    center, scale : np.ndarray, (D,)
        Standardisation of the inputs (training mean and standard deviation).
    means : np.ndarray, (K, D)
        Class means of the standardised inputs.
    precision : np.ndarray, (D, D)
        Inverse of the shrunk shared covariance.
    threshold : float
        Distance above which the block calls a map out of distribution (NaN until calibrated).
    """

    center: np.ndarray
    scale: np.ndarray
    means: np.ndarray
    precision: np.ndarray
    threshold: float = float("nan")

    @classmethod
    def fit(cls, x, labels) -> GaussianBlock:
        """Fit on training inputs ``x`` (N, D) with class ``labels`` (N,); rows with NaN are left out.

        Raises
        ------
        ValueError
            Fewer than two usable rows.
        """
        from sklearn.covariance import LedoitWolf

        x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels)
        ok = np.isfinite(x).all(axis=1)
        x, labels = x[ok], labels[ok]
        if len(x) < 2:
            raise ValueError("fewer than two usable training maps to fit the OOD detector")
        center, std = x.mean(axis=0), x.std(axis=0)
        typical = float(np.median(std[std > 0])) if np.any(std > 0) else 1.0
        scale = np.where(std > 1e-2 * typical, std, typical)   # constant inputs (dead units): a typical unit
        z = (x - center) / scale
        classes = np.unique(labels)
        means = np.stack([z[labels == c].mean(axis=0) for c in classes])
        residuals = z - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(residuals).precision_
        return cls(center, scale, means, precision)

    def distance(self, x) -> np.ndarray:
        """Mahalanobis distance (N,) of inputs ``x`` (N, D) to the nearest class mean; ``inf`` for rows
        with NaN or infinite values."""
        x = np.asarray(x, dtype=np.float64)
        ok = np.isfinite(x).all(axis=1)
        z = (np.where(ok[:, None], x, 0.0) - self.center) / self.scale
        zp, mp = z @ self.precision, self.means @ self.precision          # (z - m)' P (z - m), expanded:
        d2 = (zp * z).sum(axis=1)[:, None] - 2.0 * zp @ self.means.T + (mp * self.means).sum(axis=1)[None]
        return np.where(ok, np.sqrt(np.maximum(d2.min(axis=1), 0.0)), np.inf)


def upper_quantile(distances, quantile: float) -> tuple[float, str]:
    """The ``quantile`` of in-distribution Mahalanobis ``distances`` and how it was estimated.

    The empirical quantile needs at least :data:`MIN_TAIL` distances above it. With fewer, a gamma
    distribution is fitted to the squared distances -- for Gaussian data they follow a scaled
    chi-squared distribution, a gamma -- by matching their median and 90th percentile (so a few atypical
    validation maps, such as simulated cells with debris beside them, do not widen it), and its
    ``quantile`` is used: the empirical 99th percentile of 20 validation maps is just their largest. The
    fit's quantile is never taken below :func:`supported_floor`, the highest quantile the maps support:
    a heavier tail than the fit's (maps of many sessions) must not flag more than :data:`MIN_TAIL` of the
    calibration maps themselves.

    Parameters
    ----------
    distances : array-like, (N,)
        Distances of in-distribution (validation) maps; non-finite ones are left out.
    quantile : float
        In (0, 1).

    Returns
    -------
    (float, str)
        The threshold and "empirical quantile" or "gamma fit to squared distances (...)".

    Raises
    ------
    ValueError
        Fewer than two finite distances, or no spread between their median and 90th percentile.
    """
    from scipy.optimize import brentq
    from scipy.stats import gamma

    d2 = np.asarray(distances, dtype=np.float64) ** 2
    d2 = d2[np.isfinite(d2)]
    if d2.size < 2:
        raise ValueError(f"{d2.size} finite OOD distances: too few to set a threshold on")
    if d2.size * (1.0 - quantile) >= MIN_TAIL:
        return float(np.sqrt(np.quantile(d2, quantile))), "empirical quantile"
    median, q90 = np.quantile(d2, [0.5, 0.9])
    if not (median > 0 and q90 > median * (1 + 1e-6)):
        raise ValueError("OOD distances without spread: too few distinct maps to set a threshold on")
    # the ratio of a gamma's 90th percentile to its median falls from infinity to 1 as its shape grows
    shape = brentq(lambda k: gamma.ppf(0.9, k) / gamma.ppf(0.5, k) - q90 / median, 1e-3, 1e6)
    scale = median / gamma.ppf(0.5, shape)
    fitted = float(gamma.ppf(quantile, shape, scale=scale))
    method = (f"gamma fit to the median and 90th percentile of squared distances (fewer than "
              f"{MIN_TAIL / (1.0 - quantile):.0f} maps)")
    supported = supported_floor(d2)
    if supported > fitted:
        raised = f", raised to the empirical {1 - MIN_TAIL / d2.size:.4g} quantile (the fit lay below it)"
        return float(np.sqrt(supported)), method + raised
    return float(np.sqrt(fitted)), method


def supported_floor(values) -> float:
    """The highest empirical quantile of ``values`` with :data:`MIN_TAIL` of them above it (the
    ``1 - MIN_TAIL / N`` quantile): a lower bound of any higher quantile that the data support.

    A threshold below it flags more than ``MIN_TAIL`` of the calibration maps themselves. The gamma fit
    of :func:`upper_quantile` ignores the distances above the 90th percentile, so with a heavy tail (new
    acquisition sessions in the validation part) its quantile can lie below this: on a cancer-vs-blood
    model with 720 validation maps of 30 sessions, the fit's thresholds flagged 2.9% of them, not 1%.

    Parameters
    ----------
    values : (N,) ndarray
        Finite values (squared distances), N >= 1.

    Returns
    -------
    float
    """
    values = np.asarray(values, dtype=np.float64)
    return float(np.quantile(values, max(0.0, 1.0 - MIN_TAIL / values.size), method="lower"))


@dataclass
class OODDetector:
    """Mahalanobis OOD detector over the blocks :data:`BLOCKS` (see the module docstring).

    Attributes
    ----------
    blocks : dict[str, GaussianBlock]
        One fitted block per input block (of :data:`BLOCKS`).
    quantile : float
        Quantile of the calibration maps' scores at the threshold (1 - the share of them flagged).
    method : str
        How the block thresholds were estimated: "empirical quantile" or "gamma fit ... (...)".
    threshold : float
        Scores above it are flagged: 1 (each block's distance is divided by its own threshold).
    """

    blocks: dict[str, GaussianBlock]
    quantile: float = QUANTILE
    method: str = "not calibrated"
    threshold: float = 1.0

    @classmethod
    def fit(cls, inputs: dict[str, np.ndarray], labels) -> OODDetector:
        """Fit one :class:`GaussianBlock` per block of ``inputs`` (as :func:`model_inputs` returns)
        on the training maps' class ``labels`` (N,)."""
        return cls({name: GaussianBlock.fit(inputs[name], labels) for name in BLOCKS if name in inputs})

    def calibrate(self, inputs: dict[str, np.ndarray], quantile: float = QUANTILE) -> np.ndarray:
        """Set each block's threshold on in-distribution (validation) ``inputs`` so that about
        ``1 - quantile`` of them are flagged in all (each block at ``1 - (1 - quantile) / n_blocks``,
        Bonferroni); return their scores."""
        per_block = 1.0 - (1.0 - quantile) / len(self.blocks)
        for name, block in self.blocks.items():
            block.threshold, self.method = upper_quantile(block.distance(inputs[name]), per_block)
        self.quantile = float(quantile)
        return self.score(inputs)

    def score(self, inputs: dict[str, np.ndarray],
              measured: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """OOD score (N,) of maps: the largest block distance over that block's threshold (above 1:
        out of distribution).

        Parameters
        ----------
        inputs : dict of str to (N, D) ndarray
            The blocks' inputs (:func:`model_inputs`); a block's rows need only be filled where
            ``measured`` says so.
        measured : dict of str to (N,) bool ndarray, optional
            Per block, the maps whose input was measured; the others are scored on the remaining blocks
            only (screening measures the morphology block only for maps near the threshold). Every map
            must have at least one measured block. Default: every block of every map.

        Returns
        -------
        (N,) float64 ndarray
        """
        n = len(next(iter(inputs.values())))
        scores = np.full(n, -np.inf)
        for name, block in self.blocks.items():
            rows = np.asarray(measured[name]) if measured and name in measured else np.ones(n, bool)
            if rows.any():
                scores[rows] = np.maximum(scores[rows], block.distance(inputs[name][rows]) / block.threshold)
        return scores

    def flag(self, scores) -> np.ndarray:
        """Boolean flags (N,): score above the threshold."""
        return np.asarray(scores) > self.threshold

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/ood.npz`` (plain arrays) atomically; return its path."""
        arrays = {"format_version": np.int64(OOD_FORMAT_VERSION), "quantile": np.float64(self.quantile),
                  "method": np.array(self.method),
                  "blocks": np.array(list(self.blocks)), "morphology_names": np.array(FEATURE_NAMES)}
        for name, block in self.blocks.items():
            arrays.update({f"{name}_center": block.center, f"{name}_scale": block.scale,
                           f"{name}_means": block.means,
                           f"{name}_precision": block.precision.astype(np.float32),
                           f"{name}_threshold": np.float64(block.threshold)})
        path = Path(folder) / OOD_FILE
        fd, tmp = tempfile.mkstemp(prefix=".ood-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> OODDetector:
        """Read an ``ood.npz`` (no pickles). Raises :class:`OODError` naming the file if it is unusable."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError) as exc:
            raise OODError(path, f"cannot read ({exc})") from None
        try:
            if int(data["format_version"]) > OOD_FORMAT_VERSION:
                raise OODError(path, f"OOD format {int(data['format_version'])} is newer than this opdcells")
            if [str(n) for n in data["morphology_names"]] != list(FEATURE_NAMES):
                raise OODError(path, "was fitted on other morphology features than opdcells.features now "
                                     "computes; retrain the model")
            names = [str(name) for name in data["blocks"]]
            if not names or not set(names) <= set(BLOCKS):
                raise OODError(path, f"unknown input blocks {names} (this opdcells knows {list(BLOCKS)})")
            blocks = {name: GaussianBlock(*(data[f"{name}_{key}"] for key in ("center", "scale", "means")),
                                          data[f"{name}_precision"].astype(np.float64),
                                          float(data[f"{name}_threshold"])) for name in names}
        except KeyError as exc:
            raise OODError(path, f"lacks the array {exc}") from None
        for name, b in blocks.items():
            d = b.center.shape[0] if b.center.ndim == 1 else -1
            if (b.scale.shape != (d,) or b.means.ndim != 2 or b.means.shape[1] != d
                    or b.precision.shape != (d, d) or not np.all(np.isfinite(b.precision))
                    or not b.threshold > 0):
                raise OODError(path, f"the {name} statistics have inconsistent shapes or values")
        return cls(blocks, float(data["quantile"]), str(data["method"]))


# --------------------------------------------------------------------------------------------- train


def _inputs_of(learner, dataset, indices, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Detector inputs of dataset maps ``indices``, read a block at a time; morphology rows come from
    :data:`_MORPHOLOGY` when this process measured them already (same dataset content)."""
    key = (str(dataset.real_path), dataset.fingerprint)
    if _MORPHOLOGY.get("dataset") != key:
        _MORPHOLOGY.clear()
        _MORPHOLOGY.update(dataset=key, rows={})
    known, parts = _MORPHOLOGY["rows"], []
    for start in range(0, len(indices), batch_size):
        rows = np.asarray(indices[start:start + batch_size], dtype=np.int64)
        maps = dataset.read(rows)
        todo = [j for j, row in enumerate(rows.tolist()) if row not in known]
        if todo:
            known.update(zip(rows[todo].tolist(), feature_matrix(maps[todo], dataset.pixel_size_um)[0],
                             strict=True))
        morphology = np.stack([known[row] for row in rows.tolist()])
        parts.append(model_inputs(learner, maps, dataset.pixel_size_um, morphology=morphology))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def fit_for_model(folder: str | os.PathLike, learner, dataset, split, *, seed: int = 0) -> dict:
    """Fit the detector of a just-trained model, save ``folder/ood.npz``, return ``config["ood"]``.

    Parameters
    ----------
    folder : path
        The model folder being written.
    learner : train learner
        The fitted model.
    dataset : OPDDataset
        The training dataset.
    split : splits.Split
        Its split: Gaussians on (up to :data:`MAX_FIT_MAPS` of) the training maps, one per dataset
        class, thresholds on the validation maps (on the training maps when there are none, which flags
        fewer new maps).
    seed : int
        Seed of the subset drawn when there are more training maps than :data:`MAX_FIT_MAPS`.

    Returns
    -------
    dict
        ``{"file", "method", "threshold", "quantile", "block_thresholds", "threshold_method",
        "calibrated_on", "n_fit", "n_calibration", "calibration_flag_rate", "warning"}`` (warning: fewer
        than :data:`MIN_CALIBRATION_MAPS` calibration maps, else None); ``{"file": None,
        "reason": ...}`` when it cannot be fitted (logged).
    """
    train = np.asarray(split.train, dtype=np.int64)
    if len(train) > MAX_FIT_MAPS:
        train = np.sort(np.random.default_rng(seed).choice(train, MAX_FIT_MAPS, replace=False))
    calibration, on = (split.val, "validation maps") if len(split.val) else (train, "training maps")
    try:
        inputs = _inputs_of(learner, dataset, train)
        detector = OODDetector.fit(inputs, dataset.labels[train])
        scores = detector.calibrate(_inputs_of(learner, dataset, calibration) if len(split.val) else inputs)
    except ValueError as exc:
        log.warning("no out-of-distribution detector: %s", exc)
        return {"file": None, "reason": str(exc)}
    detector.save(folder)
    rate = float(np.mean(detector.flag(scores)))
    warning = None
    if len(scores) < MIN_CALIBRATION_MAPS:
        warning = (f"OOD thresholds set on only {len(scores)} {on}: expect more than "
                   f"{1 - detector.quantile:.0%} of new maps like the training data to be flagged")
        log.warning("%s", warning)
    log.info("OOD detector: thresholds at the %g quantile of %d %s (%s); %.1f%% of them flagged",
             detector.quantile, len(scores), on, detector.method, 100 * rate)
    return {"file": OOD_FILE, "method": "Mahalanobis distance to the nearest dataset class (shared "
                                        "Ledoit-Wolf covariance) on " + " and ".join(detector.blocks)
                                        + "; score = the largest distance over its block's threshold, "
                                          "flagged above 1",
            "threshold": detector.threshold, "quantile": detector.quantile,
            "block_thresholds": {name: b.threshold for name, b in detector.blocks.items()},
            "threshold_method": detector.method, "calibrated_on": on,
            "n_fit": int(len(train)), "n_calibration": int(len(scores)), "calibration_flag_rate": rate,
            "warning": warning}


# --------------------------------------------------------------------------------------------- predict


def load_detector(model) -> OODDetector | None:
    """The detector of a loaded model (``SavedModel``), or None (one info line) when its folder has none.

    Parameters
    ----------
    model : SavedModel
        A loaded model (:func:`opdcells.modelfolder.load_model`).

    Returns
    -------
    OODDetector or None

    Raises
    ------
    OODError
        When the folder's ``ood.npz`` is unusable (unreadable, newer format, other features), naming it.
    """
    path = Path(model.folder) / OOD_FILE
    if not path.is_file():
        log.info("model %s has no %s (trained before out-of-distribution detection): no ood columns",
                 model.name, OOD_FILE)
        return None
    return OODDetector.load(path)


class PredictionCheck:
    """What ``predict`` adds for OOD: the columns, their values per batch and the summary line.

    Constructing it says once (a warning) when the model was trained on simulated cells only.

    Parameters
    ----------
    model : modelfolder.SavedModel
        The loaded model.
    """

    def __init__(self, model):
        self.model = model
        self.detector = load_detector(model)
        self.n_maps = self.n_flagged = 0
        origin = (model.config.get("dataset") or {}).get("origin")
        if origin == SIMULATED:
            log.warning("model %s was trained on simulated cells only (%s): its answers for real cells are "
                        "untested", model.name, model.config["dataset"].get("path"))

    @property
    def morphology(self) -> bool:
        """Whether the detector scores the morphology block (its features can then be measured by the
        processes that read the exports)."""
        return self.detector is not None and "morphology" in self.detector.blocks

    @property
    def columns(self) -> list[str]:
        """``["ood_score", "ood_flag"]``, or none without a detector."""
        return [] if self.detector is None else ["ood_score", "ood_flag"]

    def values(self, maps, morphology: np.ndarray | None = None) -> list[list]:
        """CSV values (score with 4 significant digits, flag 0/1) for each of ``maps`` (N, S, S);
        ``morphology``: their features (N, F) when already measured (:func:`model_inputs`)."""
        if self.detector is None:
            return [[] for _ in range(len(maps))]
        inputs = model_inputs(self.model.learner, maps, self.model.config["pixel_size_um"],
                              morphology=morphology)
        scores = self.detector.score(inputs)
        return [[f"{s:.4g}", int(f)] for s, f in zip(scores, self.detector.flag(scores), strict=True)]

    def written(self, rows) -> None:
        """Count CSV ``rows`` written (their last value is the flag) for :meth:`summary`."""
        if self.detector is not None:
            self.n_maps += len(rows)
            self.n_flagged += sum(int(row[-1]) for row in rows)

    def summary(self) -> str | None:
        """'12 of 32 maps unlike the training data (flagged ood)', or None without a detector."""
        if self.detector is None:
            return None
        return (f"{self.n_flagged} of {self.n_maps} maps unlike the training data (flagged ood; about "
                f"{1 - self.detector.quantile:.0%} of maps like them would be)")
