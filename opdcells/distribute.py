"""Training on several devices or machines: ``tf.distribute`` strategies and the loop that runs under them.

Settings (``distribute`` of the training configuration):

* ``"none"``: one device, Keras' own ``model.fit`` (the default);
* ``"mirrored"``: every GPU of this machine (``tf.distribute.MirroredStrategy``);
* ``"multiworker"``: several machines or processes (``tf.distribute.MultiWorkerMirroredStrategy``); each
  worker runs the same command with its ``TF_CONFIG`` (cluster addresses and its own index; see the
  README's "Training on a cluster");
* ``"auto"``: ``multiworker`` when ``TF_CONFIG`` names a cluster, ``mirrored`` with two or more GPUs,
  else ``none``.

Keras 3's ``model.fit`` cannot run under ``MultiWorkerMirroredStrategy`` (it fails converting the
per-replica batches, keras-team/keras#20585, open for Keras 3.7-3.15), so distributed training uses
:func:`fit_distributed`: a plain loop over ``strategy.run`` with the same loss (the recipe's
class-weighted cross-entropy with label smoothing, over the global batch), the same optimizer and early
stopping on the validation loss with the best weights restored. Synchronous data parallelism with the
global batch split over the replicas computes the same gradients as one device (up to summation order;
BatchNorm statistics are per replica).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from .config import DISTRIBUTE

log = logging.getLogger(__name__)

__all__ = ["DISTRIBUTE", "cluster_spec", "resolve", "make_strategy", "is_chief", "fit_distributed"]




def cluster_spec() -> dict | None:
    """The cluster named by ``TF_CONFIG`` (None when it is unset or names no cluster).

    Returns
    -------
    dict or None
        The parsed ``TF_CONFIG`` (``cluster``, ``task``).

    Raises
    ------
    ValueError
        ``TF_CONFIG`` is not JSON.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except ValueError as err:
        raise ValueError(f"TF_CONFIG is not JSON: {err}") from err
    return config if config.get("cluster") else None


def resolve(setting: str) -> str:
    """``setting`` with ``"auto"`` replaced by what this machine and ``TF_CONFIG`` call for.

    Parameters
    ----------
    setting : str
        One of :data:`DISTRIBUTE` ("auto", "none", "mirrored", "multiworker").

    Returns
    -------
    str
        "multiworker" with a cluster in ``TF_CONFIG``, "mirrored" on two or more GPUs, else "none"
        (for "auto"); otherwise ``setting``.

    Raises
    ------
    ValueError
        Unknown setting, or ``"multiworker"`` without a cluster in ``TF_CONFIG``.
    """
    if setting not in DISTRIBUTE:
        raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTE)}, not {setting!r}")
    if setting == "auto":
        if cluster_spec():
            return "multiworker"
        import tensorflow as tf

        return "mirrored" if len(tf.config.list_physical_devices("GPU")) >= 2 else "none"
    if setting == "multiworker" and not cluster_spec():
        raise ValueError("distribute 'multiworker' needs TF_CONFIG naming the cluster and this worker's "
                         "index")
    return setting


def make_strategy(setting: str):
    """The ``tf.distribute.Strategy`` of ``setting`` (the default strategy for ``"none"``).

    Parameters
    ----------
    setting : str
        One of :data:`DISTRIBUTE`; "auto" is resolved first (:func:`resolve`).

    Returns
    -------
    tf.distribute.Strategy

    Raises
    ------
    ValueError
        As :func:`resolve`.
    """
    import tensorflow as tf

    setting = resolve(setting)
    if setting == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if setting == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief() -> bool:
    """True on the worker that writes the outputs: without a cluster, or the ``chief`` task, or worker 0
    of a cluster without a chief (``TF_CONFIG``'s task).

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        ``TF_CONFIG`` is not JSON.
    """
    spec = cluster_spec()
    if spec is None:
        return True
    task = spec.get("task", {})
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in spec["cluster"]


