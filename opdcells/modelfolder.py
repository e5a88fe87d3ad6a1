"""The saved-model folder: its format, finding it by run name, and loading it without running code.

One folder per trained model (``saved_models/RUN/``)::

    model.keras | model.skops    the fitted model (Keras, or the scikit-learn features baseline; a fused
                                 model, ``fusion: features``, holds both: its deep and its features part)
    config.json                  everything needed to use and judge it (see ``train._make_config``)
    history.csv                  per-epoch (per boosting iteration for ``features``) losses and accuracy
    metrics.json                 classification_report on the held-out test groups
    split.json                   train/val/test map indices (by acquisition group), seed, groups

Model folders are data, never code: ``model.keras`` is loaded with Keras' ``safe_mode`` (no Python
lambdas; classes only from Keras and opdcells' registered layers), the features baseline is a skops
file loaded with an explicit list of trusted types (``learners.FEATURES_TRUSTED_TYPES``), and pickles
(``model.joblib`` of model format 2 and older) are refused. A run name is looked up only in one
``saved_models/`` folder (:func:`saved_models_root`), never in the current directory by surprise.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import numpy as np

from . import __version__
from .config import FEATURES, TTA_DIHEDRAL, TrainConfig
from .errors import DatasetError, ModelError, OPDCellsError, TaskError
from .files import iter_maps, opened
from .learners import _FusedLearner, _learner_class
from .pipeline import dihedral_views
from .tasks import Task, resolve_task, task_targets

__all__ = ["FORMAT", "FORMAT_VERSION", "SavedModel", "load_model", "resolve_model_dir", "saved_models_root",
           "is_run_name"]

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
#: Model files that are pickles (running code when loaded): refused in model folders.
PICKLE_FILES = ("model.joblib", "model.pkl", "model.pickle")
FILES = ("config.json", "history.csv", "metrics.json", "split.json")
TTA_CHUNK = 256   # maps whose 8 views are predicted together


class SavedModel:
    """A trained model folder, loaded: ``predict_proba(maps)``, ``class_names``, ``config``.

    Made by :func:`load_model` (and by :func:`opdcells.train.train`); not usually built by hand.

    Parameters
    ----------
    folder : pathlib.Path
        The model folder.
    config : dict
        Its config.json.
    learner : learners._KerasLearner, learners._FeaturesLearner or learners._FusedLearner
        The fitted model.
    """

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

    @property
    def fused(self) -> bool:
        """Whether the model is a late fusion of a deep part and the features model (``fusion: features``)."""
        return isinstance(self.learner, _FusedLearner)

    def predict_proba(self, maps, batch_size: int = 64, *, tta: bool | None = None) -> np.ndarray:
        """Class probabilities (N, K) of OPD maps in nm, (N, S, S) or (N, S, S, 1), at the model's
        pixel size and map size (``config['pixel_size_um']``, ``config['out_size']``). ``tta``: mean
        over the map's 8 rotations and reflections (default: the model's own setting, :attr:`tta`); of a
        fused model, the fused probabilities (:meth:`predict_parts`)."""
        if self.fused:
            return self.learner.fuse(**self.predict_parts(maps, batch_size, tta=tta))
        return self._deep_proba(self.learner, self._check_maps(maps), batch_size, tta)

    def predict_parts(self, maps, batch_size: int = 64, *, tta: bool | None = None) -> dict[str, np.ndarray]:
        """Class probabilities of each part of a fused model: ``p_deep`` (N, K), with test-time augmentation
        as :meth:`predict_proba` (it applies to the deep part only), and ``p_features`` (N, K).

        Raises
        ------
        ValueError
            The model is not fused, or the maps do not fit it.
        """
        if not self.fused:
            raise ValueError(f"model {self.name} is not a fusion of parts")
        maps = self._check_maps(maps)
        return {"p_deep": self._deep_proba(self.learner.deep, maps, batch_size, tta),
                "p_features": self.learner.features_part.predict_proba(maps) if len(maps) else
                np.empty((0, len(self.class_names)))}

    def _deep_proba(self, learner, maps: np.ndarray, batch_size: int, tta: bool | None) -> np.ndarray:
        if len(maps) == 0:
            return np.empty((0, len(self.class_names)), dtype=np.float32)
        if not self.uses_tta(tta):
            return learner.predict_proba(maps, batch_size=batch_size)
        chunks = []
        for start in range(0, len(maps), TTA_CHUNK):   # 8 views of a chunk at a time: bounded memory
            chunk = maps[start:start + TTA_CHUNK]
            proba = learner.predict_proba(np.concatenate(dihedral_views(chunk)), batch_size=batch_size)
            chunks.append(proba.reshape(8, len(chunk), -1).mean(axis=0))
        return np.concatenate(chunks)

    def predict_dataset(self, dataset, indices=None, batch_size: int = 64, *,
                        tta: bool | None = None) -> np.ndarray:
        """Class probabilities of maps ``indices`` (default all) of a dataset, read from HDF5 a block at a
        time: streamed through ``opdcells.pipeline`` without test-time augmentation, with it through
        :meth:`predict_proba` (``tta`` as there)."""
        if self.fused:
            return self.learner.fuse(**self.predict_dataset_parts(dataset, indices, batch_size, tta=tta))
        with opened(dataset) as ds:
            self.check_dataset(ds, need_classes=False)
            indices = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
            if len(indices) == 0:
                return np.empty((0, len(self.class_names)), dtype=np.float32)
            if self.uses_tta(tta):
                return np.concatenate([self.predict_proba(maps, batch_size, tta=True)
                                       for maps in iter_maps(ds, indices, batch_size=TTA_CHUNK)])
            return self.learner.predict_indices(ds, indices, batch_size=batch_size)

    def predict_dataset_parts(self, dataset, indices=None, batch_size: int = 64, *,
                              tta: bool | None = None) -> dict[str, np.ndarray]:
        """:meth:`predict_parts` of maps ``indices`` (default all) of a dataset, read a block at a time."""
        if not self.fused:
            raise ValueError(f"model {self.name} is not a fusion of parts")
        with opened(dataset) as ds:
            self.check_dataset(ds, need_classes=False)
            indices = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
            if len(indices) == 0:
                empty = np.empty((0, len(self.class_names)))
                return {"p_deep": empty, "p_features": empty}
            if self.uses_tta(tta):
                parts = [self.predict_parts(maps, batch_size, tta=True)
                         for maps in iter_maps(ds, indices, batch_size=TTA_CHUNK)]
                return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
            return {"p_deep": self.learner.deep.predict_indices(ds, indices, batch_size=batch_size),
                    "p_features": self.learner.features_part.predict_indices(ds, indices)}

    def check_dataset(self, dataset, *, need_classes: bool = True) -> None:
        """Raise DatasetError/TaskError (clear message) if ``dataset`` does not fit this model."""
        with opened(dataset) as ds:
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
    """Whether ``text`` is a bare run name (``mnv2``), not a path (``./mnv2``, ``runs/mnv2``, ``/abs``).

    Parameters
    ----------
    text : str
        What the user wrote.

    Returns
    -------
    bool
        True when it holds no path separator and is not ``.``, ``..`` or ``~...``.
    """
    return bool(text) and text not in (".", "..") and not any(
        sep in text for sep in (os.sep, os.altsep) if sep) and not text.startswith("~")


def resolve_model_dir(path, saved_models=None) -> Path:
    """Model folder from a path, or from a run name looked up only in :func:`saved_models_root`.

    A bare name (no path separator) is a run name: ``saved_models_root(saved_models) / name``, even when
    the current directory holds a folder of that name (write ``./name`` to use that one). Anything
    else is a path.

    Parameters
    ----------
    path : str or os.PathLike
        A model folder or a run name.
    saved_models : str or os.PathLike, optional
        The saved_models folder (``--saved-models``).

    Returns
    -------
    pathlib.Path
        A folder holding config.json.

    Raises
    ------
    ModelError
        No such run or folder, or a folder without config.json.
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
    """ModelError for a ``features`` (or fused) folder that holds a pickle or predates model.skops
    (format 3)."""
    if config.get("model") != FEATURES and _fusion_of(config) == "none":
        return
    pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
    old = int(config.get("format_version", 0)) < FEATURES_MIN_FORMAT
    if pickles or old:
        what = pickles[0] if pickles else f"model format {config.get('format_version')}"
        raise ModelError(folder, f"{what} is a pickle, which runs code when loaded; opdcells loads only "
                                 f"model.skops (model format {FEATURES_MIN_FORMAT}): retrain it with "
                                 "`python -m opdcells train --model features --task TASK --data DATASET.h5 "
                                 "--out FOLDER` (seconds) and delete the pickle")


