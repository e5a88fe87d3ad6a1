"""opdcells.pretrain and its methods, corpus, probes and options: views, losses, every method's steps,
pretrain()'s folder and the shipped encoder."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import scaled_test_dataset, tiny_run, write_tiny_dataset

from opdcells import (
    cli,
    models,
    pretrain,
    pretrain_corpus,
    pretrain_methods,
    pretrain_options,
    pretrain_probes,
    pretrain_store,
    registry,
)
from opdcells.dataset import open_dataset
from opdcells.splits import Split

SHIPPED = registry.encoder_folder(registry.DEFAULTS["mobilenetv2"])
TINY_DINOV2 = {"patch_size": 14, "num_layers": 1, "hidden_dim": 32, "num_heads": 2, "intermediate_dim": 64}
SMALL_VIEWS = pretrain_methods.ViewConfig(zoom=0.05, crop_shift=0.03)


def cell_maps(n: int = 16, size: int = 32, seed: int = 0) -> np.ndarray:
    """OPD-like maps (n, size, size) nm: discs, rings and ellipses inside the field, zero background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - size / 2
    maps = np.zeros((n, size, size), np.float32)
    for i in range(n):
        a, b = size * rng.uniform(0.12, 0.3, 2)
        r = np.hypot(yy / a, xx / b)
        shape = np.clip(1 - r**2, 0, None) if i % 2 == 0 else ((r > 0.5) & (r < 1.0)).astype(np.float32)
        maps[i] = rng.uniform(100, 400) * shape
    return maps