def _sharded(dataset):
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def fit_distributed(strategy, model, optimizer, train, val, *, epochs: int,
                    class_weight: dict[int, float] | None = None, patience: int | None = None,
                    label_smoothing: float = 0.0, log_every_epoch: bool = True) -> dict[str, list[float]]:
    """Train ``model`` under ``strategy`` with synchronous data parallelism.

    Parameters
    ----------
    strategy : tf.distribute.Strategy
        The model and ``optimizer`` must have been created under ``strategy.scope()``.
    model : keras.Model
        Outputs class probabilities ``(batch, n_classes)``.
    optimizer : keras.optimizers.Optimizer
    train, val : tf.data.Dataset
        Batches ``(maps, labels)`` over all replicas; ``val`` may be None. Each step's loss is the mean over
        the maps it holds on all replicas (a last, partial batch included), as in Keras' ``fit``.
    epochs : int
    class_weight : dict, optional
        Class id -> weight of its maps in the loss.
    patience : int, optional
        Stop after this many epochs without a lower validation loss; the best weights are restored.
    label_smoothing : float
        The recipe's label smoothing of the loss (``recipe.SmoothedSparseCrossentropy``), in [0, 1).
    log_every_epoch : bool
        Log each epoch's losses and accuracies.

    Returns
    -------
    dict
        ``loss``, ``accuracy`` (and ``val_loss``, ``val_accuracy``) per epoch, like Keras' history.
    """
    import tensorflow as tf

    from .recipe import SmoothedSparseCrossentropy  # the recipe's loss, as model.fit gets it

    n_classes = int(model.output_shape[-1])
    weights = np.ones(n_classes, np.float32)
    for k, w in (class_weight or {}).items():
        weights[int(k)] = w
    weights = tf.constant(weights)
    cross_entropy = SmoothedSparseCrossentropy(label_smoothing, reduction="none")

    def totals(x, y, training: bool):
        proba = model(x, training=training)
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        per_map = cross_entropy(y, proba)
        # class weights weigh the training loss only, as in Keras' fit (its validation loss is unweighted)
        loss = tf.reduce_sum(per_map * tf.gather(weights, y) if training else per_map)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(proba, axis=-1, output_type=tf.int32), y),
                                        tf.float32))
        return loss, correct, tf.cast(tf.size(y), tf.float32)

    def train_replica(x, y):
        with tf.GradientTape() as tape:
            loss, correct, n = totals(x, y, True)
            # the mean over the maps of this step on all replicas: a last, partial batch is averaged over the
            # maps it holds, as Keras' fit does, not over the full batch size
            n_step = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, n)
            scaled = loss / tf.maximum(n_step, 1.0)
        optimizer.apply(tape.gradient(scaled, model.trainable_variables), model.trainable_variables)
        return loss, correct, n

    @tf.function
    def train_step(x, y):
        return _summed(strategy, strategy.run(train_replica, args=(x, y)))

    @tf.function
    def val_step(x, y):
        return _summed(strategy, strategy.run(lambda a, b: totals(a, b, False), args=(x, y)))

    train_dist = strategy.experimental_distribute_dataset(_sharded(train))
    val_dist = strategy.experimental_distribute_dataset(_sharded(val)) if val is not None else None
    history: dict[str, list[float]] = {"accuracy": [], "loss": []}   # Keras' order
    best, best_weights, waited = np.inf, None, 0
    for epoch in range(epochs):
        loss, acc = _epoch(train_step, train_dist)
        history["loss"].append(loss)
        history["accuracy"].append(acc)
        if val_dist is not None:
            val_loss, val_acc = _epoch(val_step, val_dist)
            history.setdefault("val_accuracy", []).append(val_acc)
            history.setdefault("val_loss", []).append(val_loss)
            if val_loss < best:
                best, best_weights, waited = val_loss, model.get_weights(), 0
            else:
                waited += 1
        if log_every_epoch:
            log.info("epoch %d/%d: %s", epoch + 1, epochs,
                     ", ".join(f"{k} {v[-1]:.4f}" for k, v in history.items()))
        if not np.isfinite(loss):
            log.warning("training stopped at epoch %d: the loss is not finite", epoch + 1)
            break
        if patience is not None and waited >= patience:
            break
    if best_weights is not None:
        model.set_weights(best_weights)
    return history


def _summed(strategy, per_replica):
    import tensorflow as tf

    return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica)


def _epoch(step, batches) -> tuple[float, float]:
    loss = correct = n = 0.0
    for x, y in batches:
        batch_loss, batch_correct, batch_n = step(x, y)
        loss, correct, n = loss + float(batch_loss), correct + float(batch_correct), n + float(batch_n)
    return (loss / n, correct / n) if n else (float("nan"), float("nan"))
