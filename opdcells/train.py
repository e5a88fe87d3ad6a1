"""Train a classifier of OPD maps for a task and write its model folder: the training orchestration.

:func:`train` makes the split (by acquisition group), the normalisation and the learner
(:mod:`opdcells.learners`: a deep Keras model or the features baseline), fits it, calibrates it on the
validation groups, fits its out-of-distribution detector, writes the folder (:mod:`opdcells.modelfolder`,
replaced atomically) and evaluates it on the test groups (:mod:`opdcells.evaluate`). Every setting is a
field of :class:`opdcells.config.TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import FEATURES, TrainConfig, augment_dict, resolve_alias
from .errors import ConfigError, SplitError
from .evaluate import Evaluation, baseline_summary, evaluate_model, rows_digest
from .files import iter_maps, opened, staging, versions, write_history, write_json
from .learners import (
    FeaturesCache,
    _class_weights,
    _FeaturesLearner,
    _FusedLearner,
    _KerasLearner,
    _learner_class,
    choose_deep_weight,
)
from .modelfolder import FORMAT, FORMAT_VERSION, SavedModel, saved_models_root
from .ood import fit_for_model
from .simulate import dataset_origin
from .splits import Split, dataset_groups, group_split, map_split, named_split
from .tasks import Task, class_key, resolve_task, task_labels

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "make_split", "estimate_norm_scale", "labelled_subset", "geometry_warning",
           "calibrate_on_validation"]


# --------------------------------------------------------------------------------------------- data


def make_split(dataset, task: Task, *, seed: int = 0, test_size: float = 0.2, val_size: float = 0.15,
               test_groups=None, val_groups=None, split_by: str = "group", group_pattern: str | None = None
               ) -> Split:
    """Group split of the task's maps, as indices into the dataset.

    ``splits.group_split`` with the fractions, or ``splits.named_split`` when ``test_groups`` (and
    optionally ``val_groups``) are named; ``split_by="map"``: ``splits.map_split`` (session effects
    untested, warned and recorded).

    Parameters
    ----------
    dataset : OPDDataset
        The open dataset.
    task : Task
        The task; maps of other classes are in no part.
    seed : int
        Seed of the split.
    test_size, val_size : float
        Fractions of the task's maps (whole acquisition groups) for testing and validation.
    test_groups, val_groups : list of str, optional
        Acquisition groups that form the test and validation parts instead.
    split_by : {"group", "map"}
        Whole acquisition groups per part, or single maps.
    group_pattern : str, optional
        Groups from the source file names (``splits.groups_from_pattern``) instead of the dataset's.

    Returns
    -------
    Split
        Train, validation and test indices into the dataset.

    Raises
    ------
    SplitError
        No group split exists (one line, naming the dataset).
    """
    y_all = task_labels(dataset, task)
    idx = np.flatnonzero(y_all >= 0)
    try:
        groups = dataset_groups(dataset, group_pattern)
        if split_by == "map":
            part = map_split(y_all[idx], test_size=test_size, val_size=val_size, seed=seed)
        elif test_groups:
            part = named_split(y_all[idx], groups[idx], test_groups, val_groups or (), val_size=val_size,
                               seed=seed)
        elif val_groups:
            raise ValueError("--val-groups needs --test-groups (name the test groups too)")
        else:
            part = group_split(y_all[idx], groups[idx], test_size=test_size, val_size=val_size, seed=seed)
    except SplitError as exc:
        raise SplitError(exc.reason, dataset.path) from None
    return Split(idx[part.train], idx[part.val], idx[part.test], seed=part.seed, groups=part.groups,
                 by=part.by, warning=part.warning)


def estimate_norm_scale(dataset, indices, *, percentile: float = 99.0, max_maps: int = 512,
                        seed: int = 0) -> float:
    """Normalisation scale: the ``percentile`` of |OPD| over the cell (non-zero) pixels of the maps.

    Pass the TRAINING maps only.

    Parameters
    ----------
    dataset : OPDDataset
        The open dataset.
    indices : array of int, shape (N,)
        The maps to measure (up to ``max_maps`` of them, chosen at random with ``seed``).
    percentile : float
        Percentile of |OPD|, 0-100.
    max_maps : int
        Most maps read.
    seed : int
        Seed of the choice of maps.

    Returns
    -------
    float
        The scale in nm (1 nm, with a warning, when the maps hold no finite positive value).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) > max_maps:
        indices = np.sort(np.random.default_rng(seed).choice(indices, max_maps, replace=False))
    values = [np.abs(m[m != 0]) for m in iter_maps(dataset, indices)]
    values = np.concatenate(values) if values else np.empty(0)
    scale = float(np.percentile(values, percentile)) if values.size else 0.0
    if not (math.isfinite(scale) and scale > 0):
        log.warning("cannot estimate a normalisation scale from %d maps; using 1 nm", len(indices))
        return 1.0
    return scale


