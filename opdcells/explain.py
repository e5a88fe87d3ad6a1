"""Look inside OPD models: embeddings and probes, Grad-CAM for the CNNs, CLS attention for DINOv2.

* :func:`embed` runs an encoder (``models.build_encoder``) over OPD maps in nm;
  :func:`linear_probe` (logistic regression on standardised embeddings) and :func:`knn_probe`
  (cosine k-nearest neighbours) measure how well a frozen embedding separates classes -- the usual
  yardstick of self-supervised pretraining (``opdcells.pretrain`` uses them to compare methods);
  :func:`embedding_2d` projects embeddings to 2-D (PCA or t-SNE) for plots.
* :func:`grad_cam` (Selvaraju et al. 2017) weights the last convolutional feature map by the
  spatially averaged gradient of the class score, finds that layer itself (also inside the nested
  ``backbone`` model) and returns heatmaps at the input map's size.
* :func:`dino_attention` is the last transformer layer's attention from the CLS token to the patches
  (Caron et al. 2021, Fig. 1), recomputed from the layer input with the layer's own query/key weights
  because keras_hub's ``DINOV2Backbone`` does not return attention scores.

All heatmaps are (N, S, S) float32 in [0, 1] for maps (N, S, S) or (N, S, S, 1).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from . import models

log = logging.getLogger(__name__)

__all__ = ["embed", "linear_probe", "knn_probe", "embedding_2d", "grad_cam", "find_last_conv_layer",
           "dino_attention", "heat_in_cell"]

_CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


# ---------------------------------------------------------------------- embeddings


def as_batch(maps) -> np.ndarray:
    """OPD maps as a float32 batch (N, S, S, 1) from (S, S), (N, S, S) or (N, S, S, 1).

    Parameters
    ----------
    maps : array_like
        OPD maps (nm).

    Returns
    -------
    (N, S, S, 1) float32 ndarray

    Raises
    ------
    ValueError
        For any other shape.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim == 3:
        maps = maps[..., None]
    if maps.ndim != 4 or maps.shape[-1] != 1:
        raise ValueError(f"expected OPD maps (N, S, S) or (N, S, S, 1), got shape {maps.shape}")
    return maps


def _batches(maps: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(maps), batch_size):
        yield maps[start:start + batch_size]


def embed(encoder: keras.Model, maps, batch_size: int = 64, *, tta: bool = False) -> np.ndarray:
    """Embeddings (N, D) float32 of OPD maps in nm, the encoder in inference mode; ``tta``: the mean
    embedding of the map's 8 rotations and reflections (``pipeline.dihedral_views``), orientation-free.

    Parameters
    ----------
    encoder : keras.Model
        An encoder (maps in, (N, D) embeddings out).
    maps : array_like (N, S, S) or (N, S, S, 1)
        OPD maps (nm).
    batch_size : int
        Maps per encoder call.
    tta : bool
        Average over the 8 dihedral views.

    Returns
    -------
    (N, D) float32 ndarray

    Raises
    ------
    ValueError
        For maps of another shape.
    """
    from .pipeline import dihedral_views

    maps = as_batch(maps)
    dim = int(encoder.output_shape[-1])
    if len(maps) == 0:
        return np.empty((0, dim), np.float32)

    def run(batch):
        views = dihedral_views(batch) if tta else [batch]
        return np.mean([keras.ops.convert_to_numpy(encoder(v, training=False)) for v in views], axis=0)

    return np.concatenate([run(batch) for batch in _batches(maps, batch_size)]).astype(np.float32)


def _scores(y_true, y_pred, n_train: int) -> dict:
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "n_train": int(n_train), "n_test": int(len(y_true)), "predictions": y_pred}


