"""Fields of view holding many cells -> crops of single, isolated, whole cells.

Background removal, smoothing, Otsu threshold, hole filling, connected components; then cells are
dropped when too small or too large, touching the image border, not convex enough (merged blobs) or
when their crop window holds pixels of another object. Touching cells are dropped, not split: a
watershed split of overlapping cells would hand the model cut or doubled cells (overlapping cells add
their OPD, so no split can give each its own).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from skimage import filters, measure, segmentation

from .preprocess import (
    MASK_MARGIN_UM,
    check_map,
    fill_nonfinite,
    foreground_mask,
    objects_above,
    remove_background,
    smooth,
)

log = logging.getLogger(__name__)

#: Below this solidity (area / convex hull area) an object is taken for merged cells; two touching
#: discs have 0.88, single round cells > 0.93.
MIN_SOLIDITY = 0.9


@dataclass
class CellCrop:
    """One cell cut from a field: ``data == field[row0:row1, col0:col1]`` in the input units.

    bbox: (row0, col0, row1, col1) of the crop window (cell bounding box plus margin, clipped to the field).
    area_px: pixel area of the cell's segment.
    """

    data: np.ndarray
    bbox: tuple[int, int, int, int]
    area_px: int


def _background_removed(opd_nm, pixel_size_um: float, order: int, path) -> np.ndarray:
    return remove_background(fill_nonfinite(opd_nm), order=order, pixel_size_um=pixel_size_um, path=path)


def _otsu_labels(field: np.ndarray, pixel_size_um: float) -> np.ndarray:
    smoothed = smooth(field, pixel_size_um)
    return measure.label(objects_above(smoothed, filters.threshold_otsu(smoothed), pixel_size_um))


def label_cells(opd_nm, pixel_size_um: float, *, background_order: int = 1, path="<array>") -> np.ndarray:
    """Label image of all objects of a field: background removed, smoothed, Otsu, holes filled.

    Specks under ``MIN_OBJECT_DIAMETER_UM`` are removed; size and shape limits are applied later.
    """
    return _otsu_labels(_background_removed(opd_nm, pixel_size_um, background_order, path), pixel_size_um)


def _footprints(field: np.ndarray, labels: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Otsu labels grown over each object's faint edge (down to the noise threshold, by at most
    ``MASK_MARGIN_UM``): Otsu cuts inside the cell edge, and a neighbour's edge in a window is a neighbour.
    """
    grown = segmentation.expand_labels(labels, distance=MASK_MARGIN_UM / pixel_size_um)
    return grown * (foreground_mask(field, pixel_size_um, margin_um=0.0) | (labels > 0))


def _window(bbox, margin_px: int, shape) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = bbox
    return (max(r0 - margin_px, 0), max(c0 - margin_px, 0),
            min(r1 + margin_px, shape[0]), min(c1 + margin_px, shape[1]))


def _rejection(region, footprints: np.ndarray, window, diameter_px: tuple[float, float],
               min_solidity: float) -> str | None:
    """Why ``region`` is not an isolated whole cell, or None if it is."""
    r0, c0, r1, c1 = region.bbox
    if region.equivalent_diameter_area < diameter_px[0]:
        return "too small"
    if r0 == 0 or c0 == 0 or r1 == footprints.shape[0] or c1 == footprints.shape[1]:
        return "touches the border"
    if region.equivalent_diameter_area > diameter_px[1]:
        return "too large (merged cells?)"
    if region.solidity < min_solidity:
        return f"solidity {region.solidity:.2f} < {min_solidity} (merged cells?)"
    w0, v0, w1, v1 = window
    inside = footprints[w0:w1, v0:v1]
    if np.any((inside != 0) & (inside != region.label)):
        return "another object inside its crop window"
    return None


def segment_field(opd_nm, pixel_size_um: float, *, min_diameter_um: float = 2.0,
                  max_diameter_um: float = 30.0, margin_um: float = 2.0,
                  min_solidity: float = MIN_SOLIDITY, background_order: int = 1,
                  path="<array>") -> list[CellCrop]:
    """Crops of the isolated whole cells of a field of view (any units; crops keep the input's).

    Cells are kept when their equivalent diameter lies in [min_diameter_um, max_diameter_um], they do not
    touch the border, their solidity is at least ``min_solidity`` and their window (bounding box plus
    ``margin_um``) holds no pixel of another object (including its faint edge, see :func:`_footprints`).
    Raises ExportError for unusable maps.
    """
    field = np.asarray(opd_nm)
    check_map(field, path)
    corrected = _background_removed(field, pixel_size_um, background_order, path)
    labels = _otsu_labels(corrected, pixel_size_um)
    footprints = _footprints(corrected, labels, pixel_size_um)
    diameter_px = (min_diameter_um / pixel_size_um, max_diameter_um / pixel_size_um)
    margin_px = int(np.ceil(margin_um / pixel_size_um))
    crops = []
    for region in measure.regionprops(labels):
        window = _window(region.bbox, margin_px, labels.shape)
        reason = _rejection(region, footprints, window, diameter_px, min_solidity)
        if reason:
            log.debug("%s: object %d at %s dropped: %s", path, region.label, region.bbox, reason)
            continue
        r0, c0, r1, c1 = window
        crops.append(CellCrop(data=field[r0:r1, c0:c1].copy(), bbox=window, area_px=int(region.area)))
    log.info("%s: %d isolated cells kept of %d objects", path, len(crops), int(labels.max()))
    return crops
