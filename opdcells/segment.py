"""Fields of view holding many cells -> crops of single whole cells, one cell per crop.

Two ways to find the cells of a field:

* automatic (:func:`segment_field`, :func:`find_cells`): background removal, smoothing, threshold, hole
  filling, connected components; with ``touching="split"`` (default) touching cells are then split by a
  watershed (scikit-image) along the seams between them, the dark valleys of the OPD
  (:func:`seam_response`), seeded at the centres of the regions the seams enclose (:func:`split_touching`);
  with ``touching="drop"`` only isolated cells are kept (a cell whose crop window holds another object is
  dropped). Objects are dropped when too small (debris) or too large, touching the image border, not convex
  enough (merged cells left unsplit), lighter than a given dry mass, or (split cells) when their outline
  does not follow a seam (a fragment cut from a cell); each dropped object is logged with its reason.
* user instance masks (:func:`segment_labelled`): a label image beside the field (0 = background), e.g.
  cellpose ``_cp_masks.png`` / ``_seg.npy`` or a Fiji label image (:func:`read_label_image`); every
  labelled cell not touching the border becomes a crop.

Each :class:`CellCrop` holds the background-corrected window around one cell with the pixels of every
other cell set to 0, so :func:`opdcells.preprocess.preprocess_map` measures that cell alone. Overlapping
cells add their OPD: no split can give each its own (the cut runs along the dip, the overlap's extra OPD
goes to one side), so for smears where cells overlap use ``touching="drop"``.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage import filters, io, measure, morphology, segmentation

from .errors import ExportError
from .preprocess import (
    MASK_MARGIN_UM,
    check_map,
    dry_mass_pg,
    fill_nonfinite,
    foreground_mask,
    noise_threshold,
    objects_above,
    remove_background,
    smooth,
)

log = logging.getLogger(__name__)

#: Below this solidity (area / convex hull area) an isolated object is taken for merged cells; two touching
#: discs have 0.88, single round cells > 0.93.
MIN_SOLIDITY = 0.9
#: Every constant of the split below was chosen on the odd-numbered annotated dense fields (1, 3, ..., 13;
#: the even ones held out) with benchmarks/bench_dense_fields.py (0.6 um/px, diameters 9-28 um, dry mass
#: >= 100 pg; ``--fields odd`` and the option named), one at a time around the defaults, by the rule of the
#: goal: the highest recall at precision >= 0.9. The figures are recall / precision on those fields.
#:
#: Solidity limit of the cells of a split: adherent cells in dense cultures are irregular (spread, polar)
#: and a cut along a seam is not a smooth outline. ``--min-solidity`` 0.6 / 0.7 / 0.8: 0.786 / 0.899,
#: 0.782 / 0.901, 0.749 / 0.909 (the outline-contrast limit, not solidity, drops fragments).
MIN_SOLIDITY_SPLIT = 0.7
#: Seams between touching cells are dark valleys of the OPD, found by the Sato tubeness filter
#: (skimage.filters.sato, black ridges; Sato et al. 1998, Med. Image Anal. 2:143) at these scales (seams
#: 1-5 um wide; before the outline and dry-mass limits (0.6, 1.2) / (1.2,) / (0.6, 1.2, 2.4) um gave
#: 0.68 / 0.81, 0.68 / 0.80, 0.75 / 0.82) ...
SEAM_SIGMAS_UM = (0.6, 1.2, 2.4)
#: ... divided by the OPD smoothed over this sigma (about a cell radius; at least the noise threshold), so
#: the seam response is a relative depth, the same for thin and thick cells and in any units.
SEAM_REFERENCE_SIGMA_UM = 4.0
#: Pixels whose relative seam response exceeds ``SEAM_DEPTH`` lie on a seam; the cells' interiors are the
#: foreground pixels below it. Seeds are the centres of the interiors: the extended h-maxima of the distance
#: to the nearest seam or background, h = ``SEED_H_UM`` (a neck narrower by less than that does not split a
#: cell); the watershed floods the seam response from them, so cuts run along the seams, and a segment
#: left inside another is merged into it. ``--seam-depth`` 0.07 / 0.08 / 0.09 (h 0.7 um): 0.747 / 0.846,
#: 0.782 / 0.901, 0.745 / 0.863; ``--seed-h-um`` 0.5 / 0.7 / 1.0: 0.759 / 0.869, 0.782 / 0.901, 0.743 /
#: 0.874. With skimage's ``h_maxima`` (the top pixels of each dome only, so a ridge of near-equal maxima
#: seeded one cell per top) instead of the extended maxima: 0.761 / 0.886.
#: The seeds this replaces (maxima of the OPD smoothed over 1-1.5 um standing 2-5% above their saddle,
#: flooding the OPD) lay on one curve, recall 0.66-0.73 at precision 0.75-0.83 on all 14 fields: granular
#: cells gave several maxima (halves of over-split cells were half of the false cells), flat neighbours
#: without a dip between their maxima one (merged pairs were half of the misses). RAG boundary merging,
#: compact watershed (compactness 0.01-1), a distance-transform weight on the OPD seeds, a minimum seed
#: distance of 4-8 um and iterative thresholding with a dry-mass limit per seed (Vicar et al., "Cell
#: segmentation in quantitative phase images with improved iterative thresholding method") all stayed on or
#: below that curve.
SEAM_DEPTH = 0.08
SEED_H_UM = 0.7
#: A whole cell is bounded by background or by seams; the cut through an over-split cell crosses its body.
#: A split object whose outline (a ring of ``MASK_MARGIN_UM`` around it) has a mean relative seam response
#: under this is taken for a fragment and dropped (true cells had a median outline response of 0.45, false
#: ones 0.29). ``--min-outline-contrast`` 0.15 / 0.2 / 0.25: 0.805 / 0.881, 0.782 / 0.901, 0.713 / 0.905.
MIN_OUTLINE_CONTRAST = 0.2
TOUCHING = ("split", "drop")
#: ``on_drop(label, bbox, reason)``: told of each object a segmentation drops.
OnDrop = Callable[[int, tuple[int, int, int, int], str], None]


@dataclass
class CellCrop:
    """One cell cut from a field of view.

    Attributes
    ----------
    data : (h, w) float ndarray
        Window of the background-corrected field (input units) around the cell, with the pixels of
        every other cell (its segment grown over its faint edge) set to 0.
    bbox : tuple of int
        (row0, col0, row1, col1) of the window in the field (cell bounding box plus margin, clipped; px,
        end exclusive).
    area_px : int
        Pixel area of the cell's segment.
    mask : (h, w) bool ndarray
        The cell's own segment in the window.
    label : int
        The cell's label in the field's label image.
    """

    data: np.ndarray
    bbox: tuple[int, int, int, int]
    area_px: int
    mask: np.ndarray
    label: int


def _background_removed(opd_nm, pixel_size_um: float, order: int, path) -> np.ndarray:
    return remove_background(fill_nonfinite(opd_nm), order=order, pixel_size_um=pixel_size_um, path=path)


def _otsu_labels(field: np.ndarray, pixel_size_um: float) -> np.ndarray:
    smoothed = smooth(field, pixel_size_um)
    return measure.label(objects_above(smoothed, filters.threshold_otsu(smoothed), pixel_size_um))


def _gauss(field: np.ndarray, sigma_um: float, pixel_size_um: float) -> np.ndarray:
    return filters.gaussian(field, sigma=sigma_um / pixel_size_um, preserve_range=True)


def seam_response(field: np.ndarray, objects: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Relative depth of the dark seams (valleys) of the OPD: where touching cells meet.

    Parameters
    ----------
    field : (H, W) array
        Background-corrected OPD (any units, cells positive).
    objects : (H, W) bool array
        Foreground; where the field holds both foreground and background, the reference is floored at the
        field's noise threshold (:func:`preprocess.noise_threshold`), so background noise is no seam.
    pixel_size_um : float
        Object-plane pixel size; ``SEAM_SIGMAS_UM`` and ``SEAM_REFERENCE_SIGMA_UM`` scale with it.

    Returns
    -------
    (H, W) float array, >= 0: Sato black-ridge response at ``SEAM_SIGMAS_UM`` over the OPD smoothed over
    ``SEAM_REFERENCE_SIGMA_UM`` (dimensionless; 0 off any valley).
    """
    smoothed = smooth(field, pixel_size_um)
    floor = noise_threshold(smoothed) if objects.any() and not objects.all() else 0.0
    reference = np.maximum(_gauss(field, SEAM_REFERENCE_SIGMA_UM, pixel_size_um), max(floor, 1e-12))
    sigmas = [sigma_um / pixel_size_um for sigma_um in SEAM_SIGMAS_UM]
    return filters.sato(smoothed, sigmas=sigmas, black_ridges=True) / reference


