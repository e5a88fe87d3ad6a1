"""The kinds of learner behind a saved model: a deep Keras model (``_KerasLearner``), the OPD
morphology features baseline (``_FeaturesLearner``), and the late fusion of both (``_FusedLearner``,
``TrainConfig.fusion="features"``).

All have the same methods (``create``, ``fit``, ``predict_proba``, ``predict_indices``, ``save``,
``load``): :func:`opdcells.train.train` fits one, :class:`opdcells.modelfolder.SavedModel` predicts with
one, and every other step (task targets, group split, class weights, config, evaluation, loading) is
shared. Imports TensorFlow (through :mod:`opdcells.pipeline`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .config import FEATURES, FUSION_DEEP_WEIGHTS, TrainConfig, write_json_atomic
from .errors import ModelError
from .files import iter_maps
from .pipeline import make_tf_dataset
from .splits import Split

log = logging.getLogger(__name__)


#: Feature rows of the last dataset this process measured (``"dataset"``: its real path, fingerprint and
#: pixel size; ``"rows"``: row -> feature vector): the features model, the features part of every fused
#: backbone on the same split and their evaluations measure each map once (a 128 px map takes 8-25 ms).
_DATASET_ROWS: dict = {}

#: The only types a ``features`` model.skops may hold beyond skops' own safe defaults (numpy, builtins and
#: the scikit-learn estimators skops vets): the fitted trees of HistGradientBoostingClassifier.
FEATURES_TRUSTED_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)


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


class _KerasLearner:
    """A Keras model from ``opdcells.models.build_model`` (normalisation and resizing inside)."""

    file_name = "model.keras"

    def __init__(self, model, info: dict, strategy=None, build=None):
        self.model = model
        self.info = info
        self.strategy = strategy   # a tf.distribute strategy other than the default, or None
        self._build = build        # () -> (model, info): the same model outside any strategy

    @classmethod
    def create(cls, settings: TrainConfig, n_classes: int, input_shape, norm_scale_nm: float,
               pixel_size_um: float | None = None):
        from .distribute import make_strategy, resolve
        from .models import build_model

        def build():
            return build_model(settings.model, n_classes, input_shape=tuple(input_shape),
                               input_size=settings.input_size, weights=settings.weights,
                               norm_scale_nm=norm_scale_nm, seed=settings.seed,
                               physical_quantities=settings.quantity_names, pixel_size_um=pixel_size_um,
                               **settings.build_kw)

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

        from .models import adapt_quantities, batch_norm_layers

        # the head's physical quantities, standardised on the training maps as they are (no augmentation)
        adapt_quantities(self.model, make_tf_dataset(dataset, split.train, None, batch_size=256))
        encoder = self.model.get_layer("encoder")
        history = {}
        callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=settings.patience,
                                                   restore_best_weights=True),
                     keras.callbacks.TerminateOnNaN()]
        if settings.epochs == 0:   # a linear probe alone: the head on the frozen encoder
            encoder.trainable = False
            tuned = run(settings.head_epochs, callbacks)
        else:
            if settings.head_epochs > 0:   # linear probe, then fine-tune (LP-FT, Kumar et al. 2022)
                encoder.trainable = False
                history = run(settings.head_epochs, [keras.callbacks.TerminateOnNaN()])
                encoder.trainable = True
            if settings.freeze_batchnorm:
                for layer in batch_norm_layers(encoder):
                    layer.trainable = False   # Keras 3: a frozen BatchNormalization runs in inference mode
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
                               class_weight=class_weight, patience=patience,
                               label_smoothing=settings.label_smoothing)

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
        self.cache: FeaturesCache | None = None   # fitted models of identical runs (set by train)
        # (N_val, K) probabilities of the validation maps by the fit that did not see them (refit), else None
        self.held_out_validation: np.ndarray | None = None

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
        """Feature rows (N, F) of dataset maps ``indices``; rows this process measured before on the same
        dataset content (:data:`_DATASET_ROWS`) are not measured again."""
        key = (str(getattr(dataset, "real_path", dataset.path)), dataset.fingerprint, self.pixel_size_um)
        if _DATASET_ROWS.get("dataset") != key:
            _DATASET_ROWS.clear()
            _DATASET_ROWS.update(dataset=key, rows={})
        known = _DATASET_ROWS["rows"]
        indices = np.asarray(indices, dtype=np.int64)
        todo = np.array(sorted(set(indices.tolist()) - set(known)), dtype=np.int64)
        blocks = iter_maps(dataset, todo, batch_size=256)
        for start, maps in zip(range(0, len(todo), 256), blocks, strict=True):
            known.update(zip(todo[start:start + 256].tolist(), self.features(maps), strict=True))
        if self.feature_names is None and len(indices):   # named by the features module, as ``features``
            self.features(dataset.read(indices[:1]))
        return np.stack([known[i] for i in indices.tolist()]) if len(indices) else np.empty((0, 0))

    def fit(self, dataset, split: Split, y_all, settings: TrainConfig, class_weight, verbose) -> dict:
        if self.cache is None:
            return self._fit(dataset, split, y_all, settings, class_weight)
        key = self.cache.key(dataset, split, y_all, settings, class_weight)
        cached = self.cache.get(key, self.info)
        if cached is not None:
            fitted, history = cached
            self.estimator, self.feature_names = fitted.estimator, fitted.feature_names
            self.held_out_validation = fitted.held_out_validation
            self.info.update({k: v for k, v in fitted.info.items() if k == "refit"},
                             cache="re-used an identical fit")
            return history
        history = self._fit(dataset, split, y_all, settings, class_weight)
        self.cache.put(key, self, history)
        return history

    def _fit(self, dataset, split: Split, y_all, settings: TrainConfig, class_weight) -> dict:
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
        if settings.refit and val:
            self._refit(np.concatenate([x_train, val["X_val"]]), np.concatenate([y_train, val["y_val"]]), w,
                        split)
        return history

    def _refit(self, x, y, class_weights, split: Split) -> None:
        """Keep the early-stopped fit's probabilities of the validation maps (the rows after the training
        rows of ``x``), then fit a fresh estimator with its number of iterations on all of ``x``."""
        from sklearn.base import clone

        n_val, iterations = len(split.val), int(self.estimator.n_iter_)
        self.held_out_validation = self.estimator.predict_proba(x[-n_val:])
        refit = clone(self.estimator).set_params(max_iter=iterations, early_stopping=False)
        self.estimator = refit.fit(x, y, sample_weight=class_weights[y])
        self.info["refit"] = {"iterations": iterations, "n_maps": len(y), "n_validation_maps": n_val,
                              "rule": "fit again on the training + validation maps with the number of "
                                      "iterations early stopping chose; validation figures, fusion weight "
                                      "and calibration from the first fit's held-out predictions"}
        log.info("features model: fit again on %d training + validation maps (%d iterations)", len(y),
                 iterations)

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


class FeaturesCache:
    """Fitted features models by what determines them, so that one split's features model is fit once for
    every deep backbone fused with it (and for the ``features`` run itself).

    An entry is a folder ``<key>/`` holding ``model.skops`` (loaded as any features model folder: skops,
    trusted types only, no code) and ``history.json``, written to a temporary sibling and renamed. The key
    hashes the dataset's content fingerprint, the training and validation rows with their labels and class
    weights, the fit's settings (boosting iterations, learning rate, patience, seed, refit) and the source of
    ``opdcells.features`` and the scikit-learn version; anything else is another key. An unreadable entry is
    fit again and replaced.

    Parameters
    ----------
    folder : str or os.PathLike
        Where the entries live (e.g. ``saved_models/final_project_features_cache``).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(dataset, split: Split, y_all, settings: TrainConfig, class_weight) -> str:
        """The hex SHA-256 of everything a features fit depends on (see the class)."""
        import sklearn

        from . import features

        y_all = np.asarray(y_all)
        record = {"fingerprint": dataset.fingerprint,
                  "train": [np.asarray(split.train).tolist(), y_all[split.train].tolist()],
                  "val": [np.asarray(split.val).tolist(), y_all[split.val].tolist()],
                  "class_weight": {str(k): round(float(v), 12) for k, v in sorted(class_weight.items())},
                  "fit": [settings.epochs, settings.learning_rate, settings.patience, settings.seed,
                          *(["refit"] if settings.refit else [])],
                  "features_source": hashlib.sha256(Path(features.__file__).read_bytes()).hexdigest(),
                  "sklearn": sklearn.__version__}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def get(self, key: str, info: dict):
        """``(fitted _FeaturesLearner, history)`` of entry ``key``, or None (a miss)."""
        entry = self.folder / key[:32]
        if not (entry / "history.json").is_file():
            self.misses += 1
            return None
        try:
            stored = json.loads((entry / "history.json").read_text(encoding="utf-8"))
            if stored["key"] != key:
                raise ValueError("another key")
            fitted = _FeaturesLearner.load(entry, {"model_info": {**info, **stored.get("info", {})}})
            held_out = stored.get("held_out_validation")
            fitted.held_out_validation = None if held_out is None else np.asarray(held_out, dtype=np.float64)
        except (OSError, ValueError, KeyError, ModelError) as exc:
            log.warning("features cache entry %s unreadable (%s): fitting again", entry, exc)
            self.misses += 1
            return None
        self.hits += 1
        log.info("features model: re-using the identical fit %s", entry)
        return fitted, stored["history"]

    def put(self, key: str, learner: _FeaturesLearner, history: dict) -> Path:
        """Store a fitted features learner and its history under ``key``; returns the entry folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = self.folder / key[:32]
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=self.folder))
        try:
            learner.save(tmp)
            held_out = learner.held_out_validation
            write_json_atomic(tmp / "history.json", {
                "key": key, "history": history,
                "info": {k: v for k, v in learner.info.items() if k == "refit"},
                "held_out_validation": None if held_out is None else np.asarray(held_out).tolist()})
            shutil.rmtree(entry, ignore_errors=True)   # an unreadable entry (a readable one was a hit)
            tmp.rename(entry)
        except OSError as exc:   # e.g. another process stored the same entry meanwhile: the cache is a saving
            log.warning("features cache: could not store %s (%s)", entry, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return entry


class _DeepEncoderView:
    """What a fused learner shows as ``.model``: its deep part's ``encoder`` layer only.

    The out-of-distribution detector embeds maps with ``model.get_layer("encoder")`` (it stays on the deep
    encoder's embedding); any other layer (the deep softmax ``classifier``) is refused with ValueError, as
    Keras refuses an unknown layer, so that nothing scores a fused model with its deep part alone.
    """

    def __init__(self, model):
        self._model = model

    def get_layer(self, name: str):
        if name != "encoder":
            raise ValueError(f"a fused model exposes only its deep part's encoder, not layer {name!r}")
        return self._model.get_layer("encoder")


class _FusedLearner:
    """Late fusion: a deep Keras learner and the features learner, fit on the same split and saved in one
    folder (``model.keras`` and ``model.skops``), predicting the weighted mean of their class probabilities
    ``w * p_deep + (1 - w) * p_features`` (:func:`fuse`).

    ``deep_weight`` (w) is set by :func:`opdcells.train.train` from
    :data:`~opdcells.config.FUSION_DEEP_WEIGHTS` on the validation groups (:func:`choose_deep_weight`) and
    read back from config.json ``fusion``.
    """

    file_name = _KerasLearner.file_name   # the deep part's; the features part's is model.skops beside it
    part_files = (_KerasLearner.file_name, _FeaturesLearner.file_name)

    def __init__(self, deep: _KerasLearner, features_part: _FeaturesLearner, deep_weight: float = 0.5):
        self.deep = deep
        self.features_part = features_part
        self.deep_weight = float(deep_weight)

    @property
    def info(self) -> dict:
        """The deep part's model_info (what config.json ``init`` and ``model_info`` describe)."""
        return self.deep.info

    @property
    def model(self) -> _DeepEncoderView:
        return _DeepEncoderView(self.deep.model)

    @property
    def cache(self):
        return self.features_part.cache

    @cache.setter
    def cache(self, value) -> None:
        self.features_part.cache = value

    @classmethod
    def create(cls, settings: TrainConfig, n_classes: int, input_shape, norm_scale_nm: float,
               pixel_size_um: float | None = None):
        deep = _KerasLearner.create(settings, n_classes, input_shape, norm_scale_nm, pixel_size_um)
        return cls(deep, _FeaturesLearner.create(features_settings(settings), n_classes, pixel_size_um))

    def fit(self, dataset, split: Split, y_all, settings: TrainConfig, class_weight, verbose) -> dict:
        """Fit the deep part (its history is returned: history.csv is the deep part's), then the features
        part with the features model's own settings (``features_settings``), from the cache when set."""
        history = self.deep.fit(dataset, split, y_all, settings, class_weight, verbose)
        self.features_part.fit(dataset, split, y_all, features_settings(settings), class_weight, verbose)
        return history

    def fuse(self, p_deep, p_features) -> np.ndarray:
        """``w * p_deep + (1 - w) * p_features`` (N, K) of the parts' class probabilities (N, K)."""
        return fuse(p_deep, p_features, self.deep_weight)

    def predict_proba(self, maps, batch_size: int = 64) -> np.ndarray:
        return self.fuse(self.deep.predict_proba(maps, batch_size), self.features_part.predict_proba(maps))

    def predict_indices(self, dataset, indices, batch_size: int = 64) -> np.ndarray:
        return self.fuse(self.deep.predict_indices(dataset, indices, batch_size),
                         self.features_part.predict_indices(dataset, indices))

    def save(self, folder: Path) -> None:
        self.deep.save(folder)
        self.features_part.save(folder)

    @classmethod
    def load(cls, folder: Path, config: dict):
        """Both parts, each as its own kind loads (Keras safe_mode; skops with trusted types only)."""
        fusion = config.get("fusion") or {}
        if not isinstance(fusion.get("deep_weight"), (int, float)) or not 0 < fusion["deep_weight"] <= 1:
            raise ModelError(folder, "config.json fusion has no deep_weight in (0, 1]")
        deep = _KerasLearner.load(folder, config)
        features_part = _FeaturesLearner.load(folder, {"model_info": fusion.get("features_model_info", {})})
        return cls(deep, features_part, fusion["deep_weight"])


def features_settings(settings: TrainConfig) -> TrainConfig:
    """The settings the features part of a fused model is fit with: the features model's profile defaults
    (boosting iterations, learning rate, patience) with the deep run's seed, class weighting and refit.

    Parameters
    ----------
    settings : TrainConfig
        The fused run's settings.

    Returns
    -------
    TrainConfig
        What ``train --model features`` with the same profile, seed and class weighting would use.
    """
    return TrainConfig.from_profile(FEATURES, settings.profile, seed=settings.seed,
                                    class_weight=settings.class_weight, refit=settings.refit)


def fuse(p_deep, p_features, deep_weight: float) -> np.ndarray:
    """Weighted mean of two parts' class probabilities.

    Parameters
    ----------
    p_deep, p_features : array of float, shape (N, K)
        Class probabilities of the deep part and of the features part.
    deep_weight : float
        Weight of the deep part, in (0, 1].

    Returns
    -------
    numpy.ndarray, shape (N, K)
        ``deep_weight * p_deep + (1 - deep_weight) * p_features`` (rows sum to 1).
    """
    p_deep, p_features = np.asarray(p_deep, dtype=np.float64), np.asarray(p_features, dtype=np.float64)
    return deep_weight * p_deep + (1.0 - deep_weight) * p_features


def choose_deep_weight(p_deep, p_features, y, weights=FUSION_DEEP_WEIGHTS) -> tuple[float, dict]:
    """The deep part's weight of a fused model with the best balanced accuracy on validation maps.

    Parameters
    ----------
    p_deep, p_features : array of float, shape (N, K)
        The parts' class probabilities of the validation maps.
    y : array of int, shape (N,)
        Their task labels.
    weights : sequence of float
        Weights tried, each in (0, 1] (the features model alone, 0, is not a fusion); ties go to the one
        nearest 0.5 (the plain mean).

    Returns
    -------
    (float, dict)
        The chosen weight, and the balanced accuracy of every weight tried (str(weight) -> accuracy).

    Raises
    ------
    ValueError
        A weight outside (0, 1], or no validation maps.
    """
    from sklearn.metrics import balanced_accuracy_score

    y = np.asarray(y)
    if any(not 0 < w <= 1 for w in weights) or not len(weights):
        raise ValueError(f"deep weights must lie in (0, 1], got {list(weights)}")
    if len(y) == 0:
        raise ValueError("no validation maps to choose the fusion weight on")
    scores = {float(w): float(balanced_accuracy_score(y, fuse(p_deep, p_features, w).argmax(axis=1)))
              for w in weights}
    best = max(scores.values())
    chosen = min((w for w, s in scores.items() if np.isclose(s, best)), key=lambda w: (abs(w - 0.5), w))
    return chosen, {str(w): s for w, s in scores.items()}


def _learner_class(model: str, fusion: str = "none"):
    if model == FEATURES:
        return _FeaturesLearner
    return _FusedLearner if fusion == FEATURES else _KerasLearner
