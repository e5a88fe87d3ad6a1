"""Train, save, load and evaluate classifiers of OPD maps: deep Keras models and the features baseline.

One folder per trained model (``saved_models/RUN/``)::

    model.keras | model.skops    the fitted model (Keras, or the scikit-learn features baseline)
    config.json                  everything needed to use and judge it (see ``_make_config``)
    history.csv                  per-epoch (per boosting iteration for ``features``) losses and accuracy
    metrics.json                 classification_report on the held-out test groups
    split.json                   train/val/test map indices (by acquisition group), seed, groups

Deep models and the ``features`` baseline share every step (task targets, group split, class
weights, config, evaluation, loading); only fitting and ``predict_proba`` differ (``_KerasLearner``,
``_FeaturesLearner``).

Model folders are data, never code: ``model.keras`` is loaded with Keras' ``safe_mode`` (no Python
lambdas; classes only from Keras and opdcells' registered layers), the features baseline is a skops
file loaded with an explicit list of trusted types (``FEATURES_TRUSTED_TYPES``), and pickles
(``model.joblib`` of model format 2 and older) are refused. A run name is looked up only in one
``saved_models/`` folder (:func:`saved_models_root`), never in the current directory by surprise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .config import (
    FEATURES,
    PRETRAINED_HEAD_EPOCHS,  # noqa: F401 - re-exported
    PRETRAINED_LEARNING_RATE,  # noqa: F401 - re-exported
    PROFILES,
    TTA_DIHEDRAL,
    AugmentConfig,
    Profile,
    TrainConfig,
    augment_dict,
    resolve_alias,
)
from .dataset import open_dataset
from .errors import ConfigError, DatasetError, OPDCellsError, SplitError, one_line, safe_text
from .evaluate import classification_report
from .ood import fit_for_model
from .pipeline import dihedral_views, make_tf_dataset
from .simulate import dataset_origin
from .splits import Split, dataset_groups, group_split, map_split, named_split
from .tasks import Task, TaskError, class_key, resolve_task, task_targets

log = logging.getLogger(__name__)

FORMAT = "opdcells-model"
#: 2: config["test_time_augmentation"]; 3: features model in model.skops, not a pickle; 4: the settings are
#: config["train_config"] (``config.TrainConfig``), the other keys the run's facts
FORMAT_VERSION = 4
#: Oldest model format this opdcells loads for the ``features`` baseline (older ones are pickles).
FEATURES_MIN_FORMAT = 3
#: The one folder where run names live by default: the repository's ``saved_models/``.
REPOSITORY_MODELS = Path(__file__).resolve().parents[1] / "saved_models"
#: Environment variable naming the ``saved_models/`` folder instead (``--saved-models`` wins over it).
SAVED_MODELS_ENV = "OPDCELLS_SAVED_MODELS"
#: The only types a ``features`` model.skops may hold beyond skops' own safe defaults (numpy, builtins and
#: the scikit-learn estimators skops vets): the fitted trees of HistGradientBoostingClassifier.
FEATURES_TRUSTED_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)
#: Model files that are pickles (running code when loaded): refused in model folders.
PICKLE_FILES = ("model.joblib", "model.pkl", "model.pickle")
FILES = ("config.json", "history.csv", "metrics.json", "split.json")
POSITIVE_CLASS = "cancer"   # sensitivity at low FPR is reported for this class in binary tasks
DEFAULT_AUGMENT = AugmentConfig()   # noqa: F401 - re-exported

__all__ = ["PROFILES", "Profile", "TrainConfig", "TrainResult", "SavedModel", "Evaluation", "ModelError",
           "train", "load_model", "evaluate_model", "stored_test_indices", "write_results",
           "predictions_table", "estimate_norm_scale", "make_split", "task_labels",
           "resolve_model_dir", "saved_models_root"]


class ModelError(OPDCellsError, OSError):
    """A saved model folder is missing, incomplete or unusable."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        OPDCellsError.__init__(self, str(self))

    def __str__(self) -> str:
        return f"{safe_text(self.path)}: {one_line(self.reason)}"


TTA_CHUNK = 256   # maps whose 8 views are predicted together


# --------------------------------------------------------------------------------------------- data


@contextlib.contextmanager
def _opened(data):
    """The dataset ``data``: opened here (and closed after) when it is a path."""
    if isinstance(data, (str, os.PathLike)):
        with open_dataset(data) as ds:
            yield ds
    else:
        yield data


