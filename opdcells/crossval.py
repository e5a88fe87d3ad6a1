"""Group k-fold cross-validation: every acquisition group is left out once, so every map gets exactly one
test prediction from a model that never saw its group.

With few acquisition groups (three fields per class) a single held-out split tests one or two fields and
says little; leaving groups out in turn uses every field as test data once. Folds come from
scikit-learn's ``StratifiedGroupKFold`` (seeded). Each fold trains a model folder with
:func:`opdcells.train.train` on the fold's own split; the baselines (``opdcells.baselines``) are fit on
the same training maps. The pooled out-of-fold predictions get one report per model (intervals from the
two-stage bootstrap over groups), beside the per-fold figures.

Written to ``out``: ``fold_<i>/`` model folders, ``cv_table.csv/.md`` (pooled, model and baselines),
``cv_folds.csv/.md`` (per fold), ``cv_predictions.csv`` (one row per map), ``cv_probabilities.npz``
(every map's out-of-fold class probabilities per model, uncalibrated like each fold's
``validation_scores.npz``; the pooled table's ``ece_calibrated`` is the model's expected calibration
error after each fold's own temperature), ``cv_folds.png`` (per-fold balanced accuracy) and
``cv_confusion_<model>.png`` (pooled confusion matrices). A fused model (``fusion: features``) also
gets a row for its deep part alone.

Each fold validates on whole groups of its own training groups, the fraction ``train`` would hold out
(``TrainConfig.val_size`` of all maps): early stopping, the fusion weight, the calibration and the
out-of-distribution threshold of a fold never see its test groups, and the fold runs the same recipe as
``train`` without ``--cv``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from . import plots
from .baselines import baseline_proba
from .calibration import apply_temperature
from .errors import ModelError
from .evaluate import classification_report, comparison_table, expected_calibration_error, write_table
from .splits import Split, group_split
from .tasks import Task, resolve_task

log = logging.getLogger(__name__)

#: Every map's out-of-fold probabilities: ``dataset_index``, ``fold``, ``class_names``, ``proba/<model>``.
PROBABILITIES_FILE = "cv_probabilities.npz"

__all__ = ["CrossValidation", "group_folds", "fold_splits", "cross_validate", "cross_validate_models",
           "cv_summary", "plot_cv_accuracy", "ensemble_check"]


@dataclass
class CrossValidation:
    """What :func:`cross_validate` made.

    Attributes
    ----------
    task : Task
        The task (its classes).
    table : pandas.DataFrame
        Pooled out-of-fold report per model and baseline (one row each).
    folds : pandas.DataFrame
        One row per fold and model.
    predictions : pandas.DataFrame
        One row per map (fold, group, true class, predicted class per model).
    reports : dict
        Model name -> pooled ``classification_report``.
    files : dict
        Name -> Path of the written tables and figures.
    """

    task: Task
    table: pd.DataFrame
    folds: pd.DataFrame
    predictions: pd.DataFrame
    reports: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def group_folds(y, groups, k: int, *, seed: int = 0) -> list[np.ndarray]:
    """Test indices of ``k`` folds of whole acquisition groups, stratified by class (every map once).

    Warns when a class has fewer groups than folds (some folds then test no map of it).

    Parameters
    ----------
    y : array_like (N,) of int
        Class of each map.
    groups : array_like (N,)
        Acquisition group of each map.
    k : int
        Number of folds.
    seed : int
        Random seed of the assignment of groups to folds.

    Returns
    -------
    list of ndarray
        ``k`` arrays of map indices.

    Raises
    ------
    ValueError
        (One line) when ``k`` is below 2 or above the number of groups.
    """
    y, groups = np.asarray(y), np.asarray(groups).astype(str)
    n_groups = np.unique(groups).size
    if k < 2 or k > n_groups:
        raise ValueError(f"--cv {k}: group k-fold needs 2 <= K <= the number of acquisition groups "
                         f"({n_groups}); choose K <= {n_groups}")
    fewest = min(np.unique(groups[y == c]).size for c in np.unique(y))
    if fewest < k:
        log.warning("a class has only %d acquisition groups for %d folds: some folds test none of its maps",
                    fewest, k)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(y.size), y, groups)
        return [np.sort(test) for _, test in folds]


def fold_splits(y, groups, k: int, *, seed: int = 0, val_size: float = 0.0) -> list[Split]:
    """One :class:`Split` per fold (indices into ``y``): the fold's groups are the test part; with
    ``val_size`` > 0 whole training groups holding about that fraction of the training maps validate.

    Parameters
    ----------
    y : array_like (N,) of int
        Class of each map.
    groups : array_like (N,)
        Acquisition group of each map.
    k : int
        Number of folds.
    seed : int
        Random seed.
    val_size : float
        Fraction of the training maps held out for validation (0: none).

    Returns
    -------
    list of Split

    Raises
    ------
    ValueError
        When ``k`` is below 2 or above the number of groups.
    """
    y, groups = np.asarray(y), np.asarray(groups).astype(str)
    splits = []
    for i, test in enumerate(group_folds(y, groups, k, seed=seed)):
        train = np.setdiff1d(np.arange(y.size), test)
        val = np.array([], dtype=np.int64)
        if val_size > 0 and np.unique(groups[train]).size >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                inner = group_split(y[train], groups[train], test_size=val_size, val_size=0.0, seed=seed + i)
            val, train = train[inner.test], train[inner.train]
        parts = {"train": train, "val": val, "test": test}
        splits.append(Split(**parts, seed=seed,
                            groups={name: sorted(set(groups[v].tolist())) for name, v in parts.items()}))
    return splits


def cross_validate(data, model: str = "features", task=None, k: int = 5, *, seed: int = 0,
                   val_size: float | None = None, out=None, n_boot: int = 1000,
                   **train_kw) -> CrossValidation:
    """Group k-fold cross-validation of ``model`` on ``task``, beside the baselines.

    Parameters
    ----------
    data : path or OPDDataset
        The dataset.
    model : str
        An architecture of ``opdcells.models`` or ``"features"``.
    task : str, Task or None
        As :func:`opdcells.tasks.resolve_task` reads it.
    k : int
        Number of folds (at most the number of acquisition groups).
    seed : int
        Seed of the folds and of training.
    val_size : float, optional
        Fraction of all maps, carved as whole groups from each fold's training groups, that validates
        (early stopping, fusion weight, calibration), as ``train`` reads ``--val-size``; 0: none. Default:
        the training config's (``config.val_size`` if ``config`` is given, else ``TrainConfig``'s).
    out : path, optional
        Folder of the fold models, tables and figures (default ``saved_models/cv_<model>_<task>``).
    n_boot : int
        Bootstrap resamples of the pooled intervals (per-fold reports use fewer).
    **train_kw
        Passed to :func:`opdcells.train.train` (epochs, profile, weights, ...).

    Returns
    -------
    CrossValidation
    """
    from .config import TrainConfig
    from .files import opened
    from .modelfolder import saved_models_root
    from .tasks import task_labels
    from .train import train

    with opened(data) as ds:
        task = resolve_task(task, ds.class_names, ds.labels)
        names = list(task.classes)
        root = saved_models_root(train_kw.get("saved_models"))
        out = Path(out) if out is not None else root / f"cv_{model}_{task.name}"
        y_all = task_labels(ds, task)
        idx = np.flatnonzero(y_all >= 0)
        groups = np.asarray(ds.groups).astype(str)
        if val_size is None:
            config = train_kw.get("config")
            val_size = config.val_size if config is not None else TrainConfig.__dataclass_fields__[
                "val_size"].default
        folds = fold_splits(y_all[idx], groups[idx], k, seed=seed, val_size=_fold_val_fraction(val_size, k))
        proba = {name: np.zeros((idx.size, len(names))) for name in (model, *_baseline_names())}
        fold_of = np.zeros(idx.size, dtype=np.int64)
        calibrated = np.zeros((idx.size, len(names)))   # each fold's test maps at its own temperature
        temperatures = []
        fold_rows = []
        for i, part in enumerate(folds, start=1):
            split = Split(idx[part.train], idx[part.val], idx[part.test], seed=seed, groups=part.groups)
            log.info("fold %d/%d: test groups %s", i, k, ", ".join(part.groups["test"]))
            with _without_few_groups_warnings():   # said once below, for the pooled predictions
                result = train(ds, model, task, out / f"fold_{i}", split=split, seed=seed,
                               n_boot=min(n_boot, 200), **train_kw)
            fold_proba = {model: result.evaluation.proba, **_deep_part(model, result.evaluation),
                          **baseline_proba(ds, y_all, split.train, split.test, len(names), seed=seed)}
            for name, p in fold_proba.items():
                proba.setdefault(name, np.zeros((idx.size, len(names))))
                proba[name][part.test] = p
                report = classification_report(y_all[split.test], p, names, n_boot=0)
                fold_rows.append({"fold": i, "model": name, "test_groups": ", ".join(part.groups["test"]),
                                  "report": report})
            fold_of[part.test] = i
            temperatures.append(result.evaluation.report.get("temperature"))
            if temperatures[-1] is not None:
                calibrated[part.test] = apply_temperature(result.evaluation.proba, temperatures[-1])
        reports = {name: classification_report(y_all[idx], p, names, n_boot=n_boot, seed=seed,
                                               groups=groups[idx]) for name, p in proba.items()}
        if None not in temperatures:   # every fold calibrated: how its temperature carried over
            reports[model]["ece_calibrated"] = expected_calibration_error(y_all[idx], calibrated)
        for warning in reports[model]["warnings"]:
            log.warning("cross-validation: %s", warning)
        predictions = pd.DataFrame({"dataset_index": idx, "fold": fold_of, "group": groups[idx],
                                    "source_file": np.asarray(ds.source_file)[idx],
                                    "true": [names[c] for c in y_all[idx]],
                                    **{f"predicted ({name})": [names[c] for c in p.argmax(axis=1)]
                                       for name, p in proba.items()}})
    table = comparison_table([{"task": task.name, "model": name, "folds": k, "report": r}
                              for name, r in reports.items()])
    fold_table = comparison_table(fold_rows)
    keep = [c for c in fold_table.columns if not c.startswith(("roc", "ece", "sensitivity", "accuracy_ci",
                                                                  "balanced_accuracy_ci", "macro_f1_ci"))]
    fold_table = fold_table[keep]
    return CrossValidation(task, table, fold_table, predictions, reports,
                           _write(out, model, task, table, fold_table, predictions, reports,
                                  {"dataset_index": idx, "fold": fold_of, "class_names": np.array(names),
                                   **{f"proba/{name}": p for name, p in proba.items()}}))


def cross_validate_models(data, models, task=None, k: int = 5, *, out, **kw) -> tuple[pd.DataFrame, dict]:
    """:func:`cross_validate` each of ``models`` on the same folds (into ``out/cv_<model>``); returns the
    pooled table of every model and the baselines (written to ``out/cv_comparison.csv/.md``) and the
    :class:`CrossValidation` of each model.

    Parameters
    ----------
    data : str, Path or OPDDataset
        The dataset.
    models : sequence of str
        Model names.
    task : str, optional
        The task (default: all classes).
    k : int
        Number of folds.
    out : str or Path
        Output folder.
    **kw
        Further arguments of :func:`cross_validate`.

    Returns
    -------
    tuple of (pandas.DataFrame, dict)
        The pooled table, and model name -> CrossValidation.
    """
    out = Path(out)
    runs = {model: cross_validate(data, model, task, k, out=out / f"cv_{model}", **kw) for model in models}
    table = pd.concat([run.table for run in runs.values()], ignore_index=True).drop_duplicates("model")
    write_table(table, out / "cv_comparison")
    return table, runs


def cv_summary(folders) -> pd.DataFrame:
    """One row per cross-validated model of ``train --cv`` output folders: its pooled figures over every
    map, its per-fold accuracies and its training time (a fused model also gives its deep part's row).

    Parameters
    ----------
    folders : iterable of str or Path
        ``train --cv`` output folders (``cv_table.csv``, ``cv_folds.csv``, ``cv_predictions.csv``,
        ``fold_<i>/``).

    Returns
    -------
    pandas.DataFrame
        Columns ``model``, ``folder``, the pooled ``accuracy`` / ``balanced_accuracy`` with their
        ``_ci_low`` / ``_ci_high`` (95%, two-stage group bootstrap), ``recall <class>`` (pooled, from the
        per-map predictions),
        ``n_maps``, ``fold_accuracy`` (list, fold order), ``folds`` and ``train_time_s`` (the folds'
        training, summed; seconds of wall time).

    Raises
    ------
    ModelError
        (One line) when a folder is not a finished ``train --cv`` output.
    """
    import json

    rows = []
    for folder in map(Path, folders):
        files = [folder / f"cv_{name}.csv" for name in ("table", "folds", "predictions")]
        if not all(f.is_file() for f in files):
            raise ModelError(folder, "not a finished train --cv output (no cv_table.csv, cv_folds.csv and "
                                     "cv_predictions.csv)")
        table, folds, predictions = map(pd.read_csv, files)
        models = [m for m in table["model"] if m not in _baseline_names()]
        time_s = sum(json.loads(config.read_text())["training"]["time_s"]
                     for config in sorted(folder.glob("fold_*/config.json")))
        keep = ["model", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "balanced_accuracy",
                "balanced_accuracy_ci_low", "balanced_accuracy_ci_high"]
        for model in models:
            row = table.loc[table["model"] == model, [c for c in keep if c in table]].iloc[0].to_dict()
            hit = predictions["true"] == predictions[f"predicted ({model})"]
            recall = hit.groupby(predictions["true"]).mean()
            per_fold = folds[folds["model"] == model].sort_values("fold")
            rows.append({**row, **{f"recall {name}": value for name, value in recall.items()},
                         "folder": str(folder), "fold_accuracy": per_fold["accuracy"].tolist(),
                         "folds": len(per_fold), "train_time_s": time_s})
    return pd.DataFrame(rows).rename(columns={"n": "n_maps"})


def plot_cv_accuracy(folders, path, *, goals=(0.85, 0.93), title: str | None = None) -> Path:
    """:func:`opdcells.plots.cv_accuracy` of ``train --cv`` output folders (:func:`cv_summary`).

    Parameters
    ----------
    folders : iterable of str or Path
        ``train --cv`` output folders, drawn in this order.
    path : str or Path
        The PNG to write.
    goals : sequence of float
        Accuracy goals drawn as horizontal lines (issue 13: 0.85 per backbone, 0.93 the best model).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    return plots.cv_accuracy(cv_summary(folders), path, goals=goals, title=title)


def ensemble_check(folder_a, folder_b, weights=(0.25, 0.5, 0.75)) -> tuple[pd.DataFrame, dict]:
    """Does the weighted mean of two cross-validated models' probabilities beat each alone? Judged on each
    fold's validation groups (``fold_<i>/validation_scores.npz``); the test maps only for the record.

    Each fold picks the weight of model A among 0 (B alone), ``weights`` and 1 (A alone) with the best
    validation accuracy (ties: the single model, then the weight nearest 0.5); the pooled test accuracy of
    those choices (``cv_probabilities.npz``) is returned beside each model's own.

    Parameters
    ----------
    folder_a, folder_b : str or Path
        ``train --cv`` output folders of two models on the same folds (same data, K and seed).
    weights : sequence of float
        Weights of model A in the mean, strictly between 0 and 1.

    Returns
    -------
    (pandas.DataFrame, dict)
        One row per fold: ``fold``, ``n_val``, the validation accuracy at each weight (``val w=<w>``; w=1:
        A alone, w=0: B alone), ``chosen_weight``; and the pooled test record: ``accuracy`` of A, of B, and
        of the per-fold choices (``ensemble``), ``n_maps``, ``folds_choosing_the_mean``.

    Raises
    ------
    ModelError
        (One line) a folder without the files, or folds whose validation or test maps differ.
    """
    folder_a, folder_b = Path(folder_a), Path(folder_b)
    grid = [1.0, *sorted(weights, key=lambda w: abs(w - 0.5)), 0.0]   # tie order: single, nearest 0.5
    test = [_probabilities(folder) for folder in (folder_a, folder_b)]
    if not np.array_equal(test[0]["dataset_index"], test[1]["dataset_index"]) or not np.array_equal(
            test[0]["fold"], test[1]["fold"]):
        raise ModelError(folder_b, f"its folds are not those of {folder_a}: cross-validate both with the "
                                   "same data, --cv K and --seed")
    rows, chosen = [], np.zeros(test[0]["fold"].size)
    for fold in np.unique(test[0]["fold"]):
        val = [_validation_scores(folder / f"fold_{fold}") for folder in (folder_a, folder_b)]
        if not (np.array_equal(val[0]["labels"], val[1]["labels"])
                and np.array_equal(val[0]["groups"], val[1]["groups"])):
            raise ModelError(folder_b / f"fold_{fold}", f"its validation maps are not those of {folder_a}")
        accuracy = {w: float(np.mean((w * val[0]["proba"] + (1 - w) * val[1]["proba"]).argmax(axis=1)
                                     == val[0]["labels"])) for w in grid}
        best = max(grid, key=lambda w: accuracy[w])   # the first of the best in tie order
        rows.append({"fold": int(fold), "n_val": len(val[0]["labels"]),
                     **{f"val w={w:g}": accuracy[w] for w in sorted(grid, reverse=True)},
                     "chosen_weight": best})
        chosen[test[0]["fold"] == fold] = best
    y = test[0]["y"]
    mean = chosen[:, None] * test[0]["proba"] + (1 - chosen[:, None]) * test[1]["proba"]
    record = {"accuracy": {folder_a.name: float(np.mean(test[0]["proba"].argmax(axis=1) == y)),
                           folder_b.name: float(np.mean(test[1]["proba"].argmax(axis=1) == y)),
                           "ensemble": float(np.mean(mean.argmax(axis=1) == y))},
              "n_maps": int(y.size),
              "folds_choosing_the_mean": int(sum(0 < row["chosen_weight"] < 1 for row in rows))}
    return pd.DataFrame(rows), record


def _probabilities(folder: Path) -> dict:
    """``cv_probabilities.npz`` of a ``train --cv`` folder: its model's probabilities, folds and true
    classes (from ``cv_predictions.csv``)."""
    path = folder / PROBABILITIES_FILE
    if not path.is_file() or not (folder / "cv_predictions.csv").is_file():
        raise ModelError(folder, f"no {PROBABILITIES_FILE} and cv_predictions.csv: not a train --cv "
                                 "output of this version")
    with np.load(path) as stored:
        names = stored["class_names"].tolist()
        models = [k for k in stored.files if k.startswith("proba/") and k.removeprefix("proba/") not in
                  _baseline_names() and not k.endswith("(deep part)")]
        proba, folds, index = stored[models[0]], stored["fold"], stored["dataset_index"]
    true = pd.read_csv(folder / "cv_predictions.csv")["true"]
    y = np.array([names.index(name) for name in true])
    return {"proba": proba, "fold": folds, "dataset_index": index, "y": y}


def _validation_scores(folder: Path) -> dict:
    from .calibration import load_validation_scores

    scores = load_validation_scores(folder)
    if scores is None:
        raise ModelError(folder, "no validation_scores.npz: the fold had no validation groups")
    return scores


@contextlib.contextmanager
def _without_few_groups_warnings():
    """Drop ``opdcells.evaluate``'s per-model "few acquisition groups" warnings (a fold has few by design)."""
    from .evaluate import small_study_warnings

    text = small_study_warnings([0], ["g"], ["c"])[0].split("(")[0]

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger = logging.getLogger("opdcells.evaluate")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _fold_val_fraction(val_size: float, k: int) -> float:
    """``val_size`` (a fraction of all maps, as ``train`` reads it) as a fraction of a fold's training maps,
    which hold (k - 1) / k of them: 0.15 at k = 5 -> 0.1875, as ``train`` carves 0.15 / (1 - 0.2)."""
    if not 0 <= val_size < (k - 1) / k:
        raise ValueError(f"--val-size {val_size:g}: with --cv {k} the validation groups come from the "
                         f"{k - 1}/{k} of the maps a fold trains on; choose 0 <= F < {(k - 1) / k:.2f}")
    return val_size * k / (k - 1)


def _deep_part(model: str, evaluation) -> dict[str, np.ndarray]:
    """``{"<model> (deep part)": proba}`` of a fused model's test maps (its deep part alone); {} otherwise."""
    parts = evaluation.parts or {}
    return {f"{model} (deep part)": parts["p_deep"]} if "p_deep" in parts else {}


def _baseline_names() -> tuple[str, ...]:
    from .baselines import BASELINES

    return BASELINES


def _write(out: Path, model: str, task: Task, table, fold_table, predictions, reports,
           probabilities: dict) -> dict[str, Path]:
    """Tables, per-map predictions and probabilities, and figures of a cross-validation into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = dict(zip(("table_csv", "table_md"), write_table(table, out / "cv_table"), strict=True))
    files.update(zip(("folds_csv", "folds_md"), write_table(fold_table, out / "cv_folds"), strict=True))
    files["predictions"] = out / "cv_predictions.csv"
    predictions.to_csv(files["predictions"], index=False)
    files["probabilities"] = out / PROBABILITIES_FILE
    tmp = files["probabilities"].with_name(f".{PROBABILITIES_FILE}.tmp")
    with open(tmp, "wb") as f:   # a reader sees the old file or the whole new one
        np.savez_compressed(f, **probabilities)
    os.replace(tmp, files["probabilities"])
    files["folds_figure"] = plots.accuracy_bars(
        fold_table.assign(fold=fold_table["fold"].map(lambda i: f"fold {i}")), out / "cv_folds.png",
        metric="balanced_accuracy", group="fold", title=f"{task.name}: balanced accuracy per fold")
    report = reports[model]
    files["confusion"] = plots.confusion_matrix(np.asarray(report["confusion_matrix"]["counts"]),
                                                report["class_names"], out / f"cv_confusion_{model}.png",
                                                title=f"{model} ({task.name}), all folds")
    return files
