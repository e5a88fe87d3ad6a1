"""End-to-end screening throughput and memory (``opdcells.screen``) vs a bare baseline on the same maps.

    .venv/bin/python benchmarks/bench_screen.py --model MODEL_DIR [--maps 3000] [--workers 2]
        [--batch-size 256] [--sample DIR] [--stages 200]

A spike-in sample of ``--maps`` blood cells plus 10 SW480 cells (``opdcells.spikein``, MATLAB v7.3 stacks
of 250 maps) is simulated in a temporary folder (or ``--sample`` is used), then timed:

* ``read + preprocess``: :func:`opdcells.predict.read_exports` alone (``--workers`` processes), the maps
  kept and saved as one ``.npy`` for the baseline;
* ``bare``: ``np.load`` of those preprocessed maps plus the bare Keras ``model.predict`` (batch
  ``--batch-size``): the floor of any screening run on this machine;
* ``screen``: :func:`opdcells.screen.screen_files` end to end, exports to report (with ``--workers``);
* ``preprocess, 1 process``: CPU ms per map of reading and preprocessing ``--compare-maps`` maps of the
  first file in this process, the maps of the stack preprocessed together (``preprocess_stack``, what
  screen does) and one by one (``preprocess_map``, before), with the ratio;
* ``stages``: CPU ms per map of each step of ``preprocess_map`` (reading, checks and smoothing,
  background fits, the cell's objects and measures, resampling and centring) over ``--stages`` maps of the
  first file, in this process with BLAS on one thread (as ingest runs it): where the time goes.
* ``main process`` (``--main``): CPU ms per map of the screening process's own steps on the preprocessed
  maps, batch by batch as ``screen`` makes them: the encoder pass (:func:`opdcells.screen.encoder_pass`,
  run by TensorFlow Lite where the encoder converts) and, as before, the traced Keras encoder,
  test-time augmentation of the maps near the threshold through the traced model
  (:func:`opdcells.screen.tta_pass`) and, as before, through Keras ``predict`` (``predict_proba(tta=True)``,
  a call per batch), and the OOD scores; each against ``bare`` (Keras ``predict`` of every map), with the
  thread pools ``screen`` uses (:func:`opdcells.screen.share_cores`).

Maps/s, CPU seconds and the peak resident memory of this process are printed, with each time as a ratio
to ``bare`` (timings on a shared machine are noisy; the ratio survives load). The reading workers are
children of multiprocessing's fork server, not of this process, so their CPU time is not in the CPU
column: run with ``--workers 1`` for the whole CPU cost of a map. Goal (issue 14): >= 300 maps/s end to
end on 2 cores, memory bounded
(the peak must not grow with ``--maps``: compare two sizes).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))   # bench_load's per-map ingest


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (with ``--workers 1``, all)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process and of its largest finished child."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def timed(fn):
    """``fn()``'s result, wall seconds and CPU seconds (children included once they have ended)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - wall, cpu_seconds() - cpu


def preprocess_cpu_ms(path: Path, options, n: int) -> float:
    """CPU ms per map of reading and preprocessing the first ``n`` maps of ``path`` in this process."""
    from opdcells.ingest import iter_processed

    cpu = time.process_time()
    done = sum(1 for _ in itertools.islice(iter_processed(path, options, on_error=lambda exc: None), n))
    return (time.process_time() - cpu) / max(done, 1) * 1e3


