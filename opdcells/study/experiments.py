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
    """What :func:`compare_models` made: one table row per (task, model), runs and files.

    Attributes
    ----------
    table : pandas.DataFrame
        The comparison table: one row per (task, model) and per baseline, test accuracy with 95% CIs.
    runs : dict
        ``(task, model)`` -> ``TrainResult``.
    files : dict
        Name -> Path of the tables (CSV, Markdown) and summary figures.
    folders : dict
        ``(task, model)`` -> Path of the run's figures.
    """

    table: pd.DataFrame
    runs: dict = field(default_factory=dict)        # (task, model) -> TrainResult
    files: dict = field(default_factory=dict)       # name -> Path (tables and summary figures)
    folders: dict = field(default_factory=dict)     # (task, model) -> Path of the run's figures


#: Axis labels (with units) of the dataset's per-map columns in the overview figure.
AXIS_LABELS = {"dry_mass_pg": "dry mass (pg)", "area_um2": "projected cell area (µm²)"}


def tasks_of(data) -> list[str]:
    """The reference tasks a dataset has the classes for, or ``["all"]`` (every class) when none fits:
    the notebooks' default tasks.

    Parameters
    ----------
    data : str, Path or Dataset
        A dataset file (HDF5) or an opened dataset.

    Returns
    -------
    list of str
        Task names (:func:`opdcells.tasks.resolve_task` reads them).
    """
    ds = open_dataset(data) if isinstance(data, (str, Path)) else data
    return default_tasks(ds.class_names, ds.labels)


def dataset_overview(data, results) -> dict:
    """Class counts per acquisition group and example maps per class; returns table and figure paths.

    Parameters
    ----------
    data : str, Path or Dataset
        A dataset file (HDF5) or an opened dataset.
    results : str or Path
        Folder for the table and figures.

    Returns
    -------
    dict
        ``table``: per class the number of maps and acquisition groups and the median dry mass (pg) and
        area (um^2); ``files``: name -> Path of the class table, example grid (6 maps a class) and dry-mass
        histograms.
    """
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
             "dry_mass": plots.feature_histograms(frame.rename(columns=AXIS_LABELS),
                                                  list(AXIS_LABELS.values()), "class",
                                                  results / "dataset_dry_mass.png")}
    return {"table": counts, "files": files}


#: Initialisations a comparison gives each backbone (Final_Project's ``INITS``): from scratch, the
#: registry's OPD-pretrained encoder, keras.applications' ImageNet weights.
INITIALISATIONS = ("random", "opd", "imagenet")


def initialisation_runs(models, inits=INITIALISATIONS, *, profile: str = "quick", imagenet="cached",
                        input_size=None) -> tuple[list[str], list[str]]:
    """The runs of a comparison of initialisations: each backbone of ``models`` once per initialisation of
    ``inits`` it can really have here, named as ``--model`` names them (``resnet50``, ``opd_resnet50``,
    ``imagenet_resnet50``; :data:`opdcells.config.ALIASES`); other names (``features``, aliases) pass as
    they are.

    An OPD run needs the backbone's registered encoder (``registry.DEFAULTS``); an ImageNet run needs
    keras.applications' file (:func:`opdcells.models.imagenet_weights_file`) unless ``imagenet`` is True
    (download). A run left out is a note, not a run that would silently start from random weights.

    Parameters
    ----------
    models : sequence of str
        Model names (:data:`opdcells.config.MODEL_NAMES`).
    inits : sequence of str
        Of :data:`INITIALISATIONS`.
    profile : str
        Training profile (its input size and MobileNetV2 width name the ImageNet file).
    imagenet : "cached", bool
        "cached": ImageNet runs where the file is on this machine; True: always (Keras downloads it);
        False: never.
    input_size : int, optional
        Input size overriding the profile's.

    Returns
    -------
    (list of str, list of str)
        The model names to compare, in order; one line per run left out, with the reason.

    Raises
    ------
    ValueError
        An initialisation not in :data:`INITIALISATIONS`.
    """
    from ..config import FAMILIES
    from ..registry import DEFAULTS

    unknown = sorted(set(inits) - set(INITIALISATIONS))
    if unknown:
        raise ValueError(f"unknown initialisation(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(INITIALISATIONS)}")
    names, notes = [], []
    for model in models:
        if model not in FAMILIES:
            names.append(model)
            continue
        for init in inits:
            if init == "random":
                names.append(model)
            elif init == "opd" and model in DEFAULTS:
                names.append(f"opd_{model}")
            elif init == "opd":
                notes.append(f"{model} OPD-pretrained: no encoder registered (opdcells.registry.DEFAULTS)")
            elif model == "dinov2":
                notes.append("dinov2 ImageNet: keras.applications has no DINOv2 weights")
            else:
                file = _imagenet_file_of_profile(model, profile, input_size)
                if imagenet is True or (imagenet == "cached" and file.is_file()):
                    names.append(f"imagenet_{model}")
                else:
                    notes.append(f"{model} ImageNet: {file.name} is not in {file.parent} (no download here)")
    return names, notes


