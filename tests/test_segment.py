"""Tests of opdcells.segment on a synthetic field with known cells and on real red blood cell fields."""
from __future__ import annotations

import argparse

import matplotlib
import numpy as np
import pytest
import scipy.io
import tifffile
from skimage import io

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from test_preprocess import add_background, ellipsoid_opd  # noqa: E402  (tests/ is on sys.path)

from opdcells.errors import ExportError  # noqa: E402
from opdcells.ingest import IngestOptions, add_reading_options, iter_processed, reading_options  # noqa: E402
from opdcells.metadata import Meta  # noqa: E402
from opdcells.preprocess import preprocess_map  # noqa: E402
from opdcells.segment import (  # noqa: E402
    SEAM_DEPTH,
    CellCrop,
    crops_to_labels,
    find_cells,
    label_cells,
    mask_path,
    match_instances,
    read_label_image,
    relabel_components,
    seam_response,
    segment_field,
    segment_labelled,
    split_touching,
)

PX = 0.4
SHAPE = (300, 300)          # 120 um field
SEMI_AXES = (4.5, 4.0, 2.5)
ISOLATED = [(20.0, 25.0), (60.0, 80.0), (95.0, 30.0)]            # centres (row, col) in um: kept
NEAR_PAIR = [(30.0, 90.0), (30.0, 99.2)]    # 1.2 um gap (semi-axis 4 um along columns)
OVERLAPPING = [(85.0, 70.0), (85.0, 77.0)]  # merged blob
AT_BORDER = [(60.0, 2.0)]                   # cut by the left border
DEBRIS = (100.0, 100.0)                     # 1.6 um speck: too small


def synthetic_field(seed=0):
    """Field of ellipsoid cells on tilted, offset, noisy background; returns (field nm, dry masses)."""
    field = np.zeros(SHAPE)
    masses = {}
    for centre in ISOLATED + NEAR_PAIR + OVERLAPPING + AT_BORDER:
        opd, masses[centre] = ellipsoid_opd(SHAPE, PX, centre, SEMI_AXES, supersample=2)
        field += opd
    field += ellipsoid_opd(SHAPE, PX, DEBRIS, (0.8, 0.8, 1.0), supersample=2)[0]
    return add_background(field, np.random.default_rng(seed)), masses


def crop_centre_um(crop: CellCrop) -> tuple[float, float]:
    r0, c0, r1, c1 = crop.bbox
    return ((r0 + r1) / 2 * PX, (c0 + c1) / 2 * PX)


def match(crops, centres, tol_um=1.0):
    """Centres (from ``centres``) that a crop is centred on."""
    found = [c for c in centres if any(np.hypot(*np.subtract(crop_centre_um(k), c)) < tol_um for k in crops)]
    return found


@pytest.fixture(scope="module")
def field():
    return synthetic_field()


# touching="drop" keeps isolated cells only: the near pair and the overlapping pair are dropped. (The default,
# "split", keeps and splits them: see the split tests further down.)
def test_segment_field_keeps_exactly_the_isolated_whole_cells(field):
    opd, masses = field
    crops = segment_field(opd, PX, touching="drop", max_diameter_um=12.0)
    assert len(crops) == len(ISOLATED)
    assert match(crops, ISOLATED) == ISOLATED
    margin_px = int(np.ceil(2.0 / PX))
    cell_px = np.pi * SEMI_AXES[0] * SEMI_AXES[1] / PX ** 2
    clean = opd - add_background(np.zeros(SHAPE), np.random.default_rng(0))   # the cells alone, no noise
    for crop in crops:
        r0, c0, r1, c1 = crop.bbox
        # a crop of the input map with the field's background removed (plane fit; 2 nm noise)
        np.testing.assert_allclose(crop.data, clean[r0:r1, c0:c1], atol=10.0)
        assert crop.mask.shape == crop.data.shape and crop.mask.sum() == crop.area_px
        # the window is the cell (~2 semi-axes) plus the margin on each side
        assert r1 - r0 >= 2 * SEMI_AXES[0] / PX + 2 * margin_px - 3
        assert c1 - c0 >= 2 * SEMI_AXES[1] / PX + 2 * margin_px - 3
        assert 0.7 * cell_px < crop.area_px < 1.1 * cell_px


