"""TrainConfig: one documented configuration, written as config.json and read back (validated); model
folders of format 3 (saved before it) still load; the CLI's train options are its fields."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_dataset, tiny_run

from opdcells import cli, registry
from opdcells.config import PROFILE_FIELDS, PROFILES, TrainConfig, field_help, resolve_alias
from opdcells.errors import ConfigError, RegistryError

FORMAT3 = Path(__file__).parent / "fixtures" / "model_format3"


def test_every_field_is_documented_with_its_unit_where_it_has_one():
    for f in dataclasses.fields(TrainConfig):
        assert field_help(f.name), f"TrainConfig.{f.name} has no Attributes entry"
    assert "(px)" in field_help("input_size") and "(nm)" in field_help("norm_scale_nm")
    assert set(PROFILE_FIELDS) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_json_round_trip_and_validation_name_the_file(tmp_path):
    config = TrainConfig.from_profile("dinov2", "full", epochs=3, test_groups=("s1", "s2"),
                                      lr_schedule="cosine")
    path = config.to_json(tmp_path / "train.json")
    assert TrainConfig.from_json(path) == config and config.test_groups == ["s1", "s2"]
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "epoch": 3}))
    with pytest.raises(ConfigError, match=f"{path}: unknown training config key epoch"):
        TrainConfig.from_json(path)
    path.write_text(json.dumps({**data, "epochs": "3"}))
    with pytest.raises(ConfigError, match=f"{path}: epochs must be int, not str '3'"):
        TrainConfig.from_json(path)
    path.write_text(json.dumps({**data, "tta": 1}))
    with pytest.raises(ConfigError, match=f"{path}: tta must be bool"):
        TrainConfig.from_json(path)
    path.write_text(json.dumps({**data, "lr_schedule": "step"}))
    with pytest.raises(ConfigError, match=f"{path}: lr_schedule must be one of constant, cosine"):
        TrainConfig.from_json(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match=f"{path}: cannot read the training config"):
        TrainConfig.from_json(path)
    with pytest.raises(ConfigError, match="unknown TrainConfig field epoch"):
        TrainConfig.from_profile("mobilenetv2", epoch=3)


def test_opd_mobilenetv2_is_mobilenetv2_with_opd_weights_everywhere(monkeypatch):
    assert resolve_alias("opd_mobilenetv2") == ("mobilenetv2", "opd")
    assert resolve_alias("opd_mobilenetv2", "none") == ("mobilenetv2", "opd")
    alias = TrainConfig.from_profile("opd_mobilenetv2")
    assert alias == TrainConfig.from_profile("mobilenetv2", weights="opd")
    assert (alias.model, alias.alpha, alias.input_size, alias.head_epochs) == ("mobilenetv2", 0.35, 128, 2)
    monkeypatch.delitem(registry.DEFAULTS, "vgg16")   # a backbone without a shipped encoder
    with pytest.raises(RegistryError, match=r"registry.DEFAULTS\['vgg16'\]: no OPD-pretrained encoder"):
        TrainConfig.from_profile("vgg16", weights="opd")


def test_pretrained_resnet50_and_vgg16_train_their_head_alone_other_encoders_are_fine_tuned(tmp_path):
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "encoder.weights.h5").write_bytes(b"weights")   # resolved and hashed, not loaded
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet50", "input_size": 64}))
    for profile in PROFILES:
        probe = TrainConfig.from_profile("resnet50", profile, weights=str(folder))
        expected = PROFILES[profile].probe_epochs or PROFILES[profile].pretrained_epochs
        assert (probe.epochs, probe.head_epochs) == (0, expected)
        assert probe.patience == PROFILES[profile].pretrained_patience and probe.input_size == 64
        tuned = TrainConfig.from_profile("opd_mobilenetv2", profile)
        assert (tuned.epochs, tuned.head_epochs) == (PROFILES[profile].pretrained_epochs, 2)
    vgg = folder.parent / "vgg16"
    shutil.copytree(folder, vgg)
    (vgg / "config.json").write_text(json.dumps({"architecture": "vgg16", "input_size": 48}))
    head = TrainConfig.from_profile("vgg16", weights=str(vgg))   # the head alone too (docs/recipe.md)
    assert (head.epochs, head.input_size, head.fusion) == (0, 48, "none")
    assert TrainConfig.from_profile("resnet50", weights=str(folder)).head_epochs == 3   # the quick profile's
    asked = TrainConfig.from_profile("resnet50", weights=str(folder), epochs=3)   # fine-tuning asked for
    assert (asked.epochs, asked.head_epochs) == (3, 2)


@pytest.mark.parametrize("name", ["opd_mobilenetv2", "features"])
def test_format3_model_configs_read_back_as_train_configs(name):
    old = json.loads((FORMAT3 / f"{name}.config.json").read_text())
    assert old["format_version"] == 3 and "train_config" not in old
    config = TrainConfig.from_json(FORMAT3 / f"{name}.config.json")
    training = old["training"]
    assert (config.epochs, config.batch_size, config.learning_rate, config.seed) == (
        training["epochs"], training["batch_size"], training["learning_rate"], training["seed"])
    assert config.tta == (old["test_time_augmentation"] == "dihedral-8")
    if name == "features":
        assert (config.model, config.input_size, config.augment) == ("features", None, None)
    else:   # saved as model opd_mobilenetv2, weights "none": it was the OPD-pretrained MobileNetV2
        assert (config.model, config.weights, config.alpha) == ("mobilenetv2", "opd", 0.35)
        assert (config.head_epochs, config.freeze_batchnorm) == (2, True)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return tiny_run(tmp_path_factory, "features", "cancer_vs_blood")


def test_a_format3_model_folder_still_loads_and_predicts_the_same(features, tmp_path):
    from opdcells.modelfolder import load_model

    folder = tmp_path / "old"
    shutil.copytree(features.model_dir, folder)
    old = json.loads((FORMAT3 / "features.config.json").read_text())
    facts = ("class_names", "class_members", "dataset_class_names", "input_shape", "pixel_size_um",
             "out_size", "preprocess", "task", "task_definition", "dataset", "split", "model_info")
    old.update({key: features.config[key] for key in facts})   # the format-3 layout, this model's facts
    (folder / "config.json").write_text(json.dumps(old))
    loaded = load_model(folder)
    assert loaded.train_config.epochs == 200 and loaded.train_config.model == "features" and not loaded.tta
    maps = np.zeros((2, *features.model.input_shape[:2]), np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(maps), features.model.predict_proba(maps))


def test_a_model_folder_with_an_invalid_train_config_is_refused_naming_its_file(features, tmp_path):
    from opdcells.modelfolder import load_model

    folder = tmp_path / "bad"
    shutil.copytree(features.model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["train_config"]["augment"] = {"rotate": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"{folder / 'config.json'}: augment has unknown keys rotate"):
        load_model(folder)


def test_cli_train_options_are_config_fields_and_a_config_file_is_the_start(features, tmp_path_factory,
                                                                          tmp_path, capsys, monkeypatch):
    data = tiny_dataset(tmp_path_factory)
    start = TrainConfig.from_json(features.model_dir / "config.json").to_json(tmp_path / "start.json")
    out = tmp_path / "run"
    status = cli.main(["train", "--data", str(data), "--config", str(start), "--epochs", "7",
                       "--class-weight", "none", "--out", str(out), "--n-boot", "0", "-q"])
    assert status == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())["train_config"]
    assert saved == {**features.config["train_config"], "epochs": 7, "class_weight": "none"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 0}))
    assert cli.main(["train", "--data", str(data), "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert f"{bad}: epochs must be at least 1" in capsys.readouterr().err
    monkeypatch.delitem(registry.DEFAULTS, "vgg16", raising=False)   # a backbone without a shipped encoder
    assert cli.main(["train", "--data", str(data), "--model", "vgg16", "--weights", "opd",
                     "--out", str(tmp_path / "y")]) == 2
    assert "registry.DEFAULTS['vgg16']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_crop_px_is_a_deep_model_field_and_configs_saved_before_it_read_as_no_crop():
    assert "(px)" in field_help("crop_px") and "whole map" in field_help("crop_px")
    config = TrainConfig.from_profile("mobilenetv2", crop_px=96, input_size=96)
    assert config.crop_px == 96 and config.build_kw["crop_px"] == 96
    assert TrainConfig.from_profile("mobilenetv2").crop_px is None
    assert "crop_px" not in TrainConfig.from_profile("mobilenetv2", crop_px=0).build_kw
    assert TrainConfig.from_profile("features", crop_px=96).crop_px is None   # hand-made features: no crop
    with pytest.raises(ConfigError, match="crop_px must not be negative"):
        TrainConfig.from_profile("mobilenetv2", crop_px=-1)
    before = {k: v for k, v in config.to_dict().items() if k != "crop_px"}
    read = TrainConfig.from_model_config({"format": "opdcells-model", "train_config": before})
    assert read == config.replace(crop_px=None)
    assert TrainConfig.from_json(FORMAT3 / "opd_mobilenetv2.config.json").crop_px is None


def test_a_model_folder_trained_with_a_crop_records_it_and_predicts_the_same_after_loading(tmp_path_factory):
    from helpers import round_trip_maps, trained_proba

    from opdcells.dataset import open_dataset
    from opdcells.modelfolder import load_model

    result = tiny_run(tmp_path_factory, "mobilenetv2", "five_class", crop_px=24, epochs=1)
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["train_config"]["crop_px"] == 24 and config["model_info"]["crop_px"] == 24
    loaded = load_model(result.model_dir)
    assert loaded.train_config.crop_px == 24
    with open_dataset(config["dataset"]["path"]) as data:
        np.testing.assert_array_equal(loaded.predict_proba(round_trip_maps(data)), trained_proba(result))


def test_a_crop_larger_than_the_maps_is_one_line_naming_the_dataset(tmp_path_factory, tmp_path, capsys):
    data = tiny_dataset(tmp_path_factory)
    out = tmp_path / "x"
    assert cli.main(["train", "--data", str(data), "--crop-px", "64", "--out", str(out), "-q"]) == 2
    assert f"{data}: crop_px 64 does not fit its 32 px maps" in capsys.readouterr().err
    assert not out.exists()


def test_refit_is_on_for_the_features_model_and_fused_parts_only_and_old_configs_read_it_as_off():
    assert TrainConfig.from_profile("features").refit is True
    assert TrainConfig.from_profile("mobilenetv2").refit is True            # fused: its features part
    assert TrainConfig.from_profile("mobilenetv2", fusion="none").refit is False
    assert TrainConfig.from_profile("features", refit=False).refit is False
    assert TrainConfig.from_profile("mobilenetv2", weights="opd").refit is False   # not fused by default
    with pytest.raises(ConfigError, match="refit is for the features model"):
        TrainConfig.from_profile("mobilenetv2", fusion="none", refit=True)
    config = TrainConfig.from_profile("features")
    before = {k: v for k, v in config.to_dict().items() if k != "refit"}
    assert TrainConfig.from_model_config({"format": "opdcells-model", "train_config": before}).refit is False
    args = cli.build_parser().parse_args(["train", "--data", "x.h5", "--no-refit"])
    assert cli.train_settings(args)["refit"] is False
