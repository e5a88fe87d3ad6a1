"""Hand-made morphology and texture features of single-cell OPD maps (the ``features`` baseline and the
simulator's difficulty report).

Input: a 2-D OPD map in nm with the cell roughly centred and the background ~0 (e.g. the output of
:func:`opdcells.preprocess.preprocess_map`). The map is resampled to ``REFERENCE_PIXEL_UM`` so that
texture features mean the same at every pixel size, the cell is found with
:func:`opdcells.preprocess.cell_mask` (no margin) and outlined at 10% of its peak OPD, and shape, mass,
OPD statistics, texture (GLCM, high-pass residual, gradients) and radial-profile features are measured.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage, stats
from skimage import feature, measure

from .preprocess import cell_mask, dry_mass_pg, resample

log = logging.getLogger(__name__)

#: Pixel size (um) at which features are measured.
REFERENCE_PIXEL_UM = 0.25
#: Specific refraction increment (mL/g) for dry mass.
ALPHA_ML_PER_G = 0.19
#: Gaussian scale (um) separating the smooth cell shape from fine texture.
TEXTURE_SCALE_UM = 0.75
#: Grey levels of the co-occurrence matrix (level 0 is the background and is left out).
GLCM_LEVELS = 32
#: The outline is drawn at this fraction of the cell's peak OPD (within the noise-based cell mask), so
#: that the smoothing used to find the cell does not inflate its area.
OUTLINE_FRACTION = 0.1
#: Radial profile: mean OPD in these many rings of equal width out to the equivalent radius.
RADIAL_BINS = 4

FEATURE_NAMES = (
    "area_um2", "equivalent_diameter_um", "perimeter_um", "circularity", "eccentricity", "solidity",
    "major_axis_um", "minor_axis_um", "dry_mass_pg", "phase_volume_um3",
    "opd_peak_nm", "opd_mean_nm", "opd_std_nm", "opd_cv", "opd_skewness", "opd_kurtosis",
    "mass_centre_offset", "highpass_std_nm", "highpass_rel", "gradient_mean_rel", "local_maxima_per_um2",
    "glcm_contrast", "glcm_homogeneity", "glcm_energy", "glcm_correlation",
    "radial_gyration", *(f"radial_ring_{i}" for i in range(RADIAL_BINS)),
)


def _outline(opd: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Largest part of ``found`` above ``OUTLINE_FRACTION`` of its peak OPD, holes filled."""
    if not found.any():
        return found
    mask = found & (opd > OUTLINE_FRACTION * np.percentile(opd[found], 99))
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))
    return ndimage.binary_fill_holes(mask)


def _shape_features(props, px: float) -> dict[str, float]:
    perimeter = props.perimeter_crofton * px
    area = props.area * px * px
    return {
        "area_um2": area, "equivalent_diameter_um": props.equivalent_diameter_area * px,
        "perimeter_um": perimeter, "circularity": 4 * math.pi * area / perimeter ** 2 if perimeter else 0.0,
        "eccentricity": props.eccentricity, "solidity": props.solidity,
        "major_axis_um": props.axis_major_length * px, "minor_axis_um": props.axis_minor_length * px,
    }


def _opd_features(opd: np.ndarray, mask: np.ndarray, px: float) -> dict[str, float]:
    values = opd[mask]
    mean, std = float(values.mean()), float(values.std())
    flat = std <= 1e-6 * max(abs(mean), 1.0)   # moments of a constant are undefined
    return {
        "dry_mass_pg": dry_mass_pg(opd, px, mask, ALPHA_ML_PER_G),
        "phase_volume_um3": float(values.sum()) * 1e-3 * px * px,
        "opd_peak_nm": float(np.percentile(values, 99)), "opd_mean_nm": mean,
        "opd_std_nm": std, "opd_cv": std / mean if mean > 0 else 0.0,
        "opd_skewness": 0.0 if flat else float(stats.skew(values)),
        "opd_kurtosis": 0.0 if flat else float(stats.kurtosis(values)),
    }


def _texture_features(opd: np.ndarray, mask: np.ndarray, px: float) -> dict[str, float]:
    """Fine structure: high-pass residual, gradient magnitude and local maxima inside the eroded cell."""
    sigma = TEXTURE_SCALE_UM / px
    inner = ndimage.binary_erosion(mask, iterations=max(1, round(sigma)))
    if not inner.any():
        inner = mask
    highpass = opd - ndimage.gaussian_filter(opd, sigma)
    gradient = np.hypot(*np.gradient(ndimage.gaussian_filter(opd, 1.0), px))
    mean = max(float(opd[mask].mean()), 1e-9)
    peaks = feature.peak_local_max(ndimage.gaussian_filter(opd, 1.0), min_distance=2,
                                   labels=inner.astype(int))
    return {
        "highpass_std_nm": float(highpass[inner].std()), "highpass_rel": float(highpass[inner].std()) / mean,
        "gradient_mean_rel": float(gradient[inner].mean()) / mean,
        "local_maxima_per_um2": len(peaks) / (inner.sum() * px * px),
    }


