"""Quantities-only control of docs/recipe.md ("Physically invariant quantities"): what the deep models'
physical quantities (``models.PhysicalQuantities``) classify alone on the demo split's validation groups,
with a linear head (standardised logistic regression) and with gradient boosting.

Run from the repository root: ``PYTHONPATH=. python docs/experiments/quantities_control.py DATASET.h5``.
"""
import sys
import time

import keras
import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from opdcells.config import DEFAULT_PHYSICAL_QUANTITIES, PHYSICAL_QUANTITIES
from opdcells.dataset import open_dataset
from opdcells.files import iter_maps
from opdcells.models import PhysicalQuantities
from opdcells.tasks import resolve_task, task_labels
from opdcells.train import make_split

SUBSETS = {"default (10)": DEFAULT_PHYSICAL_QUANTITIES, "dry mass + area": ("dry_mass_pg", "area_um2"),
           "dry mass, area, mean, max, std": ("dry_mass_pg", "area_um2", "opd_mean_nm", "opd_max_nm",
                                              "opd_std_nm"),
           "all 11": PHYSICAL_QUANTITIES}


def main(path: str) -> None:
    start = time.process_time()
    ds = open_dataset(path)
    task = resolve_task(None, ds.class_names)
    y = task_labels(ds, task)
    split = make_split(ds, task, seed=0)
    layer = PhysicalQuantities(ds.pixel_size_um, PHYSICAL_QUANTITIES)

    def quantities(indices):
        return np.concatenate([keras.ops.convert_to_numpy(layer(m[..., None].astype(np.float32)))
                               for m in iter_maps(ds, indices)])

    q_train, q_val = quantities(split.train), quantities(split.val)
    y_train, y_val = y[split.train], y[split.val]
    for name, names in SUBSETS.items():
        cols = [PHYSICAL_QUANTITIES.index(q) for q in names]
        linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        boosting = HistGradientBoostingClassifier(random_state=0, class_weight="balanced")
        scores = [np.mean(m.fit(q_train[:, cols], y_train).predict(q_val[:, cols]) == y_val)
                  for m in (linear, boosting)]
        print(f"{name:32s} validation accuracy: linear {scores[0]:.3f}, boosting {scores[1]:.3f}")
    print(f"CPU s {time.process_time() - start:.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
