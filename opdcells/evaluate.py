"""Classification metrics with bootstrap confidence intervals, printable reports and comparison tables.

Point estimates come from scikit-learn. Bootstrap resamples are scored in batches as per-map weights
(how often each map is drawn): maps drawn with replacement, or -- when the maps' acquisition groups are
given -- a two-stage bootstrap: whole groups drawn with replacement within each class, then maps within
each drawn group (maps of one field are not independent, so resampling maps alone makes intervals too
narrow when groups are few; resampling groups alone gives no interval where a class has one group).
Scores come accuracy, balanced accuracy and macro F1 from a stack of confusion matrices, sensitivity
at a fixed false-positive rate from weighted cumulative counts, so 1000 resamples of thousands of maps
take a fraction of a second. The batched formulas follow scikit-learn's conventions (tests compare
them on the same resamples).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from .config import TTA_DIHEDRAL
from .errors import DatasetError
from .files import opened, write_json
from .splits import Split
from .tasks import Task, task_labels

if TYPE_CHECKING:
    from .modelfolder import SavedModel

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1")
FPR_TARGETS = (0.01, 0.001)
ECE_BINS = 15
CI_LEVEL = 0.95
#: Below this many test groups in a class, the report says what its figures can and cannot show.
MIN_GROUPS_PER_CLASS = 3
#: Classes are imbalanced (balanced accuracy is the headline) when the largest has this many times the
#: maps of the smallest.
IMBALANCE_RATIO = 1.5
_BOOT_CHUNK_ELEMENTS = 4_000_000  # resamples x maps held in memory at once


def classification_report(y_true, proba, class_names, *, n_boot: int = 1000, seed: int = 0,
                          positive_class: str | None = None, groups=None) -> dict:
    """JSON-serialisable report of a K-class prediction (``proba``: N x K, column k = class_names[k]).

    Keys: n, class_names, class_counts, accuracy / balanced_accuracy / macro_f1 as
    {"value", "ci_low", "ci_high"} (95% percentile bootstrap: over acquisition groups within each class
    when ``groups``, the maps' acquisition groups, are given, else over maps; "ci_method" says which),
    headline (balanced_accuracy when the classes are imbalanced, else accuracy), warnings (too few test
    groups per class: what the figures cannot show), per_class
    {precision, recall, f1, support}, confusion_matrix {labels, counts (rows true, columns predicted)},
    roc_auc {macro, per_class, notes}, ece (15 equal-width bins on the top probability), and for two
    classes sensitivity_at_fpr {positive_class, "0.01", "0.001"} (else None). ``n_boot=0`` skips the CIs.

    Parameters
    ----------
    y_true : array of int, shape (N,)
        True class index of every map.
    proba : array of float, shape (N, K)
        Predicted probabilities; column k is ``class_names[k]``.
    class_names : sequence of str, length K
        The classes.
    n_boot : int
        Bootstrap resamples (0: no confidence intervals).
    seed : int
        Seed of the bootstrap.
    positive_class : str, optional
        The class whose sensitivity at low false-positive rates is reported (two classes only).
    groups : array of str, shape (N,), optional
        Every map's acquisition group: the bootstrap resamples whole groups.

    Returns
    -------
    dict
        The report (keys above).
    """
    y_true, proba, names = _check_inputs(y_true, proba, class_names)
    groups = None if groups is None else _check_groups(groups, y_true)
    y_pred = proba.argmax(axis=1)
    boot = _bootstrap(y_true, y_pred, n_boot, seed, _binary_scores(y_true, proba, names, positive_class),
                      groups)
    with warnings.catch_warnings():  # a class predicted but absent from y_true is normal here
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        point = {
            "accuracy": accuracy_score(y_true, y_pred),
            "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
            "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
        }
    report = {
        "n": int(y_true.size),
        "class_names": names,
        "class_counts": dict(zip(names, np.bincount(y_true, minlength=len(names)).tolist(), strict=True)),
        **{key: _estimate(point[key], boot.get(key)) for key in HEADLINE},
        "headline": headline_metric(y_true),
        "ci_method": _ci_method(n_boot, groups),
        "groups_per_class": None if groups is None else _groups_per_class(y_true, groups, names),
        "warnings": [] if groups is None else small_study_warnings(y_true, groups, names),
        "per_class": _per_class(y_true, y_pred, names),
        "confusion_matrix": {"labels": names,
                             "counts": confusion_matrix(y_true, y_pred, labels=range(len(names))).tolist()},
        "roc_auc": roc_auc(y_true, proba, names, positive_class=positive_class),
        "ece": expected_calibration_error(y_true, proba),
        "sensitivity_at_fpr": None,
    }
    if len(names) == 2:
        report["sensitivity_at_fpr"] = _sensitivity_report(y_true, proba, names, positive_class, boot)
    return report


def headline_metric(y_true) -> str:
    """"balanced_accuracy" when the classes present are imbalanced (largest / smallest count >=
    :data:`IMBALANCE_RATIO`), else "accuracy": always answering the majority class scores the majority's
    share in accuracy but 1/K in balanced accuracy.

    Parameters
    ----------
    y_true : array_like (N,) of int
        True class indices.

    Returns
    -------
    str
    """
    counts = np.bincount(np.asarray(y_true, dtype=np.int64))
    counts = counts[counts > 0]
    return "balanced_accuracy" if counts.max() >= IMBALANCE_RATIO * counts.min() else "accuracy"


def small_study_warnings(y_true, groups, class_names) -> list[str]:
    """Plain-words warnings when a class's test maps come from fewer than :data:`MIN_GROUPS_PER_CLASS`
    acquisition groups: what the figures can and cannot show, and what to do.

    Parameters
    ----------
    y_true : array_like (N,) of int
        True class indices of the test maps.
    groups : array_like (N,)
        Their acquisition groups.
    class_names : sequence of str
        The classes.

    Returns
    -------
    list of str
        Empty when every class present has enough groups.
    """
    per_class = _groups_per_class(np.asarray(y_true), np.asarray(groups).astype(str), class_names)
    few = {name: n for name, n in per_class.items() if 0 < n < MIN_GROUPS_PER_CLASS}
    if not few:
        return []
    listed = ", ".join(f"{name} {n}" for name, n in few.items())
    return [f"test maps come from few acquisition groups ({listed}): the figures say how these "
            f"particular fields were classified, not how well a new field would be; maps of one field "
            f"are not independent, so the intervals resample groups and are wide. Use cross-validation "
            f"over groups (--cv K) so every field is tested once, and acquire more fields per class"]


def metrics_from_confusion(cms) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro F1 of each confusion matrix in a (B, K, K) stack.

    Same conventions as scikit-learn: balanced accuracy averages recall over classes present in
    y_true; macro F1 averages over classes present in y_true or y_pred.

    Parameters
    ----------
    cms : array_like (B, K, K) or (K, K)
        Confusion matrices (counts; rows true, columns predicted), e.g. of bootstrap resamples.

    Returns
    -------
    dict of str to ndarray
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``: (B,) each (0-1).
    """
    cms = np.asarray(cms, dtype=float)
    cms = cms[None] if cms.ndim == 2 else cms
    tp = np.diagonal(cms, axis1=1, axis2=2)
    true, pred = cms.sum(axis=2), cms.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(true > 0, tp / true, np.nan)
        f1 = np.where(true + pred > 0, 2 * tp / (true + pred), np.nan)
        return {
            "accuracy": tp.sum(axis=1) / cms.sum(axis=(1, 2)),
            "balanced_accuracy": _nanmean_rows(recall),
            "macro_f1": _nanmean_rows(f1),
        }


def sensitivity_at_fpr(y_pos, score, fpr: float) -> dict:
    """Highest true-positive rate reachable with false-positive rate <= ``fpr`` (step ROC, no interpolation).

    Parameters
    ----------
    y_pos : array_like (N,) of bool
        True for the positive (target) maps.
    score : array_like (N,)
        Their scores (higher: more likely positive).
    fpr : float
        Largest false-positive rate (a fraction).

    Returns
    -------
    dict
        {"fpr", "value", "threshold", "achieved_fpr", "reason"}; value is None (with the reason) when
        there are no positives, or fewer than ceil(1/fpr) negatives (the target FPR is not resolvable).
    """
    y_pos = np.asarray(y_pos, dtype=bool)
    score = np.asarray(score, dtype=float)
    out = {"fpr": fpr, "value": None, "threshold": None, "achieved_fpr": None, "reason": None}
    out["reason"] = _fpr_unresolvable(int(y_pos.sum()), int((~y_pos).sum()), fpr)
    if out["reason"] is None:
        fprs, tprs, thresholds = roc_curve(y_pos, score, drop_intermediate=False)
        i = int(np.searchsorted(fprs, fpr * (1 + 1e-9), side="right") - 1)
        out.update(value=float(tprs[i]), threshold=_finite_or_none(thresholds[i]),
                   achieved_fpr=float(fprs[i]))
    return out


def roc_auc(y_true, proba, class_names, *, positive_class: str | None = None) -> dict:
    """One-vs-rest ROC AUC per class and their macro mean (two classes: the positive class's AUC);
    classes absent from y_true are skipped with a note.

    Parameters
    ----------
    y_true : ndarray (N,) of int
        True class indices.
    proba : ndarray (N, C)
        Class probabilities.
    class_names : sequence of str
        The C classes.
    positive_class : str, optional
        The positive class of a two-class task (default: the first).

    Returns
    -------
    dict
        ``macro`` (float or None), ``per_class`` (name -> AUC or None), ``notes`` (list of str).

    Raises
    ------
    ValueError
        When ``positive_class`` is not a class (two classes).
    """
    per_class, notes = {}, []
    for k, name in enumerate(class_names):
        positives = y_true == k
        if positives.all() or not positives.any():
            per_class[name] = None
            which = "only" if positives.all() else "no"
            notes.append(f"{name}: AUC undefined ({which} maps of this class)")
        else:
            per_class[name] = float(roc_auc_score(positives, proba[:, k]))
    defined = [v for v in per_class.values() if v is not None]
    macro = float(np.mean(defined)) if defined else None
    if len(class_names) == 2:
        macro = per_class[class_names[positive_index(class_names, positive_class)]]
    return {"macro": macro, "per_class": per_class, "notes": notes}


def positive_index(class_names, positive_class: str | None = None) -> int:
    """Index of the positive class in ``class_names`` (default: the first); ValueError if unknown.

    Parameters
    ----------
    class_names : sequence of str
        The classes.
    positive_class : str, optional
        Its name.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        When ``positive_class`` is not one of ``class_names``.
    """
    names = [str(n) for n in class_names]
    positive_class = names[0] if positive_class is None else str(positive_class)
    if positive_class not in names:
        raise ValueError(f"positive_class {positive_class!r} is not one of {names}")
    return names.index(positive_class)


def expected_calibration_error(y_true, proba, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - mean confidence| per equal-width bin of the top
    probability, weighted by the bin's share of maps.

    Parameters
    ----------
    y_true : array_like (N,) of int
        True class indices.
    proba : array_like (N, C)
        Class probabilities.
    n_bins : int
        Equal-width confidence bins on [0, 1].

    Returns
    -------
    float
        ECE (0-1).
    """
    proba = np.asarray(proba, dtype=float)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y_true)).astype(float)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.digitize(confidence, inner_edges, right=True)
    gap = np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins)
    return float(np.abs(gap).sum() / confidence.size)


def format_report(report: Mapping) -> str:
    """Compact printable table: headline numbers with CIs, per-class table, confusion matrix.

    Parameters
    ----------
    report : Mapping
        A classification report (:func:`classification_report`).

    Returns
    -------
    str
        Several lines.
    """
    names = report["class_names"]
    counts = ", ".join(f"{k} {v}" for k, v in report["class_counts"].items())
    lines = [f"n = {report['n']}  ({counts})"]
    headline = report.get("headline")
    for key in HEADLINE:
        mark = "  <- headline" + (" (classes imbalanced)" if key == "balanced_accuracy" else "")
        mark = mark if key == headline else ""
        lines.append(f"{key.replace('_', ' '):<22}{_fmt_estimate(report[key])}{mark}")
    if report.get("ci_method"):
        lines.append(f"{'95% CIs':<22}{report['ci_method']}")
    lines.append(f"{'ROC AUC (macro)':<22}{_fmt(report['roc_auc']['macro'])}")
    lines.append(f"{f'ECE ({ECE_BINS} bins)':<22}{_fmt(report['ece'])}")
    if report.get("ece_calibrated") is not None:
        source = (f"temperature {report['temperature']:.2f}" if report.get("temperature") is not None
                  else "each fold's temperature")
        lines.append(f"{'ECE calibrated':<22}{_fmt(report['ece_calibrated'])}  ({source} of the validation "
                     "groups)")
    sens = report.get("sensitivity_at_fpr")
    if sens:
        for key, entry in sens.items():
            if key != "positive_class":
                label = f"sens. @ FPR {_pct(entry['fpr'])}"
                lines.append(f"{label:<22}{_fmt_estimate(entry)}  (positive: {sens['positive_class']})")
    width = max(len(n) for n in names) + 2
    lines += ["", f"{'class':<{width}}{'precision':>10}{'recall':>8}{'F1':>7}{'AUC':>7}{'support':>9}"]
    for name in names:
        pc = report["per_class"][name]
        lines.append(f"{name:<{width}}{_fmt(pc['precision']):>10}{_fmt(pc['recall']):>8}{_fmt(pc['f1']):>7}"
                     f"{_fmt(report['roc_auc']['per_class'][name]):>7}{pc['support']:>9}")
    cell = max(len(n) for n in names + [str(report["n"])]) + 2
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * width + "".join(f"{n:>{cell}}" for n in names)]
    for name, row in zip(names, report["confusion_matrix"]["counts"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{c:>{cell}}" for c in row))
    fusion = report.get("fusion")
    if fusion:
        lines += ["", f"a late fusion: {fusion['deep_weight']:g} x the deep part + "
                      f"{1 - fusion['deep_weight']:g} x the features model; its parts alone on the same maps"]
        for part, entry in fusion["parts"].items():
            lines.append(f"{part:<28}" + "  ".join(f"{key.replace('_', ' ')} {_fmt_estimate(entry[key])}"
                                                   for key in HEADLINE))
    baselines = report.get("baselines") or {}
    if baselines:
        lines += ["", "baselines on the same test maps (fit on the training maps)"]
        for name, entry in baselines.items():
            lines.append(f"{name:<28}" + "  ".join(f"{key.replace('_', ' ')} {_fmt_estimate(entry[key])}"
                                                   for key in HEADLINE if key in entry))
    lines += [f"warning: {w}" for w in report.get("warnings") or []]
    return "\n".join(lines)


def flatten_report(report: Mapping) -> dict:
    """One row of scalars from a report: headline metrics with CI columns, AUC, ECE, sensitivities, n.

    Parameters
    ----------
    report : Mapping
        A classification report.

    Returns
    -------
    dict
        Column -> scalar (``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high``, ``roc_auc_macro``,
        ``ece``, ``ece_calibrated`` (where the report has it), ``n``, ``n_groups``, ...).
    """
    row = {}
    for key in HEADLINE:
        row.update(_estimate_columns(key, report[key]))
    row.update(roc_auc_macro=report["roc_auc"]["macro"], ece=report["ece"])
    if report.get("ece_calibrated") is not None:
        row["ece_calibrated"] = report["ece_calibrated"]
    for key, entry in (report.get("sensitivity_at_fpr") or {}).items():
        if key != "positive_class":
            row.update(_estimate_columns(f"sensitivity_at_fpr_{key}", entry))
    row["n"] = report["n"]
    if report.get("groups_per_class"):
        row["n_groups"] = sum(report["groups_per_class"].values())
    return row


def comparison_table(rows: Iterable[Mapping]) -> pd.DataFrame:
    """DataFrame of model/task results; each row's "report" (a classification_report) is flattened
    into metric columns, every other key (task, model, init, ...) is kept as an identifying column.

    Parameters
    ----------
    rows : iterable of Mapping
        One per result.

    Returns
    -------
    pandas.DataFrame
    """
    records = []
    for row in rows:
        record = {k: v for k, v in row.items() if k != "report"}
        if "report" in row:
            record.update(flatten_report(row["report"]))
        records.append(record)
    return pd.DataFrame.from_records(records)


def write_table(df: pd.DataFrame, path_stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``df`` as ``<stem>.csv`` (full precision) and ``<stem>.md`` (3 decimals, CIs merged as
    "value [low, high]"); return both paths.

    Parameters
    ----------
    df : pandas.DataFrame
        The table.
    path_stem : str or os.PathLike
        Path without suffix (folders are created).

    Returns
    -------
    tuple of (Path, Path)
        The CSV and the Markdown file.
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    df.to_csv(csv_path, index=False)
    md_path.write_text(markdown_table(df), encoding="utf-8")
    log.info("wrote %s and %s", csv_path, md_path)
    return csv_path, md_path


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub Markdown table (no ``tabulate`` needed); ``X_ci_low``/``X_ci_high`` merge into column X.

    Parameters
    ----------
    df : pandas.DataFrame
        The table.

    Returns
    -------
    str
        The Markdown, one line per row.
    """
    cols = [c for c in df.columns if not str(c).endswith(("_ci_low", "_ci_high"))]
    integral = {c: _is_integral(df[c]) for c in cols}
    body = [[_md_cell(row, c, df.columns, integral[c]) for c in cols] for _, row in df.iterrows()]
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


# --- internals -------------------------------------------------------------------------------------


def _check_inputs(y_true, proba, class_names) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate shapes and values; return int labels, float probabilities and the class names."""
    names = [str(n) for n in class_names]
    y_true, proba = np.asarray(y_true), np.asarray(proba, dtype=float)
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"class_names must hold at least two distinct names, got {names}")
    if proba.ndim != 2 or proba.shape[1] != len(names) or y_true.shape != (proba.shape[0],):
        raise ValueError(f"need y_true (N,) and proba (N, {len(names)}); "
                         f"got {y_true.shape} and {proba.shape}")
    if y_true.size == 0:
        raise ValueError("cannot evaluate zero maps")
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= len(names):
        raise ValueError(f"y_true must hold integer class ids in [0, {len(names)})")
    if not np.isfinite(proba).all():
        raise ValueError("proba contains NaN or infinite values")
    return y_true.astype(np.int64), proba, names


def _binary_scores(y_true, proba, names, positive_class):
    """(is_positive, positive-class score) for two-class tasks; None otherwise."""
    if len(names) != 2:
        return None
    k = positive_index(names, positive_class)
    return y_true == k, proba[:, k]


def _bootstrap(y_true, y_pred, n_boot, seed, binary, groups=None) -> dict[str, np.ndarray]:
    """Metric values over ``n_boot`` resamples (chunked to bound memory): of the maps, or with
    ``groups`` of whole acquisition groups within each class (:func:`_group_weights`)."""
    if n_boot <= 0:
        return {}
    n, k = y_true.size, int(max(y_true.max(), y_pred.max())) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // n)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        if groups is None:
            idx = rng.integers(0, n, size=(size, n))
            weights = _resample_counts(idx, n)
            cms = _batched_confusion(y_true, y_pred, idx, k)
        else:
            weights = _group_weights(rng, size, y_true, groups)
            cms = _weighted_confusion(y_true, y_pred, weights, k)
        values = metrics_from_confusion(cms)
        if binary is not None:
            sens = _batched_sensitivity(*binary, weights, FPR_TARGETS)
            values.update({f"sens_{fpr:g}": v for fpr, v in zip(FPR_TARGETS, sens, strict=True)})
        for key, val in values.items():
            parts.setdefault(key, []).append(val)
    return {key: np.concatenate(val) for key, val in parts.items()}


def _batched_confusion(y_true, y_pred, idx, k) -> np.ndarray:
    """(B, K, K) confusion matrices of the resamples ``idx`` (B, N)."""
    offsets = (np.arange(idx.shape[0]) * k * k)[:, None]
    flat = (y_true * k + y_pred)[idx] + offsets
    return np.bincount(flat.ravel(), minlength=idx.shape[0] * k * k).reshape(-1, k, k)


def _group_weights(rng, size, y_true, groups) -> np.ndarray:
    """(size, N) map weights of a two-stage (hierarchical) bootstrap: each group's class is its most
    frequent class; within each class its groups are drawn with replacement (as many as it has), then
    the maps of every drawn group are drawn with replacement (as many as it has). The first stage carries
    the variation between acquisition groups; the second keeps the interval from collapsing to zero width
    where a class has a single group (whose group-to-group variation no test set can show: the report's
    warnings say so)."""
    codes, g = np.unique(groups, return_inverse=True)
    group_class = np.array([np.bincount(y_true[g == i]).argmax() for i in range(codes.size)])
    drawn = np.zeros((size, codes.size), dtype=np.int64)
    for cls in np.unique(group_class):
        members = np.flatnonzero(group_class == cls)
        draws = members[rng.integers(0, members.size, size=(size, members.size))]
        np.add.at(drawn, (np.arange(size)[:, None], draws), 1)
    weights = np.zeros((size, y_true.size))
    for i in range(codes.size):
        maps = np.flatnonzero(g == i)
        weights[:, maps] = rng.multinomial(drawn[:, i] * maps.size, np.full(maps.size, 1.0 / maps.size))
    return weights


def _weighted_confusion(y_true, y_pred, weights, k) -> np.ndarray:
    """(B, K, K) confusion matrices with per-map ``weights`` (B, N)."""
    onehot = np.zeros((y_true.size, k * k))
    onehot[np.arange(y_true.size), y_true * k + y_pred] = 1.0
    return (weights @ onehot).reshape(-1, k, k)


def _check_groups(groups, y_true) -> np.ndarray:
    """``groups`` as a str array of one group per map."""
    groups = np.asarray(groups).astype(str)
    if groups.shape != y_true.shape:
        raise ValueError(f"need one acquisition group per map: {groups.shape} groups for {y_true.size} maps")
    return groups


def _groups_per_class(y_true, groups, names) -> dict[str, int]:
    """Number of distinct acquisition groups among each class's maps."""
    return {name: int(np.unique(groups[y_true == k]).size) for k, name in enumerate(names)}


def _ci_method(n_boot, groups) -> str | None:
    """How the intervals were made, in words."""
    if n_boot <= 0:
        return None
    if groups is None:
        return f"bootstrap over maps ({n_boot} resamples)"
    n = np.unique(groups).size
    return (f"two-stage bootstrap over {n} acquisition groups (groups within class, then maps within "
            f"group; {n_boot} resamples)")


def _resample_counts(idx, n) -> np.ndarray:
    """(B, N) number of times each map was drawn in each resample."""
    offsets = (np.arange(idx.shape[0]) * n)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=idx.shape[0] * n).reshape(-1, n)


def _batched_sensitivity(y_pos, score, weights, fprs) -> list[np.ndarray]:
    """:func:`sensitivity_at_fpr` at each of ``fprs`` for each row of map weights (B, N);
    NaN where unresolvable."""
    order = np.argsort(-score, kind="stable")
    last_of_tie = np.r_[score[order][1:] != score[order][:-1], True]
    w = weights[:, order]
    tp = np.cumsum(w * y_pos[order], axis=1)[:, last_of_tie]
    fp = np.cumsum(w * ~y_pos[order], axis=1)[:, last_of_tie]
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    out = []
    for fpr in fprs:
        reachable = fp <= fpr * n_neg[:, None] * (1 + 1e-9)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.where(reachable, tp, 0).max(axis=1) / n_pos
        out.append(np.where((n_pos > 0) & (n_neg >= _min_negatives(fpr)), sens, np.nan))
    return out


def _sensitivity_report(y_true, proba, names, positive_class, boot) -> dict:
    """Sensitivity at each target FPR for the positive class, with bootstrap CIs."""
    k = positive_index(names, positive_class)
    out = {"positive_class": names[k]}
    for fpr in FPR_TARGETS:
        entry = sensitivity_at_fpr(y_true == k, proba[:, k], fpr)
        ci = _estimate(entry["value"], boot.get(f"sens_{fpr:g}") if entry["value"] is not None else None)
        out[f"{fpr:g}"] = {**entry, "ci_low": ci["ci_low"], "ci_high": ci["ci_high"]}
    return out


def _min_negatives(fpr) -> int:
    """Negatives needed so that one false positive is a rate <= ``fpr``."""
    return math.ceil(1.0 / fpr - 1e-9)


def _fpr_unresolvable(n_pos, n_neg, fpr) -> str | None:
    """Why sensitivity at ``fpr`` cannot be reported, or None if it can."""
    if n_pos == 0:
        return "no maps of the positive class"
    if n_neg < _min_negatives(fpr):
        return f"needs >= {_min_negatives(fpr)} negative maps to resolve FPR {_pct(fpr)}; have {n_neg}"
    return None


def _estimate(value, samples) -> dict:
    """{"value", "ci_low", "ci_high"} with a percentile CI from bootstrap ``samples`` (None if absent)."""
    value = None if value is None else float(value)
    low = high = None
    if samples is not None and np.isfinite(samples).any():
        tail = 100 * (1 - CI_LEVEL) / 2
        low, high = (float(v) for v in np.nanpercentile(samples, [tail, 100 - tail]))
    return {"value": value, "ci_low": low, "ci_high": high}


def _estimate_columns(name: str, entry: Mapping) -> dict:
    """{name, name_ci_low, name_ci_high} from an estimate entry."""
    return {name: entry["value"], f"{name}_ci_low": entry["ci_low"], f"{name}_ci_high": entry["ci_high"]}


def _per_class(y_true, y_pred, names) -> dict:
    """Precision, recall, F1 and support per class (scikit-learn, zero_division=0)."""
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(len(names)), zero_division=0)
    return {name: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(s[k])}
            for k, name in enumerate(names)}