def stage_cpu_ms(path: Path, options, n: int) -> dict[str, float]:
    """CPU ms per map of each step of ``preprocess_map`` over the first ``n`` maps of ``path`` (the steps
    as ``preprocess_map`` calls them; refused maps count up to the step that refuses them)."""
    from opdcells import preprocess as pp
    from opdcells.errors import ExportError
    from opdcells.ingest import _single_threaded_blas
    from opdcells.readers import open_export

    config, ranges, spent = options.config, options.ranges, dict.fromkeys(STAGES, 0.0)

    def step(name, fn, *args):
        cpu = time.process_time()
        try:
            return fn(*args)
        finally:
            spent[name] += time.process_time() - cpu

    done = 0
    with open_export(path, **options.open_kwargs) as reader, _single_threaded_blas():
        maps = iter(reader)
        while done < n and (raw := step("read", next, maps, None)) is not None:
            meta, where, done = options.user_meta.over(raw.meta.over(reader.file_meta)), str(path), done + 1
            px = meta.pixel_size_um
            try:
                opd, smoothed = step("checks, smoothing", pp._checked_opd, raw.data, meta, config, where)
                opd, smoothed, objects = step("background fits", pp._background_removed, opd, smoothed,
                                              config.background_order, px, where)
                mask, mass, area, extent = step("cell: objects, choice, checks, measures", pp._measured_cell,
                                                opd, smoothed, px, config, where, ranges, True, objects)
                support, resampled = step("resampling, centring", pp._resample_cell, opd, mask, px,
                                          config.out_pixel_size_um)
                step("resampling, centring", pp._centred_cell, resampled, support, config, mass, area, extent,
                     where)
            except ExportError:
                pass
    return {name: seconds / max(done, 1) * 1e3 for name, seconds in spent.items()}


def main_cpu_ms(model, settings, maps: np.ndarray, batch_size: int) -> dict:
    """CPU ms per map of the screening process's steps over ``maps`` (N, S, S), in batches of
    ``batch_size`` as screen makes them (each step after one warm-up call: its tracing is left out), and
    ``near``: how many maps were refined with test-time augmentation."""
    from opdcells.calibration import apply_temperature, target_score
    from opdcells.screen import _Scorer, encoder_pass, near_threshold, ood_check

    scorer = _Scorer(model, settings, ood_check(model), batch_size)
    traced = encoder_pass(model, lite=False)
    forward = f"encoder pass ({'TF Lite' if getattr(scorer.forward, 'lite', False) else 'Keras traced'})"
    batches = [maps[i:i + batch_size] for i in range(0, len(maps), batch_size)]
    spent, near = {}, []

    def step(name, fn, *args):
        cpu = time.process_time()
        out = fn(*args)
        spent[name] = spent.get(name, 0.0) + time.process_time() - cpu
        return out

    scorer.forward(maps[:1], batch_size)
    if traced is not None:
        traced(maps[:1], batch_size)
    for batch in batches:
        proba, embedding = step(forward, scorer.forward, batch, batch_size)
        if traced is not None and getattr(scorer.forward, "lite", False):
            step("encoder pass, Keras traced (before)", traced, batch, batch_size)
        p_target = target_score(apply_temperature(proba, settings.temperature), model.class_names,
                                settings.targets)
        near.append(near_threshold(p_target, settings.point.threshold))
        step("OOD scores", scorer.ood_of, batch, None, embedding, near[-1])
    if model.tta and scorer.augmented is not None:
        scorer.augmented(maps[:1])
        scorer.augmented(maps[:8])
        model.predict_proba(maps[:1], batch_size, tta=True)
        for batch, close in zip(batches, near, strict=True):
            if close.any():
                step("TTA traced", scorer.augmented, batch[close])
                step("TTA Keras predict (before)", lambda x: model.predict_proba(x, batch_size, tta=True),
                     batch[close])
    return {**{name: seconds / len(maps) * 1e3 for name, seconds in spent.items()},
            "near": int(sum(c.sum() for c in near))}


