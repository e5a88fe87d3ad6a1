"""Pretrain OPD encoders where labels are scarce: self-supervised on unlabelled maps, or on simulated cells.

Labs hold far more unlabelled OPD maps than labelled ones, and pretraining on them is what let
TOP-GAN (Rubin et al. 2019, Med. Image Anal. 57:176) reach 90-99% on cancer cells from few labelled
maps. ImageNet / DINOv2 weights cannot be downloaded here, so the encoders start from OPD itself:

``simclr``  (Chen et al. 2020) two views of each map, projection MLP, NT-Xent loss: a view must pick
            its partner out of the batch.
``byol``    (Grill et al. 2020) online encoder + projector + predictor regresses the projection of the
            other view made by an EMA target network; no negatives.
``dino``    (Caron et al. 2021) self-distillation: a student matches the centred, sharpened output of
            its EMA teacher over K prototypes (cross-view); the method of DINO / DINOv2 for ViTs.
``supervised-sim``  cross-entropy over the five classes on a large corpus simulated in memory
            (``simulate.simulate_cell`` + ``preprocess.preprocess_map``) from sessions no evaluation
            dataset can contain (session numbers from :data:`SIM_FIRST_SESSION`; seeds recorded).

Views are physically valid OPD maps of the same cell (:class:`ViewConfig`): a zoom/crop that keeps the
whole cell support inside the field (:func:`zoom_crop`), then ``pipeline.augment_batch`` (dihedral
orientation, small shifts, noise, defocus, background tilt/offset, OPD scale). Self-supervised methods
use no labels at all; maps in the test split of a trained model (``exclude_test``) can be held out too.

The output folder is ``models.save_encoder``'s (``config.json`` + ``encoder.weights.h5``, loadable with
``build_encoder(..., weights=folder)``) plus the pretraining record in ``config.json``, ``history.csv``
and ``README.md``.
"""
from __future__ import annotations

import abc
import datetime as _dt
import json
import logging
import math
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

# imported at start-up, not lazily at the end of a run: a long run must finish with the code it began with
from . import __version__, models, registry
from .console import EXIT_OK
from .explain import embed, knn_probe, linear_probe
from .files import json_default, staging, versions, write_history
from .pipeline import AugmentConfig, augment_batch, iter_batches, make_tf_dataset

log = logging.getLogger(__name__)

__all__ = ["METHODS", "BACKBONES", "ViewConfig", "zoom_crop", "make_view", "nt_xent", "SimCorpus",
           "simulate_corpus", "simulated_probe_set", "check_disjoint", "dataset_stream", "corpus_stream",
           "Pretrainer", "SimCLR", "BYOL", "DINO", "SupervisedSim", "build_pretrainer",
           "recalibrate_batchnorm", "probe_encoder", "probe_train_mask", "PretrainResult", "pretrain",
           "cli_command", "register", "run"]

METHODS = ("simclr", "byol", "dino", "supervised-sim")
#: ``--backbone`` -> ``models.build_encoder`` architecture.
BACKBONES = {"mobilenetv2": "mobilenetv2", "dinov2": "dinov2"}
#: Simulated pretraining sessions are numbered from here (``simulate_dataset`` numbers from 1), so
#: no (seed, class, session) random stream of an evaluation dataset is ever reused.
SIM_FIRST_SESSION = 1001
#: Probe sessions (held out from pretraining AND evaluation) are numbered from here.
PROBE_FIRST_SESSION = 5001
SIM_MAPS_PER_SESSION = 40
DEFAULT_N_SIM = 10000
#: Per-method defaults: epochs, learning rate, weight decay.
METHOD_DEFAULTS = {
    "simclr": {"epochs": 20, "learning_rate": 1e-3, "weight_decay": 1e-4},
    "byol": {"epochs": 20, "learning_rate": 1e-3, "weight_decay": 1e-4},
    "dino": {"epochs": 20, "learning_rate": 5e-4, "weight_decay": 0.04},
    "supervised-sim": {"epochs": 10, "learning_rate": 1e-3, "weight_decay": 1e-4},
}


# ---------------------------------------------------------------------- views


@dataclass(frozen=True)
class ViewConfig:
    """How one view of a map is drawn: ``zoom_crop`` then ``pipeline.augment_batch(augment)``.

    zoom: magnification drawn from [1 - zoom, 1 + zoom] (a pixel-size calibration change);
    crop_shift: shift of the crop centre, fraction of the field per axis. Both are limited so that the
    cell's support (non-zero pixels) stays entirely inside the view.
    augment: stronger than training-time defaults (contrastive views need diversity), still physical.
    """

    zoom: float = 0.1
    crop_shift: float = 0.06
    augment: AugmentConfig = AugmentConfig(max_shift_px=4, noise_nm=4.0, max_blur_sigma_px=1.0,
                                           max_tilt_nm=8.0, max_offset_nm=4.0, scale_jitter=0.1)

    def as_dict(self) -> dict:
        return {"zoom": self.zoom, "crop_shift": self.crop_shift, "augment": self.augment.as_dict()}


def _support_extent(x: tf.Tensor, margin_px: float = 2.0) -> tuple[tf.Tensor, tf.Tensor]:
    """Per map, low and high coordinates (B, 2) (rows, cols) of the non-zero pixels plus a margin,
    in ``crop_and_resize``'s normalised units (pixel i at i / (S - 1))."""
    last = tf.cast(tf.shape(x)[1] - 1, tf.float32)
    support = tf.not_equal(x[..., 0], 0.0)
    coords = tf.range(last + 1.0) / last
    lows, highs = [], []
    for axis in (2, 1):  # reduce over columns -> rows present, then over rows -> columns present
        present = tf.reduce_any(support, axis=axis)
        lows.append(tf.reduce_min(tf.where(present, coords, 1.0), axis=1))
        highs.append(tf.reduce_max(tf.where(present, coords, 0.0), axis=1))
    low, high = tf.stack(lows, axis=1) - margin_px / last, tf.stack(highs, axis=1) + margin_px / last
    empty = low > high  # a map of zeros: anything goes
    return tf.where(empty, 0.5, low), tf.where(empty, 0.5, high)