def test_crops_feed_preprocessing_with_correct_dry_mass(field):
    opd, masses = field
    crops = segment_field(opd, PX, touching="drop", max_diameter_um=12.0)
    for crop, centre in zip(crops, match(crops, ISOLATED), strict=True):
        result = preprocess_map(crop.data, Meta(units="nm", pixel_size_um=PX), path="field.npy")
        assert result.dry_mass_pg == pytest.approx(masses[centre], rel=0.03)


def test_margin_decides_whether_near_neighbours_are_isolated(field):
    opd, _ = field
    tight = segment_field(opd, PX, touching="drop", max_diameter_um=12.0, margin_um=0.0)
    assert match(tight, NEAR_PAIR) == NEAR_PAIR          # 1.2 um apart: their bounding boxes are clean
    assert match(tight, OVERLAPPING + AT_BORDER + [DEBRIS]) == []
    # the merged pair (equivalent diameter ~11 um) passes a generous size limit but not the solidity test
    merged = segment_field(opd, PX, touching="drop", max_diameter_um=30.0, margin_um=0.0)
    assert match(merged, [OVERLAPPING[0]], 4.0) == []


def test_segment_field_rejects_unusable_maps():
    with pytest.raises(ExportError, match="constant") as err:
        segment_field(np.full((64, 64), 5.0), 0.3, path="fov_3.tif")
    assert err.value.path == "fov_3.tif"
    with pytest.raises(ExportError, match="2-D"):
        segment_field(np.ones((2, 64, 64)), 0.3, path="fov_3.tif")


# Real fields of human red blood cells (phase in rad, 532 nm; 256 x 256). The object-plane pixel size is
# not given. Estimated 0.38 um/px: the edge-to-edge width (half height of the rim) of isolated cells,
# read from line profiles, is 20-21 px, and human RBCs are 7.5-8 um across -> 7.8 um / 20.5 px. Check:
# the dry mass of the segmented cells then comes out at 29-39 pg (median 35), close to the normal
# haemoglobin content per RBC (MCH 27-33 pg); mass scales with the square of the pixel size.
RBC_PX = 0.38
# Visual counts (field 1 looked at by eye in 4 zoomed quadrants with an 8 px grid, the near-touching
# pairs again at a contrast stretched to the background level): single whole cells, not touching the
# border, separated from every other cell by background. Field 1: 13, at (x, y) px (32,20) (55,72)
# (85,90) (113,92) (88,122) (140,175) (120,185) (158,198) (80,210) (55,222) (140,222) (175,232)
# (220,245). Borderline, not counted: (207,62), whose halo touches the cluster above it. Fields 2-4 are
# field 1 rotated by 90, 180 and 270 degrees (np.rot90, checked exactly), hence 13 too; their saved
# overlays were viewed as well and box the same 13 cells (the segmentation finds 13 in each).
RBC_VISUAL_COUNTS = {1: 13, 2: 13, 3: 13, 4: 13}
# RBCs measure 7.2-8.3 um here (equivalent diameter of the Otsu segment); the smallest overlapping pair
# 9.6 um. margin 0: the eye judges "separated by background", not a window around each cell.
RBC_LIMITS = dict(min_diameter_um=5.0, max_diameter_um=9.0)


def save_overlay(field, crops, labels, path):
    """PNG of the field with all segments outlined and the kept crop windows boxed and numbered."""
    fig, ax = plt.subplots(figsize=(9, 9))
    ax.imshow(field, cmap="gray")
    ax.contour(labels > 0, [0.5], colors="yellow", linewidths=0.6)
    for i, crop in enumerate(crops, 1):
        r0, c0, r1, c1 = crop.bbox
        ax.add_patch(plt.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, ec="lime", lw=1))
        ax.text(c0, r0 - 1, str(i), color="lime", fontsize=9)
    ax.set_title(f"{path.stem}: {len(crops)} isolated cells")
    fig.savefig(path, dpi=80)
    plt.close(fig)


