"""Judging an encoder without labels of real cells: BatchNorm statistics recalibrated on clean maps, and
linear / k-NN probes on simulated maps from unseen sessions.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from . import models
from .explain import embed, knn_probe, linear_probe
from .pretrain_corpus import SimCorpus

__all__ = ["PROBE_TASKS", "recalibrate_batchnorm", "calibration_maps", "probe_encoder", "probe_train_mask"]

PROBE_TASKS = ("five_class", "cancer_vs_blood")


def recalibrate_batchnorm(encoder: keras.Model, maps, momentum: float) -> int:
    """Set every BatchNormalization layer's moving statistics to those of ``maps``.

    One training-mode pass at momentum 0, then momentum back to ``momentum``. A random-init CNN's
    moving statistics (mean 0, variance 1) make its inference-mode embeddings vanish (~1e-12 for
    MobileNetV2), so probes of random init are meaningless without this; after pretraining it replaces
    statistics of augmented views by those of clean maps.

    Parameters
    ----------
    encoder : keras.Model
        The encoder (changed in place).
    maps : array, shape (N, S, S, 1), nm
        Clean OPD maps.
    momentum : float
        BatchNorm momentum to restore afterwards.

    Returns
    -------
    int
        The number of BatchNormalization layers (0: nothing done).
    """
    n = models.set_bn_momentum(encoder, 0.0)
    if n:
        encoder(tf.convert_to_tensor(maps, tf.float32), training=True)
        models.set_bn_momentum(encoder, momentum)
    return n


def calibration_maps(stream: tf.data.Dataset, n_max: int = 256) -> np.ndarray:
    """Up to ``n_max`` clean maps from the first batches of a training stream.

    Parameters
    ----------
    stream : tf.data.Dataset
        Batches of maps (B, S, S, 1), or (maps, labels).
    n_max : int
        Most maps returned.

    Returns
    -------
    numpy.ndarray, shape (n, S, S, 1), nm
        The maps.
    """
    found, n = [], 0
    for batch in stream:
        maps = batch[0] if isinstance(batch, (tuple, list)) else batch
        found.append(maps.numpy())
        n += len(found[-1])
        if n >= n_max:
            break
    return np.concatenate(found)[:n_max]


def probe_encoder(encoder: keras.Model, probe: SimCorpus, *, batch_size: int = 64) -> dict:
    """Linear and k-NN probe accuracy of the frozen encoder on ``probe`` for each of :data:`PROBE_TASKS`.

    The probes are trained on the first half of each class' sessions and tested on the other half
    (sessions unseen by the probe's classifier; :func:`probe_train_mask`).

    Parameters
    ----------
    encoder : keras.Model
        The encoder (maps (B, S, S, 1) in nm -> embeddings).
    probe : SimCorpus
        Probe maps from at least two sessions per class.
    batch_size : int
        Maps embedded together.

    Returns
    -------
    dict
        Task -> {"linear", "knn"} -> the probe's metrics (``explain.linear_probe`` / ``knn_probe``).

    Raises
    ------
    ValueError
        Fewer than two sessions per class.
    """
    from .tasks import task_targets

    train = probe_train_mask(probe)
    if train.all():
        raise ValueError("probe maps need at least two sessions per class")
    emb = embed(encoder, probe.maps, batch_size)
    out = {}
    for task in PROBE_TASKS:
        idx, y = task_targets(probe.class_names, probe.labels, task)
        fit, test = idx[train[idx]], idx[~train[idx]]
        args = (emb[fit], y[train[idx]], emb[test], y[~train[idx]])
        out[task] = {name: {k: v for k, v in probe_fn(*args).items() if k != "predictions"}
                     for name, probe_fn in (("linear", linear_probe), ("knn", knn_probe))}
    return out


def probe_train_mask(probe: SimCorpus) -> np.ndarray:
    """Which probe maps a probe classifier is fitted on: the first half of each class' sessions (at least
    one); the other sessions are its test set.

    Parameters
    ----------
    probe : SimCorpus
        The probe maps.

    Returns
    -------
    numpy.ndarray, shape (N,), bool
        True for the fitting maps.
    """
    mask = np.zeros(len(probe), bool)
    for label in np.unique(probe.labels):
        sessions = np.unique(probe.sessions[probe.labels == label])
        mask |= np.isin(probe.sessions, sessions[: max(1, len(sessions) // 2)])
    return mask