# --------------------------------------------------------------------------------------------- learners


# --------------------------------------------------------------------------------------------- saved model


# --------------------------------------------------------------------------------------------- evaluation


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` made: the model folder, per-epoch history, test metrics, the config and the
    trained model itself (as :func:`opdcells.modelfolder.load_model` would give it back).

    Attributes
    ----------
    model_dir : pathlib.Path
        The model folder written.
    history : dict of str to list of float
        Loss and accuracy (and their validation twins) per epoch.
    metrics : dict
        ``evaluate.classification_report`` on the test groups (metrics.json).
    config : dict
        config.json.
    model : SavedModel, optional
        The trained model.
    evaluation : Evaluation, optional
        The test-split predictions behind ``metrics``.
    """

    model_dir: Path
    history: dict[str, list[float]]
    metrics: dict
    config: dict
    model: SavedModel | None = None
    evaluation: Evaluation | None = None   # test-split predictions behind ``metrics``


def _class_members(task: Task, dataset_class_names) -> dict[str, list[str]]:
    """Task class -> the dataset class names that map to it."""
    names = [str(c) for c in dataset_class_names]
    return {cls: [n for n in names if class_key(n) in {class_key(m) for m in task.members[cls]}]
            for cls in task.classes}


def _best_epoch(history: dict) -> int | None:
    key = "val_loss" if history.get("val_loss") else "loss"
    values = history.get(key) or []
    return int(np.nanargmin(values)) + 1 if values else None


def _history_summary(history: dict) -> dict:
    """Last value of every history column (loss, accuracy, and their validation twins)."""
    return {key: float(values[-1]) for key, values in history.items() if len(values)}


def _make_config(*, name, settings: TrainConfig, task: Task, dataset, split: Split, split_seed, test_size,
                 val_size, info, normalisation, class_weight, history, train_time_s) -> dict:
    """config.json: ``train_config`` (the settings, :class:`~opdcells.config.TrainConfig`) and the run's
    facts: what the model really is (init, model_info), the task, the data it was trained on (geometry,
    preprocessing, dataset fingerprint, split digest), the training record and versions."""
    size = int(dataset.out_size)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "train_config": settings.to_dict(),
        # ---- the run's facts
        "model": settings.model,
        "model_file": _learner_class(settings.model).file_name,
        "init": info.get("init"),
        "model_info": info,
        "task": task.name,
        "task_definition": task.to_dict(),
        "class_names": list(task.classes),
        "class_members": _class_members(task, dataset.class_names),
        "dataset_class_names": [str(c) for c in dataset.class_names],
        "input_shape": [size, size, 1],
        "input_size": info.get("input_size", settings.input_size),   # as built (DINOv2 rounds to patches)
        "pixel_size_um": float(dataset.pixel_size_um),
        "out_size": size,
        "preprocess": {k: v.item() if isinstance(v, np.generic) else v for k, v in dataset.settings.items()},
        "normalisation": normalisation,
        "dataset": {"path": str(Path(dataset.path).resolve()), "fingerprint": dataset.fingerprint,
                    "n_maps": len(dataset)},
        "split": {"seed": split_seed, "test_size": test_size, "val_size": val_size, "sizes": split.sizes,
                  "file": "split.json", "test_rows_sha256": rows_digest(dataset, split.test)},
        "training": {"epochs_run": len(history.get("loss", [])),  # boosting iterations for features
                     "best_epoch": _best_epoch(history),
                     "epoch_unit": "boosting iteration" if settings.model == FEATURES else "epoch",
                     "class_weight": {task.classes[k]: w for k, w in class_weight.items()},
                     "final": _history_summary(history),
                     "time_s": round(train_time_s, 3)},
        "versions": versions(),
    }


def _checked_split(ds, y_all, split: Split) -> Split:
    """``split`` if its indices are maps of the task's classes and its parts share no group."""
    split.check_disjoint(ds.groups)
    used = np.concatenate([split.train, split.val, split.test])
    if np.any(y_all[used] < 0):
        raise ValueError("the split holds maps of classes outside the task")
    return split


def labelled_subset(split: Split, train_indices, groups=None) -> Split:
    """``split`` with its training maps cut down to ``train_indices`` (label-efficiency runs).

    Parameters
    ----------
    split : Split
        The full split.
    train_indices : array of int
        A non-empty subset of ``split.train``.
    groups : array of str, shape (N_maps,), optional
        Every dataset map's acquisition group: updates the training part's group list.

    Returns
    -------
    Split
        The same validation and test parts, the subset as training part.

    Raises
    ------
    ValueError
        ``train_indices`` is empty or not a subset of ``split.train``.
    """
    sub = np.unique(np.asarray(train_indices, dtype=np.int64))
    if sub.size == 0 or not np.isin(sub, split.train).all():
        raise ValueError("train_indices must be a non-empty subset of the split's training maps")
    names = dict(split.groups)
    if groups is not None:
        names["train"] = sorted({str(g) for g in np.asarray(groups)[sub]})
    return Split(sub, split.val, split.test, seed=split.seed, groups=names)


def _create_learner(settings: TrainConfig, dataset, split: Split, n_classes: int):
    """(untrained learner, normalisation record: scale in nm and where it came from)."""
    if settings.model == FEATURES:
        return _FeaturesLearner.create(settings, n_classes, dataset.pixel_size_um), {"norm_scale_nm": None,
                                                                                     "method": None}
    size = dataset.out_size
    if settings.crop_px and settings.crop_px > size:
        raise ConfigError(dataset.path, f"crop_px {settings.crop_px} does not fit its {size} px maps")
    norm = _normalisation(settings, dataset, split)
    log.info("normalisation scale %.1f nm (%s)", norm["norm_scale_nm"], norm["method"])
    kind = _FusedLearner if settings.fusion == FEATURES else _KerasLearner
    learner = kind.create(settings, n_classes, (size, size, 1), norm["norm_scale_nm"], dataset.pixel_size_um)
    from .models import saved_encoder_config

    saved = saved_encoder_config(settings.model, settings.weights)
    warning = geometry_warning(saved, dataset.pixel_size_um, size, settings.input_size,
                               f"the {settings.model} encoder ({settings.weights})", crop_px=settings.crop_px)
    if warning:
        log.warning("%s", warning)
        learner.info["geometry_warning"] = warning   # recorded in config.json's model_info
    return learner, norm


def geometry_warning(encoder_config: dict | None, pixel_size_um: float, out_size: int,
                     input_size: int | None = None, what: str = "the pretrained encoder", *,
                     crop_px: int | None = None) -> str | None:
    """A loud sentence when a pretrained encoder is used at another pixel size or window than it was
    pretrained at, or None when they match (or the encoder config does not say).

    The model resizes its maps to ``input_size``, so what the encoder sees is the window (map side in um)
    per input pixel: another window makes cells look bigger or smaller to it; the same window at a
    coarser pixel size keeps their size but loses detail.

    Parameters
    ----------
    encoder_config : dict or None
        The encoder folder's config.json (``models.saved_encoder_config``): ``pixel_size_um``,
        ``out_size``, ``input_size``.
    pixel_size_um, out_size : float, int
        The maps it is used on.
    input_size : int, optional
        The side the model resizes them to (default: the encoder's own).
    what : str
        How to name the encoder in the sentence.
    crop_px : int, optional
        The centre crop (px) the model takes of each map before the resize (``TrainConfig.crop_px``): the
        window it sees is the crop's.

    Returns
    -------
    str or None
        The warning, or None.
    """
    out_size = int(crop_px or out_size)
    if not encoder_config or not encoder_config.get("pixel_size_um") or not encoder_config.get("out_size"):
        return None
    px0, size0 = float(encoder_config["pixel_size_um"]), int(encoder_config["out_size"])
    input0 = int(encoder_config.get("input_size") or size0)
    input_size = int(input_size or input0)
    if math.isclose(px0, pixel_size_um, rel_tol=1e-3) and size0 == int(out_size):
        return None
    scale = (size0 * px0 / input0) / (out_size * pixel_size_um / input_size)   # apparent size ratio
    same_size = math.isclose(scale, 1, rel_tol=1e-3)
    effect = ("cells keep their size but are sampled at another pixel size" if same_size
              else f"cells look {scale:.2g}x the size it learnt them at")
    used = "centre crops" if crop_px else "maps"
    return (f"{what} was pretrained on {size0} px maps at {px0:g} um/px (a {size0 * px0:g} um window) but is "
            f"used on {out_size} px {used} at {pixel_size_um:g} um/px (a {out_size * pixel_size_um:g} um "
            f"window): {effect}, so its features may not apply; to use it as pretrained, ingest the exports "
            f"at its geometry (load_data.py --out-pixel-size-um {px0:g} --out-size {size0})")


def _normalisation(settings: TrainConfig, dataset, split: Split) -> dict:
    """Scale the model divides OPD by: a pretrained encoder's own (its features expect it), otherwise
    the 99th percentile of |OPD| over cell pixels of the training maps."""
    from .models import saved_encoder_config

    if settings.norm_scale_nm is not None:
        return {"norm_scale_nm": float(settings.norm_scale_nm),
                "method": "x / norm_scale_nm inside the model; given in the training config"}
    saved = saved_encoder_config(settings.model, settings.weights)
    if settings.model_kw.get("dinov2_preset"):
        saved = None    # a DINOv2 preset, if it loads, replaces the weights and has no OPD scale of its own
    if saved is not None and saved.get("norm_scale_nm"):
        return {"norm_scale_nm": float(saved["norm_scale_nm"]),
                "method": "x / norm_scale_nm inside the model; the pretrained encoder's own scale"}
    return {"norm_scale_nm": estimate_norm_scale(dataset, split.train, seed=settings.seed),
            "method": "x / norm_scale_nm inside the model; 99th percentile of |OPD| over cell pixels of "
                      "training maps"}


def _output_of_this_worker(out: Path, config: TrainConfig) -> Path:
    """``out`` on the worker that writes the outputs; a temporary folder on the other workers of a cluster
    (they train in step with it and must not write the same folder)."""
    from .distribute import is_chief

    if config.distribute == "none" or is_chief():
        return out
    scratch = Path(tempfile.mkdtemp(prefix="opdcells-worker-")) / out.name
    log.info("this worker is not the chief: its copy of the model goes to %s", scratch)
    return scratch


def calibrate_on_validation(model: SavedModel, dataset, y_all, split: Split, folder: Path, *,
                            groups=None, seed: int = 0, proba=None) -> dict | None:
    """Calibrate a freshly trained model on its validation groups (:func:`opdcells.calibration.calibrate`).

    Writes ``validation_scores.npz`` (so screening can set operating points for other targets and rates)
    and ``reliability.png`` into ``folder``.

    Parameters
    ----------
    model : SavedModel
        The trained model (its folder may still be the staging folder).
    dataset : OPDDataset
        The dataset it was trained on.
    y_all : array of int, shape (N_maps,)
        Task label of every dataset map (-1 outside the task).
    split : Split
        The run's split; its validation maps are used.
    folder : pathlib.Path
        Where the scores and the figure go.
    groups : array of str, shape (N_maps,), optional
        Every map's acquisition group (default the dataset's).
    seed : int
        Seed of the bootstrap.
    proba : array of float, shape (N_val, K), optional
        The model's probabilities of the validation maps, when already predicted.

    Returns
    -------
    dict or None
        The calibration record for config.json; None (logged) without validation maps.
    """
    from . import calibration, plots

    if len(split.val) == 0:
        log.info("no validation maps: the model is not calibrated (screening needs a calibrated model)")
        return None
    proba = model.predict_dataset(dataset, split.val) if proba is None else proba
    groups = np.asarray(dataset.groups if groups is None else groups)[split.val]
    labels = y_all[split.val]
    record = calibration.calibrate(proba, labels, model.class_names, groups=groups, seed=seed)
    calibration.save_validation_scores(folder, proba, labels, groups)
    plots.reliability_diagram(record, folder / "reliability.png", title=f"{model.name}: calibration on the "
                                                                        "validation groups")
    point = record["operating_point"]
    log.info("calibrated on %d validation maps: temperature %.2f, ECE %.3f -> %.3f%s", record["n_maps"],
             record["temperature"], record["ece_before"], record["ece_after"],
             "" if point is None else f"; {', '.join(record['targets'])} at FPR {point['fpr']:g}: threshold "
             f"{point['threshold']:.3g}, sensitivity {point['sensitivity']:.2f}"
             + (" (extrapolated)" if point["extrapolated"] else ""))
    return record


def fuse_on_validation(model: SavedModel, dataset, y_all, split: Split) -> tuple[dict, np.ndarray | None]:
    """Choose a fused model's deep weight on its validation groups
    (:func:`opdcells.learners.choose_deep_weight`) and set it on ``model.learner``.

    The features part's probabilities of the validation maps are those of the fit that did not see them
    when it was fit again on them (``TrainConfig.refit``).

    Parameters
    ----------
    model : SavedModel
        A freshly trained fused model (``fusion: features``).
    dataset : OPDDataset
        The dataset it was trained on.
    y_all : array of int, shape (N_maps,)
        Task label of every dataset map (-1 outside the task).
    split : Split
        The run's split; its validation maps are used.

    Returns
    -------
    (dict, numpy.ndarray or None)
        config.json ``fusion`` (the rule, the weight, the weights tried with their validation balanced
        accuracy, each part's and the fusion's validation accuracy, the features part's model info) and
        the fused validation probabilities (N_val, K) (None without validation maps: the weight is 0.5).
    """
    from .config import FUSION_DEEP_WEIGHTS

    learner = model.learner
    record = {"parts": [model.config["model"], FEATURES], "features_file": _FeaturesLearner.file_name,
              "rule": "weighted mean of the class probabilities: deep_weight x the deep part (with its "
                      "test-time augmentation) + (1 - deep_weight) x the features model",
              "weights_tried": list(FUSION_DEEP_WEIGHTS),
              "features_model_info": learner.features_part.info,
              "features_iterations": int(learner.features_part.estimator.n_iter_)}
    if len(split.val) == 0:
        learner.deep_weight = 0.5
        log.info("no validation maps: the fused model takes the plain mean of its parts")
        return {**record, "deep_weight": 0.5, "chosen_by": "no validation maps: the plain mean",
                "validation": None}, None
    parts = model.predict_dataset_parts(dataset, split.val)
    if learner.features_part.held_out_validation is not None:   # refit: the fit that never saw them
        parts["p_features"] = learner.features_part.held_out_validation
    y = y_all[split.val]
    learner.deep_weight, grid = choose_deep_weight(parts["p_deep"], parts["p_features"], y)
    fused = learner.fuse(**parts)
    validation = {"deep": _accuracies(parts["p_deep"], y), "features": _accuracies(parts["p_features"], y),
                  "fused": _accuracies(fused, y), "balanced_accuracy_by_weight": grid, "n_maps": len(y)}
    log.info("fusion: deep weight %.2f on %d validation maps (balanced accuracy by weight %s); validation "
             "accuracy deep part %.3f, features %.3f, fused %.3f", learner.deep_weight, len(y), grid,
             *(validation[part]["accuracy"] for part in ("deep", "features", "fused")))
    return {**record, "deep_weight": learner.deep_weight,
            "chosen_by": "best balanced accuracy on the validation groups (ties: nearest 0.5)",
            "validation": validation}, fused


def _accuracies(proba, y) -> dict:
    """Accuracy and balanced accuracy of probabilities (N, K) against labels (N,)."""
    from sklearn.metrics import balanced_accuracy_score

    pred = np.asarray(proba).argmax(axis=1)
    return {"accuracy": float(np.mean(pred == y)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred))}


def _write_model_folder(folder: Path, learner, config: dict, history: dict, split: Split) -> None:
    """The model file, config.json, history.csv and split.json (metrics.json comes after evaluation)."""
    learner.save(folder)
    write_json(folder / "config.json", config)
    write_history(folder / "history.csv", history)
    split.to_json(folder / "split.json")


def train(data, model: str | None = None, task: str | Task | None = None, out=None, *,
          config: TrainConfig | None = None, profile: str = "quick", split: Split | None = None,
          train_indices=None, verbose=0, n_boot: int = 1000, saved_models=None, calibrate: bool = True,
          ood: bool = True, features_cache=None, **settings) -> TrainResult:
    """Train a model for a task on a dataset and write its folder (model, config.json, history.csv,
    metrics.json, split.json).

    Every setting is a field of :class:`~opdcells.config.TrainConfig`: give the whole ``config``, or let
    :meth:`TrainConfig.from_profile` make it from ``model``, ``profile`` and the ``settings`` overrides
    (None: the default). The config is saved as config.json ``train_config`` beside the run's facts.

    Parameters
    ----------
    data : str, os.PathLike or OPDDataset
        The dataset.
    model : str, optional
        A name of ``config.MODEL_NAMES`` (default ``config.model``, else mobilenetv2).
    task : str or Task, optional
        What :func:`opdcells.tasks.resolve_task` reads (default ``config.task``; None: five_class when the
        dataset has the five reference classes, else every class); stored as ``task_definition``.
    out : str or os.PathLike, optional
        Model folder (default ``saved_models/<model>_<task>``), replaced atomically.
    config : TrainConfig, optional
        The settings; ``settings`` overrides then replace its fields.
    profile : str
        Profile of the defaults when no ``config`` is given.
    split : Split, optional
        Use this split (dataset indices) instead of making one from the config's split fields.
    train_indices : array of int, optional
        Train on these maps only, a subset of the split's training maps (label-efficiency runs).
    verbose : int
        Passed to Keras (0 silent, 1 progress bar, 2 one line per epoch).
    n_boot : int
        Bootstrap resamples of the test metrics' confidence intervals.
    saved_models : str or os.PathLike, optional
        The saved_models folder of the default ``out``.
    calibrate, ood : bool
        Calibrate the model on the validation maps, fit its out-of-distribution detector (default both;
        off for a run read only for its test predictions, such as a label-efficiency point, whose
        ``config.json`` then records None for them: the class predicted is the same).
    features_cache : str or os.PathLike, optional
        Folder of :class:`opdcells.learners.FeaturesCache`: the features model (``model="features"``, or
        the features part of a fused model) is fit once per dataset content, split and settings, and
        re-used by every later run that would fit the same one.
    **settings
        Fields of :class:`TrainConfig` (epochs, weights, learning_rate, test_groups, ...).

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        An unknown setting or a value of the wrong type.
    RegistryError
        A pretrained encoder that is not registered, missing or corrupt.
    DatasetError, TaskError
        An unusable dataset or task.
    """
    import keras

    if config is None:
        config = TrainConfig.from_profile(model or "mobilenetv2", profile, **settings)
    else:
        if model is not None and resolve_alias(model, config.weights)[0] != config.model:
            raise ConfigError("<arguments>", f"model {model!r} contradicts the config's {config.model!r}")
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ConfigError("<arguments>", f"unknown TrainConfig field {', '.join(unknown)}")
        if "augment" in settings:   # True/False/AugmentConfig as from_profile takes it
            settings["augment"] = augment_dict(settings["augment"])
        config = config.replace(**{k: v for k, v in settings.items() if v is not None or k == "augment"})
    if task is None:
        task = config.task
    elif config.task is None or isinstance(task, str):
        config = config.replace(task=task if isinstance(task, str) else task.name)
    seed, split_seed = config.seed, config.resolved_split_seed
    test_size, val_size = config.test_size, config.val_size
    keras.utils.set_random_seed(seed)
    with opened(data) as ds:
        task = resolve_task(task, ds.class_names, ds.labels)
        y_all = task_labels(ds, task)
        if split is not None:   # the caller's split: record its own seed, not sizes it was not made with
            split = _checked_split(ds, y_all, split)
            split_seed, test_size, val_size = split.seed, None, None
        else:
            split = make_split(ds, task, seed=split_seed, test_size=test_size, val_size=val_size,
                               test_groups=config.test_groups, val_groups=config.val_groups,
                               split_by=config.split_by, group_pattern=config.group_pattern)
        n_train_full = len(split.train)
        if train_indices is not None:
            split = labelled_subset(split, train_indices, ds.groups)
        class_weight = _class_weights(y_all[split.train], len(task.classes), config.class_weight)
        run = f"{model or config.model}_{task.name}"   # the alias's name (opd_mobilenetv2) if given
        out = Path(out) if out is not None else saved_models_root(saved_models) / run
        log.info("training %s for %s on %s: %s maps (train/val/test)", config.model, task.name, ds.path,
                 split.sizes)
        learner, normalisation = _create_learner(config, ds, split, len(task.classes))
        if features_cache is not None and hasattr(learner, "cache"):
            learner.cache = FeaturesCache(features_cache)
        out = _output_of_this_worker(out, config)
        with staging(out) as folder:
            start = time.perf_counter()
            history = learner.fit(ds, split, y_all, config, class_weight, verbose)
            record = _make_config(name=out.name, settings=config, task=task, dataset=ds, split=split,
                                  split_seed=split_seed, test_size=test_size, val_size=val_size,
                                  info=learner.info, normalisation=normalisation, class_weight=class_weight,
                                  history=history, train_time_s=time.perf_counter() - start)
            record["split"]["train_subset"] = None if train_indices is None else {
                "n_labelled": len(split.train), "of": n_train_full}
            groups = dataset_groups(ds, config.group_pattern)
            record["dataset"].update(dataset_origin(ds))   # simulated / measured, from the sources
            record["split"].update(by=split.by, group_pattern=config.group_pattern, warning=split.warning)
            val_proba, record["fusion"] = None, None   # None: the model is one learner
            if isinstance(learner, _FusedLearner):
                fitted = SavedModel(folder, record, learner)
                record["fusion"], val_proba = fuse_on_validation(fitted, ds, y_all, split)
            if val_proba is None:   # a refit features model: its validation maps as the first fit saw them
                val_proba = getattr(learner, "held_out_validation", None)
            record["calibration"] = calibrate_on_validation(
                SavedModel(folder, record, learner), ds, y_all, split, folder, groups=groups, seed=seed,
                proba=val_proba) if calibrate else None
            record["ood"] = fit_for_model(folder, learner, ds, split, seed=seed) if ood else None   # ood.npz
            _write_model_folder(folder, learner, record, history, split)
            evaluation = evaluate_model(SavedModel(folder, record, learner), ds, split.test, n_boot=n_boot,
                                        seed=seed, groups=groups)
            evaluation.report["warnings"] += [split.warning] if split.warning else []
            evaluation.report["baselines"] = baseline_summary(ds, y_all, split, task, n_boot=n_boot,
                                                              seed=seed)
            write_json(folder / "metrics.json", evaluation.report)
    log.info("saved %s (test accuracy %.3f)", out, evaluation.report["accuracy"]["value"])
    return TrainResult(out, history, evaluation.report, record, SavedModel(out, record, learner), evaluation)