def _imagenet_file_of_profile(model: str, profile: str, input_size) -> Path:
    """keras.applications' ImageNet file of ``model`` at the profile's width and input size."""
    from ..config import TrainConfig
    from ..models import imagenet_weights_file

    config = TrainConfig.from_profile(model, profile, weights="imagenet", input_size=input_size)
    return imagenet_weights_file(model, config.alpha or 1.0, config.input_size)


def compare_models(data, models, tasks=("five_class",), *, name="comparison", profile="quick", seed=0,
                   saved_models="saved_models", results="results", model_options=None, verbose=2,
                   n_boot=1000, **train_kw) -> Comparison:
    """Train every model in ``models`` on every task in ``tasks``; evaluate each on its held-out groups.

    Model folders go to ``saved_models/<name>_<model>_<task>``; per-run figures (confusion matrix, ROC,
    training curves, gallery) to ``results/<name>/<model>_<task>/`` (``<task>``:
    :func:`opdcells.tasks.task_slug`); the comparison table (CSV and Markdown; the baselines of
    ``opdcells.baselines`` on the same test maps beside the models) and the accuracy bar chart with 95%
    CIs to ``results/<name>/``. A run made before with the same settings, dataset, split and code is read
    back (:func:`earlier_run`), not retrained. A fused model (``TrainConfig.fusion``, the default of the
    backbones from scratch) gives two rows: ``<model> + features`` (the fused model) and ``<model>`` (its
    deep part alone on the same test maps); every row carries the recall of each class. The features model
    is fit once per split for all of them (``saved_models/<name>_features_cache``,
    :class:`opdcells.learners.FeaturesCache`).

    Parameters
    ----------
    data : str, Path or Dataset
        A dataset file (HDF5) or an opened dataset.
    models : sequence of str
        Model names (:mod:`opdcells.models`).
    tasks : sequence of str
        As :func:`opdcells.tasks.resolve_task` reads them (reference tasks, "all", "A,B",
        "NAME=A,B NAME=C").
    name : str
        The comparison's name (folder and file prefix).
    profile : str
        Training profile (e.g. "quick").
    seed : int
        Random seed of splits and training.
    saved_models, results : str or Path
        Folders for the model folders and for tables and figures.
    model_options : dict, optional
        Model name -> extra :func:`opdcells.train.train` arguments.
    verbose : int
        Keras verbosity.
    n_boot : int
        Bootstrap resamples of the confidence intervals.
    **train_kw
        Arguments of :func:`opdcells.train.train` for every model (split options such as
        ``test_groups``).

    Returns
    -------
    Comparison
    """
    from ..config import write_json_atomic
    from ..evaluate import write_results
    from ..train import train

    ds = open_dataset(data) if isinstance(data, (str, Path)) else data
    out_root, saved_models = Path(results) / name, Path(saved_models)
    rows, runs, folders = [], {}, {}
    for task in tasks:
        slug = task_slug(task)
        for model in models:
            options = {**train_kw, **(model_options or {}).get(model, {})}
            digest = comparison_digest(ds, model, task, profile=profile, seed=seed, **options)
            result = earlier_run(ds, saved_models, digest, seed=seed)
            if result is None:
                log.info("%s: training %s on %s", name, model, task)
                result = train(ds, model, task, saved_models / f"{name}_{model}_{slug}", profile=profile,
                               seed=seed, verbose=verbose, n_boot=n_boot,
                               features_cache=saved_models / f"{name}_features_cache", **options)
                if digest:
                    write_json_atomic(result.model_dir / RUN_DIGEST_FILE, {"digest": digest})
            folders[(task, model)] = out_root / f"{model}_{slug}"
            write_results(result.evaluation, result.model, ds, folders[(task, model)])
            runs[(task, model)] = result
            rows += _rows(task, model, result)
        if models:
            rows += _baseline_rows(ds, task, runs[(task, models[0])], n_boot=n_boot, seed=seed)
    table = comparison_table(rows)
    csv_path, md_path = write_table(table, out_root / "comparison")
    files = {"table_csv": csv_path, "table_md": md_path,
             "accuracy": plots.accuracy_bars(table, out_root / "accuracy.png",
                                             title=f"{name}: test accuracy on unseen acquisition groups",
                                             styles=plots.comparison_styles(table))}
    return Comparison(table, runs, files, folders)


