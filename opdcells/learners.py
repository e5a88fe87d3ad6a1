"""The two kinds of learner behind a saved model: a deep Keras model (``_KerasLearner``) and the OPD
morphology features baseline (``_FeaturesLearner``).

Both have the same methods (``create``, ``fit``, ``predict_proba``, ``predict_indices``, ``save``,
``load``): :func:`opdcells.train.train` fits one, :class:`opdcells.modelfolder.SavedModel` predicts with
one, and every other step (task targets, group split, class weights, config, evaluation, loading) is
shared. Imports TensorFlow (through :mod:`opdcells.pipeline`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .config import FEATURES, TrainConfig
from .errors import ModelError
from .files import iter_maps
from .pipeline import make_tf_dataset
from .splits import Split

log = logging.getLogger(__name__)


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
                               global_batch=settings.batch_size, class_weight=class_weight, patience=patience,
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
