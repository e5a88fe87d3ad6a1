"""How well a screening model separates on one new session: the sensitivity at thresholds set on a
negative control of that session, measured on many target cells of the same session.

A spike-in sample holds 10-20 target cells, too few to choose between models (a 95% interval of 0.55-1.0
for 9 of 10). So the development session gets three parts, none of them the sample the README reports:
a sample and its negative control (for the screen itself) and 300 SW480 cells of the same session::

    python -m opdcells simulate --out dev_sample --sample 5000 --spike SW480:10 --seed 303
    python -m opdcells simulate --out dev_control --sample 5000 --control-of dev_sample --seed 404
    python -c "from opdcells.spikein import simulate_sample, session_seed_of; \\
        simulate_sample('dev_spikes', 0, {'SW480': 300}, seed=707, \\
                        session_seed=session_seed_of('dev_sample'), maps_per_file=100)"
    python -m opdcells calibrate-threshold MODEL dev_control --out dev_MODEL/calibration --fpr 1e-3
    python -m opdcells screen MODEL dev_spikes --out dev_MODEL/spikes \\
        --operating-point dev_MODEL/calibration/operating_point.json
    python docs/experiments/screen_separation.py dev_MODEL/calibration/control dev_MODEL/spikes

Printed: for control rates of 1e-3, 2e-3 and 5e-3, the control's empirical quantile and the share of the
spiked cells at or above it and not vetoed as out of distribution (as a screen flags them; 95%
Clopper-Pearson interval), the same without the veto, and the logit quantiles of both.
"""
import csv
import sys
from pathlib import Path

import numpy as np

from opdcells.calibration import clopper_pearson


def scores(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``p_target`` and ``ood_flag`` of a screen's ``scores.csv``."""
    with open(folder / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([float(r["p_target"]) for r in rows]), np.array([r["ood_flag"] == "True" for r in rows]))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def main(control: str, spikes: str) -> None:
    c, c_ood = scores(Path(control))
    s, s_ood = scores(Path(spikes))
    c = c[~c_ood]
    print(f"control: {len(c)} in-distribution maps ({c_ood.sum()} out of distribution); spiked cells: "
          f"{len(s)} ({s_ood.sum()} vetoed as out of distribution)")
    for fpr in (1e-3, 2e-3, 5e-3):
        threshold = np.quantile(c, 1 - fpr, method="higher")
        found, unvetoed = int(np.sum((s >= threshold) & ~s_ood)), int(np.sum(s >= threshold))
        low, high = clopper_pearson(found, len(s))
        print(f"control rate {fpr:g}: threshold {threshold:.6g}; found {found}/{len(s)} = "
              f"{found / len(s):.3f} (95% CI {low:.3f}-{high:.3f}); without the veto {unvetoed}")
    print("control logit quantiles 50/99/99.9%:", np.round(np.quantile(logit(c), [.5, .99, .999]), 2),
          "; spiked cells' 5/10/20/50%:", np.round(np.quantile(logit(s), [.05, .1, .2, .5]), 2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
