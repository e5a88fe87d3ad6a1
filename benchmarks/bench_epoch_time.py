"""Training time per epoch of each backbone with the recipe, against a bare ``model.fit`` on the same maps.

    .venv/bin/python benchmarks/bench_epoch_time.py [--maps 512] [--size 128] [--input-size 64]
                                                    [--backbones mobilenetv2,resnet50,vgg16] [--epochs 2]

Per backbone (MobileNetV2 alpha 0.35 as the quick profile builds it), the same model weights and batch
size: bare ``fit(x, y)`` on in-memory arrays with Adam and Keras' sparse cross-entropy, then opdcells'
training step (``opdcells.recipe``: AdamW, warm-up + cosine, label-smoothed loss) on the HDF5 stream with
the default augmentation (``opdcells.pipeline``). Epochs are timed inside ``fit`` (the first of each call
is left out), the two variants interleaved (the CPU is shared), medians reported with the ratio
recipe / bare of wall and CPU time. Goal: ratio <= 1.15 for every backbone (the recipe itself costs
nothing per step; what is left is the stream and the augmentation, see bench_train.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import N_CLASSES, epoch_seconds, make_dataset, stats  # noqa: E402

from opdcells.config import TrainConfig  # noqa: E402
from opdcells.dataset import open_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=512)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbones", default="mobilenetv2,resnet50,vgg16")
    p.add_argument("--repeats", type=int, default=2, help="fit calls per variant (interleaved)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per fit call")
    args = p.parse_args(argv)

    import keras

    from opdcells.models import build_model
    from opdcells.pipeline import make_tf_dataset
    from opdcells.recipe import build_optimizer, classification_loss, steps_per_epoch

    print(f"{args.maps} maps {args.size}x{args.size} -> {args.input_size} px, batch {args.batch_size}; "
          f"{args.repeats} x {args.epochs} epochs per variant; seconds per epoch (median)")
    print(f"  {'backbone':<13}{'bare wall':>10}{'bare CPU':>10}{'recipe wall':>13}{'recipe CPU':>12}"
          f"{'ratio wall':>12}{'ratio CPU':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        ds = open_dataset(make_dataset(Path(tmp) / "bench.h5", args.maps, args.size))
        indices = np.arange(len(ds))
        y = ds.labels.astype(np.int32)
        x = ds.read(indices)[..., None]
        for backbone in args.backbones.split(","):
            settings = TrainConfig.from_profile(backbone, "quick", input_size=args.input_size,
                                                batch_size=args.batch_size)
            steps = steps_per_epoch(len(indices), args.batch_size)
            runs = {}
            for name in ("bare", "recipe"):   # two models of the same initial weights, each compiled once
                model, _ = build_model(backbone, N_CLASSES, input_shape=(args.size, args.size, 1), seed=0,
                                       input_size=args.input_size, norm_scale_nm=300.0, **settings.build_kw)
                if name == "bare":
                    model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate),
                                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                    runs[name] = (model, (x, y), {"batch_size": args.batch_size, "shuffle": True})
                    continue
                total = (args.epochs + 1) * (args.repeats + 1)
                model.compile(optimizer=build_optimizer(settings, epochs=total, steps_per_epoch=steps),
                              loss=classification_loss(settings.label_smoothing), metrics=["accuracy"])
                stream = make_tf_dataset(ds, indices, y, batch_size=args.batch_size, training=True,
                                         augment=settings.augment_config)
                runs[name] = (model, (stream,), {"shuffle": False})
            times = {"bare": [], "recipe": []}
            for repeat in range(args.repeats + 1):        # the first round warms up (tracing, reads)
                for name, (model, fit_args, fit_kwargs) in runs.items():
                    times[name] += epoch_seconds(model, fit_args, fit_kwargs, args.epochs if repeat else 0)
            (_, b_wall, b_cpu), (_, r_wall, r_cpu) = stats(times["bare"]), stats(times["recipe"])
            print(f"  {backbone:<13}{b_wall:9.2f}s{b_cpu:9.2f}s{r_wall:12.2f}s{r_cpu:11.2f}s"
                  f"{r_wall / b_wall:12.3f}{r_cpu / b_cpu:11.3f}")
        ds.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
