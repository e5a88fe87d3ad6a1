"""Figures for results/: each function takes data and an output path, saves a PNG and returns the path.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``, rendered by the Agg
canvas), so nothing is registered with pyplot: no GUI backend is needed and no figure is left open.
Class colours are fixed per class name (``class_colour``) and model colours per model name.
"""
from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import stats
from sklearn.metrics import auc, roc_curve

from .evaluate import FPR_TARGETS, positive_index, sensitivity_at_fpr

log = logging.getLogger(__name__)

DPI = 120
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "image.interpolation": "nearest",
}
CLASS_COLOURS = {
    "sw480": "#d62728", "sw620": "#ff7f0e", "cancer": "#c0392b",
    "granulocytes": "#1f77b4", "monocytes": "#2ca02c", "pbmcs": "#9467bd", "blood": "#1f6fb4",
}
MODEL_COLOURS = {
    "mobilenetv2": "#1f77b4", "opd_mobilenetv2": "#17becf", "resnet50": "#ff7f0e", "vgg16": "#2ca02c",
    "dinov2": "#9467bd", "features": "#7f7f7f",
    "majority class": "#c7c7c7", "logistic (dry mass, area)": "#dbdb8d",   # opdcells.baselines
}
_PALETTE = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39")
OPD_CMAP = "viridis"


#: Hatch patterns telling variants of one model apart (frozen probe, fine-tuned, ...).
HATCHES = ("", "///", "...", "xxx", "\\\\", "ooo")
#: Hatching of a comparison bar by the initialisation its model really had (config.json ``init``).
INIT_HATCHES = {"from scratch": "", "OPD-pretrained": "///", "ImageNet": "..."}
#: Opacity of a fused model's deep part drawn alone (not a saved model: a part of one).
PART_ALPHA = 0.45


class BarStyle(NamedTuple):
    """How one bar of a comparison is drawn: its backbone's colour, its initialisation's hatching."""

    colour: str
    hatch: str = ""
    alpha: float = 1.0


def series_colours(names: Sequence[str]) -> dict[str, str]:
    """A colour per distinct name of one figure: the fixed model colour where there is one, otherwise the
    next unused colour of matplotlib's 20-colour table (distinct within the figure, unlike a hash).

    Parameters
    ----------
    names : sequence of str
        The series (models) of the figure.

    Returns
    -------
    dict of str to str
        Name -> hex colour, in the order of first appearance.
    """
    fixed = {n: MODEL_COLOURS[n.lower()] for n in names if n.lower() in MODEL_COLOURS}
    free = (c for c in mpl.colormaps["tab20"].colors if mpl.colors.to_hex(c) not in fixed.values())
    return {n: fixed.get(n) or mpl.colors.to_hex(next(free)) for n in dict.fromkeys(names)}


def class_colour(name: str) -> str:
    """Fixed colour of a class name (case-insensitive); unknown names get a stable palette colour.

    Parameters
    ----------
    name : str
        A class name.

    Returns
    -------
    str
        A hex colour.
    """
    return _named_colour(name, CLASS_COLOURS)


def model_colour(name: str) -> str:
    """Fixed colour of a model name; unknown names get a stable palette colour.

    Parameters
    ----------
    name : str
        A model name.

    Returns
    -------
    str
        A hex colour.
    """
    return _named_colour(name, MODEL_COLOURS)


def training_curves(history, path, title: str = "Training", *, step: str = "epoch") -> Path:
    """Loss and accuracy per ``step`` (an epoch; for the features model a boosting iteration), train
    (solid) vs validation (dashed); Keras history dict or DataFrame.

    Parameters
    ----------
    history : dict or pandas.DataFrame
        Columns ``loss``, ``accuracy`` and their ``val_`` counterparts (any present), one row per step.
    path : str or Path
        The PNG to write (folders are created).
    title : str
        Figure title.
    step : str
        What one row is (the x-axis label).

    Returns
    -------
    Path
        The PNG written.

    Raises
    ------
    ValueError
        When the history has no loss or accuracy column.
    """
    df = pd.DataFrame(history)
    panels = [(key, cols) for key in ("loss", "accuracy")
              if (cols := [c for c in (key, f"val_{key}") if c in df.columns])]
    if not panels:
        raise ValueError(f"history has no loss/accuracy columns: {list(df.columns)}")
    epochs = np.arange(1, len(df) + 1)
    best = int(np.nanargmin(df["val_loss"])) + 1 if "val_loss" in df.columns else None
    with _figure(path, 1, len(panels), figsize=(4.2 * len(panels), 3.2)) as (fig, axes):
        for ax, (key, cols) in zip(axes[0], panels, strict=True):
            for col in cols:
                val = col.startswith("val_")
                ax.plot(epochs, df[col], "--" if val else "-", color="#ff7f0e" if val else "#1f77b4",
                        marker="o", ms=3, label="validation" if val else "train")
            if best is not None:
                ax.axvline(best, color="grey", lw=0.8, ls=":", label=f"lowest val loss ({step} {best})")
            ax.set(xlabel=step, ylabel=key, title=key)
            ax.legend()
        fig.suptitle(title)
    return Path(path)