def _fusion_of(config: dict) -> str:
    """config.json ``train_config`` ``fusion`` (none for model folders saved before it)."""
    settings = config.get("train_config")
    return str(settings.get("fusion", "none")) if isinstance(settings, dict) else "none"


def load_model(path, dataset=None, *, saved_models=None) -> SavedModel:
    """Load a model folder (a path, or a run name in :func:`saved_models_root`).

    Only data is read from the folder: pickles are refused, Keras models load in ``safe_mode``, the
    ``features`` model is a skops file with an explicit list of trusted types.

    Parameters
    ----------
    path : str or os.PathLike
        A model folder or a run name.
    dataset : str, os.PathLike or OPDDataset, optional
        Check the model against it: pixel size, map size and the task's classes must match.
    saved_models : str or os.PathLike, optional
        The saved_models folder where run names are looked up.

    Returns
    -------
    SavedModel
        The loaded model.

    Raises
    ------
    ModelError
        Not a model folder, a newer model format, a pickle, or a model file that cannot be loaded.
    ConfigError
        An invalid ``train_config`` in config.json.
    DatasetError, TaskError
        ``dataset`` does not fit the model (pixel size, map size, classes).
    """
    folder = resolve_model_dir(path, saved_models)
    config = _read_config(folder)
    _refuse_pickles(folder, config)
    learner_cls = _learner_class(config["model"], _fusion_of(config))
    for name in getattr(learner_cls, "part_files", (learner_cls.file_name,)):
        if not (folder / name).is_file():
            raise ModelError(folder, f"missing {name}")
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
