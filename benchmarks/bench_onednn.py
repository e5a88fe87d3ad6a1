"""Training with oneDNN's CPU kernels (``TF_ENABLE_ONEDNN_OPTS=1``, what ``import opdcells`` sets where the
user has not: ``opdcells.console.TENSORFLOW_ENVIRONMENT``) against TensorFlow's Eigen kernels (``=0``).

    .venv/bin/python benchmarks/bench_onednn.py [--maps 256] [--size 128] [--batch-size 32] [--epochs 2]
                          [--repeats 2] [--threads 0] [--backbones mobilenetv2:64,resnet50:48,vgg16:48]

TensorFlow reads the switch once, when it is imported, so each variant trains in processes of its own:
each backbone as the quick profile builds it, at the given input size (default: the quick profile's), with
opdcells' recipe on the HDF5 stream with the default augmentation (``bench_allocator.train_epochs``),
epochs timed inside ``fit`` after a warm-up epoch, the two variants' processes alternating. ``--threads N``
sets TensorFlow's and BLAS's pools to N threads (the demo's notebooks run with 1 each); 0 keeps their
defaults. TensorFlow turns oneDNN on by itself on CPUs with AVX-512 VNNI / BF16, AVX-VNNI or AMX: there
both variants' "0" is Eigen and the comparison still holds. Goal: oneDNN / Eigen wall per epoch <= 1.05
for every backbone (it costs none of them time; the 5% is the noise of a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_allocator import train_epochs  # noqa: E402
from bench_train import make_dataset  # noqa: E402

from opdcells.notebooks import thread_environment  # noqa: E402

VARIANTS = {"eigen": "0", "onednn": "1"}
SWITCH = "TF_ENABLE_ONEDNN_OPTS"


def run_variant(variant: str, backbone: str, input_size: int, data: Path, args) -> dict:
    """Train ``backbone`` in a new process with oneDNN's switch set for ``variant``."""
    env = thread_environment({**os.environ, SWITCH: VARIANTS[variant]}, args.threads or None)
    command = [sys.executable, __file__, "--child", "--data", str(data), f"--backbone={backbone}",
               f"--input-size={input_size}", f"--batch-size={args.batch_size}", f"--epochs={args.epochs}"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def child(args) -> dict:
    """A variant's process: whether TensorFlow really runs oneDNN's kernels, and the timed epochs."""
    result = train_epochs(args)
    from tensorflow.python.util import _pywrap_util_port

    return {"onednn": bool(_pywrap_util_port.IsMklEnabled()), **result}


def report(results: dict, args) -> bool:
    """Median seconds per epoch of each backbone and variant; True when every ratio meets the goal."""
    threads = args.threads or "default"
    print(f"{args.maps} maps {args.size}x{args.size}, quick profile, batch {args.batch_size}, {threads} "
          f"threads; {args.repeats} processes x {args.epochs} epochs per variant; medians per epoch")
    print(f"  {'backbone':<18}{'Eigen wall':>11}{'CPU':>9}{'oneDNN wall':>13}{'CPU':>9}"
          f"{'oneDNN / Eigen':>16}")
    met = True
    for name, runs in results.items():
        row = {variant: {key: float(np.median([e[key] for run in runs[variant] for e in run["epochs"]]))
                         for key in ("wall", "cpu")} for variant in VARIANTS}
        ratio = row["onednn"]["wall"] / row["eigen"]["wall"]
        met &= ratio <= 1.05
        print(f"  {name:<18}{row['eigen']['wall']:10.1f}s{row['eigen']['cpu']:8.1f}s"
              f"{row['onednn']['wall']:12.1f}s{row['onednn']['cpu']:8.1f}s{ratio:16.2f}")
    print(f"goal: oneDNN / Eigen <= 1.05 for every backbone: {'met' if met else 'NOT met'}")
    return met


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per process")
    p.add_argument("--repeats", type=int, default=2, help="processes per variant (alternating)")
    p.add_argument("--threads", type=int, default=0, help="threads per process (0: the libraries' defaults)")
    p.add_argument("--backbones", default="mobilenetv2:64,resnet50:48,vgg16:48",
                   help="BACKBONE:INPUT_SIZE, comma-separated")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--backbone", help=argparse.SUPPRESS)
    p.add_argument("--input-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "bench.h5", args.maps, args.size)
        for spec in args.backbones.split(","):
            backbone, input_size = spec.split(":")
            runs = results[f"{backbone} {input_size} px"] = {variant: [] for variant in VARIANTS}
            for _ in range(args.repeats):
                for variant in VARIANTS:
                    runs[variant].append(run_variant(variant, backbone, int(input_size), data, args))
    if not all(run["onednn"] for runs in results.values() for run in runs["onednn"]):
        print(f"{SWITCH}=1 did not turn oneDNN on in this TensorFlow: nothing to compare")
        return 1
    return 0 if report(results, args) else 1


if __name__ == "__main__":
    sys.exit(main())