def tiny_encoder(size: int = 32) -> keras.Model:
    """Two conv + BatchNorm blocks and global pooling: a CNN encoder that traces in a second."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Rescaling(1 / 100.0)(inputs)
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.5)(x)
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="tiny")


def method_kwargs(method: str) -> dict:
    small = {"simclr": {"projection_dim": 16, "hidden_dim": 32},
             "byol": {"projection_dim": 16, "hidden_dim": 32, "momentum": 0.9},
             "dino": {"prototypes": 32, "hidden_dim": 32, "bottleneck": 16, "momentum": 0.9},
             "supervised-sim": {}}
    return small[method]


def _batches(method: str, maps: np.ndarray) -> tf.data.Dataset:
    x = maps[..., None]
    data = (x, (np.arange(len(maps)) % 2).astype(np.int32)) if method == "supervised-sim" else x
    return tf.data.Dataset.from_tensor_slices(data).batch(8)


# ---------------------------------------------------------------------- views and losses


def test_views_keep_the_cell_inside_and_are_seeded():
    maps = tf.constant(cell_maps(8)[..., None])
    strong = pretrain_methods.ViewConfig(zoom=0.3, crop_shift=0.3)
    seeds = tf.constant([3, 4], tf.int64)
    view = pretrain_methods.zoom_crop(maps, seeds, strong.zoom, strong.crop_shift).numpy()
    border = np.concatenate([view[:, 0], view[:, -1], view[:, :, 0], view[:, :, -1]], axis=1)
    assert np.abs(border).max() == 0.0  # the whole cell support stays inside the field
    ratio = view.reshape(8, -1).sum(1) / maps.numpy().reshape(8, -1).sum(1)
    assert ratio.min() > 0.7**2 - 0.05 and ratio.max() < 1.3**2 + 0.05  # zoom scales the area only
    a = pretrain_methods.make_view(maps, tf.constant([1, 2], tf.int64)).numpy()
    b = pretrain_methods.make_view(maps, tf.constant([1, 2], tf.int64)).numpy()
    c = pretrain_methods.make_view(maps, tf.constant([1, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_nt_xent_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    z = np.concatenate([z1, z2])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T / 0.5
    expected = np.mean([np.log(np.exp(np.delete(sim[i], i)).sum()) - sim[i, (i + 4) % 8] for i in range(8)])
    assert float(pretrain_methods.nt_xent(z1, z2, 0.5)) == pytest.approx(expected, rel=1e-5)
    aligned = float(pretrain_methods.nt_xent(np.eye(4, 6), np.eye(4, 6), 0.05))
    assert aligned < 1e-3


# ---------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", pretrain_options.METHODS)
def test_one_step_changes_weights_and_loss_goes_down(method):
    maps = cell_maps(16)
    encoder = tiny_encoder()
    # DINO's loss first RISES while centring spreads the teacher's (initially collapsed) outputs; with
    # the teacher and centre held (momentum 1) it is plain distillation, which must go down
    frozen = {"momentum": 1.0, "center_momentum": 1.0} if method == "dino" else {}
    trainer = pretrain_methods.build_pretrainer(method, encoder, n_classes=2, seed=0, views=SMALL_VIEWS,
                                        **{**method_kwargs(method), **frozen})
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
    data = _batches(method, maps)
    before = trainer.evaluate(data, verbose=0, return_dict=True)["loss"]
    weights = [w.numpy().copy() for w in encoder.trainable_weights]
    trainer.fit(data.take(1), epochs=1, shuffle=False, verbose=0)
    after_one = encoder.trainable_weights
    assert all(not np.allclose(w0, w.numpy()) for w0, w in zip(weights, after_one, strict=True))
    trainer.fit(data, epochs=20, shuffle=False, verbose=0)
    after = trainer.evaluate(data, verbose=0, return_dict=True)["loss"]
    assert np.isfinite(after) and after < before


def test_ema_target_moves_toward_the_online_network():
    encoder = tiny_encoder()
    trainer = pretrain_methods.build_pretrainer("byol", encoder, views=SMALL_VIEWS, **method_kwargs("byol"))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    target = trainer.teacher_encoder
    assert not target.trainable_weights  # never updated by gradients, only by EMA
    target0 = [w.numpy().copy() for w in target.weights]
    for t0, w in zip(target0, encoder.weights, strict=True):
        np.testing.assert_array_equal(t0, w.numpy())  # the target starts as a copy
    trainer.fit(_batches("byol", cell_maps(8)), epochs=1, shuffle=False, verbose=0)
    for t0, w, t in zip(target0, encoder.weights, target.weights, strict=True):
        np.testing.assert_allclose(t.numpy(), 0.9 * t0 + 0.1 * w.numpy(), rtol=1e-5, atol=1e-6)


def test_dino_centre_follows_the_teacher_outputs():
    trainer = pretrain_methods.build_pretrainer("dino", tiny_encoder(), views=SMALL_VIEWS,
                                                **method_kwargs("dino"))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    maps = cell_maps(8)[..., None]
    v1, v2 = trainer.two_views(maps, 0)  # the views of the first training step
    expected = 0.1 * trainer.teacher_outputs(v1, v2).numpy().mean(axis=0)
    trainer.fit(maps, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(trainer.center.numpy()[0], expected, rtol=1e-4, atol=1e-6)


def test_build_pretrainer_rejects_unknown_and_unlabelled():
    with pytest.raises(ValueError, match="unknown method"):
        pretrain_methods.build_pretrainer("mae", tiny_encoder())
    with pytest.raises(ValueError, match="n_classes"):
        pretrain_methods.build_pretrainer("supervised-sim", tiny_encoder())


def test_recalibrated_batchnorm_gives_informative_random_embeddings():
    encoder, info = models.build_encoder("mobilenetv2", input_shape=(32, 32, 1), input_size=32)
    maps = cell_maps(16)[..., None]
    assert np.abs(encoder(maps, training=False).numpy()).max() < 1e-6  # the raw random-init problem
    assert pretrain_probes.recalibrate_batchnorm(encoder, maps, info["bn_momentum"]) > 0
    emb = encoder(maps, training=False).numpy()
    assert emb.std(axis=0).mean() > 1e-2
    assert {layer.momentum for layer in models._all_layers(encoder)
            if isinstance(layer, keras.layers.BatchNormalization)} == {info["bn_momentum"]}


# ---------------------------------------------------------------------- simulated corpus


def test_simulated_corpus_is_disjoint_cached_and_recorded(tmp_path):
    corpus = pretrain_corpus.simulate_corpus(10, seed=3, maps_per_session=1, cache_dir=tmp_path)
    assert corpus.maps.shape == (10, 128, 128) and corpus.maps.dtype == np.float32
    assert sorted(np.bincount(corpus.labels)) == [2] * 5
    numbers = {int(s.rsplit("_", 1)[-1]) for s in corpus.sessions}
    assert min(numbers) == pretrain_corpus.SIM_FIRST_SESSION and corpus.record["seed"] == 3
    first = pretrain_corpus.SIM_FIRST_SESSION
    assert corpus.record["session_numbers"] == [first, first + 1]
    again = pretrain_corpus.simulate_corpus(10, seed=3, maps_per_session=1, cache_dir=tmp_path)
    assert "cache" in again.record
    np.testing.assert_array_equal(again.maps, corpus.maps)

    path = write_tiny_dataset(tmp_path / "eval.h5", classes=("SW480", "PBMCs"), sessions_per_class=1,
                              maps_per_session=1)
    with open_dataset(path) as ds:
        (record,) = pretrain_corpus.check_disjoint(corpus, [ds])
        assert record["fingerprint"] == ds.fingerprint
    with h5py.File(path, "a") as h5:  # an evaluation dataset that holds a pretraining session
        h5["group"][0] = f"SW480/session_{pretrain_corpus.SIM_FIRST_SESSION}"
    with open_dataset(path) as ds, pytest.raises(ValueError, match="simulated sessions"):
        pretrain_corpus.check_disjoint(corpus, [ds])


def test_simulated_corpus_never_reaches_the_probe_sessions():
    n_sessions = pretrain_corpus.PROBE_FIRST_SESSION - pretrain_corpus.SIM_FIRST_SESSION + 1
    with pytest.raises(ValueError, match="reach the probe sessions"):
        pretrain_corpus.simulate_corpus(5 * n_sessions, maps_per_session=1)


def test_simulated_corpus_is_the_same_from_worker_processes():
    serial = pretrain_corpus.simulate_corpus(10, seed=4, maps_per_session=1)
    parallel = pretrain_corpus.simulate_corpus(10, seed=4, maps_per_session=1, workers=2)
    np.testing.assert_array_equal(parallel.maps, serial.maps)
    np.testing.assert_array_equal(parallel.labels, serial.labels)
    np.testing.assert_array_equal(parallel.sessions, serial.sessions)


# ---------------------------------------------------------------------- pretrain()


def test_dataset_stream_leaves_out_the_test_maps_of_a_trained_model(tmp_path_factory, tmp_path):
    run = tiny_run(tmp_path_factory, model="features")
    test = Split.from_json(run.model_dir / "split.json").test
    with open_dataset(scaled_test_dataset(tmp_path_factory)) as ds:
        stream, n_maps, (record,) = pretrain.dataset_stream([ds], batch_size=4, exclude_test=[run.model_dir])
        assert n_maps == len(ds) - len(test) and record["excluded_test_maps"] == len(test) > 0
        maps = np.concatenate([batch.numpy() for batch in stream])
        assert len(maps) == n_maps // 4 * 4  # the remainder batch is dropped
        kept = np.setdiff1d(np.arange(len(ds)), test)
        sums = set(np.round(ds.read(kept).sum(axis=(1, 2)), 1))
        assert set(np.round(maps.sum(axis=(1, 2, 3)), 1)) <= sums  # only maps outside the test split
    other = write_tiny_dataset(tmp_path / "other.h5", classes=("SW480", "PBMCs"), sessions_per_class=1,
                               maps_per_session=2, seed=5)
    with open_dataset(other) as ds:  # not the model's dataset: nothing is left out
        _, n_maps, (record,) = pretrain.dataset_stream([ds], batch_size=2, exclude_test=[run.model_dir])
        assert n_maps == len(ds) and record["excluded_test_maps"] == 0

CONFIG_FIELDS = ("format", "architecture", "input_shape", "input_size", "alpha", "norm_scale_nm", "init",
                 "method", "backbone", "data", "epochs", "steps", "final_loss", "time_s", "versions", "git",
                 "command", "pretraining")


def test_pretrain_writes_a_loadable_folder(tmp_path):
    data = write_tiny_dataset(tmp_path / "unlabelled.h5", classes=("SW480", "granulocytes"),
                              sessions_per_class=2, maps_per_session=4)
    result = pretrain.pretrain(data, backbone="dinov2", method="dino", out=tmp_path / "enc", epochs=2,
                               input_size=28, batch_size=8, dinov2_config=TINY_DINOV2, seed=1,
                               method_kw=method_kwargs("dino"))
    folder = result.folder
    files = {p.name for p in folder.iterdir()}
    assert files == {"config.json", "encoder.weights.h5", "history.csv", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config == json.loads(json.dumps(result.config))
    assert all(key in config for key in CONFIG_FIELDS)
    assert (config["method"], config["backbone"]) == ("dino", "dinov2")
    assert (config["epochs"], config["steps"]) == (2, 4)  # 16 maps in batches of 8
    assert config["data"]["labels_used"] is False
    with open_dataset(data) as ds:
        assert config["data"]["datasets"][0]["fingerprint"] == ds.fingerprint
    assert config["final_loss"] == pytest.approx(result.history["loss"][-1])
    assert len(result.history["loss"]) == 2 and "loss" in (folder / "history.csv").read_text()

    loaded, info = models.build_encoder("dinov2", input_shape=(32, 32, 1), input_size=28, weights=folder)
    fresh, _ = models.build_encoder("dinov2", input_shape=(32, 32, 1), input_size=28,
                                    dinov2_config=TINY_DINOV2, seed=1)
    assert info["init"].startswith(f"file:{folder}@") and info["dinov2_config"]["num_layers"] == 1
    changed = [not np.allclose(a, b) for a, b in zip(loaded.get_weights(), fresh.get_weights(), strict=True)]
    assert any(changed)


def test_cli_pretrain_supervised_sim_stops_at_max_minutes_and_continues_from_an_encoder_folder(tmp_path,
                                                                                              capsys):
    common = ["pretrain", "--method", "supervised-sim", "--backbone", "dinov2", "--n-sim", "10",
              "--batch-size", "5", "--input-size", "28", "--sim-cache", str(tmp_path / "cache"), "-q"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main([*common, "--epochs", "2", "--out", str(first)]) == 0
    assert cli.main([*common, "--epochs", "2", "--max-minutes", "0", "--out", str(second),
                     "--init", str(first)]) == 0
    assert str(second) in capsys.readouterr().out
    config = json.loads((second / "config.json").read_text())
    expected = "python -m opdcells pretrain --backbone dinov2 --method supervised-sim"
    assert config["command"].startswith(expected)
    sim = config["data"]["simulated"]
    assert config["data"]["labels_used"] is True and sim["n_maps"] == 10
    assert sim["session_numbers"][0] == pretrain_corpus.SIM_FIRST_SESSION
    # --max-minutes 0 stops after the first of 2 x 2 steps, and says so
    assert config["steps"] == 1 and config["epochs"] == 2 and config["pretraining"]["stopped_early"]
    assert not json.loads((first / "config.json").read_text())["pretraining"]["stopped_early"]
    # --init: the second run continued from the first one's encoder
    assert config["init"] == "opd-pretrained"
    assert config["init_from"]["folder"] == str(first) and config["init_from"]["epochs_run"] == 2
    assert f"--init {first}" in config["command"]
    assert f"continued from `{first}`" in (second / "README.md").read_text()
    assert json.loads((first / "config.json").read_text())["init_from"] is None
    capsys.readouterr()
    assert cli.main([*common, "--out", str(tmp_path / "third"), "--init", str(tmp_path / "absent")]) == 2
    assert "absent: no such encoder folder" in capsys.readouterr().err

    def weights(folder):
        encoder, _ = models.build_encoder("dinov2", input_shape=(32, 32, 1), input_size=28, weights=folder)
        return np.concatenate([np.ravel(w) for w in encoder.get_weights()])

    fresh, _ = models.build_encoder("dinov2", input_shape=(32, 32, 1), input_size=28,
                                    dinov2_config=models.DINOV2_CPU_CONFIG)
    fresh = np.concatenate([np.ravel(w) for w in fresh.get_weights()])
    start, after = weights(first), weights(second)     # one step from the first run's weights
    assert np.abs(after - start).mean() < 0.1 * np.abs(after - fresh).mean()


# ---------------------------------------------------------------------- shipped encoder


#: shipped encoder folder -> (backbone family, largest weights file in bytes)
SHIPPED_ENCODERS = {"mobilenetv2": (SHIPPED, 5e6),
                    "resnet50": (registry.encoder_folder(registry.DEFAULTS["resnet50"]), 50e6),
                    "dinov2": (registry.encoder_folder(registry.DEFAULTS["dinov2"]), 10e6),
                    "vgg16": (registry.encoder_folder(registry.DEFAULTS["vgg16"]), 31e6)}


@pytest.fixture(scope="module", params=sorted(SHIPPED_ENCODERS))
def shipped(request) -> tuple[str, Path, dict]:
    family = request.param
    folder = SHIPPED_ENCODERS[family][0]
    if not (folder / "config.json").is_file():
        pytest.fail(f"the shipped OPD-pretrained {family} encoder is missing from {folder}")
    return family, folder, json.loads((folder / "config.json").read_text())


def test_shipped_config_is_complete_and_consistent(shipped):
    family, folder, cfg = shipped
    assert all(key in cfg for key in CONFIG_FIELDS)
    assert cfg["format"] == models.ENCODER_FORMAT and cfg["init"] == "opd-pretrained"
    assert models._family(cfg["architecture"]) == family and cfg["backbone"] == family
    assert cfg["alpha"] == cfg["build_info"]["alpha"] and cfg["input_size"] == cfg["build_info"]["input_size"]
    assert cfg["input_shape"] == [128, 128, 1]
    assert cfg["method"] in pretrain_options.METHODS
    assert cfg["command"].startswith("python -m opdcells pretrain")
    assert f"--method {cfg['method']}" in cfg["command"] and f"--backbone {family}" in cfg["command"]
    assert cfg["epochs_run"] <= cfg["epochs"] and cfg["steps"] > 0 and math.isfinite(cfg["final_loss"])
    assert cfg["data"]["kind"] in ("simulated", "datasets")
    assert (cfg["data"]["pixel_size_um"], cfg["data"]["out_size"]) == (0.25, cfg["input_shape"][0])
    assert cfg["versions"]["keras"] and cfg["versions"]["tensorflow"] and cfg["versions"]["opdcells"]
    history = (folder / "history.csv").read_text().splitlines()
    assert len(history) == cfg["epochs_run"] + 1
    assert cfg["command"] in (folder / "README.md").read_text()
    assert (folder / "encoder.weights.h5").stat().st_size < SHIPPED_ENCODERS[family][1]
    before, after = (cfg["probe"][k]["five_class"]["linear"]["accuracy"] for k in ("before", "after"))
    if cfg.get("init_from"):   # continued from a pretrained encoder: chosen on validation sessions, not
        assert after > 0.8     # the probe's 250 maps; it must still separate the five classes (chance 0.2)
    else:
        assert after > before  # pretraining beat the random encoder it started from


def test_shipped_encoder_is_the_default_of_its_family(shipped):
    family, folder, cfg = shipped
    name = "opd_mobilenetv2" if family == "mobilenetv2" else family
    encoder, info = models.build_encoder(name, weights=folder, input_size=cfg["input_size"])
    default, default_info = models.build_encoder(name, weights="opd", input_size=cfg["input_size"])
    entry = registry.get_entry(registry.DEFAULTS[family])
    assert default_info["init"] == entry.init and info["init"].startswith(f"file:{folder}@")
    assert entry.input_size == cfg["input_size"] and entry.pixel_size_um == cfg["data"]["pixel_size_um"]
    assert info["alpha"] == cfg["alpha"] and info["dinov2_config"] == cfg["dinov2_config"]
    assert info["embedding_dim"] == cfg["embedding_dim"]
    for a, b in zip(encoder.get_weights(), default.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    maps = np.stack([np.pad(m, 48) for m in cell_maps(4)])
    emb = encoder(maps[..., None], training=False).numpy()
    assert np.isfinite(emb).all() and emb.std(axis=0).mean() > 1e-3


# ---------------------------------------------------------------------- float16 weights, checkpoints


#: Largest deviation of a float16-stored encoder's embeddings from the float32 one, relative to the
#: largest float32 embedding value (half precision rounds each weight by <= 2**-11 relative; measured
#: 1.1e-3 for the shipped MobileNetV2).
FLOAT16_EMBEDDING_RTOL = 5e-3


def test_float16_weights_predict_like_float32_and_loading_runs_no_code(tmp_path):
    f32, f16 = SHIPPED, tmp_path / "f16"        # a trained encoder (a random one is chaotic, not typical)
    shutil.copytree(f32, f16)
    pretrain_store.cast_weights_file(f16 / "encoder.weights.h5", f16 / "encoder.weights.h5")
    assert pretrain_store.weights_file_dtypes(f16 / "encoder.weights.h5") == {"float16"}
    sizes = [(folder / "encoder.weights.h5").stat().st_size for folder in (f32, f16)]
    assert sizes[1] < 0.65 * sizes[0]   # half, plus the HDF5 overhead of 260 small datasets
    # a folder that would run code if loading deserialised anything: a module and config entries naming it
    marker = tmp_path / "ran"
    (f16 / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((f16 / "config.json").read_text())
    config.update(module="evil", class_name="Evil", registered_name="evil>Evil")
    (f16 / "config.json").write_text(json.dumps(config))
    maps = np.stack([np.pad(m, 48) for m in cell_maps(16)])[..., None]
    embeddings = {}
    for name, folder in (("f32", f32), ("f16", f16)):
        loaded, _ = models.build_encoder("mobilenetv2", weights=folder, input_size=config["input_size"])
        assert {w.dtype for w in loaded.weights} == {"float32"}
        embeddings[name] = loaded(maps, training=False).numpy()
    assert not marker.exists()
    scale = np.abs(embeddings["f32"]).max()
    assert scale > 1e-3
    np.testing.assert_allclose(embeddings["f16"], embeddings["f32"], rtol=0,
                               atol=FLOAT16_EMBEDDING_RTOL * scale)
    assert not np.array_equal(embeddings["f16"], embeddings["f32"])   # really stored at lower precision


def test_float16_cast_refuses_weights_beyond_its_range(tmp_path):
    path = tmp_path / "big.weights.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("layers/dense/vars/0", data=np.array([1.0, 7e4], np.float32))
    with pytest.raises(ValueError, match="exceeds float16's range"):
        pretrain_store.cast_weights_file(path, tmp_path / "out.weights.h5")
    assert not (tmp_path / "out.weights.h5").exists() and not list(tmp_path.glob(".out*"))


def _encoder_weights(folder: Path) -> list[np.ndarray]:
    encoder, _ = models.build_encoder("dinov2", input_shape=(128, 128, 1), input_size=28, weights=folder)
    return encoder.get_weights()


def test_resumed_run_continues_the_schedule_of_the_uninterrupted_one(tmp_path, capsys):
    kw = {"backbone": "dinov2", "method": "supervised-sim", "epochs": 2, "input_size": 28, "n_sim": 10,
          "batch_size": 5, "dinov2_config": TINY_DINOV2, "sim_cache": tmp_path / "cache",
          "sim_maps_per_session": 1}
    whole = pretrain.pretrain(out=tmp_path / "whole", checkpoint=False, **kw)
    first = pretrain.pretrain(out=tmp_path / "chunked", chunk_epochs=1, **kw)
    assert (first.config["epochs_run"], first.config["steps"]) == (1, 2)
    assert "--resume" in (tmp_path / "chunked" / "README.md").read_text()
    checkpoint = tmp_path / "chunked.checkpoint"
    assert pretrain_store.read_checkpoint_state(checkpoint)["epochs_done"] == 1
    assert cli.main(["pretrain", "--resume", str(checkpoint), "--epochs", "3", "-q"]) == 2   # fixed settings
    assert "leave out --epochs" in capsys.readouterr().err
    assert cli.main(["pretrain", "--resume", str(checkpoint), "-q"]) == 0
    config = json.loads((tmp_path / "chunked" / "config.json").read_text())
    assert (config["epochs_run"], config["steps"]) == (2, 4) and config["weights_dtype"] == "float32"
    assert [c["epochs"] for c in config["chunks"]] == [[0, 1], [1, 2]]
    assert config["chunks"][1]["command"] == f"python -m opdcells pretrain --resume {checkpoint}"
    assert config["chunks"][1]["git"] == config["git"] and config["command"] == first.config["command"]
    np.testing.assert_allclose(config["final_loss"], whole.config["final_loss"], rtol=1e-4)
    weights = [_encoder_weights(tmp_path / name) for name in ("whole", "chunked")]
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert cli.main(["pretrain", "--resume", str(tmp_path / "whole"), "-q"]) == 2
    assert "whole: not a pretraining checkpoint" in capsys.readouterr().err
