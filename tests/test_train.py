"""Training (train, modelfolder, learners, evaluate on a model): model folders, config, split,
normalisation, loading and refusing mismatched data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import (
    round_trip_maps,
    scaled_test_dataset,
    tiny_dataset,
    tiny_run,
    trained_proba,
    write_tiny_dataset,
)

pytest.importorskip("tensorflow")

from opdcells.config import PRETRAINED_LEARNING_RATE, TrainConfig  # noqa: E402
from opdcells.dataset import open_dataset  # noqa: E402
from opdcells.errors import ConfigError, DatasetError, ModelError, TaskError  # noqa: E402
from opdcells.evaluate import evaluate_model, stored_test_indices  # noqa: E402
from opdcells.modelfolder import FILES, load_model  # noqa: E402
from opdcells.pipeline import dihedral_views  # noqa: E402
from opdcells.splits import Split  # noqa: E402
from opdcells.tasks import task_targets  # noqa: E402
from opdcells.train import estimate_norm_scale  # noqa: E402

CONFIG_FIELDS = ("task", "class_names", "class_members", "dataset_class_names", "input_shape", "input_size",
                 "pixel_size_um", "out_size", "preprocess", "normalisation", "init", "model_info",
                 "dataset", "split", "training", "versions", "model", "model_file", "name", "created",
                 "train_config")


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    return tiny_run(tmp_path_factory, "mobilenetv2", "five_class")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return tiny_run(tmp_path_factory, "features", "cancer_vs_blood")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    with open_dataset(scaled_test_dataset(tmp_path_factory)) as ds:
        yield ds


def check_folder(result, model_file):
    folder = result.model_dir
    for name in (model_file, *FILES):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    missing = [k for k in CONFIG_FIELDS if k not in config]
    assert not missing
    assert config == json.loads(json.dumps(result.config))
    assert config["dataset"]["fingerprint"] and config["split"]["seed"] == 0
    assert {"opdcells", "keras", "tensorflow", "numpy"} <= set(config["versions"])
    assert config["training"]["epochs_run"] >= 1 and config["training"]["time_s"] > 0
    history = pd.read_csv(folder / "history.csv")
    assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
    assert len(history) == config["training"]["epochs_run"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["class_names"] == config["class_names"]
    assert metrics["n"] == config["split"]["sizes"]["test"]
    return config


def test_deep_model_folder_and_config(mobilenet, data):
    config = check_folder(mobilenet, "model.keras")
    assert config["model"] == "mobilenetv2" and config["init"] == "random"
    assert config["model_info"]["alpha"] == 0.35
    assert config["input_shape"] == [data.out_size, data.out_size, 1] and config["input_size"] == 32
    assert config["pixel_size_um"] == data.pixel_size_um and config["out_size"] == data.out_size
    assert config["class_names"] == ["SW480", "SW620", "granulocytes", "monocytes", "PBMCs"]
    assert config["class_members"]["SW480"] == ["SW480"]
    assert config["normalisation"]["norm_scale_nm"] == config["model_info"]["norm_scale_nm"]
    assert config["train_config"]["augment"]["rotate90"] is True and config["train_config"]["tta"] is True
    assert TrainConfig.from_json(mobilenet.model_dir / "config.json") == mobilenet.model.train_config


def test_early_stopping_keeps_the_best_validation_epoch(mobilenet, data):
    history = pd.read_csv(mobilenet.model_dir / "history.csv")
    best = int(history["val_loss"].idxmin())
    assert mobilenet.config["training"]["best_epoch"] == best + 1
    split = Split.from_json(mobilenet.model_dir / "split.json")
    _, y = task_targets(data.class_names, data.labels[split.val], "five_class")
    model = load_model(mobilenet.model_dir)
    proba = model.predict_dataset(data, split.val, tta=False)  # as Keras validates
    eps, n_classes = model.train_config.label_smoothing, proba.shape[1]   # the recipe's smoothed loss
    target = (1 - eps) * np.eye(n_classes)[y] + eps / n_classes
    val_loss = -np.mean(np.sum(target * np.log(np.clip(proba, 1e-7, 1)), axis=1))
    assert val_loss == pytest.approx(history["val_loss"][best], rel=1e-3)


def test_features_model_has_the_same_folder_and_fields(features, mobilenet):
    config = check_folder(features, "model.skops")
    assert config["model"] == "features" and config["class_names"] == ["cancer", "blood"]
    assert config["class_members"] == {"cancer": ["SW480", "SW620"],
                                       "blood": ["granulocytes", "monocytes", "PBMCs"]}
    assert set(config) == set(mobilenet.config)
    assert features.metrics["sensitivity_at_fpr"]["positive_class"] == "cancer"


@pytest.mark.parametrize("which", ["mobilenet", "features"])
def test_load_model_round_trip_gives_identical_probabilities(which, request):
    result = request.getfixturevalue(which)
    with open_dataset(result.config["dataset"]["path"]) as data:
        check_round_trip(result, data)


def check_round_trip(result, data):
    loaded = load_model(result.model_dir, dataset=data)
    assert loaded.class_names == result.config["class_names"] and loaded.config == result.model.config
    maps = round_trip_maps(data)
    proba = loaded.predict_proba(maps)
    assert proba.shape == (len(maps), len(loaded.class_names))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(proba, trained_proba(result))   # the model as trained, before saving
    streamed = loaded.predict_dataset(data, np.arange(0, len(data), 3))
    np.testing.assert_allclose(streamed, proba, rtol=1e-5, atol=1e-6)
    streamed = loaded.predict_dataset(data, np.arange(0, len(data), 3), tta=False)   # the tf.data stream
    np.testing.assert_allclose(streamed, loaded.predict_proba(maps, tta=False), rtol=1e-5, atol=1e-6)


def test_deep_models_predict_with_the_mean_over_rotations_and_reflections(mobilenet, features, data):
    import keras

    from opdcells.learners import _KerasLearner
    from opdcells.modelfolder import SavedModel

    assert mobilenet.model.tta and not features.model.tta
    assert TrainConfig.from_profile("mobilenetv2", tta=False).tta is False
    assert TrainConfig.from_profile("features").tta is False
    assert TrainConfig.from_profile("mobilenetv2", augment=None).tta is False   # no rotations: no TTA
    size = data.out_size   # a dense layer on raw pixels sees orientation (the tiny CNN predicts a constant)
    dense = keras.Sequential([keras.Input((size, size, 1)), keras.layers.Rescaling(1 / 100),
                              keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")])
    model = SavedModel(mobilenet.model_dir, mobilenet.config, _KerasLearner(dense, {}))
    maps = data.read(np.arange(0, len(data), 5))
    proba, plain = model.predict_proba(maps), model.predict_proba(maps, tta=False)
    assert not np.allclose(proba, plain, atol=1e-3)
    views = [model.predict_proba(v, tta=False) for v in dihedral_views(maps)]
    np.testing.assert_allclose(proba, np.mean(views, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(np.rot90(maps, 1, axes=(1, 2))), proba, atol=1e-5)
    np.testing.assert_allclose(model.predict_dataset(data, np.arange(0, len(data), 5)), proba, atol=1e-6)


def test_load_model_by_run_name(mobilenet, tmp_path, monkeypatch):
    (tmp_path / "saved_models").symlink_to(mobilenet.model_dir.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPDCELLS_SAVED_MODELS", raising=False)
    name = mobilenet.model_dir.name
    with pytest.raises(ModelError, match="no such run in .*saved_models"):   # never the cwd's by surprise
        load_model(name)
    assert load_model(name, saved_models="saved_models").folder.resolve() == mobilenet.model_dir.resolve()
    assert load_model(f"saved_models/{name}").folder.resolve() == mobilenet.model_dir.resolve()
    with pytest.raises(ModelError, match="no such run"):
        load_model("no_such_run", saved_models="saved_models")


def test_reevaluation_on_stored_test_split_reproduces_metrics(mobilenet, data):
    model = load_model(mobilenet.model_dir, dataset=data)
    evaluation = evaluate_model(model, data, stored_test_indices(model, data), n_boot=0)
    assert evaluation.report["confusion_matrix"] == mobilenet.metrics["confusion_matrix"]
    assert evaluation.report["accuracy"]["value"] == pytest.approx(mobilenet.metrics["accuracy"]["value"])


def test_split_keeps_groups_whole(mobilenet, features, data):
    for result in (mobilenet, features):
        split = Split.from_json(result.model_dir / "split.json")
        split.check_disjoint(data.groups)
        parts = [set(data.groups[getattr(split, p)]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        idx, _ = task_targets(data.class_names, data.labels, result.config["task"])
        assert sorted(np.concatenate([split.train, split.val, split.test])) == sorted(idx)


def test_normalisation_is_estimated_on_training_maps_only(mobilenet, data):
    # the test groups of this dataset carry 3x the OPD: a scale estimated on them (or on all maps) differs
    split = Split.from_json(mobilenet.model_dir / "split.json")
    scale = mobilenet.config["normalisation"]["norm_scale_nm"]
    assert scale == pytest.approx(estimate_norm_scale(data, split.train))
    assert scale < 0.6 * estimate_norm_scale(data, split.test)
    assert scale < 0.9 * estimate_norm_scale(data, np.arange(len(data)))


def test_class_weights_balance_the_training_classes(features, data):
    split = Split.from_json(features.model_dir / "split.json")
    _, y = task_targets(data.class_names, data.labels[split.train], "cancer_vs_blood")
    counts = np.bincount(y, minlength=2)
    weights = features.config["training"]["class_weight"]
    assert counts[0] != counts[1]
    for k, name in enumerate(("cancer", "blood")):
        assert weights[name] == pytest.approx(len(y) / (2 * counts[k]))


def test_load_model_refuses_other_pixel_size_or_map_size(mobilenet, tmp_path):
    # other geometries that still hold the cells (a window too small for them is refused at load)
    for i, (kwargs, words) in enumerate((({"pixel_size_um": 2.0}, "um/px"), ({"out_size": 40}, "40 px"))):
        path = write_tiny_dataset(tmp_path / f"other{i}.h5", sessions_per_class=1, maps_per_session=1,
                                  **kwargs)
        with pytest.raises(DatasetError, match=words) as info:
            load_model(mobilenet.model_dir, dataset=path)
        assert mobilenet.model_dir.name in str(info.value)


def test_load_model_refuses_dataset_missing_task_classes(mobilenet, tmp_path):
    path = write_tiny_dataset(tmp_path / "cancer_only.h5", classes=("SW480", "SW620"), sessions_per_class=1,
                              maps_per_session=1)
    with pytest.raises(TaskError, match="granulocytes") as info:
        load_model(mobilenet.model_dir, dataset=path)
    assert mobilenet.model_dir.name in str(info.value)


def test_stored_split_refused_on_another_dataset(mobilenet, tmp_path_factory):
    with open_dataset(tiny_dataset(tmp_path_factory)) as other:
        model = load_model(mobilenet.model_dir, dataset=other)
        with pytest.raises(DatasetError, match="--all"):
            stored_test_indices(model, other)
        report = evaluate_model(model, other, None, n_boot=0).report   # --all: every map of the task
        assert report["n"] == len(other)


def test_stored_split_still_found_after_maps_are_appended(mobilenet, data, tmp_path):
    grown = tmp_path / "copy" / data.path.name
    shutil.copytree(data.path.parent, grown.parent)  # a dataset is its index and the shard folder beside it
    write_tiny_dataset(grown, classes=("SW480",), sessions_per_class=1, maps_per_session=2, seed=5)
    with open_dataset(grown) as ds:
        assert len(ds) == len(data) + 2 and ds.fingerprint != data.fingerprint
        model = load_model(mobilenet.model_dir, dataset=ds)
        np.testing.assert_array_equal(stored_test_indices(model, ds), Split.from_json(
            mobilenet.model_dir / "split.json").test)


def test_profiles_and_explicit_overrides():
    quick = TrainConfig.from_profile("mobilenetv2", "quick")   # the recipe (docs/recipe.md)
    assert (quick.input_size, quick.epochs, quick.patience, quick.alpha) == (64, 20, 6, 0.35)
    assert TrainConfig.from_profile("dinov2", "quick").input_size == 56
    full = TrainConfig.from_profile("resnet50", "full")
    assert 96 <= full.input_size <= 128 and full.epochs > quick.epochs and full.patience > quick.patience
    custom = TrainConfig.from_profile("mobilenetv2", "full", epochs=2, input_size=48, batch_size=4, alpha=0.5)
    assert (custom.epochs, custom.input_size, custom.batch_size, custom.alpha) == (2, 48, 4, 0.5)
    assert TrainConfig.from_profile("features").augment is None
    with pytest.raises(ValueError, match="profile"):
        TrainConfig.from_profile("mobilenetv2", "fast")


def test_another_architecture_trains_and_reloads(tmp_path_factory, data):
    result = tiny_run(tmp_path_factory, "dinov2", "sw480_vs_sw620", input_size=28, epochs=1)   # one will do
    check_folder(result, "model.keras")
    assert result.config["model_info"]["architecture"] == "dinov2"
    loaded = load_model(result.model_dir, dataset=data)
    maps = data.read(np.arange(4))
    np.testing.assert_array_equal(loaded.predict_proba(maps), result.model.predict_proba(maps))


def test_train_on_a_labelled_subset_of_a_given_split(features, data, tmp_path):
    from opdcells.train import train

    split = Split.from_json(features.model_dir / "split.json")
    subset = split.train[::3]
    result = train(data, "features", "cancer_vs_blood", tmp_path / "subset", split=split,
                   train_indices=subset, n_boot=0, calibrate=False, ood=False)
    # a run read only for its test predictions: neither calibrated nor given an OOD detector
    assert result.config["calibration"] is None and result.config["ood"] is None
    assert not (result.model_dir / "ood.npz").exists() and not (result.model_dir / "reliability.png").exists()
    assert (features.model_dir / "ood.npz").exists() and features.config["calibration"] is not None
    assert load_model(result.model_dir).predict_dataset(data, split.test[:4]).shape == (4, 2)
    saved = Split.from_json(result.model_dir / "split.json")
    np.testing.assert_array_equal(saved.train, subset)
    np.testing.assert_array_equal(saved.val, split.val)
    np.testing.assert_array_equal(saved.test, split.test)
    assert result.config["split"]["train_subset"] == {"n_labelled": len(subset), "of": len(split.train)}
    assert result.metrics["n"] == len(split.test)
    with pytest.raises(ValueError, match="subset of the split's training maps"):
        train(data, "features", "cancer_vs_blood", tmp_path / "bad", split=split, train_indices=split.test)
    assert not (tmp_path / "bad").exists()


def test_a_pretrained_encoder_sets_width_input_size_and_normalisation(data, tmp_path, eager):
    from opdcells import models
    from opdcells.train import train

    size = data.out_size
    encoder, info = models.build_encoder("mobilenetv2", input_shape=(size, size, 1), input_size=32, alpha=0.5,
                                         norm_scale_nm=250.0)
    folder = models.save_encoder(encoder, info, tmp_path / "encoder")
    settings = TrainConfig.from_profile("mobilenetv2", "full", weights=str(folder))
    assert settings.alpha == 0.5 and settings.input_size == 32   # not the full profile's 1.0, 128
    profile = TrainConfig.from_profile
    assert profile("mobilenetv2", "full", weights=str(folder), input_size=48).input_size == 48
    assert settings.head_epochs == 2 and settings.freeze_batchnorm              # pretrained: LP-FT, BN fixed
    assert settings.learning_rate == PRETRAINED_LEARNING_RATE < profile("mobilenetv2").learning_rate
    scratch = TrainConfig.from_profile("mobilenetv2", "full")
    assert scratch.head_epochs == 0 and not scratch.freeze_batchnorm
    # no augmentation, no test-time augmentation: neither bears on what is asserted, and both cost tracing
    result = train(data, "mobilenetv2", "cancer_vs_blood", tmp_path / "run", weights=str(folder), epochs=1,
                   batch_size=16, n_boot=0, head_epochs=1, freeze_batchnorm=True, augment=False, tta=False)
    norm = result.config["normalisation"]
    assert norm["norm_scale_nm"] == 250.0 and "pretrained encoder" in norm["method"]
    assert result.config["init"].startswith(f"file:{folder}@")
    # one head-only epoch, then one fine-tuning epoch: the encoder moved, its BatchNorm statistics did not
    assert len(result.history["loss"]) == 2 and result.config["training"]["epochs_run"] == 2
    tuned = result.model.learner.model.get_layer("encoder")
    bn_pairs = list(zip(models.batch_norm_layers(tuned), models.batch_norm_layers(encoder), strict=True))
    for after, before in bn_pairs:
        np.testing.assert_array_equal(after.moving_mean.numpy(), before.moving_mean.numpy())
        np.testing.assert_array_equal(after.moving_variance.numpy(), before.moving_variance.numpy())
    pairs = zip(tuned.get_weights(), encoder.get_weights(), strict=True)
    moved = [not np.array_equal(a, b) for a, b in pairs]
    assert any(moved)


def test_zero_fine_tuning_epochs_train_the_head_alone_on_the_frozen_encoder(data, tmp_path, eager):
    from opdcells import models
    from opdcells.train import train

    size = data.out_size
    encoder, info = models.build_encoder("mobilenetv2", input_shape=(size, size, 1), input_size=32,
                                         alpha=0.35, norm_scale_nm=250.0)
    folder = models.save_encoder(encoder, info, tmp_path / "encoder")
    with pytest.raises(ConfigError, match="0 only with head_epochs"):
        TrainConfig.from_profile("mobilenetv2", weights=str(folder), epochs=0, head_epochs=0)
    result = train(data, "mobilenetv2", "cancer_vs_blood", tmp_path / "run", weights=str(folder), epochs=0,
                   head_epochs=2, patience=5, batch_size=16, n_boot=0, augment=False, tta=False)
    assert len(result.history["loss"]) == result.config["training"]["epochs_run"] == 2
    probed = result.model.learner.model
    for after, before in zip(probed.get_layer("encoder").get_weights(), encoder.get_weights(), strict=True):
        np.testing.assert_array_equal(after, before)   # BatchNorm statistics included


def test_training_calibrates_on_validation_and_the_model_screens(features, tmp_path):
    from opdcells.calibration import load_validation_scores
    from opdcells.predict import ingest_options
    from opdcells.screen import screen_files, screen_settings
    from opdcells.spikein import simulate_sample

    record = features.config["calibration"]
    assert record["targets"] == ["cancer"] and record["temperature"] > 0
    assert record["n_maps"] == features.config["split"]["sizes"]["val"]
    assert record["operating_point"]["fpr"] == 1e-3 and record["operating_point"]["extrapolated"]
    scores = load_validation_scores(features.model_dir)
    assert scores["proba"].shape == (record["n_maps"], 2)
    assert (features.model_dir / "reliability.png").is_file()
    model = load_model(features.model_dir)
    simulate_sample(tmp_path / "sample", 12, {"SW480": 2}, seed=5, maps_per_file=7, progress=False)
    settings = screen_settings(model, fpr=0.05)
    result = screen_files(model, [tmp_path / "sample"], tmp_path / "out", settings,
                          options=ingest_options(model))
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["maps_read"] == result.n_maps > 0 and summary["targets"] == ["cancer"]
    assert summary["operating_point"]["fpr"] == 0.05
