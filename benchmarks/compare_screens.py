"""Compare two ``screen`` output folders of the same sample: what a change of the inference path moved.

    .venv/bin/python benchmarks/compare_screens.py BEFORE_DIR AFTER_DIR

Prints one line: the maps (the same rows, in the same order, are required), whether ``candidates.csv`` is
the same byte for byte and, if not, whether its rows are the same but for ``ood_score``; whether the OOD
flags and the flags are the same; the largest change of ``p_target`` (as written, 6 significant digits)
and how many maps' written value moved; the largest relative change of ``ood_score``; and the keys of
``summary.json`` that differ (besides the times). With an ``operating_point.json`` beside each folder
(``calibrate-threshold``'s ``OUT/control`` folders), whether the two points are the same. Exit status 0
when the candidates, flags and OOD flags are the same, 1 otherwise.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np


def rows(folder: Path, name: str) -> list[dict]:
    """The rows of ``folder/name`` (a CSV with a header)."""
    with open(folder / name, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def column(table: list[dict], name: str, kind=str) -> np.ndarray:
    """One column of ``table`` as an array of ``kind``."""
    return np.array([kind(r[name]) for r in table])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = map(Path, argv)
    old, new = rows(before, "scores.csv"), rows(after, "scores.csv")
    if [(r["file"], r["index"], r["cell"]) for r in old] != [(r["file"], r["index"], r["cell"]) for r in new]:
        print("the folders hold other maps (or in another order): not the same sample", file=sys.stderr)
        return 2
    same_file = (before / "candidates.csv").read_bytes() == (after / "candidates.csv").read_bytes()
    without_ood = [[{k: v for k, v in r.items() if k != "ood_score"} for r in rows(d, "candidates.csv")]
                   for d in (before, after)]
    same_candidates = without_ood[0] == without_ood[1]
    same_ood = np.array_equal(column(old, "ood_flag"), column(new, "ood_flag"))
    same_flags = np.array_equal(column(old, "flagged"), column(new, "flagged"))
    p_old, p_new = column(old, "p_target", float), column(new, "p_target", float)
    s_old, s_new = column(old, "ood_score", float), column(new, "ood_score", float)
    relative = np.abs(s_new - s_old) / np.maximum(np.abs(s_old), 1e-12)
    summaries = [json.loads((d / "summary.json").read_text(encoding="utf-8")) for d in (before, after)]
    moved = [k for k in summaries[0] if k not in ("seconds", "maps_per_second")
             and summaries[0][k] != summaries[1].get(k)]
    said = {True: "the same", False: "differ"}
    n_ood = int((column(old, "ood_flag") == "True").sum())
    print(f"{len(old)} maps; candidates.csv {'byte-identical' if same_file else 'differs'} "
          f"({len(without_ood[0])} candidates; rows but ood_score {said[same_candidates]}); "
          f"OOD flags {said[bool(same_ood)]} ({n_ood} out of distribution); flags {said[bool(same_flags)]}; "
          f"p_target max abs change {np.abs(p_new - p_old).max():.3g} ({int((p_new != p_old).sum())} maps "
          f"moved); ood_score max relative change {relative.max():.3g}; summary keys that differ: "
          f"{moved or 'none'}")
    points = [d.parent / "operating_point.json" for d in (before, after)]
    if all(p.is_file() for p in points):
        loaded = [json.loads(p.read_text(encoding="utf-8")) for p in points]
        for point in loaded:
            point.pop("created", None)
        print(f"operating points {said[loaded[0] == loaded[1]]}")
    return 0 if same_candidates and same_ood and same_flags else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
