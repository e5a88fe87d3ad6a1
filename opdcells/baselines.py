"""Baselines every model is compared with: always the majority class, and a logistic regression on the
two numbers a phase microscope gives for free, dry mass and area.

A model that does not beat them on the same test maps has learnt nothing a lab could not read off its
cell sizes. Both are fit on the training maps of the split only.
"""
from __future__ import annotations

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .evaluate import classification_report

MAJORITY = "majority class"
MASS_AREA = "logistic (dry mass, area)"
BASELINES = (MAJORITY, MASS_AREA)

__all__ = ["BASELINES", "MAJORITY", "MASS_AREA", "mass_area_features", "baseline_proba",
           "baseline_reports"]


def mass_area_features(dataset, indices) -> np.ndarray:
    """(n, 2) log dry mass (pg) and log area (um^2) of maps ``indices`` (NaN where unknown).

    Parameters
    ----------
    dataset : OPDDataset
        The opened dataset (its ``dry_mass_pg`` and ``area_um2`` columns).
    indices : array_like of int
        The maps.

    Returns
    -------
    (n, 2) float64 ndarray
    """
    indices = np.asarray(indices, dtype=np.int64)
    values = np.column_stack([np.asarray(dataset.dry_mass_pg, dtype=float)[indices],
                              np.asarray(dataset.area_um2, dtype=float)[indices]])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(values > 0, np.log(values), np.nan)


def _estimators(seed: int) -> dict:
    return {MAJORITY: DummyClassifier(strategy="prior"),
            MASS_AREA: make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                                     LogisticRegression(class_weight="balanced", max_iter=1000,
                                                        random_state=seed))}


def baseline_proba(dataset, y_all, train_idx, test_idx, n_classes: int, *, seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Class probabilities (n_test, ``n_classes``) of each baseline fit on ``train_idx``.

    Parameters
    ----------
    dataset : OPDDataset
        The opened dataset (its ``dry_mass_pg`` and ``area_um2``).
    y_all : array of int
        Task label id of every map of the dataset.
    train_idx, test_idx : array of int
        Dataset indices of the training and test maps.
    n_classes : int
        Number of task classes (a class absent from training gets probability 0).
    seed : int
        Seed of the logistic regression.

    Returns
    -------
    dict
        Baseline name -> probabilities.
    """
    y_train = np.asarray(y_all)[train_idx]
    x_train, x_test = mass_area_features(dataset, train_idx), mass_area_features(dataset, test_idx)
    out = {}
    for name, estimator in _estimators(seed).items():
        proba = np.zeros((len(test_idx), n_classes))
        if np.unique(y_train).size < 2:   # one class: the logistic regression cannot fit
            proba[:, int(y_train[0])] = 1.0
        else:
            estimator.fit(x_train, y_train)
            proba[:, estimator.classes_] = estimator.predict_proba(x_test)
        out[name] = proba
    return out


def baseline_reports(dataset, y_all, split, class_names, *, n_boot: int = 1000, seed: int = 0,
                     positive_class: str | None = None) -> dict[str, dict]:
    """``classification_report`` of each baseline on ``split.test`` (fit on ``split.train``), with the
    same two-stage bootstrap over acquisition groups as the models' reports.

    Parameters
    ----------
    dataset : OPDDataset
        The opened dataset.
    y_all : array_like (N,) of int
        Task class index of every map of the dataset.
    split : Split
        Train and test indices.
    class_names : sequence of str
        The task's classes.
    n_boot : int
        Bootstrap resamples of the confidence intervals.
    seed : int
        Random seed.
    positive_class : str, optional
        The positive class of a two-class task.

    Returns
    -------
    dict of str to dict
        Baseline name -> classification report.
    """
    test = np.asarray(split.test, dtype=np.int64)
    groups = np.asarray(dataset.groups)[test]
    return {name: classification_report(np.asarray(y_all)[test], proba, class_names, n_boot=n_boot,
                                        seed=seed, positive_class=positive_class, groups=groups)
            for name, proba in baseline_proba(dataset, y_all, split.train, test, len(class_names),
                                              seed=seed).items()}