def confusion_matrix(cm, class_names: Sequence[str], path, title: str = "Confusion matrix",
                     normalise: bool = True) -> Path:
    """Confusion matrix (rows true, columns predicted): colours row-normalised (or counts), counts
    written in.

    Parameters
    ----------
    cm : array_like (C, C) of int
        Counts, rows the true class, columns the predicted one.
    class_names : sequence of str
        The C class names.
    path : str or Path
        The PNG to write (folders are created).
    title : str
        Figure title.
    normalise : bool
        Colour by the fraction of each true class (else by the counts).

    Returns
    -------
    Path
        The PNG written.
    """
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    colour = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0) if normalise else cm
    k = len(class_names)
    size = 1.2 + 0.75 * k
    with _figure(path, figsize=(size + 1.2, size)) as (fig, axes):
        ax = axes[0, 0]
        im = ax.imshow(colour, cmap="Blues", vmin=0, vmax=1 if normalise else max(cm.max(), 1))
        vmax = im.get_clim()[1]
        for i in range(k):
            for j in range(k):
                text = f"{cm[i, j]}\n{colour[i, j]:.0%}" if normalise else f"{cm[i, j]}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if colour[i, j] > 0.6 * vmax else "black")
        ax.set_xticks(range(k), class_names, rotation=30, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="fraction of true class" if normalise else "maps", shrink=0.8)
    return Path(path)


def backbone_of(model: str) -> str:
    """The backbone of a comparison row's model name: ``"opd_resnet50"`` -> ``"resnet50"``,
    ``"vgg16 + features"``, ``"vgg16 (deep part)"`` and any other parenthesised note (``"opd_mobilenetv2
    (v2)"``) -> the backbone; other names (features, baselines) stay as they are.

    Parameters
    ----------
    model : str
        A model name as comparison tables write it.

    Returns
    -------
    str
    """
    name = str(model).split(" + ")[0].split(" (")[0]
    for prefix in ("opd_", "imagenet_"):
        name = name.removeprefix(prefix)
    return name


def initialisation_of(init) -> str | None:
    """``"from scratch"``, ``"OPD-pretrained"`` or ``"ImageNet"`` from config.json's ``init``
    (``random``, ``opd:NAME@DIGEST``, ``imagenet``); None for the features model and the baselines.

    Parameters
    ----------
    init : str or None
        The ``init`` column of a comparison table.

    Returns
    -------
    str or None
    """
    init = str(init).lower()
    if init == "random":
        return "from scratch"
    return "OPD-pretrained" if init.startswith("opd") else "ImageNet" if init.startswith("imagenet") else None


def comparison_styles(table: pd.DataFrame, *, bar: str = "model") -> dict[str, BarStyle]:
    """A :class:`BarStyle` per bar of a comparison table: the colour of its backbone (one colour per
    backbone, whatever the bar order), the hatching of its initialisation (:data:`INIT_HATCHES`), and a
    pale bar for a fused model's deep part alone (``fusion == "deep part alone"``).

    Parameters
    ----------
    table : pandas.DataFrame
        Rows of ``bar`` (model name) with optional ``init`` and ``fusion`` columns
        (:func:`opdcells.study.experiments.compare_models`'s table).
    bar : str
        The column naming each bar.

    Returns
    -------
    dict of str to BarStyle
        Bar name -> style, in the order of first appearance.
    """
    rows = table.drop_duplicates(bar)
    colours = series_colours([backbone_of(name) for name in rows[bar]])
    inits = rows["init"] if "init" in rows else pd.Series(None, index=rows.index)
    fusions = rows["fusion"] if "fusion" in rows else pd.Series(None, index=rows.index)
    return {name: BarStyle(colours[backbone_of(name)], INIT_HATCHES.get(initialisation_of(init), ""),
                           PART_ALPHA if fusion == "deep part alone" else 1.0)
            for name, init, fusion in zip(rows[bar], inits, fusions, strict=True)}