@pytest.fixture(scope="module")
def rbc_fields(real_qpi):
    folder = real_qpi / "rbc_phase_fields"
    return {i: scipy.io.loadmat(folder / f"gt_phase{i}.mat")["gt_phase"] for i in RBC_VISUAL_COUNTS}


@pytest.mark.parametrize("index", sorted(RBC_VISUAL_COUNTS))
def test_rbc_field_count_matches_visual_count(rbc_fields, index, tmp_path):
    field = rbc_fields[index]
    assert field.shape == (256, 256)
    crops = segment_field(field, RBC_PX, touching="drop", margin_um=0.0, **RBC_LIMITS,
                          path=f"gt_phase{index}.mat")
    labels = label_cells(field, RBC_PX, touching="drop")
    save_overlay(field, crops, labels, tmp_path / f"rbc_field{index}.png")
    assert abs(len(crops) - RBC_VISUAL_COUNTS[index]) <= 1
    diameters = [2 * np.sqrt(c.area_px / np.pi) * RBC_PX for c in crops]
    assert 7.0 < np.median(diameters) < 8.5


def test_rbc_crops_have_red_blood_cell_dry_mass(rbc_fields):
    crops = segment_field(rbc_fields[1], RBC_PX, touching="drop", **RBC_LIMITS, path="gt_phase1.mat")
    assert len(crops) >= 5          # the default 2 um margin keeps only the most isolated cells
    meta = Meta(units="rad", wavelength_nm=532.0, pixel_size_um=RBC_PX)
    masses = [preprocess_map(c.data, meta, path="gt_phase1.mat").dry_mass_pg for c in crops]
    assert 25 < np.median(masses) < 40     # pg; normal haemoglobin per cell (MCH) 27-33 pg


# --------------------------------------------------------------------------------------- touching cells

TOUCHING_PAIR = [(30.0, 30.0), (30.0, 38.6)]   # two cells whose edges meet (semi-axis 4 um along columns)


@pytest.fixture(scope="module")
def touching_field():
    """A 60 um field with two cells whose edges touch, on a tilted noisy background: field, masses, truth."""
    shape = (150, 150)
    field, masses, truth = np.zeros(shape), [], np.zeros(shape, dtype=int)
    for label, centre in enumerate(TOUCHING_PAIR, start=1):
        opd, mass = ellipsoid_opd(shape, PX, centre, SEMI_AXES, supersample=2)
        field += opd
        masses.append(mass)
        truth[(opd > 0) & (truth == 0)] = label
    return add_background(field, np.random.default_rng(1)), masses, truth


def test_touching_cells_are_split_into_one_map_each(touching_field):
    opd, masses, _ = touching_field
    assert segment_field(opd, PX, touching="drop", max_diameter_um=12.0) == []   # the old behaviour
    crops = segment_field(opd, PX, max_diameter_um=12.0)
    assert match(crops, TOUCHING_PAIR, tol_um=1.5) == TOUCHING_PAIR and len(crops) == 2
    meta = Meta(units="nm", pixel_size_um=PX)
    for crop, mass, other in zip(sorted(crops, key=lambda c: c.bbox[1]), masses, TOUCHING_PAIR[::-1],
                                 strict=True):
        r0, c0, _, _ = crop.bbox
        inside_other = (round(other[0] / PX) - r0, round(other[1] / PX) - c0)
        if 0 <= inside_other[1] < crop.data.shape[1]:
            assert crop.data[inside_other] == 0.0 and not crop.mask[inside_other]   # the neighbour is gone
        result = preprocess_map(crop.data, meta, path="pair.npy")
        assert result.dry_mass_pg == pytest.approx(mass, rel=0.06)     # each map holds one cell's mass


