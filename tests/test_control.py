"""Negative controls: the threshold set on a blood-only sample of the screened sample's session.

The model is a transparent stand-in whose probability of SW480 rises with a map's dry mass (SW480 cells
are two to three times heavier than blood cells in the simulator), so what the control does with scores
can be checked exactly.
"""
import csv
import json

import h5py
import numpy as np
import pytest
from scipy import special, stats

from opdcells.calibration import (
    clopper_pearson,
    control_point,
    load_operating_point,
    np_order_statistic,
    save_operating_point,
    save_validation_scores,
)
from opdcells.cli import main
from opdcells.control import calibrate_control, control_scores
from opdcells.errors import ScreenError
from opdcells.ingest import IngestOptions
from opdcells.preprocess import PreprocessConfig
from opdcells.screen import merge_screens, screen_files, screen_settings
from opdcells.spikein import session_seed_of, simulate_sample

CONFIG = PreprocessConfig(out_pixel_size_um=0.5, out_size=48)
OPTIONS = IngestOptions(config=CONFIG)


class OPDModel:
    """p(SW480) = expit((dry mass - 130 pg) / 10 pg); the rest split between the two blood classes."""

    tta = False
    class_names = ["SW480", "granulocytes", "PBMCs"]

    def __init__(self, folder, name="opd-model"):
        self.folder, self.name = folder, name
        point = {"fpr": 0.2, "threshold": 1e-9, "threshold_ci": [1e-9, 1e-9], "sensitivity": 0.9,
                 "sensitivity_ci": [0.8, 0.95], "n_negative": 100, "n_positive": 10, "extrapolated": False,
                 "basis": "test"}
        self.config = {"calibration": {"temperature": 1.0, "targets": ["SW480"], "operating_point": point}}

    def predict_proba(self, maps, batch_size=64, *, tta=None):
        mass = np.asarray(maps, float).sum(axis=(1, 2)) * 1e-3 * 0.5 ** 2 / 0.19   # pg (0.5 um pixels)
        p = special.expit((mass - 130.0) / 10.0)
        return np.stack([p, (1 - p) / 2, (1 - p) / 2], axis=1)


def read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sample_and_control(tmp_path_factory):
    root = tmp_path_factory.mktemp("spike")
    simulate_sample(root / "sample", 40, {"SW480": 4}, seed=2, maps_per_file=22, progress=False)
    simulate_sample(root / "control", 60, {}, seed=3, session_seed=session_seed_of(root / "sample"),
                    maps_per_file=30, progress=False)
    return root / "sample", root / "control"


@pytest.mark.parametrize("seed", [0, 1])
def test_control_threshold_meets_its_rate_on_held_out_negatives(seed):
    rng = np.random.default_rng(seed)
    draw = lambda n: special.expit(stats.t.rvs(4, loc=-6, scale=1.5, size=n, random_state=rng))  # noqa: E731
    point = control_point(draw(20_000), 1e-3, n_boot=50, seed=seed)
    held_out = draw(400_000)
    flagged = int(np.sum(held_out >= point.threshold))
    rate = point.rate_at_threshold
    assert not point.extrapolated and point.source == "control" and "Neyman-Pearson" in point.basis
    assert rate["confidence"] == 0.95 and rate["order_statistic"] == np_order_statistic(20_000, 1e-3)
    assert point.control["n_above"] == rate["n_above"] == 20_000 - rate["order_statistic"] < 20
    assert point.control["rate_ci"] == list(clopper_pearson(rate["n_above"], 20_000))
    low, high = rate["expected_ci"]
    assert low < flagged / len(held_out) < min(high, 1e-3)        # at most the rate, as expected
    lo_t, hi_t = point.threshold_ci
    assert lo_t <= point.threshold <= hi_t and lo_t < hi_t


def test_a_control_too_small_for_the_confidence_is_refused_with_the_size_needed():
    scores = special.expit(np.random.default_rng(0).normal(-6, 1.5, 2000))
    with pytest.raises(ValueError, match=r"^2000 in-distribution control maps are too few .* needs at least "
                                         r"2995 \(this control supports at most 86.5%\)"):
        control_point(scores, 1e-3, n_boot=20)
    median = control_point(scores, 1e-3, confidence=0.5, n_boot=20)   # about the plain 0.999 quantile
    assert median.control["n_above"] == 2000 - np_order_statistic(2000, 1e-3, 0.5) == 1
    assert median.rate_at_threshold["exceed_probability"] <= 0.5


