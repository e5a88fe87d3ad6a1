"""Single-cell preprocessing: phase/OPD -> OPD in nm, checks, background removal, cell mask, dry mass,
integral-conserving resampling to one pixel size and centring on the cell.

Pipeline (:func:`preprocess_map`): check -> to nm -> background -> mask -> dry mass (native resolution)
-> resample -> centre/crop -> :class:`ProcessedMap`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.interpolate import CubicSpline
from skimage import filters, measure

from .errors import ExportError, MetadataError
from .metadata import Meta

log = logging.getLogger(__name__)

#: Smallest accepted map side in pixels.
MIN_SIDE_PX = 8
#: Largest fraction of NaN/inf pixels that is filled (nearest finite neighbour) instead of rejected.
MAX_NONFINITE_FRACTION = 0.01
#: Gaussian smoothing before thresholding, about half the optical resolution.
SMOOTH_SIGMA_UM = 0.25
#: Dilation of the thresholded cell: covers the faint edge and the diffraction halo.
MASK_MARGIN_UM = 1.0
#: Foreground threshold in robust noise standard deviations above the background level.
NOISE_K = 5.0
#: Specks smaller than this equivalent diameter are ignored when looking for cells.
MIN_OBJECT_DIAMETER_UM = 1.0
#: At least this fraction of the map must be background to fit the background surface.
MIN_BACKGROUND_FRACTION = 0.05
#: Width of the border frame used for the first background guess, as a fraction of the side.
BORDER_FRACTION = 0.1
#: Output pixels covering less than this fraction of the resampled cell mask are set to exactly 0
#: (this also drops the faint spline ringing of :func:`resample` beyond the mask edge).
SUPPORT_FRACTION = 0.01
#: Nominal pixel size assumed by :func:`remove_background` when none is given (the default output).
DEFAULT_PIXEL_SIZE_UM = 0.25
#: A phase map (rad) is wrapped when its values stay within one 2 pi interval and at least this many
#: neighbouring pixels differ by more than pi (unwrapped cell phase changes smoothly between pixels).
MIN_WRAP_JUMPS = 5
#: A map is inverted (the cell below the background) when its deepest dip below the border level is
#: this many times its highest rise above it (halo artefacts around real cells are far shallower).
INVERTED_RATIO = 2.0
#: A single-cell map holding this many separate cell-sized objects is a field of view (needs ``--fields``).
#: Two are let through (a neighbour's edge beside the cell is common in cell crops); the shipped fields
#: hold 27-30 objects, the shipped single-cell maps one.
FIELD_MIN_OBJECTS = 3
#: An object counts as cell-sized when its area is at least this fraction of the largest object's ...
FIELD_OBJECT_FRACTION = 0.1
#: ... and at least this area (um^2; equivalent diameter 5 um, below the smallest blood cells' 6-7 um and
#: above debris and platelets): debris does not make a map a field.
FIELD_MIN_CELL_AREA_UM2 = 20.0
#: In a single-cell map, an object clear of the map's edge is the cell rather than a larger one cut by the
#: edge (a neighbour partly in view) when its area is at least this fraction of the largest object's.
WHOLE_CELL_FRACTION = 0.25
#: A single-cell map at least this many times the cell's area is a field of view too (the shipped
#: single-cell maps are 2-35 times their cell; a 256 px field at 0.25 um/px around one 8 um cell is 130).
FIELD_AREA_RATIO = 100.0
#: Largest fraction of a cell's OPD the output window may cut off before the map is refused.
MAX_CUT_FRACTION = 0.01


def _check_order(order: int) -> None:
    if order not in (0, 1, 2):
        raise ValueError(f"background order must be 0 (offset), 1 (plane) or 2 (quadratic), not {order!r}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Output geometry and physical constants of preprocessing.

    Attributes
    ----------
    out_pixel_size_um : float
        Output pixel size (um), default 0.25: samples the ~0.5 um optical resolution (Abbe lambda / 2NA
        for NA ~0.6 at 633 nm) at Nyquist, so resampling to it loses no resolved detail of typical QPI
        microscopes.
    out_size : int
        Side of the square output map (px), default 128 = 32 um at 0.25 um/px, so the largest cells
        (~20 um) fit with margin.
    background_order : int
        Polynomial order of the background surface: 0 an offset, 1 (default) a plane (tilt + offset),
        2 a quadratic surface (also curvature).
    alpha_ml_per_g : float
        Specific refraction increment of cell dry mass (mL/g), default 0.19; 0.18-0.19 mL/g for cell
        protein/dry mass (Barer 1952, Nature 169:366; Zangle & Teitell 2014, Nat. Methods 11:1221).

    Raises
    ------
    ValueError
        When ``background_order`` is not 0, 1 or 2, ``out_pixel_size_um`` or ``alpha_ml_per_g`` is not a
        positive finite number, or ``out_size`` is under ``MIN_SIDE_PX``.
    """

    out_pixel_size_um: float = 0.25
    out_size: int = 128
    background_order: int = 1
    alpha_ml_per_g: float = 0.19

    def __post_init__(self):
        _check_order(self.background_order)
        if not (math.isfinite(self.out_pixel_size_um) and self.out_pixel_size_um > 0):
            raise ValueError(f"out_pixel_size_um must be positive, not {self.out_pixel_size_um!r}")
        if self.out_size < MIN_SIDE_PX:
            raise ValueError(f"out_size must be at least {MIN_SIDE_PX} px, not {self.out_size!r}")
        if not (math.isfinite(self.alpha_ml_per_g) and self.alpha_ml_per_g > 0):
            raise ValueError(f"alpha_ml_per_g must be positive, not {self.alpha_ml_per_g!r}")

    def as_settings(self) -> dict:
        """The settings a dataset stores (its ``pixel_size_um`` is this ``out_pixel_size_um``).

        Returns
        -------
        dict
            ``pixel_size_um`` (um), ``out_size`` (px), ``alpha_ml_per_g`` (mL/g) and ``background_order``.
        """
        return {"pixel_size_um": float(self.out_pixel_size_um), "out_size": int(self.out_size),
                "alpha_ml_per_g": float(self.alpha_ml_per_g), "background_order": int(self.background_order)}

    @classmethod
    def from_settings(cls, settings: dict) -> PreprocessConfig:
        """The config of stored settings (a dataset's, a model's); missing keys take the defaults.

        Parameters
        ----------
        settings : dict
            As :meth:`as_settings` writes them (``pixel_size_um`` is the output pixel size, um).

        Returns
        -------
        PreprocessConfig

        Raises
        ------
        ValueError
            When a stored value is invalid (see the class).
        """
        default = cls()
        return cls(out_pixel_size_um=float(settings.get("pixel_size_um", default.out_pixel_size_um)),
                   out_size=int(settings.get("out_size", default.out_size)),
                   background_order=int(settings.get("background_order", default.background_order)),
                   alpha_ml_per_g=float(settings.get("alpha_ml_per_g", default.alpha_ml_per_g)))


DEFAULT_CONFIG = PreprocessConfig()


@dataclass(frozen=True)
class PlausibleRanges:
    """Physical ranges that a single cell's map must fall in; maps outside are refused with the likely
    cause (wrong ``--units``, a pixel size in nm typed as um, counts not scaled).

    Each field is ``(low, high)``; an expert widens them with ``--plausible NAME=LOW:HIGH``.

    Attributes
    ----------
    peak_opd_nm : tuple of float
        Highest OPD of the cell (nm), default 10-5,000. Cells are at most ~25 um thick with a refractive
        index at most ~0.1 above the medium (nucleoli ~1.38-1.40 in media of 1.33-1.34; Choi et al. 2007,
        Nat. Methods 4:717), so ~2,500 nm; 5,000 nm leaves room. 10 nm is far below any cell's peak.
    dry_mass_pg : tuple of float
        Dry mass (pg), default 1-5,000: red blood cells ~27-30 pg (Popescu et al. 2008, Am. J. Physiol.
        Cell Physiol. 295:C538); mammalian cells span tens to thousands of pg (Zangle & Teitell 2014,
        Nat. Methods 11:1221); 1 pg (platelets) to 5,000 pg (large polyploid cancer cells).
    area_um2 : tuple of float
        Projected area (um^2), default 3-10,000: from a platelet (~3 um^2) to a widely spread adherent
        cell (~10,000 um^2).
    diameter_um : tuple of float
        Longest axis of the cell mask (um), default 2-150: platelet to spread adherent cell.

    Raises
    ------
    ValueError
        When a range is not ``0 <= low < high`` with finite ends.
    """

    peak_opd_nm: tuple[float, float] = (10.0, 5000.0)
    dry_mass_pg: tuple[float, float] = (1.0, 5000.0)
    area_um2: tuple[float, float] = (3.0, 10000.0)
    diameter_um: tuple[float, float] = (2.0, 150.0)

    def __post_init__(self):
        for name, (low, high) in dataclasses.asdict(self).items():
            if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
                raise ValueError(f"plausible range of {name} must be 0 <= low < high, not {low}:{high}")

    def widened(self, **ranges: tuple[float, float]) -> PlausibleRanges:
        """A copy with the given ranges replaced.

        Parameters
        ----------
        **ranges : tuple of float
            Field name -> ``(low, high)`` in the field's unit.

        Returns
        -------
        PlausibleRanges

        Raises
        ------
        ValueError
            For an unknown name or an invalid range.
        """
        unknown = set(ranges) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown plausibility range {sorted(unknown)}; known: "
                             + ", ".join(f.name for f in dataclasses.fields(self)))
        return dataclasses.replace(self, **ranges)


