"""Fields of view holding many cells -> crops of single whole cells, one cell per crop.

Two ways to find the cells of a field:

* automatic (:func:`segment_field`): background removal, smoothing, threshold, hole filling, connected
  components; with ``touching="split"`` (default) touching cells are then split by a seeded watershed
  (scikit-image) on the smoothed OPD, seeded by its maxima that stand out from the saddle to any higher
  maximum (:func:`split_touching`); with ``touching="drop"`` only isolated cells are kept (a cell whose
  crop window holds another object is dropped). Cells are dropped when too small (debris) or too large,
  touching the image border, or not convex enough (merged cells left unsplit).
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
from skimage import filters, io, measure, morphology, segmentation

from .errors import ExportError
from .preprocess import (
    MASK_MARGIN_UM,
    check_map,
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
#: The same limit for the cells of a split: adherent cells in dense cultures are irregular (spread, polar)
#: and a watershed cut is not a smooth outline. On the 14 annotated dense fields
#: (benchmarks/bench_dense_fields.py) 0.7 / 0.8 / 0.85 gave recall 0.74 / 0.72 / 0.66 at precision
#: 0.77 / 0.79 / 0.80.
MIN_SOLIDITY_SPLIT = 0.8
#: Watershed seeds: maxima of the OPD smoothed over this sigma (merges the bright granules of one cell,
#: keeps the bodies of two) ...
SEED_SIGMA_UM = 1.5
#: ... that rise at least this fraction of their height above the saddle to any higher maximum (h-maxima
#: of the log OPD, so the rule is independent of units and of how much mass a cell has).
SEED_DEPTH = 0.02
#: The watershed floods the OPD smoothed over this sigma (cuts follow the dark seams between cells).
#: Seed sigma / depth / flood sigma were chosen on the dense fields among 1.0-1.5 um / 0.02-0.05 /
#: 1.0-2.0 um: all lie on one trade-off (recall 0.66-0.73 at precision 0.75-0.83); merging regions across
#: weak seams (skimage.graph.rag_boundary) moved along the same curve.
FLOOD_SIGMA_UM = 1.5
TOUCHING = ("split", "drop")
#: ``on_drop(label, bbox, reason)``: told of each object a segmentation drops.
OnDrop = Callable[[int, tuple[int, int, int, int], str], None]


@dataclass
class CellCrop:
    """One cell cut from a field of view.

    data: ``(h, w)`` window of the background-corrected field (input units) around the cell, with the
        pixels of every other cell (its segment grown over its faint edge) set to 0.
    bbox: (row0, col0, row1, col1) of the window in the field (cell bounding box plus margin, clipped).
    area_px: pixel area of the cell's segment.
    mask: ``(h, w)`` bool, the cell's own segment in the window.
    label: the cell's label in the field's label image.
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


def split_touching(field: np.ndarray, objects: np.ndarray, pixel_size_um: float, *,
                   seed_sigma_um: float = SEED_SIGMA_UM, seed_depth: float = SEED_DEPTH) -> np.ndarray:
    """Label image of ``objects`` with touching cells split by a seeded watershed.

    Parameters
    ----------
    field : (H, W) array
        Background-corrected OPD (any units, cells positive).
    objects : (H, W) bool array
        Foreground (cells above the background noise).
    pixel_size_um : float
        Object-plane pixel size; ``seed_sigma_um`` and ``FLOOD_SIGMA_UM`` scale with it.
    seed_sigma_um, seed_depth : float
        Seeds are the h-maxima of ``log`` of the field smoothed over ``seed_sigma_um``, with
        ``h = -log(1 - seed_depth)``: a maximum seeds a cell when the saddle to any higher one lies at
        least ``seed_depth`` of its height below it.

    Returns
    -------
    (H, W) int array: 0 background, one label per cell; an object without seed keeps one label.
    """
    seeded = _gauss(field, seed_sigma_um, pixel_size_um)
    floor = max(float(np.percentile(seeded[objects], 1)), 1e-12) if objects.any() else 1e-12
    peaks = morphology.h_maxima(np.log(np.clip(seeded, floor, None)), -np.log1p(-seed_depth)) > 0
    markers = measure.label(peaks & objects)
    components = measure.label(objects)
    unseeded = np.where(np.isin(components, components[markers > 0]), 0, components)
    markers = np.where(unseeded > 0, unseeded + markers.max(), markers)
    return segmentation.watershed(-_gauss(field, FLOOD_SIGMA_UM, pixel_size_um), markers, mask=objects)


def _noise_labels(field: np.ndarray, pixel_size_um: float) -> np.ndarray:
    smoothed = smooth(field, pixel_size_um)
    objects = objects_above(smoothed, noise_threshold(smoothed), pixel_size_um)
    return split_touching(field, objects, pixel_size_um)


def _check_touching(touching: str) -> None:
    if touching not in TOUCHING:
        raise ValueError(f"touching must be one of {TOUCHING}, not {touching!r}")


