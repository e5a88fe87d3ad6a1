"""Calibrated probabilities and screening operating points, fitted on validation groups.

Two questions a screening run must answer beside "which class": how far a probability can be trusted
(calibration) and where to put the threshold so that a stated fraction of non-target cells is flagged
(the operating point).

* Calibration: temperature scaling (Guo et al. 2017, "On calibration of modern neural networks", ICML),
  one parameter ``T`` fitted by minimising the negative log-likelihood of the validation maps. It acts on
  log-probabilities, ``softmax(log p / T)``, which equals scaling the logits (softmax is shift-invariant),
  so it works for any model that gives probabilities (Keras or the features model). It never changes the
  predicted class. Judged by the expected calibration error (ECE, 15 equal-width bins, Naeini et al. 2015).
* Operating point: the threshold on the target score (the summed calibrated probability of the target
  classes) above which a map is flagged, chosen so that the false-positive rate on NEW non-target maps
  is at most ``fpr`` with probability ``confidence`` (default 0.95): the Neyman-Pearson umbrella order
  statistic (:func:`np_order_statistic`; Tong, Feng and Li 2018, "Neyman-Pearson classification
  algorithms and NP receiver operating characteristics", Sci. Adv. 4:eaao1659). Of ``n`` non-target
  scores, the threshold lies just above the smallest order statistic ``k`` whose rate exceeds ``fpr``
  with probability at most ``1 - confidence`` (a binomial tail; distribution-free). A plain ``1 - fpr``
  quantile is a point estimate: its rate exceeds ``fpr`` in about half of all draws of the maps
  (``confidence=0.5`` gives about that threshold). Fewer than :func:`negatives_needed` maps cannot
  support the confidence (even their largest score does not); on validation maps the threshold is then
  extrapolated from a generalised Pareto distribution fitted to the upper tail of the non-target scores
  on the logit scale (peaks over threshold; Pickands 1975, Ann. Stat. 3:119), and the result says so.
  Either way :func:`rate_at_threshold` states what the maps support about the rate at the threshold:
  with ``r`` of ``n`` maps at or above it, the rate is at most the ``confidence`` quantile of
  Beta(r + 1, n - r) (exact for an order statistic, a bound for any threshold); for an order-statistic
  threshold its expectation is ``(r + 1) / (n + 1)`` with a 95% interval, for an extrapolated one only
  the bound holds. Bootstrap intervals of the threshold resample acquisition groups when given.
* Negative control (:func:`control_point`): how clinical assays set a cut-off. A blood-only sample imaged
  on the same instrument and day as the screened sample has thousands of non-target maps of the sample's
  own session, so the threshold is the Neyman-Pearson order statistic of the sample's own session (no
  extrapolation from a hundred validation maps, no carry-over from other sessions' optics); a control
  too small for the confidence asked is refused, naming the size needed. The control's observed rate
  gets an exact binomial interval (Clopper and Pearson 1934, Biometrika 26:404). Maps the
  out-of-distribution detector flags are left out: a screen never flags them, so they must not set its
  threshold, and the rate is per in-distribution map. The point is stored as a file
  (:func:`save_operating_point`) that ``screen --operating-point`` reads back
  (:func:`load_operating_point`) for that model only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import optimize, special, stats

from .errors import ScreenError

log = logging.getLogger(__name__)

#: The sample check (:func:`sample_checked_threshold`) needs at least this many maps expected above the
#: threshold (``(fpr + prevalence) * n``) to resolve the rate on the sample itself.
MIN_EXCEEDANCES = 10
#: Fraction of the non-target scores that forms the tail fitted by the generalised Pareto distribution.
TAIL_FRACTION = 0.1
ECE_BINS = 15
#: Default probability that an operating point's false-positive rate on new non-target maps is at most its
#: ``fpr`` (the Neyman-Pearson confidence ``1 - delta`` of Tong, Feng and Li 2018): 0.95, the level at
#: which "at most fpr" is a statement a lab can rely on; 0.5 gives about the plain ``1 - fpr`` quantile.
DEFAULT_CONFIDENCE = 0.95
#: Coverage of the two-sided intervals reported beside the expected rates and counts.
INTERVAL_LEVEL = 0.95
_EPS = 1e-12


def _log_proba(proba: np.ndarray) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] < 2:
        raise ValueError(f"probabilities must be (n_maps, n_classes >= 2), got shape {proba.shape}")
    return np.log(np.clip(proba, _EPS, 1.0))


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities ``softmax(log(proba) / T)``.

    Parameters
    ----------
    proba : (n_maps, n_classes) array
        Probabilities of a model (rows sum to 1).
    temperature : float
        ``T > 0``; 1 leaves ``proba`` unchanged, ``T > 1`` softens over-confident models.

    Returns
    -------
    (n_maps, n_classes) float64 array, rows sum to 1; the argmax of each row is unchanged.

    Raises
    ------
    ValueError
        ``temperature`` not positive or ``proba`` not 2-D.
    """
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return special.softmax(_log_proba(proba) / temperature, axis=1)