def accuracy_bars(df: pd.DataFrame, path, metric: str = "accuracy", *, bar: str = "model",
                  group: str = "task", title: str | None = None,
                  styles: Mapping[str, BarStyle] | None = None) -> Path:
    """Bars of ``metric`` per model with 95% CI error bars (``<metric>_ci_low/_ci_high`` columns when
    present), grouped by task when the table has a ``task`` column; duplicate rows are averaged.

    Bars named ``"<model> | <variant>"`` take the model's colour and one hatch pattern per variant, so
    every series can be told apart however many there are.

    Parameters
    ----------
    df : pandas.DataFrame
        One row per (group, bar): the metric (0-1) and optionally its CI columns.
    path : str or Path
        The PNG to write (folders are created).
    metric : str
        The column drawn.
    bar : str
        The column naming each bar (the model).
    group : str
        The column grouping bars (the task).
    title : str, optional
        Figure title.
    styles : mapping of str to BarStyle, optional
        Bar name -> style (:func:`comparison_styles`: colour by backbone, hatching by initialisation,
        explained in the legend) instead of the ``"model | variant"`` rule.

    Returns
    -------
    Path
        The PNG written.
    """
    df = df.copy()
    if group not in df.columns:
        df[group] = ""
    cols = [c for c in (metric, f"{metric}_ci_low", f"{metric}_ci_high") if c in df.columns]
    if df.duplicated([group, bar]).any():
        log.warning("accuracy_bars: several rows per (%s, %s); plotting their mean", group, bar)
    table = df.groupby([group, bar], sort=False)[cols].mean()
    groups, bars = list(dict.fromkeys(df[group])), list(dict.fromkeys(df[bar]))
    if styles is None:
        colours = series_colours([name.split(" | ")[0] for name in bars])
        variants = list(dict.fromkeys(name.partition(" | ")[2] for name in bars))
        styles = {name: BarStyle(colours[name.split(" | ")[0]],
                                 HATCHES[variants.index(name.partition(" | ")[2]) % len(HATCHES)])
                  for name in bars}
        hatch_legend = None
    else:
        hatch_legend = {init: hatch for init, hatch in INIT_HATCHES.items() if hatch and hatch in
                        {styles[name].hatch for name in bars}}
    width = 0.8 / len(bars)
    with _figure(path, figsize=(min(12.0, max(4.0, 1.0 + 0.35 * len(groups) * len(bars))), 3.6)) as (
            fig, axes):
        ax = axes[0, 0]
        for j, name in enumerate(bars):
            keys = [(g, name) for g in groups if (g, name) in table.index]
            x = np.array([groups.index(g) for g, _ in keys]) + (j - (len(bars) - 1) / 2) * width
            values = table.loc[keys, metric].to_numpy(float)
            style = styles[name]
            ax.bar(x, values, width * 0.92, yerr=_yerr(table.loc[keys], metric), capsize=2,
                   color=style.colour, hatch=style.hatch, alpha=style.alpha, edgecolor="white", label=name)
            for xi, v in zip(x[np.isfinite(values)], values[np.isfinite(values)], strict=True):
                ax.text(xi, 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=6, rotation=90,
                        color="white")
        ax.set_xticks(range(len(groups)), groups)
        label = metric.replace("_", " ")
        ax.set(ylabel=label, ylim=(0, 1.05), title=title or f"{label} (95% CI)")
        ax.grid(axis="x", visible=False)
        handles, labels = ax.get_legend_handles_labels()
        for init, hatch in (hatch_legend or {}).items():   # what the hatching says (colour: the backbone)
            handles.append(Patch(facecolor="white", edgecolor="0.3", hatch=hatch))
            labels.append(f"hatching: {init}")
        if any(styles[name].alpha < 1 for name in bars) and hatch_legend is not None:
            handles.append(Patch(facecolor="0.3", alpha=PART_ALPHA))
            labels.append("pale: deep part of a fused model alone")
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return Path(path)


