"""Screening's inference calls: the traced test-time augmentation pass gives ``predict_proba(tta=True)``
to float32 rounding (whatever the maps beside a map in its call), the encoder converted for TensorFlow
Lite gives the Keras model's probabilities and embeddings to float32 rounding (and falls back to Keras
when it does not convert or disagrees), and TensorFlow's thread pools are sized beside the reading
processes."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from opdcells.screen import (
    BLAS_THREAD_VARIABLES,
    LITE_CHUNK,
    TF_THREAD_VARIABLES,
    TTA_GROUP,
    _Scorer,
    encoder_pass,
    lite_encoder,
    model_call,
    share_cores,
    tta_pass,
    without_identity_resize,
)

#: Converted vs Keras encoder: float32 rounding in another summation order (measured 1e-5 on the
#: MobileNetV2 screening model's embeddings, whose values reach 4; here at most a few 1e-7).
LITE_ATOL = 1e-5


@pytest.fixture(scope="module")
def saved():
    """A small Keras model built as opdcells builds them (``encoder`` + softmax ``classifier``), loaded as a
    model folder would be."""
    import keras

    from opdcells.learners import _KerasLearner
    from opdcells.modelfolder import SavedModel

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    encoder = keras.Sequential([keras.layers.Conv2D(4, 3, activation="relu"),
                                keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D()],
                               name="encoder")
    head = keras.layers.Dense(3, activation="softmax", name="classifier")
    model = keras.Model(inputs, head(encoder(inputs)))
    return SavedModel("unused", {"class_names": ["a", "b", "c"], "input_shape": [16, 16, 1]},
                      _KerasLearner(model, {}))


def _same_to_float32_rounding(a, b) -> bool:
    # oneDNN may pick another kernel for another batch size (seen on an AMD EPYC with AVX2: the 8th digit)
    return np.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_tta_pass_is_predict_proba_with_tta(saved):
    maps = np.random.default_rng(1).normal(0, 50, (2 * TTA_GROUP + 3, 16, 16)).astype(np.float32)
    augmented = tta_pass(model_call(saved))
    proba = augmented(maps)                          # two calls of 8 maps' views, three of one map's
    assert proba.dtype == np.float32 and proba.shape == (len(maps), 3)
    assert _same_to_float32_rounding(proba, saved.predict_proba(maps, 256, tta=True))
    assert not _same_to_float32_rounding(proba, saved.predict_proba(maps, 256, tta=False))   # views matter
    # alone or among 8 maps: bit for bit with TensorFlow's Eigen kernels; oneDNN's (on by import opdcells)
    # may pick another kernel for 8 views than for 64 (seen on an AMD EPYC with AVX2: the 8th digit)
    assert _same_to_float32_rounding(augmented(maps[5:6]), proba[5:6])
    assert _same_to_float32_rounding(augmented(maps[TTA_GROUP + 1:]), proba[TTA_GROUP + 1:])


def test_model_call_is_none_for_models_that_are_not_one_keras_model(saved):
    features = type("Features", (), {"learner": type("Learner", (), {})(), "fused": False})()
    assert model_call(features) is None
    fused = type("Fused", (), {"learner": saved.learner, "fused": True})()
    assert model_call(fused) is None
    maps = np.zeros((2, 16, 16), np.float32)
    np.testing.assert_array_equal(model_call(saved)(maps), saved.predict_proba(maps, tta=False))


def test_threads_are_the_cores_the_readers_leave():
    from opdcells.predict import default_workers

    cores = default_workers()
    code = ("from opdcells.console import import_tensorflow; import_tensorflow(); "
            "from opdcells.screen import share_cores; from threadpoolctl import threadpool_info; "
            "two = share_cores(2); "
            "blas = {p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'}; "
            "print(two, blas, share_cores(1))")
    env = {k: v for k, v in os.environ.items() if k not in (*TF_THREAD_VARIABLES, *BLAS_THREAD_VARIABLES)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # two readers: the cores they leave (TensorFlow and BLAS); set again before the first operation, one
    # reader: every core
    left = max(1, cores - 2)
    assert out.stdout.split() == [f"({left},", "1)", f"{{{left}}}", f"({cores},", "1)"]


def test_threads_are_left_as_they_are_once_tensorflow_runs(saved):
    import tensorflow as tf

    saved.predict_proba(np.zeros((1, 16, 16), np.float32), tta=False)     # the runtime has started
    before = (tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads())
    assert share_cores(2) == before


def _mobile_like(size: int = 16, resize_to: int = 16):
    """A small model as opdcells builds them (``encoder``: OPD scale, antialiased bilinear resize, 3
    channels, MobileNetV2-like depthwise and pointwise convolutions with batch normalisation and ReLU6,
    global pooling; softmax ``classifier``), with trained-looking batch statistics, loaded as a model
    folder would be."""
    import keras

    from opdcells.learners import _KerasLearner
    from opdcells.modelfolder import SavedModel
    from opdcells.models import OPDScale

    keras.utils.set_random_seed(3)
    inputs = keras.Input((size, size, 1))
    x = OPDScale(100.0)(inputs)
    x = keras.layers.Resizing(resize_to, resize_to, antialias=True, name="resize")(x)   # bilinear
    x = keras.layers.Concatenate()([x, x, x])
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
    for layer in (keras.layers.BatchNormalization(), keras.layers.ReLU(6.0),
                  keras.layers.DepthwiseConv2D(3, padding="same"), keras.layers.BatchNormalization(),
                  keras.layers.ReLU(6.0), keras.layers.Conv2D(12, 1), keras.layers.GlobalAveragePooling2D()):
        x = layer(x)
    encoder = keras.Model(inputs, x, name="encoder")
    for bn in (layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)):
        gamma, beta, mean, var = bn.get_weights()
        rng = np.random.default_rng(len(gamma))
        bn.set_weights([gamma * 1.5, beta + 0.1, rng.normal(0, 0.2, mean.shape), var * 2 + 0.1])
    outer = keras.Input((size, size, 1))
    model = keras.Model(outer, keras.layers.Dense(3, activation="softmax", name="classifier")(encoder(outer)))
    return SavedModel("unused", {"class_names": ["a", "b", "c"], "input_shape": [size, size, 1]},
                      _KerasLearner(model, {}))


def test_lite_encoder_pass_gives_the_keras_models_probabilities_and_embeddings():
    """The encoder converted for TensorFlow Lite (its identity resize left out) against the Keras model,
    on more maps than a call holds; a map scores the same bit for bit whatever call it comes in."""
    import keras

    saved = _mobile_like()
    maps = np.random.default_rng(0).normal(20, 60, (2 * LITE_CHUNK + 5, 16, 16)).astype(np.float32)
    run = encoder_pass(saved)
    assert run.lite
    proba, embedding = run(maps, 256)
    encoder = saved.learner.model.get_layer("encoder")
    own_embedding = keras.ops.convert_to_numpy(encoder(maps[..., None], training=False))
    assert embedding.shape == own_embedding.shape == (len(maps), 12)
    assert np.abs(own_embedding).max() > 0.1                    # not a degenerate model
    np.testing.assert_allclose(embedding, own_embedding, rtol=0, atol=LITE_ATOL)
    np.testing.assert_allclose(proba, saved.predict_proba(maps, tta=False), rtol=0, atol=LITE_ATOL)
    alone_proba, alone_embedding = run(maps[LITE_CHUNK + 3:LITE_CHUNK + 6], 256)   # other places, padded
    assert np.array_equal(alone_embedding, embedding[LITE_CHUNK + 3:LITE_CHUNK + 6])
    assert np.array_equal(alone_proba, proba[LITE_CHUNK + 3:LITE_CHUNK + 6])
    keras_run = encoder_pass(saved, lite=False)
    assert not keras_run.lite
    np.testing.assert_allclose(keras_run(maps, 256)[1], own_embedding, rtol=0, atol=1e-6)


def test_an_identity_resize_is_left_out_bit_for_bit_and_a_real_one_kept():
    import keras

    encoder = _mobile_like().learner.model.get_layer("encoder")
    lean = without_identity_resize(encoder)
    assert not any(isinstance(layer, keras.layers.Resizing) for layer in lean.layers)
    assert isinstance(encoder.get_layer("resize"), keras.layers.Resizing)    # the model is left as it was
    maps = np.random.default_rng(1).normal(0, 80, (6, 16, 16, 1)).astype(np.float32)
    assert np.array_equal(keras.ops.convert_to_numpy(lean(maps, training=False)),
                          keras.ops.convert_to_numpy(encoder(maps, training=False)))
    shrinking = _mobile_like(resize_to=8).learner.model.get_layer("encoder")
    assert without_identity_resize(shrinking) is shrinking


def test_an_encoder_that_does_not_convert_runs_with_keras(caplog):
    """An antialiased resize to another size has no TensorFlow Lite kernel: logged, then the traced Keras
    encoder gives the model's own probabilities."""
    saved = _mobile_like(resize_to=8)
    encoder = saved.learner.model.get_layer("encoder")
    with caplog.at_level(logging.WARNING, logger="opdcells.screen"):
        assert lite_encoder(encoder, LITE_CHUNK) is None
    assert "not converted for TensorFlow Lite" in caplog.text
    run = encoder_pass(saved)
    assert not run.lite
    maps = np.random.default_rng(2).normal(20, 60, (5, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run(maps, 256)[0], saved.predict_proba(maps, tta=False), rtol=0, atol=1e-6)


def test_a_converted_encoder_that_disagrees_with_the_model_is_replaced_by_keras(monkeypatch, caplog):
    from opdcells import screen

    saved = _mobile_like()
    real = screen.lite_encoder

    def skewed(encoder, batch):
        call = real(encoder, batch)
        wrong = lambda x: call(x) * 1.5       # noqa: E731 - a broken conversion
        wrong.lite = True
        return wrong

    monkeypatch.setattr(screen, "lite_encoder", skewed)
    monkeypatch.setattr(type(saved), "tta", False)       # the fixture has no training record
    scorer = _Scorer(saved, None, None, 256)
    assert scorer.forward.lite
    maps = np.random.default_rng(4).normal(20, 60, (10, 16, 16)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="opdcells.screen"):
        proba, embedding = scorer.first_pass(maps)
    assert "differs from the model's predictions" in caplog.text and not scorer.forward.lite
    np.testing.assert_allclose(proba, saved.predict_proba(maps, tta=False), rtol=0, atol=1e-6)