def zoom_crop(x, seed, zoom: float = 0.1, crop_shift: float = 0.06) -> tf.Tensor:
    """Random zoom in/out and crop offset per map of ``x`` (B, S, S, 1) that keeps the cell inside.

    The crop box has half-width ``0.5 / f`` (f in [1 - zoom, 1 + zoom]) and a shifted centre, both
    limited so the box holds every non-zero pixel with a 2-pixel margin; outside the field the view
    is 0 (background). A zoom of f scales the cell's area, and so its integrated OPD, by f^2.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    n = tf.shape(x)[0]
    s_zoom, s_shift = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
    factor = tf.random.stateless_uniform([n, 1], s_zoom, 1.0 - zoom, 1.0 + zoom)
    shift = tf.random.stateless_uniform([n, 2], s_shift, -crop_shift, crop_shift)
    low, high = _support_extent(x)
    half = tf.maximum(0.5 / factor, tf.reduce_max(high - low, axis=1, keepdims=True) / 2)
    centre = tf.clip_by_value(0.5 + shift, high - half, low + half)
    boxes = tf.concat([centre - half, centre + half], axis=1)  # y1, x1, y2, x2
    size = tf.shape(x)[1:3]
    return tf.image.crop_and_resize(x, boxes, tf.range(n), size, method="bilinear", extrapolation_value=0.0)


def make_view(x, seed, config: ViewConfig = ViewConfig()) -> tf.Tensor:
    """One random physically valid view of each map in ``x`` (B, S, S, 1); stateless ``seed`` (2,)."""
    s_crop, s_aug = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
    if config.zoom > 0 or config.crop_shift > 0:
        x = zoom_crop(x, s_crop, config.zoom, config.crop_shift)
    return augment_batch(x, s_aug, config.augment)


# ---------------------------------------------------------------------- losses and heads


def nt_xent(z1, z2, temperature: float = 0.2) -> tf.Tensor:
    """NT-Xent (SimCLR): cross-entropy of picking each view's partner among the other 2B - 1 views."""
    z = tf.math.l2_normalize(tf.cast(tf.concat([z1, z2], axis=0), tf.float32), axis=1)
    n = tf.shape(z)[0] // 2
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits = logits - 1e9 * tf.eye(2 * n)  # a view is not its own partner
    partner = tf.concat([tf.range(n, 2 * n), tf.range(n)], axis=0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(partner, logits))


def _cosine_regression(p, z) -> tf.Tensor:
    """BYOL loss 2 - 2 cos(p, z), batch mean (``z`` is a target: no gradient)."""
    p = tf.math.l2_normalize(p, axis=1)
    z = tf.math.l2_normalize(tf.stop_gradient(z), axis=1)
    return tf.reduce_mean(2.0 - 2.0 * tf.reduce_sum(p * z, axis=1))


def mlp(hidden: int, out: int, name: str, *, n_hidden: int = 1, batch_norm: bool = True) -> keras.Sequential:
    """Projection / prediction head: (Dense, [BN], ReLU) x n_hidden, then a linear Dense."""
    layers = []
    for _ in range(n_hidden):
        layers.append(keras.layers.Dense(hidden, use_bias=not batch_norm))
        if batch_norm:
            layers.append(keras.layers.BatchNormalization(momentum=0.9))
        layers.append(keras.layers.ReLU())
    layers.append(keras.layers.Dense(out))
    return keras.Sequential(layers, name=name)