def _nanmean_rows(a) -> np.ndarray:
    """Row means ignoring NaN (NaN for all-NaN rows, without a warning)."""
    count = np.sum(~np.isnan(a), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(a, axis=1) / count, np.nan)


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _pct(fraction: float) -> str:
    """0.001 -> '0.1%'."""
    return f"{fraction * 100:g}%"


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _fmt_estimate(entry: Mapping) -> str:
    """'0.912 [0.884, 0.938]', or 'n/a (reason)'."""
    if entry.get("value") is None:
        return "n/a" + (f" ({entry['reason']})" if entry.get("reason") else "")
    if entry.get("ci_low") is None:
        return _fmt(entry["value"])
    return f"{_fmt(entry['value'])} [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"


def _md_cell(row, col, columns, integral: bool) -> str:
    """Markdown text of one cell: numbers to 3 decimals with their CI when its columns exist."""
    value = row[col]
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float | np.floating) and not integral:
        entry = {"value": float(value)}
        low, high = row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
        if f"{col}_ci_low" in columns and not (pd.isna(low) or pd.isna(high)):
            entry.update(ci_low=float(low), ci_high=float(high))
        return _fmt_estimate(entry)
    if isinstance(value, float | np.floating):
        return str(int(value))
    return str(value).replace("|", "\\|")


