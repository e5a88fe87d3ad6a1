"""Metrics agree with scikit-learn; bootstrap CIs, ECE, sensitivity at fixed FPR, tables."""
from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from opdcells.evaluate import (
    _batched_confusion,
    _batched_sensitivity,
    calibrated_ece,
    classification_report,
    comparison_table,
    expected_calibration_error,
    format_report,
    markdown_table,
    metrics_from_confusion,
    sensitivity_at_fpr,
    write_table,
)

NAMES5 = ["SW480", "SW620", "granulocytes", "monocytes", "PBMCs"]


def noisy_predictions(n, k, signal=1.5, seed=0):
    """Labels and softmax probabilities that are right more often than chance."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    proba = np.exp(logits)
    return y, proba / proba.sum(axis=1, keepdims=True)


def test_report_matches_sklearn_multiclass():
    y, proba = noisy_predictions(500, 5, seed=1)
    pred = proba.argmax(1)
    r = classification_report(y, proba, NAMES5, n_boot=50)
    assert r["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert r["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert r["macro_f1"]["value"] == pytest.approx(f1_score(y, pred, average="macro"))
    p, rc, f, s = precision_recall_fscore_support(y, pred)
    for k, name in enumerate(NAMES5):
        expected = {"precision": p[k], "recall": rc[k], "f1": f[k], "support": s[k]}
        assert r["per_class"][name] == pytest.approx(expected)
        assert r["roc_auc"]["per_class"][name] == pytest.approx(roc_auc_score(y == k, proba[:, k]))
    assert r["confusion_matrix"]["counts"] == confusion_matrix(y, pred).tolist()
    assert r["confusion_matrix"]["labels"] == NAMES5
    assert r["roc_auc"]["macro"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert r["n"] == 500 and r["class_counts"] == dict(zip(NAMES5, np.bincount(y).tolist(), strict=True))
    assert r["sensitivity_at_fpr"] is None
    json.dumps(r, allow_nan=False)


def test_binary_auc_is_positive_class_auc():
    y, proba = noisy_predictions(300, 2, seed=2)
    r = classification_report(y, proba, ["cancer", "blood"], n_boot=20, positive_class="cancer")
    assert r["roc_auc"]["macro"] == pytest.approx(roc_auc_score(y == 0, proba[:, 0]))
    assert r["sensitivity_at_fpr"]["positive_class"] == "cancer"


def test_absent_class_auc_skipped_with_note():
    y, proba = noisy_predictions(200, 3, seed=3)
    y[y == 2] = 0
    r = classification_report(y, proba, ["a", "b", "c"], n_boot=0)
    assert r["roc_auc"]["per_class"]["c"] is None and "c: AUC undefined" in r["roc_auc"]["notes"][0]
    defined = [roc_auc_score(y == k, proba[:, k]) for k in (0, 1)]
    assert r["roc_auc"]["macro"] == pytest.approx(np.mean(defined))
    assert r["accuracy"]["ci_low"] is None  # n_boot=0: no CI
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("seed", range(4))
def test_batched_metrics_equal_sklearn_on_resamples(seed):
    # includes classes missing from y_true or y_pred in a resample (sklearn's label conventions)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 30)
    pred = np.where(rng.random(30) < 0.6, y, rng.integers(0, 4, 30))
    idx = rng.integers(0, 30, size=(20, 12))
    got = metrics_from_confusion(_batched_confusion(y, pred, idx, 4))
    for b, i in enumerate(idx):
        assert got["accuracy"][b] == pytest.approx(accuracy_score(y[i], pred[i]))
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
            warnings.simplefilter("ignore", UserWarning)
            expected_bal = balanced_accuracy_score(y[i], pred[i])
        assert got["balanced_accuracy"][b] == pytest.approx(expected_bal)
        assert got["macro_f1"][b] == pytest.approx(f1_score(y[i], pred[i], average="macro", zero_division=0))


def test_ci_contains_point_and_shrinks_with_more_maps():
    widths = []
    for n in (100, 2500):
        y, proba = noisy_predictions(n, 3, signal=1.0, seed=4)
        r = classification_report(y, proba, ["a", "b", "c"], n_boot=400, seed=1)
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            e = r[key]
            assert e["ci_low"] <= e["value"] <= e["ci_high"] and e["ci_low"] < e["ci_high"]
        widths.append(r["accuracy"]["ci_high"] - r["accuracy"]["ci_low"])
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(25) = 1/5


def test_bootstrap_deterministic_and_fast():
    y, proba = noisy_predictions(2000, 2, seed=5)
    start = time.perf_counter()
    a = classification_report(y, proba, ["cancer", "blood"], n_boot=1000, seed=3)
    elapsed = time.perf_counter() - start
    assert a == classification_report(y, proba, ["cancer", "blood"], n_boot=1000, seed=3)
    assert a != classification_report(y, proba, ["cancer", "blood"], n_boot=1000, seed=4)
    assert elapsed < 3.0


def test_ece_zero_for_perfect_one_hot_and_known_for_constructed_case():
    y = np.array([0, 1, 2, 1])
    assert expected_calibration_error(y, np.eye(3)[y]) == 0.0
    # 10 maps at confidence 0.9 with 6 correct -> |0.6 - 0.9| = 0.3;
    # 10 maps at confidence 0.55 with 5 correct -> 0.05; weighted: 0.5 * 0.3 + 0.5 * 0.05 = 0.175
    proba = np.array([[0.9, 0.1]] * 10 + [[0.55, 0.45]] * 10)
    y = np.array([0] * 6 + [1] * 4 + [0] * 5 + [1] * 5)
    assert expected_calibration_error(y, proba) == pytest.approx(0.175)
    assert classification_report(y, proba, ["a", "b"], n_boot=0)["ece"] == pytest.approx(0.175)


def test_calibrated_ece_applies_the_models_own_temperature():
    # an underconfident model (every map right at confidence 0.6): ECE 0.4 before its temperature, and a
    # temperature below 1 (as fitted for flat fused probabilities) sharpens it towards 0
    y = np.array([0, 1] * 20)
    proba = np.where(np.eye(2)[y] == 1, 0.6, 0.4)
    assert expected_calibration_error(y, proba) == pytest.approx(0.4)
    entry = calibrated_ece(y, proba, {"calibration": {"temperature": 0.1}})
    sharpened = 1 / (1 + (0.4 / 0.6) ** 10)
    assert entry == {"temperature": 0.1, "ece_calibrated": pytest.approx(1 - sharpened)}
    assert calibrated_ece(y, proba, {"calibration": None}) == {} == calibrated_ece(y, proba, {})
    report = {**classification_report(y, proba, ["a", "b"], n_boot=0), **entry}
    assert "ECE calibrated" in format_report(report) and "temperature 0.10" in format_report(report)
    assert comparison_table([{"model": "m", "report": report}])["ece_calibrated"].item() == pytest.approx(
        1 - sharpened)


def test_sensitivity_at_fpr_separable_and_constructed():
    # separable: every positive scores above every negative -> sensitivity 1 at any FPR
    y_pos = np.r_[np.ones(50, bool), np.zeros(1000, bool)]
    score = np.r_[np.linspace(0.6, 1, 50), np.linspace(0, 0.5, 1000)]
    for fpr in (0.01, 0.001):
        assert sensitivity_at_fpr(y_pos, score, fpr)["value"] == 1.0
    # 1000 negatives; the top 20 negatives score 0.95; positives: 30 at 0.99, 70 at 0.5.
    # FPR <= 1% (10 FPs) must stop above the 0.95 block -> TPR 0.3 at FPR 0.
    neg = np.r_[np.full(20, 0.95), np.linspace(0, 0.4, 980)]
    pos = np.r_[np.full(30, 0.99), np.full(70, 0.5)]
    y_pos, score = np.r_[np.ones(100, bool), np.zeros(1000, bool)], np.r_[pos, neg]
    out = sensitivity_at_fpr(y_pos, score, 0.01)
    assert out["value"] == pytest.approx(0.3) and out["achieved_fpr"] == 0.0
    # the 0.95 block (20 FPs) is allowed from FPR 2% on; all positives lie above the other negatives
    assert sensitivity_at_fpr(y_pos, score, 0.019)["value"] == pytest.approx(0.3)
    out = sensitivity_at_fpr(y_pos, score, 0.02)
    assert out["value"] == 1.0 and out["achieved_fpr"] == 0.02 and out["threshold"] == 0.5


def test_sensitivity_unresolvable_fpr_is_null_with_reason():
    y_pos = np.r_[np.ones(50, bool), np.zeros(400, bool)]
    score = np.random.default_rng(0).random(450)
    out = sensitivity_at_fpr(y_pos, score, 0.001)
    assert out["value"] is None
    assert "needs >= 1000 negative maps" in out["reason"] and "have 400" in out["reason"]
    assert sensitivity_at_fpr(y_pos, score, 0.01)["value"] is not None
    y = (~y_pos).astype(int)  # class 0 = positive
    proba = np.c_[score, 1 - score]
    r = classification_report(y, proba, ["cancer", "blood"], n_boot=100)
    entry = r["sensitivity_at_fpr"]["0.001"]
    assert entry["value"] is None and entry["ci_low"] is None and entry["reason"]
    e1 = r["sensitivity_at_fpr"]["0.01"]
    assert e1["ci_low"] <= e1["value"] <= e1["ci_high"]
    assert "n/a (needs >= 1000" in format_report(r)


@pytest.mark.parametrize("seed", range(3))
def test_batched_sensitivity_matches_roc_curve(seed):
    rng = np.random.default_rng(seed)
    y_pos = rng.random(1500) < 0.3
    score = np.round(rng.random(1500) + 0.4 * y_pos, 2)  # ties on purpose
    idx = rng.integers(0, 1500, size=(5, 1500))
    weights = np.stack([np.bincount(i, minlength=1500) for i in idx])
    got = _batched_sensitivity(y_pos, score, weights, (0.01, 0.001))
    for b, i in enumerate(idx):
        for fpr, values in zip((0.01, 0.001), got, strict=True):
            fprs, tprs, _ = roc_curve(y_pos[i], score[i], drop_intermediate=False)
            expected = tprs[fprs <= fpr].max() if (~y_pos[i]).sum() >= 1 / fpr else np.nan
            np.testing.assert_allclose(values[b], expected)


@pytest.mark.parametrize("args, match", [
    (([0, 1], np.full((2, 3), 1 / 3), ["a", "b"]), "proba"),
    (([0, 2], np.full((2, 2), 0.5), ["a", "b"]), "class ids"),
    (([0, 1], np.array([[np.nan, 1], [0.5, 0.5]]), ["a", "b"]), "NaN"),
    (([0, 0], np.full((2, 2), 0.5), ["a", "a"]), "distinct"),
    (([], np.zeros((0, 2)), ["a", "b"]), "zero maps"),
])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        classification_report(*args)


def test_unknown_positive_class_raises():
    y, proba = noisy_predictions(20, 2)
    with pytest.raises(ValueError, match="positive_class 'tumour'"):
        classification_report(y, proba, ["cancer", "blood"], positive_class="tumour")


def test_format_report_shows_headline_classes_and_matrix():
    y, proba = noisy_predictions(200, 5, seed=6)
    r = classification_report(y, proba, NAMES5, n_boot=50)
    text = format_report(r)
    acc = r["accuracy"]
    assert f"{acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]" in text
    assert all(name in text for name in NAMES5)
    row = " ".join(map(str, r["confusion_matrix"]["counts"][2]))
    assert row in " ".join(text.split())


def test_comparison_table_and_write_table(tmp_path):
    y2, p2 = noisy_predictions(300, 2, seed=7)
    y5, p5 = noisy_predictions(300, 5, seed=8)
    rows = [
        {"task": "cancer_vs_blood", "model": "mobilenetv2", "report": classification_report(
            y2, p2, ["cancer", "blood"], n_boot=50)},
        {"task": "five_class", "model": "resnet50", "report": classification_report(
            y5, p5, NAMES5, n_boot=50)},
    ]
    df = comparison_table(rows)
    assert list(df[["task", "model"]].itertuples(index=False, name=None)) == [
        ("cancer_vs_blood", "mobilenetv2"), ("five_class", "resnet50")]
    assert df.loc[1, "accuracy"] == pytest.approx(accuracy_score(y5, p5.argmax(1)))
    assert {"accuracy_ci_low", "accuracy_ci_high", "macro_f1", "ece", "roc_auc_macro", "n"} <= set(df.columns)
    assert "sensitivity_at_fpr_0.01" in df.columns and pd.isna(df.loc[1, "sensitivity_at_fpr_0.01"])
    csv_path, md_path = write_table(df, tmp_path / "tables" / "comparison")
    assert csv_path.name == "comparison.csv" and md_path.name == "comparison.md"
    back = pd.read_csv(csv_path)
    np.testing.assert_allclose(back["accuracy"], df["accuracy"])
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| task | model | accuracy |") and "accuracy_ci_low" not in md[0]
    assert len(md) == 2 + len(df)
    a = df.loc[0]
    assert f"| {a['accuracy']:.3f} [{a['accuracy_ci_low']:.3f}, {a['accuracy_ci_high']:.3f}] |" in md[2]
    assert md[2].rstrip().endswith("| 300 |")


def test_markdown_table_escapes_and_blanks():
    df = pd.DataFrame({"model": ["a|b", None], "score": [0.12345, np.nan]})
    lines = markdown_table(df).splitlines()
    assert lines[2] == "| a\\|b | 0.123 |" and lines[3] == "|  |  |"