def cv_accuracy(summary: pd.DataFrame, path, *, goals=(0.85, 0.93), title: str | None = None) -> Path:
    """Pooled cross-validated accuracy per model with its 95% CI, each fold's accuracy as a point beside
    it, and the goals as horizontal lines (colour: the backbone, :func:`backbone_of`; diamonds: an
    OPD-pretrained encoder; open: a fused model's deep part alone, the fused model named ``+ features``).

    Parameters
    ----------
    summary : pandas.DataFrame
        :func:`opdcells.crossval.cv_summary`'s rows: ``model``, ``accuracy`` (0-1), optional
        ``accuracy_ci_low`` / ``accuracy_ci_high``, ``fold_accuracy`` (list of 0-1 per fold).
    path : str or Path
        The PNG to write.
    goals : sequence of float
        Accuracies drawn as dashed lines.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    models = summary["model"].tolist()
    colours = series_colours([backbone_of(m) for m in models])
    with _figure(path, figsize=(max(4.0, 1.2 + 0.75 * len(models)), 3.6)) as (fig, axes):
        ax = axes[0, 0]
        for x, (_, row) in enumerate(summary.iterrows()):
            colour, name = colours[backbone_of(row["model"])], str(row["model"])
            err = _yerr(summary.iloc[[x]], "accuracy")
            ax.errorbar(x, row["accuracy"], yerr=err, fmt="D" if name.startswith("opd_") else "s", ms=7,
                        color=colour, mfc="white" if name.endswith("(deep part)") else colour, capsize=4,
                        label="pooled over every map (95% CI)" if x == 0 else None)
            folds = np.asarray(row["fold_accuracy"], float)
            ax.scatter(x + 0.22 + np.linspace(-0.05, 0.05, folds.size), folds, s=14, color=colour, alpha=0.6,
                       lw=0, label="one fold (its test sessions)" if x == 0 else None)
            ax.text(x - 0.12, row["accuracy"], f"{row['accuracy']:.3f}", ha="right", va="center", fontsize=7)
        for goal in goals:
            ax.axhline(goal, color="0.4", lw=0.9, ls="--")
            ax.text(len(models) - 0.5, goal, f" goal {goal:g}", va="center", fontsize=7, color="0.3")
        fused = {m.removesuffix(" (deep part)") for m in models if m.endswith(" (deep part)")}
        ax.set_xticks(range(len(models)), [f"{m} + features" if m in fused else m for m in models],
                      rotation=30, ha="right")
        low = summary.get("accuracy_ci_low", summary["accuracy"])
        lows = [min([*np.asarray(f, float), lo]) for f, lo in zip(summary["fold_accuracy"], low, strict=True)]
        ax.set(ylabel="accuracy", xlim=(-0.5, len(models) - 0.5),
               ylim=(max(0.0, min([*lows, *goals]) - 0.05), 1.0),
               title=title or "group cross-validation: accuracy on unseen sessions")
        ax.grid(axis="x", visible=False)
        ax.legend(loc="lower left", frameon=False, fontsize=7)
    return Path(path)


def roc_curves(y_true, proba, class_names: Sequence[str], path, *, positive_class: str | None = None,
               log_x: bool = False, title: str = "ROC") -> Path:
    """One-vs-rest ROC curves with AUC in the legend; for two classes one curve for the positive class
    (default: class_names[0]) with the operating points at FPR 1% and 0.1% marked.

    Parameters
    ----------
    y_true : array_like (N,) of int
        True class indices.
    proba : array_like (N, C)
        Predicted class probabilities.
    class_names : sequence of str
        The C class names.
    path : str or Path
        The PNG to write (folders are created).
    positive_class : str, optional
        The positive class of a two-class task.
    log_x : bool
        Logarithmic false-positive-rate axis (shows the low-FPR end).
    title : str
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    y_true, proba = np.asarray(y_true), np.asarray(proba, dtype=float)
    names = list(class_names)
    if len(names) == 2:
        shown = [positive_index(names, positive_class)]
    else:
        shown = [k for k in range(len(names)) if 0 < np.sum(y_true == k) < y_true.size]
    with _figure(path, figsize=(4.6, 4.0)) as (fig, axes):
        ax = axes[0, 0]
        min_fpr = 1.0
        for k in shown:
            fpr, tpr, _ = roc_curve(y_true == k, proba[:, k])
            min_fpr = min(min_fpr, 1.0 / max(1, np.sum(y_true != k)))
            ax.plot(fpr, tpr, color=class_colour(names[k]), label=f"{names[k]} (AUC {auc(fpr, tpr):.3f})")
        if len(names) == 2:
            _mark_fpr_points(ax, y_true == shown[0], proba[:, shown[0]])
        if log_x:
            ax.set_xscale("log")
            ax.set_xlim(min_fpr / 2, 1.0)
        else:
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
        ax.set(xlabel="false-positive rate" + (" (log)" if log_x else ""), ylabel="true-positive rate",
               ylim=(0, 1.02), title=title)
        ax.legend(loc="lower right")
    return Path(path)


