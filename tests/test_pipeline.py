"""opdcells.pipeline: maps streamed from HDF5 into tf.data, physically valid augmentation."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import tiny_dataset

tf = pytest.importorskip("tensorflow")

from opdcells.dataset import open_dataset  # noqa: E402
from opdcells.pipeline import (  # noqa: E402
    AugmentConfig,
    augment_batch,
    dihedral_views,
    make_tf_dataset,
    shuffled_windows,
)

NONE = AugmentConfig.none()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    with open_dataset(tiny_dataset(tmp_path_factory)) as dataset:
        yield dataset


class ReadSpy:
    """An opened dataset that records how many maps each ``read`` asks for."""

    def __init__(self, dataset):
        self._ds, self.sizes = dataset, []

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def __len__(self):
        return len(self._ds)

    def read(self, indices):
        self.sizes.append(len(indices))
        return self._ds.read(indices)


def collect(stream):
    maps, labels = zip(*[(x.numpy(), y.numpy()) for x, y in stream], strict=True)
    return np.concatenate(maps), np.concatenate(labels)


def test_eval_stream_keeps_order_shapes_dtypes_and_labels(ds):
    indices = np.array([17, 3, 44, 3, 58, 0, 21])   # unsorted, with a repeat
    y = np.arange(len(indices)) * 7 % 5
    maps, labels = collect(make_tf_dataset(ds, indices, y, batch_size=3))
    assert maps.shape == (len(indices), ds.out_size, ds.out_size, 1) and maps.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(maps[..., 0], ds.read(indices))
    np.testing.assert_array_equal(labels, y)


def test_stream_reads_a_bounded_number_of_maps_at_a_time(ds):
    indices = np.arange(len(ds))
    sizes = [8] * (len(ds) // 8) + ([len(ds) % 8] if len(ds) % 8 else [])
    for training, bound in ((False, 8), (True, 2 * 8)):
        spy = ReadSpy(ds)
        stream = make_tf_dataset(spy, indices, None, batch_size=8, training=training, window_batches=2)
        assert [b.shape[0] for b in stream] == sizes
        assert max(spy.sizes) <= bound and sum(spy.sizes) == len(ds)
        assert len(spy.sizes) >= len(ds) / bound


def test_block_shuffle_covers_every_map_once_per_epoch():
    rng = np.random.default_rng(0)
    indices = np.r_[100:140, 7:30]        # two runs, not sorted
    epochs = [np.concatenate(list(shuffled_windows(indices, 16, rng, block=4))) for _ in range(2)]
    for positions in epochs:
        assert sorted(positions) == list(range(len(indices)))
    assert not np.array_equal(*epochs)
    windows = list(shuffled_windows(indices, 16, rng, block=4))
    assert all(len(w) == 16 for w in windows[:-1]) and 0 < len(windows[-1]) <= 16
    # blocks of neighbours in file order stay together: a window reads few contiguous runs
    runs = [np.count_nonzero(np.diff(np.sort(indices[w])) != 1) + 1 for w in windows[:-1]]
    assert max(runs) <= 16 // 4 + 1


def test_training_shuffles_each_epoch_and_keeps_labels_aligned(ds):
    indices = np.arange(len(ds))
    y = (indices * 3 + 1) % 5
    stream = make_tf_dataset(ds, indices, y, batch_size=16, training=True, augment=None, seed=1)
    by_content = {ds.read(i).tobytes(): i for i in indices}
    orders = []
    for _ in range(2):
        maps, labels = collect(stream)
        order = np.array([by_content[m[..., 0].tobytes()] for m in maps])
        np.testing.assert_array_equal(labels, y[order])
        assert sorted(order) == list(indices)
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], indices)


def test_augmentation_in_training_mode_only(ds):
    indices = np.arange(24)
    original = ds.read(indices)
    plain, _ = collect(make_tf_dataset(ds, indices, np.zeros(24), batch_size=8, training=False))
    augmented, _ = collect(make_tf_dataset(ds, indices, np.zeros(24), batch_size=8, training=True, seed=3))
    np.testing.assert_array_equal(plain[..., 0], original)
    assert augmented.shape == plain.shape and np.isfinite(augmented).all()
    changed = [not any(np.allclose(a[..., 0], o) for o in original) for a in augmented]
    assert all(changed)
    # OPD stays in the physical range of the data (small perturbations only)
    assert np.abs(augmented).max() < 1.5 * np.abs(original).max()


def test_one_hot_labels(ds):
    stream = make_tf_dataset(ds, [0, 1, 2], [2, 0, 1], batch_size=3, one_hot=True, n_classes=4)
    _, labels = collect(stream)
    np.testing.assert_array_equal(labels, np.eye(4, dtype=np.float32)[[2, 0, 1]])


def test_rejects_bad_indices(ds):
    with pytest.raises(ValueError, match="indices"):
        make_tf_dataset(ds, [0, len(ds)], None)
    with pytest.raises(ValueError, match="labels"):
        make_tf_dataset(ds, [0, 1], [0])


def test_rotation_preserves_integrated_opd_and_is_a_rotation(ds):
    maps = ds.read(np.arange(8))[..., None]
    rotated = augment_batch(maps, [5, 6], dataclasses.replace(NONE, rotate90=True)).numpy()
    np.testing.assert_allclose(rotated.sum(axis=(1, 2, 3)), maps.sum(axis=(1, 2, 3)), rtol=1e-5)
    ks = []
    for m, r in zip(maps[..., 0], rotated[..., 0], strict=True):
        matches = [k for k in range(4) if np.array_equal(np.rot90(m, k), r)]
        assert matches, "output is not a 90-degree rotation of its input"
        ks.append(matches[0])
    assert len(set(ks)) > 1


def test_shift_flip_and_defocus_conserve_integrated_opd(ds):
    maps = ds.read(np.arange(8))[..., None]
    config = dataclasses.replace(NONE, flip=True, max_shift_px=3, max_blur_sigma_px=0.8)
    out = augment_batch(maps, [1, 2], config).numpy()
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), maps.sum(axis=(1, 2, 3)), rtol=1e-4)
    assert not np.allclose(out, maps)


def test_additive_effects_only_inside_the_cell_support(ds):
    maps = ds.read(np.arange(8))[..., None]
    config = dataclasses.replace(NONE, noise_nm=3.0, max_tilt_nm=4.0, max_offset_nm=2.0, scale_jitter=0.05)
    out = augment_batch(maps, [7, 8], config).numpy()
    background = maps == 0
    assert background.any() and (~background).any()
    np.testing.assert_array_equal(out[background], 0.0)
    diff = np.abs(out - maps)[~background]
    assert diff.max() > 0
    assert np.median(diff) < 0.1 * np.abs(maps[~background]).max()


def test_augmentation_is_reproducible_for_a_seed(ds):
    maps = ds.read(np.arange(6))[..., None]
    a = augment_batch(maps, [1, 2]).numpy()
    b = augment_batch(maps, [1, 2]).numpy()
    c = augment_batch(maps, [1, 3]).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    maps = np.random.default_rng(0).normal(size=(3, 6, 6)).astype(np.float32)   # no symmetry of its own
    views = dihedral_views(maps)
    assert len(views) == 8 and all(v.shape == maps.shape for v in views)
    np.testing.assert_array_equal(views[0], maps)
    keys = {v.tobytes() for v in views}
    assert len(keys) == 8                                                     # all distinct
    assert {v.tobytes() for v in dihedral_views(views[5])} == keys            # a group: closed
    np.testing.assert_array_equal(dihedral_views(maps[..., None])[3][..., 0], views[3])
    with pytest.raises(ValueError, match="square"):
        dihedral_views(np.zeros((2, 4, 5)))


def test_zoom_scales_the_cell_area_about_the_centre():
    size, radius = 64, 12.0
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = np.where(np.hypot(yy, xx) < radius, 200.0, 0.0).astype(np.float32)
    maps = np.repeat(disc[None, ..., None], 16, axis=0)
    config = dataclasses.replace(NONE, max_zoom=0.2)
    out = augment_batch(maps, [3, 4], config).numpy()
    zoom = np.sqrt((out > 100).sum(axis=(1, 2, 3)) / (disc > 100).sum())     # linear magnification per map
    assert zoom.min() >= 0.8 - 0.05 and zoom.max() <= 1.2 + 0.05 and zoom.max() - zoom.min() > 0.1
    centroid = [(np.stack([yy, xx]) * m[..., 0]).sum(axis=(1, 2)) / m.sum() for m in out]
    np.testing.assert_allclose(centroid, 0.0, atol=0.3)                       # about the centre
    assert out.max() <= 200.0 + 1e-3 and out.min() >= 0.0                     # OPD values kept, background 0
    np.testing.assert_array_equal(augment_batch(maps, [3, 4], NONE).numpy(), maps)
