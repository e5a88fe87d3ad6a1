"""Training with glibc's allocator keeping the memory TensorFlow frees (``opdcells.console.
keep_allocated_memory``, what every opdcells command does) against glibc's defaults.

    .venv/bin/python benchmarks/bench_allocator.py [--maps 512] [--size 128] [--backbone mobilenetv2]
                                [--input-size 64] [--batch-size 32] [--epochs 2] [--repeats 2]

glibc's settings hold for a whole process, so each variant trains in processes of its own: the quick
profile's model of the backbone with opdcells' recipe on the HDF5 stream with the default augmentation (as
bench_epoch_time.py), epochs timed inside ``fit`` after a warm-up epoch, the two variants' processes
alternating (the CPU is shared). Reported per epoch (medians): wall, CPU, the kernel's share of that CPU and
minor page faults; and each process's peak resident memory. Goal: kept / default wall <= 1.0 (keeping the
memory costs no time) and peak memory <= 1.25 x.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import N_CLASSES, make_dataset  # noqa: E402

from opdcells.console import ALLOCATOR_ENVIRONMENT, ALLOCATOR_SWITCH, keep_allocated_memory  # noqa: E402

VARIANTS = ("default", "kept")


def _usage() -> tuple[float, float, float, int]:
    """(wall, user CPU, system CPU, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def train_child(args) -> dict:
    """One variant's process: apply its allocator settings, train (:func:`train_epochs`)."""
    applied = keep_allocated_memory() if args.child == "kept" else {}
    return {"applied": applied, **train_epochs(args)}


def train_epochs(args) -> dict:
    """Train the quick profile's ``args.backbone`` on ``args.data`` for a warm-up epoch and ``args.epochs``
    more; return each timed epoch's usage (wall, CPU, system CPU, minor page faults) and the peak memory."""
    import keras

    from opdcells.config import TrainConfig
    from opdcells.dataset import open_dataset
    from opdcells.models import build_model
    from opdcells.pipeline import make_tf_dataset
    from opdcells.recipe import build_optimizer, classification_loss, steps_per_epoch

    class Usage(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = _usage()

        def on_epoch_end(self, epoch, logs=None):
            wall, user, system, faults = (b - a for a, b in zip(self._start, _usage(), strict=True))
            self.epochs.append({"wall": wall, "cpu": user + system, "sys": system, "faults": faults})

    ds = open_dataset(args.data)
    indices = np.arange(len(ds))
    y = ds.labels.astype(np.int32)
    settings = TrainConfig.from_profile(args.backbone, "quick", input_size=args.input_size,
                                        batch_size=args.batch_size)
    model, _ = build_model(args.backbone, N_CLASSES, input_shape=(args.size, args.size, 1), seed=0,
                           input_size=args.input_size, norm_scale_nm=300.0, **settings.build_kw)
    steps = steps_per_epoch(len(indices), args.batch_size)
    model.compile(optimizer=build_optimizer(settings, epochs=args.epochs + 1, steps_per_epoch=steps),
                  loss=classification_loss(settings.label_smoothing), metrics=["accuracy"])
    stream = make_tf_dataset(ds, indices, y, batch_size=args.batch_size, training=True,
                             augment=settings.augment_config)
    usage = Usage()
    model.fit(stream, epochs=args.epochs + 1, verbose=0, callbacks=[usage])
    ds.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"epochs": usage.epochs[1:], "peak_mb": peak_mb}


def run_variant(variant: str, data: Path, args) -> dict:
    """Train ``variant`` in a new process whose environment sets none of glibc's variables."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENVIRONMENT and k != ALLOCATOR_SWITCH}
    if variant == "default":
        env[ALLOCATOR_SWITCH] = "default"
    command = [sys.executable, __file__, "--child", variant, "--data", str(data)] + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("size", "backbone", "input_size", "batch_size", "epochs")]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def report(results: dict, args) -> None:
    """Medians per epoch of each variant and the ratios kept / default."""
    rows = {}
    for variant, runs in results.items():
        epochs = [e for run in runs for e in run["epochs"]]
        rows[variant] = {key: float(np.median([e[key] for e in epochs])) for key in epochs[0]}
        rows[variant]["peak_mb"] = float(np.median([run["peak_mb"] for run in runs]))
    print(f"{args.maps} maps {args.size}x{args.size}, {args.backbone} (quick profile) at "
          f"{args.input_size} px, batch {args.batch_size}; {args.repeats} processes x {args.epochs} epochs "
          "per variant; medians")
    print(f"  {'glibc allocator':<17}{'wall/epoch':>11}{'CPU/epoch':>11}{'of it system':>14}"
          f"{'page faults/epoch':>19}{'peak memory':>13}")
    for variant, row in rows.items():
        print(f"  {variant:<17}{row['wall']:10.2f}s{row['cpu']:10.2f}s{row['sys']:13.2f}s"
              f"{row['faults']:19,.0f}{row['peak_mb']:10,.0f} MB")
    kept, default = rows["kept"], rows["default"]
    print(f"kept / default: wall {kept['wall'] / default['wall']:.3f} (goal <= 1.0), CPU "
          f"{kept['cpu'] / default['cpu']:.3f}, page faults "
          f"{kept['faults'] / max(default['faults'], 1):.4f}, peak memory "
          f"{kept['peak_mb'] / default['peak_mb']:.3f} (goal <= 1.25)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=512)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--backbone", default="mobilenetv2")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per process")
    p.add_argument("--repeats", type=int, default=2, help="processes per variant (alternating)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(train_child(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "bench.h5", args.maps, args.size)
        results = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                results[variant].append(run_variant(variant, data, args))
    if not results["kept"][0]["applied"]:
        print("glibc's allocator settings could not be applied here (not glibc?): nothing to compare")
        return 1
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