def _glcm_features(opd: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Grey-level co-occurrence of the cell's OPD quantised to levels 1..GLCM_LEVELS-1 of its own range;
    the background (level 0) is dropped, so only pairs inside the cell count."""
    rows, cols = np.nonzero(mask)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    values, inside = opd[box], mask[box]
    top = max(float(np.percentile(values[inside], 99)), 1e-9)
    levels = 1 + np.clip(values / top * (GLCM_LEVELS - 2), 0, GLCM_LEVELS - 2).round().astype(np.uint8)
    levels[~inside] = 0
    glcm = feature.graycomatrix(levels, distances=[1, 2], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                                levels=GLCM_LEVELS, symmetric=True)[1:, 1:].astype(np.float64)
    glcm /= np.maximum(glcm.sum(axis=(0, 1), keepdims=True), 1.0)
    return {f"glcm_{prop}": float(feature.graycoprops(glcm, prop).mean())
            for prop in ("contrast", "homogeneity", "energy", "correlation")}


def _radial_features(opd: np.ndarray, mask: np.ndarray, props) -> dict[str, float]:
    """Radial OPD profile around the mass centre: radius of gyration and mean OPD in rings, both relative
    to the equivalent radius and the mean OPD."""
    radius = props.equivalent_diameter_area / 2.0
    rows, cols = np.nonzero(mask)
    weights = np.clip(opd[rows, cols], 0.0, None)
    total = max(float(weights.sum()), 1e-9)
    centre = (float((rows * weights).sum()) / total, float((cols * weights).sum()) / total)
    r = np.hypot(rows - centre[0], cols - centre[1]) / radius
    ring = np.minimum((r * RADIAL_BINS).astype(int), RADIAL_BINS - 1)
    sums = np.bincount(ring, weights=opd[rows, cols], minlength=RADIAL_BINS)
    counts = np.maximum(np.bincount(ring, minlength=RADIAL_BINS), 1)
    mean = max(float(opd[rows, cols].mean()), 1e-9)
    offset = math.hypot(centre[0] - props.centroid[0], centre[1] - props.centroid[1]) / radius
    return {"radial_gyration": math.sqrt(float((r * r * weights).sum()) / total),
            "mass_centre_offset": offset,
            **{f"radial_ring_{i}": float(sums[i] / counts[i]) / mean for i in range(RADIAL_BINS)}}


def extract_features(opd_nm, pixel_size_um: float) -> dict[str, float]:
    """Features (see ``FEATURE_NAMES``) of the cell in a background-free OPD map (nm) with the given pixel
    size. All NaN if no cell rises above the background noise.

    The map is first resampled to ``REFERENCE_PIXEL_UM``, so features do not depend on the pixel size.

    Parameters
    ----------
    opd_nm : array_like (H, W)
        Background-free OPD (nm).
    pixel_size_um : float
        Its pixel size (um).

    Returns
    -------
    dict of str to float
        Feature name -> value, in ``FEATURE_NAMES`` order (units in the names: pg, um, um^2, nm).
    """
    opd = resample(np.asarray(opd_nm, dtype=np.float64), pixel_size_um, REFERENCE_PIXEL_UM)
    px = REFERENCE_PIXEL_UM
    mask = _outline(opd, cell_mask(opd, px, margin_um=0.0))
    if mask.sum() < 9:
        log.warning("no cell found in a %s map; features are NaN", opd.shape)
        return dict.fromkeys(FEATURE_NAMES, math.nan)
    props = measure.regionprops(mask.astype(np.uint8))[0]
    values = {**_shape_features(props, px), **_opd_features(opd, mask, px),
              **_texture_features(opd, mask, px), **_glcm_features(opd, mask),
              **_radial_features(opd, mask, props)}
    return {name: float(values[name]) for name in FEATURE_NAMES}


def feature_matrix(maps: Iterable[np.ndarray], pixel_size_um: float | Sequence[float]) -> tuple[np.ndarray,
                                                                                                  list[str]]:
    """Stack :func:`extract_features` of each map into an (N, F) array; ``pixel_size_um`` is one value or
    one per map.

    Parameters
    ----------
    maps : iterable of (H, W) ndarray
        Background-free OPD maps (nm).
    pixel_size_um : float or sequence of float
        Pixel size (um), one for all or one per map.

    Returns
    -------
    tuple of ((N, F) float64 ndarray, list of str)
        The matrix and the feature names (column order).
    """
    maps = list(maps)
    sizes = np.broadcast_to(np.asarray(pixel_size_um, dtype=np.float64), (len(maps),))
    rows = [list(extract_features(m, float(px)).values()) for m, px in zip(maps, sizes, strict=True)]
    return np.asarray(rows, dtype=np.float64).reshape(len(maps), len(FEATURE_NAMES)), list(FEATURE_NAMES)