def split_touching(field: np.ndarray, objects: np.ndarray, pixel_size_um: float, *,
                   seam_depth: float | None = None, seed_h_um: float | None = None,
                   seams: np.ndarray | None = None) -> np.ndarray:
    """Label image of ``objects`` with touching cells split along the seams between them (watershed).

    Parameters
    ----------
    field : (H, W) array
        Background-corrected OPD (any units, cells positive).
    objects : (H, W) bool array
        Foreground (cells above the background noise).
    pixel_size_um : float
        Object-plane pixel size; every length below is in um.
    seam_depth : float, optional
        Relative seam response (:func:`seam_response`) above which a pixel lies on a seam (default
        ``SEAM_DEPTH``).
    seed_h_um : float, optional
        Seeds are the extended h-maxima (h in um) of the distance from each cell interior to the nearest
        seam or background pixel (default ``SEED_H_UM``).
    seams : (H, W) array, optional
        :func:`seam_response` of the field, if already computed.

    Returns
    -------
    (H, W) int array: 0 background, one label per cell; an object without seed keeps one label, and a
    segment lying wholly inside another is merged into it.
    """
    seam_depth = SEAM_DEPTH if seam_depth is None else seam_depth
    seed_h_um = SEED_H_UM if seed_h_um is None else seed_h_um
    if seams is None:
        seams = seam_response(field, objects, pixel_size_um)
    depth_um = ndi.distance_transform_edt(objects & (seams < seam_depth)) * pixel_size_um
    markers = measure.label(_extended_maxima(depth_um, seed_h_um) & (depth_um > 0))
    components = measure.label(objects)
    unseeded = np.where(np.isin(components, components[markers > 0]), 0, components)
    markers = np.where(unseeded > 0, unseeded + markers.max(), markers)
    return _merge_enclosed(segmentation.watershed(seams, markers, mask=objects))