def linear_probe(train_emb, y_train, test_emb, y_test, *, C: float = 1.0, max_iter: int = 2000) -> dict:
    """Logistic regression on standardised embeddings: accuracy and balanced accuracy on the test set.

    The scaler is fitted on the training embeddings only.

    Parameters
    ----------
    train_emb : array_like (n_train, D)
        Embeddings of the training maps.
    y_train : array_like (n_train,) of int
        Their classes.
    test_emb : array_like (n_test, D)
        Embeddings of the test maps.
    y_test : array_like (n_test,) of int
        Their classes.
    C : float
        Inverse regularisation strength.
    max_iter : int
        Solver iterations.

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy`` (0-1), ``n_train``, ``n_test``, ``predictions`` (n_test,),
        ``probe`` ("linear") and ``C``.
    """
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    clf.fit(np.asarray(train_emb), np.asarray(y_train))
    pred = clf.predict(np.asarray(test_emb))
    return {**_scores(y_test, pred, len(y_train)), "probe": "linear", "C": C}


def knn_probe(train_emb, y_train, test_emb, y_test, *, k: int = 5) -> dict:
    """k-nearest-neighbour vote (cosine distance) on the raw embeddings: accuracy and balanced accuracy.

    Parameters
    ----------
    train_emb : array_like (n_train, D)
        Embeddings of the training maps.
    y_train : array_like (n_train,) of int
        Their classes.
    test_emb : array_like (n_test, D)
        Embeddings of the test maps.
    y_test : array_like (n_test,) of int
        Their classes.
    k : int
        Neighbours (at most the training maps).

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy`` (0-1), ``n_train``, ``n_test``, ``predictions`` (n_test,),
        ``probe`` ("knn") and ``k``.
    """
    clf = KNeighborsClassifier(n_neighbors=min(k, len(y_train)), metric="cosine")
    clf.fit(np.asarray(train_emb), np.asarray(y_train))
    pred = clf.predict(np.asarray(test_emb))
    return {**_scores(y_test, pred, len(y_train)), "probe": "knn", "k": clf.n_neighbors}


def embedding_2d(emb, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D projection (N, 2) of standardised embeddings by PCA or t-SNE (perplexity fitted to N;
    exact gradients up to 1000 points, Barnes-Hut above).

    Parameters
    ----------
    emb : array_like (N, D)
        Embeddings.
    method : {"pca", "tsne"}
        The projection.
    seed : int
        Random seed.

    Returns
    -------
    (N, 2) float64 ndarray

    Raises
    ------
    ValueError
        For an unknown method.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = StandardScaler().fit_transform(np.asarray(emb, dtype=np.float64))
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                    method="exact" if len(x) <= 1000 else "barnes_hut")
        return tsne.fit_transform(x)
    raise ValueError(f"unknown method {method!r}; choose 'pca' or 'tsne'")


# ---------------------------------------------------------------------- capture


@contextlib.contextmanager
def _capture(layer: keras.layers.Layer) -> Iterator[dict]:
    """Record ``layer``'s first input and its output (``"input"``, ``"output"``) while the block runs.

    Works at any nesting depth (an intermediate tensor of a nested model cannot be a functional
    output of the outer one). The layer's ``call`` is restored on exit.
    """
    seen: dict = {}
    original, own = layer.call, "call" in vars(layer)

    def call(*args, **kwargs):
        seen["input"] = args[0] if args else next(iter(kwargs.values()))
        seen["output"] = original(*args, **kwargs)
        return seen["output"]

    layer.call = call
    try:
        yield seen
    finally:
        if own:
            layer.call = original
        else:
            del layer.call