def label_cells(opd_nm, pixel_size_um: float, *, touching: str = "split", background_order: int = 1,
                path="<array>") -> np.ndarray:
    """Label image (H, W) int of all objects of a field, before size, border and shape limits.

    ``touching="split"``: everything above the background noise (:func:`preprocess.noise_threshold`),
    touching cells split (:func:`split_touching`); ``"drop"``: Otsu objects, unsplit. Background removed,
    smoothed, holes filled, specks under ``MIN_OBJECT_DIAMETER_UM`` removed.
    """
    _check_touching(touching)
    corrected = _background_removed(opd_nm, pixel_size_um, background_order, path)
    return _labels(corrected, pixel_size_um, touching)


def _labels(corrected: np.ndarray, pixel_size_um: float, touching: str) -> np.ndarray:
    if touching == "split":
        return _noise_labels(corrected, pixel_size_um)
    return _otsu_labels(corrected, pixel_size_um)


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


def _rejection(region, footprints: np.ndarray, window, diameter_px: tuple[float, float],
               min_solidity: float, isolated: bool) -> str | None:
    """Why ``region`` is not a whole single cell (with ``isolated``: an isolated one); None if it is."""
    if region.equivalent_diameter_area < diameter_px[0]:
        return "too small"
    if _touches_border(region.bbox, footprints.shape):
        return "touches the border"
    if region.equivalent_diameter_area > diameter_px[1]:
        return "too large (merged cells?)"
    if region.solidity < min_solidity:
        return f"solidity {region.solidity:.2f} < {min_solidity} (merged cells?)"
    if isolated:
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
                  background_order: int = 1, path="<array>", on_drop: OnDrop | None = None) -> list[CellCrop]:
    """Crops of the whole single cells of a field of view (any units; crops keep the input's).

    Parameters
    ----------
    opd_nm : (H, W) array
        The field (OPD or phase; cells positive over a smooth background).
    pixel_size_um : float
        Object-plane pixel size; every length limit below is in um.
    touching : {"split", "drop"}
        Split touching cells (watershed, :func:`split_touching`) or keep isolated cells only (a cell whose
        window, bounding box plus ``margin_um``, holds a pixel of another object is dropped).
    min_diameter_um, max_diameter_um : float
        Limits of the equivalent diameter: smaller objects are debris, larger ones merged cells.
    margin_um : float
        Background margin of each crop window around the cell's bounding box.
    min_solidity : float, optional
        Objects less convex are taken for merged cells (default ``MIN_SOLIDITY`` for isolated cells,
        ``MIN_SOLIDITY_SPLIT`` for split ones).
    background_order : int
        Polynomial order of the background fitted over the whole field.
    on_drop : callable, optional
        Called as ``on_drop(label, bbox, reason)`` for every object dropped (bbox: the object's own
        (row0, col0, row1, col1) in the field).

    Returns
    -------
    list of CellCrop, one per kept cell; cells touching the border are counted in the log and dropped.

    Raises
    ------
    ExportError
        For unusable maps (wrong rank, constant, too little background...), naming ``path``.
    """
    _check_touching(touching)
    field = np.asarray(opd_nm)
    check_map(field, path)
    if min_solidity is None:
        min_solidity = MIN_SOLIDITY_SPLIT if touching == "split" else MIN_SOLIDITY
    corrected = _background_removed(field, pixel_size_um, background_order, path)
    labels = _labels(corrected, pixel_size_um, touching)
    footprints = _footprints(corrected, labels, pixel_size_um)
    diameter_px = (min_diameter_um / pixel_size_um, max_diameter_um / pixel_size_um)
    margin_px = int(np.ceil(margin_um / pixel_size_um))
    crops, reasons = [], {}
    for region in measure.regionprops(labels):
        window = _window(region.bbox, margin_px, labels.shape)
        reason = _rejection(region, footprints, window, diameter_px, min_solidity, touching == "drop")
        if reason:
            log.debug("%s: object %d at %s dropped: %s", path, region.label, region.bbox, reason)
            if on_drop is not None:
                on_drop(int(region.label), tuple(int(v) for v in region.bbox), reason)
            reasons[reason.split(" ")[0]] = reasons.get(reason.split(" ")[0], 0) + 1
            continue
        crops.append(_crop(corrected, labels, footprints, region, window))
    log.info("%s: %d cells kept of %d objects (dropped: %s)", path, len(crops), int(labels.max()),
             ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())) or "none")
    return crops


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
    ``_cp_masks.tif``) and PNG (cellpose ``_cp_masks.png``). Raises ExportError naming the file for a
    missing or unreadable file, a non-integer or negative image, or one that is not 2-D.
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
    do not touch, e.g. the 25*k colouring of the dense Q-Phase fields; 8-connectivity)."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.int64)
    for value in np.unique(labels[labels > 0]):
        parts = measure.label(labels == value, connectivity=2)
        out = np.where(parts > 0, parts + out.max(), out)
    return out


def mask_path(field_path: str | os.PathLike, pattern: str) -> Path:
    """The label image of a field: ``pattern`` with ``{stem}`` (the field's name without suffix),
    relative to the field's folder (``"{stem}_cp_masks.png"`` -> ``fov_1_cp_masks.png``)."""
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
    """Label image ``shape`` (int) of the kept cells: crop ``i`` painted with label ``i + 1``."""
    labels = np.zeros(shape, dtype=np.int64)
    for i, crop in enumerate(crops, start=1):
        r0, c0, r1, c1 = crop.bbox
        labels[r0:r1, c0:c1][crop.mask] = i
    return labels