def _is_integral(series: pd.Series) -> bool:
    """True for numeric columns whose values are all whole numbers (counts such as n)."""
    values = pd.to_numeric(series, errors="coerce").dropna()
    return pd.api.types.is_numeric_dtype(series) and bool(np.all(np.mod(values, 1) == 0))


# ------------------------------------------------------------------ a saved model on a dataset


POSITIVE_CLASS = "cancer"   # sensitivity at low FPR is reported for this class in binary tasks


@dataclass
class Evaluation:
    """Predictions of a model on dataset maps and their ``classification_report``.

    Attributes
    ----------
    report : dict
        :func:`classification_report` of the maps (plus ``test_time_augmentation``).
    indices : numpy.ndarray, shape (N,), int
        The dataset rows evaluated.
    y_true : numpy.ndarray, shape (N,), int
        Their task labels.
    proba : numpy.ndarray, shape (N, K), float
        The model's probabilities.
    class_names : list of str
        The task's classes (K).
    parts : dict or None
        A fused model's part probabilities (``p_deep``, ``p_features``; each (N, K)); None otherwise.
    """

    report: dict
    indices: np.ndarray
    y_true: np.ndarray
    proba: np.ndarray
    class_names: list[str]
    parts: dict | None = None


def _positive_class(class_names) -> str | None:
    return POSITIVE_CLASS if POSITIVE_CLASS in class_names and len(class_names) == 2 else None


