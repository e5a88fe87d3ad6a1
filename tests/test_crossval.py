"""Reading cross-validation outputs back: the ensemble of two cross-validated models judged on each fold's
validation groups (opdcells.crossval.ensemble_check)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from opdcells.calibration import save_validation_scores
from opdcells.crossval import PROBABILITIES_FILE, ensemble_check
from opdcells.errors import ModelError

CLASSES = np.array(["SW480", "granulocytes", "monocytes"])


def _confident(y, right: np.ndarray) -> np.ndarray:
    """(N, 3) probabilities: 0.9 on the true class where ``right``, else 0.45 on the next class and 0.35
    on the true one (a mistake a confident partner corrects in the mean)."""
    proba = np.full((y.size, 3), 0.05)
    proba[np.arange(y.size), y] = np.where(right, 0.9, 0.35)
    wrong = (y + 1) % 3
    proba[np.flatnonzero(~right), wrong[~right]] = 0.45
    return proba / proba.sum(axis=1, keepdims=True)


def _cv_folder(folder, y_test, fold, proba_test, val_sets) -> None:
    """A train --cv output with the files ensemble_check reads: per-fold validation scores, the pooled
    out-of-fold probabilities and the per-map true classes."""
    for i, (y_val, proba_val) in enumerate(val_sets, start=1):
        (folder / f"fold_{i}").mkdir(parents=True)
        save_validation_scores(folder / f"fold_{i}", proba_val, y_val, [f"g{i}_{c}" for c in y_val])
    np.savez(folder / PROBABILITIES_FILE, dataset_index=np.arange(y_test.size), fold=fold,
             class_names=CLASSES,
             **{f"proba/{folder.name}": proba_test})
    pd.DataFrame({"fold": fold, "true": CLASSES[y_test]}).to_csv(folder / "cv_predictions.csv", index=False)


def test_the_mean_is_kept_only_in_folds_whose_validation_groups_say_it_helps(tmp_path):
    y = np.tile([0, 1, 2], 20)                                  # 60 maps a part
    half = np.arange(y.size) < y.size // 2
    # fold 1: the two models err on different halves (the mean fixes both); fold 2: A is right, B never
    val_a = [_confident(y, half), _confident(y, np.ones(y.size, bool))]
    val_b = [_confident(y, ~half), _confident(y, np.zeros(y.size, bool))]
    y_test, fold = np.concatenate([y, y]), np.repeat([1, 2], y.size)
    test_a = np.vstack([_confident(y, half), _confident(y, ~half)])
    test_b = np.vstack([_confident(y, ~half), _confident(y, half)])
    _cv_folder(tmp_path / "a", y_test, fold, test_a, list(zip([y, y], val_a, strict=True)))
    _cv_folder(tmp_path / "b", y_test, fold, test_b, list(zip([y, y], val_b, strict=True)))
    folds, record = ensemble_check(tmp_path / "a", tmp_path / "b")
    assert folds["chosen_weight"].tolist() == [0.5, 1.0]         # nearest 0.5 among the tied weights; A alone
    assert folds.loc[0, "val w=0.5"] == 1.0 and folds.loc[0, "val w=1"] == folds.loc[0, "val w=0"] == 0.5
    assert record["folds_choosing_the_mean"] == 1
    # test: fold 1 takes the mean (every map right), fold 2 A alone (half right)
    assert record["accuracy"] == {"a": 0.5, "b": 0.5, "ensemble": pytest.approx(0.75)}
    _cv_folder(tmp_path / "c", y_test[::-1], fold[::-1], test_b, list(zip([y, y], val_b, strict=True)))
    with pytest.raises(ModelError, match=r"c: its folds are not those of .*a"):
        ensemble_check(tmp_path / "a", tmp_path / "c")
