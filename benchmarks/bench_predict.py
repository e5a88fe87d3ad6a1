"""Prediction throughput of a saved model (opdcells.modelfolder.SavedModel) vs the bare Keras model.

    .venv/bin/python benchmarks/bench_predict.py [--maps 2048] [--size 128] [--repeats 5]

A quick-profile MobileNetV2 (alpha 0.35, input 64) is trained for one epoch on a synthetic dataset,
saved and loaded back with ``load_model``. Maps/s of:

* bare ``keras_model.predict(x)`` on an in-memory array (the reference);
* ``SavedModel.predict_proba(dataset.read(indices))``: maps read from the HDF5 dataset, then predicted;
* ``SavedModel.predict_dataset(dataset, indices)``: streamed from HDF5 through opdcells.pipeline;
* the same with test-time augmentation (``tta=True``, the default of trained deep models): 8 views of
  every map, so about 1/8 of the throughput by design (reported, no goal).

Interleaved repeats (the CPU is shared with other jobs): best and median wall time and the median
process CPU time (all threads) are reported as ratios to the bare predict. Goal: >= 0.9 x bare
without test-time augmentation (the model is trained with ``tta=False``: this measures the overhead of
reading and streaming, not the 8 views).
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

from bench_train import make_dataset, stats  # noqa: E402

from opdcells.dataset import open_dataset  # noqa: E402

BARE = "bare keras predict(x) in memory"


def seconds(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def report(times: dict, args) -> None:
    """Maps/s (best and median wall time) and CPU seconds of each variant, as ratios to bare predict."""
    base = stats(times[BARE])
    print(f"{args.maps} maps {args.size}x{args.size}, batch {args.batch_size}, MobileNetV2 alpha 0.35 "
          f"input 64; {args.repeats} interleaved repeats (throughput ratios vs bare predict)")
    print(f"  {'variant':<32}{'maps/s best':>12}{'maps/s median':>15}{'CPU s':>8}"
          "   ratios (best, median, CPU)")
    for name, values in times.items():
        s = stats(values)
        print(f"  {name:<32}{args.maps / s[0]:12.0f}{args.maps / s[1]:15.0f}{s[2]:8.2f}   "
              + ", ".join(f"{b / a:.3f}" for a, b in zip(s, base, strict=True)))
    print("goal: >= 0.9 x bare (without tta)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=2048)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from opdcells.modelfolder import load_model
    from opdcells.train import train

    with tempfile.TemporaryDirectory() as tmp:
        path = make_dataset(Path(tmp) / "bench.h5", args.maps, args.size)
        result = train(path, "mobilenetv2", "five_class", Path(tmp) / "run", epochs=1, profile="quick",
                       n_boot=0, val_size=0.15, tta=False, fusion="none")   # the Keras model alone
        with open_dataset(path) as ds:
            model = load_model(result.model_dir, dataset=ds)
            keras_model = model.learner.model
            indices = np.arange(len(ds))
            x = ds.read(indices)[..., None]
            b = args.batch_size
            variants = {
                BARE: lambda: keras_model.predict(x, batch_size=b, verbose=0),
                "predict_proba(ds.read(...))": lambda: model.predict_proba(ds.read(indices), batch_size=b),
                "predict_dataset (streamed)": lambda: model.predict_dataset(ds, indices, batch_size=b),
                "predict_dataset, tta (8 views)": lambda: model.predict_dataset(ds, indices, batch_size=b,
                                                                                tta=True),
            }
            for fn in variants.values():   # warm-up: tracing
                fn()
            times = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    times[name].append(seconds(fn))
            np.testing.assert_allclose(variants["predict_dataset (streamed)"](), variants[BARE](), rtol=1e-4,
                                       atol=1e-6)

    report(times, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