def _normalise(heat: tf.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> (N, S, S) bilinear, each map scaled to [0, 1] by its maximum (0 stays 0)."""
    heat = tf.image.resize(heat[..., None], size, method="bilinear")[..., 0]
    heat = tf.maximum(heat, 0.0)
    peak = tf.reduce_max(heat, axis=[1, 2], keepdims=True)
    return keras.ops.convert_to_numpy(tf.math.divide_no_nan(heat, peak)).astype(np.float32)


# ---------------------------------------------------------------------- Grad-CAM


def find_last_conv_layer(model: keras.Model, min_grid: int = 4) -> keras.layers.Layer:
    """The last feature layer (4-D output, after the first convolution) at least ``min_grid`` px a side.

    Searches nested models. The grid floor matters at small inputs: MobileNetV2's final ``out_relu``
    is 2 x 2 at 64 px, too coarse for a heatmap, so the last 4 x 4 (stride-16) layer is used there.
    Padding layers are skipped. ``min_grid=1`` gives the classic choice, the very last feature map.

    Parameters
    ----------
    model : keras.Model
        A CNN classifier or encoder.
    min_grid : int
        Smallest side of the layer's feature grid (px).

    Returns
    -------
    keras.layers.Layer

    Raises
    ------
    ValueError
        When the model has no convolutional layer (a ViT: use :func:`dino_attention`), or no feature map
        of at least ``min_grid`` x ``min_grid`` px.
    """
    layers = models._all_layers(model)
    conv_at = [i for i, layer in enumerate(layers) if isinstance(layer, _CONV_TYPES)]
    if not conv_at:
        raise ValueError(f"{model.name} has no convolutional layer; for a ViT use dino_attention")
    chosen = None
    for layer in layers[conv_at[0]:]:
        if isinstance(layer, (keras.Model, keras.layers.ZeroPadding2D)):
            continue
        with contextlib.suppress(AttributeError, ValueError):
            shape = layer.output.shape
            if len(shape) == 4 and min(shape[1], shape[2]) >= min_grid:
                chosen = layer
    if chosen is None:
        raise ValueError(f"{model.name} has no feature map of at least {min_grid} x {min_grid} px")
    return chosen


def _find_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    for layer in models._all_layers(model):
        if layer.name == name:
            return layer
    raise ValueError(f"{model.name} has no layer named {name!r}")


def _class_ids(class_index, proba: tf.Tensor) -> tf.Tensor:
    n = tf.shape(proba)[0]
    if class_index is None:
        return tf.argmax(proba, axis=-1, output_type=tf.int32)
    ids = tf.convert_to_tensor(np.asarray(class_index, dtype=np.int32))
    return tf.broadcast_to(ids, [n]) if ids.shape.rank == 0 else ids


def grad_cam(model: keras.Model, maps, class_index=None, layer_name: str | None = None, *,
             min_grid: int = 4, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heatmaps (N, S, S) in [0, 1] of a classifier's score for ``class_index``.

    The heatmap is ReLU(sum_c mean(dscore/dA_c) A_c), resized to the input map size (Selvaraju et al.
    2017, ICCV, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization").

    Parameters
    ----------
    model : keras.Model
        A classifier (maps (N, S, S, 1) in, class probabilities out).
    maps : array_like (N, S, S) or (N, S, S, 1)
        OPD maps (nm).
    class_index : int or array_like of int, optional
        None (each map's predicted class), an int, or one id per map.
    layer_name : str, optional
        The feature layer (searched through nested models); default :func:`find_last_conv_layer` with
        ``min_grid``.
    min_grid : int
        Smallest feature grid side of the default layer.
    batch_size : int
        Maps per gradient pass.

    Returns
    -------
    (N, S, S) float32 ndarray
        Heatmaps in [0, 1].

    Raises
    ------
    ValueError
        For maps of another shape, an unknown ``layer_name``, or a model without a convolutional layer.
    """
    maps = as_batch(maps)
    layer = _find_layer(model, layer_name) if layer_name else find_last_conv_layer(model, min_grid)
    ids = None if class_index is None else np.broadcast_to(np.asarray(class_index), (len(maps),))
    heat = []
    for start in range(0, len(maps), batch_size):
        batch = tf.convert_to_tensor(maps[start:start + batch_size])
        with _capture(layer) as seen, tf.GradientTape() as tape:
            proba = model(batch, training=False)
            chosen = _class_ids(None if ids is None else ids[start:start + batch_size], proba)
            score = tf.gather(proba, chosen, axis=1, batch_dims=1)
        features = seen["output"]
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        heat.append(tf.reduce_sum(weights * features, axis=-1))
    if not heat:
        return np.empty((0,) + maps.shape[1:3], np.float32)
    return _normalise(tf.concat(heat, axis=0), maps.shape[1:3])


def heat_in_cell(heat, maps, pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
    """How much of each heatmap lies on the cell, and how much of the map the cell covers.

    A heatmap spread evenly over the map puts the cell's area fraction inside the cell; one that lights
    up the background puts less. The cell is :func:`opdcells.preprocess.cell_mask` without margin.

    Parameters
    ----------
    heat : array-like, (N, S, S)
        Heatmaps (>= 0), e.g. of :func:`grad_cam` or :func:`dino_attention`.
    maps : array-like, (N, S, S) or (N, S, S, 1)
        The background-removed OPD maps (nm) the heatmaps belong to.
    pixel_size_um : float
        Pixel size of the maps (um).

    Returns
    -------
    inside : np.ndarray, (N,)
        Fraction of each heatmap's sum on cell pixels (NaN for an all-zero heatmap).
    area : np.ndarray, (N,)
        Fraction of each map's pixels that belong to the cell.
    """
    from .preprocess import cell_mask

    heat = np.asarray(heat, dtype=np.float64)
    masks = np.stack([cell_mask(m, pixel_size_um, margin_um=0.0) for m in as_batch(maps)[..., 0]])
    if heat.shape != masks.shape:
        raise ValueError(f"heat_in_cell: heatmaps {heat.shape} do not match the maps {masks.shape}")
    total = heat.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = np.where(total > 0, (heat * masks).sum(axis=(1, 2)) / total, np.nan)
    return inside, masks.mean(axis=(1, 2))


# ---------------------------------------------------------------------- DINOv2


def _dinov2_backbone(encoder: keras.Model):
    import keras_hub

    for layer in models._all_layers(encoder):
        if isinstance(layer, keras_hub.models.DINOV2Backbone):
            return layer
    raise ValueError(f"{encoder.name} contains no keras_hub DINOV2Backbone")


def _cls_attention(block, tokens: tf.Tensor, n_skip: int) -> tf.Tensor:
    """Head-averaged attention (B, P) of the CLS token over the P patch tokens of one DINOv2 layer."""
    x = block.norm1(tokens, training=False)
    _, scores = block.attention.attention(query=x, value=x, key=x, return_attention_scores=True,
                                          training=False)
    return tf.reduce_mean(scores[:, :, 0, n_skip:], axis=1)


def dino_attention(encoder: keras.Model, maps, batch_size: int = 32) -> np.ndarray:
    """CLS-token attention of the last DINOv2 layer, head-averaged, on the patch grid, at input size.

    Parameters
    ----------
    encoder : keras.Model
        A ``build_encoder("dinov2")`` encoder or any model containing a keras_hub ``DINOV2Backbone``.
    maps : array_like (N, S, S) or (N, S, S, 1)
        OPD maps (nm).
    batch_size : int
        Maps per forward pass.

    Returns
    -------
    (N, S, S) float32 ndarray
        Attention maps in [0, 1].

    Raises
    ------
    ValueError
        For maps of another shape, or an encoder without a DINOv2 backbone.
    """
    maps = as_batch(maps)
    backbone = _dinov2_backbone(encoder)
    block = backbone.encoder.layers[-1]
    n_skip = 1 + int(backbone.num_register_tokens)  # CLS and register tokens precede the patches
    heat = []
    for batch in _batches(maps, batch_size):
        with _capture(block) as seen:
            encoder(batch, training=False)
        att = _cls_attention(block, seen["input"], n_skip)
        grid = int(round(float(att.shape[-1]) ** 0.5))
        heat.append(tf.reshape(att, [-1, grid, grid]))
    if not heat:
        return np.empty((0,) + maps.shape[1:3], np.float32)
    return _normalise(tf.concat(heat, axis=0), maps.shape[1:3])
