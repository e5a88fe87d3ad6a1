"""The features model's settings and columns judged by session cross-validation (docs/recipe.md, "The
features model, judged on 20 sessions"): the 20 sessions of the demo split's training and validation
parts (never its test sessions) in 4 folds, each fold holding out the k-th session of every class (5
unseen sessions, one per class, as the validation part), the features model fit on the other 15
sessions as ``learners._FeaturesLearner`` fits it (balanced class weights; early stopping, where on, on
the held-out fold as train does on its validation groups). Five held-out sessions move the balanced
accuracy by up to 0.2 per misread session; the mean over four folds (20 sessions) is about twice as sure.

Run from the repository root: ``PYTHONPATH=. python docs/experiments/features_cv.py DATASET.h5``.
"""
import sys
import time

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_sample_weight

from opdcells.dataset import open_dataset
from opdcells.features import FEATURE_NAMES, feature_matrix
from opdcells.files import iter_maps
from opdcells.tasks import resolve_task, task_labels
from opdcells.train import make_split

SETTINGS = {   # name -> HistGradientBoostingClassifier keyword arguments
    "quick profile: 200 at 0.1, early stopping (patience 10)": dict(max_iter=200, learning_rate=0.1,
                                                                    early_stopping=True, n_iter_no_change=10),
    "100 at 0.1, no early stopping (scikit-learn's defaults)": dict(max_iter=100, learning_rate=0.1,
                                                                    early_stopping=False),
    "200 at 0.05, no early stopping": dict(max_iter=200, learning_rate=0.05, early_stopping=False),
    "400 at 0.05, no early stopping": dict(max_iter=400, learning_rate=0.05, early_stopping=False),
    "200 at 0.05, l2 1, min leaf 40": dict(max_iter=200, learning_rate=0.05, early_stopping=False,
                                           l2_regularization=1.0, min_samples_leaf=40),
    "300 at 0.05, 7 leaves": dict(max_iter=300, learning_rate=0.05, early_stopping=False, max_leaf_nodes=7),
}
COLUMN_GROUPS = {
    "shape": ("equivalent_diameter_um", "perimeter_um", "circularity", "eccentricity", "solidity",
              "major_axis_um", "minor_axis_um"),
    "size and mass": ("area_um2", "equivalent_diameter_um", "perimeter_um", "major_axis_um", "minor_axis_um",
                      "dry_mass_pg", "phase_volume_um3"),
    "OPD level": ("opd_peak_nm", "opd_mean_nm", "opd_std_nm", "highpass_std_nm"),
    "OPD moments": ("opd_cv", "opd_skewness", "opd_kurtosis", "mass_centre_offset"),
    "texture": ("highpass_std_nm", "highpass_rel", "gradient_mean_rel", "local_maxima_per_um2"),
    "GLCM": tuple(n for n in FEATURE_NAMES if n.startswith("glcm_")),
    "radial profile": tuple(n for n in FEATURE_NAMES if n.startswith("radial_")),
}


def session_folds(y, groups) -> np.ndarray:
    """Fold of every map: the rank of its session among the sessions of its class (sorted by name)."""
    fold = np.empty(len(y), dtype=int)
    for c in np.unique(y):
        sessions = sorted(set(groups[y == c]))
        for rank, session in enumerate(sessions):
            fold[(y == c) & (groups == session)] = rank
    return fold


def cross_validate(x, y, fold, **kwargs) -> list[float]:
    """Balanced accuracy on each held-out fold of a boosting model fit on the others."""
    scores = []
    for k in np.unique(fold):
        fit, held = fold != k, fold == k
        model = HistGradientBoostingClassifier(random_state=0, **kwargs)
        val = {}
        if kwargs.get("early_stopping"):   # on the held-out fold, as train stops on its validation part
            val = {"X_val": x[held], "y_val": y[held],
                   "sample_weight_val": compute_sample_weight("balanced", y[held])}
        model.fit(x[fit], y[fit], sample_weight=compute_sample_weight("balanced", y[fit]), **val)
        scores.append(float(balanced_accuracy_score(y[held], model.predict(x[held]))))
    return scores


def report(name: str, scores: list[float]) -> None:
    print(f"{name:58s} folds {' '.join(f'{s:.3f}' for s in scores)}  mean {np.mean(scores):.3f}", flush=True)


def main(path: str) -> None:
    start = time.process_time()
    ds = open_dataset(path)
    task = resolve_task(None, ds.class_names)
    split = make_split(ds, task, seed=0)
    pool = np.sort(np.concatenate([split.train, split.val]))   # the test sessions stay unseen
    y = task_labels(ds, task)[pool]
    groups = np.asarray(ds.groups).astype(str)[pool]
    x = np.concatenate([feature_matrix(maps, ds.pixel_size_um)[0] for maps in iter_maps(ds, pool)])
    fold = session_folds(y, groups)
    print(f"{len(pool)} maps of {len(set(groups))} sessions in {fold.max() + 1} folds")
    for name, kwargs in SETTINGS.items():
        report(name, cross_validate(x, y, fold, **kwargs))
    default = SETTINGS["100 at 0.1, no early stopping (scikit-learn's defaults)"]
    for name, columns in COLUMN_GROUPS.items():
        keep = [i for i, n in enumerate(FEATURE_NAMES) if n not in columns]
        report(f"without {name} (100 at 0.1)", cross_validate(x[:, keep], y, fold, **default))
    print(f"CPU s {time.process_time() - start:.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