def gallery(maps, y_true, y_pred, class_names: Sequence[str], path, per_class: int = 4, *,
            seed: int = 0, title: str = "Correct (left) and misclassified (right) maps") -> Path:
    """OPD maps in nm, one row per class: up to ``per_class`` correct then ``per_class`` wrong examples,
    titled true->pred (green right, red wrong), with one shared colour bar.

    Parameters
    ----------
    maps : array_like (N, S, S)
        OPD maps (nm).
    y_true, y_pred : array_like (N,) of int
        True and predicted class indices.
    class_names : sequence of str
        The class names.
    path : str or Path
        The PNG to write (folders are created).
    per_class : int
        Correct and wrong examples per class (each).
    seed : int
        Random seed of the choice.
    title : str
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    images, titles, colours = [], [], []
    for k in range(len(class_names)):
        for correct in (True, False):
            pick = np.flatnonzero((y_true == k) & ((y_pred == k) == correct))
            pick = np.sort(rng.permutation(pick)[:per_class])
            for slot in range(per_class):
                i = pick[slot] if slot < pick.size else None
                images.append(None if i is None else np.squeeze(np.asarray(maps[int(i)], dtype=float)))
                titles.append("" if i is None else f"{class_names[k]}→{class_names[y_pred[i]]}")
                colours.append("#2ca02c" if correct else "#d62728")
    return image_grid(images, titles, path, OPD_CMAP, ncols=2 * per_class, title=title,
                      title_colours=colours)


def image_grid(images: Sequence, titles: Sequence[str], path, cmap: str = OPD_CMAP, *,
               ncols: int | None = None, vmin: float | None = None, vmax: float | None = None,
               colorbar_label: str = "OPD (nm)", title: str | None = None,
               title_colours: Sequence[str] | None = None, overlays: Sequence | None = None,
               overlay_cmap: str = "jet", overlay_alpha: float = 0.45) -> Path:
    """Grid of 2-D images sharing one colour scale and colour bar; ``None`` entries leave a blank cell.

    With ``overlays`` (one heatmap per image, any size, rescaled to [0, 1] each) the images are drawn
    in ``cmap`` and the heatmaps on top, and the colour bar shows the heatmap scale.

    Parameters
    ----------
    images : sequence of (H, W) array_like or None
        The images (OPD maps in nm by default).
    titles : sequence of str
        One title per image.
    path : str or Path
        The PNG to write (folders are created).
    cmap : str
        Matplotlib colour map of the images.
    ncols : int, optional
        Columns of the grid (default: up to 6).
    vmin, vmax : float, optional
        Colour limits (default: the images' range, :func:`colour_limits`).
    colorbar_label : str
        Label of the colour bar (its unit).
    title : str, optional
        Figure title.
    title_colours : sequence of str, optional
        Colour of each image's title.
    overlays : sequence of array_like, optional
        One heatmap per image.
    overlay_cmap : str
        Colour map of the heatmaps.
    overlay_alpha : float
        Opacity of the heatmaps (0-1).

    Returns
    -------
    Path
        The PNG written.

    Raises
    ------
    ValueError
        When every entry is None.
    """
    n = len(images)
    ncols = ncols or min(n, 6)
    nrows = math.ceil(n / ncols)
    shown = [np.asarray(im, dtype=float) for im in images if im is not None]
    if not shown:
        raise ValueError("image_grid: no images to show")
    limits = colour_limits(shown, vmin, vmax)
    vmin, vmax = limits.vmin, limits.vmax
    with _figure(path, nrows, ncols, figsize=(1.5 * ncols + 1.0, 1.55 * nrows + 0.4)) as (fig, axes):
        mappable = None
        for i, ax in enumerate(axes.ravel()):
            ax.set_axis_off()
            if i >= n or images[i] is None:
                continue
            image = np.asarray(images[i], dtype=float)
            mappable = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
            if overlays is not None:
                h, w = image.shape
                mappable = ax.imshow(_unit_range(overlays[i]), cmap=overlay_cmap, alpha=overlay_alpha,
                                     vmin=0, vmax=1, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                                     interpolation="bilinear")
            ax.set_title(titles[i], fontsize=7, color=title_colours[i] if title_colours else "black")
        label = "relative importance" if overlays is not None else colorbar_label + limits.note
        fig.colorbar(mappable, ax=axes, shrink=0.8, label=label,
                     extend="neither" if overlays is not None else limits.extend)
        if title:
            fig.suptitle(title)
    return Path(path)


class ColourLimits(NamedTuple):
    """Colour scale of a figure: limits, the colour bar's ``extend`` and a note when values are clipped."""

    vmin: float
    vmax: float
    extend: str
    note: str


def colour_limits(images: Sequence, vmin: float | None = None, vmax: float | None = None) -> ColourLimits:
    """Colour limits that show the images' whole range unless the caller fixes them.

    Defaults: the minimum and maximum of all finite values (so a 700 nm SW480 cell is not drawn at the
    colour of a 460 nm one). Given limits that cut off data are kept, and the colour bar is extended and
    labelled with the clipped range (" (clipped; data -12 to 700)").

    Parameters
    ----------
    images : sequence of array_like
        The images (any shapes; OPD in nm for maps).
    vmin, vmax : float, optional
        Limits fixed by the caller, in the images' unit.

    Returns
    -------
    ColourLimits
    """
    values = np.concatenate([np.asarray(im, dtype=float).ravel() for im in images])
    values = values[np.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    vmin = low if vmin is None else float(vmin)
    vmax = high if vmax is None else float(vmax)
    if vmax <= vmin:
        vmax = vmin + 1.0
    cut_low, cut_high = low < vmin, high > vmax
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[
        (cut_low, cut_high)]
    note = f" (clipped; data {low:.4g} to {high:.4g})" if cut_low or cut_high else ""
    return ColourLimits(vmin, vmax, extend, note)


def overlay_grid(maps: Sequence, heatmaps: Sequence, titles: Sequence[str], path, *,
                 ncols: int | None = None, title: str | None = None) -> Path:
    """OPD maps in grey with attention / Grad-CAM heatmaps on top (see :func:`image_grid`).

    Parameters
    ----------
    maps : sequence of array_like (S, S)
        OPD maps (nm; a trailing channel axis is squeezed).
    heatmaps : sequence of array_like
        One heatmap per map (any size; rescaled to [0, 1] each).
    titles : sequence of str
        One title per map.
    path : str or Path
        The PNG to write (folders are created).
    ncols : int, optional
        Columns of the grid.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written.

    Raises
    ------
    ValueError
        When the numbers of maps and heatmaps differ.
    """
    if len(maps) != len(heatmaps):
        raise ValueError(f"overlay_grid: {len(maps)} maps but {len(heatmaps)} heatmaps")
    maps = [np.squeeze(np.asarray(m, dtype=float)) for m in maps]
    return image_grid(maps, titles, path, "gray", ncols=ncols, title=title, overlays=heatmaps)


def label_efficiency(df: pd.DataFrame, path, metric: str = "accuracy", *, title: str | None = None) -> Path:
    """``metric`` vs labelled fraction (log x) per model: seeds as dots, mean line and 95% band over seeds
    and the test sample (:func:`mean_band`); one panel per task. Curves named ``"<model> (<curve>)"``
    share the model's colour; frozen-probe curves are dashed.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns model, fraction (0-1], ``metric`` (0-1), optional seed and task.
    path : str or Path
        The PNG to write (folders are created).
    metric : str
        The column drawn.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    df = df.copy()
    if "task" not in df.columns:
        df["task"] = ""
    tasks = list(dict.fromkeys(df["task"]))
    with _figure(path, 1, len(tasks), figsize=(4.2 * len(tasks) + 1.2, 3.4), sharey=True) as (fig, axes):
        for ax, task in zip(axes[0], tasks, strict=True):
            sub = df[df["task"] == task]
            for model, rows in sub.groupby("model", sort=False):
                colour = model_colour(model.split(" (")[0])   # "<model> (<curve>)": one colour per model
                style = "--o" if "frozen" in model else "-o"
                ax.scatter(rows["fraction"], rows[metric], s=10, color=colour, alpha=0.4, lw=0)
                mean, low, high = mean_band(rows, "fraction", metric)
                ax.plot(mean.index, mean, style, ms=3, color=colour, label=model)
                ax.fill_between(mean.index, low, high, color=colour, alpha=0.2, lw=0)
            ax.set_xscale("log")
            ticks = sorted(sub["fraction"].unique())   # the fractions measured, as percentages
            ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
            ax.minorticks_off()
            ax.set(xlabel="labelled fraction of training maps", title=task or None)
        axes[0, 0].set_ylabel(metric.replace("_", " "))
        handles = {}   # every curve of every panel (some curves exist for some tasks only)
        for ax in axes[0]:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        axes[0, -1].legend(handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0),
                           frameon=False)
        fig.suptitle(title or "Label efficiency (mean; 95% band over seeds and test sample)")
    return Path(path)


def embedding_scatter(emb2d, labels, class_names: Sequence[str], path, extra=None, *,
                      title: str = "Embedding", axis: str = "dimension") -> Path:
    """2-D embedding coloured by class; ``extra`` = [(points (M, 2), name, marker), ...] drawn on top;
    ``axis`` names the projection on the axes ("PCA" gives "PCA 1", "PCA 2").

    Parameters
    ----------
    emb2d : array_like (N, 2)
        The projected embeddings.
    labels : array_like (N,) of int
        Class indices.
    class_names : sequence of str
        The class names.
    path : str or Path
        The PNG to write (folders are created).
    extra : sequence of tuple, optional
        ``(points (M, 2), name, marker)`` drawn on top (e.g. real cells).
    title : str
        Figure title.
    axis : str
        Name of the projection.

    Returns
    -------
    Path
        The PNG written.
    """
    emb2d, labels = np.asarray(emb2d, dtype=float), np.asarray(labels)
    with _figure(path, figsize=(5.4, 4.2)) as (fig, axes):
        ax = axes[0, 0]
        for k, name in enumerate(class_names):
            pts = emb2d[labels == k]
            ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.6, lw=0, color=class_colour(name),
                       label=f"{name} ({len(pts)})")
        for i, (points, name, marker) in enumerate(extra or []):
            points = np.asarray(points, dtype=float).reshape(-1, 2)
            ax.scatter(points[:, 0], points[:, 1], s=36, marker=marker, color=("black", "#555555")[i % 2],
                       lw=1.0, label=f"{name} ({len(points)})")
        ax.set(xlabel=f"{axis} 1", ylabel=f"{axis} 2", title=title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, markerscale=1.5)
    return Path(path)


# --- internals -------------------------------------------------------------------------------------


def feature_histograms(frame: pd.DataFrame, columns: Sequence[str], by: str, path, *, bins: int = 40,
                       title: str | None = None) -> Path:
    """One panel per column of ``frame``: overlaid per-class histograms (``by`` names the class column).

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per map.
    columns : sequence of str
        The features drawn (their names carry their units, e.g. "dry mass (pg)").
    by : str
        The class column.
    path : str or Path
        The PNG to write (folders are created).
    bins : int
        Histogram bins (shared by the classes of a panel).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    classes = list(dict.fromkeys(frame[by]))
    with _figure(path, 1, len(columns), figsize=(4.2 * len(columns), 3.2)) as (fig, axes):
        for ax, column in zip(axes[0], columns, strict=True):
            edges = np.histogram_bin_edges(frame[column].dropna(), bins=bins)
            for name in classes:
                ax.hist(frame.loc[frame[by] == name, column].dropna(), bins=edges, histtype="step", lw=1.4,
                        color=class_colour(name), label=str(name))
            ax.set(xlabel=column, ylabel="maps")
        axes[0, 0].legend()
        if title:
            fig.suptitle(title)
    return Path(path)


def reliability_diagram(record: dict, path, title: str = "Calibration on the validation groups") -> Path:
    """Reliability diagram before and after temperature scaling (``calibration.calibrate``'s record).

    Bars: accuracy of the maps in each confidence bin; the diagonal is perfect calibration. The legend
    gives the expected calibration error (ECE) and the temperature.

    Parameters
    ----------
    record : dict
        The calibration record (``reliability`` curves ``before`` and ``after``, ECE, temperature).
    path : str or Path
        The PNG to write (folders are created).
    title : str
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    curves = record["reliability"]
    with _figure(path, 1, 2, figsize=(8, 3.6), sharey=True) as (fig, axes):
        for ax, key in zip(axes[0], ("before", "after"), strict=True):
            curve = curves[key]
            n_bins = len(curve["count"])
            centres = (np.arange(n_bins) + 0.5) / n_bins
            acc = np.array([np.nan if a is None else a for a in curve["accuracy"]], float)
            ax.bar(centres, np.nan_to_num(acc), width=1 / n_bins, edgecolor="white", color="#1f77b4",
                   label=f"ECE {curve['ece']:.3f}")
            ax.plot([0, 1], [0, 1], color="0.3", ls="--", lw=1, label="perfect calibration")
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)",
                   title=("uncalibrated" if key == "before" else f"temperature {record['temperature']:.2f}"))
            ax.legend(loc="upper left")
        axes[0, 0].set_ylabel("accuracy in the bin")
        fig.suptitle(f"{title} ({record['n_maps']} maps)")
    return Path(path)


@contextmanager
def _figure(path, nrows: int = 1, ncols: int = 1, *, figsize,
            **subplot_kw) -> Iterator[tuple[Figure, np.ndarray]]:
    """A styled Figure with a 2-D array of axes; saved as PNG to ``path`` on exit."""
    path = Path(path)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=figsize, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
        yield fig, axes
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    log.info("wrote %s", path)


def _named_colour(name: str, table: Mapping[str, str]) -> str:
    key = str(name).lower()
    return table.get(key) or _PALETTE[zlib.crc32(key.encode()) % len(_PALETTE)]


def _yerr(rows: pd.DataFrame, metric: str):
    """Asymmetric error bars (2, n) from CI columns, or None when they are absent."""
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if low not in rows.columns or high not in rows.columns:
        return None
    value = rows[metric].to_numpy(float)
    err = np.vstack([value - rows[low].to_numpy(float), rows[high].to_numpy(float) - value])
    return np.clip(np.nan_to_num(err), 0, None)


def _mark_fpr_points(ax, y_pos, score) -> None:
    """Mark the operating points at the target FPRs (skipped where not resolvable)."""
    for fpr, marker in zip(FPR_TARGETS, ("o", "s"), strict=False):
        point = sensitivity_at_fpr(y_pos, score, fpr)
        if point["value"] is None:
            log.info("ROC: FPR %g not marked: %s", fpr, point["reason"])
            ax.plot([], [], " ", label=f"FPR {fpr * 100:g}%: n/a (only {np.sum(~y_pos)} negatives)")
            continue
        ax.plot(fpr, point["value"], marker, color="black", mfc="none",  # on the step curve
                label=f"TPR {point['value']:.2f} at FPR {fpr * 100:g}%")


def mean_band(rows: pd.DataFrame, x: str, y: str) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Mean of ``y`` per ``x`` and its 95% band, clipped to [0, 1] (the label-efficiency figure and table).

    Two sources of variation: the spread over seeds (t interval of the mean) and the test sample (each
    run's bootstrap interval, ``<y>_ci_low/_ci_high``, when present, else the binomial interval of its
    accuracy on ``n_test`` maps: their mean half-width). They add in quadrature, so a point where every
    seed gives the same number (e.g. all labels used) still shows the uncertainty of the test set.

    Parameters
    ----------
    rows : pandas.DataFrame
        One row per run.
    x : str
        The column grouped by (the labelled fraction).
    y : str
        The metric column (0-1).

    Returns
    -------
    tuple of pandas.Series
        (mean, low, high), indexed by ``x``.
    """
    grouped = rows.groupby(x)[y]
    mean, sem, n = grouped.mean(), grouped.sem().fillna(0.0), grouped.count()
    half = sem * stats.t.ppf(0.975, np.maximum(n - 1, 1))
    low, high = f"{y}_ci_low", f"{y}_ci_high"
    if low in rows.columns and high in rows.columns:
        sample = (rows[high] - rows[low]) / 2
    elif "n_test" in rows.columns:   # binomial half-width of each run's accuracy on its n_test maps
        p = rows[y].clip(0.0, 1.0)
        sample = 1.96 * np.sqrt(p * (1 - p) / rows["n_test"].clip(lower=1))
    else:
        sample = None
    if sample is not None:
        sample = sample.groupby(rows[x]).mean().reindex(mean.index).fillna(0.0)
        half = np.sqrt(half ** 2 + sample ** 2)
    return mean, (mean - half).clip(0.0, 1.0), (mean + half).clip(0.0, 1.0)


def _unit_range(heatmap) -> np.ndarray:
    """Heatmap rescaled to [0, 1] (constant maps become 0)."""
    h = np.squeeze(np.asarray(heatmap, dtype=float))
    span = np.nanmax(h) - np.nanmin(h)
    return (h - np.nanmin(h)) / span if span > 0 else np.zeros_like(h)
