"""Cost of the out-of-distribution check (opdcells.ood) at prediction time, against prediction itself.

    .venv/bin/python benchmarks/bench_ood.py [--maps 512] [--size 128] [--repeats 3]

A quick-profile MobileNetV2 (alpha 0.35, input 64) is trained for one epoch on a synthetic dataset (which
also fits its OOD detector). On the same in-memory maps, interleaved repeats time:

* ``SavedModel.predict_proba(maps, tta=False)`` (the reference) and with ``tta=True`` (the default of
  trained deep models: 8 views);
* ``ood.PredictionCheck(model).values(maps)``: what ``predict`` adds per map (one encoder pass and the
  morphology features of ``opdcells.features``, then the Mahalanobis distances);
* ``features.feature_matrix(maps)`` alone, the part the check cannot share with the classifier.

Reported as maps/s and as the check's time over the prediction's (median wall time). No goal yet: the
screening work (issue 14) sets one (>= 300 maps/s end to end); this shows where the time goes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import make_dataset  # noqa: E402

from opdcells.dataset import open_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=512)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from opdcells import ood
    from opdcells.features import feature_matrix
    from opdcells.modelfolder import load_model
    from opdcells.train import train

    with tempfile.TemporaryDirectory() as tmp:
        path = make_dataset(Path(tmp) / "bench.h5", args.maps, args.size)
        result = train(path, "mobilenetv2", "five_class", Path(tmp) / "run", epochs=1, profile="quick",
                       n_boot=0, val_size=0.15)
        model = load_model(result.model_dir)
        with open_dataset(path) as ds:
            maps, px = ds.read(np.arange(len(ds))), ds.pixel_size_um
        check = ood.PredictionCheck(model)
        variants = {
            "predict_proba, no tta": lambda: model.predict_proba(maps, tta=False),
            "predict_proba, tta (8 views)": lambda: model.predict_proba(maps, tta=True),
            "ood check (PredictionCheck.values)": lambda: check.values(maps),
            "morphology features alone": lambda: feature_matrix(maps, px),
        }
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = np.median(times["predict_proba, no tta"])
    print(f"{args.maps} maps {args.size}x{args.size}, {args.repeats} interleaved repeats (median wall time)")
    print(f"  {'variant':<38}{'maps/s':>8}{'x predict (no tta) time':>26}")
    for name, values in times.items():
        t = np.median(values)
        print(f"  {name:<38}{args.maps / t:8.0f}{t / base:26.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
