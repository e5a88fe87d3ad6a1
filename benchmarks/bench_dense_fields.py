"""Whole cells found in dense fields of view: automatic splitting and user masks against an annotation.

The 14 dense Q-Phase fields of ``shared/real_qpi/qphase_dense_fields`` (adherent A2780 cultures, 600 x 600,
values in pg/um^2; see SOURCES.md there) have hand-annotated instance masks (``img_NNN.png``, one value
reused for cells that do not touch: instances are the connected components of each value). Scored on the
cells that do not touch the field border (annotated instances of at least ``MIN_TRUE_PX`` px):

* recall: annotated cells matched by a kept cell;
* precision: kept cells matched to an annotated cell.

Matching is the standard of instance segmentation benchmarks (StarDist's ``matching``, criterion IoU,
threshold 0.5): a kept cell and an annotated cell match when their intersection over union is >= 0.5,
which makes the matching one-to-one (``segment.match_instances``).

Automatic path: ``segment.segment_field`` (touching cells split along their seams, fragments dropped by
outline contrast, with the priors of these cultures: equivalent diameter 9-28 um, dry mass >= 100 pg);
masks path: ``segment.segment_labelled`` on the annotation itself (must give 1.0 and 1.0: every annotated
cell becomes exactly its own crop). The segmentation's constants were chosen on the odd-numbered fields;
the even-numbered ones are held out: both halves and all 14 are reported.

Units and pixel size: value x 1000 x alpha (0.19 mL/g) = OPD in nm. The pixel size is not stated; 0.6 um
is assumed (median annotated cell then 17 um across with 195 pg dry mass, typical for adherent cancer
cells; a 10x Q-Phase resolves ~1.3 um, so 0.6 um/px samples it at Nyquist). Every length limit of the
segmentation is in um, so a wrong guess shifts the limits, not the method (dry masses scale with the
square of the assumed pixel size). The dry-mass prior: the annotated
cells clear of the border on the odd fields have a median dry mass of 212 pg, 5% of them less than
117 pg and 1% less than 82 pg; objects under 100 pg were fragments (halves of over-split cells) more
often than cells. Limits of 80 / 100 / 120 pg on the odd fields gave recall 0.793 / 0.782 / 0.763 at
precision 0.886 / 0.901 / 0.908 (100 pg: the highest recall at precision >= 0.9).

    .venv/bin/python benchmarks/bench_dense_fields.py [--data DIR] [--figure PNG] [--figure-field N]
        [--fields all|odd|even] [--seam-depth X] [--seed-h-um X] [--min-outline-contrast X]
        [--min-dry-mass-pg X] [--min-solidity X]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage import io

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opdcells import segment  # noqa: E402
from opdcells.segment import (  # noqa: E402
    crops_to_labels,
    match_instances,
    relabel_components,
    segment_field,
    segment_labelled,
)

PIXEL_SIZE_UM = 0.6
ALPHA_ML_PER_G = 0.19
#: Annotated instances smaller than this are specks of the annotation, not cells (36 um^2 at 0.6 um/px).
MIN_TRUE_PX = 100
#: Dense-field priors: debris and fragments under 9 um (equivalent diameter) or 100 pg; merged cells
#: over 28 um.
LIMITS = dict(min_diameter_um=9.0, max_diameter_um=28.0, min_dry_mass_pg=100.0)
GOAL = (0.7, 0.9)   # recall, precision
DEFAULT_DATA = Path(os.environ.get("OPDCELLS_REAL_QPI",
                                   Path(__file__).resolve().parents[2] / "shared" / "real_qpi"))


def load_field(folder: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(OPD in nm, annotation label image) of dense field ``index`` (1-14)."""
    values = tifffile.imread(folder / f"img_{index:03d}.tif").astype(np.float64)
    truth = relabel_components(io.imread(folder / f"img_{index:03d}.png"))
    return values * 1000.0 * ALPHA_ML_PER_G, truth


def _inner(labels: np.ndarray, min_px: int = 0) -> set[int]:
    """Labels that do not touch the border and cover at least ``min_px`` px."""
    edge = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    areas = np.bincount(labels.ravel())
    return {int(v) for v in np.flatnonzero(areas >= max(min_px, 1)) if v and v not in edge}