def test_split_cells_match_the_truth(touching_field):
    opd, _, truth = touching_field
    crops = segment_field(opd, PX, max_diameter_um=12.0)
    assert len(match_instances(crops_to_labels(crops, opd.shape), truth, min_iou=0.7)) == 2


def test_touching_must_be_split_or_drop(touching_field):
    with pytest.raises(ValueError, match="touching"):
        segment_field(touching_field[0], PX, touching="merge")


def test_seam_response_marks_the_seam_between_touching_cells(touching_field):
    opd, _, _ = touching_field
    field = opd - np.median(opd)          # the seam response is a relative depth: any offset is removed first
    seams = seam_response(field, field > 20.0, PX)
    (r, c0), (_, c1) = TOUCHING_PAIR
    seam = seams[round(r / PX), round((c0 + c1) / 2 / PX)]
    centres = [seams[round(r / PX), round(c / PX)] for c in (c0, c1)]
    assert seam > 3 * SEAM_DEPTH and max(centres) < SEAM_DEPTH / 2, (seam, centres)


def test_split_seeds_a_ridge_once_and_never_leaves_a_segment_inside_another():
    # one disc-shaped object ringed inside by a closed seam: the band outside the ring is one region (its
    # distance ridge is a circle of near-equal maxima: one seed, not one per top) and the disc inside it
    # must not become a cell inside the cell (its pixels would be cut out of the outer cell's crop)
    radius = np.hypot(*(np.indices((61, 61)) - 30))
    objects = radius <= 20
    seams = np.where(np.abs(radius - 8) <= 1, 1.0, 0.0)
    labels = split_touching(np.where(objects, 100.0, 0.0), objects, 0.1, seams=seams, seed_h_um=0.3)
    assert set(np.unique(labels)) == {0, 1} and np.array_equal(labels > 0, objects)


DENSE_GRID = [(12 + 9.5 * i, 12 + 9.5 * j) for i in range(4) for j in range(4)]   # um; cells 10 um across
SPECK = (80.0, 20.0)                # a 1.6 um speck: debris
FLAT_DISC = (80.0, 50.0)          # a cell-sized object of 6 pg: a fragment or debris, not a cell
MERGED_BLOB = [(80.0, 75.0), (80.0, 79.0)]     # two cells 4 um apart: one blob without a seam


@pytest.fixture(scope="module")
def dense_synthetic():
    """A 100 um field with a 4 x 4 colony of touching cells (each with two granules) and, beside it, a
    speck, a flat disc and a merged blob: field (nm), truth label image of the colony."""
    shape, rng = (250, 250), np.random.default_rng(3)
    field, truth, top = np.zeros(shape), np.zeros(shape, dtype=int), np.zeros(shape)
    rows, cols = (np.indices(shape) + 0.5) * PX
    for label, (r, c) in enumerate(DENSE_GRID, start=1):
        centre = (r + rng.uniform(-0.5, 0.5), c + rng.uniform(-0.5, 0.5))
        opd, _ = ellipsoid_opd(shape, PX, centre, (*rng.uniform(4.7, 5.3, 2), 3.0), supersample=2)
        truth[opd > top] = label
        top = np.maximum(top, opd)
        for dc in (-2.0, 2.0):      # bright granules: two OPD maxima in one cell
            opd += 60.0 * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1] - dc) ** 2) / (2 * 0.8 ** 2))
        field += opd
    for centre, semi_axes in [(SPECK, (0.8, 0.8, 1.0)), (FLAT_DISC, (5.0, 5.0, 0.4))] + [
            (c, (5.0, 5.0, 3.0)) for c in MERGED_BLOB]:
        field += ellipsoid_opd(shape, PX, centre, semi_axes, supersample=2)[0]
    return add_background(field, np.random.default_rng(0)), truth