@keras.saving.register_keras_serializable(package="opdcells")
class CosineLinear(keras.layers.Layer):
    """DINO's last layer: logits = l2-normalised input times l2-normalised prototype columns (g = 1)."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(int(input_shape[-1]), self.units), initializer="glorot_uniform",
                                      name="kernel")

    def call(self, x):
        return tf.matmul(tf.math.l2_normalize(x, axis=-1), tf.math.l2_normalize(self.kernel, axis=0))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def dino_head(hidden: int, bottleneck: int, prototypes: int, name: str) -> keras.Sequential:
    """DINO projection head: MLP (GELU) to a bottleneck, then cosine similarity to K prototypes."""
    return keras.Sequential([keras.layers.Dense(hidden, activation="gelu"),
                             keras.layers.Dense(hidden, activation="gelu"),
                             keras.layers.Dense(bottleneck), CosineLinear(prototypes)], name=name)


def _clone(model: keras.Model, name: str) -> keras.Model:
    """A frozen copy of ``model`` with the same weights (an EMA teacher / target network)."""
    copy = keras.models.clone_model(model)
    copy.name = name
    copy.set_weights(model.get_weights())
    copy.trainable = False
    return copy


def _float_weights(model: keras.Model) -> list:
    return [w for w in model.weights if w.dtype.startswith("float")]


def _ema_update(target: keras.Model, online: keras.Model, momentum) -> None:
    """target <- momentum * target + (1 - momentum) * online, every float weight (BN statistics too)."""
    for t, o in zip(_float_weights(target), _float_weights(online), strict=True):
        t.assign(momentum * t + (1.0 - momentum) * o)


# ---------------------------------------------------------------------- trainers


class Pretrainer(keras.Model):
    """Base of the pretraining methods: an encoder, two views per batch, one pretext loss.

    Subclasses implement ``pretext_loss(v1, v2, y, training) -> (loss, state)`` (``state``: what
    ``after_step`` needs, e.g. teacher outputs) and optionally ``after_step(state)`` (EMA updates).
    ``fit`` on batches of maps (or ``(maps, labels)``) trains; ``evaluate`` scores fixed views.
    """

    def __init__(self, encoder: keras.Model, *, views: ViewConfig = ViewConfig(), seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.views = views
        self.view_seed = int(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._hp: dict = {}

    @property
    def metrics(self):
        return [self.loss_tracker]

    @property
    def hyperparameters(self) -> dict:
        """JSON-ready settings of the method (recorded in config.json)."""
        return dict(self._hp)

    def two_views(self, x, step) -> tuple[tf.Tensor, tf.Tensor]:
        """Two independent views of each map, seeded by (seed, step)."""
        step = tf.cast(step, tf.int64)
        base = tf.constant(self.view_seed, tf.int64)
        return (make_view(x, tf.stack([base, 2 * step]), self.views),
                make_view(x, tf.stack([base, 2 * step + 1]), self.views))

    def embed_views(self, v1, v2, training: bool) -> tf.Tensor:
        """Encoder embeddings of both views in one batch (2B, D): batch statistics over both."""
        return self.encoder(tf.concat([v1, v2], axis=0), training=training)

    @abc.abstractmethod
    def pretext_loss(self, v1, v2, y, training: bool):
        """Loss of one batch of two views (``y``: labels, used by supervised-sim only); every method
        subclass defines it."""

    def after_step(self, state) -> None:
        """Called after each optimiser step (EMA teachers, centres)."""

    @staticmethod
    def _unpack(data):
        if isinstance(data, (tuple, list)):
            return data[0], (data[1] if len(data) > 1 else None)
        return data, None

    def train_step(self, data):
        x, y = self._unpack(data)
        v1, v2 = self.two_views(x, self.optimizer.iterations)
        with tf.GradientTape() as tape:
            loss, state = self.pretext_loss(v1, v2, y, training=True)
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        self.after_step(state)
        self.loss_tracker.update_state(loss)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = self._unpack(data)
        v1, v2 = self.two_views(x, -1)  # the same views every time: comparable before/after training
        loss, _ = self.pretext_loss(v1, v2, y, training=False)
        self.loss_tracker.update_state(loss)
        return {m.name: m.result() for m in self.metrics}


class SimCLR(Pretrainer):
    """SimCLR: projection MLP on the embedding, NT-Xent between the two views of each map."""

    def __init__(self, encoder, *, projection_dim: int = 128, hidden_dim: int = 256, temperature: float = 0.2,
                 **kwargs):
        super().__init__(encoder, **kwargs)
        self.temperature = float(temperature)
        self.projector = mlp(hidden_dim, projection_dim, "projector")
        self._hp = {"projection_dim": projection_dim, "hidden_dim": hidden_dim, "temperature": temperature}

    def pretext_loss(self, v1, v2, y, training):
        z1, z2 = tf.split(self.projector(self.embed_views(v1, v2, training), training=training), 2)
        return nt_xent(z1, z2, self.temperature), None


class _Teacher(Pretrainer):
    """Pretrainer with an EMA copy of the encoder and of a head (BYOL target, DINO teacher)."""

    def __init__(self, encoder, head: keras.Model, *, momentum: float, **kwargs):
        super().__init__(encoder, **kwargs)
        self.head = head
        self.momentum = float(momentum)
        emb = keras.Input(encoder.output_shape[1:])
        self.head(emb)  # build the head before cloning it
        self.teacher_encoder = _clone(encoder, "teacher_encoder")
        self.teacher_head = _clone(head, "teacher_head")

    def teacher_outputs(self, v1, v2) -> tf.Tensor:
        """Teacher head outputs of both views (2B, K), inference mode, no gradient."""
        emb = self.teacher_encoder(tf.concat([v1, v2], axis=0), training=False)
        return tf.stop_gradient(self.teacher_head(emb, training=False))

    def after_step(self, state) -> None:
        _ema_update(self.teacher_encoder, self.encoder, self.momentum)
        _ema_update(self.teacher_head, self.head, self.momentum)


class BYOL(_Teacher):
    """BYOL: online projector + predictor regress the EMA target's projection of the other view."""

    def __init__(self, encoder, *, projection_dim: int = 128, hidden_dim: int = 256, momentum: float = 0.99,
                 **kwargs):
        super().__init__(encoder, mlp(hidden_dim, projection_dim, "projector"), momentum=momentum, **kwargs)
        self.predictor = mlp(hidden_dim, projection_dim, "predictor")
        self._hp = {"projection_dim": projection_dim, "hidden_dim": hidden_dim, "momentum": momentum}

    def pretext_loss(self, v1, v2, y, training):
        p1, p2 = tf.split(self.predictor(self.head(self.embed_views(v1, v2, training), training=training),
                                         training=training), 2)
        t1, t2 = tf.split(self.teacher_outputs(v1, v2), 2)
        return (_cosine_regression(p1, t2) + _cosine_regression(p2, t1)) / 2, None


class DINO(_Teacher):
    """DINO self-distillation: student (temperature ``student_temp``) matches the teacher's centred,
    sharpened (``teacher_temp``) distribution of the other view over ``prototypes`` outputs."""

    def __init__(self, encoder, *, prototypes: int = 256, hidden_dim: int = 256, bottleneck: int = 64,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, momentum: float = 0.99,
                 center_momentum: float = 0.9, **kwargs):
        head = dino_head(hidden_dim, bottleneck, prototypes, "dino_head")
        super().__init__(encoder, head, momentum=momentum, **kwargs)
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.center_momentum = float(center_momentum)
        self.center = self.add_weight(shape=(1, prototypes), initializer="zeros", trainable=False,
                                      name="center")
        self._hp = {"prototypes": prototypes, "hidden_dim": hidden_dim, "bottleneck": bottleneck,
                    "student_temp": student_temp, "teacher_temp": teacher_temp, "momentum": momentum,
                    "center_momentum": center_momentum}

    def pretext_loss(self, v1, v2, y, training):
        student = self.head(self.embed_views(v1, v2, training), training=training) / self.student_temp
        teacher_logits = self.teacher_outputs(v1, v2)
        teacher = tf.nn.softmax((teacher_logits - self.center) / self.teacher_temp, axis=-1)
        t1, t2 = tf.split(teacher, 2)
        s1, s2 = tf.split(tf.nn.log_softmax(student, axis=-1), 2)
        cross = tf.reduce_sum(t1 * s2, axis=-1) + tf.reduce_sum(t2 * s1, axis=-1)  # each view vs the other
        return -tf.reduce_mean(cross) / 2, tf.reduce_mean(teacher_logits, axis=0, keepdims=True)

    def after_step(self, state) -> None:
        super().after_step(state)
        self.center.assign(self.center_momentum * self.center + (1.0 - self.center_momentum) * state)


class SupervisedSim(Pretrainer):
    """Supervised pretraining on simulated maps: softmax head, cross-entropy on both views."""

    def __init__(self, encoder, n_classes: int, **kwargs):
        super().__init__(encoder, **kwargs)
        self.classifier = keras.layers.Dense(n_classes, name="sim_classifier")
        self.acc_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._hp = {"n_classes": int(n_classes)}

    @property
    def metrics(self):
        return [self.loss_tracker, self.acc_tracker]

    def pretext_loss(self, v1, v2, y, training):
        if y is None:
            raise ValueError("supervised-sim needs labelled batches (maps, labels)")
        logits = self.classifier(self.embed_views(v1, v2, training))
        labels = tf.concat([y, y], axis=0)
        self.acc_tracker.update_state(labels, logits)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)), None