def evaluate_model(model: SavedModel, dataset, indices=None, *, batch_size: int = 64, n_boot: int = 1000,
                   seed: int = 0, tta: bool | None = None, groups=None) -> Evaluation:
    """Evaluate a saved model on dataset maps.

    Confidence intervals resample the maps' acquisition groups (:func:`classification_report`); too few
    test groups per class are warned about, and so is an encoder used at another geometry than it was
    pretrained at (config ``model_info``). A fused model (config ``fusion``) is reported on its fused
    probabilities, and each part alone on the same maps under ``report["fusion"]["parts"]``
    (``"<backbone> alone"``: the deep part with its test-time augmentation; ``"features alone"``), with the
    same bootstrap.

    Parameters
    ----------
    model : SavedModel
        The model (:func:`opdcells.modelfolder.load_model`).
    dataset : str, os.PathLike or OPDDataset
        The dataset (pixel size, map size and classes must fit the model).
    indices : array of int, optional
        Rows to evaluate (default: every map of the model's task classes).
    batch_size : int
        Maps predicted together.
    n_boot : int
        Bootstrap resamples of the confidence intervals.
    seed : int
        Seed of the bootstrap.
    tta : bool, optional
        Test-time augmentation as in :meth:`SavedModel.predict_proba` (default: the model's own).
    groups : array of str, shape (N_maps,), optional
        Every dataset map's acquisition group (default the dataset's own).

    Returns
    -------
    Evaluation
        The predictions and the report.

    Raises
    ------
    DatasetError, TaskError
        The dataset does not fit the model, or maps outside the task's classes.
    """
    with opened(dataset) as ds:
        model.check_dataset(ds)
        y_all = task_labels(ds, model.task)
        if indices is None:
            indices = np.flatnonzero(y_all >= 0)
        indices = np.asarray(indices, dtype=np.int64)
        outside = indices[y_all[indices] < 0]
        if len(outside):
            raise DatasetError(ds.path, f"{len(outside)} of the maps to evaluate are not of the task's "
                                        "classes")
        groups = (ds.groups if groups is None else groups)[indices]
        y_true = y_all[indices]

        def report_of(proba):
            return classification_report(y_true, proba, model.class_names, n_boot=n_boot, seed=seed,
                                         positive_class=_positive_class(model.class_names), groups=groups)

        if model.fused:   # one prediction of each part: the fused report and each part's own
            parts = model.predict_dataset_parts(ds, indices, batch_size=batch_size, tta=tta)
            proba = model.learner.fuse(**parts)
        else:
            proba = model.predict_dataset(ds, indices, batch_size=batch_size, tta=tta)
        report = report_of(proba)
        report.update(calibrated_ece(y_true, proba, model.config))
        if model.fused:
            report["fusion"] = {
                "deep_weight": model.learner.deep_weight, "rule": model.config["fusion"]["rule"],
                "parts": {f"{model.config['model']} alone": report_of(parts["p_deep"]),
                          "features alone": report_of(parts["p_features"])}}
        for warning in report["warnings"]:
            log.warning("%s: %s", model.name, warning)
        geometry = model.config.get("model_info", {}).get("geometry_warning")
        if geometry:   # its encoder was pretrained at another pixel size or window
            log.warning("%s: %s", model.name, geometry)
            report["warnings"].append(geometry)
        report["test_time_augmentation"] = TTA_DIHEDRAL if model.uses_tta(tta) else None
        report["validation_at_best_epoch"] = validation_at_best_epoch(model)
        return Evaluation(report, indices, y_true, proba, model.class_names, parts if model.fused else None)