#: File of a compare_models run folder holding its :func:`comparison_digest` (what makes it re-usable).
RUN_DIGEST_FILE = "run_digest.json"


def comparison_digest(ds, model: str, task: str, *, profile: str, seed: int, **options) -> str | None:
    """The :func:`opdcells.study.transfer.run_digest` of the run ``train(ds, model, task, profile=, seed=,
    **options)`` would make (its split follows from the config and the dataset); None when ``options``
    are not all :class:`~opdcells.config.TrainConfig` fields (such a run is always trained).

    Parameters
    ----------
    ds : Dataset
        The opened dataset (its fingerprint enters the digest).
    model : str
        Model name.
    task : str
        Task, as :func:`opdcells.tasks.resolve_task` reads it.
    profile : str
        Training profile.
    seed : int
        Random seed.
    **options
        Further training settings.

    Returns
    -------
    str or None
        A hex digest.
    """
    import dataclasses

    from ..config import TrainConfig
    from .transfer import run_digest

    if set(options) - {f.name for f in dataclasses.fields(TrainConfig)}:
        return None
    config = TrainConfig.from_profile(model, profile, seed=seed, **options).replace(task=task)
    return run_digest(config, ds.fingerprint)


def earlier_run(ds, saved_models, digest: str | None, *, seed: int = 0):
    """The run of ``saved_models`` that ``compare_models`` made with the same ``digest`` (same settings,
    dataset, split and package source), as a ``train.TrainResult`` re-evaluated on its test maps; None
    when there is none. Both notebooks train ``features`` on the same split, and a second ``make demo``
    repeats every run: those are read back, not retrained.

    Parameters
    ----------
    ds : Dataset
        The opened dataset.
    saved_models : str or Path
        Folder of model folders.
    digest : str or None
        :func:`comparison_digest` of the wanted run; None finds nothing.
    seed : int
        Random seed of the re-evaluation.

    Returns
    -------
    TrainResult or None
    """
    import json

    from ..evaluate import evaluate_model
    from ..modelfolder import load_model
    from ..splits import Split, dataset_groups
    from ..train import TrainResult

    if digest is None:
        return None
    for marker in sorted(Path(saved_models).glob(f"*/{RUN_DIGEST_FILE}")):
        folder = marker.parent
        try:
            same = json.loads(marker.read_text(encoding="utf-8"))["digest"] == digest
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8")) if same else None
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if metrics is None:
            continue
        log.info("re-using %s: the same settings, dataset, split and code (%s)", folder, digest[:12])
        saved = load_model(folder, ds)
        split = Split.from_json(folder / "split.json")
        groups = dataset_groups(ds, saved.config["train_config"].get("group_pattern"))
        evaluation = evaluate_model(saved, ds, split.test, n_boot=0, seed=seed, groups=groups)
        history = pd.read_csv(folder / "history.csv").to_dict(orient="list")
        return TrainResult(folder, history, metrics, saved.config, saved, evaluation)
    return None