def task_labels(dataset, task: Task) -> np.ndarray:
    """Task label id of every map of ``dataset`` (-1 for maps of classes outside the task)."""
    idx, y = task_targets(dataset.class_names, dataset.labels, task)
    y_all = np.full(len(dataset), -1, dtype=np.int64)
    y_all[idx] = y
    return y_all


def make_split(dataset, task: Task, *, seed: int = 0, test_size: float = 0.2, val_size: float = 0.15,
               test_groups=None, val_groups=None, split_by: str = "group", group_pattern: str | None = None
               ) -> Split:
    """Group split of the task's maps, as indices into the dataset: ``splits.group_split`` with the
    fractions, or ``splits.named_split`` when ``test_groups`` (and optionally ``val_groups``) are named.
    ``group_pattern``: groups from the source file names (``splits.groups_from_pattern``) instead of the
    dataset's; ``split_by="map"``: ``splits.map_split`` (session effects untested, warned and recorded).
    SplitError (one line, naming the dataset) when no group split exists."""
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


def iter_maps(dataset, indices, batch_size: int = 256):
    """Yield ``dataset`` maps ``indices`` as float32 (n, S, S) batches (bounded memory)."""
    indices = np.asarray(indices, dtype=np.int64)
    for start in range(0, len(indices), batch_size):
        yield dataset.read(indices[start:start + batch_size])


def estimate_norm_scale(dataset, indices, *, percentile: float = 99.0, max_maps: int = 512,
                        seed: int = 0) -> float:
    """Normalisation scale in nm: the ``percentile`` of |OPD| over the cell (non-zero) pixels of
    (up to ``max_maps`` randomly chosen of) the maps ``indices`` -- pass the TRAINING maps only."""
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


def _class_weights(y_train, n_classes: int, weighting: str = "balanced") -> dict[int, float]:
    """Weight of every class: 'balanced' (inverse training frequency, scikit-learn's) or 1 ('none')."""
    from sklearn.utils.class_weight import compute_class_weight

    if weighting == "none":
        return dict.fromkeys(range(n_classes), 1.0)
    present = np.unique(y_train)
    weights = compute_class_weight("balanced", classes=present, y=y_train)
    out = dict.fromkeys(range(n_classes), 1.0)
    out.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return out


# --------------------------------------------------------------------------------------------- learners


