"""Screening's inference calls: the traced test-time augmentation pass gives ``predict_proba(tta=True)``
bit for bit (whatever the maps beside a map in its call), and TensorFlow's thread pools are sized beside
the reading processes."""
import os
import subprocess
import sys

import numpy as np
import pytest

from opdcells.screen import (
    BLAS_THREAD_VARIABLES,
    TF_THREAD_VARIABLES,
    TTA_GROUP,
    model_call,
    share_cores,
    tta_pass,
)


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


def test_tta_pass_is_predict_proba_with_tta_bit_for_bit(saved):
    maps = np.random.default_rng(1).normal(0, 50, (2 * TTA_GROUP + 3, 16, 16)).astype(np.float32)
    augmented = tta_pass(model_call(saved))
    proba = augmented(maps)                          # two calls of 8 maps' views, three of one map's
    assert proba.dtype == np.float32 and proba.shape == (len(maps), 3)
    assert np.array_equal(proba, saved.predict_proba(maps, 256, tta=True))
    assert not np.array_equal(proba, saved.predict_proba(maps, 256, tta=False))   # the views do matter
    assert np.array_equal(augmented(maps[5:6]), proba[5:6])    # alone or among 8: the same probabilities
    assert np.array_equal(augmented(maps[TTA_GROUP + 1:]), proba[TTA_GROUP + 1:])


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
