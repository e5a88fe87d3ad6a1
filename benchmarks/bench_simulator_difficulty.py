"""How hard is the simulated five-class problem for a hand-made-features classifier?

Simulates ``--per-class`` maps per class in memory (``simulate_cell``) spread over ``--sessions``
acquisition sessions per class, preprocesses them like real exports (``preprocess_map``: background,
centring, 0.25 um pixels), extracts ``opdcells.features`` and reports out-of-fold accuracy of a
HistGradientBoostingClassifier for (a) splits BY SESSION (StratifiedGroupKFold: no session in both train
and test), (b) random stratified splits and (c) by session with size and mass features only, with
per-class recall and the confusion matrix.

    .venv/bin/python benchmarks/bench_simulator_difficulty.py [--per-class 200] [--sessions 8] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from opdcells.errors import ExportError
from opdcells.features import REFERENCE_PIXEL_UM, feature_matrix
from opdcells.metadata import Meta
from opdcells.preprocess import PreprocessConfig, preprocess_map
from opdcells.simulate import CLASS_NAMES, cell_rng, sample_session, simulate_cell

#: The "simple" features that must not separate the classes on their own.
SIZE_AND_MASS = ("area_um2", "equivalent_diameter_um", "dry_mass_pg", "opd_mean_nm", "opd_peak_nm")


def simulate(per_class: int, sessions: int, seed: int):
    """Preprocessed maps, class labels, session groups and simulation time (s)."""
    config = PreprocessConfig(out_pixel_size_um=REFERENCE_PIXEL_UM)
    maps, labels, groups, failed, sim_s = [], [], [], [], 0.0
    for label, name in enumerate(CLASS_NAMES):
        for k in range(1, sessions + 1):
            session = sample_session(cell_rng(seed, name, k), name, k)
            for i in range(per_class * k // sessions - per_class * (k - 1) // sessions):
                start = time.perf_counter()
                opd, _ = simulate_cell(name, cell_rng(seed, name, k, i), session)
                sim_s += time.perf_counter() - start
                meta = Meta(units="nm", pixel_size_um=session.pixel_size_um)
                try:
                    maps.append(preprocess_map(opd, meta, config).opd)
                except ExportError as err:
                    failed.append(str(err))
                    continue
                labels.append(label)
                groups.append(f"{name}/{session.session_id}")
    if failed:
        print(f"preprocessing rejected {len(failed)} maps, e.g. {failed[0]}")
    return maps, np.asarray(labels), np.asarray(groups), sim_s


def report(title: str, y: np.ndarray, pred: np.ndarray) -> float:
    accuracy = accuracy_score(y, pred)
    print(f"\n{title}: accuracy {accuracy:.3f}")
    recalls = recall_score(y, pred, average=None, labels=range(len(CLASS_NAMES)))
    print("  recall  " + "  ".join(f"{n}={r:.2f}" for n, r in zip(CLASS_NAMES, recalls, strict=True)))
    print("  confusion (rows true, cols predicted; order " + ", ".join(CLASS_NAMES) + ")")
    for row in confusion_matrix(y, pred, labels=range(len(CLASS_NAMES))):
        print("   " + " ".join(f"{v:5d}" for v in row))
    return accuracy


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=4)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    maps, y, groups, sim_s = simulate(args.per_class, args.sessions, args.seed)
    X, names = feature_matrix(maps, REFERENCE_PIXEL_UM)
    simple = [names.index(n) for n in SIZE_AND_MASS]
    print(f"{len(y)} maps, {args.sessions} sessions per class: simulation {len(y) / sim_s:.0f} maps/s, "
          f"total with preprocessing and features {time.perf_counter() - start:.0f} s")
    model = HistGradientBoostingClassifier(random_state=args.seed)
    by_session = StratifiedGroupKFold(args.folds, shuffle=True, random_state=args.seed)
    random = StratifiedKFold(args.folds, shuffle=True, random_state=args.seed)
    with threadpool_limits(1):  # one OpenMP thread: the benchmark shares its cores
        return {
            "unseen_sessions": report(f"{args.folds}-fold split BY SESSION (unseen sessions)", y,
                                      cross_val_predict(model, X, y, groups=groups, cv=by_session)),
            "random_split": report(f"{args.folds}-fold RANDOM split (sessions shared)", y,
                                   cross_val_predict(model, X, y, cv=random)),
            "size_mass_unseen_sessions": report(
                f"{args.folds}-fold split BY SESSION, size and mass features only", y,
                cross_val_predict(model, X[:, simple], y, groups=groups, cv=by_session)),
        }


if __name__ == "__main__":
    main()
