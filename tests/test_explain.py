"""opdcells.explain: probes match scikit-learn, Grad-CAM finds and highlights the cell, DINOv2 attention."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from opdcells import explain
from opdcells.models import build_encoder, build_model

TINY_DINOV2 = {"patch_size": 14, "num_layers": 2, "hidden_dim": 32, "num_heads": 2, "intermediate_dim": 64}


def _blobs(seed=0, n=60, dim=12):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, dim)) + 1.5 * np.eye(3, dim)[y] * rng.uniform(0.5, 2.0, (n, 1))
    return x, y


def discs_and_rings(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """OPD-like maps (nm): a disc (label 0) or a ring (label 1) at a random spot, zero background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    maps, labels = np.zeros((n, size, size), np.float32), np.arange(n) % 2
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(0.35 * size, 0.65 * size, 2)
        r = np.hypot(yy - cy, xx - cx) / (size * rng.uniform(0.16, 0.22))
        maps[i] = 300.0 * np.clip(1 - r**2, 0, None) if label == 0 else 300.0 * ((r > 0.6) & (r < 1.0))
    return maps, labels


def test_linear_probe_matches_scikit_learn():
    x, y = _blobs()
    got = explain.linear_probe(x[:40], y[:40], x[40:], y[40:])
    scaler = StandardScaler().fit(x[:40])
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x[:40]), y[:40])
    expected = clf.predict(scaler.transform(x[40:]))
    np.testing.assert_array_equal(got["predictions"], expected)
    assert got["accuracy"] == pytest.approx(np.mean(expected == y[40:]))
    assert (got["n_train"], got["n_test"]) == (40, 20)


def test_knn_probe_matches_scikit_learn():
    x, y = _blobs(seed=1)
    got = explain.knn_probe(x[:40], y[:40], x[40:], y[40:], k=3)
    expected = KNeighborsClassifier(n_neighbors=3, metric="cosine").fit(x[:40], y[:40]).predict(x[40:])
    np.testing.assert_array_equal(got["predictions"], expected)
    assert got["accuracy"] == pytest.approx(np.mean(expected == y[40:]))


def test_embedding_2d_pca_and_tsne():
    x, _ = _blobs(n=30)
    pca = explain.embedding_2d(x, "pca")
    ref = PCA(n_components=2).fit_transform(StandardScaler().fit_transform(x))
    np.testing.assert_allclose(np.abs(pca), np.abs(ref), atol=1e-8)  # components are defined up to sign
    tsne = explain.embedding_2d(x, "tsne", seed=0)
    assert tsne.shape == (30, 2) and np.isfinite(tsne).all()
    np.testing.assert_allclose(tsne, explain.embedding_2d(x, "tsne", seed=0))
    with pytest.raises(ValueError, match="unknown method"):
        explain.embedding_2d(x, "umap")


def test_embed_is_batch_independent():
    encoder, info = build_encoder("dinov2", input_shape=(28, 28, 1), input_size=28, dinov2_config=TINY_DINOV2)
    maps, _ = discs_and_rings(5, size=28)
    emb = explain.embed(encoder, maps, batch_size=2)
    assert emb.shape == (5, info["embedding_dim"])
    whole = explain.embed(encoder, maps[..., None], batch_size=5)
    np.testing.assert_allclose(emb, whole, rtol=1e-4, atol=1e-5)


def test_embed_with_tta_ignores_orientation():
    encoder, _ = build_encoder("dinov2", input_shape=(28, 28, 1), input_size=28, dinov2_config=TINY_DINOV2)
    maps, _ = discs_and_rings(3, size=28)
    maps = maps + np.linspace(0, 80, 28, dtype=np.float32)[None, None, :]    # a tilt: not symmetric
    turned = np.rot90(maps[:, ::-1], 1, axes=(1, 2))
    plain, plain_turned = explain.embed(encoder, maps), explain.embed(encoder, turned)
    assert not np.allclose(plain, plain_turned, rtol=1e-3, atol=1e-3)   # the ViT itself sees orientation
    np.testing.assert_allclose(explain.embed(encoder, turned, tta=True),
                               explain.embed(encoder, maps, tta=True), rtol=1e-4, atol=1e-5)


def test_find_last_conv_layer_searches_the_nested_backbone():
    model, _ = build_model("mobilenetv2", 2, input_shape=(32, 32, 1), input_size=64)
    layer = explain.find_last_conv_layer(model)  # inside the nested "backbone" model
    assert layer.output.shape[1:3] == (4, 4)
    assert layer in model.get_layer("encoder").get_layer("backbone").layers
    last = explain.find_last_conv_layer(model, min_grid=1)
    assert last.output.shape[1:3] == (2, 2)