def calibrated_ece(y_true, proba, config: Mapping) -> dict:
    """The expected calibration error of ``proba`` after the model's own temperature scaling.

    ``train`` fits a temperature on the validation groups (config.json ``calibration``) that screening and
    the operating points apply; the class probabilities a model predicts, and the report's ``ece``, are
    before it. This says how well that temperature carries over to other maps (e.g. the test groups).

    Parameters
    ----------
    y_true : array of int, shape (N,)
        True class index of every map.
    proba : array of float, shape (N, K)
        The model's (uncalibrated) probabilities of the same maps.
    config : Mapping
        The model folder's config.json.

    Returns
    -------
    dict
        ``{"temperature": T, "ece_calibrated": ECE}``, or ``{}`` for a model without a calibration.
    """
    from .calibration import apply_temperature

    temperature = (config.get("calibration") or {}).get("temperature")
    if temperature is None:
        return {}
    return {"temperature": float(temperature),
            "ece_calibrated": expected_calibration_error(y_true, apply_temperature(proba, temperature))}


def validation_at_best_epoch(model: SavedModel) -> dict | None:
    """The validation accuracy and loss of the epoch whose weights the model kept (early stopping's best),
    from its history.csv and config.json ``training.best_epoch``.

    Parameters
    ----------
    model : SavedModel
        A trained model folder.

    Returns
    -------
    dict or None
        ``epoch`` (1-based; a boosting iteration for ``features``), ``val_accuracy`` and ``val_loss``; None
        when the folder has no history or the run had no validation maps.
    """
    best = (model.config.get("training") or {}).get("best_epoch")
    path = Path(model.folder) / "history.csv"
    if not best or not path.is_file():
        return None
    frame = pd.read_csv(path)
    if "val_accuracy" not in frame or len(frame) < best:
        return None
    row = frame.iloc[int(best) - 1]
    return {"epoch": int(best), "val_accuracy": float(row["val_accuracy"]),
            "val_loss": float(row["val_loss"]) if "val_loss" in frame else None}


