"""Models: one build path for every architecture, weights loading, BatchNormalization momentum.

Models are tiny (32 px maps, MobileNetV2 alpha 0.35, a 2-layer DINOv2) so the file runs on 2 CPU cores.
Single training steps run eagerly (``run_eagerly=True``): tracing a graph costs far more than one step.
"""
from __future__ import annotations

import json
import logging
import socket

import keras
import numpy as np
import pytest
from helpers import register_test_encoder

from opdcells import models, registry
from opdcells.config import FAMILIES
from opdcells.errors import ConfigError, RegistryError
from opdcells.models import (
    batch_norm_layers,
    build_encoder,
    build_model,
    count_params,
    describe,
    save_encoder,
)

S = 32
TINY_DINOV2 = {"num_layers": 2, "hidden_dim": 64, "num_heads": 2, "intermediate_dim": 128}
# The file keras.applications.MobileNetV2(alpha=0.35, include_top=False, weights="imagenet") looks for in
# $KERAS_HOME/models at inputs outside {96, 128, 160, 192, 224} (keras/src/applications/mobilenet_v2.py).
ENCODER_FILE = "encoder.weights.h5"
MOBILENETV2_035_NOTOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


def discs_and_rings(n: int, seed: int = 0, size: int = S) -> tuple[np.ndarray, np.ndarray]:
    """OPD maps (nm) of discs (label 0) and 3-px rings (label 1), radius 7-11 px, jittered, noisy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    maps = np.empty((n, size, size, 1), np.float32)
    labels = np.arange(n) % 2
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(-3, 3, 2)
        r = np.hypot(yy - cy, xx - cx)
        radius = rng.uniform(7, 11)
        inside = (r < radius) & ((r > radius - 3) if label else True)
        maps[i, ..., 0] = 250.0 * inside + rng.normal(0, 10, (size, size))
    return maps, labels


def tiny_kwargs(name: str, **kw) -> dict:
    base = {"input_shape": (S, S, 1), "input_size": 28 if name == "dinov2" else S}
    if name == "dinov2":
        base["dinov2_config"] = TINY_DINOV2
    return {**base, **kw}


def weights_equal(a, b) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


@pytest.fixture
def no_network(monkeypatch):
    """Every host name unresolvable, as on an offline machine (so no test ever downloads)."""

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "offline (test)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty ``$KERAS_HOME`` (with ``models/``) that keras.applications really uses.

    Keras resolves $KERAS_HOME once, at import, into ``keras.src.backend.config._KERAS_DIR``; setting the
    variable now is therefore not enough, and the resolved value is patched too.
    """
    import keras.src.backend.config as keras_config

    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))
    assert keras_config.keras_home() == str(home)
    return home


# ---------------------------------------------------------------------------------------------------------
# One build path for every architecture


# DINOv2's position embeddings are frozen at build (see models._freeze_position_embeddings); a variable's
# trainable flag is not saved, so the reloaded DINOv2 optimizer has 2 more slots (harmless for prediction).
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
@pytest.mark.parametrize("name", FAMILIES)
def test_every_architecture_trains_predicts_and_reloads(name, tmp_path):
    model, info = build_model(name, 3, **tiny_kwargs(name))
    assert info["architecture"] == name and info["init"] == "random"
    assert info["n_classes"] == 3 and info["params"] == count_params(model) > 0
    assert model.input_shape == (None, S, S, 1) and model.output_shape == (None, 3)
    assert json.loads(json.dumps(info)) == info  # the record goes into config.json as it is

    x = discs_and_rings(8, seed=1)[0]
    head = model.get_layer("classifier").get_weights()[0].copy()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    model.fit(x, np.arange(8) % 3, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(model.get_layer("classifier").get_weights()[0], head)  # one step trained it

    proba = np.asarray(model(x, training=False))
    assert proba.shape == (8, 3) and (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), proba)  # raw nm in, same out

    encoder = loaded.get_layer("encoder")  # the normalisation travels inside the file
    scale = keras.Model(encoder.input, encoder.get_layer("opd_scale").output)
    np.testing.assert_allclose(np.asarray(scale(x)), x / 100.0, rtol=1e-6)
    bns = batch_norm_layers(loaded)
    assert all(layer.momentum == 0.9 for layer in bns)
    assert info["bn_momentum"] == (0.9 if bns else None)
    assert bool(bns) == (name not in ("vgg16", "dinov2"))