#: The steps :func:`stage_cpu_ms` times, in order.
STAGES = ("read", "checks, smoothing", "background fits", "cell: objects, choice, checks, measures",
          "resampling, centring")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="a trained model folder with calibration")
    p.add_argument("--maps", type=int, default=3000, help="blood cells of the simulated sample")
    p.add_argument("--sample", type=Path, help="screen this sample folder instead of simulating one")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ood-morphology", choices=("near", "all"), default="near",
                   help="maps whose OOD morphology features are measured (screen's; 'all' as before)")
    p.add_argument("--compare-maps", type=int, default=300,
                   help="maps of the first file preprocessed in this process both ways (0: skip)")
    p.add_argument("--stages", type=int, default=0,
                   help="maps of the first file whose preprocessing steps are timed one by one (0: skip)")
    p.add_argument("--main", action="store_true",
                   help="time the main process's steps (encoder, test-time augmentation, OOD) on the maps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from opdcells.console import import_tensorflow

    import_tensorflow(False)
    from opdcells.modelfolder import load_model
    from opdcells.predict import expand_exports, ingest_options, read_exports
    from opdcells.screen import ood_check, screen_files, screen_settings, share_cores

    share_cores(args.workers)   # as screen's command: before the model loads
    from opdcells.spikein import simulate_sample

    model = load_model(args.model)
    options = ingest_options(model)
    with tempfile.TemporaryDirectory() as tmp:
        sample = args.sample
        if sample is None:
            sample = Path(tmp) / "sample"
            simulate_sample(sample, args.maps, {"SW480": 10}, seed=7, maps_per_file=250, workers=args.workers,
                            progress=False)
        files = expand_exports([sample])
        reads, t_read, c_read = timed(lambda: list(read_exports(files, options, workers=args.workers)))
        maps = np.stack([m.opd for r in reads for _, m in r.maps])
        n = len(maps)
        np.save(Path(tmp) / "maps.npy", maps)
        del reads, maps
        keras_model = getattr(model.learner, "deep", model.learner).model   # a fused model's deep part
        keras_model.predict(np.zeros((8, *model.input_shape[:2], 1), np.float32), verbose=0)   # tracing
        _, t_bare, c_bare = timed(lambda: keras_model.predict(np.load(Path(tmp) / "maps.npy")[..., None],
                                                              batch_size=args.batch_size, verbose=0))
        settings = screen_settings(model, ood_morphology=args.ood_morphology)
        steps = main_cpu_ms(model, settings, np.load(Path(tmp) / "maps.npy"), args.batch_size) if args.main \
            else {}
        result, t_screen, c_screen = timed(lambda: screen_files(
            model, [sample], Path(tmp) / "out", settings, options=options, ood=ood_check(model),
            batch_size=args.batch_size, workers=args.workers))
        if args.compare_maps:
            from bench_load import per_map_ingest

            batched_ms = preprocess_cpu_ms(files[0], options, args.compare_maps)
            with per_map_ingest():
                per_map_ms = preprocess_cpu_ms(files[0], options, args.compare_maps)
        stages = stage_cpu_ms(files[0], options, args.stages) if args.stages else {}
    rss_self, rss_child = peak_rss_mb()
    print(f"{n} maps of {len(files)} files, model {model.name}, {args.workers} workers, "
          f"batch {args.batch_size}")
    print(f"  {'stage':<36}{'maps/s':>9}{'wall s':>9}{'CPU s':>9}{'wall / bare':>13}")
    for name, wall, cpu in (("bare: np.load + keras predict", t_bare, c_bare),
                            ("read + preprocess (workers)", t_read, c_read),
                            ("screen end to end", t_screen, c_screen)):
        print(f"  {name:<36}{n / wall:9.1f}{wall:9.1f}{cpu:9.1f}{wall / t_bare:13.2f}")
    print(f"  screened {result.n_maps} maps, {result.n_flagged} flagged; peak RSS of this process "
          f"{rss_self:.0f} MB (finished children: {rss_child:.0f} MB)")
    if args.compare_maps:
        print(f"  read + preprocess, 1 process: {batched_ms:.2f} ms CPU/map batched (preprocess_stack), "
              f"{per_map_ms:.2f} one by one (preprocess_map): {per_map_ms / batched_ms:.2f}x")
    if stages:
        print(f"  preprocessing steps, CPU ms a map over {args.stages} maps of {files[0].name} (1 process): "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in stages.items())
              + f"; total {sum(stages.values()):.2f}")
    if steps:
        bare_ms = c_bare / n * 1e3
        print(f"  main process, CPU ms a map over {n} maps ({steps.pop('near')} near the threshold), "
              f"bare {bare_ms:.2f}: " + ", ".join(f"{name} {ms:.2f} ({ms / bare_ms:.2f}x bare)"
                                                  for name, ms in steps.items()))
    print("goal: >= 300 maps/s end to end on 2 cores (issue 14)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
