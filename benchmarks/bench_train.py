"""Cost of streaming training data from HDF5 (opdcells.pipeline) vs a bare ``model.fit`` on arrays.

    .venv/bin/python benchmarks/bench_train.py [--maps 1024] [--size 128] [--repeats 3] [--epochs 2]

Same model (quick profile: MobileNetV2 alpha 0.35, input 64), same batch size, same number of steps.
Per epoch: bare ``fit(x, y)`` on in-memory arrays; ``make_tf_dataset`` streaming without and with
augmentation. Epochs are timed inside ``fit`` (a callback; the first epoch of each call is left out),
calls are interleaved (the CPU is shared with other jobs) and the median is reported. Last, the CPU
time per batch of each stream alone (no model), next to that of a bare training step.
Goal: streaming with augmentation <= 1.15 x bare.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opdcells.dataset import DatasetWriter, open_dataset  # noqa: E402
from opdcells.metadata import Meta  # noqa: E402
from opdcells.preprocess import PreprocessConfig, ProcessedMap  # noqa: E402
from opdcells.tasks import CANONICAL_CLASSES  # noqa: E402

N_CLASSES = len(CANONICAL_CLASSES)
BARE, STREAM = "bare fit(x, y) in memory", "stream + augmentation"


def synthetic_cell(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth dome-shaped 'cell' (nm) with a little texture and zero background, like a processed map."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    a, b = rng.uniform(0.15, 0.3, 2) * size
    r2 = (xx / a) ** 2 + (yy / b) ** 2
    dome = np.where(r2 < 1, np.sqrt(np.clip(1 - r2, 0, 1)), 0) * rng.uniform(150, 500)
    return (dome * (1 + 0.05 * rng.standard_normal((size, size))) * (r2 < 1)).astype(np.float32)


def make_dataset(path: Path, n_maps: int, size: int, seed: int = 0) -> Path:
    """Dataset of ``n_maps`` synthetic maps in groups (files) of 32, cycling over the five classes."""
    rng = np.random.default_rng(seed)
    config = PreprocessConfig(out_size=size)
    meta = Meta(units="nm", pixel_size_um=config.out_pixel_size_um, wavelength_nm=633.0)
    with DatasetWriter(path, config, batch_size=256) as writer:
        for g, start in enumerate(range(0, n_maps, 32)):
            label = CANONICAL_CLASSES[g % N_CLASSES]
            sha = hashlib.sha256(f"bench:{g}".encode()).hexdigest()
            maps = ((i, ProcessedMap(synthetic_cell(rng, size), 100.0, 100.0), meta)
                    for i in range(min(32, n_maps - start)))
            writer.add_file(f"{sha}:bench", path=f"group_{g}.mat", sha256=sha, label=label, group=f"g{g}",
                            maps=maps)
    return path


class EpochTimer:
    """Keras callback recording wall time and process CPU time (all threads) of every epoch."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter(), time.process_time()

            def on_epoch_end(self, epoch, logs=None):
                wall, cpu = self._start
                self.times.append((time.perf_counter() - wall, time.process_time() - cpu))

        return _Timer()


def epoch_seconds(model, fit_args: tuple, fit_kwargs: dict, epochs: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each epoch after the first of one ``fit`` call (the first absorbs start-up)."""
    timer = EpochTimer()
    model.fit(*fit_args, epochs=epochs + 1, verbose=0, callbacks=[timer], **fit_kwargs)
    return timer.times[1:]


def stream_seconds(stream, repeats: int) -> tuple[float, float, float]:
    """stats() of iterating ``stream`` once per repeat without a model (after one warm-up pass)."""
    for _ in stream:
        pass
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in stream:
            pass
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return stats(times)


def stats(values) -> tuple[float, float, float]:
    """(min wall, median wall, median CPU) of (wall, CPU) second pairs."""
    wall, cpu = np.array(values).T
    return float(wall.min()), float(np.median(wall)), float(np.median(cpu))


def report(times: dict, args) -> None:
    """Print wall (min, median) and CPU (median) seconds per epoch of each variant and their ratios."""
    base = stats(times[BARE])
    print(f"{args.maps} maps {args.size}x{args.size}, batch {args.batch_size}, MobileNetV2 alpha 0.35 "
          f"input 64; {args.repeats} x {args.epochs} epochs each (ratios vs bare fit)")
    print(f"  {'variant':<28}{'wall min':>10}{'wall median':>13}{'CPU median':>12}"
          "   ratios (min, median, CPU)")
    for name, values in times.items():
        s = stats(values)
        print(f"  {name:<28}{s[0]:9.2f}s{s[1]:12.2f}s{s[2]:11.2f}s   "
              + ", ".join(f"{a / b:.3f}" for a, b in zip(s, base, strict=True)))
    s = stats(times[STREAM])
    print(f"streaming + augmentation / bare fit: wall {s[0] / base[0]:.3f} (min), "
          f"{s[1] / base[1]:.3f} (median), CPU {s[2] / base[2]:.3f} (goal <= 1.15)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=1024)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="fit calls per variant (interleaved)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per fit call")
    args = p.parse_args(argv)

    import keras

    from opdcells.models import build_model
    from opdcells.pipeline import AugmentConfig, make_tf_dataset

    with tempfile.TemporaryDirectory() as tmp:
        ds = open_dataset(make_dataset(Path(tmp) / "bench.h5", args.maps, args.size))
        indices = np.arange(len(ds))
        y = ds.labels.astype(np.int32)
        x = ds.read(indices)[..., None]          # the bare baseline holds everything in memory
        keras.utils.set_random_seed(0)
        model, _ = build_model("mobilenetv2", N_CLASSES, input_shape=(args.size, args.size, 1), input_size=64,
                               alpha=0.35, norm_scale_nm=300.0)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        variants = {
            BARE: ((x, y), {"batch_size": args.batch_size, "shuffle": True}),
            "stream, no augmentation": ((make_tf_dataset(ds, indices, y, batch_size=args.batch_size,
                                                         training=True, augment=None),), {"shuffle": False}),
            STREAM: ((make_tf_dataset(ds, indices, y, batch_size=args.batch_size,
                                                       training=True, augment=AugmentConfig()),),
                                      {"shuffle": False}),
        }
        for fit_args, fit_kwargs in variants.values():   # warm-up: tracing, first reads
            epoch_seconds(model, fit_args, fit_kwargs, 0)
        times = {name: [] for name in variants}
        for _ in range(args.repeats):                      # interleaved: load changes hit all alike
            for name, (fit_args, fit_kwargs) in variants.items():
                times[name] += epoch_seconds(model, fit_args, fit_kwargs, args.epochs)
        alone = {name: stream_seconds(fit_args[0], args.repeats) for name, (fit_args, _) in variants.items()
                 if name != BARE}
        ds.close()

    report(times, args)
    n_batches = -(-args.maps // args.batch_size)
    bare_cpu = stats(times[BARE])[2] / n_batches * 1000
    print(f"the stream alone (no model), CPU per batch; a bare training step takes {bare_cpu:.1f} ms:")
    for name, (_, _, cpu) in alone.items():
        per_batch = cpu / n_batches * 1000
        print(f"  {name:<28}{per_batch:7.1f} ms/batch  ({per_batch / bare_cpu:.1%} of a step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
