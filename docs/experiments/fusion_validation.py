"""``TrainConfig.fusion`` measured on trained deep runs (docs/recipe.md, "Late fusion"): each run folder
(trained with ``--fusion none``) is fused with the features model of its own split exactly as
``train --fusion features`` fuses them (``learners._FusedLearner``: the deep weight chosen on the validation
groups by ``train.fuse_on_validation``), and reported on the validation groups (deep alone, features
alone, fused, every weight tried) and once on the test groups (``evaluate.evaluate_model``: the fused model
and each part alone). The features model is fit once per split (``learners.FeaturesCache`` in CACHE).

Run from the repository root:
``PYTHONPATH=. python docs/experiments/fusion_validation.py DATASET.h5 CACHE RUN_FOLDER [RUN_FOLDER ...]``.
"""
import copy
import sys
import time
from pathlib import Path

from opdcells.config import FEATURES
from opdcells.dataset import open_dataset
from opdcells.evaluate import evaluate_model
from opdcells.learners import (
    FeaturesCache,
    _class_weights,
    _FeaturesLearner,
    _FusedLearner,
    features_settings,
)
from opdcells.modelfolder import SavedModel, load_model
from opdcells.splits import Split
from opdcells.tasks import task_labels
from opdcells.train import fuse_on_validation


def recall(report: dict) -> str:
    return " / ".join(f"{entry['recall']:.2f}" for entry in report["per_class"].values())


def fused_model(deep: SavedModel, ds, split: Split, cache: Path) -> SavedModel:
    """``deep`` with the features part of its split, as ``train --fusion features`` would save it."""
    settings = deep.train_config
    y_all = task_labels(ds, deep.task)
    part = _FeaturesLearner.create(features_settings(settings), len(deep.class_names), ds.pixel_size_um)
    part.cache = FeaturesCache(cache)
    part.fit(ds, split, y_all, features_settings(settings),
             _class_weights(y_all[split.train], len(deep.class_names), settings.class_weight), 0)
    config = copy.deepcopy(deep.config)
    config["train_config"]["fusion"] = FEATURES
    model = SavedModel(deep.folder, config, _FusedLearner(deep.learner, part))
    config["fusion"], _ = fuse_on_validation(model, ds, y_all, split)
    return model


def main(path: str, cache: str, runs: list[str]) -> None:
    ds = open_dataset(path)
    for run in runs:
        start = time.process_time()
        split = Split.from_json(Path(run) / "split.json")
        model = fused_model(load_model(run, ds), ds, split, Path(cache))
        val = model.config["fusion"]["validation"]
        print(f"{Path(run).name}: VALIDATION accuracy deep alone {val['deep']['accuracy']:.3f}, features "
              f"{val['features']['accuracy']:.3f}, fused {val['fused']['accuracy']:.3f} (deep weight "
              f"{model.learner.deep_weight}; balanced accuracy by weight "
              f"{val['balanced_accuracy_by_weight']})")
        report = evaluate_model(model, ds, split.test, n_boot=1000).report
        for name, part in {"fused": report, **report["fusion"]["parts"]}.items():
            acc = part["accuracy"]
            print(f"  TEST {name}: accuracy {acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}], "
                  f"recall per class {recall(part)}")
        print(f"  CPU s {time.process_time() - start:.0f} (fusion and evaluation, the deep run not counted)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
