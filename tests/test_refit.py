"""TrainConfig.refit: the features model is fit again on the training + validation groups with the number of
boosting iterations early stopping chose; everything judged on the validation groups keeps the first fit's
held-out probabilities."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import scaled_test_dataset
from sklearn.ensemble import HistGradientBoostingClassifier

from opdcells.calibration import VALIDATION_FILE
from opdcells.dataset import open_dataset
from opdcells.learners import _class_weights
from opdcells.splits import Split
from opdcells.tasks import task_labels
from opdcells.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return scaled_test_dataset(tmp_path_factory)


def _rows(result, data):
    """Feature rows and labels of the run's training, validation and test maps, and the class weights."""
    learner = result.model.learner
    split = Split.from_json(result.model_dir / "split.json")
    with open_dataset(data) as ds:
        y_all = task_labels(ds, result.model.task)
        parts = {p: (learner.dataset_features(ds, getattr(split, p)), y_all[getattr(split, p)])
                 for p in ("train", "val", "test")}
    weights = _class_weights(y_all[split.train], len(result.model.class_names))
    return parts, np.array([weights[k] for k in sorted(weights)])


def test_the_saved_features_model_is_refit_on_training_and_validation_maps(data, tmp_path):
    result = train(data, "features", "five_class", tmp_path / "refit", n_boot=0, ood=False, seed=0)
    parts, w = _rows(result, data)
    (x_tr, y_tr), (x_val, y_val), (x_te, _) = parts["train"], parts["val"], parts["test"]
    settings = result.config["train_config"]
    assert settings["refit"] is True
    first = HistGradientBoostingClassifier(
        max_iter=settings["epochs"], learning_rate=settings["learning_rate"], early_stopping=True,
        n_iter_no_change=settings["patience"], random_state=0).fit(
        x_tr, y_tr, sample_weight=w[y_tr], X_val=x_val, y_val=y_val, sample_weight_val=w[y_val])
    record = result.config["model_info"]["refit"]
    assert record["iterations"] == first.n_iter_ and record["n_maps"] == len(y_tr) + len(y_val)
    again = HistGradientBoostingClassifier(max_iter=first.n_iter_, learning_rate=settings["learning_rate"],
                                           early_stopping=False, random_state=0)
    again.fit(np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val]),
              sample_weight=w[np.concatenate([y_tr, y_val])])
    saved = result.model.learner.estimator
    np.testing.assert_allclose(saved.predict_proba(x_te), again.predict_proba(x_te), atol=1e-12)
    # calibration (and screening's operating points) read the first fit's probabilities of the validation
    # maps, which it never saw -- not the refit's, which learnt them
    scores = np.load(result.model_dir / VALIDATION_FILE)
    np.testing.assert_allclose(scores["proba"], first.predict_proba(x_val), atol=1e-6)
    assert not np.allclose(saved.predict_proba(x_val), first.predict_proba(x_val), atol=1e-3)

    plain = train(data, "features", "five_class", tmp_path / "plain", n_boot=0, ood=False, seed=0,
                  refit=False)
    assert "refit" not in plain.config["model_info"]
    np.testing.assert_allclose(plain.model.learner.estimator.predict_proba(x_te), first.predict_proba(x_te),
                               atol=1e-12)