def test_dense_colony_is_split_into_its_cells_and_the_rest_dropped_with_reasons(dense_synthetic):
    opd, truth = dense_synthetic
    found = find_cells(opd, PX, min_diameter_um=6.0, max_diameter_um=11.5, min_dry_mass_pg=25.0)
    predicted = crops_to_labels(found.crops, opd.shape)
    matched = len(match_instances(predicted, truth))
    assert matched / len(found.crops) == 1.0 and matched / len(DENSE_GRID) == 1.0   # precision, recall
    assert [c.label for c in found.crops] == [c.label for c in segment_field(
        opd, PX, min_diameter_um=6.0, max_diameter_um=11.5, min_dry_mass_pg=25.0)]
    assert {c.label for c in found.crops} | {d.label for d in found.dropped} == set(
        np.unique(found.labels[found.labels > 0]))

    def reason_at(centre_um):
        row, col = round(centre_um[0] / PX), round(centre_um[1] / PX)
        return [d.reason for d in found.dropped
                if d.bbox[0] <= row < d.bbox[2] and d.bbox[1] <= col < d.bbox[3]]

    assert any(r.startswith("too small") for r in reason_at(SPECK))
    assert any(r.startswith("dry mass") for r in reason_at(FLAT_DISC))
    assert any(r.startswith("too large") for r in reason_at(MERGED_BLOB[0]))


def test_outline_contrast_limit_names_its_reason(dense_synthetic):
    opd, _ = dense_synthetic           # the colony's cells are kept under the default limit (test above)
    limits = dict(min_diameter_um=6.0, max_diameter_um=11.5)
    assert len(segment_field(opd, PX, **limits)) >= len(DENSE_GRID)
    dropped = find_cells(opd, PX, min_outline_contrast=50.0, **limits).dropped
    assert sum(d.reason.startswith("outline contrast") for d in dropped) >= len(DENSE_GRID)


# --------------------------------------------------------------------------------------- user masks

def field_and_labels():
    """The synthetic field and a label image of its cells: isolated, near pair, overlapping pair, border."""
    opd, masses = synthetic_field()
    labels = np.zeros(SHAPE, dtype=np.uint16)
    centres = ISOLATED + NEAR_PAIR + OVERLAPPING + AT_BORDER
    for label, centre in enumerate(centres, start=1):
        cell = ellipsoid_opd(SHAPE, PX, centre, SEMI_AXES, supersample=1)[0] > 0
        labels[cell & (labels == 0)] = label
    return opd, masses, labels, centres


def write_mask(path, labels):
    if path.name.endswith("_seg.npy"):   # cellpose's own format: np.save of a dict (a pickle)
        seg = {"masks": labels, "outlines": labels * 0, "filename": "f.tif", "est_diam": np.float64(30)}
        np.save(path, seg, allow_pickle=True)
    elif path.suffix == ".png":
        io.imsave(path, labels, check_contrast=False)
    else:
        tifffile.imwrite(path, labels)


@pytest.mark.parametrize("pattern", ["{stem}_cp_masks.png", "{stem}_seg.npy", "{stem}_labels.tif",
                                     "masks/{stem}.tiff"])
def test_masks_give_one_map_per_labelled_cell(tmp_path, pattern):
    opd, masses, labels, centres = field_and_labels()
    tifffile.imwrite(tmp_path / "fov_1.tif", opd.astype(np.float32))
    mask_file = mask_path(tmp_path / "fov_1.tif", pattern)
    mask_file.parent.mkdir(exist_ok=True)
    write_mask(mask_file, labels)
    options = IngestOptions(masks=pattern, units="nm", pixel_size_um=PX)
    assert options.fields
    maps = list(iter_processed(tmp_path / "fov_1.tif", options))
    inner = [c for c in centres if c not in AT_BORDER]
    assert len(maps) == len(inner)           # every labelled cell clear of the border, overlapping ones too
    found = sorted(m.dry_mass_pg for _, m, _ in maps)
    # isolated and near cells: their own mass; the overlapping pair split at the label boundary (~ their sum)
    isolated = sorted(masses[c] for c in ISOLATED + NEAR_PAIR)
    assert sum(found) == pytest.approx(sum(masses[c] for c in inner), rel=0.03)
    assert sum(1 for m in found if m == pytest.approx(isolated[0], rel=0.03)) >= len(isolated)


