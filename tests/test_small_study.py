"""A lab's own classes and a small study: tasks from the data, group cross-validation, cluster bootstrap
intervals, baselines beside the models, named test groups (issue 15)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import once, write_exports, write_tiny_dataset

from opdcells.cli import main
from opdcells.dataset import open_dataset
from opdcells.evaluate import classification_report, headline_metric

pytest.importorskip("tensorflow")

from opdcells.baselines import BASELINES, MAJORITY, MASS_AREA  # noqa: E402
from opdcells.crossval import cross_validate  # noqa: E402
from opdcells.errors import TaskError  # noqa: E402
from opdcells.evaluate import evaluate_model, stored_test_indices  # noqa: E402
from opdcells.modelfolder import load_model  # noqa: E402
from opdcells.predict import predict_files  # noqa: E402
from opdcells.train import train  # noqa: E402

#: Simulated classes relabelled with names a lab might use (none is a reference class name).
LAB_NAMES = {"SW480": "PC-3 cells", "granulocytes": "PNT1A", "monocytes": "DU145"}


def lab_dataset(tmp_path_factory, sessions: int = 3):
    """Three lab classes (PC-3, PNT1A, DU145), ``sessions`` acquisition groups x 4 maps each."""
    return once(("lab", sessions), lambda: write_tiny_dataset(
        tmp_path_factory.mktemp("lab") / "lab.h5", classes=tuple(LAB_NAMES), sessions_per_class=sessions,
        maps_per_session=4, rename=LAB_NAMES))


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """A features model for two of the lab's classes, named as the user writes them."""
    data = lab_dataset(tmp_path_factory)
    return data, train(data, "features", "PC3,PNT1A", tmp_path_factory.mktemp("lab_runs") / "pair", n_boot=20)


def test_a_task_of_arbitrary_class_names_trains_evaluates_and_predicts(lab_run, tmp_path):
    data, result = lab_run
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["task_definition"] == {"name": "PC3_vs_PNT1A", "classes": ["PC3", "PNT1A"],
                                         "members": {"PC3": ["PC3"], "PNT1A": ["PNT1A"]},
                                         "label_ids": {"PC3": 0, "PNT1A": 1}}
    assert config["class_members"] == {"PC3": ["PC-3 cells"], "PNT1A": ["PNT1A"]}
    model = load_model(result.model_dir, dataset=data)
    with open_dataset(data) as ds:
        test = stored_test_indices(model, ds)
        evaluation = evaluate_model(model, ds, test, n_boot=20)
        names = ds.class_names[ds.labels[test]]
        assert evaluation.y_true.tolist() == [0 if n == "PC-3 cells" else 1 for n in names]
        assert "DU145" not in set(ds.class_names[ds.labels[evaluation.indices]])
    assert evaluation.report["balanced_accuracy"] == result.metrics["balanced_accuracy"]
    np.testing.assert_allclose(evaluation.proba, result.evaluation.proba)
    exports = write_exports(tmp_path / "exports", classes=("SW480",), per_class=2)
    predicted = predict_files(model, [exports[0].parent], tmp_path / "preds.csv")
    table = pd.read_csv(predicted.out)
    assert [c for c in table.columns if c.startswith("p_")] == ["p_PC3", "p_PNT1A"] and len(table) == 2
    assert set(table["predicted"]) <= {"PC3", "PNT1A"}


def test_a_grouping_of_lab_classes_labels_maps_by_group(tmp_path_factory, tmp_path):
    data = lab_dataset(tmp_path_factory)
    result = train(data, "features", "tumour=PC3,DU145 normal=PNT1A", tmp_path / "grouped", n_boot=0)
    model = load_model(result.model_dir, dataset=data)
    assert model.class_names == ["tumour", "normal"]
    assert result.config["class_members"] == {"tumour": ["PC-3 cells", "DU145"], "normal": ["PNT1A"]}
    with open_dataset(data) as ds:
        evaluation = evaluate_model(model, ds, n_boot=0)   # every map of the task
        truth = ds.class_names[ds.labels[evaluation.indices]]
    assert len(evaluation.indices) == len(truth) == 36
    assert [model.class_names[y] for y in evaluation.y_true] == [
        "normal" if name == "PNT1A" else "tumour" for name in truth]


