"""Experiments behind the notebooks: train several models on several tasks, evaluate them on unseen
acquisition groups, and write the comparison figures and tables to ``results/``.

Each function returns what it made (tables, paths); the notebooks display them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import plots
from ..dataset import open_dataset
from ..evaluate import comparison_table, write_table
from ..tasks import default_tasks, task_slug

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """What :func:`compare_models` made: one table row per (task, model), runs and files."""

    table: pd.DataFrame
    runs: dict = field(default_factory=dict)        # (task, model) -> TrainResult
    files: dict = field(default_factory=dict)       # name -> Path (tables and summary figures)
    folders: dict = field(default_factory=dict)     # (task, model) -> Path of the run's figures


def tasks_of(data) -> list[str]:
    """The reference tasks a dataset has the classes for, or ``["all"]`` (every class) when none fits:
    the notebooks' default tasks."""
    ds = open_dataset(data) if isinstance(data, (str, Path)) else data
    return default_tasks(ds.class_names, ds.labels)


def dataset_overview(data, results) -> dict:
    """Class counts per acquisition group and example maps per class; returns table and figure paths."""
    ds = open_dataset(data) if isinstance(data, (str, Path)) else data
    results = Path(results)
    names = [str(c) for c in ds.class_names]
    frame = pd.DataFrame({"class": [names[k] for k in ds.labels], "group": ds.groups,
                          "dry_mass_pg": ds.dry_mass_pg, "area_um2": ds.area_um2})
    counts = frame.groupby("class").agg(maps=("group", "size"), groups=("group", "nunique"),
                                        dry_mass_pg_median=("dry_mass_pg", "median"),
                                        area_um2_median=("area_um2", "median")).reset_index()
    rng = np.random.default_rng(0)
    picks = [i for k in range(len(names))
             for i in sorted(rng.choice(np.flatnonzero(ds.labels == k),
                                        min(6, int((ds.labels == k).sum())), replace=False))]
    titles = [f"{names[ds.labels[i]]}\n{ds.dry_mass_pg[i]:.0f} pg" for i in picks]
    files = {"counts": write_table(counts, results / "dataset_classes")[1],
             "examples": plots.image_grid([ds.read(int(i)) for i in picks], titles,
                                          results / "dataset_examples.png", cmap="viridis", ncols=6),
             "dry_mass": plots.feature_histograms(frame, ["dry_mass_pg", "area_um2"], "class",
                                                  results / "dataset_dry_mass.png")}
    return {"table": counts, "files": files}


def compare_models(data, models, tasks=("five_class",), *, name="comparison", profile="quick", seed=0,
                   saved_models="saved_models", results="results", model_options=None, verbose=2,
                   n_boot=1000, **train_kw) -> Comparison:
    """Train every model in ``models`` on every task in ``tasks``; evaluate each on its held-out groups.

    ``tasks``: as :func:`opdcells.tasks.resolve_task` reads them (reference tasks, "all", "A,B",
    "NAME=A,B NAME=C"). Model folders go to ``saved_models/<name>_<model>_<task>``; per-run figures
    (confusion matrix, ROC, training curves, gallery) to ``results/<name>/<model>_<task>/`` (``<task>``:
    :func:`opdcells.tasks.task_slug`); the comparison table (CSV and Markdown; the baselines of
    ``opdcells.baselines`` on the same test maps beside the models) and the accuracy bar chart with 95%
    CIs to ``results/<name>/``. ``model_options`` maps a model name to extra
    :func:`opdcells.train.train` arguments (split options such as ``test_groups`` go in ``train_kw``).
    """
    from ..evaluate import write_results
    from ..train import train

    ds = open_dataset(data) if isinstance(data, (str, Path)) else data
    out_root, saved_models = Path(results) / name, Path(saved_models)
    rows, runs, folders = [], {}, {}
    for task in tasks:
        slug = task_slug(task)
        for model in models:
            options = {**train_kw, **(model_options or {}).get(model, {})}
            log.info("%s: training %s on %s", name, model, task)
            result = train(ds, model, task, saved_models / f"{name}_{model}_{slug}", profile=profile,
                           seed=seed, verbose=verbose, n_boot=n_boot, **options)
            folders[(task, model)] = out_root / f"{model}_{slug}"
            write_results(result.evaluation, result.model, ds, folders[(task, model)])
            runs[(task, model)] = result
            rows.append(_row(task, model, result))
        if models:
            rows += _baseline_rows(ds, task, runs[(task, models[0])], n_boot=n_boot, seed=seed)
    table = comparison_table(rows)
    csv_path, md_path = write_table(table, out_root / "comparison")
    files = {"table_csv": csv_path, "table_md": md_path,
             "accuracy": plots.accuracy_bars(table, out_root / "accuracy.png",
                                             title=f"{name}: test accuracy on unseen acquisition groups")}
    return Comparison(table, runs, files, folders)


def _baseline_rows(ds, task, result, *, n_boot: int, seed: int) -> list[dict]:
    """Comparison rows of the baselines, fit and tested on the split of ``result`` (a TrainResult)."""
    from ..baselines import baseline_reports
    from ..splits import Split
    from ..tasks import task_labels

    split = Split.from_json(result.model_dir / "split.json")
    saved, sens = result.model, result.metrics.get("sensitivity_at_fpr")
    reports = baseline_reports(ds, task_labels(ds, saved.task), split, saved.class_names, n_boot=n_boot,
                               seed=seed, positive_class=sens["positive_class"] if sens else None)
    return [{"task": task, "model": baseline, "init": "baseline", "report": report}
            for baseline, report in reports.items()]


def _row(task: str, model: str, result) -> dict:
    """Identifying columns of one comparison row plus its report."""
    config = result.config
    return {"task": task, "model": model, "init": config.get("init"),
            "input_size": config.get("input_size"), "epochs_run": config["training"]["epochs_run"],
            "train_time_s": config["training"]["time_s"], "report": result.metrics}
