"""Late fusion of docs/recipe.md ("Physically invariant quantities"): the mean of the class probabilities
of deep model folders (with their own test-time augmentation) and of the features model, on the demo
split's validation groups. The features model is fit as ``learners._FeaturesLearner`` fits it (quick
profile, balanced class weights, the validation maps for its early stopping).

Run from the repository root:
``PYTHONPATH=. python docs/experiments/late_fusion.py DATASET.h5 RUN_FOLDER [RUN_FOLDER ...]``.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from opdcells.config import TrainConfig
from opdcells.dataset import open_dataset
from opdcells.features import feature_matrix
from opdcells.files import iter_maps
from opdcells.learners import _class_weights, _FeaturesLearner
from opdcells.modelfolder import load_model
from opdcells.tasks import resolve_task, task_labels
from opdcells.train import make_split


def report(label: str, proba: np.ndarray, y: np.ndarray) -> None:
    recall = " / ".join(f"{np.mean(proba.argmax(1)[y == k] == k):.2f}" for k in range(proba.shape[1]))
    print(f"{label}: validation accuracy {np.mean(proba.argmax(1) == y):.3f}, recall per class {recall}")


def main(path: str, runs: list[str]) -> None:
    start = time.process_time()
    ds = open_dataset(path)
    task = resolve_task(None, ds.class_names)
    y = task_labels(ds, task)
    split = make_split(ds, task, seed=0)
    x_train, x_val = (np.concatenate([feature_matrix(m, ds.pixel_size_um)[0] for m in iter_maps(ds, part)])
                      for part in (split.train, split.val))
    y_train, y_val = y[split.train], y[split.val]
    estimator = _FeaturesLearner.create(TrainConfig.from_profile("features", "quick"), len(task.classes),
                                        ds.pixel_size_um).estimator
    weights = _class_weights(y_train, len(task.classes))
    w = np.array([weights[k] for k in sorted(weights)])
    estimator.fit(x_train, y_train, sample_weight=w[y_train], X_val=x_val, y_val=y_val,
                  sample_weight_val=w[y_val])
    p_features = estimator.predict_proba(x_val)
    report("features", p_features, y_val)
    for run in runs:
        if json.loads((Path(run) / "split.json").read_text())["val"] != split.val.tolist():
            raise SystemExit(f"{run}: another validation split")
        p_deep = load_model(run).predict_dataset(ds, split.val)
        report(Path(run).name, p_deep, y_val)
        report(f"mean({Path(run).name}, features)", (p_deep + p_features) / 2, y_val)
    print(f"CPU s {time.process_time() - start:.0f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