def build_pretrainer(method: str, encoder: keras.Model, *, n_classes: int | None = None, seed: int = 0,
                     views: ViewConfig = ViewConfig(), **method_kw) -> Pretrainer:
    """The :class:`Pretrainer` of ``method`` around ``encoder`` (``n_classes`` for supervised-sim)."""
    if method == "simclr":
        return SimCLR(encoder, views=views, seed=seed, **method_kw)
    if method == "byol":
        return BYOL(encoder, views=views, seed=seed, **method_kw)
    if method == "dino":
        return DINO(encoder, views=views, seed=seed, **method_kw)
    if method == "supervised-sim":
        if not n_classes:
            raise ValueError("supervised-sim needs n_classes")
        return SupervisedSim(encoder, n_classes, views=views, seed=seed, **method_kw)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------- simulated corpus


@dataclass
class SimCorpus:
    """Simulated, preprocessed OPD maps in memory and the record of how they were made."""

    maps: np.ndarray          # (N, S, S) float32 nm
    labels: np.ndarray        # (N,) int, index into class_names
    class_names: tuple[str, ...]
    sessions: np.ndarray      # (N,) str "<class>/session_<k>"
    record: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def simulate_corpus(n_maps: int, seed: int = 0, *, first_session: int = SIM_FIRST_SESSION,
                    maps_per_session: int = SIM_MAPS_PER_SESSION, config=None, cache_dir=None,
                    workers: int = 1) -> SimCorpus:
    """Simulate ``n_maps`` preprocessed maps, balanced over the five classes, in memory.

    Session ``k`` of a class (k = first_session, first_session + 1, ...) holds ``maps_per_session``
    cells drawn with ``simulate.cell_rng(seed, class, k, i)``; ``simulate_dataset`` numbers its sessions
    from 1, so with ``first_session`` above any real session count the corpus shares no random stream
    (and no session) with an evaluation dataset, whatever its seed. Maps the preprocessing rejects are
    skipped (counted in the record). ``cache_dir``: reuse/save the corpus as an ``.npz`` there.
    ``workers`` > 1 simulates sessions in that many processes; the corpus is the same.
    """
    from .preprocess import PreprocessConfig
    from .simulate import CLASS_NAMES, cell_rng, sample_session

    config = config or PreprocessConfig()
    per_class = math.ceil(n_maps / len(CLASS_NAMES))
    n_sessions = math.ceil(per_class / maps_per_session)
    record = {"generator": "opdcells.simulate.simulate_cell + preprocess.preprocess_map",
              "seed": int(seed), "rng": "simulate.cell_rng(seed, class, session, index)",
              "classes": list(CLASS_NAMES), "sessions_per_class": n_sessions,
              "session_numbers": [first_session, first_session + n_sessions - 1],
              "maps_per_session": maps_per_session, "n_requested": int(n_maps),
              "pixel_size_um": config.out_pixel_size_um, "out_size": config.out_size,
              "opdcells_version": __version__}
    if first_session < PROBE_FIRST_SESSION < first_session + n_sessions:
        raise ValueError(f"{n_sessions} sessions from {first_session} reach the probe sessions "
                         f"({PROBE_FIRST_SESSION}...): simulate fewer maps or more maps per session")
    cache = _corpus_cache(cache_dir, record)
    if cache is not None and cache.is_file():
        log.info("simulated corpus from cache %s", cache)
        return _load_corpus(cache, record)
    jobs = [(label, class_name, first_session + j, min(maps_per_session, per_class - j * maps_per_session))
            for label, class_name in enumerate(CLASS_NAMES) for j in range(n_sessions)]
    maps, labels, sessions, rejected = [], [], [], 0
    start = time.perf_counter()
    for (label, class_name, k, _), (made, n_rejected) in zip(
            jobs, _map_sessions(jobs, seed, config, workers), strict=True):
        session_id = sample_session(cell_rng(seed, class_name, k), class_name, k).session_id
        maps += made
        labels += [label] * len(made)
        sessions += [f"{class_name}/{session_id}"] * len(made)
        rejected += n_rejected
    record.update(n_maps=len(labels), n_rejected=rejected,
                  class_counts={c: int(np.sum(np.asarray(labels) == i)) for i, c in enumerate(CLASS_NAMES)},
                  time_s=round(time.perf_counter() - start, 1))
    log.info("simulated %d maps in %.0f s (%d rejected)", len(labels), record["time_s"], rejected)
    corpus = SimCorpus(np.stack(maps).astype(np.float32), np.asarray(labels, np.int64), tuple(CLASS_NAMES),
                       np.asarray(sessions), record)
    if cache is not None:
        _save_corpus(cache, corpus)
    return corpus


def _map_sessions(jobs, seed: int, config, workers: int):
    """``simulate.simulate_preprocessed`` of each (label, class, session, n) job, in order, with a
    progress bar; in ``workers`` spawned processes when > 1 (TensorFlow is not forked)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from .simulate import simulate_preprocessed

    args = [(seed, class_name, k, n, config) for _, class_name, k, n in jobs]
    total = sum(job[3] for job in jobs)
    with tqdm(total=total, desc="simulating corpus", unit="map", disable=total < 200) as bar:
        if workers <= 1:
            for a in args:
                result = simulate_preprocessed(*a)
                bar.update(a[3])
                yield result
            return
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            columns = [list(column) for column in zip(*args, strict=True)]
            for a, result in zip(args, pool.map(simulate_preprocessed, *columns), strict=True):
                bar.update(a[3])
                yield result


def _corpus_cache(cache_dir, record: dict) -> Path | None:
    if cache_dir is None:
        return None
    lo, hi = record["session_numbers"]
    name = (f"simcorpus_n{record['n_requested']}_seed{record['seed']}_sessions{lo}-{hi}x"
            f"{record['maps_per_session']}_{record['out_size']}px_{record['pixel_size_um']}um"
            f"_v{__version__}.npz")
    return Path(cache_dir) / name


def _save_corpus(path: Path, corpus: SimCorpus) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, maps=corpus.maps, labels=corpus.labels, class_names=np.asarray(corpus.class_names),
             sessions=corpus.sessions, record=json.dumps(corpus.record))
    tmp.replace(path)
    log.info("cached the simulated corpus in %s", path)


def _load_corpus(path: Path, expected: dict) -> SimCorpus:
    with np.load(path) as data:
        record = json.loads(str(data["record"]))
        if any(record.get(k) != v for k, v in expected.items()):
            raise ValueError(f"{path}: cached corpus was made with other settings")
        return SimCorpus(data["maps"], data["labels"], tuple(data["class_names"].tolist()), data["sessions"],
                         {**record, "cache": str(path)})


def check_disjoint(corpus: SimCorpus, datasets) -> list[dict]:
    """Raise ValueError if an evaluation dataset holds one of the corpus' sessions; return their records."""
    ours = {s.rsplit("/", 1)[-1] for s in corpus.sessions}
    out = []
    for ds in datasets:
        groups = {str(g).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] for g in np.unique(ds.groups)}
        shared = sorted(ours & groups)
        if shared:
            raise ValueError(f"{ds.path}: holds simulated sessions {shared[:5]} of the pretraining corpus")
        out.append(_dataset_record(ds))
    return out


