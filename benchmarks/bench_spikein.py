"""Spike-in benchmark of a screening run: N blood cells and K spiked cancer cells from an unseen session.

    .venv/bin/python benchmarks/bench_spikein.py --model MODEL_DIR [--n-blood 100000] [--spike SW480:20]
        [--seed 101] [--workers 2] [--maps-per-file 1000] [--keep DIR]

A sample is simulated (:func:`opdcells.spikein.simulate_sample`: one new session, never a training one;
pick a ``--seed`` not used to choose anything), screened with :func:`opdcells.screen.screen_files` and
compared with its ``truth.csv``. Printed: spiked cells found and missed (sensitivity with its 95%
Clopper-Pearson interval), blood cells flagged (false positives, the rate with its Clopper-Pearson
interval), the summary's expected false positives and whether they lie within the observed count's
interval, out-of-distribution vetoes, and the times (simulation, screening; maps/s).

Goals (issue 14, 2 cores): on 100,000 blood + 20 spiked cells at least 16 found, at most 0.1% of the
blood cells flagged, the expected false positives within the interval of the observed, >= 300 maps/s.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a proportion ``k / n`` (Clopper and Pearson 1934, Biometrika 26:404)."""
    alpha = 1 - level
    low = stats.beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    high = stats.beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


def compare(sample: Path, out: Path) -> dict:
    """Found / missed / false positives of a screen's ``out`` folder against the sample's truth."""
    with open(sample / "truth.csv", newline="") as fh:
        truth = {(r["path"], int(r["index"])): r["spiked"] == "1" for r in csv.DictReader(fh)}
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    flagged = {(Path(r["file"]).name, int(r["index"])) for r in rows if r["flagged"] == "True"}
    vetoed = {(Path(r["file"]).name, int(r["index"])) for r in rows if r["ood_flag"] == "True"}
    spiked = {k for k, s in truth.items() if s}
    n_blood = sum(not s for s in truth.values())
    screened_blood = sum(1 for r in rows if not truth[(Path(r["file"]).name, int(r["index"]))])
    return {"spiked": len(spiked), "found": len(spiked & flagged), "missed": len(spiked - flagged),
            "spiked_vetoed": len(spiked & vetoed), "blood": n_blood, "blood_screened": screened_blood,
            "false_positives": len(flagged - spiked), "blood_vetoed": len(vetoed - spiked)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="a trained model folder with calibration")
    p.add_argument("--n-blood", type=int, default=100_000)
    p.add_argument("--spike", default="SW480:20")
    p.add_argument("--seed", type=int, default=101, help="the sample's session (use one not chosen on)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--maps-per-file", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--keep", type=Path, help="write the sample and the screen's outputs here (kept)")
    p.add_argument("--sample", type=Path, help="screen this simulated sample (simulate --sample) instead")
    p.add_argument("--prevalence", type=float, default=1e-5, help="the screen's assumed prevalence")
    p.add_argument("--sample-check", action="store_true", help="raise the threshold on the sample (screen's)")
    p.add_argument("--ood-morphology", choices=("near", "all"), default="near",
                   help="maps whose OOD morphology features are measured (screen's; 'all' as before)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from opdcells.console import import_tensorflow

    import_tensorflow(False)
    from opdcells.modelfolder import load_model
    from opdcells.predict import ingest_options
    from opdcells.screen import ood_check, screen_files, screen_settings
    from opdcells.spikein import parse_spikes, simulate_sample

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        sample, out = root / "sample", root / "screen"
        start = time.perf_counter()
        if args.sample is None:
            simulate_sample(sample, args.n_blood, parse_spikes(args.spike), seed=args.seed,
                            maps_per_file=args.maps_per_file, workers=args.workers, progress=False)
        else:
            sample = args.sample
        t_sim = time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        result = screen_files(model, [sample], out, screen_settings(model, prevalence=args.prevalence,
                                                                  sample_check=args.sample_check,
                                                                  ood_morphology=args.ood_morphology),
                              options=ingest_options(model), ood=ood_check(model), batch_size=args.batch_size,
                              workers=args.workers)
        t_screen, c_screen = time.perf_counter() - start, time.process_time() - cpu
        counts = compare(sample, out)
        summary = json.loads((out / "summary.json").read_text())

    found_ci = clopper_pearson(counts["found"], counts["spiked"])
    fp_ci = clopper_pearson(counts["false_positives"], counts["blood_screened"])
    n_blood = counts["blood_screened"]
    expected = summary["expected_false_positives"]
    inside = fp_ci[0] * n_blood <= expected <= fp_ci[1] * n_blood
    source = args.sample or f"seed {args.seed}"
    print(f"sample: {counts['blood']} blood + {counts['spiked']} spiked, {source}; "
          f"model {model.name}; {result.n_maps} maps screened")
    print(f"  found {counts['found']} / {counts['spiked']} spiked (sensitivity "
          f"{counts['found'] / max(counts['spiked'], 1):.2f}, 95% CI {found_ci[0]:.2f}-{found_ci[1]:.2f}); "
          f"missed {counts['missed']} ({counts['spiked_vetoed']} vetoed as out of distribution)")
    print(f"  false positives {counts['false_positives']} of {n_blood} blood cells "
          f"({100 * counts['false_positives'] / max(n_blood, 1):.3f}%, 95% CI {100 * fp_ci[0]:.3f}-"
          f"{100 * fp_ci[1]:.3f}%, i.e. {fp_ci[0] * n_blood:.1f}-{fp_ci[1] * n_blood:.1f} cells); "
          f"{counts['blood_vetoed']} blood cells vetoed as out of distribution")
    point = summary["operating_point"]
    check = summary["threshold_check"]
    print(f"  summary: expected false positives {expected:.1f} (fpr {point['fpr']:g}; validation threshold "
          f"{point['threshold']:.4g}, {point['basis']}; threshold used {summary['threshold']:.4g} "
          f"({check['source']}: {check['above_validation_threshold']} maps at or above the validation "
          f"threshold, {check['allowed']} allowed)); within the observed CI: {'yes' if inside else 'NO'}")
    print(f"  times: simulation {t_sim:.0f} s; screening {t_screen:.0f} s = "
          f"{result.n_maps / t_screen:.0f} maps/s ({args.workers} workers); CPU of this process (inference, "
          f"OOD; not the reading workers' unless --workers 1) {c_screen:.0f} s = "
          f"{1e3 * c_screen / max(result.n_maps, 1):.1f} ms a map")
    print("goals: >= 16 of 20 found, <= 0.1% of blood flagged, expected FP within the observed CI, "
          ">= 300 maps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
