"""tf.data input pipeline: stream OPD maps (nm) from an opdcells HDF5 dataset, augment when training.

Maps are never loaded all at once: a Python generator reads a few batches at a time with
``OPDDataset.read`` (sorted indices, consecutive runs as one slice), and ``tf.data`` prefetches the
next batch while the model works on the current one. Training shuffles afresh every epoch (seeded):
blocks of neighbouring maps in random order, then map by map within a window of a few batches, so
the HDF5 file is read in runs rather than one map at a time (see :func:`shuffled_windows`); it then
applies physically valid augmentation in TensorFlow ops (:func:`augment_batch`).
"""
from __future__ import annotations

import functools
import logging
import math
import os

import numpy as np
import tensorflow as tf

from .config import AugmentConfig  # the augmentation settings (a TrainConfig field)

log = logging.getLogger(__name__)
DEFAULT_AUGMENT = AugmentConfig()

__all__ = ["AugmentConfig", "augment_batch", "make_tf_dataset", "iter_batches", "shuffled_windows",
           "dihedral_views"]


# ---------------------------------------------------------------------------------------------
# augmentation (TensorFlow ops on a batch (B, S, S, 1), one random draw per map)


def dihedral_views(maps: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and reflections of a batch of square maps (N, S, S[, C]) on axes 1 and 2, the
    identity first: a cell has no preferred orientation, so averaging a model over them (test-time
    augmentation) removes orientation from its answer.

    Parameters
    ----------
    maps : ndarray (N, S, S) or (N, S, S, C)
        OPD maps (nm).

    Returns
    -------
    list of ndarray
        8 arrays of the shape of ``maps``.

    Raises
    ------
    ValueError
        When the maps are not square batches.
    """
    maps = np.asarray(maps)
    if maps.ndim < 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"expected square maps (N, S, S[, C]), got shape {maps.shape}")
    return [np.ascontiguousarray(np.rot90(maps[:, :, ::-1] if flip else maps, k, axes=(1, 2)))
            for flip in (False, True) for k in range(4)]


def _uniform(seed, shape, low, high):
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, dtype=tf.float32)


def _per_map(values):
    """(B,) -> (B, 1, 1, 1) for broadcasting over maps."""
    return tf.reshape(values, [-1, 1, 1, 1])


def _geometry(x, seed, rotate90: bool, flip: bool, max_shift: int):
    """Random 90-degree rotation, mirror and circular shift per map.

    rot90 k=1 is transpose + flip rows, k=2 flip rows + columns, k=3 transpose + flip columns; flips
    and shifts of rows (then, transposed, of columns) are one row gather each: whole rows are copied,
    several times cheaper on CPU than gathering every pixel.
    """
    n, size = tf.shape(x)[0], tf.shape(x)[1]
    s_k, s_f, s_d = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    k = (tf.random.stateless_uniform([n], s_k, maxval=4, dtype=tf.int32) if rotate90
         else tf.zeros([n], tf.int32))
    transpose = k % 2 == 1
    flip_rows = tf.logical_or(tf.equal(k, 1), tf.equal(k, 2))
    flip_cols = tf.logical_or(tf.equal(k, 2), tf.equal(k, 3))
    if flip:
        flip_cols = tf.math.logical_xor(flip_cols, tf.random.stateless_uniform([n], s_f, maxval=2,
                                                                                 dtype=tf.int32) > 0)
    shift = tf.random.stateless_uniform([2, n, 1], s_d, minval=-max_shift, maxval=max_shift + 1,
                                        dtype=tf.int32)
    rows = tf.math.floormod(tf.range(size)[None, :] - shift[0], size)            # (B, S) source rows
    cols = tf.math.floormod(tf.range(size)[None, :] - shift[1], size)
    rows = tf.where(flip_rows[:, None], size - 1 - rows, rows)
    cols = tf.where(flip_cols[:, None], size - 1 - cols, cols)
    x = _select(transpose, tf.transpose(x, [0, 2, 1, 3]), x)
    x = tf.gather(x, rows, axis=1, batch_dims=1)
    x = tf.gather(tf.transpose(x, [0, 2, 1, 3]), cols, axis=1, batch_dims=1)
    return tf.transpose(x, [0, 2, 1, 3])


def _zoom(x, seed, max_zoom: float):
    """Magnify each map about its centre by 1 + u, u uniform in [-max_zoom, max_zoom] (bilinear; the field
    outside the source map is 0, like the background preprocessing leaves around a cell)."""
    n, size = tf.shape(x)[0], tf.cast(tf.shape(x)[1], tf.float32)
    inverse = 1.0 / (1.0 + _uniform(seed, [n], -max_zoom, max_zoom))     # output -> source coordinates
    shift = (size - 1.0) / 2.0 * (1.0 - inverse)
    zeros = tf.zeros_like(inverse)
    transforms = tf.stack([inverse, zeros, shift, zeros, inverse, shift, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transforms, fill_value=0.0,
                                                 output_shape=tf.shape(x)[1:3], interpolation="BILINEAR",
                                                 fill_mode="CONSTANT")


def _select(mask, a, b):
    return tf.where(tf.reshape(mask, [-1, 1, 1, 1]), a, b)


def _blur(x, seed, max_sigma: float, scale=None):
    """Separable Gaussian blur with a per-map sigma (circular boundary: integrated OPD is conserved),
    times a per-map ``scale`` (B,) if given (folded into the kernel, no extra pass over the maps).

    The batch becomes the channel axis of one depthwise convolution, so each map gets its own kernel.
    """
    n = tf.shape(x)[0]
    radius = max(1, math.ceil(3 * max_sigma))
    sigma = tf.maximum(_uniform(seed, [n], 0.0, max_sigma), 1e-3)
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)[:, None]
    w = tf.exp(-0.5 * tf.square(offsets / sigma[None, :]))
    w = w / tf.reduce_sum(w, axis=0, keepdims=True)                       # (2r+1, B)
    w_rows = w if scale is None else w * scale[None, :]
    y = tf.transpose(x[..., 0], [1, 2, 0])[None]                         # (1, S, S, B)
    y = tf.concat([y[:, -radius:], y, y[:, :radius]], axis=1)            # circular padding
    y = tf.concat([y[:, :, -radius:], y, y[:, :, :radius]], axis=2)
    y = tf.nn.depthwise_conv2d(y, tf.reshape(w_rows, [-1, 1, n, 1]), [1, 1, 1, 1], "VALID")
    y = tf.nn.depthwise_conv2d(y, tf.reshape(w, [1, -1, n, 1]), [1, 1, 1, 1], "VALID")
    return tf.transpose(y[0], [2, 0, 1])[..., None]


def _background(x, seed, max_tilt: float, max_offset: float):
    """A plane per map: tilt of up to ``max_tilt`` nm across the field per axis plus an offset."""
    n, size = tf.shape(x)[0], tf.shape(x)[1]
    s_t, s_o = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    tilt = _uniform(s_t, [n, 2, 1, 1], -max_tilt, max_tilt)
    ramp = tf.linspace(-0.5, 0.5, size)
    plane = (tilt[:, 0] * ramp[None, :, None] + tilt[:, 1] * ramp[None, None, :]
             + _uniform(s_o, [n, 1, 1], -max_offset, max_offset))
    return plane[..., None]


NOISE_BANK_SIZE = 8


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """``NOISE_BANK_SIZE`` fixed fields of white Gaussian noise (std 1), (K, size, size, 1) float32.

    Drawing a field per map from a small bank (with a random sign and std) costs a copy instead of a
    fresh Gaussian draw of every pixel (in tf.data on CPU, a third of the augmentation time; a larger
    bank is copied into every call and costs more); the cell's own random orientation and shift keep
    the cell/noise alignment varied (16 fields x 8 orientations x 49 shifts per map).
    """
    rng = np.random.default_rng(20240617)
    return rng.standard_normal((NOISE_BANK_SIZE, size, size, 1), dtype=np.float32)


def _noise(x, seed, max_std: float):
    """White Gaussian noise per map: a bank field (a fresh draw if the map size is not static) times a
    random sign and a std in [0, max_std]."""
    n = tf.shape(x)[0]
    s_pick, s_std = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    std = _uniform(s_std, [n], -max_std, max_std)          # the sign of std flips the field
    size = x.shape[1]
    if size is None or x.shape[2] != size:
        return _per_map(std) * tf.random.stateless_normal(tf.shape(x), s_pick)
    pick = tf.random.stateless_uniform([n], s_pick, maxval=NOISE_BANK_SIZE, dtype=tf.int32)
    return _per_map(std) * tf.gather(_noise_bank(int(size)), pick)


def augment_batch(x, seed, config: AugmentConfig = DEFAULT_AUGMENT):
    """Augment a batch of OPD maps ``x`` (B, S, S, 1) float32 nm with the stateless ``seed`` (2,) int.

    Same seed, same result. Order: orientation and shift, zoom, defocus, OPD scale, background, noise.
    Background tilt/offset and noise are added only where the map is non-zero (preprocessing zeroes
    everything outside the dilated cell mask, so real maps carry them there only).

    Parameters
    ----------
    x : tensor-like (B, S, S, 1) float32
        OPD maps (nm).
    seed : tensor-like (2,) int
        Stateless random seed.
    config : AugmentConfig
        What to vary and by how much (shifts in px, OPD in nm).

    Returns
    -------
    tf.Tensor (B, S, S, 1) float32
        The augmented maps (nm).
    """
    x = tf.convert_to_tensor(x, tf.float32)
    n = tf.shape(x)[0]
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5))
    if config.rotate90 or config.flip or config.max_shift_px > 0:
        x = _geometry(x, seeds[0], config.rotate90, config.flip, int(config.max_shift_px))
    if config.max_zoom > 0:
        zoom_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 5)   # others unchanged
        x = _zoom(x, zoom_seed, float(config.max_zoom))
    support = tf.cast(tf.not_equal(x, 0.0), tf.float32)
    scale = (1.0 + _uniform(seeds[2], [n], -config.scale_jitter, config.scale_jitter)
             if config.scale_jitter > 0 else None)
    if config.max_blur_sigma_px > 0:
        x = _blur(x, seeds[1], float(config.max_blur_sigma_px), scale)
    elif scale is not None:
        x = x * _per_map(scale)
    additive = None
    if config.max_tilt_nm > 0 or config.max_offset_nm > 0:
        additive = _background(x, seeds[3], float(config.max_tilt_nm), float(config.max_offset_nm))
    if config.noise_nm > 0:
        noise = _noise(x, seeds[4], float(config.noise_nm))
        additive = noise if additive is None else additive + noise
    return x if additive is None else x + support * additive


# ---------------------------------------------------------------------------------------------
# streaming from HDF5


def _as_dataset(dataset):
    if isinstance(dataset, (str, os.PathLike)):
        from .dataset import open_dataset

        return open_dataset(dataset)
    return dataset


def iter_batches(n: int, batch_size: int, rng: np.random.Generator | None = None):
    """Yield position arrays covering ``range(n)`` in batches (shuffled when ``rng`` is given).

    Parameters
    ----------
    n : int
        Positions.
    batch_size : int
        Positions a batch (the last may be shorter).
    rng : numpy.random.Generator, optional
        Shuffles the positions.

    Yields
    ------
    ndarray of int
    """
    positions = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield positions[start:start + batch_size]


def shuffled_windows(indices, window: int, rng: np.random.Generator, block: int = 8):
    """One epoch of positions into ``indices``, in windows of ``window`` positions (the last shorter).

    Block shuffle: the indices in file order are cut into blocks of ``block`` neighbours, the blocks
    are shuffled and dealt into windows; a window is read from HDF5 in a few contiguous runs
    (neighbouring maps share one read) and then shuffled map by map. Every position once per epoch.

    Parameters
    ----------
    indices : array_like of int
        Dataset map indices.
    window : int
        Positions a window.
    rng : numpy.random.Generator
        Shuffles the blocks.
    block : int
        Neighbouring maps a block.

    Yields
    ------
    ndarray of int
        Positions into ``indices``.
    """
    order = np.argsort(np.asarray(indices), kind="stable")
    blocks = [order[i:i + block] for i in range(0, len(order), block)]
    if not blocks:
        return
    dealt = np.concatenate([blocks[b] for b in rng.permutation(len(blocks))])
    for start in range(0, len(dealt), window):
        yield dealt[start:start + window]


def _training_batches(ds, indices, batch_size: int, rng, window_batches: int, block: int):
    """(positions, maps) batches of one shuffled epoch; at most ``window_batches`` batches in memory."""
    for window in shuffled_windows(indices, window_batches * batch_size, rng, block):
        maps = ds.read(indices[window])
        mix = rng.permutation(len(window))
        for start in range(0, len(window), batch_size):
            pick = mix[start:start + batch_size]
            yield window[pick], maps[pick]


def _ordered_batches(ds, indices, batch_size: int):
    for pos in iter_batches(len(indices), batch_size):
        yield pos, ds.read(indices[pos])


def make_tf_dataset(dataset, indices, y=None, *, batch_size: int = 32, training: bool = False,
                    augment: AugmentConfig | None = DEFAULT_AUGMENT, seed: int = 0,
                    one_hot: bool = False, n_classes: int | None = None, window_batches: int = 4,
                    block: int = 8) -> tf.data.Dataset:
    """Stream maps ``dataset.opd[indices]`` as batches ``(maps (B, S, S, 1) float32 nm, labels)``.

    Each element also carries the (2,) int64 seed of its augmentation (used by the training loop).

    Parameters
    ----------
    dataset : OPDDataset or str or Path
        An opened dataset (``opdcells.dataset.open_dataset``) or its path; it must stay open while the
        returned ``tf.data.Dataset`` is used.
    indices : array_like of int
        Map indices into the dataset.
    y : array_like of int, optional
        The label of each, or None for maps only.
    batch_size : int
        Maps a batch.
    training : bool
        Shuffle every epoch (block shuffle, see :func:`shuffled_windows`: ``window_batches`` batches
        read at a time, in blocks of ``block`` neighbouring maps) and apply ``augment`` (if not None);
        otherwise batches follow the order of ``indices``.
    augment : AugmentConfig or None
        Augmentation when training.
    seed : int
        Random seed of shuffling and augmentation.
    one_hot : bool
        Labels as one-hot float32 vectors of length ``n_classes`` instead of int32 ids.
    n_classes : int, optional
        Length of the one-hot vectors (default: the largest label + 1).
    window_batches, block : int
        See ``training``.

    Returns
    -------
    tf.data.Dataset

    Raises
    ------
    ValueError
        When ``indices`` is not 1-D within the dataset, or ``y`` does not have one label per index.
    """
    ds = _as_dataset(dataset)
    n_maps, size = len(ds), (ds.out_size, ds.out_size)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= n_maps)):
        raise ValueError(f"indices must be a 1-D array within [0, {n_maps})")
    labels = None if y is None else np.asarray(y, dtype=np.int32)
    if labels is not None and labels.shape != indices.shape:
        raise ValueError(f"{len(labels)} labels for {len(indices)} indices")
    if one_hot and labels is not None:
        n_classes = int(n_classes if n_classes is not None else labels.max() + 1)
    rng = np.random.default_rng(seed)

    def generate():
        batches = (_training_batches(ds, indices, batch_size, rng, window_batches, block) if training
                   else _ordered_batches(ds, indices, batch_size))
        for pos, maps in batches:
            seed_pair = rng.integers(0, 2**31 - 1, size=2, dtype=np.int64)
            if labels is None:
                yield maps[..., None], seed_pair
            else:
                yield maps[..., None], labels[pos], seed_pair

    map_spec = tf.TensorSpec((None,) + size + (1,), tf.float32)
    seed_spec = tf.TensorSpec((2,), tf.int64)
    label_spec = () if labels is None else (tf.TensorSpec((None,), tf.int32),)
    out = tf.data.Dataset.from_generator(generate, output_signature=(map_spec, *label_spec, seed_spec))

    do_augment = training and augment is not None and augment.active

    def transform(maps, *rest):
        *lab, seed_pair = rest
        if do_augment:
            maps = augment_batch(maps, seed_pair, augment)
        if not lab:
            return maps
        target = tf.one_hot(lab[0], n_classes) if one_hot else lab[0]
        return maps, target

    out = out.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    n_batches = -(-len(indices) // batch_size)   # known length: Keras sizes its epochs and progress bar
    return out.apply(tf.data.experimental.assert_cardinality(n_batches)).prefetch(tf.data.AUTOTUNE)