def test_encoder_layers_and_embedding():
    encoder, info = build_encoder("mobilenetv2", input_shape=(40, 40, 1), input_size=S, norm_scale_nm=250.0)
    assert [layer.name for layer in encoder.layers] == [
        "opd_nm", "opd_scale", "resize", "opd_to_rgb", "backbone", "pool"
    ]
    assert encoder.get_layer("backbone").input_shape == (None, S, S, 3)
    assert encoder.output_shape == (None, info["embedding_dim"]) == (None, 1280)
    assert info["alpha"] == 0.35 and info["norm_scale_nm"] == 250.0 and info["input_size"] == S
    rgb = keras.Model(encoder.input, encoder.get_layer("opd_to_rgb").output)(np.ones((1, 40, 40, 1)) * 250)
    np.testing.assert_allclose(np.asarray(rgb), 1.0, rtol=1e-6)  # 250 nm / 250 nm, in all three channels
    assert "mobilenetv2 (alpha 0.35), init random" in describe(info)


def test_seed_makes_builds_reproducible():
    a, _ = build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, seed=3)
    b, _ = build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, seed=3)
    c, _ = build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, seed=4)
    assert weights_equal(a, b) and not weights_equal(a, c)


def test_bad_names_and_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet18'; choose one of mobilenetv2, resnet50"):
        build_model("resnet18", 3)
    with pytest.raises(ValueError, match="n_classes"):
        build_model("mobilenetv2", 1)
    with pytest.raises(ValueError, match="norm_scale_nm must be positive"):
        build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, norm_scale_nm=0)
    with pytest.raises(RegistryError, match="imagnet: no such encoder folder or weights file"):
        build_encoder("mobilenetv2", weights="imagnet")


# ---------------------------------------------------------------------------------------------------------
# BatchNormalization momentum: evaluation-mode accuracy must move when training from scratch.
# Measured here (2 shared CPU cores, keras 3.15): MobileNetV2 alpha 0.35, 32 px, 64 discs/rings, batch 8,
# Adam 2e-3, 12 epochs. Training-mode accuracy is identical for both momenta (0.47 -> 1.00: momentum only
# changes the moving statistics), but in evaluation mode (model.evaluate):
#   bn_momentum 0.9:            train maps 0.95, unseen maps 0.72
#   bn_momentum 0.999 (Keras):  train maps 0.50, unseen maps 0.50 (chance after every one of the 12 epochs)
# (After 10 epochs, re-estimating the moving statistics of either model on the train maps gave 0.69 on
# unseen maps: the weights are the same, only the statistics differ.) Each run takes 25-50 s here.


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.9, 0.999])
def test_bn_momentum_lets_evaluation_accuracy_move(momentum):
    x, y = discs_and_rings(64, seed=0)
    x_val, y_val = discs_and_rings(64, seed=1)
    model, info = build_model(
        "mobilenetv2", 2, input_shape=(S, S, 1), input_size=S, bn_momentum=momentum, dropout=0.0
    )
    assert {layer.momentum for layer in batch_norm_layers(model)} == {momentum}
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=8, epochs=12, verbose=0)
    train_eval = model.evaluate(x, y, verbose=0)[1]
    val_eval = model.evaluate(x_val, y_val, verbose=0)[1]
    logging.getLogger(__name__).info("momentum %s: eval train %.2f val %.2f", momentum, train_eval, val_eval)
    assert history.history["accuracy"][-1] >= 0.9  # training-mode accuracy climbs either way
    if momentum == 0.9:
        assert train_eval >= 0.75 and val_eval >= 0.6
    else:  # Keras' default: moving statistics still near their initial values, evaluation at chance
        assert train_eval <= 0.6 and val_eval <= 0.6