class _KerasLearner:
    """A Keras model from ``opdcells.models.build_model`` (normalisation and resizing inside)."""

    file_name = "model.keras"

    def __init__(self, model, info: dict, strategy=None, build=None):
        self.model = model
        self.info = info
        self.strategy = strategy   # a tf.distribute strategy other than the default, or None
        self._build = build        # () -> (model, info): the same model outside any strategy

    @classmethod
    def create(cls, settings: TrainConfig, n_classes: int, input_shape, norm_scale_nm: float):
        from .distribute import make_strategy, resolve
        from .models import build_model

        def build():
            return build_model(settings.model, n_classes, input_shape=tuple(input_shape),
                               input_size=settings.input_size, weights=settings.weights,
                               norm_scale_nm=norm_scale_nm, seed=settings.seed, **settings.build_kw)

        if resolve(settings.distribute) == "none":
            return cls(*build())
        strategy = make_strategy(settings.distribute)
        log.info("training on %d replicas (%s)", strategy.num_replicas_in_sync, type(strategy).__name__)
        with strategy.scope():
            model, info = build()
        return cls(model, dict(info), strategy, build)

    def fit(self, dataset, split: Split, y_all, settings: TrainConfig, class_weight, verbose) -> dict:
        import keras

        def stream(indices, training):
            return make_tf_dataset(dataset, indices, y_all[indices], batch_size=settings.batch_size,
                                   training=training, augment=settings.augment_config, seed=settings.seed)

        has_val = len(split.val) > 0
        monitor = "val_loss" if has_val else "loss"
        train_stream, val_stream = stream(split.train, True), stream(split.val, False) if has_val else None

        from .recipe import build_optimizer, classification_loss, steps_per_epoch

        def run(epochs, callbacks, schedule="constant"):
            def optimizer():   # the recipe (opdcells.recipe): AdamW, warm-up + cosine
                return build_optimizer(settings, epochs=epochs, schedule=schedule,
                                       steps_per_epoch=steps_per_epoch(len(split.train), settings.batch_size))
            if self.strategy is not None:
                return self._run_distributed(optimizer, epochs, callbacks, train_stream, val_stream, settings,
                                             class_weight)
            self.model.compile(optimizer=optimizer(), loss=classification_loss(settings.label_smoothing),
                               metrics=["accuracy"])
            return self.model.fit(train_stream, epochs=epochs, validation_data=val_stream,
                                  class_weight=class_weight, callbacks=callbacks, verbose=verbose,
                                  shuffle=False).history   # the stream shuffles every epoch itself

        from .models import batch_norm_layers

        encoder = self.model.get_layer("encoder")
        history = {}
        if settings.head_epochs > 0:   # linear probe, then fine-tune (LP-FT, Kumar et al. 2022)
            encoder.trainable = False
            history = run(settings.head_epochs, [keras.callbacks.TerminateOnNaN()])
            encoder.trainable = True
        if settings.freeze_batchnorm:
            for layer in batch_norm_layers(encoder):
                layer.trainable = False   # Keras 3: a frozen BatchNormalization runs in inference mode
        callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=settings.patience,
                                                   restore_best_weights=True),
                     keras.callbacks.TerminateOnNaN()]
        tuned = run(settings.epochs, callbacks, settings.lr_schedule)
        if self.strategy is not None:
            self._leave_strategy()
        return {k: [float(v) for v in history.get(k, [])] + [float(v) for v in values]
                for k, values in tuned.items()}

    def _run_distributed(self, make_optimizer, epochs, callbacks, train_stream, val_stream, settings,
                         class_weight):
        """One phase of training under ``self.strategy`` (:func:`opdcells.distribute.fit_distributed`: the
        same loss, optimizer and early stopping as ``model.fit``, which Keras 3 cannot run there)."""
        import keras

        from .distribute import fit_distributed

        patience = next((c.patience for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
        with self.strategy.scope():
            optimizer = make_optimizer()
        return fit_distributed(self.strategy, self.model, optimizer, train_stream, val_stream, epochs=epochs,
                               global_batch=settings.batch_size, class_weight=class_weight, patience=patience)

    def _leave_strategy(self) -> None:
        """Copy the trained weights into the same model built outside the strategy (Keras predicts and saves
        a model of a multi-worker strategy no better than it fits it)."""
        trainable = {layer.name: layer.trainable for layer in self.model.layers}
        weights = self.model.get_weights()
        self.model, _ = self._build()
        for layer in self.model.layers:
            layer.trainable = trainable.get(layer.name, layer.trainable)
        self.model.set_weights(weights)
        self.strategy = None

    def predict_proba(self, maps, batch_size: int = 64) -> np.ndarray:
        return np.asarray(self.model.predict(maps[..., None], batch_size=batch_size, verbose=0))

    def predict_indices(self, dataset, indices, batch_size: int = 64) -> np.ndarray:
        stream = make_tf_dataset(dataset, indices, None, batch_size=batch_size, training=False)
        return np.asarray(self.model.predict(stream, verbose=0))

    def save(self, folder: Path) -> None:
        self.model.save(folder / self.file_name)

    @classmethod
    def load(cls, folder: Path, config: dict):
        import keras

        from . import models  # noqa: F401 - registers opdcells' layers (and keras_hub's) for loading

        # predicting only; safe_mode refuses Python lambdas and other code stored in the file
        model = keras.saving.load_model(folder / cls.file_name, compile=False, safe_mode=True)
        return cls(model, config.get("model_info", {}))


class _FeaturesLearner:
    """OPD morphology features (``opdcells.features.feature_matrix``) + HistGradientBoostingClassifier."""

    file_name = "model.skops"

    def __init__(self, estimator, pixel_size_um: float, info: dict, feature_names=None):
        self.estimator = estimator
        self.pixel_size_um = pixel_size_um
        self.info = info
        self.feature_names = feature_names

    @classmethod
    def create(cls, settings: TrainConfig, n_classes: int, pixel_size_um: float):
        from sklearn.ensemble import HistGradientBoostingClassifier

        estimator = HistGradientBoostingClassifier(
            max_iter=settings.epochs, learning_rate=settings.learning_rate, early_stopping=True,
            n_iter_no_change=settings.patience, random_state=settings.seed)
        info = {"architecture": FEATURES, "init": "none (hand-crafted features)", "weights_source": None,
                "estimator": "HistGradientBoostingClassifier"}
        return cls(estimator, pixel_size_um, info)

    def features(self, maps) -> np.ndarray:
        from .features import feature_matrix

        x, names = feature_matrix(maps, self.pixel_size_um)
        if self.feature_names is None:
            self.feature_names = list(names)
        elif list(names) != list(self.feature_names):
            raise ValueError(f"opdcells.features now computes {names}; the model was fit on "
                             f"{self.feature_names}")
        return x

    def dataset_features(self, dataset, indices) -> np.ndarray:
        blocks = [self.features(maps) for maps in iter_maps(dataset, indices)]
        return np.concatenate(blocks) if blocks else np.empty((0, 0))

    def fit(self, dataset, split: Split, y_all, settings: TrainConfig, class_weight, verbose) -> dict:
        w = np.array([class_weight[k] for k in sorted(class_weight)])
        x_train, y_train = self.dataset_features(dataset, split.train), y_all[split.train]
        val = {}
        if len(split.val):
            x_val, y_val = self.dataset_features(dataset, split.val), y_all[split.val]
            val = {"X_val": x_val, "y_val": y_val, "sample_weight_val": w[y_val]}
        self.estimator.fit(x_train, y_train, sample_weight=w[y_train], **val)
        history = {"loss": [-float(s) for s in self.estimator.train_score_[1:]],
                   "accuracy": _staged_accuracy(self.estimator, x_train, y_train)}
        if val:
            history["val_loss"] = [-float(s) for s in self.estimator.validation_score_[1:]]
            history["val_accuracy"] = _staged_accuracy(self.estimator, val["X_val"], val["y_val"])
        log.info("features model: %d boosting iterations", self.estimator.n_iter_)
        return history

    def predict_proba(self, maps, batch_size: int = 64) -> np.ndarray:
        return self.estimator.predict_proba(self.features(maps))

    def predict_indices(self, dataset, indices, batch_size: int = 256) -> np.ndarray:
        return self.estimator.predict_proba(self.dataset_features(dataset, indices))

    def save(self, folder: Path) -> None:
        import skops.io

        skops.io.dump({"estimator": self.estimator, "feature_names": list(self.feature_names or []),
                       "pixel_size_um": float(self.pixel_size_um)}, folder / self.file_name)

    @classmethod
    def load(cls, folder: Path, config: dict):
        """Load ``model.skops`` trusting only ``FEATURES_TRUSTED_TYPES`` (skops never unpickles)."""
        import skops.io
        from sklearn.ensemble import HistGradientBoostingClassifier

        path = folder / cls.file_name
        untrusted = sorted(set(skops.io.get_untrusted_types(file=path)) - set(FEATURES_TRUSTED_TYPES))
        if untrusted:
            raise ModelError(path, "holds types opdcells does not trust, refusing to load it: "
                                   + ", ".join(untrusted[:5]))
        saved = skops.io.load(path, trusted=list(FEATURES_TRUSTED_TYPES))
        estimator = saved.get("estimator") if isinstance(saved, dict) else None
        if not isinstance(estimator, HistGradientBoostingClassifier):
            raise ModelError(path, "is not an opdcells features model (a dict with a "
                                   "HistGradientBoostingClassifier)")
        return cls(saved["estimator"], float(saved["pixel_size_um"]), config.get("model_info", {}),
                   list(saved["feature_names"]))


def _staged_accuracy(estimator, x, y) -> list[float]:
    return [float(np.mean(p.argmax(axis=1) == y)) for p in estimator.staged_predict_proba(x)]


def _learner_class(model: str):
    return _FeaturesLearner if model == FEATURES else _KerasLearner


# --------------------------------------------------------------------------------------------- saved model


class SavedModel:
    """A trained model folder, loaded: ``predict_proba(maps)``, ``class_names``, ``config``."""

    def __init__(self, folder: Path, config: dict, learner):
        self.folder = Path(folder)
        self.config = config
        self.learner = learner

    def __repr__(self) -> str:
        cfg = self.config
        return f"SavedModel({str(self.folder)!r}, model={cfg['model']!r}, task={cfg['task']!r})"

    @property
    def name(self) -> str:
        return self.config.get("name") or self.folder.name

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def task(self) -> Task:
        """The model's task: config ``task_definition`` (names, grouping, label ids), or for models saved
        before it was stored, the reference task named by config ``task``."""
        definition = self.config.get("task_definition")
        return Task.from_dict(definition) if definition else resolve_task(self.config["task"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config["input_shape"])

    @property
    def preprocess_config(self):
        """PreprocessConfig that makes maps like the training maps (for new exports)."""
        from .preprocess import PreprocessConfig

        return PreprocessConfig.from_settings({**self.config.get("preprocess", {}),
                                               "pixel_size_um": self.config["pixel_size_um"],
                                               "out_size": self.config["out_size"]})

    def _check_maps(self, maps) -> np.ndarray:
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim == 4 and maps.shape[-1] == 1:
            maps = maps[..., 0]
        if maps.ndim == 2:
            maps = maps[None]
        if maps.shape[1:] != self.input_shape[:2]:
            raise ValueError(f"model {self.name} takes {self.input_shape[0]}x{self.input_shape[1]} maps at "
                             f"{self.config['pixel_size_um']} um/px, got shape {maps.shape}")
        return maps

    @functools.cached_property
    def train_config(self) -> TrainConfig:
        """The model's training settings: config.json ``train_config`` (read from the old keys of model
        folders of format 3 and older)."""
        return TrainConfig.from_model_config(self.config, self.folder / "config.json")

    @property
    def tta(self) -> bool:
        """Whether the model predicts with test-time augmentation (:attr:`train_config` ``tta``)."""
        return self.train_config.tta

    def uses_tta(self, tta: bool | None = None) -> bool:
        """``tta`` if given, else the model's own setting."""
        return self.tta if tta is None else bool(tta)

    def predict_proba(self, maps, batch_size: int = 64, *, tta: bool | None = None) -> np.ndarray:
        """Class probabilities (N, K) of OPD maps in nm, (N, S, S) or (N, S, S, 1), at the model's
        pixel size and map size (``config['pixel_size_um']``, ``config['out_size']``). ``tta``: mean
        over the map's 8 rotations and reflections (default: the model's own setting, :attr:`tta`)."""
        maps = self._check_maps(maps)
        if len(maps) == 0:
            return np.empty((0, len(self.class_names)), dtype=np.float32)
        if not self.uses_tta(tta):
            return self.learner.predict_proba(maps, batch_size=batch_size)
        chunks = []
        for start in range(0, len(maps), TTA_CHUNK):   # 8 views of a chunk at a time: bounded memory
            chunk = maps[start:start + TTA_CHUNK]
            proba = self.learner.predict_proba(np.concatenate(dihedral_views(chunk)), batch_size=batch_size)
            chunks.append(proba.reshape(8, len(chunk), -1).mean(axis=0))
        return np.concatenate(chunks)

    def predict_dataset(self, dataset, indices=None, batch_size: int = 64, *,
                        tta: bool | None = None) -> np.ndarray:
        """Class probabilities of maps ``indices`` (default all) of a dataset, read from HDF5 a block at a
        time: streamed through ``opdcells.pipeline`` without test-time augmentation, with it through
        :meth:`predict_proba` (``tta`` as there)."""
        with _opened(dataset) as ds:
            self.check_dataset(ds, need_classes=False)
            indices = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
            if len(indices) == 0:
                return np.empty((0, len(self.class_names)), dtype=np.float32)
            if self.uses_tta(tta):
                return np.concatenate([self.predict_proba(maps, batch_size, tta=True)
                                       for maps in iter_maps(ds, indices, batch_size=TTA_CHUNK)])
            return self.learner.predict_indices(ds, indices, batch_size=batch_size)

    def check_dataset(self, dataset, *, need_classes: bool = True) -> None:
        """Raise DatasetError/TaskError (clear message) if ``dataset`` does not fit this model."""
        with _opened(dataset) as ds:
            cfg = self.config
            fix = "ingest the exports again with the model's settings (or train a model on this dataset)"
            if not math.isclose(ds.pixel_size_um, cfg["pixel_size_um"], rel_tol=1e-6):
                raise DatasetError(ds.path, f"maps are at {ds.pixel_size_um:g} um/px but model {self.name} "
                                            f"expects {cfg['pixel_size_um']:g} um/px; {fix}")
            if ds.out_size != cfg["out_size"]:
                raise DatasetError(ds.path, f"maps are {ds.out_size} px but model {self.name} expects "
                                            f"{cfg['out_size']} px; {fix}")
            if need_classes:
                try:
                    task_targets(ds.class_names, ds.labels, self.task)
                except TaskError as exc:
                    raise TaskError(f"{ds.path}: does not fit model {self.name}: {exc}") from None


def saved_models_root(saved_models=None) -> Path:
    """The ``saved_models/`` folder where run names are looked up and trained runs go by default.

    Parameters
    ----------
    saved_models : str or os.PathLike, optional
        The folder to use (the ``--saved-models`` option).

    Returns
    -------
    pathlib.Path
        ``saved_models`` if given, else ``$OPDCELLS_SAVED_MODELS`` if set, else the repository's
        ``saved_models/`` -- never the current directory's unless configured so.
    """
    if saved_models is not None:
        return Path(saved_models)
    return Path(os.environ[SAVED_MODELS_ENV]) if os.environ.get(SAVED_MODELS_ENV) else REPOSITORY_MODELS


def is_run_name(text: str) -> bool:
    """True for a bare run name (``mnv2``), False for a path (``./mnv2``, ``runs/mnv2``, ``/abs``)."""
    return bool(text) and text not in (".", "..") and not any(
        sep in text for sep in (os.sep, os.altsep) if sep) and not text.startswith("~")


def resolve_model_dir(path, saved_models=None) -> Path:
    """Model folder from a path, or from a run name looked up only in :func:`saved_models_root`.

    A bare name (no path separator) is a run name: ``saved_models_root(saved_models) / name``, even when
    the current directory holds a folder of that name (write ``./name`` to use that one). Anything
    else is a path. Raises ModelError if it is not a model folder.
    """
    text = os.fspath(path)
    if is_run_name(text):
        root = saved_models_root(saved_models)
        folder = root / text
        if (folder / "config.json").is_file():
            return folder
        hint = f"; to use the folder in the current directory write ./{text}" if Path(text).is_dir() else ""
        raise ModelError(path, f"no such run in {root} (the saved_models folder; set it with --saved-models "
                               f"or ${SAVED_MODELS_ENV}){hint}")
    folder = Path(text)
    if (folder / "config.json").is_file():
        return folder
    if folder.is_dir():
        raise ModelError(path, "not a model folder (no config.json)")
    raise ModelError(path, "no such model folder")


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(folder, f"cannot read config.json ({exc})") from None
    if config.get("format") != FORMAT:
        raise ModelError(folder, "config.json is not an opdcells model config")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(folder, f"model format {config['format_version']} is newer than this opdcells "
                                 f"({__version__}); upgrade opdcells")
    if config.get("test_time_augmentation") not in (None, TTA_DIHEDRAL):
        raise ModelError(folder, f"unknown test_time_augmentation {config['test_time_augmentation']!r} in "
                                 f"config.json (this opdcells knows {TTA_DIHEDRAL!r})")
    TrainConfig.from_model_config(config, folder / "config.json")   # ConfigError naming the file if invalid
    return config


def _refuse_pickles(folder: Path, config: dict) -> None:
    """ModelError for a ``features`` folder that holds a pickle or predates model.skops (format 3)."""
    if config.get("model") != FEATURES:
        return
    pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
    old = int(config.get("format_version", 0)) < FEATURES_MIN_FORMAT
    if pickles or old:
        what = pickles[0] if pickles else f"model format {config.get('format_version')}"
        raise ModelError(folder, f"{what} is a pickle, which runs code when loaded; opdcells loads only "
                                 f"model.skops (model format {FEATURES_MIN_FORMAT}): retrain it with "
                                 "`python -m opdcells train --model features --task TASK --data DATASET.h5 "
                                 "--out FOLDER` (seconds) and delete the pickle")


def load_model(path, dataset=None, *, saved_models=None) -> SavedModel:
    """Load a model folder (a path, or a run name in :func:`saved_models_root`).

    With ``dataset`` (path or opened dataset) the model is checked against it: pixel size, map size
    and the task's classes must match, else DatasetError / TaskError says what differs. Only data is
    read from the folder: pickles are refused, Keras models load in ``safe_mode``, the ``features``
    model is a skops file with an explicit list of trusted types.
    """
    folder = resolve_model_dir(path, saved_models)
    config = _read_config(folder)
    _refuse_pickles(folder, config)
    learner_cls = _learner_class(config["model"])
    if not (folder / learner_cls.file_name).is_file():
        raise ModelError(folder, f"missing {learner_cls.file_name}")
    try:
        learner = learner_cls.load(folder, config)
    except OPDCellsError:
        raise
    except Exception as exc:  # noqa: BLE001 - Keras/joblib raise many kinds
        reason = f"cannot load {learner_cls.file_name} ({type(exc).__name__}: {exc})"
        raise ModelError(folder, reason) from exc
    saved = SavedModel(folder, config, learner)
    if dataset is not None:
        saved.check_dataset(dataset)
    return saved


# --------------------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Predictions of a model on dataset maps and their ``classification_report``."""

    report: dict
    indices: np.ndarray
    y_true: np.ndarray
    proba: np.ndarray
    class_names: list[str]


def _positive_class(class_names) -> str | None:
    return POSITIVE_CLASS if POSITIVE_CLASS in class_names and len(class_names) == 2 else None


def evaluate_model(model: SavedModel, dataset, indices=None, *, batch_size: int = 64, n_boot: int = 1000,
                   seed: int = 0, tta: bool | None = None, groups=None) -> Evaluation:
    """Evaluate on maps ``indices`` of ``dataset`` (default: every map of the model's task classes);
    ``tta`` as in :meth:`SavedModel.predict_proba`; ``groups``: every dataset map's acquisition group
    (default the dataset's own). Confidence intervals resample the maps' acquisition groups
    (``evaluate.classification_report``); too few test groups per class are warned about, and so is an
    encoder used at another geometry than it was pretrained at (config ``model_info``)."""
    with _opened(dataset) as ds:
        model.check_dataset(ds)
        y_all = task_labels(ds, model.task)
        if indices is None:
            indices = np.flatnonzero(y_all >= 0)
        indices = np.asarray(indices, dtype=np.int64)
        outside = indices[y_all[indices] < 0]
        if len(outside):
            raise DatasetError(ds.path, f"{len(outside)} of the maps to evaluate are not of the task's "
                                        "classes")
        proba = model.predict_dataset(ds, indices, batch_size=batch_size, tta=tta)
        y_true = y_all[indices]
        report = classification_report(y_true, proba, model.class_names, n_boot=n_boot, seed=seed,
                                       positive_class=_positive_class(model.class_names),
                                       groups=(ds.groups if groups is None else groups)[indices])
        for warning in report["warnings"]:
            log.warning("%s: %s", model.name, warning)
        geometry = model.config.get("model_info", {}).get("geometry_warning")
        if geometry:   # its encoder was pretrained at another pixel size or window
            log.warning("%s: %s", model.name, geometry)
            report["warnings"].append(geometry)
        report["test_time_augmentation"] = TTA_DIHEDRAL if model.uses_tta(tta) else None
        return Evaluation(report, indices, y_true, proba, model.class_names)


def rows_digest(dataset, indices) -> str:
    """SHA-256 identifying the maps at rows ``indices`` (their source file hashes and positions)."""
    idx = np.asarray(indices, dtype=np.int64)
    with _opened(dataset) as ds:
        rows = list(zip(ds.source_sha256[idx].tolist(), ds.source_index[idx].tolist(), strict=True))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def stored_test_indices(model: SavedModel, dataset) -> np.ndarray:
    """Test-split indices of ``model`` into ``dataset``; DatasetError unless the dataset is the one the
    model was trained on (same fingerprint, or the same maps at the test rows after appends)."""
    with _opened(dataset) as ds:
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
    class, probabilities."""
    idx, names = evaluation.indices, evaluation.class_names
    with _opened(dataset) as ds:
        frame = pd.DataFrame({"dataset_index": idx, **ds.origins(idx), "group": ds.groups[idx],
                              "true": [names[k] for k in evaluation.y_true],
                              "predicted": [names[k] for k in evaluation.proba.argmax(axis=1)]})
    for k, name in enumerate(names):
        frame[f"p_{name}"] = evaluation.proba[:, k]
    return frame


def write_results(evaluation: Evaluation, model: SavedModel, dataset, folder) -> dict[str, Path]:
    """Write metrics.json, predictions.csv and the figures (confusion matrix, ROC, training curves,
    gallery) of an evaluation into ``folder``; return their paths by name."""
    from . import plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names, report = evaluation.class_names, evaluation.report
    out = {"metrics": folder / "metrics.json", "predictions": folder / "predictions.csv"}
    _write_json(out["metrics"], report)
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
    with _opened(dataset) as ds:
        out["gallery"] = plots.gallery(_LazyMaps(ds, evaluation.indices), evaluation.y_true,
                                       evaluation.proba.argmax(axis=1), names, folder / "gallery.png")
    log.info("wrote %s", ", ".join(str(p) for p in out.values()))
    return out


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` made: the model folder, per-epoch history, test metrics, the config and the
    trained model itself (as :func:`load_model` would give it back)."""

    model_dir: Path
    history: dict[str, list[float]]
    metrics: dict
    config: dict
    model: SavedModel | None = None
    evaluation: Evaluation | None = None   # test-split predictions behind ``metrics``


def _versions() -> dict:
    import h5py
    import sklearn

    out = {"opdcells": __version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
           "h5py": h5py.__version__, "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import keras
        import tensorflow as tf

        out.update(keras=keras.__version__, tensorflow=tf.__version__)
    return out


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
        "versions": _versions(),
    }


def baseline_summary(dataset, y_all, split: Split, task: Task, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Headline metrics (with CIs) of the baselines (``opdcells.baselines``) on the split's test maps,
    fit on its training maps: what the model's figures are to be read against."""
    from .baselines import baseline_reports
    from .evaluate import HEADLINE

    reports = baseline_reports(dataset, y_all, split, list(task.classes), n_boot=n_boot, seed=seed,
                               positive_class=_positive_class(list(task.classes)))
    return {name: {key: report[key] for key in HEADLINE} for name, report in reports.items()}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_history(path: Path, history: dict) -> None:
    n = max((len(v) for v in history.values()), default=0)
    frame = pd.DataFrame({"epoch": np.arange(1, n + 1)})
    for key, values in history.items():
        frame[key] = list(values) + [np.nan] * (n - len(values))
    frame.to_csv(path, index=False)


@contextlib.contextmanager
def _staging(out: Path):
    """A temporary sibling folder that replaces ``out`` only when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        log.info("replaced the previous model in %s", out)
    else:
        os.replace(tmp, out)


def _checked_split(ds, y_all, split: Split) -> Split:
    """``split`` if its indices are maps of the task's classes and its parts share no group."""
    split.check_disjoint(ds.groups)
    used = np.concatenate([split.train, split.val, split.test])
    if np.any(y_all[used] < 0):
        raise ValueError("the split holds maps of classes outside the task")
    return split


def labelled_subset(split: Split, train_indices, groups=None) -> Split:
    """``split`` with its training maps cut down to ``train_indices`` (ValueError unless a non-empty
    subset of ``split.train``); ``groups`` (every map's group) updates the training part's group list."""
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
    norm = _normalisation(settings, dataset, split)
    log.info("normalisation scale %.1f nm (%s)", norm["norm_scale_nm"], norm["method"])
    size = dataset.out_size
    learner = _KerasLearner.create(settings, n_classes, (size, size, 1), norm["norm_scale_nm"])
    from .models import saved_encoder_config

    saved = saved_encoder_config(settings.model, settings.weights)
    warning = geometry_warning(saved, dataset.pixel_size_um, size, settings.input_size,
                               f"the {settings.model} encoder ({settings.weights})")
    if warning:
        log.warning("%s", warning)
        learner.info["geometry_warning"] = warning   # recorded in config.json's model_info
    return learner, norm


def geometry_warning(encoder_config: dict | None, pixel_size_um: float, out_size: int,
                     input_size: int | None = None, what: str = "the pretrained encoder") -> str | None:
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
    """
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
    return (f"{what} was pretrained on {size0} px maps at {px0:g} um/px (a {size0 * px0:g} um window) but is "
            f"used on {out_size} px maps at {pixel_size_um:g} um/px (a {out_size * pixel_size_um:g} um "
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
                            groups=None, seed: int = 0) -> dict | None:
    """Calibrate a freshly trained model on its validation groups (:func:`opdcells.calibration.calibrate`).

    Writes ``validation_scores.npz`` (so screening can set operating points for other targets and rates)
    and ``reliability.png`` into ``folder``.

    Returns
    -------
    dict or None
        The calibration record for config.json; None (logged) without validation maps.
    """
    from . import calibration, plots

    if len(split.val) == 0:
        log.info("no validation maps: the model is not calibrated (screening needs a calibrated model)")
        return None
    proba = model.predict_dataset(dataset, split.val)
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


def _write_model_folder(folder: Path, learner, config: dict, history: dict, split: Split) -> None:
    """The model file, config.json, history.csv and split.json (metrics.json comes after evaluation)."""
    learner.save(folder)
    _write_json(folder / "config.json", config)
    write_history(folder / "history.csv", history)
    split.to_json(folder / "split.json")


def train(data, model: str | None = None, task: str | Task | None = None, out=None, *,
          config: TrainConfig | None = None, profile: str = "quick", split: Split | None = None,
          train_indices=None, verbose=0, n_boot: int = 1000, saved_models=None, **settings) -> TrainResult:
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
    with _opened(data) as ds:
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
        out = _output_of_this_worker(out, config)
        with _staging(out) as folder:
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
            record["calibration"] = calibrate_on_validation(SavedModel(folder, record, learner), ds, y_all,
                                                            split, folder, groups=groups, seed=seed)
            record["ood"] = fit_for_model(folder, learner, ds, split, seed=seed)   # writes ood.npz
            _write_model_folder(folder, learner, record, history, split)
            evaluation = evaluate_model(SavedModel(folder, record, learner), ds, split.test, n_boot=n_boot,
                                        seed=seed, groups=groups)
            evaluation.report["warnings"] += [split.warning] if split.warning else []
            evaluation.report["baselines"] = baseline_summary(ds, y_all, split, task, n_boot=n_boot,
                                                              seed=seed)
            _write_json(folder / "metrics.json", evaluation.report)
    log.info("saved %s (test accuracy %.3f)", out, evaluation.report["accuracy"]["value"])
    return TrainResult(out, history, evaluation.report, record, SavedModel(out, record, learner), evaluation)