def fit_temperature(proba: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature minimising the negative log-likelihood of ``labels`` (Guo et al. 2017).

    Parameters
    ----------
    proba : (n_maps, n_classes) array
        Uncalibrated probabilities of the validation maps.
    labels : (n_maps,) int array
        True class ids.
    bounds : (float, float)
        Search interval for ``T`` (searched on a log scale).

    Returns
    -------
    float
        The fitted temperature.
    """
    log_p = _log_proba(proba)
    labels = np.asarray(labels, dtype=int)

    def nll(log_t: float) -> float:
        scaled = log_p / np.exp(log_t)
        return float(np.mean(special.logsumexp(scaled, axis=1) - scaled[np.arange(len(labels)), labels]))

    result = optimize.minimize_scalar(nll, bounds=np.log(bounds), method="bounded")
    return float(np.exp(result.x))


def reliability(proba: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Reliability diagram data and expected calibration error (ECE) of top-class confidences.

    Parameters
    ----------
    proba : (n_maps, n_classes) array
    labels : (n_maps,) int array
    n_bins : int
        Equal-width confidence bins on [0, 1].

    Returns
    -------
    dict
        ``confidence``, ``accuracy``, ``count`` (per bin, NaN where empty) and ``ece``: the
        count-weighted mean of ``|accuracy - confidence|`` (Naeini et al. 2015, AAAI).
    """
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(labels)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, confidence, n_bins) / count
        mean_acc = np.bincount(bins, correct, n_bins) / count
    gap = np.nan_to_num(np.abs(mean_acc - mean_conf))
    return {"confidence": mean_conf, "accuracy": mean_acc, "count": count,
            "ece": float(np.sum(gap * count) / max(len(confidence), 1))}


def _logit(p: np.ndarray) -> np.ndarray:
    return special.logit(np.clip(p, 1e-9, 1 - 1e-9))


def _tail_threshold(negatives: np.ndarray, fpr: float) -> float:
    """Score exceeded by a fraction ``fpr`` of non-targets, from a generalised Pareto tail fit."""
    z = np.sort(_logit(negatives))
    u = np.quantile(z, 1 - TAIL_FRACTION)
    excess = z[z > u] - u
    p_exceed = len(excess) / len(z)
    if fpr >= p_exceed:    # the rate lies below the tail: its quantile needs no extrapolation
        return float(special.expit(np.quantile(z, 1 - fpr, method="higher")))
    if len(excess) < 5 or np.ptp(excess) == 0:
        return float(special.expit(z[-1]))        # too few distinct tail scores: the largest seen
    shape, _, scale = stats.genpareto.fit(excess, floc=0)
    return float(special.expit(u + stats.genpareto.isf(fpr / p_exceed, shape, loc=0, scale=scale)))