# ---------------------------------------------------------------------------------------------------------
# ImageNet weights through keras.applications' own cache


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet50", "vgg16"])
def test_imagenet_offline_falls_back_to_random_loudly(name, keras_home, no_network, caplog):
    with caplog.at_level(logging.WARNING, logger="opdcells.models"):
        encoder, info = build_encoder(name, input_shape=(S, S, 1), input_size=S, weights="imagenet")
    assert info["init"] == "random" and info["weights_source"] is None
    assert "RANDOMLY INITIALISED" in caplog.text and name in caplog.text
    assert encoder.output_shape[-1] == info["embedding_dim"]


def test_imagenet_file_with_wrong_hash_falls_back_to_random(keras_home, no_network, caplog):
    (keras_home / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"not weights")
    with caplog.at_level(logging.WARNING, logger="opdcells.models"):
        _, info = build_encoder("vgg16", input_shape=(S, S, 1), input_size=S, weights="imagenet")
    assert info["init"] == "random" and "RANDOMLY INITIALISED" in caplog.text


def test_imagenet_refused_where_no_such_weights_exist():
    with pytest.raises(ValueError, match="alpha in"):
        build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, weights="imagenet", alpha=0.6)
    with pytest.raises(ValueError, match="dinov2 has no ImageNet weights"):
        build_encoder("dinov2", weights="imagenet")
    with pytest.raises(ValueError, match="opd_mobilenetv2 is mobilenetv2 with weights='opd'; for other "
                                         "weights use --model mobilenetv2 --weights imagenet"):
        build_encoder("opd_mobilenetv2", weights="imagenet")
    with pytest.raises(ValueError, match="imagenet_vgg16 is vgg16 with weights='imagenet'"):
        build_encoder("imagenet_vgg16", weights="opd")


def test_a_comparison_of_initialisations_runs_only_the_weights_this_machine_has(keras_home, monkeypatch):
    from opdcells import registry
    from opdcells.study.experiments import initialisation_runs

    monkeypatch.delitem(registry.DEFAULTS, "resnet50", raising=False)   # as on a machine without it
    models = ["features", "mobilenetv2", "resnet50", "dinov2"]
    names, notes = initialisation_runs(models)
    assert names == ["features", "mobilenetv2", "opd_mobilenetv2", "resnet50", "dinov2", "opd_dinov2"]
    assert any("resnet50 OPD-pretrained: no encoder registered" in n for n in notes)
    assert any("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 is not in" in n for n in notes)
    (keras_home / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"x")
    monkeypatch.setitem(registry.DEFAULTS, "resnet50", "opd_resnet50_pretrained")
    names, notes = initialisation_runs(models, ["random", "opd", "imagenet"])
    assert names[3:6] == ["resnet50", "opd_resnet50", "imagenet_resnet50"]
    assert "imagenet_mobilenetv2" not in names
    assert "imagenet_resnet50" not in initialisation_runs(models, imagenet=False)[0]
    assert "imagenet_mobilenetv2" in initialisation_runs(models, imagenet=True)[0]
    assert initialisation_runs(models, ["random"])[0] == models
    with pytest.raises(ValueError, match="unknown initialisation"):
        initialisation_runs(models, ["imagenet21k"])


def test_every_backbone_has_an_opd_and_an_imagenet_alias():
    from opdcells.config import FAMILIES, resolve_alias

    for family in FAMILIES:
        assert resolve_alias(f"opd_{family}") == (family, "opd")
        assert resolve_alias(f"opd_{family}", "opd:other") == (family, "opd:other")
        if family != "dinov2":
            assert resolve_alias(f"imagenet_{family}") == (family, "imagenet")
    with pytest.raises(ValueError, match="unknown model 'imagenet_dinov2'"):
        resolve_alias("imagenet_dinov2")


# ---------------------------------------------------------------------------------------------------------
# Encoder weights files (OPD pretraining)