DEFAULT_RANGES = PlausibleRanges()

_TOO_BIG = "a pixel size too large (nm typed as um?), or a field of view read as one cell (--fields)"
_TOO_SMALL = "a pixel size too small, or debris rather than a cell"
#: Why a value outside its range is most likely wrong, by (quantity, too low / too high).
_LIKELY_CAUSE = {
    ("peak_opd_nm", "high"): "values far too large: wrong --units (um or rad given for nm?), or integer "
                             "counts not scaled (--scale)",
    ("peak_opd_nm", "low"): "values far too small: wrong --units (nm given for um?) or a scale too small",
    ("dry_mass_pg", "high"): "wrong --units, counts not scaled (--scale), or a pixel size too large "
                             "(nm typed as um?)",
    ("dry_mass_pg", "low"): "wrong --units or a pixel size too small",
    ("area_um2", "high"): _TOO_BIG, ("area_um2", "low"): _TOO_SMALL,
    ("diameter_um", "high"): _TOO_BIG, ("diameter_um", "low"): _TOO_SMALL,
}
_QUANTITY = {"peak_opd_nm": ("peak OPD", "nm"), "dry_mass_pg": ("dry mass", "pg"),
             "area_um2": ("cell area", "um^2"), "diameter_um": ("cell diameter", "um")}


def check_plausible(values: dict[str, float], ranges: PlausibleRanges, path) -> None:
    """Raise ExportError naming ``path`` when a measured quantity lies outside its plausible range.

    Parameters
    ----------
    values : dict of str to float
        Quantity name (a field of :class:`PlausibleRanges`: ``peak_opd_nm`` nm, ``dry_mass_pg`` pg,
        ``area_um2`` um^2, ``diameter_um`` um) -> measured value.
    ranges : PlausibleRanges
        The accepted ranges.
    path : str or os.PathLike
        What the error names.

    Raises
    ------
    ExportError
        At the first value outside its range, with the likely cause and the ``--plausible`` hint.
    """
    for name, value in values.items():
        low, high = getattr(ranges, name)
        if low <= value <= high:
            continue
        side = "low" if value < low else "high"
        label, unit = _QUANTITY[name]
        raise ExportError(path, f"implausible cell: {label} {value:,.4g} {unit} is outside "
                                f"{low:,g}-{high:,g} {unit}; likely cause: {_LIKELY_CAUSE[(name, side)]} "
                                f"(widen with --plausible {name}=LOW:HIGH if it is real)")


@dataclass(frozen=True)
class FieldPosition:
    """Where a cell cut from a field of view lies in that field (export pixels, row-major).

    Attributes
    ----------
    cell : int
        The cell's number among the cells kept from its field (0, 1, ... in segmentation order).
    label : int
        Its label in the field's label image (the segmentation's or the user's mask).
    centroid_px : tuple of float
        (row, col) of the centroid of the cell's segment, in pixels of the field.
    bbox : tuple of int
        (row0, col0, row1, col1) of the crop window in the field (end exclusive, px).
    pixel_size_um : float
        The field's object-plane pixel size (um), so ``centroid_um`` = ``centroid_px`` * it.
    """

    cell: int
    label: int
    centroid_px: tuple[float, float]
    bbox: tuple[int, int, int, int]
    pixel_size_um: float

    @property
    def centroid_um(self) -> tuple[float, float]:
        """(row, col) of the centroid in um from the field's first pixel."""
        return (self.centroid_px[0] * self.pixel_size_um, self.centroid_px[1] * self.pixel_size_um)


@dataclass
class ProcessedMap:
    """One cell: OPD (nm, float32, ``out_size`` square, background ~0, cell centred) and what was measured.

    Attributes
    ----------
    opd : (out_size, out_size) float32 ndarray
        The cell's OPD (nm) at the output pixel size, centred, exactly 0 outside the dilated cell mask.
    dry_mass_pg : float
        The cell's dry mass (pg), measured at native resolution.
    area_um2 : float
        Its projected area (um^2), measured at native resolution.
    extent_um : float
        Side (um) of the smallest square window centred like ``opd`` that holds the cell's (dilated)
        mask: what an output window must at least be (NaN when not measured).
    position : FieldPosition or None
        Where the cell lies in its field of view (maps cut from fields), else None.
    """

    opd: np.ndarray
    dry_mass_pg: float
    area_um2: float
    extent_um: float = math.nan
    position: FieldPosition | None = None


def to_opd_nm(data, units: str, wavelength_nm: float | None = None, *, path="<array>",
              alpha_ml_per_g: float = 0.19) -> np.ndarray:
    """Convert a map to optical path delay in nm (float64 copy).

    nm: as is; um: x 1000; rad: phase * wavelength / (2 pi); pg/um2 (dry-mass surface density):
    density * alpha * 1000, with the specific refraction increment ``alpha_ml_per_g`` (mL/g = um^3/pg, so
    pg/um^2 * um^3/pg = um of OPD; the inverse of :func:`dry_mass_pg`).

    Parameters
    ----------
    data : array_like (H, W)
        The map in ``units``.
    units : {"nm", "um", "rad", "pg/um2"}
        Unit of ``data``.
    wavelength_nm : float, optional
        Illumination wavelength (nm); required for ``rad``.
    path : str or os.PathLike
        What an error names.
    alpha_ml_per_g : float
        Specific refraction increment (mL/g), for ``pg/um2``.

    Returns
    -------
    (H, W) float64 ndarray
        OPD in nm.

    Raises
    ------
    MetadataError
        For unknown units, or phase in rad without a positive finite wavelength.
    """
    values = np.array(data, dtype=np.float64)
    if units == "nm":
        return values
    if units == "um":
        values *= 1000.0
    elif units == "pg/um2":
        values *= alpha_ml_per_g * 1000.0
    elif units == "rad":
        if wavelength_nm is None or not (math.isfinite(wavelength_nm) and wavelength_nm > 0):
            raise MetadataError(path, f"phase in rad needs a positive wavelength_nm, got {wavelength_nm!r}")
        values *= wavelength_nm / (2.0 * np.pi)
    else:
        raise MetadataError(path, f"unknown units {units!r} (expected nm, um, rad or pg/um2)")
    return values