def _baseline_rows(ds, task, result, *, n_boot: int, seed: int) -> list[dict]:
    """Comparison rows of the baselines, fit and tested on the split of ``result`` (a TrainResult)."""
    from ..baselines import baseline_reports
    from ..splits import Split
    from ..tasks import task_labels

    split = Split.from_json(result.model_dir / "split.json")
    saved, sens = result.model, result.metrics.get("sensitivity_at_fpr")
    reports = baseline_reports(ds, task_labels(ds, saved.task), split, saved.class_names, n_boot=n_boot,
                               seed=seed, positive_class=sens["positive_class"] if sens else None)
    return [{"task": task, "model": baseline, "init": "baseline", "predicts_only": predicted_only(report),
             **recall_columns(report), "report": report} for baseline, report in reports.items()]


def _rows(task: str, model: str, result) -> list[dict]:
    """Comparison rows of one run: its own, and for a fused model (config ``fusion``) its deep part alone
    (``metrics.json`` ``fusion.parts``), named ``<model>``, the fused one ``<model> + features``."""
    config, report = result.config, result.metrics
    common = {"task": task, "init": config.get("init"), "input_size": config.get("input_size"),
              "epochs_run": config["training"]["epochs_run"], "train_time_s": config["training"]["time_s"]}
    fusion = report.get("fusion")
    if not fusion:
        return [{**common, "model": model, "fusion": "none", "predicts_only": predicted_only(report),
                 **recall_columns(report), "report": report}]
    deep = fusion["parts"][f"{config['model']} alone"]
    return [{**common, "model": f"{model} + features", "fusion": f"deep weight {fusion['deep_weight']:g}",
             "predicts_only": predicted_only(report), **recall_columns(report), "report": report},
            {**common, "model": model, "fusion": "deep part alone", "predicts_only": predicted_only(deep),
             **recall_columns(deep), "report": deep}]


def recall_columns(report: dict) -> dict:
    """``{"recall <class>": recall}`` of every class of a classification report (per-class columns of a
    comparison table).

    Parameters
    ----------
    report : dict
        A ``evaluate.classification_report``.

    Returns
    -------
    dict
        Column name -> recall (a fraction; NaN for a class without test maps).
    """
    return {f"recall {name}": float(entry["recall"]) if entry["recall"] is not None else float("nan")
            for name, entry in report["per_class"].items()}


def predicted_only(report: dict) -> str:
    """The class a model predicted for every test map, or "" when its predictions name several classes.

    Parameters
    ----------
    report : dict
        A ``evaluate.classification_report`` (its confusion matrix: rows true, columns predicted).

    Returns
    -------
    str
        The one predicted class name, or "".
    """
    counts = np.asarray(report["confusion_matrix"]["counts"]).sum(axis=0)
    used = np.flatnonzero(counts)
    return str(report["confusion_matrix"]["labels"][used[0]]) if len(used) == 1 else ""


# ---------------------------------------------------------------------- conclusion

#: The baselines' rows in a comparison table (``init`` column), and the reference among them.
BASELINE_INIT = "baseline"
MAJORITY = "majority class"
FEATURES_MODEL = "features"


def _estimate(row, metric: str) -> str:
    """'0.850 [0.790, 0.900]' (the value and its 95% CI when the table has one)."""
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    ci = f" [{low:.3f}, {high:.3f}]" if pd.notna(low) and pd.notna(high) else ""
    return f"{row[metric]:.3f}{ci}"