def test_save_encoder_round_trip_gives_opd_pretrained_model(tmp_path, monkeypatch):
    encoder, info = build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, alpha=0.5, seed=1)
    folder = save_encoder(encoder, info, tmp_path / "opd_mobilenetv2_pretrained")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "encoder.weights.h5"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "mobilenetv2" and config["alpha"] == 0.5
    assert config["input_size"] == S and config["norm_scale_nm"] == 100.0

    model, minfo = build_model(
        "opd_mobilenetv2", 3, input_shape=(S, S, 1), input_size=S, weights=folder, seed=2
    )
    assert weights_equal(model.get_layer("encoder"), encoder)  # alpha 0.5 came from config.json
    sha12 = registry.file_sha256(folder / ENCODER_FILE)[:12]
    assert minfo["init"] == f"file:{folder}@{sha12}" and minfo["alpha"] == 0.5
    assert minfo["weights_source"] == str(folder / ENCODER_FILE) and minfo["architecture"] == "mobilenetv2"

    entry = register_test_encoder(monkeypatch, folder, "mobilenetv2")   # opd_mobilenetv2's weights now
    default, dinfo = build_encoder("opd_mobilenetv2", input_shape=(S, S, 1), input_size=S, seed=3)
    assert weights_equal(default, encoder) and dinfo["init"] == f"opd:test_encoder@{sha12}" == entry.init

    bare, binfo = build_encoder(  # a bare .weights.h5 file needs the right alpha from the caller
        "mobilenetv2", input_shape=(S, S, 1), input_size=S, alpha=0.5, weights=folder / ENCODER_FILE
    )
    assert weights_equal(bare, encoder) and binfo["init"] == f"file:{folder / ENCODER_FILE}@{sha12}"


def test_opd_weights_with_a_corrupt_or_missing_registered_file_are_an_error_never_random(
        tmp_path, monkeypatch):
    encoder, info = build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, seed=1)
    folder = save_encoder(encoder, info, tmp_path / "enc")
    register_test_encoder(monkeypatch, folder, "mobilenetv2")
    with (folder / ENCODER_FILE).open("r+b") as f:   # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(RegistryError, match=f"{folder / ENCODER_FILE}: corrupt: SHA-256 .*test_encoder"):
        build_encoder("opd_mobilenetv2", input_shape=(S, S, 1), input_size=S)
    (folder / ENCODER_FILE).unlink()
    with pytest.raises(RegistryError, match=f"{folder / ENCODER_FILE}: missing: .*test_encoder"):
        build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, weights="opd")


def test_mismatched_encoder_weights_name_the_file(tmp_path):
    encoder, info = build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, alpha=0.5)
    folder = save_encoder(encoder, info, tmp_path / "pre")
    with pytest.raises(ValueError, match=f"{folder}.*architecture 'mobilenetv2', not 'resnet50'"):
        build_encoder("resnet50", weights=folder)
    with pytest.raises(ValueError, match=f"{folder}.*alpha 0.5, requested 1.0"):
        build_encoder("opd_mobilenetv2", weights=folder, alpha=1.0)
    with pytest.raises(ValueError, match=f"{folder / ENCODER_FILE}: weights do not fit"):
        build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, weights=folder / ENCODER_FILE)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=f"{folder}: encoder weights folder lacks config.json"):
        build_encoder("mobilenetv2", weights=folder)


# ---------------------------------------------------------------------------------------------------------
# DINOv2


def test_dinov2_rounds_input_size_to_patches_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger="opdcells.models"):
        encoder, info = build_encoder("dinov2", **tiny_kwargs("dinov2", input_size=32))
    assert "input_size 32 rounded to 28" in caplog.text
    assert info["input_size"] == 28 and info["input_size_requested"] == 32
    backbone = encoder.get_layer("backbone")
    assert tuple(backbone.image_shape) == (28, 28, 3) and backbone.output_shape == (None, 1 + 2 * 2, 64)
    assert encoder.output_shape == (None, 64) == (None, info["embedding_dim"])  # the CLS token
    assert info["dinov2_config"]["num_layers"] == 2 and info["dinov2_config"]["patch_size"] == 14

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opdcells.models"):
        _, info = build_encoder("dinov2", **tiny_kwargs("dinov2", input_size=56))
    assert info["input_size"] == 56 and "rounded" not in caplog.text