def test_mask_of_another_shape_is_one_clear_error(tmp_path):
    opd, _, labels, _ = field_and_labels()
    tifffile.imwrite(tmp_path / "fov_2.tif", opd.astype(np.float32))
    write_mask(tmp_path / "fov_2_cp_masks.png", labels[:200])
    with pytest.raises(ExportError, match=r"fov_2_cp_masks.png: mask of shape \(200, 300\) does not match"):
        list(iter_processed(tmp_path / "fov_2.tif", IngestOptions(masks="{stem}_cp_masks.png", units="nm",
                                                                  pixel_size_um=PX)))
    with pytest.raises(ExportError, match="fov_2_missing.png: no such mask file"):
        list(iter_processed(tmp_path / "fov_2.tif", IngestOptions(masks="{stem}_missing.png", units="nm",
                                                                  pixel_size_um=PX)))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_seg_npy_naming_anything_but_numpy_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    np.save(tmp_path / "fov_seg.npy", {"masks": np.ones((4, 4), int), "x": _RunsCode(str(marker))},
            allow_pickle=True)
    with pytest.raises(ExportError, match="refus"):
        read_label_image(tmp_path / "fov_seg.npy")
    assert not marker.exists()


def test_label_images_must_be_integer_2d(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.full((8, 8), 0.5, np.float32))
    with pytest.raises(ExportError, match="integers"):
        read_label_image(tmp_path / "f.tif")
    tifffile.imwrite(tmp_path / "s.tif", np.ones((2, 8, 8), np.uint8))
    with pytest.raises(ExportError, match="2-D"):
        read_label_image(tmp_path / "s.tif")


def test_reused_annotation_values_become_one_cell_per_component():
    labels = np.zeros((10, 10), int)
    labels[1:3, 1:3] = labels[6:8, 6:8] = 25      # one value, two cells that do not touch
    labels[1:3, 6:9] = 50
    out = relabel_components(labels)
    assert sorted(np.unique(out)) == [0, 1, 2, 3] and out[1, 1] != out[6, 6]


def test_masks_option_is_a_reading_option():
    parser = argparse.ArgumentParser()
    add_reading_options(parser)
    options = reading_options(parser.parse_args(["--masks", "{stem}_seg.npy", "--touching", "drop",
                                                 "--cell-diameter-um", "9", "28"]))
    assert options["masks"] == "{stem}_seg.npy" and options["touching"] == "drop"
    assert IngestOptions(**options).fields and IngestOptions(**options).cell_diameter_um == (9.0, 28.0)
    limited = IngestOptions(fields=True, cell_diameter_um=(9, 28))
    assert IngestOptions(fields=True).identity != limited.identity
    with pytest.raises(ValueError, match="MIN < MAX"):
        IngestOptions(fields=True, cell_diameter_um=(28, 9))
    assert IngestOptions(fields=True).identity != IngestOptions(masks="{stem}_seg.npy").identity
    assert IngestOptions().identity == IngestOptions(touching="drop").identity   # only fields are segmented
    with pytest.raises(SystemExit):
        parser.parse_args(["--masks", "masks.png"])     # no {stem}: the same mask for every field


# --------------------------------------------------------------------------------------- real dense fields

DENSE_PX = 0.6            # um; see benchmarks/bench_dense_fields.py
DENSE_LIMITS = dict(min_diameter_um=9.0, max_diameter_um=28.0, min_dry_mass_pg=100.0)
# img_004 and img_010 are held-out (even) fields: recall 0.94 (65/69), precision 0.93 (65/70) there with
# the seam split (the OPD-maxima split it replaced: 0.78 / 0.82)
HELD_OUT_FIELDS, MASKS_FIELD = (4, 10), 1
RECALL_MIN, PRECISION_MIN = 0.9, 0.9