def rows_digest(dataset, indices) -> str:
    """SHA-256 identifying the maps at rows ``indices`` (their source file hashes and positions).

    Parameters
    ----------
    dataset : str, os.PathLike or OPDDataset
        The dataset.
    indices : array of int
        The rows.

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    idx = np.asarray(indices, dtype=np.int64)
    with opened(dataset) as ds:
        rows = list(zip(ds.source_sha256[idx].tolist(), ds.source_index[idx].tolist(), strict=True))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def stored_test_indices(model: SavedModel, dataset) -> np.ndarray:
    """Test-split indices of ``model`` into ``dataset``, the dataset it was trained on.

    The same dataset is recognised by its fingerprint, or -- after appends -- by the same maps at the test
    rows (:func:`rows_digest`, logged).

    Parameters
    ----------
    model : SavedModel
        A trained model (its split.json).
    dataset : str, os.PathLike or OPDDataset
        The dataset.

    Returns
    -------
    numpy.ndarray, int
        The test rows.

    Raises
    ------
    DatasetError
        Another dataset than the model's.
    """
    with opened(dataset) as ds:
        split = Split.from_json(model.folder / "split.json")
        if ds.fingerprint == model.config["dataset"]["fingerprint"]:
            return split.test
        in_range = len(split.test) == 0 or split.test.max() < len(ds)
        if in_range and rows_digest(ds, split.test) == model.config["split"].get("test_rows_sha256"):
            log.warning("%s changed since model %s was trained; its test maps are still at the stored rows",
                        ds.path, model.name)
            return split.test
        raise DatasetError(ds.path, f"is not the dataset model {model.name} was trained on "
                                    f"({model.config['dataset']['path']}); evaluate on all its maps (--all)")


class _LazyMaps:
    """Read-on-access sequence of dataset maps (for figures that pick a few of many maps)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i) -> np.ndarray:
        return self.dataset.read(int(self.indices[i]))