def test_dinov2_preset_offline_falls_back_to_random_loudly(no_network, caplog):
    with caplog.at_level(logging.WARNING, logger="opdcells.models"):
        _, info = build_encoder("dinov2", **tiny_kwargs("dinov2", dinov2_preset="dinov2_small"))
    assert info["init"] == "random"
    assert "dinov2_small" in caplog.text and "RANDOMLY INITIALISED" in caplog.text


def test_dinov2_local_preset_and_encoder_weights_round_trip(tmp_path):
    import keras_hub

    shape = (28, 28, 3)
    preset = keras_hub.models.DINOV2Backbone(
        **models.DINOV2_CPU_CONFIG | TINY_DINOV2, image_shape=shape, position_embedding_shape=shape
    )
    preset.save_to_preset(tmp_path / "preset")
    encoder, info = build_encoder(
        "dinov2", input_shape=(S, S, 1), input_size=28, dinov2_preset=str(tmp_path / "preset")
    )
    assert info["init"] == f"dinov2-preset:{tmp_path / 'preset'}"
    assert weights_equal(encoder.get_layer("backbone"), preset)

    folder = save_encoder(encoder, info, tmp_path / "encoder")
    again, again_info = build_encoder("dinov2", input_shape=(S, S, 1), input_size=28, weights=folder, seed=9)
    assert weights_equal(again, encoder) and again_info["init"].startswith(f"file:{folder}@")
    assert again_info["dinov2_config"] == info["dinov2_config"]  # the architecture came from config.json


def test_dinov2_opd_weights_are_the_shipped_folder_and_an_offline_preset_falls_back_to_them(
        tmp_path, monkeypatch, no_network, caplog):
    pretrained, info = build_encoder("dinov2", **tiny_kwargs("dinov2"), seed=4)
    folder = save_encoder(pretrained, info, tmp_path / "opd_dinov2_pretrained")
    entry = register_test_encoder(monkeypatch, folder, "dinov2")
    shipped, shipped_info = build_encoder("dinov2", input_shape=(S, S, 1), input_size=28, weights="opd")
    assert weights_equal(shipped, pretrained) and shipped_info["init"] == entry.init
    assert shipped_info["weights_source"] == str(folder / ENCODER_FILE)
    with caplog.at_level(logging.WARNING, logger="opdcells.models"):
        fallback, fallback_info = build_encoder("dinov2", input_shape=(S, S, 1), input_size=28, weights="opd",
                                                dinov2_preset="dinov2_small")
    assert "dinov2_small" in caplog.text and fallback_info["init"] == entry.init
    assert weights_equal(fallback, pretrained)
    monkeypatch.delitem(registry.DEFAULTS, "vgg16", raising=False)   # a backbone without a shipped encoder
    missing = r"registry.DEFAULTS\['vgg16'\]: no OPD-pretrained encoder is registered for backbone"
    with pytest.raises(RegistryError, match=missing):
        build_encoder("vgg16", weights="opd")
    with pytest.raises(RegistryError, match=missing):
        models.saved_encoder_config("vgg16", "opd")


# ---------------------------------------------------------------------------------------------------------
# The ImageNet path of every CNN, proven with generated files of the exact names, layers and shapes