# ---------------------------------------------------------------------- data streams


def _dataset_record(ds, used=None, excluded=None) -> dict:
    return {"path": str(Path(ds.path).resolve()), "fingerprint": ds.fingerprint, "n_maps": len(ds),
            "n_used": len(ds) if used is None else int(len(used)),
            "excluded_test_maps": 0 if excluded is None else int(len(excluded))}


def _test_indices_of(model_dirs, ds) -> np.ndarray:
    """Test-split indices in ``ds`` of the trained model folders that were trained on it."""
    from .errors import DatasetError
    from .evaluate import stored_test_indices
    from .modelfolder import load_model

    found = [np.empty(0, np.int64)]
    for folder in model_dirs:
        try:
            found.append(stored_test_indices(load_model(folder), ds))
            log.info("%s: leaving out the %d test maps of model %s", ds.path, len(found[-1]), folder)
        except DatasetError:
            log.info("%s: model %s was trained on another dataset; nothing left out", ds.path, folder)
    return np.unique(np.concatenate(found))


def dataset_stream(datasets, *, batch_size: int, seed: int = 0, exclude_test=()) -> tuple[tf.data.Dataset,
                                                                                           int, list[dict]]:
    """Unlabelled batches (B, S, S, 1) from opened datasets (shuffled, remainder dropped).

    Returns the stream, the number of maps and a record per dataset. Maps in the test split of any
    model folder in ``exclude_test`` are left out.
    """
    streams, sizes, records = [], [], []
    for i, ds in enumerate(datasets):
        excluded = _test_indices_of(exclude_test, ds)
        used = np.setdiff1d(np.arange(len(ds)), excluded)
        streams.append(make_tf_dataset(ds, used, None, batch_size=batch_size, training=True, augment=None,
                                       seed=seed + i))
        sizes.append(len(used))
        records.append(_dataset_record(ds, used, excluded))
    stream = streams[0] if len(streams) == 1 else tf.data.Dataset.sample_from_datasets(
        streams, weights=[s / sum(sizes) for s in sizes], seed=seed, stop_on_empty_dataset=False)
    stream = stream.rebatch(batch_size, drop_remainder=True)
    n_maps = int(sum(sizes))
    return stream.apply(tf.data.experimental.assert_cardinality(n_maps // batch_size)), n_maps, records


def corpus_stream(corpus: SimCorpus, *, batch_size: int, seed: int = 0, labelled: bool) -> tf.data.Dataset:
    """Shuffled batches of the in-memory corpus: maps (B, S, S, 1), with int labels if ``labelled``."""
    rng = np.random.default_rng(seed)
    size = corpus.maps.shape[1]

    def generate():
        for pos in iter_batches(len(corpus), batch_size, rng):
            if len(pos) == batch_size:
                pos = np.sort(pos)
                maps = corpus.maps[pos][..., None]
                yield (maps, corpus.labels[pos].astype(np.int32)) if labelled else maps

    map_spec = tf.TensorSpec((batch_size, size, size, 1), tf.float32)
    spec = (map_spec, tf.TensorSpec((batch_size,), tf.int32)) if labelled else map_spec
    stream = tf.data.Dataset.from_generator(generate, output_signature=spec)
    return stream.apply(tf.data.experimental.assert_cardinality(len(corpus) // batch_size)).prefetch(2)


# ---------------------------------------------------------------------- probing


def recalibrate_batchnorm(encoder: keras.Model, maps, momentum: float) -> int:
    """Set every BatchNormalization layer's moving statistics to those of ``maps`` (N, S, S, 1).

    One training-mode pass at momentum 0, then momentum back to ``momentum``. A random-init CNN's
    moving statistics (mean 0, variance 1) make its inference-mode embeddings vanish (~1e-12 for
    MobileNetV2), so probes of random init are meaningless without this; after pretraining it replaces
    statistics of augmented views by those of clean maps. Returns the number of BN layers.
    """
    n = models.set_bn_momentum(encoder, 0.0)
    if n:
        encoder(tf.convert_to_tensor(maps, tf.float32), training=True)
        models.set_bn_momentum(encoder, momentum)
    return n


def _calibration_maps(stream: tf.data.Dataset, n_max: int = 256) -> np.ndarray:
    """Up to ``n_max`` clean maps (B, S, S, 1) from the first batches of a training stream."""
    found, n = [], 0
    for batch in stream:
        maps = batch[0] if isinstance(batch, (tuple, list)) else batch
        found.append(maps.numpy())
        n += len(found[-1])
        if n >= n_max:
            break
    return np.concatenate(found)[:n_max]


def simulated_probe_set(n_maps: int, seed: int = 0, *, n_sessions: int = 4, cache_dir=None) -> SimCorpus:
    """Simulated maps for probes: ``n_sessions`` sessions per class numbered from
    :data:`PROBE_FIRST_SESSION`, unseen by pretraining corpora and evaluation datasets."""
    from .simulate import CLASS_NAMES

    per_session = max(1, math.ceil(n_maps / len(CLASS_NAMES) / n_sessions))
    return simulate_corpus(n_maps, seed, first_session=PROBE_FIRST_SESSION, maps_per_session=per_session,
                           cache_dir=cache_dir)


PROBE_TASKS = ("five_class", "cancer_vs_blood")


def probe_encoder(encoder: keras.Model, probe: SimCorpus, *, batch_size: int = 64) -> dict:
    """Linear and k-NN probe accuracy of the frozen encoder on ``probe`` for each of :data:`PROBE_TASKS`:
    trained on the first half of each class' sessions, tested on the other half (sessions unseen by
    the probe's classifier)."""
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
    """Boolean mask of the probe maps a probe classifier is fitted on: the first half of each class'
    sessions (at least one); the other sessions are its test set."""
    mask = np.zeros(len(probe), bool)
    for label in np.unique(probe.labels):
        sessions = np.unique(probe.sessions[probe.labels == label])
        mask |= np.isin(probe.sessions, sessions[: max(1, len(sessions) // 2)])
    return mask


# ---------------------------------------------------------------------- pretrain


@dataclass
class PretrainResult:
    """What :func:`pretrain` made: the encoder folder, the per-epoch history and the config written."""

    folder: Path
    history: dict[str, list[float]]
    config: dict


def _git_commit() -> dict | None:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(dirty)}


def _optimizer(learning_rate: float, weight_decay: float, total_steps: int) -> keras.optimizers.Optimizer:
    warmup = min(max(1, total_steps // 10), 500)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup), warmup_target=learning_rate, warmup_steps=warmup)
    return keras.optimizers.AdamW(schedule, weight_decay=weight_decay, clipnorm=3.0)


class _TimeLimit(keras.callbacks.Callback):
    """Stop training after ``seconds`` (checked after every batch)."""

    def __init__(self, seconds: float | None):
        super().__init__()
        self.seconds, self.start, self.hit = seconds, time.perf_counter(), False

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.seconds is not None and time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = self.hit = True


class _StepCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def _open_all(data) -> list:
    from .dataset import open_dataset

    return [open_dataset(p) for p in ([data] if isinstance(data, (str, Path)) else list(data or []))]


def pretrain(data=None, *, backbone: str = "mobilenetv2", method: str = "simclr",
             out="saved_models/opd_pretrained", epochs: int | None = None, input_size: int = 64,
             n_sim: int = DEFAULT_N_SIM, seed: int = 0, batch_size: int = 64,
             learning_rate: float | None = None, weight_decay: float | None = None,
             alpha: float | None = None, norm_scale_nm: float = models.DEFAULT_NORM_SCALE_NM,
             dinov2_config: dict | None = None,
             views: ViewConfig = ViewConfig(), exclude_test=(), n_probe: int = 0,
             max_minutes: float | None = None, sim_cache=None,
             sim_maps_per_session: int = SIM_MAPS_PER_SESSION,
             workers: int = 1, init=None, method_kw: dict | None = None, command: str | None = None,
             verbose=0) -> PretrainResult:
    """Pretrain a ``backbone`` encoder with ``method`` and write it to ``out`` (see the module docstring).

    data: opdcells dataset path(s). Self-supervised methods train on their maps (no labels; test maps
        of the model folders in ``exclude_test`` are left out); without data they train on ``n_sim``
        simulated maps, labels unused. ``supervised-sim`` always trains on ``n_sim`` simulated maps with
        their labels; datasets given are evaluation data its sessions are checked to be disjoint from.
    n_probe: if > 0, simulate that many maps from further unseen sessions and record linear / k-NN
        probe accuracy of the random-init and of the pretrained encoder in the config.
    max_minutes: stop early after this much training time (recorded).
    sim_maps_per_session: maps per simulated session (fewer -> more sessions, more acquisition variety).
    workers: processes that simulate the corpus.
    init: an encoder folder (``models.save_encoder``'s, e.g. an earlier run) to start from instead of
        random weights, at this run's ``input_size`` (continued pretraining; its width is kept).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    defaults = METHOD_DEFAULTS[method]
    epochs = int(epochs or defaults["epochs"])
    learning_rate = float(learning_rate or defaults["learning_rate"])
    weight_decay = float(defaults["weight_decay"] if weight_decay is None else weight_decay)
    datasets = _open_all(data)
    started = time.perf_counter()
    git = _git_commit()    # the code that runs, recorded before a long run (the tree may change meanwhile)
    init_from = _init_record(init, BACKBONES[backbone])   # likewise the starting folder, before it can change
    try:
        stream, n_maps, data_record, n_classes = _training_data(
            method, datasets, n_sim=n_sim, seed=seed, batch_size=batch_size, exclude_test=exclude_test,
            sim_cache=sim_cache, maps_per_session=sim_maps_per_session, workers=workers)
        size = int(data_record["out_size"])
        steps_per_epoch = n_maps // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"{n_maps} maps are fewer than one batch of {batch_size}")
        encoder, info = models.build_encoder(
            BACKBONES[backbone], input_shape=(size, size, 1), input_size=input_size,
            weights="none" if init is None else init, norm_scale_nm=norm_scale_nm, alpha=alpha, seed=seed,
            dinov2_config=dinov2_config)
        probe = simulated_probe_set(n_probe, seed, cache_dir=sim_cache) if n_probe else None
        calibration = _calibration_maps(stream)
        recalibrate_batchnorm(encoder, calibration, info["bn_momentum"] or 0.9)
        probe_before = probe_encoder(encoder, probe) if probe is not None else None
        trainer = build_pretrainer(method, encoder, n_classes=n_classes, seed=seed, views=views,
                                   **(method_kw or {}))
        trainer.compile(optimizer=_optimizer(learning_rate, weight_decay, epochs * steps_per_epoch),
                        jit_compile=False)
        limit, counter = _TimeLimit(None if max_minutes is None else 60.0 * max_minutes), _StepCounter()
        fit_start = time.perf_counter()
        history = trainer.fit(stream, epochs=epochs, callbacks=[limit, counter], shuffle=False,
                              verbose=verbose).history
        fit_time = time.perf_counter() - fit_start
        recalibrate_batchnorm(encoder, calibration, info["bn_momentum"] or 0.9)
        probe_after = probe_encoder(encoder, probe) if probe is not None else None
    finally:
        for ds in datasets:
            ds.close()
    history = {k: [float(v) for v in values] for k, values in history.items()}
    config = _pretrain_config(
        info=info, method=method, backbone=backbone, trainer=trainer, data_record=data_record,
        history=history, epochs=epochs, steps=counter.steps, steps_per_epoch=steps_per_epoch,
        batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay, seed=seed,
        fit_time=fit_time, total_time=time.perf_counter() - started, stopped_early=limit.hit,
        max_minutes=max_minutes, git=git, init_from=init_from,
        probe={"before": probe_before, "after": probe_after, "record": probe.record} if probe else None,
        command=command or _python_command(data, backbone, method, out, epochs, input_size, n_sim, seed,
                                           batch_size))
    folder = _write_folder(Path(out), encoder, info, config, history)
    log.info("pretrained %s (%s) in %.0f s: final loss %.4f -> %s", backbone, method, config["time_s"],
             config["final_loss"], folder)
    return PretrainResult(folder, history, config)


def _common_geometry(datasets) -> tuple[float, int]:
    """(pixel size, map size) shared by all datasets; ValueError if they differ."""
    geometry = {(round(ds.pixel_size_um, 6), ds.out_size) for ds in datasets}
    if len(geometry) > 1:
        raise ValueError(f"datasets differ in pixel size / map size {sorted(geometry)}: ingest them with one "
                         "preprocessing configuration")
    return next(iter(geometry))


def _training_data(method, datasets, *, n_sim, seed, batch_size, exclude_test, sim_cache,
                   maps_per_session=SIM_MAPS_PER_SESSION, workers=1):
    """(stream, number of maps, data record, number of classes or None) for ``method``."""
    if datasets and method != "supervised-sim":
        pixel_size, size = _common_geometry(datasets)
        stream, n_maps, records = dataset_stream(datasets, batch_size=batch_size, seed=seed,
                                                 exclude_test=exclude_test)
        return stream, n_maps, {"kind": "datasets", "labels_used": False, "pixel_size_um": pixel_size,
                                "out_size": size, "datasets": records}, None
    corpus = simulate_corpus(n_sim, seed, cache_dir=sim_cache, maps_per_session=maps_per_session,
                             workers=workers)
    labelled = method == "supervised-sim"
    record = {"kind": "simulated", "labels_used": labelled, "pixel_size_um": corpus.record["pixel_size_um"],
              "out_size": corpus.record["out_size"], "simulated": corpus.record,
              "disjoint_from": check_disjoint(corpus, datasets)}
    stream = corpus_stream(corpus, batch_size=batch_size, seed=seed, labelled=labelled)
    return stream, len(corpus), record, len(corpus.class_names) if labelled else None


def _python_command(data, backbone, method, out, epochs, input_size, n_sim, seed, batch_size) -> str:
    """The Python call that reproduces a run made through the API (the CLI records its own argv)."""
    return (f"opdcells.pretrain.pretrain({data!r}, backbone={backbone!r}, method={method!r}, "
            f"out={str(out)!r}, epochs={epochs}, input_size={input_size}, n_sim={n_sim}, seed={seed}, "
            f"batch_size={batch_size})")


def _pretrain_config(*, info, method, backbone, trainer, data_record, history, epochs, steps, steps_per_epoch,
                     batch_size, learning_rate, weight_decay, seed, fit_time, total_time, stopped_early,
                     max_minutes, probe, command, git, init_from=None) -> dict:
    losses = history.get("loss") or [float("nan")]
    return {
        "method": method,
        "backbone": backbone,
        "data": data_record,
        "epochs": epochs,
        "epochs_run": len(history.get("loss", [])),
        "steps": int(steps),
        "final_loss": losses[-1],
        "time_s": round(total_time, 1),
        "pretraining": {
            "steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "optimizer": "AdamW",
            "learning_rate": learning_rate, "schedule": "linear warmup (10% of steps, <= 500) + cosine decay",
            "weight_decay": weight_decay, "clipnorm": 3.0, "seed": seed, "views": trainer.views.as_dict(),
            "hyperparameters": trainer.hyperparameters, "fit_time_s": round(fit_time, 1),
            "stopped_early": bool(stopped_early), "max_minutes": max_minutes,
            "batchnorm": "moving statistics recalibrated on up to 256 clean training maps after training",
        },
        "probe": probe,
        "command": command,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "init_from": init_from,
        "git": git,
        "build_info": {k: v for k, v in info.items() if k not in ("weights_note",)},
    }


def _init_record(init, architecture: str) -> dict | None:
    """Where a continued pretraining starts: the folder and what its own config says it was."""
    if init is None:
        return None
    resolved = registry.resolve_weights(architecture, init)   # "opd", "opd:NAME" or a folder/file
    if resolved.kind != "file":
        raise ValueError(f"--init {init}: not an encoder folder, weights file or registry entry")
    record = {"folder": str(init), "init": resolved.init}
    config = resolved.config or {}
    for key in ("method", "input_size", "epochs_run", "command"):
        if key in config:
            record[key] = config[key]
    return record


def _write_folder(out: Path, encoder, info: dict, config: dict, history: dict) -> Path:
    """Encoder weights + config (``models.save_encoder``) with the pretraining record, history, README."""
    with staging(out) as tmp:
        models.save_encoder(encoder, {**info, "init": "opd-pretrained", "weights_source": None}, tmp)
        saved = json.loads((tmp / models.ENCODER_CONFIG).read_text())
        merged = {**saved, **config}
        (tmp / models.ENCODER_CONFIG).write_text(json.dumps(merged, indent=1, default=json_default) + "\n")
        write_history(tmp / "history.csv", history)
        (tmp / "README.md").write_text(_readme(out.name, merged))
    config.clear()
    config.update(merged)
    return out


def _data_summary(data: dict) -> str:
    if data["kind"] == "simulated":
        sim = data["simulated"]
        first, last = sim["session_numbers"]
        labels = "used" if data["labels_used"] else "NOT used"
        return (f"{sim['n_maps']} simulated maps (seed {sim['seed']}, sessions {first}-{last} of each class, "
                f"{sim['maps_per_session']} maps each); labels {labels}")
    return "; ".join(f"{d['path']} ({d['n_used']} maps, fingerprint {d['fingerprint'][:12]})"
                     for d in data["datasets"]) + "; labels NOT used"


def _probe_labels(config: dict) -> tuple[tuple[str, str], ...]:
    start = f"start ({config['init_from']['folder']})" if config.get("init_from") else "random init"
    return (start, "before"), ("pretrained", "after")


def _probe_table(probe: dict, labels) -> list[str]:
    rows = [f"Frozen-embedding probes on {probe['record']['n_maps']} simulated maps from unseen sessions "
            "(classifier trained on half of each class' sessions, tested on the others); accuracy:", "",
            "| encoder | 5-class linear | 5-class 5-NN | cancer vs blood linear | cancer vs blood 5-NN |",
            "|---|---|---|---|---|"]
    for label, key in labels:
        cells = [f"{probe[key][task][kind]['accuracy']:.3f}"
                 for task in PROBE_TASKS for kind in ("linear", "knn")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows + [""]


def _readme(name: str, config: dict) -> str:
    """Human summary of an encoder folder, generated from its config."""
    batch = config["pretraining"]["batch_size"]
    width = f", alpha {config['alpha']}" if config.get("alpha") else ""
    use = (f"Use: `python -m opdcells train --model {config['architecture']} --weights <this folder>`; to "
           "ship it, move the folder to `opdcells/pretrained/NAME/` and add its `opdcells.registry` entry "
           "(then `--weights opd:NAME`; docs/pretraining.md).")
    lines = [
        f"# {name}", "",
        f"OPD encoder ({config['architecture']}{width}, "
        f"input {config['input_size']} px, OPD / {config['norm_scale_nm']:g} nm) "
        f"pretrained with **{config['method']}** by `opdcells.pretrain`.", "",
        f"* data: {_data_summary(config['data'])}",
        f"* {config['epochs_run']} epochs, {config['steps']} steps of {batch} maps, "
        f"final loss {config['final_loss']:.4f}, {config['time_s']:.0f} s",
        *([f"* continued from `{config['init_from']['folder']}` (its command: "
           f"`{config['init_from'].get('command', '?')}`)"] if config.get("init_from") else []),
        f"* opdcells {__version__}, keras {keras.__version__}, tensorflow {tf.__version__}", "",
        *(_probe_table(config["probe"], _probe_labels(config)) if config.get("probe") else []),
        "Reproduce:", "", "```", config["command"], "```", "",
        use,
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    """Add the ``pretrain`` subcommand to an argparse subparsers object (see ``opdcells.cli``)."""
    from .console import common_options

    p = subparsers.add_parser("pretrain", parents=[common_options()], help="pretrain an OPD encoder",
                              description="Pretrain an OPD encoder self-supervised (SimCLR, BYOL, DINO) on "
                                          "unlabelled maps, or supervised on simulated maps.")
    p.add_argument("--data", nargs="*", default=[], metavar="DATASET.h5",
                   help="datasets of unlabelled maps (self-supervised); for supervised-sim, evaluation "
                        "datasets its simulated sessions must be disjoint from. None: simulated maps")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="mobilenetv2")
    p.add_argument("--method", choices=METHODS, default="simclr")
    p.add_argument("--out", required=True, help="output folder, e.g. saved_models/NAME; to ship the encoder, "
                   "opdcells/pretrained/NAME plus its opdcells.registry entry (docs/pretraining.md)")
    p.add_argument("--epochs", type=int, default=None, help="default per method: " + ", ".join(
        f"{m} {d['epochs']}" for m, d in METHOD_DEFAULTS.items()))
    p.add_argument("--input-size", type=int, default=64, help="model input size after the resize (px)")
    p.add_argument("--n-sim", type=int, default=DEFAULT_N_SIM, help="simulated maps (supervised-sim, or SSL "
                   "without --data); ~0.1 s of CPU each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method)")
    p.add_argument("--alpha", type=float, default=None, help="MobileNetV2 width (default 0.35)")
    p.add_argument("--exclude-test", nargs="*", default=[], metavar="MODEL_DIR",
                   help="leave out the test-split maps of these trained model folders")
    p.add_argument("--probe", type=int, default=0, metavar="N",
                   help="simulate N maps from unseen sessions and record linear/k-NN probe accuracy")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    p.add_argument("--sim-cache", default=None, metavar="DIR", help="cache simulated maps as .npz here")
    p.add_argument("--sim-maps-per-session", type=int, default=SIM_MAPS_PER_SESSION, metavar="N",
                   help="maps per simulated session (fewer: more sessions, more acquisition variety)")
    p.add_argument("--workers", type=int, default=1, help="processes that simulate the corpus")
    p.add_argument("--init", default=None, metavar="ENCODER_DIR",
                   help="start from this encoder folder (an earlier run), or opd / opd:NAME (a registry "
                        "entry), instead of random weights")
    p.set_defaults(run=run)


_CLI_OPTIONS = (("data", "--data"), ("backbone", "--backbone"), ("method", "--method"), ("out", "--out"),
                ("epochs", "--epochs"), ("input_size", "--input-size"), ("n_sim", "--n-sim"),
                ("seed", "--seed"), ("batch_size", "--batch-size"), ("lr", "--lr"), ("alpha", "--alpha"),
                ("exclude_test", "--exclude-test"), ("probe", "--probe"), ("max_minutes", "--max-minutes"),
                ("sim_cache", "--sim-cache"), ("sim_maps_per_session", "--sim-maps-per-session"),
                ("init", "--init"))


def cli_command(args) -> str:
    """The ``python -m opdcells pretrain`` command line that repeats a run (every option spelt out)."""
    parts = ["python", "-m", "opdcells", "pretrain"]
    for key, flag in _CLI_OPTIONS:
        value = getattr(args, key, None)
        if value is None or value == [] or (key == "probe" and not value):
            continue
        parts += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    """Run the ``pretrain`` subcommand; prints where the encoder went. Exit status 0."""
    command = cli_command(args)
    result = pretrain(args.data, backbone=args.backbone, method=args.method, out=args.out,
                      epochs=args.epochs, input_size=args.input_size, n_sim=args.n_sim, seed=args.seed,
                      batch_size=args.batch_size, learning_rate=args.lr, alpha=args.alpha,
                      exclude_test=args.exclude_test, n_probe=args.probe, max_minutes=args.max_minutes,
                      sim_cache=args.sim_cache, sim_maps_per_session=args.sim_maps_per_session,
                      workers=args.workers, init=args.init, command=command, verbose=0 if args.quiet else 2)
    cfg = result.config
    print(f"{result.folder}: {cfg['method']} {cfg['backbone']}, {cfg['steps']} steps, final loss "
          f"{cfg['final_loss']:.4f}, {cfg['time_s']:.0f} s")
    if cfg.get("probe"):
        for label, key in _probe_labels(cfg):
            for task, probe in cfg["probe"][key].items():
                print(f"  probe {label}, {task}: linear accuracy {probe['linear']['accuracy']:.3f}, "
                      f"k-NN accuracy {probe['knn']['accuracy']:.3f}")
    return EXIT_OK