def dense_field(folder, index):
    values = tifffile.imread(folder / f"img_{index:03d}.tif").astype(np.float64)
    return values * 1000 * 0.19, relabel_components(io.imread(folder / f"img_{index:03d}.png"))


def inner_labels(labels, min_px=0):
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    areas = np.bincount(labels.ravel())
    return {v for v in np.flatnonzero(areas >= max(min_px, 1)) if v and v not in edge}


@pytest.fixture(scope="module")
def dense(real_qpi):
    folder = real_qpi / "qphase_dense_fields"
    if not folder.is_dir():
        pytest.skip(f"dense fields not found at {folder}")
    return {i: dense_field(folder, i) for i in (*HELD_OUT_FIELDS, MASKS_FIELD)}


def test_dense_fields_split_cells_recall_and_precision(dense):
    counts = np.zeros(4)
    for index in HELD_OUT_FIELDS:
        opd, truth = dense[index]
        predicted = crops_to_labels(segment_field(opd, DENSE_PX, **DENSE_LIMITS), opd.shape)
        pairs = match_instances(predicted, truth)
        kept, true = inner_labels(predicted), inner_labels(truth, 100)
        counts += [len({p for p, _ in pairs} & kept), len(kept), len({t for _, t in pairs} & true), len(true)]
    precision, recall = counts[0] / counts[1], counts[2] / counts[3]
    assert recall >= RECALL_MIN and precision >= PRECISION_MIN, (recall, precision)


def test_dense_field_masks_give_every_annotated_cell(dense):
    opd, truth = dense[MASKS_FIELD]
    crops = segment_labelled(opd, DENSE_PX, truth)
    assert {c.label for c in crops} == inner_labels(truth)
    for crop in crops:
        r0, c0, r1, c1 = crop.bbox
        np.testing.assert_array_equal(crop.mask, truth[r0:r1, c0:c1] == crop.label)
        others = (truth[r0:r1, c0:c1] > 0) & (truth[r0:r1, c0:c1] != crop.label)
        assert np.all(crop.data[others] == 0.0)


def test_cell_diameter_option_sets_the_size_limits(tmp_path):
    opd, _ = synthetic_field()                     # cells 8-9 um across, debris 1.6 um
    np.save(tmp_path / "fov.npy", opd)
    def n_maps(limits):
        options = IngestOptions(fields=True, units="nm", pixel_size_um=PX, cell_diameter_um=limits)
        return len(list(iter_processed(tmp_path / "fov.npy", options)))
    assert n_maps((5.0, 12.0)) == len(ISOLATED + NEAR_PAIR + OVERLAPPING)   # the overlapping pair is split
    assert n_maps((10.0, 30.0)) == 0


def test_min_dry_mass_option_drops_lighter_objects(tmp_path):
    opd, masses = synthetic_field()                # cells of ~30 pg
    np.save(tmp_path / "fov.npy", opd)
    parser = argparse.ArgumentParser()
    add_reading_options(parser)
    parsed = reading_options(parser.parse_args(["--fields", "--min-dry-mass-pg", "20"]))
    assert parsed["min_dry_mass_pg"] == 20.0
    assert IngestOptions(**parsed).identity != IngestOptions(fields=True).identity
    with pytest.raises(ValueError, match="dry mass"):
        IngestOptions(fields=True, min_dry_mass_pg=-1.0)

    def n_maps(min_pg):
        options = IngestOptions(fields=True, units="nm", pixel_size_um=PX, cell_diameter_um=(5.0, 12.0),
                                min_dry_mass_pg=min_pg)
        return len(list(iter_processed(tmp_path / "fov.npy", options)))
    assert max(masses.values()) < 40.0 < 2 * min(masses.values())
    assert n_maps(0.5 * min(masses.values())) == len(ISOLATED + NEAR_PAIR + OVERLAPPING)
    assert n_maps(40.0) == 0