def _extended_maxima(image: np.ndarray, h: float) -> np.ndarray:
    """Boolean map of the extended h-maxima (MATLAB's ``imextendedmax``): the regional maxima of the
    h-maxima transform (morphological reconstruction of ``image - h`` under ``image``). Unlike
    ``skimage.morphology.h_maxima``, which keeps only the top pixels of each dome, a ridge whose maxima
    differ by less than ``h`` gives one connected seed, not one per top."""
    return morphology.local_maxima(morphology.reconstruction(image - h, image), allow_borders=True)


def _merge_enclosed(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every segment that lies wholly inside another merged into it: in a layer of cells
    none lies inside another (a ring of dips around a nucleus is not a seam), and the crop of the outer cell
    would lose the inner part."""
    merged = labels.copy()
    for region in sorted(measure.regionprops(labels), key=lambda r: -r.area):   # outer ones first
        r0, c0, r1, c1 = _window(region.bbox, 1, labels.shape)
        inside = merged[r0:r1, c0:c1]
        own = inside == region.label
        around = np.unique(inside[ndi.binary_dilation(own) & ~own])
        if len(around) == 1 and around[0] != 0:
            merged[merged == region.label] = around[0]
    return merged


def _noise_objects(field: np.ndarray, pixel_size_um: float) -> np.ndarray:
    smoothed = smooth(field, pixel_size_um)
    return objects_above(smoothed, noise_threshold(smoothed), pixel_size_um)


def _check_touching(touching: str) -> None:
    if touching not in TOUCHING:
        raise ValueError(f"touching must be one of {TOUCHING}, not {touching!r}")


def label_cells(opd_nm, pixel_size_um: float, *, touching: str = "split", background_order: int = 1,
                path="<array>") -> np.ndarray:
    """Label image (H, W) int of all objects of a field, before size, border and shape limits.

    ``touching="split"``: everything above the background noise (:func:`preprocess.noise_threshold`),
    touching cells split (:func:`split_touching`); ``"drop"``: Otsu objects, unsplit. Background removed,
    smoothed, holes filled, specks under ``MIN_OBJECT_DIAMETER_UM`` removed.

    Parameters
    ----------
    opd_nm : array_like (H, W)
        The field (OPD in nm, or phase; cells positive).
    pixel_size_um : float
        Object-plane pixel size (um).
    touching : {"split", "drop"}
        Split touching cells or leave objects whole.
    background_order : int
        Polynomial order of the background fitted over the field.
    path : str or os.PathLike
        What an error names.

    Returns
    -------
    (H, W) int ndarray
        0 background, one label per object.

    Raises
    ------
    ValueError
        For an unknown ``touching``.
    ExportError
        When too little of the field is background to fit it.
    """
    _check_touching(touching)
    corrected = _background_removed(opd_nm, pixel_size_um, background_order, path)
    return _labels(corrected, pixel_size_um, touching)


def _labels(corrected: np.ndarray, pixel_size_um: float, touching: str) -> np.ndarray:
    return _labels_and_seams(corrected, pixel_size_um, touching)[0]


def _labels_and_seams(corrected: np.ndarray, pixel_size_um: float, touching: str):
    """Label image and, for ``touching="split"``, the seam response (else None)."""
    if touching == "drop":
        return _otsu_labels(corrected, pixel_size_um), None
    objects = _noise_objects(corrected, pixel_size_um)
    seams = seam_response(corrected, objects, pixel_size_um)
    return split_touching(corrected, objects, pixel_size_um, seams=seams), seams


def _footprints(field: np.ndarray, labels: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Labels grown over each object's faint edge (down to the noise threshold, by at most
    ``MASK_MARGIN_UM``): a threshold cuts inside the cell edge, and a neighbour's edge in a window is a
    neighbour.
    """
    grown = segmentation.expand_labels(labels, distance=MASK_MARGIN_UM / pixel_size_um)
    return grown * (foreground_mask(field, pixel_size_um, margin_um=0.0) | (labels > 0))


def _window(bbox, margin_px: int, shape) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = bbox
    return (max(r0 - margin_px, 0), max(c0 - margin_px, 0),
            min(r1 + margin_px, shape[0]), min(c1 + margin_px, shape[1]))


def _touches_border(bbox, shape) -> bool:
    r0, c0, r1, c1 = bbox
    return r0 == 0 or c0 == 0 or r1 == shape[0] or c1 == shape[1]


@dataclass
class Limits:
    """What a whole single cell must satisfy (lengths in um of the field's pixel size).

    Attributes
    ----------
    min_diameter_um, max_diameter_um : float
        Equivalent diameter (um); smaller objects are debris or fragments, larger ones merged cells.
    min_solidity : float
        Area / convex hull area; less convex objects are merged cells.
    min_dry_mass_pg : float or None
        Dry mass (pg; OPD in nm, alpha 0.19 mL/g); None = no limit.
    min_outline_contrast : float or None
        Mean :func:`seam_response` along the outline; None = no limit (isolated cells).
    isolated : bool
        No pixel of another object may lie in the cell's crop window (``touching="drop"``).
    """

    min_diameter_um: float
    max_diameter_um: float
    min_solidity: float
    min_dry_mass_pg: float | None = None
    min_outline_contrast: float | None = None
    isolated: bool = False


@dataclass
class DroppedObject:
    """An object of a field that is not kept as a whole single cell.

    Attributes
    ----------
    label : int
        Its label in the field's label image.
    bbox : tuple of int
        (row0, col0, row1, col1) in the field (px, end exclusive).
    reason : str
        Why it was dropped (one line, e.g. ``"dry mass 61 pg < 100 pg (fragment or debris?)"``).
    """

    label: int
    bbox: tuple[int, int, int, int]
    reason: str


@dataclass
class FieldSegmentation:
    """Result of :func:`find_cells`: the kept cells' crops, the dropped objects with their reasons, and the
    ``(H, W)`` int label image of all objects (before the limits; crops and dropped objects name its labels).

    Attributes
    ----------
    crops : list of CellCrop
        One per kept cell.
    dropped : list of DroppedObject
        Every other object, in label order.
    labels : (H, W) int ndarray
        All objects.
    """

    crops: list[CellCrop]
    dropped: list[DroppedObject]
    labels: np.ndarray


def _outline_contrast(region, seams: np.ndarray, pixel_size_um: float) -> float:
    """Mean seam response on the ring of ``MASK_MARGIN_UM`` around ``region`` (inside the field)."""
    pad = int(np.ceil(MASK_MARGIN_UM / pixel_size_um)) + 1
    r0, c0, r1, c1 = _window(region.bbox, pad, seams.shape)
    own = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    b0, b1, b2, b3 = region.bbox
    own[b0 - r0:b2 - r0, b1 - c0:b3 - c0] = region.image
    ring = (ndi.distance_transform_edt(~own) * pixel_size_um <= MASK_MARGIN_UM) & ~own
    return float(seams[r0:r1, c0:c1][ring].mean()) if ring.any() else 0.0


def _rejection(region, corrected: np.ndarray, footprints: np.ndarray, seams, window, limits: Limits,
               pixel_size_um: float) -> str | None:
    """Why ``region`` is not a whole single cell under ``limits``; None if it is."""
    diameter_um = region.equivalent_diameter_area * pixel_size_um
    if diameter_um < limits.min_diameter_um:
        return f"too small ({diameter_um:.1f} um < {limits.min_diameter_um:g} um; debris or fragment?)"
    if _touches_border(region.bbox, footprints.shape):
        return "touches the border"
    if diameter_um > limits.max_diameter_um:
        return f"too large ({diameter_um:.1f} um > {limits.max_diameter_um:g} um; merged cells?)"
    if region.solidity < limits.min_solidity:
        return f"solidity {region.solidity:.2f} < {limits.min_solidity:g} (merged cells?)"
    if limits.min_dry_mass_pg is not None:
        r0, c0, r1, c1 = region.bbox
        mass = dry_mass_pg(corrected[r0:r1, c0:c1], pixel_size_um, region.image)
        if mass < limits.min_dry_mass_pg:
            return f"dry mass {mass:.0f} pg < {limits.min_dry_mass_pg:g} pg (fragment or debris?)"
    if limits.min_outline_contrast is not None and seams is not None:
        contrast = _outline_contrast(region, seams, pixel_size_um)
        if contrast < limits.min_outline_contrast:
            return (f"outline contrast {contrast:.2f} < {limits.min_outline_contrast:g} "
                    "(cut across a cell: fragment of an over-split cell?)")
    if limits.isolated:
        w0, v0, w1, v1 = window
        inside = footprints[w0:w1, v0:v1]
        if np.any((inside != 0) & (inside != region.label)):
            return "another object inside its crop window"
    return None


def _crop(corrected: np.ndarray, labels: np.ndarray, footprints: np.ndarray, region, window) -> CellCrop:
    """The window around ``region`` with every other cell's footprint set to 0."""
    r0, c0, r1, c1 = window
    own = labels[r0:r1, c0:c1] == region.label
    others = (footprints[r0:r1, c0:c1] != 0) & (footprints[r0:r1, c0:c1] != region.label) & ~own
    data = np.where(others, 0.0, corrected[r0:r1, c0:c1])
    return CellCrop(data=data, bbox=window, area_px=int(region.area), mask=own, label=int(region.label))


def segment_field(opd_nm, pixel_size_um: float, *, touching: str = "split", min_diameter_um: float = 2.0,
                  max_diameter_um: float = 30.0, margin_um: float = 2.0, min_solidity: float | None = None,
                  min_dry_mass_pg: float | None = None, min_outline_contrast: float | None = None,
                  background_order: int = 1, path="<array>", on_drop: OnDrop | None = None) -> list[CellCrop]:
    """Crops of the whole single cells of a field of view (any units; crops keep the input's).

    Parameters
    ----------
    opd_nm : (H, W) array
        The field (OPD or phase; cells positive over a smooth background).
    pixel_size_um : float
        Object-plane pixel size; every length limit below is in um.
    touching : {"split", "drop"}
        Split touching cells (watershed along the seams, :func:`split_touching`) or keep isolated cells only
        (a cell whose window, bounding box plus ``margin_um``, holds a pixel of another object is dropped).
    min_diameter_um, max_diameter_um : float
        Limits of the equivalent diameter: smaller objects are debris, larger ones merged cells.
    margin_um : float
        Background margin of each crop window around the cell's bounding box.
    min_solidity : float, optional
        Objects less convex are taken for merged cells (default ``MIN_SOLIDITY`` for isolated cells,
        ``MIN_SOLIDITY_SPLIT`` for split ones).
    min_dry_mass_pg : float, optional
        Objects of less dry mass are debris or fragments (needs the field in nm of OPD; default: no limit).
    min_outline_contrast : float, optional
        With ``touching="split"``: objects whose outline has a lower mean relative seam response
        (:func:`seam_response`) are fragments of over-split cells (default ``MIN_OUTLINE_CONTRAST``).
    background_order : int
        Polynomial order of the background fitted over the whole field.
    on_drop : callable, optional
        Called as ``on_drop(label, bbox, reason)`` for every object dropped (bbox: the object's own
        (row0, col0, row1, col1) in the field).

    Returns
    -------
    list of CellCrop, one per kept cell; every dropped object is logged (DEBUG) with its reason and counted
    (INFO). :func:`find_cells` returns the dropped objects too.

    Raises
    ------
    ExportError
        For unusable maps (wrong rank, constant, too little background...), naming ``path``.
    """
    found = find_cells(opd_nm, pixel_size_um, touching=touching, min_diameter_um=min_diameter_um,
                       max_diameter_um=max_diameter_um, margin_um=margin_um, min_solidity=min_solidity,
                       min_dry_mass_pg=min_dry_mass_pg, min_outline_contrast=min_outline_contrast,
                       background_order=background_order, path=path)
    if on_drop is not None:
        for obj in found.dropped:
            on_drop(obj.label, obj.bbox, obj.reason)
    return found.crops


def find_cells(opd_nm, pixel_size_um: float, *, touching: str = "split", min_diameter_um: float = 2.0,
               max_diameter_um: float = 30.0, margin_um: float = 2.0, min_solidity: float | None = None,
               min_dry_mass_pg: float | None = None, min_outline_contrast: float | None = None,
               background_order: int = 1, path="<array>") -> FieldSegmentation:
    """:func:`segment_field` with the dropped objects and the label image (same parameters and errors).

    Parameters
    ----------
    opd_nm, pixel_size_um, touching, min_diameter_um, max_diameter_um, margin_um, min_solidity
        As in :func:`segment_field` (lengths in um).
    min_dry_mass_pg, min_outline_contrast, background_order, path
        As in :func:`segment_field` (dry mass in pg).

    Returns
    -------
    FieldSegmentation
        ``crops`` (one per kept cell), ``dropped`` (every other object with the reason, in label order) and
        ``labels`` ((H, W) int, all objects).
    """
    _check_touching(touching)
    field = np.asarray(opd_nm)
    check_map(field, path)
    split = touching == "split"
    if min_solidity is None:
        min_solidity = MIN_SOLIDITY_SPLIT if split else MIN_SOLIDITY
    if min_outline_contrast is None:
        min_outline_contrast = MIN_OUTLINE_CONTRAST
    limits = Limits(min_diameter_um, max_diameter_um, min_solidity, min_dry_mass_pg,
                    min_outline_contrast if split else None, isolated=not split)
    corrected = _background_removed(field, pixel_size_um, background_order, path)
    labels, seams = _labels_and_seams(corrected, pixel_size_um, touching)
    footprints = _footprints(corrected, labels, pixel_size_um)
    margin_px = int(np.ceil(margin_um / pixel_size_um))
    crops, dropped = [], []
    for region in measure.regionprops(labels):
        window = _window(region.bbox, margin_px, labels.shape)
        reason = _rejection(region, corrected, footprints, seams, window, limits, pixel_size_um)
        if reason:
            log.debug("%s: object %d at %s dropped: %s", path, region.label, region.bbox, reason)
            dropped.append(DroppedObject(int(region.label), tuple(int(v) for v in region.bbox), reason))
            continue
        crops.append(_crop(corrected, labels, footprints, region, window))
    _log_summary(path, crops, dropped)
    return FieldSegmentation(crops, dropped, labels)


def _log_summary(path, crops: list[CellCrop], dropped: list[DroppedObject]) -> None:
    counts: dict[str, int] = {}
    for obj in dropped:
        kind = obj.reason.split(" (")[0].split(" ")[0]
        counts[kind] = counts.get(kind, 0) + 1
    log.info("%s: %d cells kept of %d objects (dropped: %s)", path, len(crops), len(crops) + len(dropped),
             ", ".join(f"{n} {why}" for why, n in sorted(counts.items())) or "none")


# --------------------------------------------------------------------------------------- user masks

#: Classes a cellpose ``_seg.npy`` pickle may name: NumPy's array and scalar reconstruction only.
_NUMPY_PICKLE_CLASSES = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds dicts, lists, strings, numbers and NumPy arrays, and refuses any other class
    (a pickle naming ``os.system`` or any callable is refused before anything runs)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_PICKLE_CLASSES or (module == "numpy" and name.endswith("DType")) or (
                module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_seg_npy(path: Path) -> np.ndarray:
    """``masks`` of a cellpose ``_seg.npy`` (``np.save`` of a dict), read without running pickled code."""
    with open(path, "rb") as fh:
        fmt = np.lib.format
        major, _ = fmt.read_magic(fh)
        _, _, dtype = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(fh)
        if dtype.hasobject:
            try:
                content = _NumpyOnlyUnpickler(fh).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
                raise ExportError(path, f"pickle with more than NumPy arrays, refused ({exc})") from None
            content = content.item() if isinstance(content, np.ndarray) and content.shape == () else content
            if not isinstance(content, dict) or "masks" not in content:
                raise ExportError(path, "pickled .npy without a 'masks' entry (not a cellpose _seg.npy)")
            return np.asarray(content["masks"])
    return np.load(path, allow_pickle=False)


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Instance label image (H, W) int64 from a file; 0 is background, each positive value one cell.

    Reads cellpose ``_seg.npy`` (its ``masks``; the pickle is parsed with an unpickler that only builds
    NumPy arrays, so no code in the file can run), plain ``.npy``, TIFF (Fiji label images, cellpose
    ``_cp_masks.tif``) and PNG (cellpose ``_cp_masks.png``).

    Parameters
    ----------
    path : str or os.PathLike
        The label image.

    Returns
    -------
    (H, W) int64 ndarray

    Raises
    ------
    ExportError
        Naming the file, for a missing or unreadable file, a non-integer or negative image, or one that
        is not 2-D.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(path, "no such mask file" if not path.exists() else "is not a regular file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            labels = _read_seg_npy(path)
        elif suffix in (".tif", ".tiff"):
            labels = tifffile.imread(path)
        else:
            labels = io.imread(path)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder errors of several libraries
        raise ExportError(path, f"cannot read the mask ({type(exc).__name__}: {exc})") from None
    labels = np.squeeze(np.asarray(labels))
    if labels.ndim != 2:
        raise ExportError(path, f"a label image must be 2-D, got shape {labels.shape}")
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iub":
        raise ExportError(path, f"a label image holds integers (0 = background), not {labels.dtype}")
    if labels.min() < 0:
        raise ExportError(path, "a label image cannot hold negative labels")
    return labels.astype(np.int64)


def relabel_components(labels: np.ndarray) -> np.ndarray:
    """One label per connected component of each value (for annotations that reuse a value for cells that
    do not touch, e.g. the 25*k colouring of the dense Q-Phase fields; 8-connectivity).

    Parameters
    ----------
    labels : (H, W) int ndarray
        A label image (0 background).

    Returns
    -------
    (H, W) int64 ndarray
        Labels 1..n, one per connected piece.
    """
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.int64)
    for value in np.unique(labels[labels > 0]):
        parts = measure.label(labels == value, connectivity=2)
        out = np.where(parts > 0, parts + out.max(), out)
    return out


def mask_path(field_path: str | os.PathLike, pattern: str) -> Path:
    """The label image of a field: ``pattern`` with ``{stem}`` (the field's name without suffix),
    relative to the field's folder (``"{stem}_cp_masks.png"`` -> ``fov_1_cp_masks.png``).

    Parameters
    ----------
    field_path : str or os.PathLike
        The field-of-view export.
    pattern : str
        The ``--masks`` pattern.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        When ``pattern`` holds no ``{stem}``.
    """
    field_path = Path(field_path)
    if "{stem}" not in pattern:
        raise ValueError(f"a mask pattern needs {{stem}} (e.g. '{{stem}}_cp_masks.png'), not {pattern!r}")
    return field_path.parent / pattern.replace("{stem}", field_path.stem)


def segment_labelled(opd_nm, pixel_size_um: float, labels, *, margin_um: float = 2.0,
                     background_order: int = 1, path="<array>", mask_file="<labels>",
                     on_drop: OnDrop | None = None) -> list[CellCrop]:
    """Crops of the cells of a user label image (every label not touching the border, any size).

    Parameters
    ----------
    opd_nm : (H, W) array
        The field (any units; crops keep them).
    pixel_size_um : float
        Object-plane pixel size (scales ``margin_um`` and background smoothing).
    labels : (H, W) int array
        0 background, one positive value per cell (relabel reused values with :func:`relabel_components`).
    margin_um, background_order, on_drop
        As in :func:`segment_field`.

    Returns
    -------
    list of CellCrop
        One per label kept (labels touching the field's border are dropped, through ``on_drop``).

    Raises
    ------
    ExportError
        If the label image's shape differs from the field's (naming ``mask_file``) or the field is unusable.
    """
    field = np.asarray(opd_nm)
    check_map(field, path)
    labels = np.asarray(labels)
    if labels.shape != field.shape:
        raise ExportError(mask_file, f"mask of shape {labels.shape} does not match its field {path} "
                                     f"of shape {field.shape}")
    corrected = remove_background(fill_nonfinite(field), mask=_grown(labels, pixel_size_um) > 0,
                                  order=background_order, pixel_size_um=pixel_size_um, path=path)
    footprints = _grown(labels, pixel_size_um)
    margin_px = int(np.ceil(margin_um / pixel_size_um))
    crops = []
    for region in measure.regionprops(labels):
        if _touches_border(region.bbox, labels.shape):
            log.debug("%s: label %d touches the border, dropped", path, region.label)
            if on_drop is not None:
                on_drop(int(region.label), tuple(int(v) for v in region.bbox), "touches the border")
            continue
        window = _window(region.bbox, margin_px, labels.shape)
        crops.append(_crop(corrected, labels, footprints, region, window))
    log.info("%s: %d labelled cells kept of %d", path, len(crops), len(np.unique(labels[labels > 0])))
    return crops


def _grown(labels: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """User labels grown by ``MASK_MARGIN_UM`` (their faint edge and halo; not into other labels)."""
    return segmentation.expand_labels(labels, distance=MASK_MARGIN_UM / pixel_size_um)


# --------------------------------------------------------------------------------------- evaluation


def match_instances(predicted: np.ndarray, truth: np.ndarray, min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Pairs ``(predicted label, true label)`` whose intersection over union is at least ``min_iou``.

    With ``min_iou >= 0.5`` a label has at most one partner (two sets each over half of a third one would
    overlap). Used to score a segmentation against an annotation (whole cells found).

    Parameters
    ----------
    predicted, truth : (H, W) int ndarray
        Label images (0 background).
    min_iou : float
        Smallest intersection over union of a pair (0-1).

    Returns
    -------
    list of tuple of (int, int)

    Raises
    ------
    ValueError
        When the label images differ in shape.
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"label images differ in shape: {predicted.shape} and {truth.shape}")
    both = (predicted > 0) & (truth > 0)
    pairs, overlap = np.unique(np.stack([predicted[both], truth[both]]), axis=1, return_counts=True)
    area_p = np.bincount(predicted.ravel())
    area_t = np.bincount(truth.ravel())
    iou = overlap / (area_p[pairs[0]] + area_t[pairs[1]] - overlap)
    return [(int(p), int(t)) for p, t in pairs[:, iou >= min_iou].T]


def crops_to_labels(crops: list[CellCrop], shape: tuple[int, int]) -> np.ndarray:
    """Label image ``shape`` (int) of the kept cells: crop ``i`` painted with label ``i + 1``.

    Parameters
    ----------
    crops : list of CellCrop
        The kept cells.
    shape : tuple of int
        (H, W) of the field.

    Returns
    -------
    (H, W) int64 ndarray
    """
    labels = np.zeros(shape, dtype=np.int64)
    for i, crop in enumerate(crops, start=1):
        r0, c0, r1, c1 = crop.bbox
        labels[r0:r1, c0:c1][crop.mask] = i
    return labels
