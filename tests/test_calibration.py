"""Temperature scaling and screening operating points on synthetic problems with a known truth."""
import numpy as np
import pytest
from scipy import special, stats

from opdcells.calibration import (
    OperatingPoint,
    apply_temperature,
    control_point,
    expected_yield,
    fit_temperature,
    negatives_needed,
    np_order_statistic,
    operating_point,
    rate_at_threshold,
    reliability,
    sample_checked_threshold,
    threshold_at_fpr,
)


def overconfident(n: int, seed: int, sharpen: float = 3.0):
    """Three classes; the true probabilities are softmax(z), the model reports softmax(sharpen * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, (n, 3))
    true_p = special.softmax(z, axis=1)
    labels = np.array([rng.choice(3, p=p) for p in true_p])
    return special.softmax(sharpen * z, axis=1), labels


def test_temperature_scaling_lowers_calibration_error_on_held_out_maps():
    fit_p, fit_y = overconfident(3000, 0)
    test_p, test_y = overconfident(3000, 1)
    t = fit_temperature(fit_p, fit_y)
    assert 2.4 < t < 3.6            # recovers the sharpening that was applied
    before = reliability(test_p, test_y)["ece"]
    after = reliability(apply_temperature(test_p, t), test_y)["ece"]
    assert after < before / 3
    assert np.array_equal(apply_temperature(test_p, t).argmax(1), test_p.argmax(1))


def test_temperature_of_a_calibrated_model_stays_near_one():
    p, y = overconfident(4000, 2, sharpen=1.0)
    assert 0.85 < fit_temperature(p, y) < 1.15


def test_apply_temperature_refuses_a_non_positive_temperature():
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(np.full((2, 2), 0.5), 0.0)


def test_reliability_bins_hold_every_map():
    p, y = overconfident(500, 3)
    r = reliability(p, y, n_bins=10)
    assert r["count"].sum() == 500
    assert 0 <= r["ece"] <= 1


def scores(n_neg: int, n_pos: int, seed: int):
    """Non-target scores ~ expit(N(-3, 1)), target ~ expit(N(2, 1))."""
    rng = np.random.default_rng(seed)
    return special.expit(rng.normal(-3, 1, n_neg)), special.expit(rng.normal(2, 1, n_pos))


@pytest.mark.parametrize("fpr", [0.01, 0.001])
def test_operating_point_meets_its_false_positive_rate_on_held_out_scores(fpr):
    neg, pos = scores(20000, 500, 0)
    point = operating_point(np.r_[neg, pos], np.r_[np.zeros(len(neg), bool), np.ones(len(pos), bool)],
                            fpr=fpr, n_boot=100)
    assert not point.extrapolated and point.basis.startswith("Neyman-Pearson order statistic")
    held_neg, held_pos = scores(200000, 5000, 1)
    observed = np.mean(held_neg >= point.threshold)
    low, high = point.rate_at_threshold["expected_ci"]
    assert fpr / 3 < observed < fpr and low < observed < high     # at most fpr, as expected
    assert point.threshold_ci[0] <= point.threshold <= point.threshold_ci[1]
    assert abs(np.mean(held_pos >= point.threshold) - point.sensitivity) < 0.05


def test_too_few_validation_maps_extrapolate_and_say_so():
    neg, pos = scores(600, 100, 2)
    point = operating_point(np.r_[neg, pos], np.r_[np.zeros(600, bool), np.ones(100, bool)],
                            fpr=1e-3, n_boot=100)
    assert point.extrapolated and "extrapolated" in point.basis and "600" in point.basis
    held_neg, _ = scores(500000, 1, 3)
    observed = np.mean(held_neg >= point.threshold)
    assert 1e-4 < observed < 1e-2      # the right order of magnitude from 600 maps
    # the empirical rule alone would put the threshold at the largest score seen (rate ~1/600)
    assert point.threshold > np.quantile(neg, 0.99)


def test_cluster_bootstrap_widens_the_interval_when_groups_differ():
    rng = np.random.default_rng(4)
    offsets = rng.normal(0, 1.0, 8)                  # strong session effect on non-target scores
    groups = np.repeat(np.arange(8), 500)
    neg = special.expit(rng.normal(-3, 1, 4000) + offsets[groups])
    pos = special.expit(rng.normal(2, 1, 400))
    score = np.r_[neg, pos]
    target = np.r_[np.zeros(4000, bool), np.ones(400, bool)]
    all_groups = np.r_[groups, np.full(400, 99)]
    maps = operating_point(score, target, 0.01, n_boot=200)
    clustered = operating_point(score, target, 0.01, groups=all_groups, n_boot=200)
    width = lambda p: p.threshold_ci[1] - p.threshold_ci[0]  # noqa: E731
    assert width(clustered) > 2 * width(maps)


def test_operating_point_needs_both_kinds_of_maps():
    with pytest.raises(ValueError, match="target and of non-target"):
        operating_point(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        operating_point(np.array([0.1, 0.9]), np.array([False, True]), fpr=0)


def test_operating_point_round_trips_through_a_dict():
    neg, pos = scores(2000, 100, 5)
    point = operating_point(np.r_[neg, pos], np.r_[np.zeros(2000, bool), np.ones(100, bool)], 0.01,
                            n_boot=50)
    assert OperatingPoint.from_dict(point.as_dict()) == point


def test_expected_yield_at_a_rare_prevalence():
    point = OperatingPoint(fpr=1e-3, threshold=0.9, threshold_ci=(0.8, 0.95), sensitivity=0.8,
                           sensitivity_ci=(0.7, 0.9), n_negative=1000, n_positive=100, extrapolated=False,
                           basis="")
    y = expected_yield(100_000, 1e-4, point)
    assert y["expected_true_positives"] == pytest.approx(8.0)
    assert y["expected_false_positives"] == pytest.approx(99.99)
    assert y["expected_purity"] == pytest.approx(8 / 107.99)


def test_threshold_at_fpr_is_an_order_statistic_above_the_plain_quantile_when_supported():
    neg = np.linspace(0, 1, 10001)
    median, extrapolated = threshold_at_fpr(neg, 0.01, confidence=0.5)
    assert not extrapolated and median == pytest.approx(0.99, abs=1e-3)    # about the 1 - fpr quantile
    t, extrapolated = threshold_at_fpr(neg, 0.01)
    assert not extrapolated and t > median + 1e-3
    assert t == pytest.approx(np.nextafter(neg[np_order_statistic(10001, 0.01) - 1], 1))


def true_rate(threshold, loc=-6.0, scale=1.5):
    """False-positive rate of ``threshold`` on non-targets scoring expit(N(loc, scale))."""
    return stats.norm.sf((special.logit(threshold) - loc) / scale)


def test_np_threshold_exceeds_its_rate_in_about_one_control_in_twenty_the_plain_quantile_in_half():
    rng = np.random.default_rng(7)
    fpr, n, draws = 1e-3, 5000, 400
    np_rates, plain_rates, expected, covered = [], [], [], 0
    for _ in range(draws):
        control = special.expit(rng.normal(-6.0, 1.5, n))
        point = control_point(control, fpr, n_boot=0)
        np_rates.append(true_rate(point.threshold))
        plain_rates.append(true_rate(np.quantile(control, 1 - fpr, method="higher")))
        rate = point.rate_at_threshold
        expected.append(rate["expected"])
        covered += rate["expected_ci"][0] <= np_rates[-1] <= rate["expected_ci"][1]
    exceed = int(np.sum(np.asarray(np_rates) > fpr))
    assert stats.binomtest(exceed, draws, 0.05, alternative="greater").pvalue > 0.01   # at most ~1 in 20
    assert 0.35 < np.mean(np.asarray(plain_rates) > fpr) < 0.65                      # a point estimate
    assert np.mean(np_rates) == pytest.approx(np.mean(expected), rel=0.1)   # the expected rate is unbiased
    assert stats.binomtest(covered, draws, 0.95).pvalue > 0.01                # its interval covers 95%


def test_a_validation_set_large_enough_gets_the_same_guarantee():
    rng = np.random.default_rng(8)
    fpr, exceed = 1e-3, 0
    for _ in range(200):
        neg = special.expit(rng.normal(-6.0, 1.5, 3000))
        point = operating_point(np.r_[neg, 0.99], np.r_[np.zeros(3000, bool), True], fpr, n_boot=0)
        assert not point.extrapolated and point.rate_at_threshold["order_statistic"] == 3000
        exceed += true_rate(point.threshold) > fpr
    assert stats.binomtest(exceed, 200, 0.05, alternative="greater").pvalue > 0.01


def test_np_order_statistic_is_the_smallest_with_the_guarantee():
    for n, fpr, confidence in ((2995, 1e-3, 0.95), (10_000, 1e-3, 0.95), (500, 0.05, 0.9), (60, 0.2, 0.5)):
        k = np_order_statistic(n, fpr, confidence)
        violation = stats.binom.sf(np.array([k, k - 1]) - 1, n, 1 - fpr)   # P(rate > fpr), Tong et al.
        assert violation[0] <= 1 - confidence < violation[1]
    assert negatives_needed(1e-3, 0.95) == 2995 and negatives_needed(1e-3, 0.5) == 693
    assert np_order_statistic(2994, 1e-3) is None and np_order_statistic(2995, 1e-3) == 2995
    assert np_order_statistic(10_000, 1e-3) == 10_000 - 4         # 4 of 10,000 controls above it
    with pytest.raises(ValueError, match="confidence"):
        np_order_statistic(100, 0.1, confidence=1.0)


def test_an_extrapolated_threshold_claims_only_the_bound_its_maps_support():
    neg, pos = scores(600, 100, 2)
    point = operating_point(np.r_[neg, pos], np.r_[np.zeros(600, bool), np.ones(100, bool)], 1e-3, n_boot=10)
    rate = point.rate_at_threshold
    assert point.extrapolated and rate["order_statistic"] is None and rate["expected"] is None
    assert "fewer than the 2995" in point.basis
    assert rate["upper"] == pytest.approx(stats.beta.ppf(0.95, rate["n_above"] + 1, 600 - rate["n_above"]))
    y = expected_yield(100_000, 1e-5, point)
    assert y["expected_false_positives_basis"].startswith("upper bound")
    assert y["expected_false_positives"] == pytest.approx((100_000 - 1) * rate["upper"])
    assert y["expected_false_positives_ci"] == [0.0, y["expected_false_positives"]]
    held_neg, _ = scores(500_000, 1, 3)
    assert np.mean(held_neg >= point.threshold) <= rate["upper"]        # the bound holds


def test_rate_at_threshold_counts_the_maps_at_or_above_it():
    rate = rate_at_threshold(np.arange(100) / 100, 0.955, 0.05, order_statistic=96)
    assert rate["n_above"] == 4 and rate["observed"] == 0.04 and rate["expected"] == pytest.approx(5 / 101)
    assert rate["exceed_probability"] == pytest.approx(stats.binom.cdf(4, 100, 0.05))


def test_default_targets_are_the_cancer_classes():
    from opdcells.calibration import default_targets

    assert default_targets(["SW480", "SW620", "granulocytes"]) == ["SW480", "SW620"]
    assert default_targets(["cancer", "blood"]) == ["cancer"]
    assert default_targets(["PC3_tumour", "PNT1A"]) == ["PC3_tumour"]
    assert default_targets(["A", "B"]) == []


def test_target_score_sums_the_target_columns_and_names_unknown_targets():
    from opdcells.calibration import target_score

    proba = np.array([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    assert np.allclose(target_score(proba, ["a", "b", "c"], ["a", "b"]), [0.5, 0.7])
    with pytest.raises(ValueError, match="HeLa"):
        target_score(proba, ["a", "b", "c"], ["HeLa"])


def test_calibrate_fits_temperature_and_the_default_operating_point(tmp_path):
    from opdcells.calibration import calibrate, load_validation_scores, save_validation_scores

    proba, labels = overconfident(3000, 7)
    record = calibrate(proba, labels, ["SW480", "granulocytes", "PBMCs"], fpr=0.01, n_boot=50)
    assert record["targets"] == ["SW480"]
    assert record["ece_after"] < record["ece_before"]
    point = OperatingPoint.from_dict(record["operating_point"])
    assert point.fpr == 0.01 and point.n_positive == int(np.sum(labels == 0))
    assert calibrate(proba, labels, ["a", "b", "c"], n_boot=10)["operating_point"] is None
    groups = np.array([f"s{i % 4}" for i in range(len(labels))])
    save_validation_scores(tmp_path, proba, labels, groups)
    back = load_validation_scores(tmp_path)
    assert np.allclose(back["proba"], proba, atol=1e-6) and list(back["groups"][:2]) == ["s0", "s1"]
    assert load_validation_scores(tmp_path / "none") is None


def test_reliability_diagram_is_drawn_from_the_record(tmp_path):
    import json

    from opdcells.calibration import calibrate
    from opdcells.plots import reliability_diagram

    proba, labels = overconfident(800, 8)
    record = json.loads(json.dumps(calibrate(proba, labels, ["SW480", "b", "c"], n_boot=10)))  # as stored
    assert record["reliability"]["after"]["ece"] == pytest.approx(record["ece_after"])
    path = reliability_diagram(record, tmp_path / "reliability.png")
    from matplotlib.image import imread

    assert imread(path).shape[1] > 600


def screening_sample(shift: float, seed: int, n_blood: int = 20000, n_target: int = 10):
    """Target scores of a sample: blood cells' logits N(-6 + shift, 1), spiked targets' N(4, 1)."""
    rng = np.random.default_rng(seed)
    blood, target = rng.normal(-6 + shift, 1, n_blood), rng.normal(4, 1, n_target)
    is_target = np.r_[np.zeros(n_blood, bool), np.ones(n_target, bool)]
    return special.expit(np.concatenate([blood, target])), is_target


def test_sample_check_keeps_a_validation_threshold_that_transfers():
    validation = special.expit(np.random.default_rng(0).normal(-6, 1, 50000))
    point = operating_point(np.r_[validation, 0.99], np.r_[np.zeros(50000, bool), True], 1e-3, n_boot=0)
    scores, _ = screening_sample(0.0, 1)
    threshold, check = sample_checked_threshold(scores, point.threshold, 1e-3, 1e-3)
    assert check["source"] == "validation" and threshold == point.threshold
    assert check["above_validation_threshold"] <= check["allowed"] == int((2e-3) * len(scores))


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_sample_check_raises_the_threshold_of_a_shifted_session(shift):
    validation = special.expit(np.random.default_rng(0).normal(-6, 1, 50000))
    point = operating_point(np.r_[validation, 0.99], np.r_[np.zeros(50000, bool), True], 1e-3, n_boot=0)
    scores, is_target = screening_sample(shift, 2)
    naive_fpr = np.mean(scores[~is_target] >= point.threshold)
    assert naive_fpr > 3e-3                              # the new session's blood cells score higher
    threshold, check = sample_checked_threshold(scores, point.threshold, 1e-3, 1e-3)
    assert check["source"] == "sample" and threshold > point.threshold
    flagged = scores >= threshold
    assert flagged.sum() <= check["allowed"]
    assert np.mean(flagged[~is_target]) <= 2e-3          # the rate asked for (plus the prevalence allowed)
    assert flagged[is_target].all()                      # the targets, far above, are still found