def predictions_table(evaluation: Evaluation, dataset) -> pd.DataFrame:
    """One row per evaluated map: dataset index, where it came from (``OPDDataset.origins``: source file
    and index, the cell's number, centroid and bounding box in its field), group, true and predicted
    class, probabilities.

    Parameters
    ----------
    evaluation : Evaluation
        What :func:`evaluate_model` returned.
    dataset : str, os.PathLike or OPDDataset
        The dataset it was evaluated on.

    Returns
    -------
    pandas.DataFrame
        The table (predictions.csv).
    """
    idx, names = evaluation.indices, evaluation.class_names
    with opened(dataset) as ds:
        frame = pd.DataFrame({"dataset_index": idx, **ds.origins(idx), "group": ds.groups[idx],
                              "true": [names[k] for k in evaluation.y_true],
                              "predicted": [names[k] for k in evaluation.proba.argmax(axis=1)]})
    for k, name in enumerate(names):
        frame[f"p_{name}"] = evaluation.proba[:, k]
    return frame


def write_results(evaluation: Evaluation, model: SavedModel, dataset, folder) -> dict[str, Path]:
    """Write metrics.json, predictions.csv and the figures (confusion matrix, ROC, training curves,
    gallery) of an evaluation into ``folder``.

    Parameters
    ----------
    evaluation : Evaluation
        What :func:`evaluate_model` returned.
    model : SavedModel
        The model evaluated (its history.csv gives the training curves).
    dataset : str, os.PathLike or OPDDataset
        The dataset evaluated on.
    folder : str or os.PathLike
        The results folder (created).

    Returns
    -------
    dict of str to pathlib.Path
        The files written, by name.
    """
    from . import plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names, report = evaluation.class_names, evaluation.report
    out = {"metrics": folder / "metrics.json", "predictions": folder / "predictions.csv"}
    write_json(out["metrics"], report)
    predictions_table(evaluation, dataset).to_csv(out["predictions"], index=False)
    title = f"{model.name} ({model.config['task']})"
    out["confusion_matrix"] = plots.confusion_matrix(np.asarray(report["confusion_matrix"]["counts"]), names,
                                                     folder / "confusion_matrix.png", title=title)
    if len(np.unique(evaluation.y_true)) > 1:
        out["roc"] = plots.roc_curves(evaluation.y_true, evaluation.proba, names, folder / "roc.png",
                                      positive_class=_positive_class(names), log_x=len(names) == 2,
                                      title=title)
    history = model.folder / "history.csv"
    if history.is_file():
        frame = pd.read_csv(history).drop(columns="epoch", errors="ignore")
        step = "boosting iteration" if model.config["model"] == "features" else "epoch"
        out["training_curves"] = plots.training_curves(frame, folder / "training_curves.png", title=title,
                                                       step=step)
    with opened(dataset) as ds:
        out["gallery"] = plots.gallery(_LazyMaps(ds, evaluation.indices), evaluation.y_true,
                                       evaluation.proba.argmax(axis=1), names, folder / "gallery.png")
    log.info("wrote %s", ", ".join(str(p) for p in out.values()))
    return out


def baseline_summary(dataset, y_all, split: Split, task: Task, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Headline metrics (with CIs) of the baselines (``opdcells.baselines``) on the split's test maps,
    fit on its training maps: what the model's figures are to be read against.

    Parameters
    ----------
    dataset : OPDDataset
        The open dataset.
    y_all : array of int, shape (N_maps,)
        Task label of every map (-1 outside the task).
    split : Split
        The run's split.
    task : Task
        The task.
    n_boot : int
        Bootstrap resamples.
    seed : int
        Seed of the baselines and the bootstrap.

    Returns
    -------
    dict
        Baseline name -> headline metric -> {"value", "ci_low", "ci_high"}.
    """
    from .baselines import baseline_reports

    reports = baseline_reports(dataset, y_all, split, list(task.classes), n_boot=n_boot, seed=seed,
                               positive_class=_positive_class(list(task.classes)))
    return {name: {key: report[key] for key in HEADLINE} for name, report in reports.items()}
