"""The training recipe of the deep models: optimizer and learning-rate schedule, loss, BatchNorm handling.

``train`` builds every Keras model's optimizer with :func:`build_optimizer` and its loss with
:func:`classification_loss`, from the fields of :class:`~opdcells.config.TrainConfig` (``optimizer``,
``weight_decay``, ``learning_rate``, ``lr_schedule``, ``warmup_epochs``, ``label_smoothing``). The
defaults were chosen on the validation groups of the demo's split (never its test groups); the
experiments, with the commands that ran them, are in ``docs/recipe.md``:

* AdamW (decoupled weight decay, Loshchilov & Hutter 2019) without decay of biases and BatchNorm
  scales/offsets, with a linear warm-up and a cosine decay to 0 (Goyal et al. 2017; Loshchilov & Hutter
  2017 "SGDR"): keras.optimizers.AdamW and keras.optimizers.schedules.CosineDecay;
* cross-entropy with label smoothing (Szegedy et al. 2016) on integer labels
  (:class:`SmoothedSparseCrossentropy`; Keras' sparse loss has no smoothing);
* a head that also sees the map's physical quantities (dry mass, area, OPD profile;
  ``TrainConfig.physical_quantities``, :class:`opdcells.models.PhysicalQuantities`), standardised on the
  training maps (``models.adapt_quantities``, called by the Keras learner before fitting);
* BatchNorm momentum 0.9 for every backbone (:func:`opdcells.models.set_bn_momentum`, applied by
  ``models.build_encoder``): keras.applications' 0.99/0.999 leave the moving statistics unsettled after
  the few hundred steps a few thousand maps give, and evaluation-mode accuracy stays at chance.

This module imports Keras (it is on the model side, with models.py and train.py).
"""
from __future__ import annotations

import logging
import math

import keras

from .config import OPTIMIZERS
from .models import set_bn_momentum

log = logging.getLogger(__name__)

__all__ = ["OPTIMIZERS", "NO_DECAY", "learning_rate_schedule", "build_optimizer", "steps_per_epoch",
           "SmoothedSparseCrossentropy", "classification_loss", "set_bn_momentum"]

#: Variable names kept out of weight decay: biases and BatchNorm/LayerNorm offsets and scales (decaying
#: them pulls normalised activations towards 0 instead of regularising the filters).
NO_DECAY = ("bias", "beta", "gamma")


def learning_rate_schedule(learning_rate: float, schedule: str, *, total_steps: int, warmup_steps: int = 0):
    """Learning rate per optimizer step.

    Parameters
    ----------
    learning_rate : float
        Peak learning rate (reached after the warm-up).
    schedule : {"constant", "cosine"}
        constant: ``learning_rate`` throughout (no warm-up); cosine: linear warm-up from 0 over
        ``warmup_steps``, then cosine decay to 0 at ``total_steps``.
    total_steps : int
        Optimizer steps of the whole run (epochs x batches per epoch).
    warmup_steps : int
        Steps of the linear warm-up (cosine only; clipped to ``total_steps - 1``).

    Returns
    -------
    float or keras.optimizers.schedules.LearningRateSchedule

    Raises
    ------
    ValueError
        Unknown schedule.
    """
    if schedule == "constant":
        return float(learning_rate)
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose constant or cosine")
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps - 1)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(float(learning_rate), decay_steps=total_steps)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=total_steps - warmup_steps,
                                                  warmup_target=float(learning_rate),
                                                  warmup_steps=warmup_steps)


def build_optimizer(settings, *, epochs: int, steps_per_epoch: int, schedule: str | None = None):
    """The optimizer of one training phase, as ``settings`` ask.

    Parameters
    ----------
    settings : opdcells.config.TrainConfig
        Reads ``optimizer``, ``learning_rate``, ``weight_decay``, ``lr_schedule`` and ``warmup_epochs``.
    epochs : int
        Epochs of this phase (the schedule decays over them).
    steps_per_epoch : int
        Optimizer steps per epoch (``ceil(n_train / batch_size)``).
    schedule : str, optional
        Overrides ``settings.lr_schedule`` (the head-only phase runs at a constant rate).

    Returns
    -------
    keras.optimizers.Optimizer
        keras.optimizers.Adam, or AdamW whose decay skips :data:`NO_DECAY` variables.

    Raises
    ------
    ValueError
        Unknown optimizer or schedule.
    """
    schedule = settings.lr_schedule if schedule is None else schedule
    warmup = settings.warmup_epochs * steps_per_epoch if schedule == "cosine" else 0
    rate = learning_rate_schedule(settings.learning_rate, schedule, total_steps=epochs * steps_per_epoch,
                                  warmup_steps=warmup)
    if settings.optimizer == "adam":
        return keras.optimizers.Adam(rate)
    if settings.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {settings.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    optimizer = keras.optimizers.AdamW(rate, weight_decay=float(settings.weight_decay))
    optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
    return optimizer


def steps_per_epoch(n_maps: int, batch_size: int) -> int:
    """Optimizer steps of one epoch over ``n_maps`` maps (the last batch may be short).

    Parameters
    ----------
    n_maps : int
        Training maps of one epoch.
    batch_size : int
        Maps a step.

    Returns
    -------
    int
        ``ceil(n_maps / batch_size)``, at least 1.
    """
    return max(1, math.ceil(n_maps / batch_size))


@keras.saving.register_keras_serializable(package="opdcells")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of softmax probabilities against integer labels smoothed towards uniform.

    The target of a map of class ``k`` among ``K`` is ``(1 - eps) * onehot(k) + eps / K`` (label
    smoothing, Szegedy et al. 2016, "Rethinking the Inception architecture"); ``eps = 0`` is Keras'
    sparse categorical cross-entropy.

    Parameters
    ----------
    label_smoothing : float
        ``eps`` in [0, 1).
    **kwargs
        keras.losses.Loss arguments (``reduction``, ``name``).
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        n_classes = keras.ops.shape(y_pred)[-1]
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        target = keras.ops.one_hot(labels, n_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(target, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def classification_loss(label_smoothing: float = 0.0) -> keras.losses.Loss:
    """The training loss: :class:`SmoothedSparseCrossentropy` (Keras' own loss when there is no smoothing).

    Parameters
    ----------
    label_smoothing : float
        Weight of the uniform target, in [0, 1).

    Returns
    -------
    keras.losses.Loss
    """
    if label_smoothing == 0:
        return keras.losses.SparseCategoricalCrossentropy()
    return SmoothedSparseCrossentropy(label_smoothing)
