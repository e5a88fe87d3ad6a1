"""Does the features model gain from more training sessions? Judged on validation sessions only
(docs/recipe.md, "More sessions for the features model"): the demo's 25 sessions in 5 folds, fold k holding
the k-th session of every class (``features_cv.session_folds``). For each outer fold (its 5 sessions are never
read), every other fold in turn is the validation part, and the features model (scikit-learn's 100
iterations at 0.1, balanced class weights) is fit on the remaining 3 folds (15 sessions) and on every pair
of them (10 sessions); printed: the balanced accuracy on the validation sessions, mean over the 4 inner folds.

Run from the repository root: ``PYTHONPATH=. python docs/experiments/features_sessions.py DATASET.h5``.
"""
import itertools
import sys
import time

import numpy as np
from features_cv import session_folds
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_sample_weight

from opdcells.dataset import open_dataset
from opdcells.features import feature_matrix
from opdcells.files import iter_maps
from opdcells.tasks import resolve_task, task_labels


def validation_score(x, y, fit, held) -> float:
    """Balanced accuracy on rows ``held`` of the features model fit on rows ``fit``."""
    model = HistGradientBoostingClassifier(random_state=0, max_iter=100, learning_rate=0.1,
                                           early_stopping=False)
    model.fit(x[fit], y[fit], sample_weight=compute_sample_weight("balanced", y[fit]))
    return float(balanced_accuracy_score(y[held], model.predict(x[held])))


def main(path: str) -> None:
    start = time.process_time()
    with open_dataset(path) as ds:
        y = task_labels(ds, resolve_task(None, ds.class_names))
        groups = np.asarray(ds.groups).astype(str)
        x = np.concatenate([feature_matrix(maps, ds.pixel_size_um)[0]
                            for maps in iter_maps(ds, np.arange(len(y)))])
    fold = session_folds(y, groups)
    for outer in np.unique(fold):
        rest = [k for k in np.unique(fold) if k != outer]
        fifteen, ten = [], []
        for val in rest:
            others = [k for k in rest if k != val]
            fifteen.append(validation_score(x, y, np.isin(fold, others), fold == val))
            ten.append(np.mean([validation_score(x, y, np.isin(fold, pair), fold == val)
                                for pair in itertools.combinations(others, 2)]))
        print(f"outer fold {outer + 1} (unread): validation balanced accuracy, "
              f"10 sessions {np.mean(ten):.3f}, 15 sessions {np.mean(fifteen):.3f}", flush=True)
    print(f"CPU s {time.process_time() - start:.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