def test_grad_cam_shape_range_and_not_constant():
    model, _ = build_model("mobilenetv2", 2, input_shape=(32, 32, 1), input_size=32)
    maps, _ = discs_and_rings(3)
    heat = explain.grad_cam(model, maps, class_index=1)
    assert heat.shape == (3, 32, 32) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert np.ptp(heat.reshape(3, -1), axis=1).max() > 0.1
    layer = explain.find_last_conv_layer(model)
    named = explain.grad_cam(model, maps, class_index=[1, 1, 1], layer_name=layer.name)
    np.testing.assert_allclose(heat, named)


def _tiny_cnn(size: int = 32) -> keras.Model:
    """Classifier with its convolutions in a nested model, like build_model's backbone."""
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((size, size, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inner_in)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    backbone = keras.Model(inner_in, x, name="backbone")
    inputs = keras.Input((size, size, 1))
    x = backbone(keras.layers.Rescaling(1 / 100.0)(inputs))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_grad_cam_peaks_on_the_cell_after_training():
    maps, labels = discs_and_rings(64, seed=1)
    model = _tiny_cnn()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(maps[..., None], labels, epochs=15, batch_size=16, verbose=0)
    test_maps, test_labels = discs_and_rings(8, seed=2)
    heat = explain.grad_cam(model, test_maps, class_index=test_labels)
    cell = test_maps > 0
    inside = [h[c].mean() for h, c in zip(heat, cell, strict=True)]
    outside = [h[~c].mean() for h, c in zip(heat, cell, strict=True)]
    assert np.mean(inside) > 2 * np.mean(outside)


def test_grad_cam_refuses_a_vit():
    encoder, _ = build_encoder("dinov2", input_shape=(28, 28, 1), input_size=28, dinov2_config=TINY_DINOV2)
    with pytest.raises(ValueError, match="no convolutional layer"):
        explain.grad_cam(encoder, np.zeros((1, 28, 28), np.float32))


def _manual_cls_attention(encoder, maps) -> np.ndarray:
    """Last-layer CLS attention from the layer's own query/key weights (one head-averaged grid per map)."""
    backbone = encoder.get_layer("backbone")
    block = backbone.encoder.layers[-1]
    before = keras.Model(encoder.input, encoder.get_layer("opd_to_rgb").output)
    stage = keras.Model(backbone.inputs, backbone.pyramid_outputs[f"stage{backbone.num_layers - 1}"])
    x = block.norm1(stage(before(maps)))
    mha = block.attention.attention
    q = tf.einsum("btd,dhk->bhtk", x, mha._query_dense.kernel) + mha._query_dense.bias[None, :, None, :]
    k = tf.einsum("btd,dhk->bhtk", x, mha._key_dense.kernel) + mha._key_dense.bias[None, :, None, :]
    scores = tf.nn.softmax(tf.einsum("bhk,bhtk->bht", q[:, :, 0], k) / np.sqrt(q.shape[-1]), axis=-1)
    return tf.reduce_mean(scores[:, :, 1:], axis=1).numpy()


def test_dino_attention_shape_and_values():
    encoder, info = build_encoder("dinov2", input_shape=(28, 28, 1), input_size=28, dinov2_config=TINY_DINOV2)
    maps, _ = discs_and_rings(3, size=28)
    att = explain.dino_attention(encoder, maps)
    assert att.shape == (3, 28, 28) and att.min() >= 0.0 and att.max() == pytest.approx(1.0)
    grid = _manual_cls_attention(encoder, maps[..., None])  # 2 x 2 patches of 14 px
    expected = explain._normalise(tf.reshape(tf.constant(grid), [3, 2, 2]), (28, 28))
    np.testing.assert_allclose(att, expected, atol=1e-5)


def test_heat_in_cell_tells_cell_from_background():
    from opdcells.preprocess import cell_mask

    maps, labels = discs_and_rings(4)
    maps = maps[labels == 0]                                      # discs: the cell is the disc
    masks = np.stack([cell_mask(m, 0.5, margin_um=0.0) for m in maps])
    on_cell, area = explain.heat_in_cell(masks.astype(float), maps, 0.5)
    np.testing.assert_allclose(on_cell, 1.0)
    np.testing.assert_allclose(area, masks.mean(axis=(1, 2)))
    assert (area > 0.02).all() and (area < 0.5).all()
    uniform, _ = explain.heat_in_cell(np.ones_like(maps), maps, 0.5)
    np.testing.assert_allclose(uniform, area)                     # heat spread evenly: the cell's area share
    background, _ = explain.heat_in_cell((~masks).astype(float), maps, 0.5)
    np.testing.assert_allclose(background, 0.0)
    empty, _ = explain.heat_in_cell(np.zeros_like(maps), maps, 0.5)
    assert np.isnan(empty).all()
    with pytest.raises(ValueError, match="do not match"):
        explain.heat_in_cell(np.ones((1, 8, 8)), maps, 0.5)
