"""Late fusion and stacking of an OPD-pretrained run with the features model, on the validation groups
(docs/recipe.md, "The goals still missed"), for any model folder of the demo split, also one saved
without ``train_config`` (which ``fusion_validation.py`` needs).

The features model is fit as ``learners._FeaturesLearner`` fits it (quick profile, balanced class weights,
the validation maps for its early stopping); the deep run predicts with its test-time augmentation.
Reported: the deep part alone, the fusion at every deep weight of ``config.FUSION_DEEP_WEIGHTS`` and 0.9,
and stacking (boosting and a standardised logistic regression on the 30 features plus the deep part's
log-probabilities of the training maps). Validation only; the test maps are not read.

Run from the repository root: ``PYTHONPATH=. python docs/experiments/opd_fusion_stacking.py DATASET.h5 RUN``.
"""
import sys
import time

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from opdcells.config import FEATURES, FUSION_DEEP_WEIGHTS, TrainConfig
from opdcells.dataset import open_dataset
from opdcells.learners import _class_weights, _FeaturesLearner, fuse
from opdcells.modelfolder import load_model
from opdcells.splits import Split
from opdcells.tasks import task_labels


def main(path: str, run: str) -> None:
    start = time.process_time()
    ds = open_dataset(path)
    deep = load_model(run, ds)
    split = Split.from_json(f"{run}/split.json")
    y_all = task_labels(ds, deep.task)
    y_train, y_val = y_all[split.train], y_all[split.val]
    settings = TrainConfig.from_profile(FEATURES, "quick")
    part = _FeaturesLearner.create(settings, len(deep.class_names), ds.pixel_size_um)
    part.fit(ds, split, y_all, settings, _class_weights(y_train, len(deep.class_names)), 0)
    p_features = part.predict_indices(ds, split.val)
    p_deep = deep.predict_dataset(ds, split.val)

    def score(proba):
        return balanced_accuracy_score(y_val, np.asarray(proba).argmax(axis=1))

    print(f"validation: deep alone {score(p_deep):.3f}, features {score(p_features):.3f}")
    for w in (*FUSION_DEEP_WEIGHTS, 0.9):
        print(f"  fused, deep weight {w}: {score(fuse(p_deep, p_features, w)):.3f}")
    p_deep_train = deep.predict_dataset(ds, split.train)
    print(f"deep part on its own training maps: {score_of(p_deep_train, y_train):.3f}")
    x_train = np.hstack([part.dataset_features(ds, split.train), np.log(np.clip(p_deep_train, 1e-6, 1))])
    x_val = np.hstack([part.dataset_features(ds, split.val), np.log(np.clip(p_deep, 1e-6, 1))])
    weight = np.array([_class_weights(y_train, len(deep.class_names))[k] for k in y_train])
    boosting = HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=0)
    boosting.fit(x_train, y_train, sample_weight=weight)
    logistic = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    logistic.fit(np.nan_to_num(x_train), y_train)
    print(f"stacking: boosting {score(boosting.predict_proba(x_val)):.3f}, logistic regression "
          f"{score(logistic.predict_proba(np.nan_to_num(x_val))):.3f}")
    print(f"CPU s {time.process_time() - start:.0f}")


def score_of(proba, y) -> float:
    return float(np.mean(np.asarray(proba).argmax(axis=1) == y))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
