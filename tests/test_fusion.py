"""Late fusion of a deep model and the features model in one model folder (TrainConfig.fusion)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import TINY_TRAINING, eager_functions, round_trip_maps, scaled_test_dataset

from opdcells.config import FEATURES, FUSION_DEEP_WEIGHTS, TrainConfig
from opdcells.errors import ConfigError, ModelError
from opdcells.learners import choose_deep_weight, fuse

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return scaled_test_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fusion") / "features_cache"


@pytest.fixture(scope="module")
def fused(data, cache):
    """A tiny fused MobileNetV2 (its features part fit into ``cache``) and the trained model's own
    probabilities of the round-trip maps, before any save and load."""
    from opdcells.dataset import open_dataset
    from opdcells.train import train

    with eager_functions():
        result = train(data, "mobilenetv2", "five_class", cache.parent / "run", features_cache=cache,
                       **{**TINY_TRAINING, "fusion": FEATURES})
    with open_dataset(data) as ds:
        result.trained_proba = result.model.predict_proba(round_trip_maps(ds))
    return result


def test_fused_folder_holds_both_parts_and_records_the_weight_and_each_part(fused):
    folder, config = fused.model_dir, fused.config
    assert (folder / "model.keras").is_file() and (folder / "model.skops").is_file()
    assert config["train_config"]["fusion"] == FEATURES
    record = config["fusion"]
    assert record["deep_weight"] in FUSION_DEEP_WEIGHTS
    grid = record["validation"]["balanced_accuracy_by_weight"]
    assert [float(w) for w in grid] == list(FUSION_DEEP_WEIGHTS)
    for part in ("deep", "features", "fused"):
        assert 0 <= record["validation"][part]["accuracy"] <= 1
    assert config["calibration"]["temperature"] > 0          # calibrated on the fused probabilities
    assert config["ood"]["file"] and "embedding" in config["ood"]["block_thresholds"]   # the deep encoder's


def test_fused_model_loads_and_predicts_the_weighted_mean_of_its_parts(fused, data):
    from opdcells.dataset import open_dataset
    from opdcells.learners import _FeaturesLearner, _KerasLearner
    from opdcells.modelfolder import load_model
    from opdcells.pipeline import dihedral_views

    saved = load_model(fused.model_dir)
    assert saved.fused and saved.tta
    with open_dataset(data) as ds:
        maps = round_trip_maps(ds)
    proba = saved.predict_proba(maps)
    np.testing.assert_allclose(proba, fused.trained_proba, atol=1e-5)   # the trained model, saved and loaded
    # each part as its own kind loaded it: the deep part averaged over the 8 views, the features part as is
    assert type(saved.learner.deep) is _KerasLearner and type(saved.learner.features_part) is _FeaturesLearner
    views = saved.learner.deep.predict_proba(np.concatenate(dihedral_views(maps)))
    p_deep = views.reshape(8, len(maps), -1).mean(axis=0)
    p_features = saved.learner.features_part.predict_proba(maps)
    w = saved.config["fusion"]["deep_weight"]
    np.testing.assert_allclose(proba, w * p_deep + (1 - w) * p_features, atol=1e-5)
    assert not np.allclose(p_deep, p_features, atol=1e-3)   # two parts that differ, so the weights matter
    with open_dataset(data) as ds:   # the streamed dataset path fuses the same parts
        np.testing.assert_allclose(saved.predict_dataset(ds, np.arange(0, len(ds), 3)), proba, atol=1e-5)


def test_fused_folder_with_a_pickle_or_without_its_features_part_is_refused(fused, tmp_path):
    from opdcells.modelfolder import load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(fused.model_dir, pickled)
    (pickled / "model.joblib").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pickle"):
        load_model(pickled)
    missing = tmp_path / "missing"
    shutil.copytree(fused.model_dir, missing)
    (missing / "model.skops").unlink()
    with pytest.raises(ModelError, match="missing model.skops"):
        load_model(missing)


def test_screening_scores_a_fused_model_with_its_fused_probabilities(fused):
    from opdcells.modelfolder import load_model
    from opdcells.screen import encoder_pass

    saved = load_model(fused.model_dir)
    assert encoder_pass(saved) is None   # no deep-only shortcut: screen calls predict_proba
    assert saved.learner.model.get_layer("encoder") is saved.learner.deep.model.get_layer("encoder")
    with pytest.raises(ValueError, match="only its deep part's encoder"):
        saved.learner.model.get_layer("classifier")


def test_evaluate_reports_the_fusion_and_each_part_alone(fused, data):
    from opdcells.evaluate import classification_report, format_report

    report = fused.metrics
    parts = report["fusion"]["parts"]
    assert set(parts) == {"mobilenetv2 alone", "features alone"}
    for part in parts.values():
        assert part["accuracy"]["ci_low"] <= part["accuracy"]["value"] <= part["accuracy"]["ci_high"]
        assert set(part["per_class"]) == set(report["per_class"])
    evaluation = fused.evaluation   # the report is of the fused probabilities
    again = classification_report(evaluation.y_true, evaluation.proba, evaluation.class_names, n_boot=0)
    assert again["accuracy"]["value"] == report["accuracy"]["value"]
    text = format_report(report)
    assert "late fusion" in text and "mobilenetv2 alone" in text and "features alone" in text


def test_the_fusion_weight_is_chosen_with_the_refit_features_parts_held_out_probabilities(fused, data):
    from opdcells.dataset import open_dataset
    from opdcells.splits import Split
    from opdcells.tasks import task_labels

    part = fused.model.learner.features_part
    assert fused.config["train_config"]["refit"] and part.info["refit"]["n_validation_maps"] > 0
    split = Split.from_json(fused.model_dir / "split.json")
    with open_dataset(data) as ds:
        y_val = task_labels(ds, fused.model.task)[split.val]
        refit_proba = part.predict_indices(ds, split.val)
    held_out = part.held_out_validation
    validation = fused.config["fusion"]["validation"]["features"]
    assert validation["accuracy"] == pytest.approx(np.mean(held_out.argmax(axis=1) == y_val))
    assert not np.allclose(held_out, refit_proba, atol=1e-3)   # the refit saw these maps: not used here


def test_weight_grid_never_gives_the_features_model_alone():
    y = np.array([0, 1, 0, 1])
    right = np.eye(2)[y]
    wrong = np.eye(2)[1 - y]
    weight, grid = choose_deep_weight(wrong, right, y)   # the features part right, the deep part wrong
    assert weight == min(FUSION_DEEP_WEIGHTS) > 0 and "0.0" not in grid
    assert choose_deep_weight(right, right, y)[0] == 0.5   # a tie: the plain mean
    assert choose_deep_weight(right, wrong, y)[0] == max(FUSION_DEEP_WEIGHTS)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        choose_deep_weight(right, right, y, weights=(0.0, 0.5))
    np.testing.assert_allclose(fuse(right, wrong, 0.25), 0.25 * right + 0.75 * wrong)


def test_fusion_setting_defaults_validation_and_cli(capsys):
    from opdcells.cli import build_parser, train_settings

    assert TrainConfig.from_profile("mobilenetv2", "quick").fusion == FEATURES
    assert TrainConfig.from_profile("features", "quick", fusion=FEATURES).fusion == "none"   # ignored
    assert TrainConfig().fusion == "none"   # model folders saved before the field
    with pytest.raises(ConfigError, match="fusion must be one of"):
        TrainConfig(fusion="mean")
    with pytest.raises(ConfigError, match="fusion is for deep models"):
        TrainConfig(model=FEATURES, fusion=FEATURES, input_size=None, augment=None, tta=False)
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "x.h5", "--fusion", "none"])
    assert train_settings(args)["fusion"] == "none"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["train", "--data", "x.h5", "--fusion", "mean"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "--fusion {none,features}" in capsys.readouterr().out


def test_features_cache_fits_a_split_once_for_every_run(fused, cache, data, tmp_path):
    from opdcells.dataset import open_dataset
    from opdcells.learners import FeaturesCache, _class_weights
    from opdcells.modelfolder import load_model
    from opdcells.splits import Split
    from opdcells.tasks import task_labels
    from opdcells.train import train

    assert len(list(cache.iterdir())) == 1
    again = train(data, "features", "five_class", tmp_path / "f", n_boot=0, features_cache=cache, ood=False,
                  calibrate=False, seed=0)   # the features model of the same split: re-used, not fit again
    assert again.config["model_info"]["cache"] and len(list(cache.iterdir())) == 1
    # a hit brings back the refit's record and the first fit's held-out validation probabilities
    part = fused.model.learner.features_part
    assert again.config["model_info"]["refit"] == fused.config["fusion"]["features_model_info"]["refit"]
    np.testing.assert_allclose(again.model.learner.held_out_validation, part.held_out_validation)
    with open_dataset(data) as ds:
        maps = round_trip_maps(ds)
        np.testing.assert_allclose(again.model.predict_proba(maps),
                                   load_model(fused.model_dir).learner.features_part.predict_proba(maps))
        split = Split.from_json(fused.model_dir / "split.json")
        y_all = task_labels(ds, load_model(fused.model_dir).task)
        settings = TrainConfig.from_profile(FEATURES, "quick")
        weights = _class_weights(y_all[split.train], 5)
        key = FeaturesCache.key(ds, split, y_all, settings, weights)
        assert key != FeaturesCache.key(ds, split, y_all, settings.replace(seed=1), weights)
        other = Split(split.train[1:], split.val, split.test)
        assert key != FeaturesCache.key(ds, other, y_all, settings, weights)


def test_comparison_table_gives_the_fused_model_and_its_deep_part_alone(fused):
    from opdcells.evaluate import comparison_table
    from opdcells.study.experiments import _rows

    table = comparison_table(_rows("five_class", "mobilenetv2", fused)).set_index("model")
    assert list(table.index) == ["mobilenetv2 + features", "mobilenetv2"]
    parts = fused.metrics["fusion"]["parts"]["mobilenetv2 alone"]
    assert table.loc["mobilenetv2", "accuracy"] == parts["accuracy"]["value"]
    assert table.loc["mobilenetv2 + features", "accuracy_ci_low"] == fused.metrics["accuracy"]["ci_low"]
    assert table.loc["mobilenetv2", "fusion"] == "deep part alone"
    recalls = [c for c in table.columns if c.startswith("recall ")]
    assert len(recalls) == 5
    first = recalls[0].removeprefix("recall ")
    assert table.loc["mobilenetv2", recalls[0]] == parts["per_class"][first]["recall"]


def test_a_fused_evaluation_keeps_its_deep_part_for_the_cross_validation_table(fused):
    from opdcells.crossval import _deep_part
    from opdcells.evaluate import classification_report

    evaluation = fused.evaluation
    np.testing.assert_allclose(fused.model.learner.fuse(**evaluation.parts), evaluation.proba, atol=1e-6)
    deep = _deep_part("mobilenetv2", evaluation)
    assert list(deep) == ["mobilenetv2 (deep part)"]
    alone = classification_report(evaluation.y_true, deep["mobilenetv2 (deep part)"], evaluation.class_names,
                                  n_boot=0)
    part = fused.metrics["fusion"]["parts"]["mobilenetv2 alone"]
    assert alone["accuracy"]["value"] == part["accuracy"]["value"]