def _task_conclusion(rows: pd.DataFrame, metric: str, label: str, initialisations: bool = True) -> list[str]:
    """The sentences of :func:`conclusion` for one task's rows."""
    name = metric.replace("_", " ")
    models = rows[rows["init"] != BASELINE_INIT].sort_values(metric, ascending=False)
    baselines = rows[rows["init"] == BASELINE_INIT]
    if models.empty:
        return [f"{label}no trained model to compare."]
    best = models.iloc[0]
    top = models[np.isclose(models[metric], best[metric], atol=5e-4)]
    if len(top) > 1:
        names = list(top["model"])
        lines = [f"{label}{', '.join(names[:-1])} and {names[-1]} tie for the best {name} on unseen groups "
                 f"({best[metric]:.3f})."]
    else:
        lines = [f"{label}**{best['model']}** has the best {name} on unseen groups, "
                 f"{_estimate(best, metric)}."]
        if len(models) > 1:
            second = models.iloc[1]
            low = best.get(f"{metric}_ci_low")
            if pd.notna(low) and second[metric] >= low:
                lines.append(f"The runner-up {second['model']} ({second[metric]:.3f}) lies inside its "
                             "95% CI: these test groups do not separate the two.")
    features = models[models["model"] == FEATURES_MODEL]
    deep = models[models["model"] != FEATURES_MODEL]
    if len(features) and len(deep):
        ref, champion = features.iloc[0], deep.iloc[0]
        low, high = champion.get(f"{metric}_ci_low"), champion.get(f"{metric}_ci_high")
        if pd.notna(low) and low > ref[metric]:
            verdict = "beats"
        elif pd.notna(high) and high < ref[metric]:
            verdict = "is below"
        elif champion[metric] > ref[metric]:
            verdict = "is above, but within the 95% CI of,"
        else:
            verdict = "does not beat"
        lines.append(f"The best network, {champion['model']} ({champion[metric]:.3f}), {verdict} the "
                     f"features baseline (OPD morphology + boosting, {ref[metric]:.3f}).")
    majority = baselines[baselines["model"] == MAJORITY]
    if len(majority):
        floor = float(majority.iloc[0][metric])
        weak = models[models[metric] <= floor + 5e-4]
        if len(weak):
            verb = "is" if len(weak) == 1 else "are"
            lines.append(f"{', '.join(weak['model'])} {verb} no better than always answering"
                         f" the majority class ({name} {floor:.3f}).")
    if "predicts_only" in models:
        for _, row in models[models["predicts_only"].fillna("").astype(bool)].iterrows():
            lines.append(f"{row['model']} predicts {row['predicts_only']} for every map.")
    inits = ", ".join(f"{row['model']} `{row['init']}`" for _, row in models.iterrows()
                      if row["model"] != FEATURES_MODEL)
    if inits and initialisations:
        lines.append(f"Initialisation as recorded in each run's config.json: {inits}.")
    return lines


def conclusion(table: pd.DataFrame, *, metric: str = "balanced_accuracy",
               initialisations: bool = True) -> str:
    """A short Markdown conclusion written from a comparison table (what the notebooks end with).

    Per task: the model with the best ``metric`` on the unseen test groups and its 95% CI (or the models
    that tie), whether the runner-up lies inside that CI, whether the best network beats the ``features``
    baseline, which models are no better than the majority-class baseline, which predict a single class
    for every map (column ``predicts_only``), and the initialisation each model really had (``init``).

    Parameters
    ----------
    table : pandas.DataFrame
        Rows of :func:`compare_models` (or a frozen-probe table with ``model`` naming model and method):
        columns ``model``, ``init`` (``"baseline"`` for the baselines), ``metric`` and optionally
        ``<metric>_ci_low`` / ``_ci_high``, ``predicts_only`` and ``task``.
    metric : str
        The column compared (a fraction in [0, 1]).
    initialisations : bool
        End each task's paragraph with every network's initialisation.

    Returns
    -------
    str
        Markdown: one paragraph per task.

    Raises
    ------
    KeyError
        A required column is missing.
    """
    missing = {"model", "init", metric} - set(table.columns)
    if missing:
        raise KeyError(f"conclusion: the table has no column {', '.join(sorted(missing))}")
    several = "task" in table and table["task"].nunique() > 1
    tasks = table.groupby("task", sort=False) if "task" in table else [(None, table)]
    paragraphs = [" ".join(_task_conclusion(rows, metric, f"*{task}*: " if several else "", initialisations))
                  for task, rows in tasks]
    return "\n\n".join(paragraphs) + "\n"