def test_a_model_saved_without_a_task_record_resolves_through_its_preset_name(tmp_path_factory, tmp_path):
    data = write_tiny_dataset(tmp_path / "ref.h5", classes=("SW480", "SW620"), sessions_per_class=3,
                              maps_per_session=2)
    result = train(data, "features", "sw480_vs_sw620", tmp_path / "old", n_boot=0)
    config_path = result.model_dir / "config.json"
    config = json.loads(config_path.read_text())
    del config["task_definition"]   # as written by opdcells before tasks were stored
    config_path.write_text(json.dumps(config))
    model = load_model(result.model_dir, dataset=data)
    assert model.task.name == "sw480_vs_sw620" and model.task.members["SW620"] == ("SW620",)
    assert evaluate_model(model, data, n_boot=0).report["n"] == 12


def test_default_task_is_every_class_when_reference_classes_are_missing(tmp_path_factory, tmp_path):
    data = lab_dataset(tmp_path_factory)
    result = train(data, "features", None, tmp_path / "default", n_boot=0)
    assert result.config["task"] == "all"
    assert result.config["class_names"] == ["PC-3 cells", "PNT1A", "DU145"]   # the dataset's order


def test_a_task_whose_classes_are_missing_says_which_in_one_line(tmp_path_factory, tmp_path, capsys):
    data = lab_dataset(tmp_path_factory)
    with pytest.raises(TaskError, match=r"LNCaP\. Classes present: PC-3 cells \(12 maps\), PNT1A \(12 maps"):
        train(data, "features", "PC3,LNCaP", tmp_path / "x", n_boot=0)
    assert main(["train", "--data", str(data), "--model", "features", "--task", "three_class",
                 "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'three_class'" in err[0] and "NAME=A,B" in err[0]


def test_cross_validation_tests_every_map_once_beside_the_baselines(tmp_path_factory, tmp_path):
    data = lab_dataset(tmp_path_factory)
    cv = cross_validate(data, "features", "PC3,PNT1A", 3, out=tmp_path / "cv", n_boot=50)
    with open_dataset(data) as ds:
        in_task = np.flatnonzero(np.isin(ds.class_names[ds.labels], ["PC-3 cells", "PNT1A"]))
    predictions = cv.predictions
    assert sorted(predictions["dataset_index"]) == in_task.tolist()   # each map exactly once
    assert set(predictions["fold"]) == {1, 2, 3}
    by_group = predictions.groupby("group")["fold"].nunique()
    assert (by_group == 1).all()                                       # a group is tested in one fold only
    for fold in (1, 2, 3):                                             # ... by a model that never saw it
        split = json.loads((tmp_path / "cv" / f"fold_{fold}" / "split.json").read_text())
        tested = set(predictions.loc[predictions["fold"] == fold, "group"])
        assert tested == set(split["groups"]["test"]) and not tested & set(split["groups"]["train"])
    assert list(cv.table["model"]) == ["features", *BASELINES]
    assert cv.reports["features"]["n"] == len(in_task)
    assert "two-stage bootstrap over 6 acquisition groups" in cv.reports["features"]["ci_method"]
    assert len(cv.folds) == 3 * 3 and set(cv.folds["fold"]) == {1, 2, 3}
    for name in ("table_csv", "folds_csv", "predictions", "folds_figure", "confusion"):
        assert cv.files[name].stat().st_size > 0


@pytest.fixture(scope="module")
def lab_cv(tmp_path_factory):
    """``train --cv 3`` of the features model on two lab classes, with the defaults: (dataset, output)."""
    data = lab_dataset(tmp_path_factory)
    out = tmp_path_factory.mktemp("lab_cv") / "cv"
    assert main(["train", "--data", str(data), "--model", "features", "--classes", "PC3,PNT1A", "--cv", "3",
                 "--out", str(out), "--n-boot", "20", "--quiet"]) == 0
    return data, out


def test_cv_folds_validate_on_their_own_training_groups_as_train_does(lab_cv, tmp_path, capsys):
    # train --cv without --val-size once gave every fold no validation groups: no early stopping, the
    # fusion weight fixed at 0.5 and no calibration, unlike train itself
    data, out = lab_cv
    with open_dataset(data) as ds:
        class_of = dict(zip(ds.groups.astype(str), ds.class_names[ds.labels], strict=True))
    for fold in (1, 2, 3):
        folder = out / f"fold_{fold}"
        groups = json.loads((folder / "split.json").read_text())["groups"]
        assert not set(groups["val"]) & set(groups["test"]) and not set(groups["val"]) & set(groups["train"])
        assert sorted(class_of[g] for g in groups["val"]) == ["PC-3 cells", "PNT1A"]   # one group per class
        config = json.loads((folder / "config.json").read_text())
        assert config["calibration"]["n_maps"] == 4 * len(groups["val"])              # calibrated on them
    stored = np.load(out / "cv_probabilities.npz")
    predictions = pd.read_csv(out / "cv_predictions.csv")
    assert stored["dataset_index"].tolist() == predictions["dataset_index"].tolist()
    predicted = stored["class_names"][stored["proba/features"].argmax(axis=1)]
    assert predicted.tolist() == predictions["predicted (features)"].tolist()
    assert main(["train", "--data", str(data), "--model", "features", "--classes", "PC3,PNT1A", "--cv", "3",
                 "--val-size", "0", "--out", str(tmp_path / "none"), "--n-boot", "20", "--quiet"]) == 0
    assert json.loads((tmp_path / "none" / "fold_1" / "split.json").read_text())["groups"]["val"] == []
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--model", "features", "--classes", "PC3,PNT1A", "--cv", "3",
                 "--val-size", "0.7", "--out", str(tmp_path / "x")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "Traceback" in line or "error" in line]
    assert len(err) == 1 and "--val-size 0.7" in err[0] and "2/3" in err[0]


def test_reports_give_the_calibration_error_after_each_folds_own_temperature(lab_cv):
    # the report's ece is of the probabilities before the validation groups' temperature; what screening
    # uses is after it: both are reported, per fold and pooled with each fold's temperature
    from opdcells.calibration import apply_temperature
    from opdcells.evaluate import expected_calibration_error

    _, out = lab_cv
    stored = np.load(out / "cv_probabilities.npz")
    index_of = {int(i): row for row, i in enumerate(stored["dataset_index"])}
    names = stored["class_names"].tolist()
    calibrated, y = np.zeros_like(stored["proba/features"]), np.zeros(len(index_of), dtype=int)
    for fold in (1, 2, 3):
        folder = out / f"fold_{fold}"
        temperature = json.loads((folder / "config.json").read_text())["calibration"]["temperature"]
        metrics = json.loads((folder / "metrics.json").read_text())
        test = json.loads((folder / "split.json").read_text())["test"]
        rows = [index_of[i] for i in test]
        predictions = pd.read_csv(out / "cv_predictions.csv").iloc[rows]
        y[rows] = [names.index(t) for t in predictions["true"]]
        proba = stored["proba/features"][rows]
        assert metrics["temperature"] == temperature and temperature != 1.0
        assert metrics["ece"] == pytest.approx(expected_calibration_error(y[rows], proba))
        assert metrics["ece_calibrated"] == pytest.approx(
            expected_calibration_error(y[rows], apply_temperature(proba, temperature)))
        calibrated[rows] = apply_temperature(proba, temperature)
    pooled = pd.read_csv(out / "cv_table.csv").set_index("model")
    expected = expected_calibration_error(y, calibrated)
    assert pooled.loc["features", "ece_calibrated"] == pytest.approx(expected)
    assert np.isnan(pooled.loc[MAJORITY, "ece_calibrated"])     # the baselines are not calibrated


def test_cv_summary_reads_the_pooled_and_per_fold_figures_and_draws_them(lab_cv, tmp_path):
    from opdcells.crossval import cv_summary, plot_cv_accuracy
    from opdcells.errors import ModelError

    _, out = lab_cv
    predictions, table = pd.read_csv(out / "cv_predictions.csv"), pd.read_csv(out / "cv_table.csv")
    summary = cv_summary([out])
    row = summary.iloc[0]
    assert summary["model"].tolist() == ["features"]                  # the baselines are not models
    hits = predictions["true"] == predictions["predicted (features)"]
    assert row["accuracy"] == pytest.approx(hits.mean()) and row["n_maps"] == len(predictions)
    assert row["accuracy_ci_low"] <= row["accuracy"] <= row["accuracy_ci_high"]
    per_fold = hits.groupby(predictions["fold"]).mean()
    assert row["fold_accuracy"] == pytest.approx(per_fold.tolist()) and row["folds"] == 3
    balanced = table.loc[table["model"] == "features", "balanced_accuracy"].item()
    recalls = row[[c for c in summary.columns if c.startswith("recall ")]]
    assert len(recalls) == 2 and recalls.mean() == pytest.approx(balanced)
    assert row["train_time_s"] > 0
    path = plot_cv_accuracy([out], tmp_path / "cv_accuracy.png")
    assert path.stat().st_size > 0
    with pytest.raises(ModelError, match=r"fold_1: not a finished train --cv output"):
        cv_summary([out / "fold_1"])


def test_cluster_bootstrap_widens_the_interval_when_groups_are_few():
    # 6 fields, 3 per class, 60 cells each; the field decides whether its cells are classified correctly
    rng = np.random.default_rng(0)
    correct_rate = [0.95, 0.3, 0.9, 0.5, 1.0, 0.6]
    y_true = np.repeat([0, 0, 0, 1, 1, 1], 60)
    groups = np.repeat([f"field_{g}" for g in range(6)], 60)
    hit = np.concatenate([rng.random(60) < p for p in correct_rate])
    y_pred = np.where(hit, y_true, 1 - y_true)
    proba = np.eye(2)[y_pred]
    by_maps = classification_report(y_true, proba, ["A", "B"], n_boot=1000)
    by_groups = classification_report(y_true, proba, ["A", "B"], n_boot=1000, groups=groups)
    assert by_maps["accuracy"]["value"] == by_groups["accuracy"]["value"]

    def width(report):
        return report["balanced_accuracy"]["ci_high"] - report["balanced_accuracy"]["ci_low"]

    assert width(by_groups) > 2.5 * width(by_maps)
    assert "two-stage" in by_groups["ci_method"] and "maps" in by_maps["ci_method"]
    assert by_groups["warnings"] == [] and by_groups["groups_per_class"] == {"A": 3, "B": 3}


def test_one_group_per_class_still_gets_an_interval_and_a_warning():
    """With one acquisition group per class, resampling groups alone would give a zero-width interval;
    the two-stage bootstrap keeps the maps' variation, and the report says the groups' is unknown."""
    rng = np.random.default_rng(1)
    y_true = np.repeat([0, 1], 80)
    y_pred = np.where(rng.random(160) < 0.8, y_true, 1 - y_true)
    report = classification_report(y_true, np.eye(2)[y_pred], ["A", "B"], n_boot=500,
                                   groups=np.repeat(["a", "b"], 80))
    ci = report["accuracy"]
    assert ci["ci_low"] < ci["value"] < ci["ci_high"] and ci["ci_high"] - ci["ci_low"] > 0.05
    assert len(report["warnings"]) == 1 and "A 1, B 1" in report["warnings"][0]


def test_few_test_groups_are_warned_about_and_imbalance_makes_balanced_accuracy_the_headline():
    y_true = np.array([0] * 46 + [1] * 9)
    groups = np.array(["a"] * 46 + ["b"] * 9)
    always_majority = np.eye(2)[np.zeros(55, dtype=int)]
    report = classification_report(y_true, always_majority, ["PNT1A", "PC3"], n_boot=10, groups=groups)
    assert report["accuracy"]["value"] == pytest.approx(46 / 55)   # the majority answer looks good ...
    assert report["headline"] == "balanced_accuracy" and report["balanced_accuracy"]["value"] == 0.5
    assert len(report["warnings"]) == 1 and "PNT1A 1, PC3 1" in report["warnings"][0]
    assert "--cv" in report["warnings"][0]
    assert headline_metric([0, 1, 0, 1]) == "accuracy"


def test_baselines_appear_beside_the_models_in_comparison_tables(tmp_path_factory, tmp_path):
    from opdcells.study.experiments import compare_models

    data = lab_dataset(tmp_path_factory)
    comparison = compare_models(data, ["features"], ["PC3,PNT1A"], name="study", n_boot=20,
                                saved_models=tmp_path / "models", results=tmp_path / "results", verbose=0)
    table = comparison.table
    assert list(table["model"]) == ["features", MAJORITY, MASS_AREA]
    assert (table["n"] == table["n"].iloc[0]).all()                  # the same test maps
    assert (table.loc[table["model"] == MAJORITY, "balanced_accuracy"] == 0.5).all()
    assert (tmp_path / "models" / "study_features_PC3_vs_PNT1A" / "config.json").is_file()
    assert MASS_AREA in comparison.files["table_md"].read_text()
    assert comparison.folders[("PC3,PNT1A", "features")].is_dir()


def test_named_test_and_validation_groups_from_the_cli(tmp_path_factory, tmp_path, capsys):
    data = lab_dataset(tmp_path_factory)
    out = tmp_path / "named"
    assert main(["train", "--data", str(data), "--model", "features", "--classes", "PC3,PNT1A", "--out",
                 str(out), "--test-groups", "PC-3 cells/session_2,PNT1A/session_3",
                 "--val-groups", "PNT1A/session_1", "--n-boot", "20", "-q"]) == 0
    printed = capsys.readouterr().out
    assert MAJORITY in printed and MASS_AREA in printed   # baselines printed beside the model
    split = json.loads((out / "split.json").read_text())
    assert split["groups"] == {
        "train": ["PC-3 cells/session_1", "PC-3 cells/session_3", "PNT1A/session_2"],
        "val": ["PNT1A/session_1"], "test": ["PC-3 cells/session_2", "PNT1A/session_3"]}
    assert main(["train", "--data", str(data), "--model", "features", "--classes", "PC3,PNT1A", "--out",
                 str(tmp_path / "bad"), "--test-groups", "PC3/session_9"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("task ")]  # info
    assert len(err) == 1 and "unknown acquisition groups ['PC3/session_9']" in err[0]
    assert "the groups are: PC-3 cells/session_1" in err[0]


def test_cli_cross_validation_prints_pooled_and_per_fold_tables(tmp_path_factory, tmp_path, capsys):
    data = lab_dataset(tmp_path_factory)
    assert main(["train", "--data", str(data), "--model", "features", "--task",
                 "tumour=PC3,DU145 normal=PNT1A", "--cv", "3", "--out", str(tmp_path / "cv"),
                 "--n-boot", "20", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "3-fold group cross-validation of features on tumour_vs_normal" in printed
    assert f"| {MASS_AREA} |" in printed and "per fold:" in printed
    assert (tmp_path / "cv" / "cv_table.csv").is_file()
    assert main(["train", "--data", str(data), "--model", "features", "--cv", "10", "--out",
                 str(tmp_path / "cv10")]) == 2
    assert "choose K <= 9" in capsys.readouterr().err


def test_an_encoder_used_at_another_geometry_is_named_loudly():
    from opdcells.train import geometry_warning

    encoder = {"pixel_size_um": 0.25, "out_size": 128, "input_size": 64}
    assert geometry_warning(encoder, 0.25, 128) is None
    coarser = geometry_warning(encoder, 0.5, 64, 64, "the opd encoder")
    assert coarser.startswith("the opd encoder was pretrained on 128 px maps at 0.25 um/px (a 32 um window)")
    assert "used on 64 px maps at 0.5 um/px" in coarser and "keep their size" in coarser
    assert "--out-pixel-size-um 0.25 --out-size 128" in coarser
    smaller_window = geometry_warning(encoder, 0.25, 64, 64)
    assert "cells look 2x the size it learnt them at" in smaller_window   # 16 um window, same input
    assert geometry_warning({"architecture": "dinov2"}, 0.5, 64) is None   # nothing to compare with
    cropped = geometry_warning(encoder, 0.25, 128, crop_px=96)               # train --crop-px 96: 24 um
    assert "used on 96 px centre crops at 0.25 um/px (a 24 um window)" in cropped
    assert "cells look 1.3x the size" in cropped and geometry_warning(encoder, 0.25, 128, crop_px=128) is None