def score(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[matched kept, kept, matched true, true] over the cells clear of the border."""
    kept, true = _inner(predicted), _inner(truth, MIN_TRUE_PX)
    pairs = match_instances(predicted, truth)
    found, hit = {p for p, _ in pairs} & kept, {t for _, t in pairs} & true
    return np.array([len(found), len(kept), len(hit), len(true)])


def automatic(opd: np.ndarray, **limits) -> np.ndarray:
    return crops_to_labels(segment_field(opd, PIXEL_SIZE_UM, **{**LIMITS, **limits}), opd.shape)


def from_masks(opd: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return crops_to_labels(segment_labelled(opd, PIXEL_SIZE_UM, truth), opd.shape)


def save_figure(opd: np.ndarray, predicted: np.ndarray, truth: np.ndarray, title: str, path: Path) -> Path:
    """The field (OPD nm) with the kept cells outlined (yellow) over the annotation (cyan)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(opd, cmap="gray", vmin=0, vmax=np.percentile(opd, 99.5))
    ax.contour(find_boundaries(truth, mode="inner"), [0.5], colors="cyan", linewidths=0.6)
    ax.contour(find_boundaries(predicted, mode="inner"), [0.5], colors="yellow", linewidths=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real_qpi folder")
    parser.add_argument("--figure", type=Path, help="PNG of one field with its outlines")
    parser.add_argument("--figure-field", type=int, default=13)
    parser.add_argument("--fields", choices=("all", "odd", "even"), default="all")
    parser.add_argument("--seam-depth", type=float, help=f"default segment.SEAM_DEPTH ({segment.SEAM_DEPTH})")
    parser.add_argument("--seed-h-um", type=float, help=f"default segment.SEED_H_UM ({segment.SEED_H_UM})")
    parser.add_argument("--min-outline-contrast", type=float,
                        help=f"default segment.MIN_OUTLINE_CONTRAST ({segment.MIN_OUTLINE_CONTRAST})")
    parser.add_argument("--min-dry-mass-pg", type=float, default=LIMITS["min_dry_mass_pg"])
    parser.add_argument("--min-solidity", type=float,
                        help=f"default segment.MIN_SOLIDITY_SPLIT ({segment.MIN_SOLIDITY_SPLIT})")
    return parser.parse_args(argv)


def _rates(counts: np.ndarray) -> str:
    return (f"recall {counts[2] / max(counts[3], 1):.3f} ({counts[2]}/{counts[3]}), "
            f"precision {counts[0] / max(counts[1], 1):.3f} ({counts[0]}/{counts[1]})")


def main(argv=None) -> int:
    args = _parse(argv)
    folder = args.data / "qphase_dense_fields"
    if not folder.is_dir():
        print(f"dense fields not found at {folder}", file=sys.stderr)
        return 1
    segment.SEAM_DEPTH = args.seam_depth if args.seam_depth is not None else segment.SEAM_DEPTH
    segment.SEED_H_UM = args.seed_h_um if args.seed_h_um is not None else segment.SEED_H_UM
    limits = {"min_dry_mass_pg": args.min_dry_mass_pg}
    if args.min_outline_contrast is not None:
        limits["min_outline_contrast"] = args.min_outline_contrast
    if args.min_solidity is not None:
        limits["min_solidity"] = args.min_solidity
    indices = [i for i in range(1, 15) if args.fields == "all" or (i % 2 == 1) == (args.fields == "odd")]
    totals = {"automatic": np.zeros(4, int), "masks": np.zeros(4, int)}
    halves = {"odd (chose the constants)": np.zeros(4, int), "even (held out)": np.zeros(4, int)}
    print(f"{'field':>6} {'auto recall':>12} {'auto prec.':>11} {'masks recall':>13} {'masks prec.':>12}")
    start = time.perf_counter()
    for index in indices:
        opd, truth = load_field(folder, index)
        auto = automatic(opd, **limits)
        row = {"automatic": score(auto, truth), "masks": score(from_masks(opd, truth), truth)}
        for name, counts in row.items():
            totals[name] += counts
        halves["odd (chose the constants)" if index % 2 else "even (held out)"] += row["automatic"]
        a, m = row["automatic"], row["masks"]
        print(f"{index:>6} {a[2]:>5}/{a[3]:<6} {a[0]:>4}/{a[1]:<6} {m[2]:>6}/{m[3]:<6} {m[0]:>5}/{m[1]:<6}")
        if args.figure and index == args.figure_field:
            title = (f"img_{index:03d}: yellow = kept cells (automatic split), cyan = annotation; "
                     f"recall {a[2]}/{a[3]}, precision {a[0]}/{a[1]}")
            save_figure(opd, auto, truth, title, args.figure)
    elapsed = time.perf_counter() - start
    for name, counts in halves.items():
        if counts[3]:
            print(f"automatic, {name} fields: {_rates(counts)}")
    for name, counts in totals.items():
        print(f"{name:>9}, {args.fields} fields: {_rates(counts)}")
    recall, precision = (totals["automatic"][2] / totals["automatic"][3],
                         totals["automatic"][0] / totals["automatic"][1])
    verdict = "reached" if recall >= GOAL[0] and precision >= GOAL[1] else "NOT reached"
    print(f"goal recall >= {GOAL[0]} at precision >= {GOAL[1]} (automatic, {args.fields} fields): {verdict}; "
          f"{elapsed:.1f} s for {len(indices)} fields at {PIXEL_SIZE_UM} um/px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