def _check_rate(fpr: float, confidence: float) -> None:
    if not 0 < fpr < 1:
        raise ValueError(f"false-positive rate must be in (0, 1), got {fpr}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _percent(confidence: float) -> str:
    return f"{100 * confidence:.3g}%"


def negatives_needed(fpr: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """Fewest non-target maps that can bound a false-positive rate of ``fpr`` at ``confidence``.

    Even the largest of ``n`` scores exceeds the rate's ``1 - fpr`` quantile with probability only
    ``1 - (1 - fpr)^n``, so ``n`` must reach ``log(1 - confidence) / log(1 - fpr)`` (2,995 for 1e-3 at
    0.95; Tong, Feng and Li 2018, Sci. Adv. 4:eaao1659, Proposition 1).

    Parameters
    ----------
    fpr : float
        False-positive rate, in (0, 1).
    confidence : float
        Wanted probability that the rate is at most ``fpr``, in (0, 1).

    Returns
    -------
    int
        The smallest ``n`` with ``(1 - fpr)^n <= 1 - confidence``.
    """
    _check_rate(fpr, confidence)
    n = max(1, math.ceil(math.log(1 - confidence) / math.log1p(-fpr)))
    while math.exp(n * math.log1p(-fpr)) > 1 - confidence:     # guard the rounding of the ceiling
        n += 1
    while n > 1 and math.exp((n - 1) * math.log1p(-fpr)) <= 1 - confidence:
        n -= 1
    return n


def np_order_statistic(n: int, fpr: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """The Neyman-Pearson umbrella order statistic of ``n`` non-target scores (Tong, Feng and Li 2018).

    Flagging the maps that score above the ``k``-th smallest of ``n`` exchangeable non-target scores gives
    new non-target maps a false-positive rate that exceeds ``fpr`` with probability
    ``sum_{j=k}^{n} C(n, j) (1 - fpr)^j fpr^(n - j)`` (the rate is Beta(n - k + 1, k)-distributed whatever
    the scores' distribution). This is the smallest ``k`` that keeps that probability at most
    ``1 - confidence``: the lowest threshold with the guarantee.

    Parameters
    ----------
    n : int
        Non-target scores.
    fpr : float
        False-positive rate, in (0, 1).
    confidence : float
        Wanted probability that the rate is at most ``fpr``, in (0, 1).

    Returns
    -------
    int or None
        ``k`` (1-based, scores in ascending order; ``n - k`` maps lie above it), or None when ``n`` is
        below :func:`negatives_needed` (no order statistic achieves the confidence).
    """
    _check_rate(fpr, confidence)
    delta = 1 - confidence
    allowed = int(stats.binom.ppf(delta, n, fpr))     # maps above: P(Binom(n, fpr) <= allowed) <= delta
    while allowed >= 0 and stats.binom.cdf(allowed, n, fpr) > delta:
        allowed -= 1
    while allowed + 1 < n and stats.binom.cdf(allowed + 1, n, fpr) <= delta:
        allowed += 1
    return None if allowed < 0 else n - allowed


def _np_threshold(negatives: np.ndarray, fpr: float, confidence: float) -> tuple[float, int] | None:
    """Just above the Neyman-Pearson order statistic (a map is flagged when strictly above it), and ``k``."""
    k = np_order_statistic(len(negatives), fpr, confidence)
    if k is None:
        return None
    return float(np.nextafter(np.partition(negatives, k - 1)[k - 1], np.inf)), k


def threshold_at_fpr(negatives: np.ndarray, fpr: float,
                     confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, bool]:
    """Threshold on the target score whose false-positive rate is at most ``fpr`` with ``confidence``.

    Parameters
    ----------
    negatives : (N,) ndarray
        Target scores (probabilities, 0-1) of the validation maps that are not targets.
    fpr : float
        Wanted false-positive rate (a fraction, e.g. 1e-3).
    confidence : float
        Probability that the rate on new non-target maps is at most ``fpr`` (:data:`DEFAULT_CONFIDENCE`).

    Returns
    -------
    (threshold, extrapolated)
        Flag a map when its score is ``>= threshold``. Just above the Neyman-Pearson order statistic
        (:func:`np_order_statistic`) when ``N`` reaches :func:`negatives_needed`; else ``extrapolated`` is
        True and the threshold is the generalised Pareto tail fit's estimate of the ``1 - fpr`` quantile
        (no confidence: :func:`rate_at_threshold` says what the maps support).
    """
    negatives = np.asarray(negatives, dtype=np.float64)
    found = _np_threshold(negatives, fpr, confidence)
    if found is not None:
        return found[0], False
    return _tail_threshold(negatives, fpr), True


def rate_at_threshold(negatives: np.ndarray, threshold: float, fpr: float,
                      confidence: float = DEFAULT_CONFIDENCE, order_statistic: int | None = None) -> dict:
    """What ``negatives`` support about the false-positive rate at ``threshold`` on new non-target maps.

    With ``r`` of the ``n`` scores at or above ``threshold``, the threshold lies above the
    ``(r + 1)``-th highest score, whose rate is Beta(r + 1, n - r)-distributed for exchangeable scores
    whatever their distribution (order statistics of uniforms; Tong, Feng and Li 2018): the rate at the
    threshold is at most that. For a threshold just above an order statistic (``order_statistic``) the
    distribution is exact, so its mean ``(r + 1) / (n + 1)`` is the expected rate; for any other
    (an extrapolated one) only the upper bound holds. Maps of few acquisition groups are not exchangeable
    across sessions: the statements hold for cells like those of ``negatives``.

    Parameters
    ----------
    negatives : (n,) array
        Non-target scores the threshold was set on (0-1).
    threshold : float
        Flag at ``score >= threshold``.
    fpr : float
        The false-positive rate asked for.
    confidence : float
        Level of the one-sided bound ``upper``.
    order_statistic : int, optional
        ``k`` when the threshold lies just above the ``k``-th smallest score (:func:`np_order_statistic`).

    Returns
    -------
    dict
        JSON-ready: ``confidence``, ``order_statistic`` (or None), ``n``, ``n_above`` (``r``),
        ``observed`` (``r / n``) and ``observed_ci`` (its 95% Clopper-Pearson interval), ``upper`` (the
        rate is at most this with probability ``confidence``), ``exceed_probability`` (at most this
        probability that the rate exceeds ``fpr``; at most ``1 - confidence`` for an order statistic
        set by :func:`np_order_statistic`), ``expected`` and ``expected_ci`` (mean and
        :data:`INTERVAL_LEVEL` interval of the rate; None unless ``order_statistic`` is given).
    """
    negatives = np.asarray(negatives, dtype=np.float64)
    n = len(negatives)
    r = int(np.sum(negatives >= threshold))
    exact = order_statistic is not None
    if r >= n:       # every map at or above: the maps bound nothing
        upper, exceed, mean, ci = 1.0, 1.0, 1.0, [0.0, 1.0]
    else:
        rate = stats.beta(r + 1, n - r)
        tail = (1 - INTERVAL_LEVEL) / 2
        upper, exceed = float(rate.ppf(confidence)), float(rate.sf(fpr))
        mean, ci = (r + 1) / (n + 1), [float(rate.ppf(tail)), float(rate.ppf(1 - tail))]
    return {"confidence": float(confidence), "order_statistic": order_statistic, "n": n, "n_above": r,
            "observed": r / n if n else float("nan"), "observed_ci": list(clopper_pearson(r, n)),
            "upper": upper, "exceed_probability": exceed,
            "expected": mean if exact else None, "expected_ci": ci if exact else None}


@dataclass
class OperatingPoint:
    """Threshold on the target score for a stated false-positive rate, measured on validation maps.

    Attributes
    ----------
    fpr : float
        Target false-positive rate (fraction of non-target maps flagged): the rate on new non-target maps
        is at most ``fpr`` with probability ``rate_at_threshold["confidence"]`` (unless ``extrapolated``).
    threshold : float
        Flag a map when its target score is ``>= threshold`` (score in [0, 1]).
    threshold_ci : (float, float)
        95% bootstrap interval of the threshold.
    sensitivity : float
        Fraction of validation target maps at or above the threshold.
    sensitivity_ci : (float, float)
        95% bootstrap interval of ``sensitivity``.
    n_negative, n_positive : int
        Validation non-target / target maps it was set on.
    extrapolated : bool
        True when ``n_negative`` is below :func:`negatives_needed` and the tail fit was used (no confidence).
    basis : str
        One sentence saying how the threshold was found.
    source : str
        Where the threshold was set: "validation" (the model's validation maps) or "control" (a negative
        control sample, :func:`control_point`).
    control : dict, optional
        For ``source="control"``: ``n_maps`` (control maps scored), ``n_in_distribution`` (those the
        threshold was set on; ``n_negative`` is the same), ``n_out_of_distribution`` (left out),
        ``n_above`` (in-distribution maps at or above the threshold), ``rate`` (``n_above /
        n_in_distribution``, the false-positive rate expected per in-distribution non-target map) and
        ``rate_ci`` (its 95% Clopper-Pearson interval), ``files`` (the control's exports).
    rate_at_threshold : dict, optional
        What the maps it was set on support about the rate at the threshold (:func:`rate_at_threshold`:
        the confidence, the order statistic, the observed rate with its interval, the upper bound and,
        for an order statistic, the expected rate with its interval). None for points set before it was
        recorded.
    """

    fpr: float
    threshold: float
    threshold_ci: tuple[float, float]
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    n_negative: int
    n_positive: int
    extrapolated: bool
    basis: str
    source: str = "validation"
    control: dict | None = field(default=None)
    rate_at_threshold: dict | None = field(default=None)

    def as_dict(self) -> dict:
        """JSON-ready (intervals as lists, as config.json reads them back)."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> OperatingPoint:
        data = dict(data)
        for key in ("threshold_ci", "sensitivity_ci"):
            data[key] = tuple(data[key])
        return cls(**data)


def _resample(rng: np.random.Generator, groups: np.ndarray | None, n: int) -> np.ndarray:
    if groups is None:
        return rng.integers(0, n, n)
    names = np.unique(groups)
    drawn = rng.choice(names, len(names))
    return np.concatenate([np.flatnonzero(groups == g) for g in drawn])


def operating_point(score: np.ndarray, is_target: np.ndarray, fpr: float = 1e-3, *,
                    confidence: float = DEFAULT_CONFIDENCE, groups: np.ndarray | None = None,
                    n_boot: int = 500, seed: int = 0) -> OperatingPoint:
    """Set the threshold for false-positive rate ``fpr`` on validation scores (:func:`threshold_at_fpr`).

    With at least :func:`negatives_needed` validation non-target maps the rate on new maps like them is
    at most ``fpr`` with probability ``confidence``; with fewer the threshold is extrapolated and
    ``rate_at_threshold`` holds only the bound those maps support.

    Parameters
    ----------
    score : (n_maps,) array
        Calibrated target score of each validation map (probability of any target class).
    is_target : (n_maps,) bool array
        True for maps of a target class.
    fpr : float
        Wanted fraction of non-target maps flagged, in (0, 1).
    confidence : float
        Wanted probability that the rate is at most ``fpr``, in (0, 1).
    groups : (n_maps,) array, optional
        Acquisition group of each map: the bootstrap resamples groups (cluster bootstrap).
    n_boot : int
        Bootstrap replicates.
    seed : int

    Returns
    -------
    OperatingPoint

    Raises
    ------
    ValueError
        ``fpr`` or ``confidence`` outside (0, 1), or no target or no non-target map.
    """
    _check_rate(fpr, confidence)
    score = np.asarray(score, dtype=np.float64)
    is_target = np.asarray(is_target, dtype=bool)
    negatives, positives = score[~is_target], score[is_target]
    if not len(negatives) or not len(positives):
        raise ValueError("an operating point needs validation maps of target and of non-target classes")
    threshold, extrapolated = threshold_at_fpr(negatives, fpr, confidence)
    rng = np.random.default_rng(seed)
    boot_t, boot_s = [], []
    groups = None if groups is None else np.asarray(groups)
    for _ in range(n_boot):
        idx = _resample(rng, groups, len(score))
        neg, pos = score[idx][~is_target[idx]], score[idx][is_target[idx]]
        if len(neg) and len(pos):
            t, _ = threshold_at_fpr(neg, fpr, confidence)
            boot_t.append(t)
            boot_s.append(np.mean(pos >= t))
    n = len(negatives)
    k = None if extrapolated else np_order_statistic(n, fpr, confidence)
    rate = rate_at_threshold(negatives, threshold, fpr, confidence, k)
    basis = (f"Neyman-Pearson order statistic {k} of {n} validation non-target maps: the rate on maps like "
             f"them exceeds {fpr:g} with probability at most {rate['exceed_probability']:.2g}" if k else
             f"extrapolated: {n} validation non-target maps are fewer than the "
             f"{negatives_needed(fpr, confidence)} that bound a rate of {fpr:g} at {_percent(confidence)} "
             f"confidence; generalised Pareto fit to their top {TAIL_FRACTION:.0%} (logit scale); they bound "
             f"the rate only by {rate['upper']:.2g}")
    return OperatingPoint(fpr=fpr, threshold=threshold, threshold_ci=_interval(boot_t, threshold),
                          sensitivity=float(np.mean(positives >= threshold)),
                          sensitivity_ci=_interval(boot_s, float(np.mean(positives >= threshold))),
                          n_negative=int(n), n_positive=int(len(positives)),
                          extrapolated=extrapolated, basis=basis, rate_at_threshold=rate)


def _interval(values: list[float], fallback: float) -> tuple[float, float]:
    if not values:
        return (fallback, fallback)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def expected_yield(n_maps: int, prevalence: float, point: OperatingPoint,
                   n_in_distribution: int | None = None) -> dict:
    """What a screening run of ``n_maps`` cells at ``prevalence`` should flag at ``point``.

    The expected false positives are those the threshold will really give, as the maps it was set on
    support them (``point.rate_at_threshold``, :func:`rate_at_threshold`), not ``fpr`` times the cells:
    for a threshold at an order statistic (a negative control's, or a large validation set's) the
    non-targets times the expected rate ``(r + 1) / (n + 1)``, with the interval of that rate; for an
    extrapolated threshold only an upper bound: the non-targets times the rate's ``confidence`` bound,
    and the interval from 0 to it. Points set before the rate was recorded fall back to the control's
    observed rate (Clopper-Pearson interval) or to ``fpr`` (no interval).

    Parameters
    ----------
    n_maps : int
        Cells screened.
    prevalence : float
        Fraction of target cells in the sample (e.g. 1e-5 for one tumour cell in 10^5 blood cells).
    point : OperatingPoint
    n_in_distribution : int, optional
        Cells screened that the out-of-distribution detector did not veto (default ``n_maps``); a control
        point's rate is per such map.

    Returns
    -------
    dict
        ``expected_false_positives``, ``expected_false_positives_ci`` (``[low, high]``, or None),
        ``expected_false_positives_basis`` (one sentence: "estimate: ..." or "upper bound: ..."),
        ``expected_true_positives`` (n_target * sensitivity) and ``expected_purity`` (positive predictive
        value: true / all flagged; a lower bound where the false positives are an upper bound; NaN when
        nothing is expected to be flagged).
    """
    n_target = n_maps * prevalence
    tp = n_target * point.sensitivity
    screened = n_maps if n_in_distribution is None or not point.control else n_in_distribution
    n_negative = screened - n_target
    rate, where = point.rate_at_threshold, f"the {point.source}'s"
    if rate and rate["expected"] is not None:
        fp, ci = n_negative * rate["expected"], [n_negative * r for r in rate["expected_ci"]]
        basis = (f"estimate: {n_negative:.0f} non-target maps x the expected rate {rate['expected']:.3g} at "
                 f"this threshold ({rate['n_above']} of {rate['n']} of {where} maps above it), with its "
                 f"{INTERVAL_LEVEL:.0%} interval")
    elif rate:
        fp, ci = n_negative * rate["upper"], [0.0, n_negative * rate["upper"]]
        basis = (f"upper bound: the threshold is extrapolated, and {rate['n_above']} of {rate['n']} of "
                 f"{where} maps above it bound the rate by {rate['upper']:.3g} "
                 f"({_percent(rate['confidence'])} confidence), no closer: set the threshold on a negative "
                 "control for an estimate")
    elif point.control:
        fp = n_negative * point.control["rate"]
        ci = [n_negative * r for r in point.control["rate_ci"]]
        basis = "estimate: non-target maps x the control's observed rate, with its Clopper-Pearson interval"
    else:
        fp, ci = n_negative * point.fpr, None
        basis = "the operating point's rate x the non-target maps (a point set before its rate was bounded)"
    return {"expected_false_positives": fp, "expected_false_positives_ci": ci,
            "expected_false_positives_basis": basis, "expected_true_positives": tp,
            "expected_purity": tp / (tp + fp) if tp + fp > 0 else float("nan")}


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a proportion ``k / n`` (Clopper and Pearson 1934, Biometrika 26:404).

    Parameters
    ----------
    k : int
        Successes (e.g. control maps at or above a threshold).
    n : int
        Trials (``n >= 1``).
    level : float
        Coverage of the interval.

    Returns
    -------
    (float, float)
        Lower and upper bound of the proportion.
    """
    interval = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def control_too_small(n: int, fpr: float, confidence: float) -> str:
    """One sentence saying that ``n`` control maps cannot bound ``fpr`` at ``confidence``, and what can.

    Parameters
    ----------
    n : int
        In-distribution control maps.
    fpr, confidence : float
        The rate and confidence asked for.

    Returns
    -------
    str
        Names the control size needed (:func:`negatives_needed`) and the largest confidence ``n`` supports.
    """
    supported = 1 - math.exp(n * math.log1p(-fpr))
    return (f"{n} in-distribution control maps are too few to bound a false-positive rate of {fpr:g} at "
            f"{_percent(confidence)} confidence: that needs at least {negatives_needed(fpr, confidence)} "
            f"(this control supports at most {_percent(supported)}): image a larger control, or ask for "
            "less (--fpr-confidence, --fpr)")


def control_point(scores: np.ndarray, fpr: float = 1e-3, *, confidence: float = DEFAULT_CONFIDENCE,
                  n_out_of_distribution: int = 0, validation_positives: np.ndarray | None = None,
                  positive_groups: np.ndarray | None = None, files: list[str] | None = None,
                  n_boot: int = 500, seed: int = 0) -> OperatingPoint:
    """Set the threshold for false-positive rate ``fpr`` at ``confidence`` on a negative control's scores.

    A negative control is a sample with no target cells (healthy donor blood, a blood-only fraction)
    imaged in the screened sample's session. The threshold lies just above the Neyman-Pearson umbrella
    order statistic of the control's in-distribution scores (:func:`np_order_statistic`; Tong, Feng and
    Li 2018, Sci. Adv. 4:eaao1659): the false-positive rate on new maps of that session exceeds ``fpr``
    with probability at most ``1 - confidence``, whatever the scores' distribution (a plain ``1 - fpr``
    quantile exceeds it in about half of all controls; ``confidence=0.5`` gives about that one). A
    control smaller than :func:`negatives_needed` cannot give that guarantee and is refused (no
    extrapolation: a lab's cut-off must be measured). ``rate_at_threshold`` records the order statistic,
    the control's observed rate with its Clopper-Pearson interval and the expected rate at the threshold
    with its interval, from which a screen derives its expected false positives
    (:func:`expected_yield`); ``threshold_ci`` is a bootstrap interval over the control's maps.

    Parameters
    ----------
    scores : (n,) array
        Calibrated target scores (0-1) of the control's maps that are NOT out of distribution.
    fpr : float
        Wanted fraction of non-target maps flagged, in (0, 1).
    confidence : float
        Wanted probability that the rate is at most ``fpr``, in (0, 1) (:data:`DEFAULT_CONFIDENCE`).
    n_out_of_distribution : int
        Control maps the out-of-distribution detector flagged (left out of ``scores``; reported).
    validation_positives : (m,) array, optional
        Calibrated target scores of the model's validation target maps: the sensitivity at the control's
        threshold (NaN when not given).
    positive_groups : (m,) array, optional
        Acquisition group of each validation target map (cluster bootstrap of the sensitivity).
    files : list of str, optional
        The control's export files (recorded).
    n_boot : int
        Bootstrap replicates of the threshold and the sensitivity.
    seed : int

    Returns
    -------
    OperatingPoint
        ``source="control"``, ``n_negative`` the in-distribution control maps, ``control`` the counts, the
        observed rate and its interval, ``rate_at_threshold`` (:func:`rate_at_threshold`).

    Raises
    ------
    ValueError
        ``fpr`` or ``confidence`` outside (0, 1), no in-distribution control map, or fewer than
        :func:`negatives_needed` (:func:`control_too_small` says how many are needed).
    """
    _check_rate(fpr, confidence)
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if not n:
        raise ValueError("the control has no in-distribution map to set a threshold on")
    found = _np_threshold(scores, fpr, confidence)
    if found is None:
        raise ValueError(control_too_small(n, fpr, confidence))
    threshold, k = found
    rng = np.random.default_rng(seed)
    boot = [float(np.nextafter(np.partition(scores[rng.integers(0, n, n)], k - 1)[k - 1], np.inf))
            for _ in range(n_boot)]
    positives = np.asarray([] if validation_positives is None else validation_positives, dtype=np.float64)
    sensitivity, sensitivity_ci = float("nan"), (float("nan"), float("nan"))
    if len(positives):
        sensitivity = float(np.mean(positives >= threshold))
        groups = None if positive_groups is None else np.asarray(positive_groups)
        boot_s = [float(np.mean(positives[_resample(rng, groups, len(positives))] >= threshold))
                  for _ in range(n_boot)]
        sensitivity_ci = _interval(boot_s, sensitivity)
    rate = rate_at_threshold(scores, threshold, fpr, confidence, k)
    basis = (f"Neyman-Pearson order statistic {k} of {n} in-distribution negative-control maps "
             f"({n_out_of_distribution} out of distribution left out): the rate exceeds {fpr:g} with "
             f"probability at most {rate['exceed_probability']:.2g}")
    control = {"n_maps": n + int(n_out_of_distribution), "n_in_distribution": n,
               "n_out_of_distribution": int(n_out_of_distribution), "n_above": rate["n_above"],
               "rate": rate["observed"], "rate_ci": rate["observed_ci"], "files": list(files or [])}
    return OperatingPoint(fpr=fpr, threshold=threshold, threshold_ci=_interval(boot, threshold),
                          sensitivity=sensitivity, sensitivity_ci=sensitivity_ci, n_negative=n,
                          n_positive=int(len(positives)), extrapolated=False, basis=basis,
                          source="control", control=control, rate_at_threshold=rate)


def sample_checked_threshold(scores: np.ndarray, threshold: float, fpr: float,
                             prevalence: float) -> tuple[float, dict]:
    """The threshold a screening run flags at: the validation ``threshold``, raised to the sample's own
    upper quantile when more of the sample lies above it than the false-positive rate allows.

    In a rare-cell screen nearly every map is a non-target (at most a fraction ``prevalence`` are
    targets), so the sample's own scores are a sample of the non-target distribution (an empirical null;
    Efron 2004, J. Am. Stat. Assoc. 99:96). At most ``(fpr + prevalence) * n`` maps may lie at or above
    the threshold; more means the sample's non-targets score higher than the validation maps did (a new
    session's shift, or a threshold extrapolated from too few validation maps), and the threshold is
    raised until no more than that many are flagged. It is never lowered: a sample whose non-targets
    score lower keeps the validation threshold (fewer false positives than ``fpr``). A sample too small
    to resolve the rate (fewer than :data:`MIN_EXCEEDANCES` maps expected above the threshold) is not
    checked. The raised threshold is the sample's own point estimate, with no confidence about new
    non-target maps (:func:`threshold_at_fpr`'s guarantee does not carry over), but an in-sample bound:
    the false positives among this sample's maps are at most those it flags. A sample holding more target
    cells than ``prevalence`` is capped too: give the largest prevalence plausible for the samples.

    Parameters
    ----------
    scores : (n_maps,) array
        Calibrated target scores of the sample's in-distribution maps.
    threshold : float
        The operating point's threshold, set on the validation maps.
    fpr : float
        False-positive rate of the operating point.
    prevalence : float
        Largest fraction of target cells assumed in the sample.

    Returns
    -------
    (threshold, check)
        The threshold to flag at (``score >= threshold``) and a JSON-ready record: ``source``
        ("validation", "sample", or "validation (sample too small to check)"), ``validation_threshold``,
        ``above_validation_threshold`` (maps of the sample at or above it), ``allowed``
        (``floor((fpr + prevalence) * n)``) and ``n``.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    n = len(scores)
    allowed = int(np.floor((fpr + prevalence) * n))
    above = int(np.sum(scores >= threshold))
    check = {"source": "validation", "validation_threshold": float(threshold),
             "above_validation_threshold": above, "allowed": allowed, "n": n}
    if (fpr + prevalence) * n < MIN_EXCEEDANCES:
        return float(threshold), {**check, "source": "validation (sample too small to check)"}
    if above <= allowed:
        return float(threshold), check
    raised = float(np.nextafter(scores[allowed], np.inf))   # just above the (allowed + 1)-th highest score
    return raised, {**check, "source": "sample"}


# ------------------------------------------------------------------------------- model-level calibration
#: Class or task-class names taken for cancer (target) classes when none are named: the reference study's
#: two colorectal lines and the usual words for tumour cells (matched case-insensitively).
CANCER_NAMES = ("sw480", "sw620", "cancer", "tumour", "tumor", "ctc", "malignant")
VALIDATION_FILE = "validation_scores.npz"
DEFAULT_FPR = 1e-3


def default_targets(class_names) -> list[str]:
    """The model's cancer classes: names containing one of :data:`CANCER_NAMES` (may be empty).

    Parameters
    ----------
    class_names : sequence of str
        The model's classes.

    Returns
    -------
    list of str
        The matching names, in order (matched case-insensitively).
    """
    return [name for name in class_names if any(word in name.lower() for word in CANCER_NAMES)]


def target_score(proba: np.ndarray, class_names, targets) -> np.ndarray:
    """Probability that a map belongs to any of ``targets``: the sum of their columns of ``proba``.

    Parameters
    ----------
    proba : (N, C) ndarray
        Class probabilities.
    class_names : sequence of str
        The C classes.
    targets : sequence of str
        The target classes.

    Returns
    -------
    (N,) ndarray
        The summed probabilities (0-1).

    Raises
    ------
    ValueError
        A target that is not one of ``class_names``, or no target.
    """
    class_names = list(class_names)
    unknown = [t for t in targets if t not in class_names]
    if unknown or not targets:
        raise ValueError(f"target classes {', '.join(unknown) or '(none)'} are not classes of the model "
                         f"({', '.join(class_names)})")
    return np.asarray(proba)[:, [class_names.index(t) for t in targets]].sum(axis=1)


def calibrate(proba: np.ndarray, labels: np.ndarray, class_names, *, groups=None, targets=None,
              fpr: float = DEFAULT_FPR, confidence: float = DEFAULT_CONFIDENCE, n_boot: int = 500,
              seed: int = 0) -> dict:
    """Fit the temperature and the default operating point of a model on its validation maps.

    Parameters
    ----------
    proba : (n_val, n_classes) array
        Uncalibrated probabilities of the validation maps.
    labels : (n_val,) int array
    class_names : sequence of str
    groups : (n_val,) array, optional
        Acquisition groups (the operating point's bootstrap resamples them).
    targets : list of str, optional
        Target classes; default :func:`default_targets`. Without any, no operating point is set.
    fpr : float
        False-positive rate of the default operating point.
    confidence : float
        Probability that its rate is at most ``fpr`` (:func:`operating_point`).

    Returns
    -------
    dict
        JSON-ready: ``method``, ``temperature``, ``ece_before``, ``ece_after``, ``n_maps``, ``targets``,
        ``operating_point`` (``OperatingPoint.as_dict()`` or None) for the model's config.json.
    """
    temperature = fit_temperature(proba, labels)
    calibrated = apply_temperature(proba, temperature)
    targets = list(targets) if targets is not None else default_targets(class_names)
    point = None
    if targets:
        is_target = np.isin(np.asarray(labels), [list(class_names).index(t) for t in targets])
        if is_target.any() and (~is_target).any():
            point = operating_point(target_score(calibrated, class_names, targets), is_target, fpr,
                                    confidence=confidence, groups=groups, n_boot=n_boot, seed=seed).as_dict()
    before, after = reliability(proba, labels), reliability(calibrated, labels)
    return {"method": "temperature scaling (Guo et al. 2017) on the validation groups",
            "temperature": temperature, "ece_before": before["ece"], "ece_after": after["ece"],
            "n_maps": int(len(labels)), "targets": targets, "operating_point": point,
            "reliability": {"before": _jsonable(before), "after": _jsonable(after)}}


def _jsonable(curve: dict) -> dict:
    """Reliability bins with NaN (empty bins) as None, for config.json."""
    return {key: (value if np.isscalar(value) else
                  [None if not np.isfinite(v) else float(v) for v in np.asarray(value, float)])
            for key, value in curve.items()}


def save_validation_scores(folder, proba: np.ndarray, labels: np.ndarray, groups) -> None:
    """Keep the validation maps' uncalibrated probabilities, labels and groups beside the model, so a
    screening run can set an operating point for other targets or rates (plain arrays, no pickles).

    Parameters
    ----------
    folder : str or Path
        The model folder; ``VALIDATION_FILE`` is written in it.
    proba : (N, C) ndarray
        Uncalibrated class probabilities (stored float32).
    labels : (N,) ndarray of int
        True class indices.
    groups : sequence of str
        Acquisition group of each map.
    """
    np.savez_compressed(Path(folder) / VALIDATION_FILE, proba=np.asarray(proba, np.float32),
                        labels=np.asarray(labels, np.int32), groups=np.asarray(groups, dtype=str))


def load_validation_scores(folder) -> dict | None:
    """What :func:`save_validation_scores` wrote (None when the model folder has none).

    Parameters
    ----------
    folder : str or Path
        The model folder.

    Returns
    -------
    dict or None
        ``proba`` (N, C) float32, ``labels`` (N,) int32, ``groups`` (N,) str.
    """
    path = Path(folder) / VALIDATION_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in ("proba", "labels", "groups")}


# ------------------------------------------------------------------------------- operating-point files
#: ``kind`` of an operating-point file (:func:`save_operating_point`).
POINT_KIND = "opdcells operating point"


def model_digest(model) -> str:
    """SHA-256 of what a model's scores depend on for an operating point: its name, classes and calibration.

    Parameters
    ----------
    model : SavedModel
        A loaded model (``name``, ``class_names``, ``config``).

    Returns
    -------
    str
        Hex digest; a model trained again (new calibration) has another.
    """
    record = {"name": model.name, "classes": list(model.class_names),
              "calibration": model.config.get("calibration")}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def save_operating_point(path, point: OperatingPoint, *, model, targets: list[str],
                         temperature: float) -> Path:
    """Write ``point`` as an operating-point file for ``model`` (JSON, atomically; never over another file).

    Parameters
    ----------
    path : str or Path
        The file to write (must not exist).
    point : OperatingPoint
        Typically from :func:`control_point`.
    model : SavedModel
        The model whose scores set it.
    targets : list of str
        Target classes of the score.
    temperature : float
        The calibration temperature the scores were computed with.

    Returns
    -------
    Path

    Raises
    ------
    ScreenError
        ``path`` exists (an earlier operating point is never overwritten, also not by a run that writes
        the same file at the same time).
    """
    path = Path(path)
    record = {"kind": POINT_KIND, "version": 1, "model": model.name, "model_digest": model_digest(model),
              "targets": list(targets), "temperature": float(temperature), "point": point.as_dict()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(json.dumps(record, indent=2))
        os.chmod(tmp, 0o644)
        os.link(tmp, path)   # atomic, and never over an existing file
    except FileExistsError:
        raise ScreenError(path, "exists: choose another --out (an operating point is never overwritten)") \
            from None
    finally:
        os.unlink(tmp)
    return path


def load_operating_point(path, model) -> dict:
    """Read an operating-point file written for ``model``.

    Parameters
    ----------
    path : str or Path
        A file :func:`save_operating_point` wrote.
    model : SavedModel
        The model that will screen with it.

    Returns
    -------
    dict
        ``targets`` (list of str), ``temperature`` (float), ``point`` (:class:`OperatingPoint`).

    Raises
    ------
    ValueError
        Unreadable, not an operating-point file, or set with another model (or the model trained again);
        the message does not name ``path``.
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if record.get("kind") != POINT_KIND:
            raise ValueError("not an opdcells operating-point file")
        point = OperatingPoint.from_dict(record["point"])
        targets, temperature = list(record["targets"]), float(record["temperature"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not a readable operating point ({err})") from err
    if record.get("model_digest") != model_digest(model):
        raise ValueError(f"set with model {record.get('model')!r}, not with {model.name!r} as it is "
                         "now (another model, or trained again): calibrate the threshold again")
    return {"targets": targets, "temperature": temperature, "point": point}