def test_calibrate_threshold_refuses_a_small_control_in_one_line(sample_and_control, tmp_path):
    _, control = sample_and_control
    model = OPDModel(tmp_path)
    proba = np.stack([np.linspace(0.2, 1.0, 60), np.full(60, 0.1), np.full(60, 0.1)], axis=1)
    groups = np.array([f"g{i % 4}" for i in range(60)])
    save_validation_scores(tmp_path, proba, np.repeat([0, 1, 2], 20), groups)
    with pytest.raises(ScreenError, match=r"control: 60 in-distribution control maps are too few .* at "
                                          r"least 299 \("):
        calibrate_control(model, [control], tmp_path / "cal", options=OPTIONS, fpr=0.01, n_boot=5)
    assert not (tmp_path / "cal/operating_point.json").exists()
    with pytest.raises(ScreenError, match="confidence must be in"):
        calibrate_control(model, [control], tmp_path / "cal2", options=OPTIONS, fpr=0.2, confidence=1.5)
    assert not (tmp_path / "cal2").exists()                       # refused before the control is scored


def test_out_of_distribution_control_maps_do_not_set_the_threshold(tmp_path):
    rows = [{"file": "a.mat", "index": i, "p_target": p, "ood_flag": ood}
            for i, (p, ood) in enumerate([(0.99, "True"), (0.98, "True"), (0.1, "False"), (0.2, "False"),
                                          (0.3, "False")])]
    with open(tmp_path / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    scores, n_ood, files = control_scores(tmp_path)
    assert sorted(scores) == [0.1, 0.2, 0.3] and n_ood == 2 and files == ["a.mat"]
    point = control_point(scores, 0.4, confidence=0.5, n_out_of_distribution=n_ood, n_boot=10)
    assert point.threshold == np.nextafter(0.3, 1)          # the highest in-distribution score, not 0.98
    assert point.control["n_maps"] == 5 and point.control["n_in_distribution"] == 3


def test_control_and_sample_share_the_session_but_no_cell(sample_and_control, tmp_path):
    sample, control = sample_and_control
    truth_s, truth_c = read(sample / "truth.csv"), read(control / "truth.csv")
    optics = ("session", "wavelength_nm", "pixel_size_um", "medium_index", "na")
    assert {tuple(r[k] for k in optics) for r in truth_s} == {tuple(r[k] for k in optics) for r in truth_c}
    assert all(r["spiked"] == "0" and r["class"] != "SW480" for r in truth_c)
    cells = ("diameter_um", "dry_mass_pg", "centre_x_um", "centre_y_um", "defocus_um")
    assert not {tuple(r[k] for k in cells) for r in truth_s} & {tuple(r[k] for k in cells) for r in truth_c}
    assert json.loads((control / "sample.json").read_text())["session_seed"] == session_seed_of(sample) == 2
    again = tmp_path / "again"
    simulate_sample(again, 60, {}, seed=3, session_seed=2, maps_per_file=30, progress=False)
    assert (again / "truth.csv").read_bytes() == (control / "truth.csv").read_bytes()   # same seeds, files
    for name in ("stack_0000.mat", "stack_0001.mat"):       # the MATLAB header holds the time of writing
        with h5py.File(again / name, "r") as a, h5py.File(control / name, "r") as b:
            assert np.array_equal(a["phase"][()], b["phase"][()])
    with h5py.File(sample / "stack_0000.mat", "r") as a, h5py.File(control / "stack_0000.mat", "r") as b:
        assert not np.isclose(a["phase"][0], b["phase"][0]).all()     # HDF5 holds MATLAB's (N, W, H)


def test_screen_with_a_control_operating_point_uses_it_and_says_so(sample_and_control, tmp_path):
    sample, control = sample_and_control
    model = OPDModel(tmp_path)
    labels = np.repeat([0, 1, 2], 20)                    # validation scores: the sensitivity at the threshold
    proba = np.stack([np.linspace(0.2, 1.0, 60), np.full(60, 0.1), np.full(60, 0.1)], axis=1)
    save_validation_scores(tmp_path, proba, labels, np.array([f"g{i % 4}" for i in range(60)]))
    done = calibrate_control(model, [control], tmp_path / "cal", options=OPTIONS, fpr=0.2, n_boot=20)
    point = done.point
    assert done.path.is_file() and (tmp_path / "cal/control/scores.csv").is_file()
    in_dist, _, _ = control_scores(tmp_path / "cal/control")
    k = np_order_statistic(60, 0.2)
    assert point.control["n_above"] == int(np.sum(in_dist >= point.threshold)) == 60 - k
    assert point.threshold == np.nextafter(np.sort(in_dist)[k - 1], 1)
    settings = screen_settings(model, operating_point=done.path)
    assert settings.point == point and settings.targets == ["SW480"] and done.passes == 1
    assert point.sensitivity == pytest.approx(np.mean(proba[:20, 0] >= point.threshold))
    result = screen_files(model, [sample], tmp_path / "out", settings, options=OPTIONS)
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["threshold_source"] == "control" and summary["threshold"] == point.threshold
    assert summary["control"]["n_maps"] == point.control["n_maps"] == 60
    n = result.n_maps - result.n_ood
    r = point.control["n_above"]           # the estimate at this threshold: (r + 1) / (n + 1), not fpr
    expected = (n - result.n_maps * 1e-5) * (r + 1) / 61
    assert summary["expected_false_positives"] == pytest.approx(expected)
    assert summary["expected_false_positives_ci"] == pytest.approx(
        [(n - result.n_maps * 1e-5) * q for q in stats.beta.ppf([0.025, 0.975], r + 1, 60 - r)])
    assert summary["expected_false_positives_basis"].startswith("estimate")
    assert summary["fpr_confidence"] == 0.95
    assert summary["operating_point"]["rate_at_threshold"]["order_statistic"] == k
    assert [float(r["p_target"]) >= point.threshold and r["ood_flag"] == "False"
            for r in read(tmp_path / "out/scores.csv")] == [r["flagged"] == "True"
                                                          for r in read(tmp_path / "out/scores.csv")]
    page = (tmp_path / "out/report.html").read_text()
    assert "threshold source" in page and "negative control" in page and "estimate: " in page
    assert "with probability 0.95; exceeds 0.2 with probability at most" in page
    assert f"order statistic {k} of 60" in page
    with pytest.raises(ScreenError, match="exists"):                 # an operating point is never replaced
        calibrate_control(model, [control], tmp_path / "cal", options=OPTIONS, fpr=0.2, n_boot=20)
    with pytest.raises(ScreenError, match="not 0.01"):
        screen_settings(model, operating_point=done.path, fpr=0.01)


def test_an_operating_point_of_another_model_is_refused(tmp_path):
    model = OPDModel(tmp_path)
    point = control_point(np.linspace(0, 1, 200), 0.1, n_boot=5)
    path = save_operating_point(tmp_path / "op.json", point, model=model, targets=["SW480"], temperature=1.0)
    assert json.dumps(load_operating_point(path, model)["point"].as_dict()) == json.dumps(point.as_dict())
    with pytest.raises(ScreenError, match="another model"):
        screen_settings(OPDModel(tmp_path, name="other"), operating_point=path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ScreenError, match="bad.json: not a readable operating point"):
        screen_settings(model, operating_point=tmp_path / "bad.json")
    before = path.read_bytes()
    other = control_point(np.linspace(0, 1, 200) ** 2, 0.1, n_boot=5)
    with pytest.raises(ScreenError, match="op.json: exists: choose another --out"):
        save_operating_point(path, other, model=model, targets=["SW480"], temperature=1.0)
    assert path.read_bytes() == before    # kept, and no partial file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "op.json"]


def test_clopper_pearson_matches_the_beta_quantiles():
    low, high = clopper_pearson(10, 10_000)
    assert low == pytest.approx(stats.beta.ppf(0.025, 10, 9991)) and high == pytest.approx(
        stats.beta.ppf(0.975, 11, 9990))
    assert clopper_pearson(0, 50)[0] == 0.0


def test_a_screen_flagged_again_at_a_higher_threshold_equals_screening_at_it(sample_and_control, tmp_path):
    sample, _ = sample_and_control
    model = OPDModel(tmp_path)
    screened = screen_settings(model)                               # threshold 1e-9: every map refined
    screen_files(model, [sample], tmp_path / "low", screened, options=OPTIONS)
    scores, _, _ = control_scores(tmp_path / "low")
    point = control_point(scores, 0.25, n_boot=5)
    assert not point.extrapolated and 0 < point.threshold < 1
    path = save_operating_point(tmp_path / "op.json", point, model=model, targets=["SW480"], temperature=1.0)
    higher = screen_settings(model, operating_point=path)
    screen_files(model, [sample], tmp_path / "direct", higher, options=OPTIONS)
    merge_screens([tmp_path / "low"], tmp_path / "again", higher)
    for name in ("scores.csv", "candidates.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    assert json.loads((tmp_path / "again/summary.json").read_text())["threshold_source"] == "control"
    with pytest.raises(ScreenError, match="screen again"):           # maps near a lower one were not refined
        merge_screens([tmp_path / "direct"], tmp_path / "lower", screened)


def test_simulate_refuses_a_control_with_the_sample_s_own_seed(sample_and_control, tmp_path, capsys):
    sample, _ = sample_and_control
    status = main(["simulate", "--out", str(tmp_path / "c"), "--sample", "5", "--control-of", str(sample),
                   "--seed", "2", "-q"])
    assert status == 2 and "its own --seed" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
