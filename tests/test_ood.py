"""opdcells.ood: Mahalanobis out-of-distribution detection, fitted at training time, used by predict.

The real-cell test trains nothing new: it reuses the session's tiny ``features`` model (simulated maps,
32 px at 1 um) and checks that real HL60 and red blood cells, empty and debris maps are flagged while
simulated maps of unseen sessions are not.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.io
from helpers import _session_maps, tiny_run, write_exports

from opdcells import ood
from opdcells.features import FEATURE_NAMES
from opdcells.preprocess import PreprocessConfig
from opdcells.simulate import CLASS_NAMES, TRUTH_COLUMNS, is_simulated_export

pytest.importorskip("tensorflow")

from opdcells.modelfolder import SavedModel, load_model  # noqa: E402
from opdcells.predict import predict_files  # noqa: E402


def gaussian_inputs(rng, n, shift=0.0):
    """Two classes in 6 embedding dimensions (correlated) and 4 morphology features."""
    labels = rng.integers(0, 2, n)
    mix = np.eye(6) + 0.5
    emb = rng.normal(size=(n, 6)) @ mix + 3.0 * labels[:, None] + shift
    phys = rng.normal(size=(n, 4)) * 0.1 + np.log1p([100.0, 150.0, 120.0, 300.0]) + shift / 10
    return {"embedding": emb, "morphology": phys}, labels


def test_detector_flags_far_maps_and_about_one_percent_of_maps_like_the_training_maps(tmp_path):
    rng = np.random.default_rng(0)
    train, labels = gaussian_inputs(rng, 400)
    val, _ = gaussian_inputs(rng, 200)
    detector = ood.OODDetector.fit(train, labels)
    detector.calibrate(val)
    assert "gamma" in detector.method   # 200 maps are too few for an empirical 99th percentile
    held_out, _ = gaussian_inputs(rng, 4000)
    rate = detector.flag(detector.score(held_out)).mean()
    assert 0.002 < rate < 0.03
    far, _ = gaussian_inputs(rng, 50, shift=8.0)
    assert detector.flag(detector.score(far)).all()
    nan = {name: np.full((2, x.shape[1]), np.nan) for name, x in held_out.items()}
    assert np.isinf(detector.score(nan)).all()


def test_maps_without_a_measured_block_are_scored_on_the_other_blocks():
    rng = np.random.default_rng(2)
    train, labels = gaussian_inputs(rng, 300)
    detector = ood.OODDetector.fit(train, labels)
    detector.calibrate(gaussian_inputs(rng, 200)[0])
    maps, _ = gaussian_inputs(rng, 40)
    maps["morphology"][::4] += 5.0                       # far in morphology only
    measured = np.arange(40) % 2 == 0                    # morphology measured for every other map
    full = detector.score(maps)
    assert np.array_equal(detector.score(maps, {"morphology": np.ones(40, bool)}), full)
    partial = detector.score({**maps, "morphology": np.where(measured[:, None], maps["morphology"], np.nan)},
                             {"morphology": measured})
    embedding_only = detector.blocks["embedding"].distance(maps["embedding"]) / detector.blocks[
        "embedding"].threshold
    assert np.array_equal(partial[measured], full[measured])
    assert np.array_equal(partial[~measured], embedding_only[~measured])
    assert detector.flag(full[::4]).all() and detector.flag(partial[::4]).all()   # the far ones measured


def test_detector_round_trips_through_plain_arrays_and_refuses_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    inputs, labels = gaussian_inputs(rng, 300)
    detector = ood.OODDetector.fit(inputs, labels)
    detector.calibrate(inputs)
    path = detector.save(tmp_path)
    back = ood.OODDetector.load(path)
    np.testing.assert_allclose(back.score(inputs), detector.score(inputs), rtol=1e-5)
    assert back.method == detector.method and back.quantile == detector.quantile
    np.savez(tmp_path / "pickled.npz", format_version=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ood.OODError, match="pickled.npz: cannot read"):
        ood.OODDetector.load(tmp_path / "pickled.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ood.OODError, match="broken.npz"):
        ood.OODDetector.load(tmp_path / "broken.npz")
    np.savez(tmp_path / "short.npz", format_version=1)
    with pytest.raises(ood.OODError, match="short.npz: lacks the array"):
        ood.OODDetector.load(tmp_path / "short.npz")


def test_empirical_quantile_when_the_tail_has_enough_maps():
    values = np.random.default_rng(2).chisquare(8, 5000) ** 0.5
    threshold, method = ood.upper_quantile(values, 0.99)
    assert method == "empirical quantile" and threshold == pytest.approx(np.quantile(values, 0.99))
    with pytest.raises(ValueError, match="too few"):
        ood.upper_quantile([1.0, np.nan], 0.99)


def test_fitted_threshold_never_flags_more_calibration_maps_than_their_tail_supports():
    rng = np.random.default_rng(3)
    # 720 validation maps: most like the training sessions, 8% of sessions further out (a heavier tail
    # than the gamma fit to the median and 90th percentile sees)
    values = np.concatenate([rng.chisquare(8, 662), 3.0 * rng.chisquare(8, 58)]) ** 0.5
    threshold, method = ood.upper_quantile(values, 0.995)
    assert np.sum(values > threshold) <= ood.MIN_TAIL            # the fit alone flagged 17
    assert "raised to the empirical" in method
    light = rng.chisquare(8, 200) ** 0.5                         # no heavy tail: the fit's quantile stands
    threshold, method = ood.upper_quantile(light, 0.99)
    assert "raised" not in method and threshold > ood.supported_floor(light ** 2) ** 0.5


def test_simulator_exports_are_recognised(tmp_path):
    simulated = write_exports(tmp_path / "sim", classes=("SW480",), per_class=1)[0]
    measured = tmp_path / "measured.mat"
    scipy.io.savemat(measured, {"phase": np.zeros((8, 8)), "units": "rad"})
    assert is_simulated_export(simulated) is True
    assert is_simulated_export(measured) is False
    assert is_simulated_export(tmp_path / "gone.mat") is None
    older = tmp_path / "older_simulation" / "SW480" / "session_1"   # exports of an opdcells before the stamp
    older.mkdir(parents=True)
    scipy.io.savemat(older / "cell.mat", {"phase": np.zeros((8, 8)), "units": "rad"})
    (tmp_path / "older_simulation" / "truth.csv").write_text(",".join(TRUTH_COLUMNS) + "\n")
    assert is_simulated_export(older / "cell.mat") is True


# --------------------------------------------------------------------------------------- with models


@pytest.fixture(scope="module")
def features_model(tmp_path_factory):
    return tiny_run(tmp_path_factory, "features", "five_class").model


def test_training_saves_the_detector_and_what_the_model_was_trained_on(features_model):
    config = features_model.config
    assert config["ood"]["file"] == "ood.npz" and (features_model.folder / "ood.npz").is_file()
    assert config["ood"]["calibrated_on"] == "validation maps" and config["ood"]["threshold"] == 1.0
    assert 0 <= config["ood"]["calibration_flag_rate"] <= 0.1
    assert "only 20 validation maps" in config["ood"]["warning"]   # the tiny dataset: said, not hidden
    assert config["dataset"]["origin"] == "unknown"   # the helpers' dataset names no file on disk
    assert config["dataset"]["fingerprint"] and config["dataset"]["path"].endswith(".h5")


def held_out_simulated(config: PreprocessConfig) -> np.ndarray:
    """Simulated maps of sessions the tiny datasets never use (7 and 8), 6 per session and class."""
    return np.stack([p.opd for c in CLASS_NAMES for k in (7, 8)
                     for _, p, _ in _session_maps(c, k, 6, 0, config, 1.0)])


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory):
    """A features model on 10 maps per session (150 maps): 30 validation maps to set the thresholds on."""
    from helpers import once, write_tiny_dataset

    from opdcells.train import train

    def make():
        folder = tmp_path_factory.mktemp("ood")
        data = write_tiny_dataset(folder / "ten_per_session.h5", maps_per_session=10)
        return train(data, "features", "five_class", folder / "features", n_boot=20).model

    return once("ood_calibrated_model", make)


def test_real_cells_empty_and_debris_maps_are_flagged_and_unseen_simulated_sessions_are_not(
        calibrated_model, real_qpi):
    from opdcells.study.transfer import load_real_cells

    features_model = calibrated_model
    config = features_model.preprocess_config
    real = load_real_cells(real_qpi, config, hl60_every=5, rbc_files=("gt_phase1.mat", "gt_phase2.mat"))
    size = config.out_size
    empty = np.random.default_rng(0).normal(0.0, 3.0, (10, size, size))
    debris = empty.copy()
    debris[:, size // 2 - 1:size // 2 + 2, size // 2 - 1:size // 2 + 2] += 150.0   # a 3 um dense particle
    detector = ood.load_detector(features_model)

    def flag_rate(maps):
        inputs = ood.model_inputs(features_model.learner, maps, config.out_pixel_size_um)
        return detector.flag(detector.score(inputs)).mean()

    assert flag_rate(real["HL60 (real)"]) >= 0.9
    assert flag_rate(real["RBC (real)"]) >= 0.9
    assert flag_rate(empty) == 1.0 and flag_rate(debris) == 1.0
    assert flag_rate(held_out_simulated(config)) <= 0.05


def test_predict_writes_ood_columns_and_a_summary(features_model, tmp_path, caplog):
    exports = write_exports(tmp_path / "exports", per_class=2)
    with caplog.at_level(logging.INFO, logger="opdcells"):
        result = predict_files(features_model, exports, tmp_path / "preds.csv")
    table = pd.read_csv(result.out)
    assert list(table.columns[-2:]) == ["ood_score", "ood_flag"]
    assert np.isfinite(table["ood_score"]).all() and set(table["ood_flag"]) <= {0, 1}
    assert f"{table['ood_flag'].sum()} of {len(table)} maps unlike the training data" in caplog.text
    assert "simulated cells only" not in caplog.text   # origin unknown: nothing claimed


def test_predict_says_once_when_the_model_saw_simulated_cells_only(features_model, tmp_path, caplog):
    config = {**features_model.config, "dataset": {**features_model.config["dataset"], "origin": "simulated"}}
    model = SavedModel(features_model.folder, config, features_model.learner)
    exports = write_exports(tmp_path / "exports", per_class=3)
    with caplog.at_level(logging.WARNING, logger="opdcells"):
        predict_files(model, exports, tmp_path / "preds.csv", batch_size=2)
    assert caplog.text.count("trained on simulated cells only") == 1


def test_a_model_without_ood_npz_predicts_as_before(features_model, tmp_path, caplog):
    import shutil

    folder = tmp_path / "old_model"
    shutil.copytree(features_model.folder, folder)
    (folder / "ood.npz").unlink()
    old = load_model(folder)
    exports = write_exports(tmp_path / "exports", per_class=1)
    with caplog.at_level(logging.INFO, logger="opdcells"):
        table = pd.read_csv(predict_files(old, exports, tmp_path / "preds.csv").out)
    assert "ood_score" not in table.columns and list(table.columns[-1:]) == [f"p_{old.class_names[-1]}"]
    assert "has no ood.npz" in caplog.text


def test_keras_models_use_their_encoder_embedding(tmp_path_factory):
    model = tiny_run(tmp_path_factory, "mobilenetv2", "five_class").model
    maps = held_out_simulated(model.preprocess_config)[:8]
    inputs = ood.model_inputs(model.learner, maps, model.config["pixel_size_um"])
    width = model.learner.model.get_layer("encoder").output_shape[-1]
    assert inputs["embedding"].shape == (8, width) and inputs["morphology"].shape == (8, len(FEATURE_NAMES))
    detector = ood.load_detector(model)
    assert detector.blocks["embedding"].means.shape == (5, width)   # one Gaussian per dataset class
    assert np.isfinite(detector.score(inputs)).all()


def test_morphology_of_dataset_maps_is_measured_once_per_process(features_model, tmp_path_factory,
                                                                  monkeypatch):
    from helpers import tiny_dataset

    from opdcells.dataset import open_dataset

    measured, original = [], ood.feature_matrix

    def counting(maps, pixel_size_um):
        measured.append(len(maps))
        return original(maps, pixel_size_um)

    monkeypatch.setattr(ood, "feature_matrix", counting)
    monkeypatch.setattr(ood, "_MORPHOLOGY", {})   # rows an earlier test file measured in this process
    with open_dataset(tiny_dataset(tmp_path_factory)) as ds:
        first = ood._inputs_of(features_model.learner, ds, np.arange(10))
        again = ood._inputs_of(features_model.learner, ds, np.arange(5, 15))
    assert measured == [10, 5]
    np.testing.assert_array_equal(first["morphology"][5:], again["morphology"][:5])