def check_map(data, path) -> None:
    """Raise ExportError naming ``path`` if ``data`` is not a usable 2-D map.

    Parameters
    ----------
    data : array_like
        The raw map, expected (H, W) real numbers.
    path : str or os.PathLike
        What the error names.

    Raises
    ------
    ExportError
        When the map is not 2-D, holds non-real values, has a side under ``MIN_SIDE_PX``, more than
        ``MAX_NONFINITE_FRACTION`` NaN/inf pixels (fewer are filled by :func:`fill_nonfinite`), or is all
        zeros or constant.
    """
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise ExportError(path, f"expected one 2-D map, got an array of shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ExportError(path, f"map values must be real numbers, not {arr.dtype}")
    if min(arr.shape) < MIN_SIDE_PX:
        raise ExportError(path, f"map of {arr.shape[0]} x {arr.shape[1]} px is too small "
                                f"(at least {MIN_SIDE_PX} px a side)")
    finite = np.isfinite(arr)
    bad = 1.0 - finite.mean()
    if bad > MAX_NONFINITE_FRACTION:
        raise ExportError(path, f"{bad:.1%} of the pixels are NaN or infinite "
                                f"(at most {MAX_NONFINITE_FRACTION:.0%} can be filled)")
    values = arr if bad == 0 else arr[finite]
    if not np.any(values):
        raise ExportError(path, "map is all zeros")
    if values.min() == values.max():
        raise ExportError(path, f"map is constant ({values.flat[0]!r} everywhere)")


def fill_nonfinite(data) -> np.ndarray:
    """Float64 (complex128 for complex input) copy of ``data`` with each NaN/inf pixel replaced by its
    nearest finite neighbour.

    Parameters
    ----------
    data : array_like (H, W)
        A map, any unit.

    Returns
    -------
    (H, W) float64 or complex128 ndarray
        The filled copy (same unit).
    """
    values = np.array(data, dtype=np.result_type(np.asarray(data).dtype, np.float64))
    bad = ~np.isfinite(values)
    if bad.any():
        nearest = ndi.distance_transform_edt(bad, return_distances=False, return_indices=True)
        values = values[tuple(nearest)]
        log.debug("filled %d non-finite pixels", int(bad.sum()))
    return values


def check_not_wrapped(phase_rad, path) -> None:
    """Raise ExportError if a phase map (rad) is wrapped: all values within one 2 pi interval and at
    least ``MIN_WRAP_JUMPS`` neighbouring pixels that differ by more than pi.

    Parameters
    ----------
    phase_rad : array_like (H, W)
        Phase (rad).
    path : str or os.PathLike
        What the error names.

    Raises
    ------
    ExportError
        When the phase is wrapped (hint: unwrap it or export the complex field).
    """
    phase = np.asarray(phase_rad, dtype=np.float64)
    if phase.size == 0:
        return
    low, high = phase.min(), phase.max()     # NaN or inf among the values: only the finite ones count
    if not (math.isfinite(low) and math.isfinite(high)):
        finite = phase[np.isfinite(phase)]
        if finite.size == 0:
            return
        low, high = finite.min(), finite.max()
    if high - low > 2 * np.pi * 1.01:        # np.ptp of the finite values
        return
    with np.errstate(invalid="ignore"):
        jumps = sum(int((np.abs(np.diff(phase, axis=axis)) > np.pi).sum()) for axis in (0, 1))
    if jumps >= MIN_WRAP_JUMPS:
        raise ExportError(path, f"wrapped phase: the values stay within one 2 pi interval "
                                f"({low:.2f} to {high:.2f} rad) with {jumps} jumps of more "
                                "than pi between neighbouring pixels; unwrap it first (e.g. "
                                "skimage.restoration.unwrap_phase) or export the complex field")


def check_not_inverted(opd_nm, pixel_size_um: float, path, *, smoothed: np.ndarray | None = None) -> None:
    """Raise ExportError if the cell lies below the background: the deepest dip of the smoothed map below
    the level of its border frame is ``INVERTED_RATIO`` times its highest rise (a reversed phase sign).

    Parameters
    ----------
    opd_nm : array_like (H, W)
        OPD (nm).
    pixel_size_um : float
        Pixel size (um), for the smoothing.
    path : str or os.PathLike
        What the error names.
    smoothed : (H, W) ndarray, optional
        :func:`smooth` of the map when already made.

    Raises
    ------
    ExportError
        When the map is inverted (hint: ``--invert-phase`` or the other ``--sideband``).
    """
    if smoothed is None:
        smoothed = smooth(np.asarray(opd_nm, dtype=np.float64), pixel_size_um)
    level, sigma = _robust_level(smoothed[_border_frame(smoothed.shape)])
    rise, dip = smoothed.max() - level, level - smoothed.min()
    if dip > INVERTED_RATIO * max(rise, 0.0) and dip > NOISE_K * sigma:
        raise ExportError(path, f"inverted map: the cell lies below the background (deepest dip "
                                f"{dip:.4g} nm, highest rise {rise:.4g} nm), so the phase sign is reversed; "
                                "give --invert-phase (or, for a hologram, the other --sideband)")


def smooth(opd_nm: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Gaussian smoothing over ``SMOOTH_SIGMA_UM`` (suppresses pixel noise before thresholding).

    Parameters
    ----------
    opd_nm : (H, W) ndarray
        OPD (nm).
    pixel_size_um : float
        Pixel size (um): the Gaussian's sigma is ``SMOOTH_SIGMA_UM / pixel_size_um`` px.

    Returns
    -------
    (H, W) float64 ndarray
        The smoothed OPD (nm).
    """
    return filters.gaussian(opd_nm, sigma=SMOOTH_SIGMA_UM / pixel_size_um, preserve_range=True)


def _robust_level(values: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 MAD) of ``values`` (1-D, finite float64), which it
    reorders and overwrites: callers pass a copy (a boolean selection). Equal to ``np.median`` of
    ``values`` and of ``np.abs(values - level)``, without their copies."""
    level = _median_in_place(values)
    np.subtract(values, level, out=values)
    return level, 1.4826 * _median_in_place(np.abs(values, out=values))


#: Every how many values :func:`_median_in_place` samples to bracket the median before selecting it.
MEDIAN_SAMPLE_STEP = 16


def _median_in_place(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a 1-D finite float64 array (which it may reorder), found by
    selection among few values: a strided sample brackets the middle element(s); counting the values
    below and inside the bracket (two comparisons over the array, far cheaper than partitioning it)
    proves they hold the middle ranks, and only the values inside are partitioned. For an even count the
    result is the mean of the two middle elements as ``np.mean`` computes it (``(lower + upper) / 2``);
    NaN for no values. A bracket that misses falls back to partitioning all values (the same result)."""
    n = values.size
    if not n:
        return math.nan
    upper_rank = n // 2
    ranks = [upper_rank] if n % 2 else [upper_rank - 1, upper_rank]
    middle = _select_ranks(values, ranks)
    if n % 2:
        return float(middle[0])
    return float((middle[0] + middle[1]) / 2)


def _select_ranks(values: np.ndarray, ranks: list[int]) -> np.ndarray:
    """The elements of ``values`` (1-D, finite) at the sorted positions ``ranks`` (one or two adjacent)."""
    n, step = values.size, MEDIAN_SAMPLE_STEP
    sample = values[::step]
    if sample.size >= 64:
        m = sample.size
        reach = int(3 * math.sqrt(m * 0.25)) + 2
        at = [min(max(int(r / n * m) + d, 0), m - 1) for r, d in ((ranks[0], -reach), (ranks[-1], reach))]
        low, high = np.partition(sample, at)[at]
        below = int(np.count_nonzero(values < low))
        inside = values[(values >= low) & (values <= high)]
        if below <= ranks[0] and ranks[-1] < below + inside.size:
            picked = [r - below for r in ranks]
            return np.partition(inside, picked)[picked]
    values.partition(ranks)
    return values[ranks]


def noise_threshold(smoothed: np.ndarray) -> float:
    """Foreground threshold: the lower of Otsu and background level + ``NOISE_K`` robust sigma.

    Level and sigma come from the pixels below Otsu (mostly background), so the threshold follows any
    offset, and a cell with a bright nucleus cannot push it above its faint cytoplasm.

    Parameters
    ----------
    smoothed : (H, W) ndarray
        A smoothed OPD map (nm, :func:`smooth`).

    Returns
    -------
    float
        The threshold (nm).
    """
    otsu = _otsu_threshold(smoothed)
    level, sigma = _robust_level(smoothed[smoothed <= otsu])
    return float(min(otsu, level + NOISE_K * sigma))


#: Bins of the Otsu histogram (scikit-image's ``threshold_otsu`` default).
OTSU_BINS = 256


def _otsu_threshold(image: np.ndarray) -> float:
    """``skimage.filters.threshold_otsu(image)`` of a finite float64 map, its 256-bin histogram counted by
    :func:`_uniform_histogram` (the counts of ``np.histogram``, without its copies and range test)."""
    flat = image.ravel()
    low, high = flat.min(), flat.max()
    if not low < high:
        return filters.threshold_otsu(image)
    edges = np.linspace(low, high, OTSU_BINS + 1)           # np.histogram's edges over (min, max)
    centres = (edges[:-1] + edges[1:]) / 2.0                  # skimage.exposure.histogram's centres
    return filters.threshold_otsu(hist=(_uniform_histogram(flat, edges), centres))


def _uniform_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``np.histogram(values, bins=len(edges) - 1)`` for 1-D finite float64 ``values`` spanning
    exactly ``edges[0]``-``edges[-1]`` (their min and max; ``edges`` from ``np.linspace`` as numpy makes
    them). The bin of a value is numpy's: ``(v - first) / (last - first) * bins`` truncated, then moved
    one bin down or up where that disagrees with the edges; the test is made only for the values whose
    computed position lies within rounding of a bin edge (for the others it cannot move them)."""
    bins, first, last = len(edges) - 1, edges[0], edges[-1]
    position = (values - first) / (last - first) * bins
    index = position.astype(np.intp)
    np.minimum(index, bins - 1, out=index)                    # the maximum lies on the last (closed) edge
    position -= index
    # Rounding of the position and of the edges, in bins: a few ulps of the values' magnitude.
    tol = 1e-9 + 64 * np.finfo(np.float64).eps * max(abs(first), abs(last)) / ((last - first) / bins)
    near = np.flatnonzero((position < tol) | (position > 1 - tol))
    if near.size:
        where, at = values[near], index[near]
        at -= where < edges[at]
        at += (where >= edges[at + 1]) & (at != bins - 1)
        index[near] = at
    return np.bincount(index, minlength=bins)


def _stands_out(smoothed: np.ndarray, core: np.ndarray, mask: np.ndarray) -> bool:
    """True if the cell's peak rises ``2 * NOISE_K`` robust sigmas above the background outside ``mask``
    (or if no background is left outside it to compare with)."""
    outside = ~mask
    if not outside.any():
        return True
    background, peak = smoothed[outside], smoothed[core].max()
    if _surely_above(background, peak):
        return True
    level, sigma = _robust_level(background)
    return bool(peak > level + 2 * NOISE_K * sigma)


def _surely_above(values: np.ndarray, peak: float) -> bool:
    """Whether ``peak > level + 2 * NOISE_K * sigma`` (:func:`_robust_level` of ``values``, 1-D finite) is
    proven by counting, without the medians: with ``low``/``high`` around a strided sample's median and
    ``reach`` three times its MAD, more than half of the values at most ``high`` and more than half at
    least ``low`` put the median (float as numpy rounds it) in ``[low, high]``; more than half within
    ``[high - reach, low + reach]`` put the MAD at most ``reach`` (plus rounding, covered by a relative
    1e-9). The exact test's float is then at most ``high + 2 * NOISE_K * 1.4826 * reach``. False when not
    proven (the caller computes the medians)."""
    sample = values[::MEDIAN_SAMPLE_STEP]
    if sample.size < 64:
        return False
    centre = float(np.median(sample))
    spread = float(np.median(np.abs(sample - centre)))
    low, high, reach = centre - spread, centre + spread, 3 * spread
    more_than_half = values.size // 2 + 1
    if (np.count_nonzero(values <= high) < more_than_half or np.count_nonzero(values >= low) < more_than_half
            or np.count_nonzero((values >= high - reach) & (values <= low + reach)) < more_than_half):
        return False
    reach += 1e-9 * (abs(low) + abs(high) + reach)
    return bool(peak > high + 2 * NOISE_K * (1.4826 * reach))


def dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Grow a boolean mask by ``radius_px`` (Euclidean).

    The pixels within ``radius_px`` of the mask (Euclidean distance, as ``ndi.distance_transform_edt(~mask)
    <= radius_px``), found on the mask's bounding box grown by the radius (pixels farther out are farther
    than ``radius_px`` from the mask, so the result is that of the whole map) by :func:`dilate_stack`'s
    row maxima (the disk's rows: 2.6 times faster than the distance transform, the same pixels).

    Parameters
    ----------
    mask : (H, W) bool ndarray
        The mask to grow.
    radius_px : float
        Radius (px); 0 or less returns a copy.

    Returns
    -------
    (H, W) bool ndarray
    """
    if radius_px <= 0 or not mask.any():
        return mask.copy()
    reach = int(math.floor(radius_px)) + 1
    box = tuple(slice(max(int(idx.min()) - reach, 0), int(idx.max()) + reach + 1)
                for idx in _axes_any(mask))
    grown = np.zeros(mask.shape, dtype=bool)
    grown[box] = dilate_stack(mask[box][None], radius_px)[0]
    return grown


def _axes_any(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the rows and of the columns of ``mask`` that hold a True pixel."""
    return np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))


#: 4-connectivity: ``ndi.label``'s default structure in 2-D (``generate_binary_structure(2, 1)``), made once.
CROSS = ndi.generate_binary_structure(2, 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the map's edge filled.

    The same as ``scipy.ndimage.binary_fill_holes`` (background 4-connected), found by labelling the
    background once instead of growing it from the edge pixel by pixel.

    Parameters
    ----------
    mask : (H, W) bool ndarray

    Returns
    -------
    (H, W) bool ndarray
    """
    background, n = ndi.label(~mask, CROSS)
    filled = np.ones(n + 1, dtype=bool)
    filled[background[_border_frame(mask.shape, width=1)]] = False
    filled[0] = True
    return filled[background]


def objects_above(smoothed: np.ndarray, threshold: float, pixel_size_um: float) -> np.ndarray:
    """Boolean map of the objects above ``threshold``: holes filled, specks under
    ``MIN_OBJECT_DIAMETER_UM`` removed.

    Parameters
    ----------
    smoothed : (H, W) ndarray
        A smoothed OPD map (nm).
    threshold : float
        Foreground threshold (nm, :func:`noise_threshold`).
    pixel_size_um : float
        Pixel size (um), to size the specks.

    Returns
    -------
    (H, W) bool ndarray
    """
    above = smoothed > threshold
    objects = np.zeros(above.shape, dtype=bool)
    if not above.any():
        return objects
    # Holes and specks lie within the objects' bounding box: grown by one background pixel (or cut by the
    # map's edge), its edge joins the map's edge through background, so filling there is filling the map.
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in _axes_any(above))
    speck_px = int(np.pi / 4 * (MIN_OBJECT_DIAMETER_UM / pixel_size_um) ** 2)
    objects[box] = _without_specks(fill_holes(above[box]), speck_px)
    return objects


def _without_specks(mask: np.ndarray, speck_px: int) -> np.ndarray:
    """``skimage.morphology.remove_small_objects(mask, max_size=speck_px)`` of a boolean mask (objects of at
    most ``speck_px`` pixels removed, 4-connected), from one labelling, without its checks and copies."""
    labels, n = ndi.label(mask, CROSS)
    keep = np.bincount(labels.ravel(), minlength=n + 1) > speck_px
    keep[0] = False
    return keep[labels]


def _objects(opd_nm: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Everything above the background noise (:func:`noise_threshold`)."""
    return _smoothed_objects(smooth(opd_nm, pixel_size_um), pixel_size_um)


def _smoothed_objects(smoothed: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """:func:`_objects` of a map already smoothed."""
    return objects_above(smoothed, noise_threshold(smoothed), pixel_size_um)


def foreground_mask(opd_nm, pixel_size_um: float, *, margin_um: float = MASK_MARGIN_UM) -> np.ndarray:
    """All objects above background noise, dilated by ``margin_um`` (pixels excluded from background fits).

    Parameters
    ----------
    opd_nm : array_like (H, W)
        OPD (nm).
    pixel_size_um : float
        Pixel size (um).
    margin_um : float
        Dilation (um).

    Returns
    -------
    (H, W) bool ndarray
        True on the objects and their margin.
    """
    return dilate(_objects(np.asarray(opd_nm, dtype=np.float64), pixel_size_um), margin_um / pixel_size_um)


def cell_mask(opd_nm, pixel_size_um: float, *, margin_um: float = MASK_MARGIN_UM,
              labels: np.ndarray | None = None, prefer_whole: bool = False) -> np.ndarray:
    """Mask of the cell: the connected object with the largest integrated OPD, dilated by ``margin_um``.

    Expects a background-removed map (background ~0). All False if nothing rises above the noise.

    Parameters
    ----------
    opd_nm : array_like (H, W)
        Background-removed OPD (nm).
    pixel_size_um : float
        Pixel size (um).
    margin_um : float
        Dilation of the chosen object (um).
    labels : (H, W) int ndarray, optional
        The map's objects (:func:`object_labels`) when already computed.
    prefer_whole : bool
        Only objects clear of the map's edge compete when one of them has ``WHOLE_CELL_FRACTION`` of the
        largest object's area (a single-cell export whose neighbour is partly in view).

    Returns
    -------
    (H, W) bool ndarray
        The cell's (dilated) mask.
    """
    opd = np.asarray(opd_nm, dtype=np.float64)
    labels = object_labels(opd, pixel_size_um) if labels is None else labels
    n = int(labels.max())
    if n == 0:
        return np.zeros(opd.shape, dtype=bool)
    ids = np.arange(1, n + 1)
    # ndi.sum_labels(opd, labels, ids) bit for bit: it sums by this very bincount, after its own checks
    integrated = np.bincount(labels.ravel(), weights=opd.ravel(), minlength=n + 1)[1:]
    if prefer_whole:
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        whole = ~np.isin(ids, labels[_border_frame(labels.shape, width=1)]) & (
            areas >= WHOLE_CELL_FRACTION * areas.max())
        if whole.any():
            integrated = np.where(whole, integrated, -np.inf)
    cell = labels == 1 + int(np.argmax(integrated))
    return dilate(cell, margin_um / pixel_size_um)


def object_labels(opd_nm, pixel_size_um: float) -> np.ndarray:
    """Label the separate objects above the background noise of a background-removed map.

    Parameters
    ----------
    opd_nm : (H, W) array
        Background-removed OPD (nm; background ~0).
    pixel_size_um : float
        Pixel size (um): scales smoothing and speck removal.

    Returns
    -------
    (H, W) int array
        0 background, 1..n objects (:func:`noise_threshold`; holes filled, specks removed).
    """
    return measure.label(_objects(np.asarray(opd_nm, dtype=np.float64), pixel_size_um))


def check_single_cell(labels: np.ndarray, cell: np.ndarray, pixel_size_um: float, path) -> None:
    """Raise ExportError if a map read as one cell is a field of view or its cell is cut by the map's edge.

    Parameters
    ----------
    labels : (H, W) int array
        The map's objects (:func:`object_labels`).
    cell : (H, W) bool array
        The cell's own object (:func:`cell_mask` without margin).
    pixel_size_um : float
        Object-plane pixel size (um): objects under ``FIELD_MIN_CELL_AREA_UM2`` are not cell-sized.
    path
        What the error names.

    Raises
    ------
    ExportError
        When the map holds ``FIELD_MIN_OBJECTS`` or more cell-sized objects (at least
        ``FIELD_MIN_CELL_AREA_UM2`` and ``FIELD_OBJECT_FRACTION`` of the largest object's area) or is
        ``FIELD_AREA_RATIO`` times its cell's area (hint: ``--fields``), or when the cell (chosen by
        :func:`cell_mask` with ``prefer_whole``) touches the map's edge (the export cut it).
    """
    areas = np.bincount(labels.ravel())[1:]
    floor = max(FIELD_OBJECT_FRACTION * areas.max(initial=0), FIELD_MIN_CELL_AREA_UM2 / pixel_size_um ** 2)
    n_cells = int((areas >= floor).sum())
    ratio = labels.size / max(int(cell.sum()), 1)
    if n_cells >= FIELD_MIN_OBJECTS or ratio >= FIELD_AREA_RATIO:
        found = (f"{n_cells} separate cell-sized objects" if n_cells >= FIELD_MIN_OBJECTS else
                 f"one cell covering 1/{ratio:.0f} of the map")
        raise ExportError(path, f"looks like a field of view, not a single-cell map ({found} in "
                                f"{labels.shape[0]} x {labels.shape[1]} px); give --fields to segment it "
                                "into cells")
    if cell[0].any() or cell[-1].any() or cell[:, 0].any() or cell[:, -1].any():
        raise ExportError(path, f"the cell touches the edge of the {labels.shape[0]} x {labels.shape[1]} px "
                                "map, so part of it is cut off; export a larger window around each cell, or "
                                "give --fields if the map is a field of view (cells on its edge are then "
                                "dropped)")


def centred_extent_px(mask: np.ndarray, weights: np.ndarray) -> float:
    """Side of the smallest square centred on the ``weights``-weighted centroid that holds ``mask``.

    Parameters
    ----------
    mask : (H, W) bool array
        The cell (dilated mask).
    weights : (H, W) array
        OPD (nm); only its positive values inside ``mask`` weigh, as in :func:`centre_crop`.

    Returns
    -------
    float
        The side in pixels (0 for an empty mask); times the pixel size: the window the cell needs.
    """
    weights = np.clip(np.where(mask, weights, 0.0), 0.0, None)
    centre = ndi.center_of_mass(weights) if weights.sum() > 0 else ndi.center_of_mass(mask)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0.0
    reach = max(np.abs(rows - centre[0]).max(), np.abs(cols - centre[1]).max())
    return float(2 * reach + 1)


@functools.lru_cache(maxsize=64)
def _border_frame(shape: tuple[int, int], width: int | None = None) -> np.ndarray:
    """Boolean frame along the map's edge, ``width`` px wide (default ``BORDER_FRACTION`` of the side);
    read-only, made once per shape (maps of one export share it)."""
    width = max(2, int(BORDER_FRACTION * min(shape))) if width is None else width
    frame = np.ones(shape, dtype=bool)
    frame[width:-width, width:-width] = False
    frame.setflags(write=False)
    return frame


@functools.lru_cache(maxsize=32)
def _surface_basis(shape: tuple[int, int], order: int) -> np.ndarray:
    """``(k, H*W)`` monomials ``x**i * y**j`` (total degree <= ``order``) on [-1, 1] x [-1, 1] (read-only)."""
    y = np.linspace(-1.0, 1.0, shape[0])[:, None]
    x = np.linspace(-1.0, 1.0, shape[1])[None, :]
    powers = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    basis = np.stack([np.broadcast_to(x ** i * y ** j, shape).ravel() for i, j in powers])
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=32)
def _smoothed_basis(shape: tuple[int, int], order: int, pixel_size_um: float) -> np.ndarray:
    """:func:`smooth` of each surface monomial, ``(k, H*W)``: smoothing is linear, so the smoothed map of
    ``opd - surface`` is ``smooth(opd)`` minus the same combination of these."""
    basis = _surface_basis(shape, order)
    smoothed = np.stack([smooth(b.reshape(shape), pixel_size_um).ravel() for b in basis])
    smoothed.setflags(write=False)
    return smoothed


@functools.lru_cache(maxsize=32)
def _axis_powers(n: int, order: int) -> np.ndarray:
    """``(n, order + 1)`` powers ``t**p`` of the ``n`` pixel coordinates ``t`` on [-1, 1] (read-only)."""
    powers = np.linspace(-1.0, 1.0, n)[:, None] ** np.arange(order + 1)
    powers.setflags(write=False)
    return powers


def _surface_coefficients(opd: np.ndarray, use: np.ndarray, order: int, path) -> np.ndarray:
    """Least-squares coefficients of the polynomial surface through ``opd[use]`` (normal equations).

    The monomials ``x**i * y**j`` are separable, so the normal equations' sums over the used pixels are
    ``y**b @ use @ x**a`` (and ``y**j @ (use * opd) @ x**i``): a few matrix-vector products over the map
    instead of one product per pair of monomials.
    """
    n_terms = (order + 1) * (order + 2) // 2
    n_used = int(np.count_nonzero(use))
    if n_used < MIN_BACKGROUND_FRACTION * use.size or n_used < 10 * n_terms:
        raise ExportError(path, f"only {n_used / use.size:.1%} of the map is background: too little to fit "
                                f"the background (a cell filling the field of view, or no clear cell at all)")
    y, x = _axis_powers(opd.shape[0], 2 * order), _axis_powers(opd.shape[1], 2 * order)
    weights = use.astype(np.float64)
    moments = y.T @ (weights @ x)                                          # [b, a]: sum y**b x**a
    data = y[:, :order + 1].T @ ((weights * opd) @ x[:, :order + 1])     # [j, i]: sum y**j x**i opd
    powers = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]   # as _surface_basis
    gram = np.array([[moments[j + q, i + p] for p, q in powers] for i, j in powers])
    return np.linalg.solve(gram, np.array([data[j, i] for i, j in powers]))


def _fit_surface(opd: np.ndarray, use: np.ndarray, order: int, path) -> np.ndarray:
    """Least-squares polynomial surface of total degree ``order`` through ``opd[use]``, over the whole map."""
    coef = _surface_coefficients(opd, use, order, path)
    return (coef @ _surface_basis(opd.shape, order)).reshape(opd.shape)


def remove_background(opd_nm, mask=None, order: int = 1, *, pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
                      path="<array>") -> np.ndarray:
    """Subtract a polynomial background (order 0 offset, 1 plane, 2 quadratic) fitted outside the cells.

    With ``mask`` (True = cell) one fit over ``~mask``. Without: a first fit over the border frame,
    then twice: mask all objects of the corrected map (:func:`foreground_mask`) and refit outside them.

    Parameters
    ----------
    opd_nm : array_like (H, W)
        OPD (nm).
    mask : (H, W) bool array_like, optional
        The cells (True), excluded from the fit.
    order : {0, 1, 2}
        Polynomial order of the background surface.
    pixel_size_um : float
        Pixel size (um); only scales smoothing and mask margins.
    path : str or os.PathLike
        What an error names.

    Returns
    -------
    (H, W) float64 ndarray
        Background-removed OPD (nm; background ~0).

    Raises
    ------
    ValueError
        For an order other than 0, 1 or 2.
    ExportError
        If too little of the map is background to fit the surface.
    """
    _check_order(order)
    opd = np.asarray(opd_nm, dtype=np.float64)
    if mask is not None:
        return opd - _fit_surface(opd, ~np.asarray(mask, dtype=bool), order, path)
    return _background_removed(opd, smooth(opd, pixel_size_um), order, pixel_size_um, path)[0]


def _background_removed(opd: np.ndarray, smoothed: np.ndarray, order: int, pixel_size_um: float,
                        path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`remove_background` without a mask, :func:`smooth` of its result, and the objects of that
    smoothed map (:func:`_smoothed_objects`) when already found, else None.

    ``smoothed`` is :func:`smooth` of ``opd``; the smoothed corrected maps are made from it and the
    smoothed surface monomials (smoothing is linear), so the map is smoothed once, not once a fit. When a
    refit would use the very pixels of the last fit, it would give the same surface (and so the same
    corrected map and objects again): the loop stops there, with the objects it found, which the cell's
    measurement would otherwise find once more (same result, one noise threshold less).
    """
    shape, basis = opd.shape, _surface_basis(opd.shape, order)
    smooth_basis = _smoothed_basis(shape, order, float(pixel_size_um))
    fitted_on = _border_frame(shape)
    coef = _surface_coefficients(opd, fitted_on, order, path)
    for _ in range(2):
        corrected = smoothed - (coef @ smooth_basis).reshape(shape)
        found = _smoothed_objects(corrected, pixel_size_um)
        use = ~dilate(found, MASK_MARGIN_UM / pixel_size_um)
        if np.array_equal(use, fitted_on):
            return opd - (coef @ basis).reshape(shape), corrected, found
        fitted_on, coef = use, _surface_coefficients(opd, use, order, path)
    return opd - (coef @ basis).reshape(shape), smoothed - (coef @ smooth_basis).reshape(shape), None


@functools.lru_cache(maxsize=64)
def _resampling_matrix(n_in: int, scale: float) -> np.ndarray:
    """``(n_out, n_in)`` matrix of area-weighted, integral-conserving resampling by ``scale``.

    The cumulative integral is interpolated with a cubic spline through the input pixel edges and
    differenced at the output edges: each output pixel is the mean of a smooth interpolant over its area,
    so the total is exact. The output grid covers the input, centred; uncovered parts are 0. The spline
    is linear in the data, so the whole operation is one matrix, made once per (length, scale): maps of
    one session share it.
    """
    n_out = max(1, math.ceil(n_in * scale - 1e-9))
    edges = np.clip((np.arange(n_out + 1) - n_out / 2) / scale + n_in / 2, 0, n_in)
    at_edges = CubicSpline(np.arange(n_in + 1), np.eye(n_in + 1), axis=0)(edges)   # (n_out+1, n_in+1)
    cumulative = np.tril(np.ones((n_in + 1, n_in)), k=-1)                          # [0; cumsum] operator
    matrix = np.diff(at_edges, axis=0) @ cumulative * scale
    matrix.setflags(write=False)
    return matrix


def resample(opd_nm, pixel_size_um: float, out_pixel_size_um: float) -> np.ndarray:
    """Resample to ``out_pixel_size_um``, conserving sum(OPD) * pixel area (dry mass).

    Area-weighted (anti-aliased when shrinking), separable: each output pixel is the mean over its area
    of a cubic spline interpolant of the cumulative integral; the output grid covers the input, centred.

    Parameters
    ----------
    opd_nm : array_like (H, W)
        OPD (nm).
    pixel_size_um : float
        Input pixel size (um).
    out_pixel_size_um : float
        Output pixel size (um).

    Returns
    -------
    (H', W') float64 ndarray
        OPD (nm), ``H' = ceil(H * pixel_size_um / out_pixel_size_um)`` (likewise ``W'``).
    """
    values = np.asarray(opd_nm, dtype=np.float64)
    scale = pixel_size_um / out_pixel_size_um
    if np.isclose(scale, 1.0, rtol=1e-9, atol=0):
        return values.copy()
    rows = _resampling_matrix(values.shape[0], scale)
    cols = _resampling_matrix(values.shape[1], scale)
    return rows @ values @ cols.T


def _resample_cell(opd: np.ndarray, mask: np.ndarray, pixel_size_um: float,
                   out_pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
    """The support (resampled mask above ``SUPPORT_FRACTION``) and the resampled OPD inside ``mask`` (0
    elsewhere), as :func:`resample` of the masked maps: only the mask's bounding box is multiplied (the
    rest of both maps is 0)."""
    masked = np.where(mask, opd, 0.0)
    scale = pixel_size_um / out_pixel_size_um
    if np.isclose(scale, 1.0, rtol=1e-9, atol=0):
        return mask.copy(), masked
    rows, cols = (slice(int(i.min()), int(i.max()) + 1) for i in _axes_any(mask))
    both = np.stack([mask[rows, cols].astype(np.float64), masked[rows, cols]])
    resampled = (_resampling_matrix(opd.shape[0], scale)[:, rows] @ both
                 @ _resampling_matrix(opd.shape[1], scale)[:, cols].T)
    support = resampled[0] > SUPPORT_FRACTION
    return support, np.where(support, resampled[1], 0.0)


def centre_crop(opd_nm, out_size: int, mask=None) -> np.ndarray:
    """``out_size`` square window centred on the OPD-weighted centroid of the cell, zero-padded.

    Weights are the positive OPD inside ``mask`` (whole map if None); the centroid lands on pixel
    ``out_size // 2`` (integer shift, no interpolation).

    Parameters
    ----------
    opd_nm : array_like (H, W)
        OPD (nm).
    out_size : int
        Side of the window (px).
    mask : (H, W) bool array_like, optional
        The cell, which weighs the centroid.

    Returns
    -------
    (out_size, out_size) float64 ndarray
        OPD (nm), 0 where the window leaves the map.
    """
    opd = np.asarray(opd_nm, dtype=np.float64)
    weights = np.clip(opd if mask is None else np.where(mask, opd, 0.0), 0.0, None)
    if weights.sum() > 0:
        centre = ndi.center_of_mass(weights)
    else:
        centre = ((opd.shape[0] - 1) / 2, (opd.shape[1] - 1) / 2)
    r0, c0 = (int(round(c)) - out_size // 2 for c in centre)
    window = np.zeros((out_size, out_size))
    rows = slice(max(r0, 0), min(r0 + out_size, opd.shape[0]))
    cols = slice(max(c0, 0), min(c0 + out_size, opd.shape[1]))
    if rows.start < rows.stop and cols.start < cols.stop:
        window[rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0] = opd[rows, cols]
    return window


def dry_mass_pg(opd_nm, pixel_size_um: float, mask=None, alpha_ml_per_g: float = 0.19) -> float:
    """Dry mass in pg: m = (1 / alpha) * integral of OPD over the cell area (whole map if ``mask`` is None).

    alpha is the specific refraction increment, 0.18-0.19 mL/g for cell protein/dry mass (Barer 1952,
    Nature 169:366; Zangle & Teitell 2014, Nat. Methods 11:1221). With OPD in um, area in um^2 and
    alpha in mL/g = um^3/pg, m is in pg.

    Parameters
    ----------
    opd_nm : array_like (H, W)
        Background-removed OPD (nm).
    pixel_size_um : float
        Pixel size (um).
    mask : (H, W) bool array_like, optional
        The cell; the whole map if None.
    alpha_ml_per_g : float
        Specific refraction increment (mL/g).

    Returns
    -------
    float
        Dry mass (pg).

    Raises
    ------
    ValueError
        When the pixel size or alpha is not positive.
    """
    if not (pixel_size_um > 0 and alpha_ml_per_g > 0):
        raise ValueError(f"pixel size and alpha must be positive, got {pixel_size_um!r}, {alpha_ml_per_g!r}")
    opd = np.asarray(opd_nm, dtype=np.float64)
    total_nm = opd[np.asarray(mask, dtype=bool)].sum() if mask is not None else opd.sum()
    return float(total_nm * 1e-3 * pixel_size_um ** 2 / alpha_ml_per_g)


def opd_of(data, meta: Meta, config: PreprocessConfig = DEFAULT_CONFIG, path="<array>") -> np.ndarray:
    """A raw map (or field of view) as OPD in nm, checked: usable values (:func:`check_map`), phase not
    wrapped, cell not below the background. Non-finite pixels are filled.

    Parameters
    ----------
    data : array_like (H, W)
        The raw map in ``meta.units``.
    meta : Meta
        Its metadata (units, wavelength in nm, pixel size in um).
    config : PreprocessConfig
        Gives the specific refraction increment for ``pg/um2`` maps.
    path : str or os.PathLike
        What an error names.

    Returns
    -------
    (H, W) float64 ndarray
        OPD (nm), background not yet removed.

    Raises
    ------
    ExportError
        When the map is unusable, wrapped or inverted.
    MetadataError
        For unknown units or phase without a wavelength.
    """
    return _checked_opd(data, meta, config, path)[0]


def _checked_opd(data, meta: Meta, config: PreprocessConfig, path) -> tuple[np.ndarray, np.ndarray]:
    """:func:`opd_of` and its smoothed map (:func:`smooth`), which the inversion check already made."""
    check_map(data, path)
    values = fill_nonfinite(data)
    if meta.units == "rad":
        check_not_wrapped(values, path)
    opd = to_opd_nm(values, meta.units, meta.wavelength_nm, path=path, alpha_ml_per_g=config.alpha_ml_per_g)
    smoothed = smooth(opd, meta.pixel_size_um)
    check_not_inverted(opd, meta.pixel_size_um, path, smoothed=smoothed)
    return opd, smoothed


def preprocess_map(data, meta: Meta, config: PreprocessConfig = DEFAULT_CONFIG,
                   path="<array>", ranges: PlausibleRanges = DEFAULT_RANGES, *,
                   single_cell_map: bool = True) -> ProcessedMap:
    """One raw map -> :class:`ProcessedMap` (OPD nm at ``config`` pixel size, centred, dry mass, area).

    Dry mass and area are measured at native resolution. Outside the (dilated) cell mask the output is
    exactly 0 (``opdcells.pipeline`` relies on it): neighbours, debris and background noise do not reach
    the model, and neither does the outline of the original field of view, whose size in the output
    would betray the source microscope. The cell's peak OPD, dry mass, area and diameter must lie in
    ``ranges`` (:class:`PlausibleRanges`).

    Parameters
    ----------
    data : array_like (H, W)
        The raw map in ``meta.units`` (nm, um, rad or pg/um2).
    meta : Meta
        Its metadata (units, wavelength nm, pixel size um).
    config : PreprocessConfig
        Output geometry (``out_size`` px at ``out_pixel_size_um``), background order, alpha.
    path : str or os.PathLike
        What an error names.
    ranges : PlausibleRanges
        The plausible ranges of the cell's measurements.
    single_cell_map : bool
        The map is an export of one cell, so a field of view or a cell cut by the map's edge is refused
        (:func:`check_single_cell`); False for the crops :mod:`opdcells.segment` cut from fields
        (segmentation already chose whole single cells).

    Returns
    -------
    ProcessedMap
        ``opd`` is (``out_size``, ``out_size``) float32, nm.

    Raises
    ------
    MetadataError
        If ``meta`` is incomplete.
    ExportError
        If the map is unusable, holds no cell, is wrapped or inverted, is a field of view or a cut cell,
        the cell is implausible, or more than ``MAX_CUT_FRACTION`` of its OPD falls outside the output
        window (with the window it needs).
    """
    meta.check(path)
    px = meta.pixel_size_um
    opd, smoothed = _checked_opd(data, meta, config, path)
    _check_order(config.background_order)
    opd, smoothed, objects = _background_removed(opd, smoothed, config.background_order, px, path)
    mask, mass, area, extent_um = _measured_cell(opd, smoothed, px, config, path, ranges, single_cell_map,
                                                 objects)
    support, resampled = _resample_cell(opd, mask, px, config.out_pixel_size_um)
    result = _centred_cell(resampled, support, config, mass, area, extent_um, path)
    if isinstance(result, ExportError):
        raise result
    return result


def window_too_small(config: PreprocessConfig, extent_um: float, cut_fraction: float | None = None, *,
                     what: str = "the cell") -> str:
    """Why a cell does not fit an output window, with the numbers and the smallest window that holds it.

    Parameters
    ----------
    config : PreprocessConfig
        The output geometry (``out_size`` px at ``out_pixel_size_um``).
    extent_um : float
        The window the cell needs (:attr:`ProcessedMap.extent_um`), um.
    cut_fraction : float, optional
        The fraction of its OPD the window cuts off.
    what : str
        How the message names the cell.

    Returns
    -------
    str
        One line for an ExportError.
    """
    need_px = math.ceil(extent_um / config.out_pixel_size_um)
    cut = f", {100 * cut_fraction:.1f}% of its OPD cut off" if cut_fraction is not None else ""
    return (f"{what} spans {extent_um:.1f} um but the output window is {config.out_size} px at "
            f"{config.out_pixel_size_um:g} um/px ({config.out_size * config.out_pixel_size_um:g} um){cut}; "
            f"it needs at least {need_px} px at that pixel size (load with a larger --out-size or "
            "--out-pixel-size-um, or leave both out to fit the cells; predict with a model trained on "
            "such maps)")


def _longest_axis_px(mask: np.ndarray) -> float:
    """Major axis length (px) of the ellipse with the same second moments as ``mask``: 4 sqrt of the
    larger eigenvalue of its pixels' covariance (scikit-image's ``axis_major_length``)."""
    rows, cols = np.nonzero(mask)
    rows, cols = rows - rows.mean(), cols - cols.mean()
    a, c, b = float(np.mean(rows * rows)), float(np.mean(cols * cols)), float(np.mean(rows * cols))
    return 4.0 * math.sqrt((a + c) / 2 + math.hypot((a - c) / 2, b))


# ------------------------------------------------------------------------------------- stacks of maps

#: Bytes of one float64 copy of the maps :func:`preprocess_stack` is given at once by its callers
#: (:func:`stack_chunk`): the per-map steps then find the stack's maps in the processor's cache (2 MB of
#: level-2 cache a core here; larger stacks of 241 x 246 px maps were 1.3 times slower), and the stacked
#: steps' copies (about ten) stay far below one stack file (``load``'s memory bound, tested).
STACK_BYTES = 2 ** 19
#: Most maps of one call (small maps).
STACK_MAPS = 64
#: Larger maps go one by one: their own pixel work (noise thresholds, labels) is nearly all of their cost,
#: and the stacked steps, which work on whole maps where :func:`preprocess_map` works on the cell's
#: bounding box, made them slower (measured, CPU a map, one by one / batched: 1.25 at 64 x 64 px, 1.04-1.12
#: at 140 x 140 (HL60), 0.8-0.9 at 241 x 246).
STACK_MAX_PIXELS = 160 * 160


def stack_chunk(shape: tuple[int, ...]) -> int:
    """How many maps of ``shape`` to preprocess together (:data:`STACK_BYTES`, at most :data:`STACK_MAPS`);
    1 (one by one, :func:`preprocess_map`) for maps over :data:`STACK_MAX_PIXELS`.

    Parameters
    ----------
    shape : tuple of int
        One map's shape (H, W), px.

    Returns
    -------
    int
        At least 1.
    """
    pixels = max(1, math.prod(shape))
    if pixels > STACK_MAX_PIXELS:
        return 1
    return int(max(1, min(STACK_MAPS, STACK_BYTES // (8 * pixels))))


def preprocess_stack(data, meta: Meta, config: PreprocessConfig = DEFAULT_CONFIG, paths=None,
                     ranges: PlausibleRanges = DEFAULT_RANGES, *,
                     single_cell_map: bool = True) -> list[ProcessedMap | ExportError]:
    """:func:`preprocess_map` of each map of a stack of equal-shape maps sharing one ``meta``, with array
    operations over the stack axis where the steps allow it.

    Over the whole stack: the checks' statistics, the unit conversion, the smoothing (one Gaussian filter
    over axes 1 and 2), the inversion check (medians of the border frames), the background fits (the first
    over the border frame: one solve with a right-hand side per map; the refits: one batched solve of the
    normal equations), the dilations (:func:`dilate_stack`) and the resampling (one matrix product per
    axis for the whole stack; none when the pixel size is already the output's). Per map, on each map's
    own arrays: the noise threshold, object labels and the choice of the cell, the single-cell checks, the
    measurements and the centring. A map refused by a vectorised check is checked again by the per-map
    function, so its reason is the one :func:`preprocess_map` gives.

    The outputs equal :func:`preprocess_map`'s to floating-point rounding (the products are summed in
    another order): at most 1e-6 nm apart on the real and simulated maps of ``tests/test_preprocess_stack``,
    with the same maps accepted and the same reasons for those refused.

    Parameters
    ----------
    data : array_like (N, H, W)
        The raw maps in ``meta.units`` (nm, um, rad or pg/um2).
    meta : Meta
        Their metadata (units, wavelength nm, pixel size um), shared by all maps.
    config : PreprocessConfig
        Output geometry (``out_size`` px at ``out_pixel_size_um``), background order, alpha.
    paths : sequence of str, optional
        What each map's error names (N of them); default ``"<array> [map i]"``.
    ranges : PlausibleRanges
        The plausible ranges of the cells' measurements.
    single_cell_map : bool
        As in :func:`preprocess_map`.

    Returns
    -------
    list of ProcessedMap or ExportError
        One per map, in order: its :class:`ProcessedMap` (``opd`` (``out_size``, ``out_size``) float32,
        nm), or the ExportError :func:`preprocess_map` raises for it.

    Raises
    ------
    ValueError
        When ``data`` is not 3-D or ``paths`` does not have one entry per map.
    MetadataError
        If ``meta`` is incomplete, or for unknown units or phase without a wavelength (every map's).
    """
    stack = np.asarray(data)
    if stack.ndim != 3:
        raise ValueError(f"expected a stack of 2-D maps (N, H, W), got an array of shape {stack.shape}")
    paths = [f"<array> [map {i}]" for i in range(len(stack))] if paths is None else list(paths)
    if len(paths) != len(stack):
        raise ValueError(f"{len(paths)} paths for {len(stack)} maps")
    results: list = [None] * len(stack)
    if not len(stack):
        return results
    meta.check(paths[0])
    _check_order(config.background_order)
    px = meta.pixel_size_um
    alive, opd = _usable_stack(stack, meta, config, paths, results)
    if not len(alive):
        return _detached(results)
    smoothed = ndi.gaussian_filter(opd, SMOOTH_SIGMA_UM / px, mode="nearest", truncate=4.0, axes=(1, 2))
    keep = _not_inverted(opd, smoothed, px, [paths[i] for i in alive], results, alive)
    alive, opd, smoothed = alive[keep], opd[keep], smoothed[keep]
    if not len(alive):
        return _detached(results)
    keep, opd, smoothed = _stack_background_removed(opd, smoothed, config.background_order, px,
                                                    [paths[i] for i in alive], results, alive)
    alive = alive[keep]
    if not len(alive):
        return _detached(results)
    cells = []
    for i, one_opd, one_smoothed in zip(alive, opd, smoothed, strict=True):
        try:
            cells.append(_measured_cell(one_opd, one_smoothed, px, config, paths[i], ranges, single_cell_map))
        except ExportError as exc:
            results[i] = exc
            cells.append(None)
    ok = np.array([c is not None for c in cells], dtype=bool)
    if ok.any():
        masks = np.stack([c[0] for c in cells if c is not None])
        supports, resampled = _resample_cells(opd[ok], masks, px, config.out_pixel_size_um)
        measured = [c for c in cells if c is not None]
        for i, (_, mass, area, extent_um), support, cell in zip(alive[ok], measured, supports, resampled,
                                                                  strict=True):
            results[i] = _centred_cell(cell, support, config, mass, area, extent_um, paths[i])
    return _detached(results)


def _detached(results: list) -> list:
    """``results`` with each error's traceback (and the exceptions it arose from) dropped: a traceback holds
    the frames of the stacked steps and their arrays, and refused maps' errors are kept by callers."""
    for result in results:
        if isinstance(result, BaseException):
            result.__traceback__ = result.__context__ = result.__cause__ = None
    return results


def _usable_stack(stack: np.ndarray, meta: Meta, config: PreprocessConfig, paths,
                  results: list) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the maps that pass :func:`check_map` and (phase) :func:`check_not_wrapped`, and their OPD
    (nm, float64, non-finite pixels filled). Maps a vectorised test doubts go through the per-map checks,
    which record their error in ``results``."""
    n, shape = len(stack), stack.shape[1:]
    real = np.issubdtype(stack.dtype, np.number) and not np.iscomplexobj(stack) and min(shape) >= MIN_SIDE_PX
    if real:
        finite = np.isfinite(stack).all(axis=(1, 2))
        flat = stack.reshape(n, -1)
        clean = finite & flat.any(axis=1) & (flat.min(axis=1) != flat.max(axis=1))
    else:
        clean = np.zeros(n, dtype=bool)
    values = stack.astype(np.float64) if real else np.zeros((n, *shape))
    for i in np.flatnonzero(~clean):
        try:
            check_map(stack[i], paths[i])
            values[i] = fill_nonfinite(stack[i])
        except ExportError as exc:
            results[i] = exc
    alive = np.flatnonzero([r is None for r in results])
    values = values[alive]
    if meta.units == "rad" and len(alive):
        within = np.flatnonzero(values.max(axis=(1, 2)) - values.min(axis=(1, 2)) <= 2 * np.pi * 1.01)
        jumps = sum((np.abs(np.diff(values[within], axis=axis)) > np.pi).sum(axis=(1, 2)) for axis in (1, 2))
        wrapped = np.zeros(len(alive), dtype=bool)
        wrapped[within] = jumps >= MIN_WRAP_JUMPS
        for j in np.flatnonzero(wrapped):
            try:
                check_not_wrapped(values[j], paths[alive[j]])
            except ExportError as exc:
                results[alive[j]] = exc
        alive, values = alive[~wrapped], values[~wrapped]
    return alive, to_opd_nm(values, meta.units, meta.wavelength_nm, path=paths[0],
                            alpha_ml_per_g=config.alpha_ml_per_g)


def _not_inverted(opd: np.ndarray, smoothed: np.ndarray, pixel_size_um: float, paths, results: list,
                  alive: np.ndarray) -> np.ndarray:
    """Which maps of the stack pass :func:`check_not_inverted` (from the medians of their border frames);
    the others' errors go to ``results`` (at ``alive``)."""
    frame = smoothed[:, _border_frame(smoothed.shape[1:])]
    level = np.median(frame, axis=1)
    sigma = 1.4826 * np.median(np.abs(frame - level[:, None]), axis=1)
    rise, dip = smoothed.max(axis=(1, 2)) - level, level - smoothed.min(axis=(1, 2))
    doubtful = (dip > INVERTED_RATIO * np.maximum(rise, 0.0)) & (dip > NOISE_K * sigma)
    keep = np.ones(len(opd), dtype=bool)
    for j in np.flatnonzero(doubtful):
        try:
            check_not_inverted(opd[j], pixel_size_um, paths[j], smoothed=smoothed[j])
        except ExportError as exc:
            results[alive[j]], keep[j] = exc, False
    return keep


def _stack_background_removed(opd: np.ndarray, smoothed: np.ndarray, order: int, pixel_size_um: float,
                              paths, results: list, alive: np.ndarray):
    """:func:`_background_removed` of each map of a stack: which maps have enough background, and their
    background-removed OPD and its smoothed map (``results`` gets the others' errors, at ``alive``)."""
    n, shape = len(opd), opd.shape[1:]
    basis, smooth_basis = _surface_basis(shape, order), _smoothed_basis(shape, order, float(pixel_size_um))
    frame = _border_frame(shape)
    keep = _enough_background(np.broadcast_to(frame, opd.shape), order, opd, paths, results, alive,
                              np.ones(n, dtype=bool))
    coef = _stack_coefficients(opd, frame, order, keep)
    for _ in range(2):
        corrected = smoothed - (coef @ smooth_basis).reshape(n, *shape)
        found = np.stack([_smoothed_objects(c, pixel_size_um) if k else np.zeros(shape, dtype=bool)
                          for c, k in zip(corrected, keep, strict=True)])
        use = ~dilate_stack(found, MASK_MARGIN_UM / pixel_size_um)
        keep &= _enough_background(use, order, opd, paths, results, alive, keep)
        coef = _stack_coefficients(opd, use, order, keep)
    coef, opd, smoothed = coef[keep], opd[keep], smoothed[keep]
    n = len(coef)
    return keep, opd - (coef @ basis).reshape(n, *shape), smoothed - (coef @ smooth_basis).reshape(n, *shape)


def _enough_background(use: np.ndarray, order: int, opd: np.ndarray, paths, results: list,
                       alive: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Which maps of the stack keep enough background pixels to fit (:func:`_surface_coefficients`'s
    test); the others' errors (the per-map function's) go to ``results``."""
    n_terms = (order + 1) * (order + 2) // 2
    n_used = np.count_nonzero(use.reshape(len(use), -1), axis=1)
    enough = (n_used >= MIN_BACKGROUND_FRACTION * use[0].size) & (n_used >= 10 * n_terms)
    for j in np.flatnonzero(~enough & keep):
        try:
            _surface_coefficients(opd[j], use[j], order, paths[j])
        except ExportError as exc:
            results[alive[j]] = exc
    return enough


def _stack_coefficients(opd: np.ndarray, use: np.ndarray, order: int, fit: np.ndarray) -> np.ndarray:
    """``(N, k)`` least-squares surface coefficients of each map of ``opd`` (N, H, W) through the pixels of
    ``use`` ((H, W) shared, or (N, H, W)), as :func:`_surface_coefficients` (normal equations from
    separable sums). A shared ``use`` makes one normal matrix, solved once for all N right-hand sides.
    Only the maps of ``fit`` (N,) bool are fitted (the others, refused, get 0).
    """
    y, x = _axis_powers(opd.shape[1], 2 * order), _axis_powers(opd.shape[2], 2 * order)
    n, height, width = opd.shape
    weights = use.astype(np.float64)
    moments = y.T @ (weights.reshape(-1, width) @ x).reshape(*weights.shape[:-1], -1)   # [(n,) b, a]
    weighted = ((weights * opd).reshape(-1, width) @ x[:, :order + 1]).reshape(n, height, -1)
    data = y[:, :order + 1].T @ weighted                                 # [n, j, i]: sum y**j x**i opd
    powers = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]   # as _surface_basis
    rows = np.array([[j + q for p, q in powers] for i, j in powers])
    cols = np.array([[i + p for p, q in powers] for i, j in powers])
    gram = moments[..., rows, cols]
    rhs = data[:, [j for _, j in powers], [i for i, _ in powers]]      # (n, k)
    coef = np.zeros(rhs.shape)
    if gram.ndim == 2:
        coef[fit] = np.linalg.solve(gram, rhs[fit].T).T
    else:
        coef[fit] = np.linalg.solve(gram[fit], rhs[fit][..., None])[..., 0]
    return coef


@functools.lru_cache(maxsize=16)
def _disk_rows(radius_px: float) -> tuple[tuple[int, int], ...]:
    """``(di, half)`` of each row of the disk of ``radius_px``: the row offset ``di`` and the largest column
    offset ``dj`` with ``sqrt(di**2 + dj**2)``, computed as :func:`scipy.ndimage.distance_transform_edt`
    does, at most ``radius_px`` (made once per radius: maps of one session share it)."""
    reach = int(math.floor(radius_px))
    offsets = np.arange(reach + 1)
    return tuple((di, int(offsets[np.sqrt(np.float64(di * di + offsets * offsets)) <= radius_px].max()))
                 for di in range(-reach, reach + 1))


def dilate_stack(masks: np.ndarray, radius_px: float) -> np.ndarray:
    """:func:`dilate` of each mask of a stack: the union of row-shifted 1-D maximum filters, one per row
    offset of the disk of ``radius_px`` (the pixels whose Euclidean distance ``sqrt(di**2 + dj**2)``,
    computed as :func:`scipy.ndimage.distance_transform_edt` does, is at most ``radius_px``).

    Parameters
    ----------
    masks : (N, H, W) bool ndarray
        The masks to grow.
    radius_px : float
        Radius (px); 0 or less returns a copy.

    Returns
    -------
    (N, H, W) bool ndarray
    """
    if radius_px <= 0:
        return masks.copy()
    grown = np.zeros(masks.shape, dtype=bool)
    rows_grown: dict[int, np.ndarray] = {}
    height = masks.shape[1]
    for di, half in _disk_rows(float(radius_px)):
        if abs(di) >= height:    # shifted out of the maps
            continue
        if half not in rows_grown:
            rows_grown[half] = ndi.maximum_filter1d(masks.view(np.uint8), 2 * half + 1, axis=2,
                                                    mode="constant").view(bool)
        source = rows_grown[half]
        if di >= 0:
            grown[:, di:] |= source[:, :height - di]
        else:
            grown[:, :di] |= source[:, -di:]
    return grown


def _measured_cell(opd: np.ndarray, smoothed: np.ndarray, px: float, config: PreprocessConfig, path,
                   ranges: PlausibleRanges, single_cell_map: bool,
                   objects: np.ndarray | None = None) -> tuple[np.ndarray, float, float, float]:
    """The cell of one background-removed map, as :func:`preprocess_map` finds, checks and measures it:
    its (dilated) mask, dry mass (pg), area (um^2) and extent (um). ``objects``: the map's
    :func:`_smoothed_objects` when already found."""
    if objects is None:
        objects = _smoothed_objects(smoothed, px)
    labels = measure.label(objects)   # object_labels(opd, px), smoothed once
    core = cell_mask(opd, px, margin_um=0.0, labels=labels, prefer_whole=single_cell_map)
    mask = dilate(core, MASK_MARGIN_UM / px)
    if not core.any() or not _stands_out(smoothed, core, mask):
        raise ExportError(path, "no cell found: nothing rises clearly above the background noise")
    if single_cell_map:
        check_single_cell(labels, core, px, path)
    mass = dry_mass_pg(opd, px, mask, config.alpha_ml_per_g)
    area = float(core.sum() * px ** 2)
    check_plausible({"peak_opd_nm": float(opd[core].max()), "dry_mass_pg": mass, "area_um2": area,
                     "diameter_um": _longest_axis_px(core) * px}, ranges, path)
    return mask, mass, area, centred_extent_px(mask, opd) * px


def _resample_cells(opd: np.ndarray, masks: np.ndarray, pixel_size_um: float,
                    out_pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_resample_cell` of a stack: one matrix product per axis for all maps and masks together."""
    masked = np.where(masks, opd, 0.0)
    scale = pixel_size_um / out_pixel_size_um
    if np.isclose(scale, 1.0, rtol=1e-9, atol=0):
        return masks.copy(), masked
    n = len(opd)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in _axes_any(masks.any(axis=0)))
    rows = _resampling_matrix(opd.shape[1], scale)[:, box[0]]
    cols = _resampling_matrix(opd.shape[2], scale)[:, box[1]]
    both = np.concatenate([masks[:, box[0], box[1]], masked[:, box[0], box[1]]])    # (2n, h, w): all cells
    height, width = both.shape[1:]
    along_rows = rows @ both.transpose(1, 0, 2).reshape(height, -1)                  # (h', 2n w)
    along_rows = along_rows.reshape(len(rows), 2 * n, width).transpose(1, 0, 2)
    resampled = (along_rows.reshape(-1, width) @ cols.T).reshape(2 * n, len(rows), len(cols))
    support = resampled[:n] > SUPPORT_FRACTION
    return support, np.where(support, resampled[n:], 0.0)


def _centred_cell(resampled: np.ndarray, support: np.ndarray, config: PreprocessConfig, mass: float,
                  area: float, extent_um: float, path) -> ProcessedMap | ExportError:
    """The output window of one resampled cell (:func:`preprocess_map`'s last step), or the ExportError
    of a window that cuts off more than ``MAX_CUT_FRACTION`` of its OPD."""
    window = centre_crop(resampled, config.out_size, support)
    kept = window.sum() / resampled.sum() if resampled.sum() > 0 else 1.0
    if kept < 1 - MAX_CUT_FRACTION:
        return ExportError(path, window_too_small(config, extent_um, 1 - kept))
    return ProcessedMap(opd=window.astype(np.float32), dry_mass_pg=mass, area_um2=area, extent_um=extent_um)