#: (family, MobileNetV2 alpha, input size, the no-top file keras.applications reads from $KERAS_HOME/models):
#: MobileNetV2 as the quick (0.35, 64 px: no 64 px file, Keras takes the 224 one) and full (1.0, 128 px)
#: profiles build it; ResNet50 and VGG16 have one no-top file each.
IMAGENET_CASES = [
    ("mobilenetv2", 0.35, 64, MOBILENETV2_035_NOTOP),
    ("mobilenetv2", 1.0, 128, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5"),
    ("resnet50", None, S, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ("vgg16", None, S, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
]


def generated_imagenet_file(keras_home, monkeypatch, family, alpha, size, file_name):
    """A no-top backbone of random weights saved under the name keras.applications looks for; its MD5/SHA
    check (ResNet50, VGG16: the hashes of the real files) accepts this one file only."""
    from keras.src.utils import file_utils

    kwargs = {"alpha": alpha} if alpha else {}
    keras.utils.set_random_seed(123)
    reference = models._APPLICATIONS[family](input_shape=(size, size, 3), include_top=False, weights=None,
                                             name="reference", **kwargs)
    path = keras_home / "models" / file_name
    reference.save(path)   # legacy HDF5, the format of Keras' ImageNet files
    validate = file_utils.validate_file
    monkeypatch.setattr(file_utils, "validate_file",
                        lambda fpath, *a, **k: str(fpath) == str(path) or validate(fpath, *a, **k))
    return reference, path


@pytest.mark.parametrize(("family", "alpha", "size", "file_name"), IMAGENET_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in IMAGENET_CASES])
def test_imagenet_weights_load_with_the_family_input_scaling(family, alpha, size, file_name, keras_home,
                                                             no_network, monkeypatch):
    reference, path = generated_imagenet_file(keras_home, monkeypatch, family, alpha, size, file_name)
    kwargs = {"alpha": alpha} if alpha else {}
    encoder, info = build_encoder(family, input_shape=(S, S, 1), input_size=size, weights="imagenet",
                                  norm_scale_nm=200.0, **kwargs)
    assert weights_equal(encoder.get_layer("backbone"), reference)
    assert info["init"] == "imagenet" and info["weights_source"] == str(path)
    assert {layer.momentum for layer in batch_norm_layers(encoder)} <= {0.9}   # kept when weights are loaded
    if family == "mobilenetv2" and size not in models.IMAGENET_SIZES:   # Keras used the 224 px file
        assert "(224, 224)" in info["weights_note"]
    opd = np.zeros((2, S, S, 1), np.float32)
    opd[:, 8:24, 8:24] = 100.0   # a 100 nm cell: half of norm_scale_nm, a mid grey
    seen = keras.Model(encoder.input, encoder.get_layer("imagenet_input").output).predict(opd, verbose=0)
    if family == "mobilenetv2":   # keras.applications.mobilenet_v2.preprocess_input: [-1, 1]
        assert info["input_scaling"] == "tf"
        assert seen.min() == pytest.approx(-1.0)
        assert np.median(seen[:, size // 2, size // 2]) == pytest.approx(0.0, abs=1e-5)
    else:   # caffe: BGR, minus the ImageNet channel means of 0-255 pixels
        assert info["input_scaling"] == "caffe"
        mean_bgr = np.array([103.939, 116.779, 123.68], np.float32)
        np.testing.assert_allclose(seen[0, 0, 0], -mean_bgr, rtol=1e-5)
        np.testing.assert_allclose(seen[0, S // 2, S // 2], 127.5 - mean_bgr, rtol=1e-4)


def test_random_and_opd_encoders_keep_the_opd_input():
    encoder, info = build_encoder("vgg16", input_shape=(S, S, 1), input_size=S)
    assert info["input_scaling"] == "opd" and "imagenet_input" not in [layer.name for layer in encoder.layers]


@pytest.mark.parametrize("family", ["resnet50", "vgg16"])
def test_opd_weights_resolve_to_the_backbone_registry_entry(family, tmp_path, monkeypatch):
    monkeypatch.delitem(registry.DEFAULTS, family, raising=False)   # a backbone without a shipped encoder
    with pytest.raises(RegistryError, match=rf"registry.DEFAULTS\['{family}'\]: no OPD-pretrained encoder"):
        build_encoder(family, input_shape=(S, S, 1), input_size=S, weights="opd")
    encoder, info = build_encoder(family, input_shape=(S, S, 1), input_size=S, seed=4)
    folder = save_encoder(encoder, info, tmp_path / f"opd_{family}")
    entry = register_test_encoder(monkeypatch, folder, family, name=f"opd_{family}_test")
    loaded, linfo = build_encoder(family, input_shape=(S, S, 1), input_size=S, weights="opd", seed=9)
    assert weights_equal(loaded, encoder) and linfo["init"] == entry.init
    assert linfo["input_scaling"] == "opd"


# ---------------------------------------------------------------------------------------------------------
# The head's physical quantities (issue 13, item 4)


def _cell(size: int = 96, centre=(41.3, 52.8), radius_px: float = 20.0, seed: int = 0) -> np.ndarray:
    """A cell-like OPD map (nm): a spherical cap of 220 nm on a 40 nm plateau, an off-centre nucleolus-like
    bump (so the map has no rotational symmetry), 1 nm noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    r = np.hypot(yy - centre[0], xx - centre[1])
    cap = np.where(r < radius_px, 40.0 + 220.0 * np.sqrt(np.clip(1 - (r / radius_px) ** 2, 0, 1)), 0.0)
    bump = 60.0 * np.exp(-((yy - centre[0] - 6) ** 2 + (xx - centre[1] + 4) ** 2) / 18.0) * (r < radius_px)
    return (cap + bump + rng.normal(0, 1.0, (size, size))).astype(np.float32)


def test_physical_quantities_match_the_features_dry_mass_and_area():
    from opdcells.features import extract_features

    opd = _cell()
    layer = models.PhysicalQuantities(0.25, ("dry_mass_pg", "area_um2", "opd_mean_nm"))
    dry_mass, area, mean = np.asarray(layer(opd[None, :, :, None]))[0]
    expected = extract_features(opd, 0.25)
    assert dry_mass == pytest.approx(expected["dry_mass_pg"], rel=0.01)
    assert area == pytest.approx(expected["area_um2"], rel=0.02)
    assert mean == pytest.approx(expected["opd_mean_nm"], rel=0.02)
    # and the formula itself: sum of OPD (um) x pixel area (um^2) / 0.19 mL/g, a disc of pi R^2 pixels
    assert area == pytest.approx(np.pi * 20.0 ** 2 * 0.25 ** 2, rel=0.02)


def test_physical_quantities_are_invariant_to_rotations_and_flips():
    opd = _cell(seed=3)
    views = [np.rot90(opd, k) for k in range(4)]
    views += [np.fliplr(v) for v in views]
    layer = models.PhysicalQuantities(0.25, models.PHYSICAL_QUANTITIES)
    values = np.asarray(layer(np.stack(views)[..., None].astype(np.float32)))
    assert values.shape == (8, len(models.PHYSICAL_QUANTITIES)) and np.isfinite(values).all()
    np.testing.assert_allclose(values, np.broadcast_to(values[0], values.shape), rtol=1e-4)
    moved = np.asarray(layer(np.roll(opd, (5, -7), axis=(0, 1))[None, :, :, None]))   # and to shifts
    np.testing.assert_allclose(moved[0], values[0], rtol=1e-4)
    with pytest.raises(ValueError, match="physical quantities must be some of"):
        models.PhysicalQuantities(0.25, ("dry_mass_pg", "colour"))


def test_model_with_quantities_saves_loads_safely_and_its_encoder_feeds_the_head(tmp_path):
    from scipy import special

    from opdcells.explain import grad_cam

    maps = discs_and_rings(12, seed=2)[0]
    names = ("dry_mass_pg", "area_um2", "gyration_radius_um")
    model, info = build_model("mobilenetv2", 2, **tiny_kwargs("mobilenetv2"), physical_quantities=names,
                              pixel_size_um=0.5)
    assert info["physical_quantities"] == list(names) and "sees 3 physical quantities" in describe(info)
    with pytest.raises(ValueError, match="pixel_size_um"):
        build_model("mobilenetv2", 2, **tiny_kwargs("mobilenetv2"), physical_quantities=names)
    measured = models.adapt_quantities(model, [maps[:6], maps[6:]])
    norm = model.get_layer("encoder").get_layer("quantities_norm")
    np.testing.assert_allclose(np.asarray(norm.mean).ravel(), measured.mean(axis=0), rtol=1e-4)
    proba = np.asarray(model(maps, training=False))

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(maps, training=False)), proba, rtol=1e-5, atol=1e-6)
    # the layer named encoder gives exactly the classifier's input (screening's OOD embedding reads it)
    embedding = np.asarray(loaded.get_layer("encoder")(maps, training=False), np.float64)
    assert embedding.shape == (12, info["embedding_dim"]) == (12, 1280 + len(names))
    kernel, bias = loaded.get_layer("classifier").get_weights()
    np.testing.assert_allclose(special.softmax(embedding @ kernel + bias, axis=1), proba, atol=1e-5)
    heat = grad_cam(loaded, maps[:2])   # Grad-CAM still finds the CNN's feature map
    assert heat.shape == (2, S, S) and np.isfinite(heat).all()


# ---------------------------------------------------------------------------------------------------------
# Centre crop (crop_px): the backbone sees the central pixels at the maps' own pixel size.


def test_a_centre_crop_shows_the_backbone_the_central_pixels_unresampled():
    encoder, info = build_encoder("mobilenetv2", input_shape=(48, 48, 1), input_size=S, crop_px=S,
                                  norm_scale_nm=100.0)
    assert [layer.name for layer in encoder.layers] == [
        "opd_nm", "opd_scale", "crop", "resize", "opd_to_rgb", "backbone", "pool"
    ]
    assert info["crop_px"] == S and info["input_size"] == S and "of a 32 px centre crop" in describe(info)
    maps = discs_and_rings(2, size=48)[0]
    seen = np.asarray(keras.Model(encoder.input, encoder.get_layer("resize").output)(maps))
    np.testing.assert_allclose(seen, maps[:, 8:40, 8:40] / 100.0, rtol=1e-6, atol=1e-6)
    # what lies outside the crop does not reach the embedding; what lies inside does
    border, centre = maps.copy(), maps.copy()
    border[:, :4] += 500.0
    centre[:, 24] += 500.0
    embed = [np.asarray(encoder(x, training=False)) for x in (maps, border, centre)]
    np.testing.assert_array_equal(embed[1], embed[0])
    assert not np.array_equal(embed[2], embed[0])


def test_a_crop_the_size_of_the_maps_is_no_crop_and_a_larger_one_is_refused():
    encoder, info = build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, crop_px=S)
    assert "crop" not in [layer.name for layer in encoder.layers] and info["crop_px"] is None
    assert build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, crop_px=0)[1]["crop_px"] is None
    with pytest.raises(ConfigError, match="<arguments>: crop_px 48 does not fit the 32 x 32 px maps"):
        build_encoder("mobilenetv2", input_shape=(S, S, 1), input_size=S, crop_px=48)


def test_a_cropped_model_saves_loads_safely_and_measures_quantities_on_the_whole_map(tmp_path):
    maps = discs_and_rings(6, seed=4)[0]   # discs of radius 7-11 px: a 12 px crop cuts every one
    names = ("dry_mass_pg", "area_um2")
    model, info = build_model("mobilenetv2", 2, input_shape=(S, S, 1), input_size=S, crop_px=12,
                              physical_quantities=names, pixel_size_um=0.5)
    assert info["crop_px"] == 12
    encoder = model.get_layer("encoder")
    measured = keras.Model(encoder.input, encoder.get_layer("physical_quantities").output)
    whole = np.asarray(models.PhysicalQuantities(0.5, names)(maps))
    cropped = np.asarray(models.PhysicalQuantities(0.5, names)(maps[:, 10:22, 10:22]))
    np.testing.assert_allclose(np.asarray(measured(maps)), whole, rtol=1e-6)
    assert (cropped[:, 1] < 0.9 * whole[:, 1]).all()   # the crop would have cut the cells' area
    proba = np.asarray(model(maps, training=False))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    assert isinstance(loaded.get_layer("encoder").get_layer("map_encoder").get_layer("crop"),
                      keras.layers.CenterCrop)
    np.testing.assert_array_equal(np.asarray(loaded(maps, training=False)), proba)
