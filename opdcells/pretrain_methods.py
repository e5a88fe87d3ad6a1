"""The self-supervised (and supervised-on-simulation) pretraining methods: views of a map, losses,
heads and one ``keras.Model`` per method (:class:`SimCLR`, :class:`BYOL`, :class:`DINO`,
:class:`SupervisedSim`, all :class:`Pretrainer`). See :mod:`opdcells.pretrain` and docs/pretraining.md.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import keras
import tensorflow as tf

from .pipeline import AugmentConfig, augment_batch
from .pretrain_options import METHODS

__all__ = ["ViewConfig", "zoom_crop", "make_view", "nt_xent", "mlp", "CosineLinear", "dino_head",
           "Pretrainer",
           "SimCLR", "BYOL", "DINO", "SupervisedSim", "build_pretrainer"]


# ---------------------------------------------------------------------- views


@dataclass(frozen=True)
class ViewConfig:
    """How one view of a map is drawn: ``zoom_crop`` then ``pipeline.augment_batch(augment)``.

    Both zoom and crop shift are limited so that the cell's support (non-zero pixels) stays entirely
    inside the view.

    Attributes
    ----------
    zoom : float
        Magnification drawn from [1 - zoom, 1 + zoom] (a pixel-size calibration change).
    crop_shift : float
        Shift of the crop centre, fraction of the field per axis.
    augment : AugmentConfig
        Stronger than training-time defaults (contrastive views need diversity), still physical.
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
    """Random zoom in/out and crop offset per map of ``x`` that keeps the cell inside.

    The crop box has half-width ``0.5 / f`` (f in [1 - zoom, 1 + zoom]) and a shifted centre, both
    limited so the box holds every non-zero pixel with a 2-pixel margin; outside the field the view
    is 0 (background). A zoom of f scales the cell's area, and so its integrated OPD, by f^2.

    Parameters
    ----------
    x : tensor, shape (B, S, S, 1), nm
        OPD maps, background 0.
    seed : tensor, shape (2,), int64
        Stateless random seed.
    zoom : float
        Largest relative zoom.
    crop_shift : float
        Largest shift of the crop centre, fraction of the field.

    Returns
    -------
    tf.Tensor, shape (B, S, S, 1), nm
        The views.
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
    """One random physically valid view of each map in ``x``.

    Parameters
    ----------
    x : tensor, shape (B, S, S, 1), nm
        OPD maps.
    seed : tensor, shape (2,), int64
        Stateless random seed.
    config : ViewConfig
        How the view is drawn.

    Returns
    -------
    tf.Tensor, shape (B, S, S, 1), nm
        The views.
    """
    s_crop, s_aug = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
    if config.zoom > 0 or config.crop_shift > 0:
        x = zoom_crop(x, s_crop, config.zoom, config.crop_shift)
    return augment_batch(x, s_aug, config.augment)


def nt_xent(z1, z2, temperature: float = 0.2) -> tf.Tensor:
    """NT-Xent (SimCLR; Chen et al. 2020): cross-entropy of picking each view's partner among the other
    2B - 1 views.

    Parameters
    ----------
    z1, z2 : tensor, shape (B, D)
        Projections of the two views of each map.
    temperature : float
        Softmax temperature.

    Returns
    -------
    tf.Tensor, scalar
        The mean loss.
    """
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
    """Projection / prediction head: (Dense, [BN], ReLU) x n_hidden, then a linear Dense.

    Parameters
    ----------
    hidden : int
        Units of the hidden layers.
    out : int
        Output units.
    name : str
        Keras name of the head.
    n_hidden : int
        Hidden layers.
    batch_norm : bool
        BatchNormalization after each hidden Dense.

    Returns
    -------
    keras.Sequential
        The head.
    """
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
    """DINO's last layer: logits = l2-normalised input times l2-normalised prototype columns (g = 1).

    Parameters
    ----------
    units : int
        Prototypes (outputs).
    **kwargs
        Passed to ``keras.layers.Layer``.
    """

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
    """DINO projection head: MLP (GELU) to a bottleneck, then cosine similarity to K prototypes.

    Parameters
    ----------
    hidden : int
        Units of the two hidden layers.
    bottleneck : int
        Units of the bottleneck.
    prototypes : int
        Prototypes K (outputs).
    name : str
        Keras name of the head.

    Returns
    -------
    keras.Sequential
        The head.
    """
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


class Pretrainer(keras.Model):
    """Base of the pretraining methods: an encoder, two views per batch, one pretext loss.

    Subclasses implement ``pretext_loss(v1, v2, y, training) -> (loss, state)`` (``state``: what
    ``after_step`` needs, e.g. teacher outputs) and optionally ``after_step(state)`` (EMA updates).
    ``fit`` on batches of maps (or ``(maps, labels)``) trains; ``evaluate`` scores fixed views.

    Parameters
    ----------
    encoder : keras.Model
        Maps (B, S, S, 1) in nm -> embeddings (B, D); trained in place.
    views : ViewConfig
        How the two views of a map are drawn.
    seed : int
        Seed of the views.
    **kwargs
        Passed to ``keras.Model``.
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
    """SimCLR (Chen et al. 2020): projection MLP on the embedding, NT-Xent between the two views of each map.

    Parameters
    ----------
    encoder : keras.Model
        The encoder to pretrain.
    projection_dim, hidden_dim : int
        Output and hidden units of the projection MLP.
    temperature : float
        NT-Xent temperature.
    **kwargs
        Passed to :class:`Pretrainer` (``views``, ``seed``) and ``keras.Model``.
    """

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
    """BYOL (Grill et al. 2020): online projector + predictor regress the EMA target's projection of the
    other view.

    Parameters
    ----------
    encoder : keras.Model
        The encoder to pretrain.
    projection_dim, hidden_dim : int
        Output and hidden units of the projector and the predictor.
    momentum : float
        EMA momentum of the target network.
    **kwargs
        Passed to :class:`Pretrainer` (``views``, ``seed``) and ``keras.Model``.
    """

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
    """DINO self-distillation (Caron et al. 2021): the student (temperature ``student_temp``) matches the
    teacher's centred, sharpened (``teacher_temp``) distribution of the other view over ``prototypes``
    outputs.

    Parameters
    ----------
    encoder : keras.Model
        The encoder to pretrain.
    prototypes, hidden_dim, bottleneck : int
        The head's outputs, hidden units and bottleneck (:func:`dino_head`).
    student_temp, teacher_temp : float
        Softmax temperatures of student and teacher.
    momentum : float
        EMA momentum of the teacher.
    center_momentum : float
        EMA momentum of the teacher's output centre.
    **kwargs
        Passed to :class:`Pretrainer` (``views``, ``seed``) and ``keras.Model``.
    """

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
    """Supervised pretraining on simulated maps: softmax head, cross-entropy on both views.

    Parameters
    ----------
    encoder : keras.Model
        The encoder to pretrain.
    n_classes : int
        Simulated classes.
    **kwargs
        Passed to :class:`Pretrainer` (``views``, ``seed``) and ``keras.Model``.
    """

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
    """The :class:`Pretrainer` of ``method`` around ``encoder``.

    Parameters
    ----------
    method : {"simclr", "byol", "dino", "supervised-sim"}
        The method.
    encoder : keras.Model
        The encoder to pretrain.
    n_classes : int, optional
        Classes (supervised-sim only).
    seed : int
        Seed of the views.
    views : ViewConfig
        How the views are drawn.
    **method_kw
        The method's own settings (e.g. ``temperature``, ``momentum``).

    Returns
    -------
    Pretrainer
        The method's model.

    Raises
    ------
    ValueError
        An unknown method, or supervised-sim without ``n_classes``.
    """
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
