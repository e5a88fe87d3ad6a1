"""Tests of opdcells.segment on a synthetic field with known cells and on real red blood cell fields."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import scipy.io

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from test_preprocess import add_background, ellipsoid_opd  # noqa: E402  (tests/ is on sys.path)

from opdcells.errors import ExportError  # noqa: E402
from opdcells.metadata import Meta  # noqa: E402
from opdcells.preprocess import preprocess_map  # noqa: E402
from opdcells.segment import CellCrop, label_cells, segment_field  # noqa: E402

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
